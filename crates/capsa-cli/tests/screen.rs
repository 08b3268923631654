//! `capsa create --display`, `capsa screen info|shot|do` through the `capsa`
//! binary, straight to the monitors and through capsad.

mod common;

use common::Daemon;

#[test]
fn screen_commands_directly_and_through_capsad() {
    common::ensure_binaries();
    let d = Daemon::start("cscr", &[]);
    let bad = d.run_on(false, &["create", "--name", "x", "--display", "100x100"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("1280x800"), "{err}");
    d.ok_on(
        false,
        &[
            "create",
            "--name",
            "d",
            "--memory",
            "256M",
            "--display",
            "640x480",
        ],
    );
    d.ok_on(false, &["create", "--name", "h", "--memory", "256M"]);
    for host in [false, true] {
        assert_eq!(d.ok_on(host, &["screen", "info", "d"]).trim(), "640x480");
        let png = d.dir.path().join(format!("shot-{host}.png"));
        let p = png.to_str().unwrap();
        d.ok_on(
            host,
            &[
                "screen",
                "shot",
                "d",
                p,
                "--region",
                "0,0,320,240",
                "--max-width",
                "160",
            ],
        );
        let data = std::fs::read(&png).unwrap();
        assert!(data.starts_with(b"\x89PNG"));
        // IHDR width and height.
        assert_eq!(&data[16..24], &[0, 0, 0, 160, 0, 0, 0, 120]);
        let after = d.dir.path().join(format!("after-{host}.png"));
        d.ok_on(
            host,
            &[
                "screen",
                "do",
                "d",
                "click:10,20",
                "type:Hi there!",
                "key:ctrl+c",
                "scroll:down,3",
                "--settle",
                "50",
                "--shot",
                after.to_str().unwrap(),
            ],
        );
        assert!(std::fs::read(&after).unwrap().starts_with(b"\x89PNG"));
        // The format follows the extension, or --format.
        let jpg = d.dir.path().join(format!("shot-{host}.jpg"));
        d.ok_on(host, &["screen", "shot", "d", jpg.to_str().unwrap()]);
        assert!(std::fs::read(&jpg)
            .unwrap()
            .starts_with(&[0xff, 0xd8, 0xff]));
        let webp = d.dir.path().join(format!("shot-{host}.img"));
        let w = webp.to_str().unwrap();
        d.ok_on(host, &["screen", "shot", "d", w, "--format", "webp"]);
        let data = std::fs::read(&webp).unwrap();
        assert_eq!((&data[..4], &data[8..12]), (&b"RIFF"[..], &b"WEBP"[..]));
        for (args, want) in [
            (vec!["screen", "do", "d", "type:é"], "é"),
            (vec!["screen", "do", "d", "key:ctrl+nokey"], "nokey"),
            (vec!["screen", "do", "d", "click:640,0"], "outside"),
            (vec!["screen", "info", "h"], "--display"),
            (vec!["screen", "view", "h"], "--display"),
            (vec!["screen", "view", "nope"], "nope"),
            (
                vec!["screen", "shot", "d", "x.png", "--quality", "50"],
                "lossless",
            ),
            (
                vec!["screen", "shot", "d", "x.gif", "--format", "gif"],
                "png, jpeg or webp",
            ),
        ] {
            let o = d.run_on(host, &args);
            assert!(!o.status.success(), "{args:?}");
            let e = String::from_utf8_lossy(&o.stderr);
            assert!(e.contains(want), "{args:?} (through capsad: {host}): {e}");
        }
    }
}
