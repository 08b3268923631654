//! The public `VsockDevice` lifecycle, without a frontend.

use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use capsa_vsock::{VsockConfig, VsockDevice, VsockError};

fn config(dir: &std::path::Path) -> VsockConfig {
    VsockConfig::new(dir.join("vhost.sock"), dir.join("v.sock"))
}

#[test]
fn spawn_shutdown_join_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let dev = VsockDevice::spawn(cfg.clone()).unwrap();
    assert!(cfg.vhost_socket.exists() && cfg.uds_path.exists());
    assert_eq!(dev.stats().connections, 0);
    let t = Instant::now();
    dev.shutdown();
    dev.join().unwrap();
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(!cfg.vhost_socket.exists() && !cfg.uds_path.exists());
}

#[test]
fn drop_stops_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    drop(VsockDevice::spawn(cfg.clone()).unwrap());
    assert!(!cfg.uds_path.exists());
    // The paths are free again.
    drop(VsockDevice::spawn(cfg).unwrap());
}

#[test]
fn live_socket_is_not_stolen_but_stale_one_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let first = VsockDevice::spawn(cfg.clone()).unwrap();
    match VsockDevice::spawn(cfg.clone()) {
        Err(VsockError::SocketInUse { path }) => assert_eq!(path, cfg.uds_path),
        other => panic!("expected SocketInUse, got {:?}", other.err()),
    }
    drop(first);

    // A socket file whose listener is gone (crashed process).
    let l = UnixListener::bind(&cfg.uds_path).unwrap();
    drop(l);
    assert!(cfg.uds_path.exists());
    drop(VsockDevice::spawn(cfg).unwrap());
}

#[test]
fn non_socket_file_is_never_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    std::fs::write(&cfg.uds_path, b"precious").unwrap();
    let err = VsockDevice::spawn(cfg.clone()).err().unwrap();
    assert!(matches!(err, VsockError::NotASocket { .. }), "{err}");
    assert!(err.to_string().contains("remove it or choose another path"));
    assert_eq!(std::fs::read(&cfg.uds_path).unwrap(), b"precious");
}

#[test]
fn invalid_configs_name_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.guest_cid = 1;
    let err = VsockDevice::spawn(cfg).err().unwrap();
    assert!(err.to_string().contains("use a value between 3"), "{err}");

    let mut cfg = config(dir.path());
    cfg.uds_path = dir.path().join("x".repeat(120));
    let err = VsockDevice::spawn(cfg).err().unwrap();
    assert!(err.to_string().contains("shorter"), "{err}");

    let mut cfg = config(dir.path());
    cfg.limits.max_connections = 0;
    assert!(VsockDevice::spawn(cfg).is_err());

    let mut cfg = config(dir.path());
    cfg.vhost_socket = dir.path().join("missing-dir/vhost.sock");
    let err = VsockDevice::spawn(cfg.clone()).err().unwrap();
    assert!(matches!(err, VsockError::Bind { .. }), "{err}");
    assert!(!cfg.uds_path.exists(), "partial spawn cleaned up");
}
