//! Loading generated OCI layouts, OCI archives and docker-save archives into the store, and
//! converting them to filesystem images.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use capsa_oci::{FsFormat, Limits, OciError, Store};
use common::{gzip, layer, sha256_hex, E};
use serde_json::json;

struct Layout {
    manifest_digest: String,
    layer_hexes: Vec<String>,
}

fn put_blob(dir: &Path, data: &[u8]) -> (String, u64) {
    let hex = sha256_hex(data);
    std::fs::write(dir.join("blobs/sha256").join(&hex), data).unwrap();
    (format!("sha256:{hex}"), data.len() as u64)
}

fn config_json(diff_ids: &[String], arch: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": arch, "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"], "Cmd": ["/bin/sh"], "WorkingDir": "/srv", "User": "1000:1000"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    }))
    .unwrap()
}

fn layers() -> Vec<Vec<u8>> {
    vec![
        layer(&[
            E::Dir("etc/", 0o755),
            E::File("etc/os-release", 0o644, b"ID=capsa-test\n"),
            E::Owned("home/user/.profile", 0o600, 1000, 1000, b"export A=1\n"),
            E::File("gone", 0o644, b"x"),
            E::Symlink("bin", "usr/bin"),
            E::File("usr/bin/hello", 0o755, b"#!/bin/sh\necho hello\n"),
            E::PaxFile(
                "usr/bin/ping",
                vec![("SCHILY.xattr.user.note", b"cap")],
                b"ping",
            ),
        ]),
        layer(&[
            E::File(".wh.gone", 0o644, b""),
            E::File("etc/motd", 0o644, b"layer two\n"),
        ]),
        many_files_layer(),
    ]
}

/// Enough files for several ext4 block groups' worth of metadata to be touched.
fn many_files_layer() -> Vec<u8> {
    let names: Vec<(String, Vec<u8>)> = (0..400)
        .map(|i| {
            (
                format!("usr/share/gen/d{}/f{i}", i % 40),
                vec![b'a' + (i % 26) as u8; 100 + i * 37],
            )
        })
        .collect();
    let entries: Vec<E> = names.iter().map(|(n, d)| E::File(n, 0o644, d)).collect();
    layer(&entries)
}

/// An OCI layout with a multi-platform index (arm64 first, then amd64), gzip layers.
fn make_layout(dir: &Path) -> Layout {
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let ls = layers();
    let diff_ids: Vec<String> = ls
        .iter()
        .map(|l| format!("sha256:{}", sha256_hex(l)))
        .collect();
    let mut layer_descs = Vec::new();
    let mut layer_hexes = Vec::new();
    for l in &ls {
        let (d, s) = put_blob(dir, &gzip(l));
        layer_hexes.push(d[7..].to_string());
        layer_descs.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s}));
    }
    let mut manifests = Vec::new();
    let mut amd64_digest = String::new();
    for arch in ["arm64", "amd64"] {
        let (cd, cs) = put_blob(dir, &config_json(&diff_ids, arch));
        let m = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
            "layers": layer_descs,
        }))
        .unwrap();
        let (md, ms) = put_blob(dir, &m);
        if arch == "amd64" {
            amd64_digest = md.clone();
        }
        manifests.push(json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
                              "platform": {"architecture": arch, "os": "linux"}}));
    }
    let nested = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests})).unwrap();
    let (nd, ns) = put_blob(dir, &nested);
    let index = json!({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": nd, "size": ns,
         "annotations": {"org.opencontainers.image.ref.name": "test/app:1"}}
    ]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    Layout {
        manifest_digest: amd64_digest,
        layer_hexes,
    }
}

/// Tars a directory (as `tar -C dir -cf out .` would).
fn tar_dir(dir: &Path, out: &Path) {
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    b.append_dir_all(".", dir).unwrap();
    b.finish().unwrap();
}

