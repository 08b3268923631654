//! `capsa run --image` and `capsa create --image` on an OCI image built here
//! from local files (a static busybox, accounts, a config with Env,
//! WorkingDir, User, Entrypoint and Cmd), loaded with `capsa image load` into
//! a private store. Real VMs: run with `-j 1`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sha2::Digest as _;

fn hex(d: &[u8]) -> String {
    sha2::Sha256::digest(d)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn dir(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, uid: u64) {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(uid + u64::from(uid > 0));
    h.set_size(0);
    b.append_data(&mut h, path, std::io::empty()).unwrap();
}

fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]) {
    let mut h = tar::Header::new_ustar();
    h.set_mode(mode);
    h.set_size(data.len() as u64);
    b.append_data(&mut h, path, data).unwrap();
}

fn symlink(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_mode(0o777);
    h.set_size(0);
    b.append_link(&mut h, path, target).unwrap();
}

/// A `docker save` archive: busybox (from the host, static), an `app` user,
/// files only the image has, and a config exercising every run field.
fn image_archive(out: &Path) {
    let mut lb = tar::Builder::new(Vec::new());
    for d in ["bin", "etc", "srv", "root", "home"] {
        dir(&mut lb, d, 0o755, 0);
    }
    dir(&mut lb, "tmp", 0o1777, 0);
    dir(&mut lb, "srv/app", 0o755, 1000);
    let busybox = std::fs::read("/bin/busybox").expect("a static /bin/busybox on the host");
    file(&mut lb, "bin/busybox", 0o755, &busybox);
    for a in [
        "sh", "cat", "id", "pwd", "echo", "ls", "dd", "hostname", "touch", "rm",
    ] {
        symlink(&mut lb, &format!("bin/{a}"), "busybox");
    }
    // Found only through the image's PATH (the initramfs has no /opt/tools).
    dir(&mut lb, "opt", 0o755, 0);
    dir(&mut lb, "opt/tools", 0o755, 0);
    file(
        &mut lb,
        "opt/tools/only-in-image",
        0o755,
        b"#!/bin/sh\necho only-in-image\n",
    );
    // An absolute symlink: must resolve inside the image, for exec and files.
    symlink(&mut lb, "etc/greeting", "/etc/hello");
    symlink(&mut lb, "app", "/srv/app");
    file(
        &mut lb,
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/srv/app:/bin/sh\n",
    );
    file(
        &mut lb,
        "etc/group",
        0o644,
        b"root:x:0:\napp:x:1001:\nstaff:x:50:root,app\n",
    );
    file(&mut lb, "etc/hello", 0o644, b"hello from the image\n");
    file(&mut lb, "srv/app/data.txt", 0o644, b"app data\n");
    let layer = lb.into_inner().unwrap();
    let cfg = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {
            "Env": ["PATH=/opt/tools:/bin", "GREETING=hi-from-image"],
            "WorkingDir": "/srv/app",
            "User": "app",
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo default-cmd $GREETING"]
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", hex(&layer))]}
    }))
    .unwrap();
    let cfg_name = format!("{}.json", hex(&cfg));
    let manifest = serde_json::to_vec(&serde_json::json!([
        {"Config": cfg_name, "RepoTags": ["test/rootfs:1"], "Layers": ["l0/layer.tar"]}
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

struct Env {
    dir: tempfile::TempDir,
    image_file: PathBuf,
}

impl Env {
    /// A private state dir and image store holding the test image.
    fn new() -> Self {
        common::ensure_binaries();
        let dir = tempfile::Builder::new()
            .prefix("ci")
            .tempdir_in("/tmp")
            .unwrap();
        let archive = dir.path().join("save.tar");
        image_archive(&archive);
        let out = Command::new(env!("CARGO_BIN_EXE_capsa"))
            .args(["image", "load"])
            .arg(&archive)
            .env("XDG_CACHE_HOME", dir.path().join("cache"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let image_file = PathBuf::from(stdout.split_whitespace().last().unwrap());
        assert!(image_file.is_file(), "{stdout}");
        Self { dir, image_file }
    }

    fn capsa(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_capsa"));
        c.env("CAPSA_STATE_DIR", self.dir.path().join("s"))
            .env(
                "CAPSA_IMAGE_STORE",
                self.dir.path().join("cache/capsa/images"),
            )
            .env_remove("CAPSA_HOST")
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.capsa().args(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let t = std::time::Instant::now();
        let o = self.run(args);
        eprintln!("capsa {args:?}: {:?}", t.elapsed());
        assert!(
            o.status.success(),
            "capsa {args:?}: {:?}\nstdout: {}\nstderr: {}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn image_sha(&self) -> String {
        hex(&std::fs::read(&self.image_file).unwrap())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // A failed test must not leave its monitors running.
        let _ = self.run(&["rm", "-f", "img-a", "img-b"]);
    }
}

#[test]
fn run_in_image_applies_its_config() {
    let env = Env::new();
    // Docker's rules: the Entrypoint (sh -c) stays, the arguments replace Cmd.
    let out = env.ok(&[
        "run",
        "--no-snapshot",
        "--image",
        "test/rootfs:1",
        "--",
        "id -u; id -g; pwd; cat /etc/greeting; echo $GREETING; only-in-image; \
         cat /etc/hostname; ls /run/capsa 2>&1 || echo no-initramfs; id -G",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "1000", "User app from the image's passwd: {out}");
    assert_eq!(lines[1], "1001", "{out}");
    assert_eq!(lines[2], "/srv/app", "WorkingDir: {out}");
    assert_eq!(
        lines[3], "hello from the image",
        "absolute symlink inside: {out}"
    );
    assert_eq!(lines[4], "hi-from-image", "Env: {out}");
    assert_eq!(
        lines[5], "only-in-image",
        "PATH searched in the image: {out}"
    );
    assert_eq!(lines[6], "capsa", "/etc/hostname written: {out}");
    // The initramfs (capsa's /run/capsa mounts) is not visible from the image.
    assert!(out.contains("no-initramfs"), "{out}");
    // Supplementary groups: the groups of /etc/group that list the user.
    assert_eq!(
        lines.last().copied(),
        Some("1001 50"),
        "supplementary groups: {out}"
    );

    // No command: Entrypoint + Cmd.
    let out = env.ok(&["run", "--no-snapshot", "--image", "test/rootfs:1"]);
    assert_eq!(out.trim(), "default-cmd hi-from-image");

    // The command's and the sandbox's settings win over the image's.
    let out = env.ok(&[
        "run",
        "--no-snapshot",
        "--image",
        "test/rootfs:1",
        "-e",
        "GREETING=mine",
        "-w",
        "/tmp",
        "--",
        "echo $GREETING; pwd",
    ]);
    assert_eq!(out, "mine\n/tmp\n");

    // A write past the tmpfs cap is ENOSPC in the guest, nothing on the host.
    let o = env.run(&[
        "run",
        "--no-snapshot",
        "--image",
        "test/rootfs:1",
        "--tmpfs-upper",
        "8M",
        "--",
        "dd if=/dev/zero of=/tmp/big bs=1M count=32 2>&1; echo rc=$?",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("No space left on device") && out.contains("rc=1"),
        "{out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A cap above the guest's RAM is refused with the fix, before booting.
    let o = env.run(&[
        "run",
        "--image",
        "test/rootfs:1",
        "--memory",
        "256M",
        "--tmpfs-upper",
        "1G",
        "--",
        "true",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--tmpfs-upper"),
        "{err}"
    );
    // An unknown image names the fix.
    let o = env.run(&["run", "--image", "no/such:image", "--", "true"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("capsa image load"),
        "{err}"
    );
}

/// Shares in an image sandbox mount inside the image root, where commands
/// run: at boot (`run -v`) and hot-plugged (`share add`), through the
/// image's absolute symlink (/app -> /srv/app) resolved inside the image.
#[test]
fn shares_mount_inside_the_image_root() {
    let env = Env::new();
    let host = env.dir.path().join("shared");
    std::fs::create_dir(&host).unwrap();
    std::fs::write(host.join("f"), "from-host\n").unwrap();
    let vol = format!("{}:/data", host.display());
    // The image's user (`app`, uid 1000) reads it; creating files in a share
    // is for guest root only (virtiofsd 7.2 maps no other uid: README).
    let out = env.ok(&[
        "run",
        "--no-snapshot",
        "--image",
        "test/rootfs:1",
        "-v",
        &vol,
        "--",
        "cat /data/f; id -u",
    ]);
    assert_eq!(out, "from-host\n1000\n");

    env.ok(&["create", "--name", "img-a", "--image", "test/rootfs:1"]);
    let ro = format!("{}:/app/mnt:ro", host.display());
    env.ok(&["share", "add", "img-a", &ro]);
    let out = env.ok(&[
        "exec",
        "img-a",
        "--",
        "sh",
        "-c",
        "cat /srv/app/mnt/f; while read dev mnt fs opts rest; do \
         [ \"$mnt\" = /srv/app/mnt ] && echo \"$fs ${opts%%,*}\"; done < /proc/mounts",
    ]);
    // Mounted where the image's symlink leads, inside the image, read-only.
    assert_eq!(out, "from-host\nvirtiofs ro\n");
    env.ok(&["share", "rm", "img-a", "/app/mnt"]);
    let out = env.ok(&["exec", "img-a", "--", "ls", "-A", "/srv/app/mnt"]);
    assert_eq!(out, "", "still mounted after share rm: {out}");
    env.ok(&["rm", "-f", "img-a"]);
}

#[test]
fn sandboxes_on_one_image_are_isolated() {
    let env = Env::new();
    let before = env.image_sha();
    for n in ["img-a", "img-b"] {
        env.ok(&["create", "--name", n, "--image", "test/rootfs:1"]);
    }
    env.ok(&[
        "exec",
        "img-a",
        "--",
        "sh",
        "-c",
        "echo from-a > /srv/app/a.txt; rm /srv/app/data.txt",
    ]);
    let out = env.ok(&[
        "exec",
        "img-b",
        "--",
        "sh",
        "-c",
        "cat /srv/app/data.txt; ls /srv/app/a.txt 2>/dev/null || echo absent",
    ]);
    assert_eq!(out, "app data\nabsent\n", "b sees a's writes: {out}");
    let out = env.ok(&["exec", "img-a", "--", "cat", "/srv/app/a.txt"]);
    assert_eq!(out, "from-a\n");
    // Files act on the image root: a path through the image's absolute
    // symlink (/app -> /srv/app) resolves inside the image, and a copy in
    // lands in the image's tree.
    let host = env.dir.path().join("data.txt");
    env.ok(&["cp", "img-b:/app/data.txt", host.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&host).unwrap(), "app data\n");
    let src = env.dir.path().join("in.txt");
    std::fs::write(&src, "copied in\n").unwrap();
    env.ok(&["cp", src.to_str().unwrap(), "img-b:/srv/app/in.txt"]);
    let out = env.ok(&["exec", "img-b", "--", "cat", "/srv/app/in.txt"]);
    assert_eq!(out, "copied in\n");
    for n in ["img-a", "img-b"] {
        env.ok(&["rm", "-f", n]);
    }
    assert_eq!(env.image_sha(), before, "the shared image file changed");
}

#[test]
fn image_snapshots_restore_with_their_upper() {
    let env = Env::new();
    let before = env.image_sha();
    let snaps = env.dir.path().join("snaps");
    let snaps = snaps.to_str().unwrap();
    env.ok(&["create", "--name", "img-a", "--image", "test/rootfs:1"]);
    env.ok(&[
        "exec",
        "img-a",
        "--",
        "sh",
        "-c",
        "echo kept > /srv/app/state.txt; rm /srv/app/data.txt",
    ]);
    env.ok(&["snapshot", "--snapshot-dir", snaps, "create", "img-a", "s1"]);
    env.ok(&["rm", "-f", "img-a"]);
    env.ok(&[
        "create",
        "--snapshot-dir",
        snaps,
        "--name",
        "img-b",
        "--from-snapshot",
        "s1",
    ]);
    // The upper (tmpfs, in the saved RAM) came back, and the image config
    // still applies (it is part of the snapshot's spec).
    let out = env.ok(&[
        "exec",
        "img-b",
        "--",
        "sh",
        "-c",
        "cat state.txt; ls data.txt 2>/dev/null || echo gone; id -u; cat /etc/hostname",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..3], ["kept", "gone", "1000"], "{out}");
    // A fresh identity, written into the image's /etc/hostname too.
    assert_ne!(lines[3], "capsa", "{out}");
    env.ok(&["rm", "-f", "img-b"]);
    assert_eq!(env.image_sha(), before);
}

/// The base-snapshot fast path of `capsa run`, keyed by the image digest:
/// the first run boots and saves a base, the second restores it.
#[test]
fn run_restores_an_image_base_snapshot() {
    let env = Env::new();
    // A private cache for base snapshots that shares the built bundle and
    // kernel (read-only here) with the user's cache.
    let home = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"));
    let cache = env.dir.path().join("cache/capsa");
    for d in ["bundles", "kernels", "vmlinux", "hashes"] {
        let real = home.join("capsa").join(d);
        if real.exists() {
            std::os::unix::fs::symlink(&real, cache.join(d)).unwrap();
        }
    }
    let run = || {
        let o = env
            .capsa()
            .env("XDG_CACHE_HOME", env.dir.path().join("cache"))
            .args([
                "run",
                "--image",
                "test/rootfs:1",
                "--",
                "cat /etc/hostname; id -u",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let first = run();
    let bases: Vec<_> = std::fs::read_dir(cache.join("snapshots"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("base-"))
        .collect();
    assert_eq!(bases.len(), 1, "one base snapshot for the image");
    let meta = std::fs::read_to_string(bases[0].path().join("snapshot.json")).unwrap();
    let digest = env
        .image_file
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(meta.contains(&digest), "base keyed by the image digest");
    let t = std::time::Instant::now();
    let second = run();
    eprintln!("restored run: {:?}", t.elapsed());
    assert!(
        first.ends_with("1000\n") && second.ends_with("1000\n"),
        "{first} {second}"
    );
    // Restored clones get their own hostname, in the image's /etc too.
    assert_ne!(first.lines().next(), second.lines().next());
}

/// `--disk-upper PATH:SIZE`: the writable layer on an ext4 disk of its own,
/// kept across a stop and start of the named sandbox.
#[test]
fn disk_upper_persists_across_restarts() {
    let env = Env::new();
    let upper = env.dir.path().join("upper.img");
    let spec = format!("{}:64M", upper.display());
    env.ok(&[
        "create",
        "--name",
        "img-a",
        "--image",
        "test/rootfs:1",
        "--disk-upper",
        &spec,
    ]);
    assert_eq!(std::fs::metadata(&upper).unwrap().len(), 64 << 20);
    env.ok(&[
        "exec",
        "img-a",
        "--",
        "sh",
        "-c",
        "echo persisted > /srv/app/p.txt",
    ]);
    env.ok(&["stop", "img-a"]);
    env.ok(&["start", "img-a"]);
    let out = env.ok(&["exec", "img-a", "--", "cat", "/srv/app/p.txt"]);
    assert_eq!(out, "persisted\n");
    env.ok(&["rm", "-f", "img-a"]);
}

/// capsad's create `image` field, through `capsa --host create --image`.
#[test]
fn capsad_creates_image_sandboxes() {
    let env = Env::new();
    // capsad reads the image store from its environment (inherited; each
    // test is a process of its own under nextest).
    std::env::set_var(
        "CAPSA_IMAGE_STORE",
        env.dir.path().join("cache/capsa/images"),
    );
    let d = common::Daemon::start("ci", &[]);
    let out = d.ok_on(
        true,
        &["create", "--name", "r1", "--image", "test/rootfs:1"],
    );
    assert!(out.contains("r1"), "{out}");
    let out = d.ok_on(
        true,
        &["exec", "r1", "--", "sh", "-c", "id -u; pwd; echo $GREETING"],
    );
    assert_eq!(out, "1000\n/srv/app\nhi-from-image\n");
    let o = d.run_on(true, &["create", "--name", "r2", "--image", "no/such:1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("capsa image load"),
        "{err}"
    );
    d.ok_on(true, &["rm", "-f", "r1"]);
}

/// A capsad pool of an image: members restore from the image's base
/// snapshot and run in the image.
#[test]
fn capsad_pool_of_an_image() {
    let env = Env::new();
    std::env::set_var(
        "CAPSA_IMAGE_STORE",
        env.dir.path().join("cache/capsa/images"),
    );
    // Base snapshots in a private cache sharing the bundle (see above).
    let home = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"));
    let cache = env.dir.path().join("cache/capsa");
    for d in ["bundles", "kernels", "vmlinux", "hashes"] {
        let real = home.join("capsa").join(d);
        if real.exists() {
            std::os::unix::fs::symlink(&real, cache.join(d)).unwrap();
        }
    }
    std::env::set_var("XDG_CACHE_HOME", env.dir.path().join("cache"));
    let d = common::Daemon::start("cp", &[]);
    d.ok_on(
        true,
        &[
            "pool",
            "create",
            "ip",
            "--size",
            "1",
            "--image",
            "test/rootfs:1",
        ],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(240);
    let name = loop {
        let o = d.run_on(true, &["pool", "acquire", "ip"]);
        if o.status.success() {
            break String::from_utf8_lossy(&o.stdout).trim().to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let out = d.ok_on(true, &["exec", &name, "--", "sh", "-c", "id -u; pwd"]);
    assert_eq!(out, "1000\n/srv/app\n");
    d.ok_on(true, &["rm", "-f", &name]);
    d.ok_on(true, &["pool", "rm", "ip"]);
}
