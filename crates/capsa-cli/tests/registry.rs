//! `capsa image pull` against a real registry on loopback: Debian's `docker-registry` (the CNCF
//! distribution server) started per test on a free port, images pushed with `skopeo`. Also
//! `image inspect` and `image prune`. Everything in temp directories; nothing leaves 127.0.0.1.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::Digest as _;

fn hex(d: &[u8]) -> String {
    sha2::Sha256::digest(d)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn need(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is missing; fix: run scripts/setup.sh (apt-get install docker-registry skopeo apache2-utils erofs-utils)"
    );
}

/// A registry on 127.0.0.1, killed on drop.
struct Registry {
    child: Child,
    port: u16,
    storage: PathBuf,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start(htpasswd: Option<(&str, &str)>) -> Registry {
        need("docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("storage");
        std::fs::create_dir(&storage).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        );
        if let Some((user, pass)) = htpasswd {
            need("htpasswd");
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, pass])
                .output()
                .unwrap();
            assert!(out.status.success());
            let f = dir.path().join("htpasswd");
            std::fs::write(&f, out.stdout).unwrap();
            cfg.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: capsa-test\n    path: {}\n",
                f.display()
            ));
        }
        let cfg_path = dir.path().join("config.yml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("registry.log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "registry did not listen: {}",
                std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry {
            child,
            port,
            storage,
            _dir: dir,
        }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Pushes an OCI layout with skopeo (all platforms of its index).
    fn push(&self, layout: &Path, name: &str, creds: Option<&str>) {
        need("skopeo");
        let mut c = Command::new("skopeo");
        c.args(["--insecure-policy", "copy", "--all", "--quiet"])
            .args(["--dest-tls-verify=false"]);
        if let Some(c2) = creds {
            c.args(["--dest-creds", c2]);
        }
        let out = c
            .arg(format!("oci:{}", layout.display()))
            .arg(format!("docker://{}/{name}", self.host()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Where the registry keeps a blob's bytes.
    fn blob_data(&self, hex: &str) -> PathBuf {
        self.storage.join(format!(
            "docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (p, d) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(d.len() as u64);
        h.set_mode(if p.starts_with("bin/") { 0o755 } else { 0o644 });
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, p, *d).unwrap();
    }
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    b.append_link(&mut h, "etc/link", "/etc/hello").unwrap();
    b.into_inner().unwrap()
}

fn put_blob(layout: &Path, data: &[u8]) -> (String, u64) {
    let h = hex(data);
    std::fs::write(layout.join("blobs/sha256").join(&h), data).unwrap();
    (format!("sha256:{h}"), data.len() as u64)
}

/// One platform's manifest (gzip layer + config) in `layout`; returns its descriptor JSON.
fn image_manifest(layout: &Path, files: &[(&str, &[u8])], arch: &str) -> serde_json::Value {
    let tar = tar_of(files);
    let (ld, ls) = put_blob(layout, &gzip(&tar));
    let cfg = serde_json::to_vec(&serde_json::json!({
        "architecture": arch, "os": "linux",
        "config": {"Env": ["PATH=/bin", "GREETING=hi"], "Cmd": ["/bin/sh"], "WorkingDir": "/work"},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", hex(&tar))]}
    }))
    .unwrap();
    let (cd, cs) = put_blob(layout, &cfg);
    let m = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": ld, "size": ls}]
    }))
    .unwrap();
    let (md, ms) = put_blob(layout, &m);
    serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
        "platform": {"architecture": arch, "os": "linux"}
    })
}

