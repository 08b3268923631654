//! The screen endpoints over capsad's real socket, on a real VM: the guest
//! fills its framebuffer and the screenshot (full, cropped, scaled) shows
//! it; a batch of actions reaches the guest's evdev devices and returns a
//! screenshot; headless sandboxes and bad actions are refused with the fix.

mod common;

use std::time::{Duration, Instant};

use capsa_client::{Client, ClientError};
use capsad::api::{
    CreatePoolRequest, CreateSandboxRequest, ExecRequest, ScreenActionsRequest, ScreenInfo,
    ScreenRegion, ScreenshotFormat, ScreenshotRequest,
};

async fn sh(c: &Client, name: &str, script: &str) -> String {
    let req = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    };
    let out = c.exec_output(name, &req).await.expect("exec");
    assert_eq!(
        out.code,
        Some(0),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn decode(png: &[u8]) -> (u32, u32, Vec<u8>) {
    let mut r = png::Decoder::new(std::io::Cursor::new(png))
        .read_info()
        .unwrap();
    let mut buf = vec![0; r.output_buffer_size().unwrap()];
    let info = r.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

fn status(e: ClientError) -> (u16, String) {
    match e {
        ClientError::Api { status, detail } => (
            status.as_u16(),
            format!("{} {}", detail.message, detail.fix.unwrap_or_default()),
        ),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn screenshots_and_actions_over_the_api() {
    let d = common::Daemon::start();
    let c = d.client();
    let req = CreateSandboxRequest {
        name: Some("scr".into()),
        memory_mib: Some(256),
        display: Some(ScreenInfo {
            width: 800,
            height: 600,
        }),
        start: true,
        ..Default::default()
    };
    c.create(&req).await.expect("create with a display");
    assert_eq!(
        c.screen_info("scr").await.unwrap(),
        ScreenInfo {
            width: 800,
            height: 600
        }
    );
    // Left half white, right half black (XRGB8888 rows of 800 pixels).
    sh(
        &c,
        "scr",
        "for v in /sys/class/vtconsole/vtcon*; do grep -q 'frame buffer' $v/name && echo 0 > $v/bind; done; \
         test $(cat /sys/class/graphics/fb0/stride) = 3200; \
         head -c 1600 /dev/zero | tr '\\0' '\\377' > /tmp/w; head -c 1600 /dev/zero > /tmp/b; \
         cat /tmp/w /tmp/b > /tmp/row; i=0; : > /tmp/fb; \
         while [ $i -lt 600 ]; do cat /tmp/row; i=$((i+1)); done > /tmp/fb; cat /tmp/fb > /dev/fb0",
    )
    .await;
    let shot = c
        .screenshot("scr", &ScreenshotRequest::default())
        .await
        .unwrap();
    assert_eq!((shot.width, shot.height, shot.scale), (800, 600, 1.0));
    let (w, h, px) = decode(&shot.bytes().unwrap());
    assert_eq!((w, h), (800, 600));
    for y in [0usize, 299, 599] {
        for x in [0usize, 399, 400, 799] {
            let want = if x < 400 { 255 } else { 0 };
            assert_eq!(&px[(y * 800 + x) * 3..][..3], &[want; 3], "{x},{y}");
        }
    }
    let crop = c
        .screenshot(
            "scr",
            &ScreenshotRequest {
                region: Some(ScreenRegion {
                    x: 390,
                    y: 10,
                    width: 20,
                    height: 10,
                }),
                max_width: Some(10),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (crop.width, crop.height, crop.x, crop.y, crop.scale),
        (10, 5, 390, 10, 0.5)
    );
    let (_, _, cpx) = decode(&crop.bytes().unwrap());
    assert_eq!(&cpx[..3], &[255; 3]);
    assert_eq!(&cpx[9 * 3..][..3], &[0; 3]);

    // Actions reach the guest's input devices, then a screenshot comes back.
    sh(
        &c,
        "scr",
        "(/init input-events 100 60000 > /tmp/ev 2>&1 &); true",
    )
    .await;
    let t = Instant::now();
    while !sh(&c, "scr", "cat /tmp/ev 2>/dev/null; true")
        .await
        .starts_with("ready")
    {
        assert!(t.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = c
        .screen_actions(
            "scr",
            &ScreenActionsRequest {
                actions: vec!["click:100,200".parse().unwrap(), "type:Hi".parse().unwrap()],
                screenshot_after_ms: Some(50),
                screenshot: Some(ScreenshotRequest {
                    max_width: Some(400),
                    format: Some(ScreenshotFormat::Webp),
                    ..Default::default()
                }),
            },
        )
        .await;
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            let dir = d.dir.join("sandboxes/scr");
            for f in ["monitor.log", "console.log"] {
                eprintln!(
                    "--- {f}\n{}",
                    std::fs::read_to_string(dir.join(f)).unwrap_or_default()
                );
            }
            panic!("{e:?}");
        }
    };
    assert_eq!(r.performed, 2);
    let s = r.screenshot.expect("screenshot after the actions");
    assert_eq!((s.width, s.height), (400, 300));
    assert_eq!(s.format, ScreenshotFormat::Webp);
    assert_eq!(&s.bytes().unwrap()[8..12], b"WEBP");
    let t = Instant::now();
    let ev = loop {
        let ev = sh(&c, "scr", "cat /tmp/ev").await;
        if ev.lines().filter(|l| l.starts_with("EV 1 ")).count() >= 8
            || t.elapsed() > Duration::from_secs(30)
        {
            break ev;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let keys: Vec<&str> = ev.lines().filter(|l| l.starts_with("EV 1 ")).collect();
    // The tablet and the keyboard are two devices: the reader sees each in
    // order, but not one against the other. BTN_LEFT down/up on the tablet;
    // shift, h, i (Linux codes 42, 35, 23) on the keyboard.
    let (button, keys): (Vec<&str>, Vec<&str>) =
        keys.into_iter().partition(|l| l.starts_with("EV 1 272 "));
    assert_eq!(button, ["EV 1 272 1", "EV 1 272 0"], "{ev}");
    assert_eq!(
        keys,
        [
            "EV 1 42 1",
            "EV 1 35 1",
            "EV 1 35 0",
            "EV 1 42 0",
            "EV 1 23 1",
            "EV 1 23 0"
        ],
        "{ev}"
    );
    assert!(
        ev.contains(&format!("EV 3 0 {}", (2 * 100 + 1) * 32768 / 1600)),
        "{ev}"
    );

    // A VNC viewer over the WebSocket: QEMU's RFB server, the display's size.
    let (mut input, mut output) = c.screen_vnc("scr", false).await.expect("VNC WebSocket");
    let mut buf: Vec<u8> = Vec::new();
    async fn need(
        buf: &mut Vec<u8>,
        out: &mut capsa_client::BoxStream<bytes::Bytes>,
        n: usize,
    ) -> Vec<u8> {
        use futures::StreamExt;
        while buf.len() < n {
            let b = tokio::time::timeout(Duration::from_secs(20), out.next())
                .await
                .expect("RFB bytes in time")
                .expect("stream open")
                .expect("no error");
            buf.extend_from_slice(&b);
        }
        buf.drain(..n).collect()
    }
    assert_eq!(need(&mut buf, &mut output, 12).await, b"RFB 003.008\n");
    input.send(b"RFB 003.008\n").await.unwrap();
    let n = need(&mut buf, &mut output, 1).await[0] as usize;
    assert!(need(&mut buf, &mut output, n).await.contains(&1));
    input.send(&[1]).await.unwrap();
    assert_eq!(need(&mut buf, &mut output, 4).await, [0, 0, 0, 0]);
    input.send(&[1]).await.unwrap();
    let init = need(&mut buf, &mut output, 4).await;
    assert_eq!(
        (
            u16::from_be_bytes([init[0], init[1]]),
            u16::from_be_bytes([init[2], init[3]])
        ),
        (800, 600)
    );
    // View-only is enforced by the daemon: input is dropped (the view goes
    // on), and an RFB message it does not know ends the session.
    let name_len = u32::from_be_bytes(
        need(&mut buf, &mut output, 20).await[16..20]
            .try_into()
            .unwrap(),
    );
    need(&mut buf, &mut output, name_len as usize).await;
    input.send(&[5, 1, 0, 10, 0, 20]).await.unwrap();
    input.send(&[3, 0, 0, 0, 0, 0, 0, 16, 0, 16]).await.unwrap();
    let update = need(&mut buf, &mut output, 1).await;
    assert_eq!(
        update,
        [0],
        "a FramebufferUpdate after the pointer event was dropped"
    );
    input.send(&[7]).await.unwrap();
    let t = Instant::now();
    loop {
        use futures::StreamExt;
        match tokio::time::timeout(Duration::from_secs(20), output.next()).await {
            Ok(None) | Ok(Some(Err(_))) => break,
            Ok(Some(Ok(_))) => assert!(
                t.elapsed() < Duration::from_secs(20),
                "the session stayed open"
            ),
            Err(_) => panic!("the session stayed open after an unknown RFB message"),
        }
    }
    input.close().await;

    // The viewer page, behind the token like every route.
    let (st, html) = c
        .raw(
            hyper::Method::GET,
            "/v1/sandboxes/scr/screen/view?input=true",
            None,
            vec![],
        )
        .await
        .unwrap();
    let html = String::from_utf8_lossy(&html);
    assert_eq!(st.as_u16(), 200, "{html}");
    assert!(
        html.contains(r#"data-ws="/v1/sandboxes/scr/screen/vnc?input=true""#)
            && html.contains(r#"data-view-only="false""#),
        "{html}"
    );

    // Bad input is refused before anything is sent, naming the fix.
    let bad = c
        .screen_actions(
            "scr",
            &ScreenActionsRequest {
                actions: vec!["type:Grüße".parse().unwrap()],
                screenshot_after_ms: None,
                screenshot: None,
            },
        )
        .await
        .unwrap_err();
    let (code, msg) = status(bad);
    assert_eq!(code, 400, "{msg}");
    assert!(msg.contains("üß") && msg.contains("Fix"), "{msg}");
    let (code, msg) = status(
        c.screenshot(
            "scr",
            &ScreenshotRequest {
                region: Some(ScreenRegion {
                    x: 700,
                    y: 0,
                    width: 200,
                    height: 10,
                }),
                max_width: None,
                ..Default::default()
            },
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(code, 400, "{msg}");
    // A quality means nothing for a lossless format: refused, with the fix.
    let (code, msg) = status(
        c.screenshot(
            "scr",
            &ScreenshotRequest {
                quality: Some(50),
                ..Default::default()
            },
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(code, 400, "{msg}");
    assert!(msg.contains("lossless") && msg.contains("Fix"), "{msg}");
    let jpeg = c
        .screenshot(
            "scr",
            &ScreenshotRequest {
                format: Some(ScreenshotFormat::Jpeg),
                quality: Some(70),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(jpeg.format, ScreenshotFormat::Jpeg);
    assert!(jpeg.bytes().unwrap().starts_with(&[0xff, 0xd8, 0xff]));

    // A pool restored from a snapshot of this sandbox: its members have the
    // screen, framebuffer included.
    c.snapshot("scr", "scr-snap").await.expect("snapshot");
    c.create_pool(&CreatePoolRequest {
        name: "sp".into(),
        size: 1,
        snapshot: Some("scr-snap".into()),
        ..Default::default()
    })
    .await
    .expect("pool from the snapshot");
    let deadline = Instant::now() + Duration::from_secs(300);
    while c.pool("sp").await.unwrap().ready < 1 {
        assert!(Instant::now() < deadline, "the pool never filled");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let member = c.acquire("sp", None).await.expect("acquire");
    let shot = c
        .screenshot(&member.name, &ScreenshotRequest::default())
        .await
        .expect("a pooled sandbox's screenshot");
    let (w, h, px) = decode(&shot.bytes().unwrap());
    assert_eq!((w, h), (800, 600));
    assert_eq!(&px[..3], &[255; 3], "the snapshot's framebuffer");
    assert_eq!(&px[(799 * 3)..][..3], &[0; 3]);
    c.screen_actions(
        &member.name,
        &ScreenActionsRequest {
            actions: vec!["click:1,1".parse().unwrap()],
            screenshot_after_ms: None,
            screenshot: None,
        },
    )
    .await
    .expect("input on a pooled sandbox");
    c.delete(&member.name, true).await.unwrap();

    // A headless sandbox says how to get a display.
    let headless = CreateSandboxRequest {
        name: Some("nodisp".into()),
        memory_mib: Some(256),
        start: false,
        ..Default::default()
    };
    c.create(&headless).await.unwrap();
    let (code, msg) = status(c.screen_info("nodisp").await.unwrap_err());
    assert_eq!(code, 409, "{msg}");
    assert!(msg.contains("--display"), "{msg}");
    // A display out of bounds is refused at create.
    let mut huge = req.clone();
    huge.name = Some("huge".into());
    huge.display = Some(ScreenInfo {
        width: 10000,
        height: 600,
    });
    let (code, msg) = status(c.create(&huge).await.unwrap_err());
    assert_eq!(code, 400, "{msg}");
    assert!(msg.contains("1280x800"), "{msg}");
}
