//! The shim under a real containerd (Debian's), started here on its own
//! root, state and socket in a temp dir, with an OCI image built here from
//! local files (the host's static busybox) and imported with `ctr`. Every
//! task is a real capsa VM: run with `-j 1`.
//!
//! containerd must be installed (`apt-get install containerd`; CI does):
//! without it these tests fail with that fix, they never skip.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::Digest as _;

const NS: &str = "capsa-test";
const IMAGE: &str = "docker.io/capsa-test/busybox:1";
const RUNTIME: &str = "io.containerd.capsa.v2";
/// containerd's namespace of the CRI plugin.
const CRI_NS: &str = "k8s.io";
const PAUSE_TAG: &str = "capsa-test/pause:1";
/// The pods' sandbox image: built here (no registry is reached).
const PAUSE_IMAGE: &str = "docker.io/capsa-test/pause:1";

fn hex(d: &[u8]) -> String {
    sha2::Sha256::digest(d)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn tar_entry(
    b: &mut tar::Builder<Vec<u8>>,
    path: &str,
    kind: tar::EntryType,
    mode: u32,
    data: &[u8],
    link: Option<&str>,
) {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(data.len() as u64);
    match link {
        Some(l) => b.append_link(&mut h, path, l).unwrap(),
        None => b.append_data(&mut h, path, data).unwrap(),
    }
}

/// A `docker save` archive of a one-layer image: the host's static busybox
/// and its applets under /bin.
fn image_archive(out: &Path) {
    image_archive_as(out, "capsa-test/busybox:1", &["/bin/sh"]);
}

/// [`image_archive`] tagged `tag`, with `cmd` as its `Cmd`.
fn image_archive_as(out: &Path, tag: &str, cmd: &[&str]) {
    let mut lb = tar::Builder::new(Vec::new());
    for d in ["bin", "etc", "root", "tmp", "proc", "sys", "dev"] {
        tar_entry(&mut lb, d, tar::EntryType::Directory, 0o755, b"", None);
    }
    let busybox = std::fs::read("/bin/busybox")
        .expect("a static /bin/busybox on the host; fix: apt-get install busybox-static");
    tar_entry(
        &mut lb,
        "bin/busybox",
        tar::EntryType::Regular,
        0o755,
        &busybox,
        None,
    );
    for a in [
        "sh", "cat", "echo", "sleep", "true", "false", "stty", "ls", "id", "ps", "kill", "wc",
        "grep", "tty",
    ] {
        tar_entry(
            &mut lb,
            &format!("bin/{a}"),
            tar::EntryType::Symlink,
            0o777,
            b"",
            Some("busybox"),
        );
    }
    tar_entry(
        &mut lb,
        "etc/passwd",
        tar::EntryType::Regular,
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\n",
        None,
    );
    tar_entry(
        &mut lb,
        "etc/image-marker",
        tar::EntryType::Regular,
        0o644,
        b"from-the-image\n",
        None,
    );
    let layer = lb.into_inner().unwrap();
    let cfg = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": cmd},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", hex(&layer))]}
    }))
    .unwrap();
    let cfg_name = format!("{}.json", hex(&cfg));
    let manifest = serde_json::to_vec(&serde_json::json!([
        {"Config": cfg_name, "RepoTags": [tag], "Layers": ["l0/layer.tar"]}
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

/// The directory holding the shim binary (cargo's target dir of this test).
fn shim_dir() -> PathBuf {
    let shim = PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-capsa-v2"));
    shim.parent().unwrap().to_path_buf()
}

/// A containerd of the test's own.
struct Containerd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    env: Vec<(String, String)>,
}

impl Containerd {
    fn sock(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }
    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("capsa-state")
    }

    fn path_env() -> String {
        format!(
            "{}:{}",
            shim_dir().display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        )
    }

    fn start() -> Containerd {
        Self::start_with(&[])
    }

    /// [`Containerd::start`] with extra environment for containerd (and so
    /// for its shims).
    fn start_with(env: &[(&str, &str)]) -> Containerd {
        Self::start_full(env, false)
    }

    /// [`Containerd::start_with`], with containerd's CRI plugin on when
    /// `cri` (runtime handler `capsa`, the sandbox image imported here,
    /// no CNI: host-network pods only).
    fn start_full(env: &[(&str, &str)], cri: bool) -> Containerd {
        for tool in ["containerd", "ctr"] {
            let found = std::env::var("PATH")
                .unwrap_or_default()
                .split(':')
                .chain(["/usr/bin", "/usr/sbin"])
                .any(|d| Path::new(d).join(tool).is_file());
            assert!(
                found,
                "{tool} is not installed; fix: apt-get install containerd (CI installs it)"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("ctrd")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path();
        let plugins = if cri {
            format!(
                r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni}/bin"
    conf_dir = "{cni}/conf"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "capsa"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.capsa]
      runtime_type = "{RUNTIME}"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.capsa.options]
        ConfigPath = "{settings}"
"#,
                cni = d.join("cni").display(),
                settings = d.join("capsa-shim.toml").display(),
            )
        } else {
            r#"disabled_plugins = ["io.containerd.grpc.v1.cri"]
"#
            .to_string()
        };
        let cfg = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
{plugins}[grpc]
  address = "{sock}"
[debug]
  level = "debug"
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("c.sock").display(),
        );
        std::fs::write(d.join("config.toml"), cfg).unwrap();
        // The shim's settings file the CRI runtime's options name.
        std::fs::write(d.join("capsa-shim.toml"), "default_memory_mib = 384\n").unwrap();
        let mut c = Containerd {
            dir,
            child: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        c.spawn();
        let archive = c.dir.path().join("image.tar");
        image_archive(&archive);
        let out = c.ctr(&["image", "import", archive.to_str().unwrap()]);
        assert!(out.status.success(), "ctr image import: {}", show(&out));
        if cri {
            let pause = c.dir.path().join("pause.tar");
            image_archive_as(&pause, PAUSE_TAG, &["/bin/sleep", "2147483647"]);
            for a in [&archive, &pause] {
                let out = Command::new("ctr")
                    .arg("-a")
                    .arg(c.sock())
                    .args(["-n", CRI_NS, "image", "import", a.to_str().unwrap()])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "ctr image import: {}", show(&out));
            }
        }
        c
    }

    fn spawn(&mut self) {
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("containerd.log"))
            .unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .env("PATH", Self::path_env())
            .env("CAPSA_STATE_DIR", d.join("capsa-state"))
            .env("CAPSA_SHIM_ROOTFS_CACHE", d.join("rootfs-cache"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        self.child = Some(child);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if self.ctr(&["version"]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("containerd did not answer; log:\n{}", self.log());
    }

    /// Kills containerd (its shims live on), then starts it again.
    fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("-a")
            .arg(self.sock())
            .args(["-n", NS])
            .args(args)
            .env("PATH", Self::path_env())
            .stdin(Stdio::null());
        c
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_cmd(args).output().expect("running ctr")
    }

    /// `ctr run --rm --runtime capsa IMAGE ID ARGS...`, bounded in time.
    fn run(&self, id: &str, extra: &[&str], args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut a = vec!["run", "--rm", "--runtime", RUNTIME];
        a.extend_from_slice(extra);
        a.extend_from_slice(&[IMAGE, id]);
        a.extend_from_slice(args);
        let mut cmd = self.ctr_cmd(&a);
        if stdin.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(data) = stdin {
            let mut s = child.stdin.take().unwrap();
            s.write_all(data).unwrap();
        }
        wait_bounded(child, Duration::from_secs(180), &self.log())
    }

    /// Sandboxes of capsa's registry, as `capsa ps` sees them.
    fn sandboxes(&self) -> Vec<capsa::SandboxRecord> {
        capsa::Sandboxes::new(Some(self.state_dir()))
            .list()
            .unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Leave no VM behind, whatever the test did.
        let reg = capsa::Sandboxes::new(Some(self.state_dir()));
        if let Ok(list) = reg.list() {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            for r in list {
                let _ = rt.block_on(reg.remove(&r.name, true));
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A failed test may leave shims that nobody will Delete or Shut down.
        for pid in shims_of(&self.sock()) {
            // SAFETY: kill(2) on a pid read from /proc.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // Unmount leftovers.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "grep -o ' {}[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l",
                self.dir.path().display()
            ))
            .status();
    }
}

fn wait_bounded(mut child: Child, limit: Duration, log: &str) -> Output {
    let t = Instant::now();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().unwrap();
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "ctr did not finish in {limit:?}: {}\ncontainerd log:\n{log}",
                show(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn show(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Whether a QEMU of this test's containerd runs (it inherits the
/// `CAPSA_STATE_DIR` the test gave containerd, through shim and monitor).
fn qemu_running_under(dir: &Path) -> bool {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return false;
    };
    let needle = format!("CAPSA_STATE_DIR={}", dir.display());
    rd.flatten().any(|e| {
        let qemu = std::fs::read(e.path().join("cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("qemu-system"));
        qemu && std::fs::read(e.path().join("environ"))
            .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == needle.as_bytes()))
    })
}

#[test]
fn run_rm_prints_output_and_passes_exit_codes() {
    let c = Containerd::start();
    let out = c.run("echo1", &[], &["echo", "hi"], None);
    assert!(out.status.success(), "{}\n{}", show(&out), c.log());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hi\n",
        "{}",
        show(&out)
    );

    // The root is the image's, and writes go to the sandbox's own layer.
    let out = c.run(
        "cat1",
        &[],
        &[
            "sh",
            "-c",
            "cat /etc/image-marker; echo w > /tmp/x && cat /tmp/x; exit 3",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-the-image\nw\n");

    // stderr is kept apart from stdout.
    let out = c.run("err1", &[], &["sh", "-c", "echo out; echo err >&2"], None);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");

    // stdin through `cat` ends when ctr's stdin does (CloseIO).
    let out = c.run("cat2", &[], &["cat"], Some(b"piped line\n"));
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "piped line\n");

    // The first task booted cold and saved a base snapshot; later ones restored it.
    let log = c.log();
    assert!(
        log.contains("how=\"cold boot (base snapshot saved)\""),
        "{log}"
    );
    assert!(log.contains("how=\"restored\""), "{log}");

    // The native snapshotter (a bind mount of a full copy): an image of the
    // container's own, removed with it.
    let out = c.run(
        "native1",
        &["--snapshotter", "native"],
        &["cat", "/etc/image-marker"],
        None,
    );
    assert!(out.status.success(), "{}\n{}", show(&out), c.log());
    assert_eq!(text(&out), "from-the-image\n");
    let private = c.dir.path().join("rootfs-cache/containers");
    let left: Vec<_> = std::fs::read_dir(&private)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "per-container images left: {left:?}");

    // --rm left no sandbox and no QEMU behind.
    assert!(c.sandboxes().is_empty(), "{:?}", c.sandboxes());
    assert!(!qemu_running_under(&c.state_dir()));
}

/// The container's limits size its VM (`ctr run --memory-limit --cpus`, as
/// a Kubernetes container's `resources.limits` would), a limit no VM can
/// have is refused with the fix, and a settings file named by the runtime's
/// options sets the default size.
#[test]
fn container_limits_and_settings_size_the_vm() {
    let c = Containerd::start();
    let out = c.run(
        "sized1",
        &["--memory-limit", "1073741824", "--cpus", "2"],
        &[
            "sh",
            "-c",
            "nproc; sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo",
        ],
        None,
    );
    assert!(out.status.success(), "{}\n{}", show(&out), c.log());
    let t = text(&out);
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines.first(), Some(&"2"), "nproc: {t}");
    let mem_kib: u64 = lines.get(1).and_then(|l| l.parse().ok()).expect(&t);
    // 1 GiB for the container plus the guest's 64 MiB, less the kernel's own.
    assert!(
        (1000 << 10..=1088 << 10).contains(&mem_kib),
        "MemTotal {mem_kib} kB for a 1 GiB limit"
    );

    let out = c.run(
        "huge1",
        &["--memory-limit", "1099511627776"],
        &["true"],
        None,
    );
    assert!(!out.status.success(), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("more than a capsa VM") && err.contains("io.capsa.memory_mib"),
        "{}",
        show(&out)
    );

    // The runtime's options name a settings file (ctr --runtime-config-path,
    // as containerd's CRI config `options.ConfigPath`): its default size
    // applies to a container without limits.
    let settings = c.dir.path().join("capsa-shim.toml");
    std::fs::write(&settings, "default_memory_mib = 384\nfast_start = false\n").unwrap();
    let cfg = settings.to_str().unwrap();
    let out = c.run(
        "cfg1",
        &["--runtime-config-path", cfg],
        &[
            "sh",
            "-c",
            "sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo",
        ],
        None,
    );
    assert!(out.status.success(), "{}\n{}", show(&out), c.log());
    let t = text(&out);
    let mem_kib: u64 = t.trim().parse().expect(&t);
    assert!(
        (330 << 10..=384 << 10).contains(&mem_kib),
        "MemTotal {mem_kib} kB with default_memory_mib = 384"
    );
    // A bad file is refused with the file, the key and the fix.
    std::fs::write(&settings, "pool_size = 99\n").unwrap();
    let out = c.run("cfg2", &["--runtime-config-path", cfg], &["true"], None);
    assert!(!out.status.success(), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("capsa-shim.toml") && err.contains("pool_size = 99: give 0 to 8"),
        "{}",
        show(&out)
    );

    assert!(c.sandboxes().is_empty(), "{:?}", c.sandboxes());
    assert!(!qemu_running_under(&c.state_dir()));
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The pids of the capsa shims of the containerd at `sock`.
fn shims_of(sock: &Path) -> Vec<i32> {
    let sock = sock.display().to_string();
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let pid: i32 = e.file_name().to_str()?.parse().ok()?;
                    let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                    let args: Vec<String> = cmd
                        .split(|b| *b == 0)
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect();
                    let is = args.first()?.ends_with("containerd-shim-capsa-v2")
                        && args.iter().any(|a| a == &sock);
                    is.then_some(pid)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The pids of this containerd's shims for container `id`.
fn shim_pids(c: &Containerd, id: &str) -> Vec<i32> {
    let sock = c.sock().display().to_string();
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let pid: i32 = e.file_name().to_str()?.parse().ok()?;
                    let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                    let args: Vec<String> = cmd
                        .split(|b| *b == 0)
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect();
                    let is = args.first()?.ends_with("containerd-shim-capsa-v2")
                        && args.windows(2).any(|w| w[0] == "-id" && w[1] == id)
                        && args.iter().any(|a| a == &sock);
                    is.then_some(pid)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn task_line(c: &Containerd, id: &str) -> String {
    let out = c.ctr(&["task", "ls"]);
    text(&out)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn detached_task_ls_ps_exec_kill_delete() {
    let c = Containerd::start();
    let out = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        "d1",
        "sleep",
        "600",
    ]);
    assert!(out.status.success(), "{}\n{}", show(&out), c.log());
    let line = task_line(&c, "d1");
    assert!(line.contains("RUNNING"), "task ls: {line:?}");

    // The VM is an ordinary capsa sandbox, marked as the shim's.
    let recs = c.sandboxes();
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(
        capsa::Sandboxes::label(&recs[0], "owner"),
        Some("containerd-shim")
    );
    assert_eq!(
        capsa::Sandboxes::label(&recs[0], "containerd.id"),
        Some("d1")
    );
    // What `capsa ps` and capsad list (capsa ps prints it as `[containerd-shim]`).
    let info = capsa_api::local::info_of(recs[0].clone());
    assert_eq!(info.owner.as_deref(), Some("containerd-shim"));
    let ps = Command::new(shim_dir().join("capsa"))
        .arg("ps")
        .env("CAPSA_STATE_DIR", c.state_dir())
        .output();
    if let Ok(ps) = ps {
        eprintln!("capsa ps:\n{}", text(&ps));
    }

    let ps = c.ctr(&["task", "ps", "d1"]);
    assert!(ps.status.success(), "{}", show(&ps));
    let pid = line.split_whitespace().nth(1).unwrap().to_string();
    assert!(text(&ps).contains(&pid), "task ps {}: {}", pid, show(&ps));

    let ex = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "d1",
        "sh",
        "-c",
        "echo in-exec; ps | grep -c '[s]leep 600'; exit 4",
    ]);
    assert_eq!(ex.status.code(), Some(4), "{}", show(&ex));
    assert_eq!(text(&ex), "in-exec\n1\n", "{}", show(&ex));
    // An exec id can be used again once its process is gone.
    let ex = c.ctr(&["task", "exec", "--exec-id", "e1", "d1", "true"]);
    assert!(ex.status.success(), "{}", show(&ex));

    // Unsupported RPCs say so.
    let p = c.ctr(&["task", "pause", "d1"]);
    assert!(!p.status.success());
    assert!(
        String::from_utf8_lossy(&p.stderr).contains("not implemented"),
        "{}",
        show(&p)
    );

    let k = c.ctr(&["task", "kill", "d1"]);
    assert!(k.status.success(), "{}", show(&k));
    wait_until("the task to stop", Duration::from_secs(30), || {
        task_line(&c, "d1").contains("STOPPED")
    });
    let d = c.ctr(&["task", "delete", "d1"]);
    assert!(d.status.success(), "{}", show(&d));
    let r = c.ctr(&["container", "rm", "d1"]);
    assert!(r.status.success(), "{}", show(&r));
    assert!(c.sandboxes().is_empty(), "{:?}", c.sandboxes());
    wait_until("the shim to exit", Duration::from_secs(30), || {
        shim_pids(&c, "d1").is_empty()
    });
    assert!(!qemu_running_under(&c.state_dir()));
}

#[test]
fn killed_shim_leaves_no_qemu_and_restarted_containerd_reconnects() {
    let mut c = Containerd::start();
    // containerd restarted while a task runs: the task is still controllable.
    let out = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        "r1",
        "sleep",
        "600",
    ]);
    assert!(out.status.success(), "{}\n{}", show(&out), c.log());
    c.restart();
    assert!(
        task_line(&c, "r1").contains("RUNNING"),
        "{}",
        task_line(&c, "r1")
    );
    let ex = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "after",
        "r1",
        "echo",
        "still-here",
    ]);
    assert_eq!(text(&ex), "still-here\n", "{}", show(&ex));

    // kill -9 of the shim: containerd's cleanup (the `delete` subcommand)
    // kills the VM; nothing of it stays.
    let pids = shim_pids(&c, "r1");
    assert_eq!(pids.len(), 1, "{pids:?}");
    assert!(qemu_running_under(&c.state_dir()));
    // SAFETY: kill(2) on a pid read from /proc.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    wait_until(
        "the task to be seen stopped",
        Duration::from_secs(60),
        || !task_line(&c, "r1").contains("RUNNING"),
    );
    let _ = c.ctr(&["task", "delete", "r1"]);
    let _ = c.ctr(&["container", "rm", "r1"]);
    wait_until(
        "QEMU and the sandbox to go",
        Duration::from_secs(60),
        || !qemu_running_under(&c.state_dir()) && c.sandboxes().is_empty(),
    );
}