/// An OCI layout whose index.json names `tag`. With `multi`, the tag points at an image index
/// with an arm64 and an amd64 image (in that order).
fn layout(dir: &Path, tag: &str, multi: bool, marker: &[u8]) -> PathBuf {
    // A static busybox makes the image bootable (`capsa run --image`).
    let busybox = std::fs::read("/bin/busybox").expect("a static /bin/busybox (busybox-static)");
    let l = dir.join(format!("layout-{tag}"));
    std::fs::create_dir_all(l.join("blobs/sha256")).unwrap();
    std::fs::write(l.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let amd = image_manifest(
        &l,
        &[
            ("etc/hello", b"hello from the registry\n"),
            ("etc/arch", b"amd64\n"),
            ("data/marker", marker),
            ("bin/busybox", &busybox),
            ("work/.keep", b""),
        ],
        "amd64",
    );
    let mut top = if multi {
        let arm = image_manifest(&l, &[("etc/arch", b"arm64\n")], "arm64");
        let idx = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [arm, amd]
        }))
        .unwrap();
        let (d, s) = put_blob(&l, &idx);
        serde_json::json!({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": d, "size": s})
    } else {
        let mut a = amd;
        a.as_object_mut().unwrap().remove("platform");
        a
    };
    top["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    std::fs::write(
        l.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [top]})).unwrap(),
    )
    .unwrap();
    l
}