/// A legacy `docker save` archive: manifest.json, <config-hex>.json, <id>/layer.tar.
fn make_docker_save(out: &Path) {
    let ls = layers();
    let diff_ids: Vec<String> = ls
        .iter()
        .map(|l| format!("sha256:{}", sha256_hex(l)))
        .collect();
    let cfg = config_json(&diff_ids, "amd64");
    let cfg_name = format!("{}.json", sha256_hex(&cfg));
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut layer_paths = Vec::new();
    for (i, l) in ls.iter().enumerate() {
        let p = format!("layer{i}id/layer.tar");
        files.insert(p.clone(), l.clone());
        files.insert(format!("layer{i}id/VERSION"), b"1.0".to_vec());
        layer_paths.push(p);
    }
    files.insert(cfg_name.clone(), cfg);
    files.insert(
        "manifest.json".into(),
        serde_json::to_vec(&json!([{"Config": cfg_name, "RepoTags": ["docker/app:latest"], "Layers": layer_paths}])).unwrap(),
    );
    files.insert("repositories".into(), b"{}".to_vec());
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    for (p, d) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(d.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, &p, &d[..]).unwrap();
    }
    b.finish().unwrap();
}

fn read_tree_file(store: &Store, what: &str, path: &str) -> String {
    let rec = store.find(what).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    store.stage(&rec, tmp.path(), Limits::default()).unwrap();
    assert!(!tmp.path().join("gone").exists(), "whiteout applied");
    std::fs::read_to_string(tmp.path().join(path)).unwrap()
}

#[test]
fn load_oci_layout_picks_amd64_and_records_config() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = make_layout(&tmp.path().join("layout"));
    let store = Store::open(tmp.path().join("store")).unwrap();
    let recs = store.load(&tmp.path().join("layout")).unwrap();
    assert_eq!(recs.len(), 1);
    let rec = &recs[0];
    assert_eq!(
        rec.digest.as_str(),
        layout.manifest_digest,
        "the amd64 manifest, not arm64"
    );
    assert_eq!(rec.names, ["test/app:1"]);
    assert_eq!(
        rec.config.cmd.as_deref(),
        Some(&["/bin/sh".to_string()][..])
    );
    assert_eq!(rec.config.working_dir.as_deref(), Some("/srv"));
    assert_eq!(rec.config.user.as_deref(), Some("1000:1000"));
    for h in &layout.layer_hexes {
        assert!(store.root().join("blobs/sha256").join(h).is_file());
    }
    assert_eq!(store.list().unwrap().len(), 1);
    assert_eq!(store.find("test/app:1").unwrap().digest, rec.digest);
    assert_eq!(
        store.find(&rec.digest.hex()[..8]).unwrap().digest,
        rec.digest
    );
    assert!(matches!(store.find("nope"), Err(OciError::UnknownImage(_))));
    assert_eq!(
        read_tree_file(&store, "test/app:1", "etc/motd"),
        "layer two\n"
    );
    assert_eq!(
        read_tree_file(&store, "test/app:1", "bin/hello"),
        "#!/bin/sh\necho hello\n"
    );

    // The same image as an OCI archive (a tar of the layout) has the same identity.
    let archive = tmp.path().join("app.oci.tar");
    tar_dir(&tmp.path().join("layout"), &archive);
    let store2 = Store::open(tmp.path().join("store2")).unwrap();
    let recs2 = store2.load(&archive).unwrap();
    assert_eq!(recs2[0].digest, rec.digest);
    // Nothing left behind in the store's tmp.
    assert_eq!(
        std::fs::read_dir(store2.root().join("tmp"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn load_docker_save_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("save.tar");
    make_docker_save(&archive);
    let store = Store::open(tmp.path().join("store")).unwrap();
    let recs = store.load(&archive).unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].names, ["docker/app:latest"]);
    assert_eq!(recs[0].layers.len(), 3);
    assert_eq!(
        recs[0].layers[0].media_type,
        "application/vnd.oci.image.layer.v1.tar"
    );
    assert_eq!(
        read_tree_file(&store, "docker/app", "etc/os-release"),
        "ID=capsa-test\n"
    );
    // Loading again is idempotent.
    assert_eq!(store.load(&archive).unwrap()[0].digest, recs[0].digest);
    assert_eq!(store.list().unwrap().len(), 1);
    store.remove("docker/app").unwrap();
    assert!(store.list().unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(store.root().join("blobs/sha256"))
            .unwrap()
            .count(),
        0,
        "blobs removed with the image"
    );
}

