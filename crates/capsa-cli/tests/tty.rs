//! The CLI in a real terminal: tmux runs `capsa run -it`, `capsa exec -it`
//! and `capsa attach` in a pane, types into it (`send-keys`, `paste-buffer`),
//! resizes it (`resize-window`) and reads the screen (`capture-pane`), both
//! straight to the monitors and through a spawned capsad.
//!
//! VM boots are kept few: one `run`, one named sandbox shared by every direct
//! exec/attach check, one sandbox for every check through capsad.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Generous: TCG under a loaded CI machine.
const T: Duration = Duration::from_secs(120);

fn capsa_bin() -> &'static str {
    env!("CARGO_BIN_EXE_capsa")
}

mod common;

/// A private tmux server with one 100x30 pane running `sh`, whose
/// environment points capsa at `state`.
struct Tmux {
    socket: PathBuf,
    dir: PathBuf,
    /// Markers handed out so far (each wait looks for a fresh one).
    seq: u32,
}

impl Tmux {
    fn start(dir: &Path, env: &[(&str, String)]) -> Self {
        let socket = dir.join("tmux.sock");
        let mut cmd = String::from("env");
        for (k, v) in env {
            cmd.push_str(&format!(" {k}='{v}'"));
        }
        cmd.push_str(" PS1='$ ' TERM=xterm /bin/sh");
        let st = Command::new("tmux")
            .arg("-S")
            .arg(&socket)
            .args(["-f", "/dev/null", "new-session", "-d", "-s", "t"])
            .args(["-x", "100", "-y", "30", &cmd])
            .env_remove("TMUX")
            .status()
            .expect("tmux runs (apt-get install tmux)");
        assert!(st.success(), "tmux new-session failed");
        let t = Self {
            socket,
            dir: dir.to_path_buf(),
            seq: 0,
        };
        t.tmux(&["set-option", "-g", "history-limit", "50000"]);
        t
    }

