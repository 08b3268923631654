//! Bad requests against the real daemon over its real socket: each gets a 4xx
//! JSON error in the one shape, and the daemon keeps serving. No VM needed.

mod common;

use capsa_client::{Client, ClientError};
use capsad::ErrorBody;
use hyper::{Method, StatusCode};

async fn expect_err(
    c: &Client,
    m: Method,
    path: &str,
    ctype: Option<&str>,
    body: Vec<u8>,
    status: StatusCode,
    code: &str,
) {
    let (st, b) = c.raw(m.clone(), path, ctype, body).await.expect("request");
    assert_eq!(st, status, "{m} {path}: {}", String::from_utf8_lossy(&b));
    let e: ErrorBody = serde_json::from_slice(&b).unwrap_or_else(|e| {
        panic!(
            "{m} {path}: not an error body ({e}): {}",
            String::from_utf8_lossy(&b)
        )
    });
    let got = serde_json::to_value(e.error.code).unwrap();
    assert_eq!(got, code, "{m} {path}: {}", e.error.message);
    assert!(!e.error.message.is_empty());
}

#[tokio::test]
async fn bad_requests_get_json_errors_and_the_daemon_keeps_serving() {
    let d = common::Daemon::start();
    let c = d.client();
    let h = c.health().await.expect("health");
    assert_eq!(h.status, "ok");

    // Auth: none, wrong, right.
    let none = Client::connect(&d.socket, "").unwrap();
    match none.health().await {
        Err(ClientError::Api { status, detail }) => {
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert!(detail.fix.is_some());
        }
        other => panic!("{other:?}"),
    }
    let wrong = Client::connect(&d.socket, "nope").unwrap();
    expect_err(
        &wrong,
        Method::GET,
        "/v1/sandboxes",
        None,
        vec![],
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    expect_err(
        &wrong,
        Method::GET,
        "/openapi.json",
        None,
        vec![],
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;

    let json = Some("application/json");
    expect_err(
        &c,
        Method::POST,
        "/v1/sandboxes",
        json,
        b"{not json".to_vec(),
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
    expect_err(
        &c,
        Method::POST,
        "/v1/sandboxes",
        json,
        br#"{"name":"a","bogus":1}"#.to_vec(),
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
    expect_err(
        &c,
        Method::POST,
        "/v1/sandboxes",
        json,
        br#"{"cpus":"two"}"#.to_vec(),
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
    expect_err(
        &c,
        Method::POST,
        "/v1/sandboxes",
        None,
        br#"{"name":"a"}"#.to_vec(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
    let long = format!(r#"{{"name":"{}"}}"#, "x".repeat(200));
    expect_err(
        &c,
        Method::POST,
        "/v1/sandboxes",
        json,
        long.into_bytes(),
        StatusCode::BAD_REQUEST,
        "invalid_name",
    )
    .await;
    expect_err(
        &c,
        Method::POST,
        "/v1/sandboxes",
        json,
        br#"{"name":"../etc"}"#.to_vec(),
        StatusCode::BAD_REQUEST,
        "invalid_name",
    )
    .await;
    expect_err(
        &c,
        Method::POST,
        "/v1/sandboxes",
        json,
        br#"{"name":"a/b"}"#.to_vec(),
        StatusCode::BAD_REQUEST,
        "invalid_name",
    )
    .await;
    expect_err(
        &c,
        Method::POST,
        "/v1/sandboxes",
        json,
        br#"{"name":"ok","workdir":"rel"}"#.to_vec(),
        StatusCode::BAD_REQUEST,
        "invalid_path",
    )
    .await;
    expect_err(
        &c,
        Method::POST,
        "/v1/sandboxes",
        json,
        br#"{"name":"ok","cpus":0}"#.to_vec(),
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
    expect_err(
        &c,
        Method::GET,
        "/v1/sandboxes/%2E%2E",
        None,
        vec![],
        StatusCode::BAD_REQUEST,
        "invalid_name",
    )
    .await;
    expect_err(
        &c,
        Method::GET,
        "/v1/sandboxes/..%2Fetc",
        None,
        vec![],
        StatusCode::BAD_REQUEST,
        "invalid_name",
    )
    .await;
    expect_err(
        &c,
        Method::GET,
        "/v1/sandboxes/nosuch",
        None,
        vec![],
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_err(
        &c,
        Method::DELETE,
        "/v1/sandboxes/nosuch?force=maybe",
        None,
        vec![],
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
    expect_err(
        &c,
        Method::DELETE,
        "/v1/sandboxes/nosuch?bogus=1",
        None,
        vec![],
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
    // Guest file paths.
    for p in ["rel/file", "/a/../etc/passwd", "/..", "%2Fa%2F..%2Fb"] {
        expect_err(
            &c,
            Method::GET,
            &format!("/v1/sandboxes/x/files?path={p}"),
            None,
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_path",
        )
        .await;
        expect_err(
            &c,
            Method::PUT,
            &format!("/v1/sandboxes/x/files?path={p}"),
            None,
            b"data".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_path",
        )
        .await;
    }
    expect_err(
        &c,
        Method::GET,
        "/v1/sandboxes/x/files",
        None,
        vec![],
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
    expect_err(
        &c,
        Method::PUT,
        "/v1/sandboxes/x/files?path=/a&mode=999",
        None,
        vec![],
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
    // Exec validation happens before the sandbox lookup.
    expect_err(
        &c,
        Method::POST,
        "/v1/sandboxes/x/exec",
        json,
        br#"{"argv":[]}"#.to_vec(),
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
    expect_err(
        &c,
        Method::POST,
        "/v1/sandboxes/x/exec",
        json,
        br#"{"argv":["true"],"stdin":"***"}"#.to_vec(),
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
    expect_err(
        &c,
        Method::POST,
        "/v1/sandboxes/x/exec",
        json,
        br#"{"argv":["true"],"cwd":"/../x"}"#.to_vec(),
        StatusCode::BAD_REQUEST,
        "invalid_path",
    )
    .await;
    // A 10 MiB body to a small endpoint.
    let mut big = br#"{"name":""#.to_vec();
    big.extend(std::iter::repeat_n(b'a', 10 << 20));
    big.extend(br#""}"#);
    for path in ["/v1/sandboxes", "/v1/sandboxes/x/exec"] {
        let (status, body) = raw_oversize(&d.socket, &d.token, path, &big);
        assert_eq!(status, 413, "{path}: {body}");
        let e: ErrorBody = serde_json::from_str(&body).expect(&body);
        assert_eq!(
            serde_json::to_value(e.error.code).unwrap(),
            "payload_too_large"
        );
    }
    // Unknown routes and methods.
    expect_err(
        &c,
        Method::GET,
        "/v2/nothing",
        None,
        vec![],
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_err(
        &c,
        Method::PATCH,
        "/v1/sandboxes",
        None,
        vec![],
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;
    // Websocket routes without an upgrade.
    expect_err(
        &c,
        Method::GET,
        "/v1/sandboxes/x/exec/ws",
        None,
        vec![],
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;

    // Still serving.
    assert_eq!(c.list().await.expect("list").len(), 0);
    assert_eq!(c.health().await.expect("health").status, "ok");
}

#[tokio::test]
async fn the_viewer_assets_are_served_behind_the_token() {
    let d = common::Daemon::start();
    let c = d.client();
    let (st, js) = c
        .raw(Method::GET, "/v1/viewer/novnc/core/rfb.js", None, vec![])
        .await
        .unwrap();
    assert_eq!(st, StatusCode::OK);
    assert!(String::from_utf8_lossy(&js).contains("export default class RFB"));
    let (st, _) = c
        .raw(Method::GET, "/v1/viewer/viewer.js", None, vec![])
        .await
        .unwrap();
    assert_eq!(st, StatusCode::OK);
    let (st, lic) = c
        .raw(Method::GET, "/v1/viewer/novnc/LICENSE.txt", None, vec![])
        .await
        .unwrap();
    assert_eq!(st, StatusCode::OK);
    assert!(String::from_utf8_lossy(&lic).contains("MPL"));
    for bad in ["/v1/viewer/novnc/../Cargo.toml", "/v1/viewer/nope.js"] {
        expect_err(
            &c,
            Method::GET,
            bad,
            None,
            vec![],
            StatusCode::NOT_FOUND,
            "not_found",
        )
        .await;
    }
    expect_err(
        &c,
        Method::GET,
        "/v1/sandboxes/nope/screen/view",
        None,
        vec![],
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let wrong = Client::connect(&d.socket, "nope").unwrap();
    expect_err(
        &wrong,
        Method::GET,
        "/v1/viewer/viewer.js",
        None,
        vec![],
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
}

#[tokio::test]
async fn openapi_document_parses_and_covers_the_routes() {
    let d = common::Daemon::start();
    let doc = d.client().openapi().await.expect("openapi");
    let paths = doc["paths"].as_object().expect("paths");
    for p in [
        "/v1/health",
        "/v1/sandboxes",
        "/v1/sandboxes/{name}",
        "/v1/sandboxes/{name}/exec",
        "/v1/sandboxes/{name}/files",
        "/v1/sandboxes/{name}/console",
        "/v1/events",
        "/v1/sandboxes/{name}/screen",
        "/v1/sandboxes/{name}/screen/screenshot",
        "/v1/sandboxes/{name}/screen/actions",
        "/v1/sandboxes/{name}/screen/vnc",
        "/v1/sandboxes/{name}/screen/view",
    ] {
        assert!(paths.contains_key(p), "{p} missing");
    }
    for schema in [
        "ScreenshotBody",
        "ScreenshotRequest",
        "ScreenActionsRequest",
        "ScreenInfo",
    ] {
        assert!(
            doc["components"]["schemas"][schema].is_object(),
            "{schema} schema missing"
        );
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    // Structural validation with a typed OpenAPI model. `openapiv3` models
    // 3.0; utoipa emits 3.1, whose only construct here that 3.0 lacks is
    // `type: [T, "null"]` (3.0: `type: T, nullable: true`).
    let mut v = doc.clone();
    v["openapi"] = "3.0.3".into();
    to_30(&mut v);
    let parsed: openapiv3::OpenAPI = serde_json::from_value(v).expect("typed OpenAPI parse");
    assert!(parsed.paths.paths.len() >= 10);
}

#[test]
fn refuses_a_second_daemon_and_an_open_token_file() {
    use std::os::unix::fs::PermissionsExt;
    let d = common::Daemon::start();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_capsad"))
        .arg("--state-dir")
        .arg(&d.dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already serving"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let tmp = tempfile::tempdir_in("/tmp").unwrap();
    let tok = tmp.path().join("capsad.token");
    std::fs::write(&tok, "abc\n").unwrap();
    std::fs::set_permissions(&tok, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_capsad"))
        .arg("--state-dir")
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_capsad"))
        .arg("--state-dir")
        .arg(tmp.path())
        .args(["--listen-tcp", "0.0.0.0:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

fn to_30(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            if let Some(serde_json::Value::Array(types)) = m.get("type").cloned() {
                let non_null: Vec<_> = types.iter().filter(|t| *t != "null").cloned().collect();
                if non_null.len() == 1 {
                    m.insert("type".into(), non_null[0].clone());
                    m.insert("nullable".into(), true.into());
                }
            }
            for x in m.values_mut() {
                to_30(x);
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(to_30),
        _ => {}
    }
}

/// Sends a huge body over a raw socket while reading the answer concurrently:
/// the server answers 413 before reading it all and closes, so the write
/// side may fail; what matters is the response.
fn raw_oversize(socket: &std::path::Path, token: &str, path: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    let mut w = s.try_clone().unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let body = body.to_vec();
    let t = std::thread::spawn(move || {
        let _ = w.write_all(head.as_bytes());
        let _ = w.write_all(&body);
    });
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let _ = s.shutdown(std::net::Shutdown::Both);
    let _ = t.join();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// Host paths from an API client are a policy: only regular files below
/// `--allow-disk-dir` (and capsad's own dirs), nothing through a symlink
/// leading out, no devices. Each refusal is a 403 naming the allow-list.
#[tokio::test]
async fn disks_outside_the_allow_list_are_refused() {
    let tmp = tempfile::Builder::new()
        .prefix("cd")
        .tempdir_in("/tmp")
        .unwrap();
    let allowed = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.txt");
    std::fs::write(&secret, b"top secret").unwrap();
    std::os::unix::fs::symlink(&secret, allowed.path().join("link.img")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", allowed.path().join("shadow.img")).unwrap();
    std::fs::write(allowed.path().join("empty.img"), b"").unwrap();
    let allow = allowed.path().display().to_string();
    let mut d = common::Daemon::start_on(tmp.path(), &["--allow-disk-dir", &allow]);
    d.set_tmp(tmp);
    let c = d.client();
    // Any block device of this host (the issue's /dev/vda) and a char device.
    let block = std::fs::read_dir("/sys/block")
        .ok()
        .and_then(|mut r| r.next())
        .and_then(|e| e.ok())
        .map(|e| format!("/dev/{}", e.file_name().to_string_lossy()))
        .filter(|p| std::path::Path::new(p).exists());
    let mut refused = vec![
        "/etc/shadow".to_string(),
        "/dev/null".to_string(),
        secret.display().to_string(),
        allowed.path().join("link.img").display().to_string(),
        allowed.path().join("shadow.img").display().to_string(),
        format!("{allow}/../{}", outside.path().display()),
        allow.clone(),
    ];
    refused.extend(block);
    for path in refused {
        let body = serde_json::json!({"name": "d1", "disks": [{"path": path, "read_only": true}]});
        let (st, b) = c
            .raw(
                Method::POST,
                "/v1/sandboxes",
                Some("application/json"),
                serde_json::to_vec(&body).unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(
            st,
            StatusCode::FORBIDDEN,
            "{path}: {}",
            String::from_utf8_lossy(&b)
        );
        let e: ErrorBody = serde_json::from_slice(&b).unwrap();
        assert_eq!(
            serde_json::to_value(e.error.code).unwrap(),
            "path_not_allowed"
        );
        let fix = e.error.fix.unwrap_or_default();
        assert!(
            fix.contains(&allow) && fix.contains("--allow-disk-dir"),
            "{path}: {fix}"
        );
    }
    // A regular file inside passes the policy and reaches spec validation
    // (it is empty, so that refuses it, with no VM started).
    let body = serde_json::json!({"name": "d2", "disks": [{"path": format!("{allow}/empty.img")}]});
    let (st, b) = c
        .raw(
            Method::POST,
            "/v1/sandboxes",
            Some("application/json"),
            serde_json::to_vec(&body).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        st,
        StatusCode::BAD_REQUEST,
        "{}",
        String::from_utf8_lossy(&b)
    );
    assert!(String::from_utf8_lossy(&b).contains("empty"));
    assert!(c.list().await.unwrap().is_empty(), "nothing was created");
}

/// With `--socket PATH` the token is written beside the socket, where
/// `capsa --host unix://PATH` looks for it; an open state dir is refused.
#[tokio::test]
async fn the_token_lives_beside_the_socket() {
    let state = tempfile::Builder::new()
        .prefix("cs")
        .tempdir_in("/tmp")
        .unwrap();
    let sockdir = tempfile::Builder::new()
        .prefix("ck")
        .tempdir_in("/tmp")
        .unwrap();
    let socket = sockdir.path().join("api.sock");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_capsad"))
        .arg("--state-dir")
        .arg(state.path())
        .arg("--socket")
        .arg(&socket)
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let token = sockdir.path().join("capsad.token");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(std::time::Instant::now() < deadline, "capsad did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(token.exists(), "no token beside the socket");
    assert!(!state.path().join("capsad.token").exists());
    let t = std::fs::read_to_string(&token).unwrap();
    let c = Client::connect(&socket, t.trim()).unwrap();
    assert_eq!(c.health().await.unwrap().status, "ok");
    let _ = child.kill();
    let _ = child.wait();

    // A state dir others can write is refused before anything is served.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_capsad"))
        .arg("--state-dir")
        .arg(state.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unsafe") && err.contains("fix"), "{err}");
}

/// Shares follow the same allow-list as disks, for directories: a missing
/// directory, a file, a directory outside (directly or through a symlink)
/// are 403s naming the allow-list; a bad guest path is a 400. Nothing starts.
#[tokio::test]
async fn shares_outside_the_allow_list_or_not_directories_are_refused() {
    let tmp = tempfile::Builder::new()
        .prefix("cd")
        .tempdir_in("/tmp")
        .unwrap();
    let allowed = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir(allowed.path().join("ok")).unwrap();
    std::fs::write(allowed.path().join("file.txt"), b"x").unwrap();
    std::os::unix::fs::symlink(outside.path(), allowed.path().join("out")).unwrap();
    let allow = allowed.path().display().to_string();
    let mut d = common::Daemon::start_on(tmp.path(), &["--allow-disk-dir", &allow]);
    d.set_tmp(tmp);
    let c = d.client();
    let post = |body: serde_json::Value| {
        let c = &c;
        async move {
            c.raw(
                Method::POST,
                "/v1/sandboxes",
                Some("application/json"),
                serde_json::to_vec(&body).unwrap(),
            )
            .await
            .unwrap()
        }
    };
    for (host, why) in [
        (format!("{allow}/missing"), "no such directory"),
        (format!("{allow}/file.txt"), "not a directory"),
        (outside.path().display().to_string(), "outside"),
        (format!("{allow}/out"), "outside"),
        (format!("{allow}/ok/../../"), "outside"),
        ("/etc".to_string(), "outside"),
        ("relative/dir".to_string(), "not an absolute path"),
    ] {
        let body = serde_json::json!({"name": "s1", "shares": [{"host": host, "guest": "/work"}]});
        let (st, b) = post(body).await;
        let text = String::from_utf8_lossy(&b);
        assert_eq!(st, StatusCode::FORBIDDEN, "{host}: {text}");
        let e: ErrorBody = serde_json::from_slice(&b).unwrap();
        assert_eq!(
            serde_json::to_value(e.error.code).unwrap(),
            "path_not_allowed"
        );
        assert!(e.error.message.contains(why), "{host}: {}", e.error.message);
        let fix = e.error.fix.unwrap_or_default();
        assert!(
            fix.contains(&allow) && fix.contains("--allow-disk-dir"),
            "{host}: {fix}"
        );
    }
    for guest in ["work", "/", "/a/../b", "/a//b"] {
        let body = serde_json::json!({"name": "s2", "shares": [{"host": format!("{allow}/ok"), "guest": guest}]});
        let (st, b) = post(body).await;
        assert_eq!(
            st,
            StatusCode::BAD_REQUEST,
            "{guest}: {}",
            String::from_utf8_lossy(&b)
        );
    }
    // Unknown fields are refused like everywhere else.
    let body = serde_json::json!({"name": "s3", "shares": [{"host": format!("{allow}/ok"), "guest": "/w", "uid": 0}]});
    let (st, _) = post(body).await;
    assert_ne!(st, StatusCode::CREATED);
    assert!(c.list().await.unwrap().is_empty(), "nothing was created");
}
