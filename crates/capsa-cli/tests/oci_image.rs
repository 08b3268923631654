//! `capsa image load` / `ls` / `rm` of OCI images, in a private cache directory.

use std::process::Command;

mod common;

use sha2::Digest as _;

fn hex(d: &[u8]) -> String {
    sha2::Sha256::digest(d)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A `docker save`-style archive with one layer holding /etc/hello.
fn docker_save(out: &std::path::Path) {
    let mut lb = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(6);
    h.set_mode(0o644);
    lb.append_data(&mut h, "etc/hello", &b"hello\n"[..])
        .unwrap();
    let layer = lb.into_inner().unwrap();
    let cfg = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", hex(&layer))]}
    }))
    .unwrap();
    let cfg_name = format!("{}.json", hex(&cfg));
    let manifest = serde_json::to_vec(&serde_json::json!([
        {"Config": cfg_name, "RepoTags": ["cli/test:1"], "Layers": ["l0/layer.tar"]}
    ]))
    .unwrap();
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    for (p, d) in [
        ("manifest.json", &manifest),
        (cfg_name.as_str(), &cfg),
        ("l0/layer.tar", &layer),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_size(d.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, p, &d[..]).unwrap();
    }
    b.finish().unwrap();
}

#[test]
fn image_load_ls_rm() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("save.tar");
    docker_save(&archive);
    let capsa = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_capsa"))
            .args(args)
            .env("XDG_CACHE_HOME", tmp.path().join("cache"))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = capsa(&["image", "load", archive.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        out.contains("cli/test:1") && out.contains(".erofs"),
        "{out}"
    );
    let img = out.split_whitespace().last().unwrap().to_string();
    assert!(std::path::Path::new(&img).is_file(), "{img}");

    let (ok, out, err) = capsa(&["image", "ls", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let images: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["kind"] == "image")
        .collect();
    assert_eq!(images.len(), 1, "{v}");
    assert_eq!(images[0]["names"][0], "cli/test:1");
    assert_eq!(images[0]["rootfs"][0], "erofs");
    let (_, table, _) = capsa(&["image", "ls"]);
    assert!(table.contains("cli/test:1"), "{table}");

    let (ok, _, err) = capsa(&["image", "load", "/nonexistent/image.tar"]);
    assert!(!ok && err.contains("/nonexistent/image.tar"), "{err}");
    let (ok, _, err) = capsa(&[
        "image",
        "load",
        "--convert",
        "zfs",
        archive.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("erofs, ext4"), "{err}");

    let (ok, _, err) = capsa(&["image", "rm", "cli/test:1"]);
    assert!(ok, "{err}");
    assert!(!std::path::Path::new(&img).exists());
    let (_, out, _) = capsa(&["image", "ls", "--json"]);
    assert!(!out.contains("cli/test"), "{out}");
}

/// The image verbs of the service through a real capsad: list, inspect by
/// name and by digest prefix, remove, and the errors of each.
#[test]
fn image_verbs_through_capsad() {
    let tmp = tempfile::Builder::new()
        .prefix("ci")
        .tempdir_in("/tmp")
        .unwrap();
    let cache = tmp.path().join("cache");
    // capsad and the loading CLI share the image store.
    // SAFETY: nextest runs each test in its own process; nothing else reads the environment now.
    unsafe { std::env::set_var("XDG_CACHE_HOME", &cache) };
    let archive = tmp.path().join("save.tar");
    docker_save(&archive);
    let out = Command::new(env!("CARGO_BIN_EXE_capsa"))
        .args(["image", "load", archive.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let state = tmp.path().join("st");
    std::fs::create_dir(&state).unwrap();
    let mut daemon = common::spawn_capsad(&state, &tmp.path().join("snaps"), &[]);
    let token = std::fs::read_to_string(state.join("capsad.token")).unwrap();
    let c = capsa_client::Client::connect(state.join("capsad.sock"), token.trim()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let list = c.images().await.unwrap();
        assert_eq!(list.len(), 1, "{list:?}");
        let img = &list[0];
        assert_eq!(img.names, vec!["cli/test:1".to_string()]);
        assert_eq!(img.cmd, vec!["/bin/sh".to_string()]);
        assert_eq!(img.layers, 1);
        assert!(img.digest.starts_with("sha256:") && img.digest.contains(&img.id));

        let by_name = c.image("cli/test:1").await.unwrap();
        assert_eq!(by_name.digest, img.digest);
        let by_prefix = c.image(&img.id[..8]).await.unwrap();
        assert_eq!(by_prefix.digest, img.digest);

        let missing = c.image("no/such:1").await.unwrap_err().to_string();
        assert!(
            missing.contains("no/such:1") && missing.contains("404"),
            "{missing}"
        );
        let bad = c.image("has space").await.unwrap_err().to_string();
        assert!(bad.contains("400"), "{bad}");

        let gone = c.delete_image("cli/test:1").await.unwrap();
        assert_eq!(gone.digest, img.digest);
        assert!(c.images().await.unwrap().is_empty());
        let again = c.delete_image("cli/test:1").await.unwrap_err().to_string();
        assert!(again.contains("404"), "{again}");
    });
    common::stop_child(&mut daemon);
}