    fn tmux(&self, args: &[&str]) -> String {
        let o = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .env_remove("TMUX")
            .output()
            .expect("running tmux");
        assert!(
            o.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Types `text` literally, then Enter.
    fn line(&self, text: &str) {
        self.tmux(&["send-keys", "-t", "t", "-l", text]);
        self.tmux(&["send-keys", "-t", "t", "Enter"]);
    }

    /// Sends tmux key names (`C-c`, `Escape`, ...).
    fn keys(&self, keys: &[&str]) {
        let mut a = vec!["send-keys", "-t", "t"];
        a.extend_from_slice(keys);
        self.tmux(&a);
    }

    /// The whole pane history and screen.
    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-J", "-t", "t", "-S", "-"])
    }

    fn wait_screen(&self, pat: &str, t: Duration) -> String {
        let end = Instant::now() + t;
        loop {
            let s = self.screen();
            if s.contains(pat) {
                return s;
            }
            if Instant::now() > end {
                panic!("timed out waiting for {pat:?} on the screen:\n{}", tail(&s));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `cmd` in the guest shell and returns what it printed, after a
    /// fresh marker. The marker is computed by the shell (`$((n+0))`), so the
    /// typed command line never matches it; and the answer must come from
    /// the guest (whose sessions get `IN_GUEST=yes`), not from the pane's
    /// own shell after a session died.
    fn ask(&mut self, cmd: &str) -> String {
        self.seq += 1;
        let n = self.seq;
        self.line(&format!(
            "echo \"@@{n}$((0))=${{IN_GUEST:-host}}|$({cmd})@@\""
        ));
        let pat = format!("@@{n}0=");
        let s = self.wait_screen(&pat, T);
        let from = s.rfind(&pat).unwrap() + pat.len();
        let rest = &s[from..];
        let end = rest.find("@@").unwrap_or(rest.len());
        let answer = rest[..end].trim();
        match answer.strip_prefix("yes|") {
            Some(a) => a.trim().to_string(),
            None => {
                panic!(
                    "{cmd:?} was answered by the host, not the guest: the session ended:\n{}",
                    tail(&s)
                )
            }
        }
    }

    fn resize(&self, rows: u16, cols: u16) {
        self.tmux(&[
            "resize-window",
            "-t",
            "t",
            "-x",
            &cols.to_string(),
            "-y",
            &rows.to_string(),
        ]);
    }

    /// The pid of the pane's shell.
    fn pane_pid(&self) -> u32 {
        self.tmux(&["display-message", "-p", "-t", "t", "#{pane_pid}"])
            .trim()
            .parse()
            .unwrap()
    }

    /// The `capsa` process running in the pane (a child of its shell).
    fn capsa_pid(&self) -> u32 {
        let shell = self.pane_pid();
        let end = Instant::now() + T;
        loop {
            for e in std::fs::read_dir("/proc").unwrap().flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                    continue;
                };
                let Some((comm, rest)) = stat.split_once(") ") else {
                    continue;
                };
                let ppid = rest.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok());
                if comm.ends_with("(capsa") && ppid == Some(shell) {
                    return pid;
                }
            }
            assert!(Instant::now() < end, "no capsa process in the pane");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs a capsa command line in the pane, recording the terminal mode
    /// before and after and the exit code (read with [`finished`](Self::finished)).
    fn start_capsa(&self, args: &str) {
        // Marks the guest side for `ask` (after `-it`, before NAME or `--`).
        let args = args.replacen("-it ", "-it -e IN_GUEST=yes ", 1);
        let d = self.dir.display();
        let _ = std::fs::remove_file(self.dir.join("rc"));
        // A clean screen, so that waits see only this session.
        self.line("printf '\\033[H\\033[2J'");
        std::thread::sleep(Duration::from_millis(300));
        self.tmux(&["clear-history", "-t", "t"]);
        self.line(&format!(
            "stty -g > {d}/before; {} {args}; echo $? > {d}/rc.tmp; stty -g > {d}/after; mv {d}/rc.tmp {d}/rc",
            capsa_bin()
        ));
    }

    /// Waits for the capsa started by [`start_capsa`](Self::start_capsa) to
    /// end; returns its exit code, after checking the terminal mode came back.
    fn finished(&self) -> i32 {
        let rc = self.dir.join("rc");
        let end = Instant::now() + T;
        while !rc.exists() {
            assert!(
                Instant::now() < end,
                "capsa did not end; screen:\n{}",
                tail(&self.screen())
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let before = std::fs::read_to_string(self.dir.join("before")).unwrap();
        let after = std::fs::read_to_string(self.dir.join("after")).unwrap();
        assert_eq!(
            before, after,
            "the terminal mode (stty -g) changed across capsa"
        );
        std::fs::read_to_string(rc).unwrap().trim().parse().unwrap()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .status();
    }
}

/// The last 60 lines of a screen dump (the history may hold a 100 KiB paste).
fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

fn hangup(pid: u32) {
    signal(pid, libc::SIGHUP);
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: signalling a process this test started (through tmux).
    unsafe { libc::kill(pid as i32, sig) };
}

/// 100 KiB of numbered lines (what a big paste looks like).
fn paste_text() -> Vec<u8> {
    let mut v = Vec::new();
    let mut i = 0;
    while v.len() < 100 * 1024 {
        v.extend_from_slice(
            format!("{i:06} the quick brown fox jumps over the lazy dog {i:06}\n").as_bytes(),
        );
        i += 1;
    }
    v.truncate(100 * 1024 - 1);
    v.push(b'\n');
    v
}

fn sha256_hex(data: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    std::fs::write(&p, data).unwrap();
    let o = Command::new("sha256sum").arg(&p).output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Everything an interactive shell session must survive, typed into a guest
/// `sh` on a PTY (the session is at its prompt on entry and on return):
/// three resizes (each read back with `stty size`), `vi` writing a file after
/// a resize, a 100 KiB paste into `cat > file`, Ctrl-C, Ctrl-\ and Ctrl-Z to
/// `sleep` (checked from outside with `side`, which runs a command in the
/// sandbox).
fn exercise_shell(t: &mut Tmux, side: &dyn Fn(&str) -> String) {
    for (rows, cols) in [(40, 120), (25, 70), (50, 160)] {
        t.resize(rows, cols);
        // SIGWINCH reaches capsa at once; give the resize frame a moment.
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let got = t.ask("stty size");
            if got == format!("{rows} {cols}") {
                break;
            }
            assert!(
                Instant::now() < end,
                "stty size says {got:?} after resizing to {rows}x{cols}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    // A full-screen program after the resize, then its file.
    t.line("vi /tmp/vi.txt");
    // vi is up when it has drawn its empty-line markers.
    let end = Instant::now() + T;
    while t.screen().lines().filter(|l| l.trim() == "~").count() < 5 {
        assert!(
            Instant::now() < end,
            "vi did not start:\n{}",
            tail(&t.screen())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    t.resize(35, 100);
    std::thread::sleep(Duration::from_millis(500));
    // Paced like a person: vi tells Escape from an escape sequence by time,
    // so Escape is repeated until the status line leaves insert mode ("I ").
    t.keys(&["i"]);
    std::thread::sleep(Duration::from_millis(300));
    t.keys(&["-l", "written by vi"]);
    let end = Instant::now() + T;
    loop {
        std::thread::sleep(Duration::from_millis(400));
        t.keys(&["Escape"]);
        std::thread::sleep(Duration::from_millis(400));
        let s = t.screen();
        let status = s.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
        if s.contains("written by vi") && !status.starts_with("I ") {
            break;
        }
        assert!(
            Instant::now() < end,
            "vi stays in insert mode:\n{}",
            tail(&s)
        );
    }
    t.keys(&["-l", ":wq"]);
    std::thread::sleep(Duration::from_millis(300));
    t.keys(&["Enter"]);
    assert_eq!(t.ask("cat /tmp/vi.txt"), "written by vi");
    assert_eq!(t.ask("stty size"), "35 100");

    // A big paste arrives intact and in order.
    let text = paste_text();
    let file = t.dir.join("paste.txt");
    std::fs::write(&file, &text).unwrap();
    t.line("cat > /tmp/paste.txt");
    std::thread::sleep(Duration::from_millis(500));
    t.tmux(&["load-buffer", "-b", "p", file.to_str().unwrap()]);
    t.tmux(&["paste-buffer", "-b", "p", "-t", "t"]);
    // cat ends at ^D on an empty line, once everything was read.
    t.keys(&["C-d"]);
    let sum = t.ask("sha256sum < /tmp/paste.txt | cut -d' ' -f1");
    assert_eq!(
        sum,
        sha256_hex(&text),
        "the pasted file differs ({} bytes in the guest)",
        t.ask("wc -c < /tmp/paste.txt")
    );
    t.tmux(&["clear-history", "-t", "t"]);

    // Ctrl-C and Ctrl-\ reach the foreground program through the PTY.
    for (key, sig) in [("\u{3}", 2), ("\u{1c}", 3)] {
        t.line("sleep 1000");
        let end = Instant::now() + T;
        while side("ps | grep '[s]leep [0-9]' || true").is_empty() {
            assert!(Instant::now() < end, "sleep did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
        t.tmux(&["send-keys", "-t", "t", "-l", key]);
        assert_eq!(t.ask("echo $?"), (128 + sig).to_string(), "{key:?}");
        assert_eq!(
            side("ps | grep '[s]leep [0-9]' || true"),
            "",
            "{key:?} left sleep running"
        );
    }
    // Ctrl-Z stops it (the guest shell has job control on the PTY).
    t.line("sleep 1000");
    let end = Instant::now() + T;
    while side("ps | grep '[s]leep [0-9]' || true").is_empty() {
        assert!(Instant::now() < end, "sleep did not start");
        std::thread::sleep(Duration::from_millis(200));
    }
    t.tmux(&["send-keys", "-t", "t", "-l", "\u{1a}"]);
    assert_eq!(t.ask("echo $?"), "148", "Ctrl-Z");
    assert!(t.ask("jobs").contains("Stopped"), "Ctrl-Z");
    // The shell must have seen the job die before the session ends (an
    // `exit` or ^D with a job it still thinks stopped is refused); until it
    // reaps it, the job is a zombie `[sleep]`, which the checks do not match.
    t.line("kill -9 %1");
    let end = Instant::now() + T;
    while !t.ask("jobs").is_empty() {
        assert!(Instant::now() < end, "the stopped job stays");
        std::thread::sleep(Duration::from_millis(200));
    }
    let end = Instant::now() + T;
    while !side("ps | grep '[s]leep [0-9]' || true").is_empty() {
        assert!(
            Instant::now() < end,
            "the stopped sleep was not killed: {}\n{}",
            side("ps"),
            tail(&t.screen())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The SIGHUP of a closed terminal (or a SIGTERM): start `sleep 2000` in the
/// shell, signal the CLI; it ends with 128+N, the terminal mode is back, and
/// nothing of the session is left in the guest.
fn hangup_leaves_nothing(t: &mut Tmux, side: &dyn Fn(&str) -> String, sig: i32) {
    t.line("sleep 2000");
    let end = Instant::now() + T;
    while side("ps | grep '[s]leep [0-9]' || true").is_empty() {
        assert!(Instant::now() < end, "sleep 2000 did not start");
        std::thread::sleep(Duration::from_millis(200));
    }
    signal(t.capsa_pid(), sig);
    assert_eq!(t.finished(), 128 + sig);
    let end = Instant::now() + Duration::from_secs(10);
    while !side("ps | grep '[s]leep [0-9]' || true").is_empty() {
        assert!(
            Instant::now() < end,
            "the guest program outlived the CLI's signal {sig}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Attach: a resize neither ends the session nor is typed into the console;
/// the CLI says once that a serial console has no window size. Ctrl-]
/// detaches with the terminal mode restored.
fn attach_survives_resize(t: &mut Tmux, args: &str) {
    t.start_capsa(args);
    t.wait_screen("Ctrl-] detaches", T);
    t.resize(33, 99);
    t.wait_screen("serial console has no window size", T);
    t.resize(31, 97);
    std::thread::sleep(Duration::from_millis(300));
    let s = t.screen();
    assert_eq!(
        s.matches("serial console has no window size").count(),
        1,
        "the notice comes once:\n{}",
        tail(&s)
    );
    t.tmux(&["send-keys", "-t", "t", "-l", "\u{1d}"]);
    assert_eq!(t.finished(), 0);
    t.wait_screen("detached from", T);
}

struct StateDir {
    dir: tempfile::TempDir,
}

impl StateDir {
    fn new(prefix: &str) -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix(prefix)
                .tempdir_in("/tmp")
                .unwrap(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn capsa(&self) -> Command {
        let mut c = Command::new(capsa_bin());
        c.env("CAPSA_STATE_DIR", self.path())
            .env("CAPSA_SNAPSHOT_DIR", self.path().join("snaps"))
            .env_remove("CAPSA_HOST")
            .stdin(Stdio::null());
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.capsa().args(args).output().unwrap();
        assert!(
            o.status.success(),
            "capsa {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("CAPSA_STATE_DIR", self.path().display().to_string()),
            (
                "CAPSA_SNAPSHOT_DIR",
                self.path().join("snaps").display().to_string(),
            ),
        ]
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        if let Ok(rd) = std::fs::read_dir(self.path().join("sandboxes")) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                let _ = self.capsa().args(["rm", "-f", &n]).output();
            }
        }
    }
}

/// Processes whose command line mentions `needle` (QEMU gets `process=capsa-<name>`).
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(needle) && pid != std::process::id() {
                out.push(pid);
            }
        }
    }
    out
}

#[test]
fn tty_is_refused_without_a_terminal_unless_forced() {
    for args in [
        &["run", "-it", "--", "sh"][..],
        &["exec", "-t", "no-such-box", "--", "sh"][..],
    ] {
        let o = Command::new(capsa_bin())
            .args(args)
            .env("CAPSA_STATE_DIR", "/nonexistent-capsa-state")
            .env_remove("CAPSA_HOST")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("the input device is not a TTY") && err.contains("--force-tty"),
            "{args:?}: {err}"
        );
    }
    // Forced, the refusal is gone (the missing sandbox is the next problem).
    let o = Command::new(capsa_bin())
        .args(["exec", "--force-tty", "no-such-box", "--", "sh"])
        .env("CAPSA_STATE_DIR", "/nonexistent-capsa-state")
        .env_remove("CAPSA_HOST")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("not a TTY"), "{err}");
}

#[test]
fn run_exec_and_attach_in_a_real_terminal() {
    let st = StateDir::new("ct");
    let mut t = Tmux::start(st.path(), &st.env());

    // `run -it`: three resizes, then the terminal closes: the CLI ends with
    // 129 and takes the sandbox (its QEMU) with it.
    let name = format!("tty-run-{}", std::process::id());
    t.start_capsa(&format!("run -it --name {name} --memory 256M -- sh"));
    t.wait_screen("# ", T);
    for (rows, cols) in [(40, 120), (25, 70), (45, 150)] {
        t.resize(rows, cols);
        let end = Instant::now() + Duration::from_secs(30);
        while t.ask("stty size") != format!("{rows} {cols}") {
            assert!(Instant::now() < end, "stty size after {rows}x{cols}");
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    assert_eq!(processes_mentioning(&format!("capsa-{name}")).len(), 1);
    hangup(t.capsa_pid());
    assert_eq!(t.finished(), 129);
    let end = Instant::now() + Duration::from_secs(15);
    while !processes_mentioning(&format!("capsa-{name}")).is_empty() {
        assert!(Instant::now() < end, "QEMU outlived the CLI's SIGHUP");
        std::thread::sleep(Duration::from_millis(100));
    }

    // `exec -it` into one named sandbox for the rest.
    st.ok(&["create", "--name", "box", "--memory", "256M"]);
    let side = |cmd: &str| st.ok(&["exec", "box", "--", "sh", "-c", cmd]);
    t.start_capsa("exec -it box -- sh");
    t.wait_screen("# ", T);
    exercise_shell(&mut t, &side);
    // The program's exit code passes through.
    t.line("exit 3");
    assert_eq!(t.finished(), 3);

    t.start_capsa("exec -it box -- sh");
    hangup_leaves_nothing(&mut t, &side, libc::SIGHUP);
    t.start_capsa("exec -it box -- sh");
    hangup_leaves_nothing(&mut t, &side, libc::SIGTERM);

    attach_survives_resize(&mut t, "attach box");
}

/// Stops the daemon when the test ends, however it ends.
struct Daemon {
    child: Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        common::stop_child(&mut self.child);
    }
}

#[test]
fn exec_and_attach_through_capsad_in_a_real_terminal() {
    let st = StateDir::new("cd");
    let sock = st.path().join("capsad.sock");
    let _daemon = Daemon {
        child: common::spawn_capsad(st.path(), &st.path().join("dsnaps"), &[]),
    };
    let host = format!("unix://{}", sock.display());
    let mut env = st.env();
    env.push(("CAPSA_HOST", host.clone()));
    let mut t = Tmux::start(st.path(), &env);
    let remote = |args: &[&str]| {
        let o = st
            .capsa()
            .arg("--host")
            .arg(&host)
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "capsa --host {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    // A missing sandbox is named in the error of both WebSockets.
    for args in [
        &["exec", "--force-tty", "nope", "--", "sh"][..],
        &["attach", "nope"],
    ] {
        let o = st
            .capsa()
            .arg("--host")
            .arg(&host)
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("nope") && err.contains("fix:"),
            "{args:?}: {err}"
        );
    }
    remote(&["create", "--name", "rbox", "--memory", "256M"]);
    let side = |cmd: &str| remote(&["exec", "rbox", "--", "sh", "-c", cmd]);

    t.start_capsa("exec -it rbox -- sh");
    t.wait_screen("# ", T);
    exercise_shell(&mut t, &side);
    // Ctrl-D ends the shell; its exit code passes through.
    t.line("false");
    t.keys(&["C-d"]);
    assert_eq!(t.finished(), 1);

    t.start_capsa("exec -it rbox -- sh");
    hangup_leaves_nothing(&mut t, &side, libc::SIGHUP);
    t.start_capsa("exec -it rbox -- sh");
    hangup_leaves_nothing(&mut t, &side, libc::SIGTERM);

    attach_survives_resize(&mut t, "attach rbox");
}