struct Env {
    tmp: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("home")).unwrap();
        Env { tmp }
    }
    fn path(&self) -> &Path {
        self.tmp.path()
    }
    fn store(&self) -> PathBuf {
        self.path().join("cache/capsa/images")
    }
    fn capsa(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_capsa"))
            .args(args)
            .env("XDG_CACHE_HOME", self.path().join("cache"))
            .env("HOME", self.path().join("home"))
            .env_remove("DOCKER_CONFIG")
            .env("CAPSA_STATE_DIR", self.path().join("state"))
            .env("CAPSA_SNAPSHOT_DIR", self.path().join("snapshots"))
            .output()
            .unwrap()
    }
    fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.capsa(args);
        assert!(
            out.status.success(),
            "capsa {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
    }
    fn fails(&self, args: &[&str]) -> String {
        let out = self.capsa(args);
        assert!(!out.status.success(), "capsa {args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        eprintln!("capsa {args:?} failed as expected: {err}");
        err
    }
    fn blob_count(&self) -> usize {
        std::fs::read_dir(self.store().join("blobs/sha256"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// Extracts an EROFS image with fsck.erofs and returns the extracted root.
fn extract(img: &str, dest: &Path) -> PathBuf {
    need("fsck.erofs");
    let root = dest.join("x");
    let out = Command::new("fsck.erofs")
        .arg(format!("--extract={}", root.display()))
        .arg(img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fsck.erofs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    root
}

#[test]
fn pull_index_picks_amd64_converts_and_caches() {
    let reg = Registry::start(None);
    let env = Env::new();
    let l = layout(env.path(), "1", true, b"one\n");
    reg.push(&l, "app:1", None);
    let r = format!("{}/app:1", reg.host());

    let v = env.json(&["image", "pull", &r, "--json"]);
    assert_eq!(v["cached"], false, "{v}");
    assert!(v["downloaded_bytes"].as_u64().unwrap() > 0, "{v}");
    let root = extract(v["rootfs"].as_str().unwrap(), env.path());
    assert_eq!(
        std::fs::read(root.join("etc/hello")).unwrap(),
        b"hello from the registry\n"
    );
    assert_eq!(std::fs::read(root.join("etc/arch")).unwrap(), b"amd64\n");
    assert_eq!(
        std::fs::read_link(root.join("etc/link")).unwrap(),
        Path::new("/etc/hello")
    );
    let digest = v["digest"].as_str().unwrap().to_string();

    // The pulled image runs: its files, Env and WorkingDir in a real VM.
    let out = Command::new(env!("CARGO_BIN_EXE_capsa"))
        .args(["run", "--image", &r, "--memory", "256M", "--"])
        .args([
            "/bin/busybox",
            "sh",
            "-c",
            "cat /etc/hello; echo $GREETING; /bin/busybox pwd",
        ])
        .env("CAPSA_IMAGE_STORE", env.store())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "run --image {r}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the registry\nhi\n/work\n"
    );
    // The same OCI layout loaded from disk (no registry) runs too.
    let local = Env::new();
    let loaded = local.capsa(&["image", "load", l.to_str().unwrap()]);
    assert!(
        loaded.status.success(),
        "image load: {}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_capsa"))
        .args(["run", "--image", "1", "--memory", "256M", "--"])
        .args(["/bin/busybox", "cat", "/etc/arch"])
        .env("CAPSA_IMAGE_STORE", local.store())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "run --image of a loaded layout: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "amd64\n");

    // Again by tag: one HEAD, nothing downloaded, the converted image reused.
    let t = Instant::now();
    let v2 = env.json(&["image", "pull", &r, "--json"]);
    assert_eq!(v2["cached"], true, "{v2}");
    assert_eq!(v2["asked_registry"], true, "{v2}");
    assert_eq!(v2["downloaded_bytes"], 0);
    assert_eq!(v2["converted"], false);
    assert_eq!(v2["digest"], digest.as_str());
    eprintln!("cached pull by tag: {:?} (process included)", t.elapsed());

    // The tag's index digest and the manifest digest both resolve with no registry at all.
    let idx = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{r}"))
        .output()
        .unwrap();
    let idx_digest = format!("sha256:{}", hex(&idx.stdout));
    drop(reg);
    for d in [&idx_digest, &digest] {
        let v3 = env.json(&["image", "pull", &format!("127.0.0.1:1/app@{d}"), "--json"]);
        assert_eq!(v3["asked_registry"], false, "{v3}");
        assert_eq!(v3["digest"], digest.as_str());
    }
    let v4 = env.json(&["image", "pull", "--offline", &r, "--json"]);
    assert_eq!(v4["asked_registry"], false);
    let err = env.fails(&["image", "pull", "--offline", "127.0.0.1:1/other:1"]);
    assert!(err.contains("--offline"), "{err}");

    // inspect shows the image config; ls lists it.
    let i = env.json(&["image", "inspect", &r]);
    assert_eq!(i["kind"], "image");
    assert_eq!(i["digest"], digest.as_str());
    assert_eq!(i["config"]["WorkingDir"], "/work");
    assert_eq!(i["config"]["Env"][1], "GREETING=hi");
    assert_eq!(i["index_digests"][0], idx_digest.as_str());
    assert_eq!(i["rootfs"][0]["format"], "erofs");
    let ls = env.json(&["image", "ls", "--json"]);
    assert!(
        ls.as_array()
            .unwrap()
            .iter()
            .any(|x| x["kind"] == "image" && x["digest"] == digest.as_str()),
        "{ls}"
    );
}

#[test]
fn tampered_blob_is_refused_and_nothing_kept() {
    let reg = Registry::start(None);
    let env = Env::new();
    let l = layout(env.path(), "t", false, b"tamper me\n");
    reg.push(&l, "bad:1", None);
    // Flip one byte of the layer in the registry's storage (same size).
    let idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(l.join("index.json")).unwrap()).unwrap();
    let mdigest = idx["manifests"][0]["digest"].as_str().unwrap();
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(l.join("blobs/sha256").join(&mdigest[7..])).unwrap())
            .unwrap();
    let layer_hex = &m["layers"][0]["digest"].as_str().unwrap()[7..];
    let data = reg.blob_data(layer_hex);
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, &bytes).unwrap();

    let err = env.fails(&["image", "pull", &format!("{}/bad:1", reg.host())]);
    assert!(
        err.contains(layer_hex) && (err.contains("tampered") || err.contains("digest")),
        "{err}"
    );
    assert!(
        !env.store().join("blobs/sha256").join(layer_hex).exists(),
        "a corrupt blob was kept"
    );
    let ls = env.json(&["image", "ls", "--json"]);
    assert!(
        !ls.as_array().unwrap().iter().any(|x| x["kind"] == "image"),
        "{ls}"
    );
    // Nothing half-written is left in tmp/.
    assert_eq!(
        std::fs::read_dir(env.store().join("tmp")).unwrap().count(),
        0
    );
}