#[test]
fn terminal_gets_the_window_size() {
    let c = Containerd::start();
    let cmd = format!(
        "stty rows 33 cols 111; ctr -a {} -n {NS} run -t --rm --runtime {RUNTIME} {IMAGE} t1 sh -c 'sleep 2; tty; stty size'",
        c.sock().display()
    );
    let child = Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .env("PATH", Containerd::path_env())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script(1) from util-linux");
    let out = wait_bounded(child, Duration::from_secs(180), &c.log());
    let s = text(&out);
    assert!(out.status.success(), "{}", show(&out));
    assert!(s.contains("/dev/pts/"), "not a terminal: {s:?}");
    assert!(
        s.contains("33 111"),
        "the window size did not arrive: {s:?}"
    );
}

#[test]
fn terminal_follows_a_live_resize() {
    let c = Containerd::start();
    let session = format!("capsa-shim-{}", std::process::id());
    let cmd = format!(
        "ctr -a {} -n {NS} run -t --rm --runtime {RUNTIME} {IMAGE} t2 sh -c 'sleep 3; stty size; sleep 4; stty size'; sleep 30",
        c.sock().display()
    );
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .args(args)
            .env("PATH", Containerd::path_env())
            .output()
            .expect("tmux (apt-get install tmux)")
    };
    let st = tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "100",
        "-y",
        "30",
        &cmd,
    ]);
    assert!(st.status.success(), "{}", show(&st));
    let pane = || {
        let o = tmux(&["capture-pane", "-p", "-t", &session]);
        text(&o)
    };
    // The task sees the window's size, then a resize while it runs.
    wait_until("the first size", Duration::from_secs(120), || {
        pane().contains("30 100")
    });
    let r = tmux(&["resize-window", "-t", &session, "-x", "120", "-y", "40"]);
    assert!(r.status.success(), "{}", show(&r));
    wait_until(
        "the new size inside the task",
        Duration::from_secs(60),
        || pane().contains("40 120"),
    );
    let _ = tmux(&["kill-session", "-t", &session]);
}

