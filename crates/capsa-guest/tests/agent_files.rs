//! File requests end to end: `capsa-init --agent-unix` driven by the client.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use capsa_agent_client::{AgentClientError, ErrorKind, FileKind, WriteFileRequest};
use common::{eventually, hex, random_bytes, ProcessAgent};
use sha2::{Digest, Sha256};

const T: Duration = Duration::from_secs(60);

fn wreq(path: &Path, mode: u32) -> WriteFileRequest {
    WriteFileRequest {
        path: path.to_str().unwrap().to_string(),
        mode,
        mtime: None,
        create_parents: false,
    }
}

/// Collects what it is given, hashing as it goes (never holds the content).
struct HashWriter {
    hash: Sha256,
    len: u64,
}

impl tokio::io::AsyncWrite for HashWriter {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.hash.update(buf);
        self.len += buf.len() as u64;
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_round_trip_keeps_content_mode_and_mtime() {
    let agent = ProcessAgent::start();
    let c = agent.client();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/dir/blob.bin");
    let data = random_bytes(64 << 20, 7);
    let want = hex(&Sha256::digest(&data));
    let mtime = (1_600_000_000i64, 123_456_789u32);
    let meta = c
        .write_file(
            WriteFileRequest {
                mtime: Some(mtime),
                create_parents: true,
                ..wreq(&path, 0o640)
            },
            &data[..],
            T,
        )
        .await
        .unwrap();
    assert_eq!(meta.kind, FileKind::File);
    assert_eq!(meta.size, data.len() as u64);
    assert_eq!(meta.mode, 0o640);
    assert_eq!(meta.mtime, mtime);
    // What is on disk (checked independently of the agent).
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(hex(&Sha256::digest(&on_disk)), want);
    drop(on_disk);
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
        0o640
    );

    let mut sink = HashWriter {
        hash: Sha256::new(),
        len: 0,
    };
    let meta = c
        .read_file(path.to_str().unwrap(), &mut sink, T)
        .await
        .unwrap();
    assert_eq!(sink.len, data.len() as u64);
    assert_eq!(hex(&sink.hash.finalize()), want);
    assert_eq!(
        (meta.mode, meta.mtime, meta.size),
        (0o640, mtime, data.len() as u64)
    );

