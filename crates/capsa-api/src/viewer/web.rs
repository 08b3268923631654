//! What serves the viewer over HTTP, for capsad and `capsa screen view`:
//! the vendored noVNC ([`asset`]), the page ([`page`]), the WebSocket
//! bridge ([`bridge`]) and the loopback listener's one-time token
//! ([`LocalAuth`], [`local_app`]).
//!
//! A browser cannot put a bearer token on a WebSocket nor reach a Unix
//! socket, so `capsa screen view` listens on 127.0.0.1 only and prints a
//! URL with a one-time token. The first load with it trades the token for
//! an HttpOnly, SameSite=Strict cookie (and redirects to drop the token from
//! the address bar): a copied URL is refused once used. Every request must
//! name the listener itself as Host (no DNS rebinding) and the WebSocket
//! must come from its own Origin.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use include_dir::{include_dir, Dir};

use crate::error::ApiResult;
use crate::service::ConsoleSession;

/// noVNC as vendored by `scripts/vendor-novnc.sh` (MPL-2.0; see its README).
static NOVNC: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/assets/novnc");
/// The page's script (capsa's, on noVNC's RFB class).
const VIEWER_JS: &str = include_str!("viewer.js");
const JS: &str = "text/javascript; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// The page's Content-Security-Policy: scripts and connections only from
/// the server itself (the WebSocket included), no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; connect-src 'self'; \
    img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; \
    base-uri 'none'; form-action 'none'";

/// A viewer asset by its path under the asset base: `viewer.js`, or
/// `novnc/...` (noVNC's files, licences included); its content type.
pub fn asset(path: &str) -> Option<(&'static [u8], &'static str)> {
    if path == "viewer.js" {
        return Some((VIEWER_JS.as_bytes(), JS));
    }
    let rest = path.strip_prefix("novnc/")?;
    if rest
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return None;
    }
    let f = NOVNC.get_file(rest)?;
    let ct = if rest.ends_with(".js") { JS } else { TEXT };
    Some((f.contents(), ct))
}