#[test]
fn basic_auth_from_docker_config() {
    let reg = Registry::start(Some(("capsa", "s3cret")));
    let env = Env::new();
    let l = layout(env.path(), "a", false, b"auth\n");
    reg.push(&l, "private:1", Some("capsa:s3cret"));
    let r = format!("{}/private:1", reg.host());

    let err = env.fails(&["image", "pull", &r]);
    assert!(err.contains("docker/config.json"), "{err}");

    use base64::Engine as _;
    let docker = env.path().join("home/.docker");
    std::fs::create_dir_all(&docker).unwrap();
    let wrong = base64::engine::general_purpose::STANDARD.encode("capsa:wrong");
    std::fs::write(
        docker.join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{wrong}"}}}}}}"#, reg.host()),
    )
    .unwrap();
    let err = env.fails(&["image", "pull", &r]);
    assert!(err.contains("log in") || err.contains("uthoriz"), "{err}");

    let good = base64::engine::general_purpose::STANDARD.encode("capsa:s3cret");
    std::fs::write(
        docker.join("config.json"),
        format!(
            r#"{{"auths":{{"http://{}":{{"auth":"{good}"}}}}}}"#,
            reg.host()
        ),
    )
    .unwrap();
    let v = env.json(&["image", "pull", &r, "--json", "--convert", "none"]);
    assert_eq!(v["cached"], false, "{v}");
    assert!(v["rootfs"].is_null());
}

#[test]
fn prune_removes_orphans_and_keeps_what_state_references() {
    let reg = Registry::start(None);
    let env = Env::new();
    let l1 = layout(env.path(), "p1", false, b"first\n");
    let l2 = layout(env.path(), "p2", false, b"second\n");
    reg.push(&l1, "p:1", None);
    reg.push(&l2, "p:2", None);
    let a = env.json(&["image", "pull", &format!("{}/p:1", reg.host()), "--json"]);
    let b = env.json(&["image", "pull", &format!("{}/p:2", reg.host()), "--json"]);
    let blobs = env.blob_count();

    // Orphans: a stray blob, and two filesystem images whose records are gone; a sandbox's
    // state names one of them.
    let stray = env.store().join("blobs/sha256").join("0".repeat(64));
    std::fs::write(&stray, b"stray").unwrap();
    // A young unowned blob may be a pull in progress: kept. An old one goes.
    let young = env.store().join("blobs/sha256").join("3".repeat(64));
    std::fs::write(&young, b"young").unwrap();
    let st = Command::new("touch")
        .args(["-d", "2 hours ago"])
        .arg(&stray)
        .status()
        .unwrap();
    assert!(st.success());
    let orphan_used = env.store().join(format!("rootfs/{}.erofs", "1".repeat(64)));
    let orphan_free = env.store().join(format!("rootfs/{}.ext4", "2".repeat(64)));
    std::fs::write(&orphan_used, b"x").unwrap();
    std::fs::write(&orphan_free, b"y").unwrap();
    std::fs::create_dir_all(env.path().join("state/sandboxes/s1")).unwrap();
    std::fs::write(
        env.path().join("state/sandboxes/s1/spec.json"),
        format!("{{\"rootfs\":\"{}\"}}", orphan_used.display()),
    )
    .unwrap();

    let dry = env.json(&["image", "prune", "--dry-run", "--json"]);
    assert_eq!(dry["blobs"].as_array().unwrap().len(), 1, "{dry}");
    assert!(stray.exists());
    let v = env.json(&["image", "prune", "--json"]);
    assert_eq!(v["blobs"][0], "0".repeat(64), "{v}");
    assert_eq!(v["rootfs"][0], orphan_free.to_str().unwrap(), "{v}");
    assert_eq!(v["kept_rootfs"][0], orphan_used.to_str().unwrap(), "{v}");
    assert_eq!(v["young_blobs_kept"], 1, "{v}");
    assert!(!stray.exists() && !orphan_free.exists() && orphan_used.exists() && young.exists());
    std::fs::remove_file(&young).unwrap();
    // Both images are intact and still resolve offline.
    assert_eq!(env.blob_count(), blobs);
    for (x, r) in [(&a, "p:1"), (&b, "p:2")] {
        assert!(Path::new(x["rootfs"].as_str().unwrap()).is_file());
        let v = env.json(&[
            "image",
            "pull",
            "--offline",
            &format!("{}/{r}", reg.host()),
            "--json",
        ]);
        assert_eq!(v["digest"], x["digest"]);
    }
    // rm, then prune has nothing image-related left to do for p:1 (rm took its blobs).
    let out = env.capsa(&["image", "rm", &format!("{}/p:1", reg.host())]);
    assert!(out.status.success());
    let v = env.json(&["image", "prune", "--json"]);
    assert_eq!(v["blobs"].as_array().unwrap().len(), 0, "{v}");
}