/// Sandboxes of the shim's warm pool in `state` (`containerd.pool_state`).
fn pool_members(c: &Containerd, state: &str) -> Vec<capsa::SandboxRecord> {
    c.sandboxes()
        .into_iter()
        .filter(|r| capsa::Sandboxes::label(r, "containerd.pool_state") == Some(state))
        .collect()
}

#[test]
fn warm_pool_serves_tasks_and_dead_shims_leave_no_member() {
    let c = Containerd::start_with(&[("CAPSA_SHIM_POOL_SIZE", "1")]);
    // The first task boots cold and saves the base; its shim then restores
    // one pool member from it.
    let out = c.run("p0", &[], &["echo", "first"], None);
    assert!(out.status.success(), "{}\n{}", show(&out), c.log());
    let ready = || pool_members(&c, "ready").len() == 1;
    let t = Instant::now();
    while !ready() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no ready pool member: {:?}\n{}",
            c.sandboxes(),
            c.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let member = pool_members(&c, "ready").remove(0).name;
    assert!(member.starts_with("ctrdpool-"), "{member}");

    // The next task is served by that member: right output and exit code.
    let out = c.run(
        "p1",
        &[],
        &[
            "sh",
            "-c",
            "cat /etc/image-marker; echo w > /tmp/x && cat /tmp/x; exit 5",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(5), "{}\n{}", show(&out), c.log());
    assert_eq!(text(&out), "from-the-image\nw\n");
    let log = c.log();
    assert!(
        log.contains(&format!("sandbox=\"{member}\" how=\"pooled\"")),
        "the task did not get the pool member {member}:\n{log}"
    );
    // --rm removed the claimed member; its shim restored a replacement.
    wait_until("the replacement member", Duration::from_secs(240), ready);
    assert!(c.sandboxes().iter().all(|r| r.name != member));

    // A detached pooled task is the container's (labels), and a shim killed
    // with -9 takes its member with it (containerd's dead-shim cleanup
    // finds the member by label, not by name).
    let member = pool_members(&c, "ready").remove(0).name;
    let out = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        "p2",
        "sleep",
        "600",
    ]);
    assert!(out.status.success(), "{}\n{}", show(&out), c.log());
    let claimed = pool_members(&c, "claimed");
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    assert_eq!(claimed[0].name, member);
    assert_eq!(
        capsa::Sandboxes::label(&claimed[0], "containerd.id"),
        Some("p2")
    );
    assert_eq!(
        capsa::Sandboxes::label(&claimed[0], "owner"),
        Some("containerd-shim")
    );
    let ex = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e",
        "p2",
        "cat",
        "/etc/image-marker",
    ]);
    assert_eq!(text(&ex), "from-the-image\n", "{}", show(&ex));
    // Let its refill finish first: the kill is about the claimed member.
    wait_until("the replacement member", Duration::from_secs(240), ready);
    let pids = shim_pids(&c, "p2");
    assert_eq!(pids.len(), 1, "{pids:?}");
    // SAFETY: kill(2) on a pid read from /proc.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    wait_until(
        "the task to be seen stopped",
        Duration::from_secs(60),
        || !task_line(&c, "p2").contains("RUNNING"),
    );
    let _ = c.ctr(&["task", "delete", "p2"]);
    let _ = c.ctr(&["container", "rm", "p2"]);
    wait_until("the claimed member to go", Duration::from_secs(60), || {
        c.sandboxes().iter().all(|r| r.name != member)
    });
    // What stays is the pool: one ready member, nothing claimed.
    let left = c.sandboxes();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(pool_members(&c, "claimed").is_empty());

    // Idle members expire: with pool_max_idle_secs = 1 (and no pool for
    // this task), the next task's shim removes the one left waiting.
    std::thread::sleep(Duration::from_millis(2100));
    let settings = c.dir.path().join("capsa-shim.toml");
    std::fs::write(&settings, "pool_size = 0\npool_max_idle_secs = 1\n").unwrap();
    let out = c.run(
        "p3",
        &["--runtime-config-path", settings.to_str().unwrap()],
        &["echo", "after"],
        None,
    );
    assert_eq!(text(&out), "after\n", "{}", show(&out));
    wait_until("the idle member to expire", Duration::from_secs(60), || {
        c.sandboxes().is_empty()
    });
    assert!(
        c.log().contains("idle for longer than pool_max_idle_secs"),
        "{}",
        c.log()
    );
}

