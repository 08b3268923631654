//! `capsa image load` / `ls` / `rm` of OCI images, in a private cache directory.

use std::process::Command;

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