/// [`asset`] as a response (`None` when there is no such asset).
pub fn asset_response(path: &str) -> Option<Response> {
    let (body, ct) = asset(path)?;
    Some(
        (
            [
                (header::CONTENT_TYPE, ct),
                (header::CACHE_CONTROL, "no-cache"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            body,
        )
            .into_response(),
    )
}

/// Where a page finds its parts.
#[derive(Debug, Clone)]
pub struct Page<'a> {
    /// The sandbox (shown in the title).
    pub name: &'a str,
    /// URL path of the assets, ending in `/` (`viewer.js` is under it).
    pub assets: &'a str,
    /// URL (path and query) of the VNC WebSocket.
    pub ws: &'a str,
    /// Whether the page sends no input (the server enforces it too).
    pub view_only: bool,
}

fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// The viewer page's HTML.
pub fn page_html(p: &Page<'_>) -> String {
    let mode = if p.view_only {
        "view only (start with --input to type and click)"
    } else {
        "input on: keyboard and pointer reach the guest"
    };
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="referrer" content="no-referrer">
<title>capsa: {name}</title>
<style>
html, body {{ margin: 0; height: 100%; background: #202124; color: #e8eaed; font: 13px system-ui, sans-serif; }}
body {{ display: flex; flex-direction: column; }}
#bar {{ padding: 4px 8px; display: flex; gap: 16px; }}
#screen {{ flex: 1; overflow: auto; }}
</style>
<script type="module" src="{assets}viewer.js"></script>
</head>
<body data-ws="{ws}" data-view-only="{view_only}">
<div id="bar"><strong>{name}</strong><span id="status">connecting…</span><span>{mode}</span></div>
<div id="screen"></div>
</body></html>
"#,
        name = escape(p.name),
        assets = escape(p.assets),
        ws = escape(p.ws),
        view_only = p.view_only,
    )
}

/// The viewer page as a response (never cached, never framed).
pub fn page(p: &Page<'_>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        page_html(p),
    )
        .into_response()
}

/// Pumps a WebSocket and a byte session both ways until either ends:
/// binary frames out, binary or text frames in.
pub async fn bridge(ws: WebSocket, session: ConsoleSession) {
    let (mut wtx, mut wrx) = ws.split();
    let ConsoleSession { mut output, input } = session;
    let to_ws = async {
        while let Some(b) = output.recv().await {
            if wtx.send(Message::Binary(b)).await.is_err() {
                return;
            }
        }
        let _ = wtx.send(Message::Close(None)).await;
    };
    let from_ws = async {
        while let Some(Ok(msg)) = wrx.next().await {
            let data = match msg {
                Message::Binary(b) => b,
                Message::Text(t) => Bytes::copy_from_slice(t.as_bytes()),
                Message::Close(_) => break,
                _ => continue,
            };
            if input.send(data).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        _ = to_ws => {}
        _ = from_ws => {}
    }
}

use super::{constant_time_eq as ct_eq, random_token};

/// The loopback listener's access: a one-time URL token, traded on first
/// use for a session cookie; and the Host and Origin the listener accepts.
#[derive(Debug)]
pub struct LocalAuth {
    port: u16,
    token: Mutex<Option<String>>,
    session: String,
}

impl LocalAuth {
    /// Fresh secrets for a listener on `127.0.0.1:port`; also returns the
    /// one-time token (for [`LocalAuth::url`]).
    pub fn new(port: u16) -> std::io::Result<(Self, String)> {
        let token = random_token()?;
        let auth = Self {
            port,
            token: Mutex::new(Some(token.clone())),
            session: random_token()?,
        };
        Ok((auth, token))
    }

    /// The URL to open.
    pub fn url(&self, token: &str) -> String {
        format!("http://127.0.0.1:{}/?token={token}", self.port)
    }

    /// The session cookie's name (per port: cookies ignore ports).
    fn cookie_name(&self) -> String {
        format!("capsa_viewer_{}", self.port)
    }

    /// Uses up the one-time token if `given` is it.
    pub fn redeem(&self, given: &str) -> bool {
        let mut t = self.token.lock().unwrap_or_else(|p| p.into_inner());
        if t.as_deref()
            .is_some_and(|want| ct_eq(want.as_bytes(), given.as_bytes()))
        {
            *t = None;
            return true;
        }
        false
    }

    /// The `Set-Cookie` value that admits this browser.
    pub fn set_cookie(&self) -> String {
        format!(
            "{}={}; Path=/; HttpOnly; SameSite=Strict",
            self.cookie_name(),
            self.session
        )
    }

    /// Whether the request carries the session cookie.
    pub fn has_cookie(&self, headers: &HeaderMap) -> bool {
        let name = self.cookie_name();
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .any(|(k, v)| k == name && ct_eq(v.as_bytes(), self.session.as_bytes()))
    }

    /// Whether the request was sent to this listener by its address (a
    /// page of another site resolving its name to 127.0.0.1 is refused).
    pub fn host_ok(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|h| h == format!("127.0.0.1:{}", self.port))
    }

    /// Whether a WebSocket comes from the viewer's own page.
    pub fn origin_ok(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|o| o == format!("http://127.0.0.1:{}", self.port))
    }
}

/// Opens the VNC session of the viewed sandbox (the service's
/// `screen_vnc`, view-only or not as the listener was started).
pub type Opener = Arc<dyn Fn() -> BoxFuture<'static, ApiResult<ConsoleSession>> + Send + Sync>;

#[derive(Clone)]
struct LocalState {
    auth: Arc<LocalAuth>,
    open: Opener,
    name: Arc<str>,
    view_only: bool,
}

fn forbidden(why: &str) -> Response {
    (
        StatusCode::FORBIDDEN,
        [
            (header::CONTENT_TYPE, TEXT),
            (header::CACHE_CONTROL, "no-store"),
        ],
        format!("403 forbidden: {why}\n"),
    )
        .into_response()
}

const NO_ACCESS: &str = "this viewer needs the link `capsa screen view` printed, opened once \
    in this browser. Fix: run `capsa screen view NAME` again for a new link";

/// The loopback listener's routes: `/` (the page; `/?token=` admits),
/// `/assets/...` and the WebSocket `/vnc`; everything needs the cookie.
pub fn local_app(auth: Arc<LocalAuth>, open: Opener, name: &str, view_only: bool) -> Router {
    let st = LocalState {
        auth,
        open,
        name: Arc::from(name),
        view_only,
    };
    Router::new()
        .route("/", get(local_index))
        .route("/assets/{*path}", get(local_asset))
        .route("/vnc", get(local_vnc))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(st)
}

async fn local_index(
    State(st): State<LocalState>,
    headers: HeaderMap,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    if !st.auth.host_ok(&headers) {
        return forbidden("open the viewer at the 127.0.0.1 address it printed");
    }
    let token = q.ok().and_then(|Query(q)| q.get("token").cloned());
    if let Some(t) = token {
        if st.auth.redeem(&t) || st.auth.has_cookie(&headers) {
            // Trade the token for the cookie, and drop it from the address bar.
            return (
                StatusCode::SEE_OTHER,
                [
                    (header::LOCATION, "/".to_string()),
                    (header::SET_COOKIE, st.auth.set_cookie()),
                    (header::CACHE_CONTROL, "no-store".to_string()),
                    (header::REFERRER_POLICY, "no-referrer".to_string()),
                ],
            )
                .into_response();
        }
        return forbidden(NO_ACCESS);
    }
    if !st.auth.has_cookie(&headers) {
        return forbidden(NO_ACCESS);
    }
    page(&Page {
        name: &st.name,
        assets: "/assets/",
        ws: "/vnc",
        view_only: st.view_only,
    })
}