    // Replacing keeps no temporary files behind.
    c.write_file(wreq(&path, 0o600), &b"small"[..], T)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"small");
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("blob.bin")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mkdir_stat_list_remove() {
    let agent = ProcessAgent::start();
    let c = agent.client();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap().to_string();
    let deep = format!("{base}/a/b/c");

    let m = c.mkdir(&deep, true, 0o750, T).await.unwrap();
    assert_eq!((m.kind, m.mode), (FileKind::Dir, 0o750));
    // mkdir -p on an existing directory is fine; plain mkdir is not.
    c.mkdir(&deep, true, 0o700, T).await.unwrap();
    let err = c.mkdir(&deep, false, 0o700, T).await.unwrap_err();
    assert_eq!(err.remote_kind(), Some(ErrorKind::AlreadyExists), "{err}");
    let err = c
        .mkdir(&format!("{base}/x/y"), false, 0o700, T)
        .await
        .unwrap_err();
    assert_eq!(err.remote_kind(), Some(ErrorKind::NotFound), "{err}");

    for name in ["zeta", "alpha", "mid"] {
        c.write_file(
            wreq(Path::new(&format!("{deep}/{name}")), 0o644),
            &b"x"[..],
            T,
        )
        .await
        .unwrap();
    }
    std::os::unix::fs::symlink("alpha", format!("{deep}/link")).unwrap();
    let entries = c.list_dir(&deep, T).await.unwrap();
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["alpha", "link", "mid", "zeta"]);
    assert_eq!(entries[1].meta.kind, FileKind::Symlink, "lstat, not stat");
    assert_eq!(entries[0].meta.size, 1);

    let st = c.stat(&format!("{deep}/link"), T).await.unwrap();
    assert_eq!(st.kind, FileKind::Symlink);

    let err = c.remove(&format!("{base}/a"), false, T).await.unwrap_err();
    assert!(err.remote_kind().is_some(), "non-empty dir: {err}");
    c.remove(&format!("{deep}/link"), false, T).await.unwrap();
    assert!(
        Path::new(&format!("{deep}/alpha")).exists(),
        "symlink target kept"
    );
    c.remove(&format!("{base}/a"), true, T).await.unwrap();
    let err = c.stat(&format!("{base}/a"), T).await.unwrap_err();
    assert_eq!(err.remote_kind(), Some(ErrorKind::NotFound));
    let err = c.remove(&format!("{base}/a"), true, T).await.unwrap_err();
    assert_eq!(err.remote_kind(), Some(ErrorKind::NotFound));
    for root in ["/", "/tmp/..", "//"] {
        let err = c.remove(root, true, T).await.unwrap_err();
        assert_eq!(err.remote_kind(), Some(ErrorKind::InvalidInput), "{root}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_directories_are_listed_in_pages() {
    let agent = ProcessAgent::start();
    let dir = tempfile::tempdir().unwrap();
    let n = capsa_proto::MAX_ITEMS + 1000;
    for i in 0..n {
        std::fs::write(dir.path().join(format!("f{i:06}")), b"").unwrap();
    }
    let entries = agent
        .client()
        .list_dir(dir.path().to_str().unwrap(), T)
        .await
        .unwrap();
    let want: Vec<String> = (0..n).map(|i| format!("f{i:06}")).collect();
    let got: Vec<String> = entries.into_iter().map(|e| e.name).collect();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_map_to_kinds() {
    let agent = ProcessAgent::start();
    let c = agent.client();
    let mut sink = Vec::new();
    let err = c
        .read_file("/no/such/file", &mut sink, T)
        .await
        .unwrap_err();
    assert_eq!(err.remote_kind(), Some(ErrorKind::NotFound), "{err}");
    let err = c.read_file("/tmp", &mut sink, T).await.unwrap_err();
    assert_eq!(err.remote_kind(), Some(ErrorKind::InvalidInput), "{err}");

    // sysfs refuses new files even to root: EACCES.
    let err = c
        .write_file(
            wreq(Path::new("/sys/capsa-agent-test"), 0o644),
            &b"x"[..],
            T,
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.remote_kind(),
        Some(ErrorKind::PermissionDenied),
        "{err}"
    );

    let err = c
        .write_file(wreq(Path::new("/no/such/dir/file"), 0o644), &b"x"[..], T)
        .await
        .unwrap_err();
    assert_eq!(err.remote_kind(), Some(ErrorKind::NotFound), "{err}");

    assert!(matches!(
        c.stat("relative/path", T).await,
        Err(AgentClientError::InvalidRequest(_))
    ));
}

/// A read-only mount (EROFS) maps to PermissionDenied. Needs mount(2)
/// rights; skipped (with a note) where the test cannot mount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_file_system_is_permission_denied() {
    let dir = tempfile::tempdir().unwrap();
    let target = std::ffi::CString::new(dir.path().to_str().unwrap()).unwrap();
    // SAFETY: valid NUL-terminated strings; a read-only tmpfs on our temp dir.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_RDONLY,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        eprintln!(
            "skipping: cannot mount a read-only tmpfs: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    struct Unmount(std::ffi::CString);
    impl Drop for Unmount {
        fn drop(&mut self) {
            // SAFETY: valid path; detaches our own mount.
            unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let _unmount = Unmount(target);
    let agent = ProcessAgent::start();
    let c = agent.client();
    let err = c
        .write_file(wreq(&dir.path().join("f"), 0o644), &b"x"[..], T)
        .await
        .unwrap_err();
    assert_eq!(
        err.remote_kind(),
        Some(ErrorKind::PermissionDenied),
        "{err}"
    );
    let err = c
        .mkdir(dir.path().join("d").to_str().unwrap(), false, 0o755, T)
        .await
        .unwrap_err();
    assert_eq!(
        err.remote_kind(),
        Some(ErrorKind::PermissionDenied),
        "{err}"
    );
}

/// A reader that yields some bytes and then never completes.
struct Stalls {
    sent: bool,
}

impl tokio::io::AsyncRead for Stalls {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.sent {
            return std::task::Poll::Pending;
        }
        self.sent = true;
        buf.put_slice(&[b'n'; 1000]);
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_upload_leaves_the_old_file_alone() {
    let agent = ProcessAgent::start();
    let c = agent.client();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    std::fs::write(&path, b"old").unwrap();
    let err = c
        .write_file(
            wreq(&path, 0o644),
            Stalls { sent: false },
            Duration::from_millis(500),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AgentClientError::Timeout {
                op: "write_file",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"old");
    assert!(
        eventually(Duration::from_secs(5), || std::fs::read_dir(dir.path())
            .unwrap()
            .count()
            == 1),
        "the temporary file was not removed"
    );
}
