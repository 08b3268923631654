//! `capsa screen ...`: a sandbox's screen through the service (the monitors,
//! or capsad). Only translates flags onto the service's screen verbs.

use std::path::PathBuf;
use std::process::ExitCode;

use capsa_api::types::{ScreenActionsRequest, ScreenRegion, ScreenshotFormat, ScreenshotRequest};

/// Parses `--display WxH`.
pub fn parse_display(s: &str) -> Result<capsa_core::DisplaySpec, String> {
    s.parse().map_err(|e: capsa_core::Error| e.to_string())
}

/// The create request's display for `--display`.
pub fn display_request(d: Option<capsa_core::DisplaySpec>) -> Option<capsa_api::types::ScreenInfo> {
    d.map(|d| capsa_api::types::ScreenInfo {
        width: d.width,
        height: d.height,
    })
}

/// `capsa screen ...`.
#[derive(clap::Subcommand, Debug)]
pub enum ScreenCmd {
    /// Print the size of a sandbox's display.
    Info {
        /// The sandbox.
        name: String,
    },
    /// Save a screenshot (`-` writes it to stdout). The format follows the
    /// file's extension (.png, .jpg/.jpeg, .webp) unless --format says.
    Shot {
        /// The sandbox.
        name: String,
        /// The image file to write.
        out: PathBuf,
        /// png (default), jpeg or webp (lossless).
        #[arg(long, value_name = "FORMAT")]
        format: Option<capsa::ImageFormat>,
        /// JPEG quality, 1..=100 (default 80).
        #[arg(long, value_name = "Q")]
        quality: Option<u8>,
        /// Only this part of the screen: x,y,width,height.
        #[arg(long, value_name = "X,Y,W,H", value_parser = parse_region)]
        region: Option<ScreenRegion>,
        /// Downscale to at most this width (the scale is printed on stderr).
        #[arg(long, value_name = "N")]
        max_width: Option<u32>,
    },
    /// Perform pointer and keyboard actions, in order: move:X,Y
    /// click:X,Y[,right|middle][,COUNT] doubleclick:X,Y down[:BUTTON] up[:BUTTON]
    /// drag:X1,Y1,X2,Y2[,...] scroll:up|down|left|right[,N][,X,Y] key:COMBO
    /// (ctrl+c, Return, shift+Tab, ENTER) type:TEXT wait:MS.
    Do {
        /// The sandbox.
        name: String,
        /// The actions (screen pixel coordinates).
        #[arg(required = true, value_parser = parse_action)]
        actions: Vec<capsa::ScreenAction>,
        /// Then wait this long (ms) and save a screenshot to --shot.
        #[arg(long, value_name = "MS", requires = "shot")]
        settle: Option<u64>,
        /// Where to save the screenshot taken after the actions (format by
        /// extension: .png, .jpg/.jpeg, .webp).
        #[arg(long, value_name = "FILE")]
        shot: Option<PathBuf>,
    },
    /// Watch the screen live in a browser (noVNC): serves a viewer on
    /// 127.0.0.1 and prints its one-time URL; view-only unless --input.
    View(ViewArgs),
}

/// `capsa screen view`.
#[derive(clap::Args, Debug)]
pub struct ViewArgs {
    /// The sandbox.
    pub name: String,
    /// Let the browser's keyboard and pointer reach the guest (default:
    /// view only, enforced on the host, not just in the page).
    #[arg(long)]
    pub input: bool,
    /// Port to listen on at 127.0.0.1 (default: any free one).
    #[arg(long, value_name = "P", default_value_t = 0)]
    pub port: u16,
}

fn parse_region(s: &str) -> Result<ScreenRegion, String> {
    let r: capsa::screen::Region = s.parse()?;
    Ok(ScreenRegion {
        x: r.x,
        y: r.y,
        width: r.width,
        height: r.height,
    })
}

fn parse_action(s: &str) -> Result<capsa::ScreenAction, String> {
    s.parse()
}

fn write_image(out: &std::path::Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    if out.as_os_str() == "-" {
        std::io::stdout().lock().write_all(data)?;
    } else {
        std::fs::write(out, data)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
    }
    Ok(())
}

/// The format asked for, else the one `out`'s extension names, else PNG.
fn format_for(asked: Option<capsa::ImageFormat>, out: &std::path::Path) -> ScreenshotFormat {
    asked
        .or_else(|| capsa::ImageFormat::from_extension(out))
        .unwrap_or_default()
        .into()
}

/// Serves the viewer of `args.name` on 127.0.0.1 until interrupted. A
/// browser can neither reach a Unix socket nor put a bearer token on a
/// WebSocket: this listener bridges to the service's `screen_vnc`, guarded
/// by a one-time token (see `capsa_api::viewer::web`).
async fn view(svc: Box<dyn capsa_api::Service>, args: ViewArgs) -> anyhow::Result<ExitCode> {
    use capsa_api::viewer::web::{local_app, LocalAuth, Opener};
    // Fail here, with the fix, rather than in the browser.
    svc.screen_info(&args.name).await?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on 127.0.0.1:{}: {e}. Fix: pick another --port, or leave it out for any free one",
                args.port
            )
        })?;
    let port = listener.local_addr()?.port();
    let (auth, token) = LocalAuth::new(port)?;
    let url = auth.url(&token);
    let svc: std::sync::Arc<dyn capsa_api::Service> = std::sync::Arc::from(svc);
    let name = args.name.clone();
    let input = args.input;
    let open: Opener = std::sync::Arc::new(move || {
        let svc = svc.clone();
        let name = name.clone();
        Box::pin(async move { svc.screen_vnc(&name, input).await })
    });
    let app = local_app(std::sync::Arc::new(auth), open, &args.name, !args.input);
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{url}")?;
        out.flush()?;
    }
    eprintln!(
        "capsa: viewing {} ({}) at the URL above; it works once, in one browser. Ctrl-C stops.",
        args.name,
        if args.input { "input on" } else { "view only" }
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(ExitCode::SUCCESS)
}

/// Runs `capsa screen ...`.
pub async fn run(conn: &crate::service::Conn, cmd: ScreenCmd) -> anyhow::Result<ExitCode> {
    let svc = crate::service::connect(conn)?;
    match cmd {
        ScreenCmd::View(args) => return view(svc, args).await,
        ScreenCmd::Info { name } => {
            let i = svc.screen_info(&name).await?;
            println!("{}x{}", i.width, i.height);
        }
        ScreenCmd::Shot {
            name,
            out,
            region,
            max_width,
            format,
            quality,
        } => {
            let req = ScreenshotRequest {
                region,
                max_width,
                format: Some(format_for(format, &out)),
                quality,
            };
            let shot = svc.screenshot(&name, req).await?;
            write_image(&out, &shot.bytes()?)?;
            eprintln!(
                "{}x{} at scale {} from {},{} of {}x{}",
                shot.width,
                shot.height,
                shot.scale,
                shot.x,
                shot.y,
                shot.screen_width,
                shot.screen_height
            );
        }
        ScreenCmd::Do {
            name,
            actions,
            settle,
            shot,
        } => {
            let r = svc
                .screen_actions(
                    &name,
                    ScreenActionsRequest {
                        actions,
                        screenshot_after_ms: shot.as_ref().map(|_| settle.unwrap_or(0)),
                        screenshot: shot.as_ref().map(|out| ScreenshotRequest {
                            format: Some(format_for(None, out)),
                            ..Default::default()
                        }),
                    },
                )
                .await?;
            if let (Some(out), Some(s)) = (shot, r.screenshot) {
                write_image(&out, &s.bytes()?)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