async fn local_asset(
    State(st): State<LocalState>,
    headers: HeaderMap,
    Path(path): Path<String>,
) -> Response {
    if !st.auth.host_ok(&headers) || !st.auth.has_cookie(&headers) {
        return forbidden(NO_ACCESS);
    }
    asset_response(&path)
        .unwrap_or_else(|| (StatusCode::NOT_FOUND, "no such asset\n").into_response())
}

async fn local_vnc(
    State(st): State<LocalState>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if !st.auth.host_ok(&headers) || !st.auth.has_cookie(&headers) {
        return forbidden(NO_ACCESS);
    }
    if !st.auth.origin_ok(&headers) {
        return forbidden("the WebSocket must come from the viewer's own page");
    }
    let ws = match ws {
        Ok(ws) => ws.protocols(["binary"]),
        Err(e) => return e.into_response(),
    };
    match (st.open)().await {
        Ok(session) => ws.on_upgrade(move |sock| bridge(sock, session)),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn token_is_one_time_and_the_cookie_admits() {
        let (a, t) = LocalAuth::new(4242).unwrap();
        assert_eq!(t.len(), 64);
        assert!(a.url(&t).starts_with("http://127.0.0.1:4242/?token="));
        assert!(!a.redeem("nope"));
        assert!(!a.redeem(&t[..63]));
        assert!(a.redeem(&t));
        assert!(!a.redeem(&t), "a token works once");
        let cookie = a.set_cookie();
        let pair = cookie.split(';').next().unwrap();
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
        assert!(a.has_cookie(&headers(&[(header::COOKIE, pair)])));
        assert!(a.has_cookie(&headers(&[(header::COOKIE, &format!("x=1; {pair}; y=2"))])));
        assert!(!a.has_cookie(&headers(&[(header::COOKIE, "capsa_viewer_4242=00")])));
        // Another listener's cookie (cookies ignore ports) does not admit.
        let (b, _) = LocalAuth::new(4243).unwrap();
        assert!(!b.has_cookie(&headers(&[(header::COOKIE, pair)])));
        assert!(!a.has_cookie(&HeaderMap::new()));
    }

    #[test]
    fn host_and_origin_are_the_listener() {
        let (a, _) = LocalAuth::new(5000).unwrap();
        assert!(a.host_ok(&headers(&[(header::HOST, "127.0.0.1:5000")])));
        for bad in [
            "localhost:5000",
            "evil.example:5000",
            "127.0.0.1:5001",
            "127.0.0.1",
        ] {
            assert!(!a.host_ok(&headers(&[(header::HOST, bad)])), "{bad}");
        }
        assert!(!a.host_ok(&HeaderMap::new()));
        assert!(a.origin_ok(&headers(&[(header::ORIGIN, "http://127.0.0.1:5000")])));
        assert!(!a.origin_ok(&headers(&[(header::ORIGIN, "http://evil.example")])));
        assert!(!a.origin_ok(&HeaderMap::new()));
    }

    #[test]
    fn assets_and_page() {
        let (js, ct) = asset("novnc/core/rfb.js").unwrap();
        assert!(ct.starts_with("text/javascript") && js.len() > 10_000);
        assert!(asset("novnc/vendor/pako/lib/zlib/inflate.js").is_some());
        assert!(asset("novnc/LICENSE.txt").is_some());
        assert!(asset("viewer.js").is_some());
        for bad in [
            "novnc/../Cargo.toml",
            "novnc//core/rfb.js",
            "novnc/core/./rfb.js",
            "x",
            "novnc/nope.js",
        ] {
            assert!(asset(bad).is_none(), "{bad}");
        }
        let html = page_html(&Page {
            name: "a<b",
            assets: "/assets/",
            ws: "/vnc?x=1&y=2",
            view_only: true,
        });
        assert!(html.contains("a&lt;b") && !html.contains("a<b"));
        assert!(html.contains(r#"data-ws="/vnc?x=1&amp;y=2""#));
        assert!(html.contains(r#"data-view-only="true""#));
        assert!(html.contains(r#"src="/assets/viewer.js""#));
    }
}