#[test]
fn a_blob_with_a_wrong_digest_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let layout_dir = tmp.path().join("layout");
    let layout = make_layout(&layout_dir);
    // Tamper with the top layer (same size, different content).
    let p = layout_dir.join("blobs/sha256").join(&layout.layer_hexes[1]);
    let mut data = std::fs::read(&p).unwrap();
    let last = data.len() - 1;
    data[last] ^= 0xff;
    std::fs::write(&p, &data).unwrap();
    let store = Store::open(tmp.path().join("store")).unwrap();
    let err = store.load(&layout_dir).unwrap_err();
    assert!(matches!(err, OciError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&layout.layer_hexes[1]), "{err}");
    assert!(
        store.list().unwrap().is_empty(),
        "no record for a refused image"
    );
    assert!(!store
        .root()
        .join("blobs/sha256")
        .join(&layout.layer_hexes[1])
        .exists());

    // docker save: a layer that does not match the config's diff_id.
    let archive = tmp.path().join("save.tar");
    make_docker_save(&archive);
    let tampered = tmp.path().join("tampered.tar");
    let mut ar = tar::Archive::new(std::fs::File::open(&archive).unwrap());
    let mut b = tar::Builder::new(std::fs::File::create(&tampered).unwrap());
    for ent in ar.entries().unwrap() {
        let mut ent = ent.unwrap();
        let path = ent.path().unwrap().into_owned();
        let mut d = Vec::new();
        std::io::Read::read_to_end(&mut ent, &mut d).unwrap();
        if path.ends_with("layer1id/layer.tar") {
            d[600] ^= 1;
        }
        let mut h = ent.header().clone();
        b.append_data(&mut h, &path, &d[..]).unwrap();
    }
    b.finish().unwrap();
    drop(b);
    let err = store.load(&tampered).unwrap_err();
    assert!(matches!(err, OciError::DigestMismatch { .. }), "{err}");

    // A store blob corrupted after load is caught when staging.
    let recs = store.load(&archive).unwrap();
    let l0 = store.blob_path(&recs[0].layers[1].digest);
    let mut d = std::fs::read(&l0).unwrap();
    d[700] ^= 1;
    std::fs::write(&l0, d).unwrap();
    let stage = tempfile::tempdir().unwrap();
    let err = store
        .stage(&recs[0], stage.path(), Limits::default())
        .unwrap_err();
    assert!(matches!(err, OciError::DigestMismatch { .. }), "{err}");
}