mod cri {
    //! containerd's own CRI plugin (what a kubelet talks to), driven over its
    //! socket by a small gRPC client (the `k8s-cri` protos), with the runtime
    //! handler `capsa` and host-network pods (no CNI).

    use super::*;
    use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
    use k8s_cri::v1::*;
    use tonic::transport::{Channel, Endpoint, Uri};

    async fn client(sock: PathBuf) -> RuntimeServiceClient<Channel> {
        let ch = Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let sock = sock.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(sock).await?,
                    ))
                }
            }))
            .await
            .expect("connecting to containerd's CRI socket");
        RuntimeServiceClient::new(ch)
    }

    fn pod_config(logs: &Path) -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "pod1".into(),
                uid: "uid-pod1".into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: "pod1".into(),
            log_directory: logs.display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Node as i32,
                        pid: NamespaceMode::Container as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn container(name: &str, cmd: &[&str]) -> ContainerConfig {
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: IMAGE.into(),
                ..Default::default()
            }),
            command: cmd.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            ..Default::default()
        }
    }

    /// Prints `mem=<MemTotal in kB>`.
    const MEM_KIB: &str = "sed -n 's/^MemTotal: *\\([0-9]*\\) kB/mem=\\1/p' /proc/meminfo";

    fn mem_kib(out: &str) -> u64 {
        out.split("mem=")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no mem= in {out:?}"))
    }

    async fn wait_exited(rt: &mut RuntimeServiceClient<Channel>, id: &str) -> ContainerStatus {
        let t = Instant::now();
        loop {
            let st = rt
                .container_status(ContainerStatusRequest {
                    container_id: id.into(),
                    verbose: false,
                })
                .await
                .expect("ContainerStatus")
                .into_inner()
                .status
                .expect("a status");
            if st.state == ContainerState::ContainerExited as i32 {
                return st;
            }
            assert!(t.elapsed() < Duration::from_secs(180), "{st:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    #[test]
    fn cri_pod_with_the_capsa_handler() {
        let c = Containerd::start_full(&[], true);
        // Its own runtime, dropped before `c` (whose Drop runs one too).
        let tokio = tokio::runtime::Runtime::new().unwrap();
        tokio.block_on(pod(&c));
    }

    async fn pod(c: &Containerd) {
        let logs = c.dir.path().join("pod-logs");
        std::fs::create_dir_all(&logs).unwrap();
        let mut rt = client(c.sock()).await;
        let v = rt
            .version(VersionRequest::default())
            .await
            .unwrap_or_else(|e| panic!("CRI Version: {e}\n{}", c.log()))
            .into_inner();
        eprintln!(
            "CRI: {} {} (API {})",
            v.runtime_name, v.runtime_version, v.runtime_api_version
        );

        let cfg = pod_config(&logs);
        let pod = rt
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(cfg.clone()),
                runtime_handler: "capsa".into(),
            })
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", c.log()))
            .into_inner()
            .pod_sandbox_id;

        // A container that prints and fails: exit code and CRI log file.
        let id = rt
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(ContainerConfig {
                    // A Kubernetes memory limit sizes the VM: 256 MiB + 64.
                    linux: Some(LinuxContainerConfig {
                        resources: Some(LinuxContainerResources {
                            memory_limit_in_bytes: 256 << 20,
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..container(
                        "c1",
                        &[
                            "sh",
                            "-c",
                            &format!(
                                "cat /etc/image-marker; echo to-stderr >&2; {MEM_KIB}; exit 3"
                            ),
                        ],
                    )
                }),
                sandbox_config: Some(cfg.clone()),
            })
            .await
            .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", c.log()))
            .into_inner()
            .container_id;
        rt.start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", c.log()));
        let st = wait_exited(&mut rt, &id).await;
        assert_eq!(st.exit_code, 3, "{st:?}");
        let log = std::fs::read_to_string(logs.join("c1.log")).unwrap_or_default();
        assert!(log.contains(" stdout F from-the-image"), "CRI log: {log:?}");
        assert!(log.contains(" stderr F to-stderr"), "CRI log: {log:?}");
        let kib = mem_kib(&log);
        assert!(
            (250 << 10..=320 << 10).contains(&kib),
            "MemTotal {kib} kB for a 256 MiB limit: {log:?}"
        );

        // A long-running container: ExecSync into it.
        let id2 = rt
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container("c2", &["sleep", "600"])),
                sandbox_config: Some(cfg.clone()),
            })
            .await
            .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", c.log()))
            .into_inner()
            .container_id;
        rt.start_container(StartContainerRequest {
            container_id: id2.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", c.log()));
        let ex = rt
            .exec_sync(ExecSyncRequest {
                container_id: id2.clone(),
                cmd: vec![
                    "sh".into(),
                    "-c".into(),
                    format!(
                        "cat /etc/image-marker; {MEM_KIB}; hostname; cat /etc/hostname; exit 7"
                    ),
                ],
                timeout: 60,
            })
            .await
            .unwrap_or_else(|e| panic!("ExecSync: {e}\n{}", c.log()))
            .into_inner();
        assert_eq!(ex.exit_code, 7, "{ex:?}");
        let out = String::from_utf8_lossy(&ex.stdout);
        assert!(out.starts_with("from-the-image\n"), "{out}");
        // No limit: the default of the settings file the runtime's
        // options name (384 MiB), not the shim's own 512.
        let kib = mem_kib(&out);
        assert!(
            (330 << 10..=384 << 10).contains(&kib),
            "MemTotal {kib} kB with default_memory_mib = 384: {out}"
        );
        // The pod's hostname, as a container under runc sees it.
        assert!(out.ends_with("\npod1\npod1\n"), "hostname: {out}");

        // The pod's sandbox (pause) container gets no VM: the running
        // container's is the only one.
        let vms = c.sandboxes();
        assert_eq!(vms.len(), 1, "{vms:?}");
        assert_eq!(
            capsa::Sandboxes::label(&vms[0], "containerd.id"),
            Some(id2.as_str())
        );

        rt.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", c.log()));
        rt.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}\n{}", c.log()));
        let left = rt
            .list_pod_sandbox(ListPodSandboxRequest::default())
            .await
            .unwrap()
            .into_inner()
            .items;
        assert!(left.is_empty(), "{left:?}");
        let t = Instant::now();
        while !c.sandboxes().is_empty() || qemu_running_under(&c.state_dir()) {
            assert!(t.elapsed() < Duration::from_secs(60), "{:?}", c.sandboxes());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
