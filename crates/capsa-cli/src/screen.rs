//! `capsa screen ...`: a sandbox's screen through the service (the monitors,
//! or capsad). Only translates flags onto the service's screen verbs.

use std::path::PathBuf;
use std::process::ExitCode;

use capsa_api::types::{ScreenActionsRequest, ScreenRegion, ScreenshotRequest};

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
    /// Save a screenshot as PNG (`-` writes it to stdout).
    Shot {
        /// The sandbox.
        name: String,
        /// The PNG file to write.
        out: PathBuf,
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
        /// Where to save the screenshot taken after the actions.
        #[arg(long, value_name = "PNG")]
        shot: Option<PathBuf>,
    },
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

fn write_png(out: &std::path::Path, png: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    if out.as_os_str() == "-" {
        std::io::stdout().lock().write_all(png)?;
    } else {
        std::fs::write(out, png)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
    }
    Ok(())
}

/// Runs `capsa screen ...`.
pub async fn run(conn: &crate::service::Conn, cmd: ScreenCmd) -> anyhow::Result<ExitCode> {
    let svc = crate::service::connect(conn)?;
    match cmd {
        ScreenCmd::Info { name } => {
            let i = svc.screen_info(&name).await?;
            println!("{}x{}", i.width, i.height);
        }
        ScreenCmd::Shot {
            name,
            out,
            region,
            max_width,
        } => {
            let shot = svc
                .screenshot(&name, ScreenshotRequest { region, max_width })
                .await?;
            write_png(&out, &shot.bytes()?)?;
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
                        screenshot: None,
                    },
                )
                .await?;
            if let (Some(out), Some(s)) = (shot, r.screenshot) {
                write_png(&out, &s.bytes()?)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