#[test]
fn not_an_image_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path().join("store")).unwrap();
    let err = store.load(tmp.path()).unwrap_err();
    assert!(err.to_string().contains("docker save"), "{err}");
    let junk = tmp.path().join("junk.tar");
    std::fs::write(&junk, vec![7u8; 2048]).unwrap();
    assert!(store.load(&junk).is_err());
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn rootfs_images_are_reproducible_and_readable() {
    let tmp = tempfile::tempdir().unwrap();
    make_layout(&tmp.path().join("layout"));
    let store = Store::open(tmp.path().join("store")).unwrap();
    let rec = store.load(&tmp.path().join("layout")).unwrap().remove(0);
    for format in [FsFormat::Erofs, FsFormat::Ext4] {
        let first = store.rootfs(&rec, format, Limits::default()).unwrap();
        assert!(first.report.is_some(), "converted");
        let a = std::fs::read(&first.image.path).unwrap();
        let cached = store.rootfs(&rec, format, Limits::default()).unwrap();
        assert!(cached.report.is_none(), "second call hits the cache");
        std::fs::remove_file(&first.image.path).unwrap();
        // A later second: clock-derived fields (ctime, superblock write time) would differ.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let again = store.rootfs(&rec, format, Limits::default()).unwrap();
        let b = std::fs::read(&again.image.path).unwrap();
        assert!(
            a == b,
            "{format:?} image differs between two conversions of the same image"
        );
        let img = again.image.path.clone();
        match format {
            FsFormat::Ext4 => {
                run(Command::new("/usr/sbin/e2fsck").args(["-fn"]).arg(&img));
                let ls = run(Command::new("/usr/sbin/debugfs")
                    .arg("-R")
                    .arg("ls -l /")
                    .arg(&img));
                for name in ["etc", "home", "usr", "bin"] {
                    assert!(ls.contains(name), "{ls}");
                }
                assert!(!ls.contains("gone"), "{ls}");
                let cat = run(Command::new("/usr/sbin/debugfs")
                    .arg("-R")
                    .arg("cat /etc/motd")
                    .arg(&img));
                assert!(cat.contains("layer two"), "{cat}");
                let st = run(Command::new("/usr/sbin/debugfs")
                    .arg("-R")
                    .arg("stat /home/user/.profile")
                    .arg(&img));
                if common::is_root() {
                    assert!(st.contains("User:  1000   Group:  1000"), "{st}");
                }
                let ea = run(Command::new("/usr/sbin/debugfs")
                    .arg("-R")
                    .arg("ea_list /usr/bin/ping")
                    .arg(&img));
                assert!(ea.contains("user.note") && ea.contains("cap"), "{ea}");
            }
            _ => {
                run(Command::new("fsck.erofs").arg(&img));
                let out = tmp.path().join(format!("extract-{}", format.ext()));
                run(Command::new("fsck.erofs")
                    .arg(format!("--extract={}", out.display()))
                    .arg(&img));
                assert_eq!(
                    std::fs::read_to_string(out.join("etc/motd")).unwrap(),
                    "layer two\n"
                );
                assert_eq!(
                    std::fs::read_link(out.join("bin")).unwrap(),
                    Path::new("usr/bin")
                );
                assert!(!out.join("gone").exists());
                let st = run(Command::new("dump.erofs")
                    .arg("--path=/home/user/.profile")
                    .arg(&img));
                if common::is_root() {
                    assert!(st.contains("1000"), "{st}");
                }
            }
        }
    }
    assert_eq!(
        std::fs::read_dir(store.root().join("tmp")).unwrap().count(),
        0,
        "staging removed"
    );
}

#[test]
fn blob_writer_refuses_overlong_and_wrong_content_and_keeps_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path().join("store")).unwrap();
    let data = b"registry blob";
    let desc = capsa_oci::spec::Descriptor {
        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        digest: capsa_oci::Digest::of(data),
        size: data.len() as u64,
        platform: None,
        annotations: BTreeMap::new(),
    };
    let tmp_count = || std::fs::read_dir(store.root().join("tmp")).unwrap().count();

    // Longer than promised: refused at the write that crosses the size.
    let mut w = store.blob_writer(&desc).unwrap();
    w.write(&data[..5]).unwrap();
    let e = w.write(b"0123456789abcdef").unwrap_err();
    assert!(matches!(e, OciError::DigestMismatch { .. }), "{e}");
    drop(w);
    // Same size, other bytes: refused at commit.
    let mut w = store.blob_writer(&desc).unwrap();
    w.write(b"registry blub").unwrap();
    let e = w.commit().unwrap_err();
    assert!(e.to_string().contains("tampered"), "{e}");
    // Short: refused too.
    let mut w = store.blob_writer(&desc).unwrap();
    w.write(b"registry").unwrap();
    assert!(w.commit().is_err());
    assert!(!store.has_blob(&desc.digest));
    assert_eq!(tmp_count(), 0, "a refused blob left a temp file");

    let mut w = store.blob_writer(&desc).unwrap();
    w.write(&data[..4]).unwrap();
    w.write(&data[4..]).unwrap();
    let (d, n) = w.commit().unwrap();
    assert_eq!((d, n), (desc.digest.clone(), data.len() as u64));
    assert_eq!(std::fs::read(store.blob_path(&desc.digest)).unwrap(), data);
    assert_eq!(tmp_count(), 0);
}
