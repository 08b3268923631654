//! Warm pools and named snapshots through the API, on real VMs: acquire is a
//! handover (exec works at once), the pool refills, released members are
//! destroyed, nothing leaks, a restarted daemon re-adopts ready members; and
//! snapshot create/list/restore/delete. Plus a bad-input case per endpoint.

mod common;

use std::time::{Duration, Instant};

use capsa_client::{Client, ClientError};
use capsad::api::{CreatePoolRequest, CreateSandboxRequest, ExecRequest, PoolInfo};
use hyper::{Method, StatusCode};

fn argv(a: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: a.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

async fn sh(c: &Client, name: &str, script: &str) -> String {
    let out = c
        .exec_output(name, &argv(&["sh", "-c", script]))
        .await
        .expect("exec");
    assert_eq!(
        out.code,
        Some(0),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn wait_pool(c: &Client, name: &str, ready: usize, secs: u64) -> PoolInfo {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let p = c.pool(name).await.expect("pool");
        if p.ready == ready && p.starting == 0 {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "pool never reached {ready}: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Asserts an API error's status and code, and that it carries a fix.
fn api_err(e: ClientError, status: u16, code: &str) {
    match e {
        ClientError::Api { status: s, detail } => {
            assert_eq!(s.as_u16(), status, "{detail:?}");
            assert_eq!(
                serde_json::to_value(detail.code).unwrap(),
                serde_json::json!(code),
                "{detail:?}"
            );
            if status == 400 || status == 409 || status == 404 {
                assert!(detail.fix.is_some(), "no fix: {detail:?}");
            }
        }
        other => panic!("expected {status} {code}, got {other:?}"),
    }
}

fn members(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("sandboxes"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn vm_processes(dir: &std::path::Path) -> Vec<(u32, String)> {
    common::processes_mentioning(&dir.join("sandboxes").display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_acquire_refill_release_and_restart() {
    let mut d = common::Daemon::start();
    let c = d.client();

    // Bad input first: nothing is created.
    let bad = |size| CreatePoolRequest {
        name: "p".into(),
        size,
        ..Default::default()
    };
    api_err(
        c.create_pool(&bad(0)).await.unwrap_err(),
        400,
        "bad_request",
    );
    api_err(
        c.create_pool(&bad(1000)).await.unwrap_err(),
        400,
        "bad_request",
    );
    let mut long = bad(1);
    long.name = "x".repeat(60);
    api_err(c.create_pool(&long).await.unwrap_err(), 400, "invalid_name");
    let mut snap = bad(1);
    snap.snapshot = Some("nope".into());
    api_err(c.create_pool(&snap).await.unwrap_err(), 404, "not_found");
    api_err(c.pool("nope").await.unwrap_err(), 404, "not_found");
    api_err(c.acquire("nope", None).await.unwrap_err(), 404, "not_found");
    api_err(c.delete_pool("nope").await.unwrap_err(), 404, "not_found");
    let (st, _) = c
        .raw(Method::POST, "/v1/pools/Bad..Name/acquire", None, "")
        .await
        .unwrap();
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(c.pools().await.unwrap().is_empty());

    let req = CreatePoolRequest {
        name: "p".into(),
        size: 2,
        memory_mib: Some(256),
        ..Default::default()
    };
    let p = c.create_pool(&req).await.unwrap();
    assert_eq!((p.name.as_str(), p.size), ("p", 2));
    api_err(c.create_pool(&req).await.unwrap_err(), 409, "conflict");
    // All pools together stay under --max-pool-members (default 16).
    let mut big = bad(15);
    big.name = "big".into();
    match c.create_pool(&big).await.unwrap_err() {
        ClientError::Api { status, detail } => {
            assert_eq!(status.as_u16(), 409, "{detail:?}");
            assert!(detail.message.contains("pool members"), "{detail:?}");
            assert!(detail.fix.unwrap().contains("--max-pool-members"));
        }
        other => panic!("{other:?}"),
    }
    let (st, body) = c
        .raw(
            Method::POST,
            "/v1/pools/p/acquire",
            Some("application/json"),
            "{\"nme\":1}",
        )
        .await
        .unwrap();
    assert_eq!(st, StatusCode::BAD_REQUEST, "{body:?}");

    // First fill includes the base snapshot (one cold boot, unless cached).
    let p = wait_pool(&c, "p", 2, 400).await;
    assert_eq!(p.status, "ready");
    let ps = c.list().await.unwrap();
    assert_eq!(ps.len(), 2, "{ps:?}");
    assert!(ps
        .iter()
        .all(|s| s.pool.as_deref() == Some("p") && s.pool_state.as_deref() == Some("ready")));

    let mut acquire_ms = Vec::new();
    let mut first_exec_ms = Vec::new();
    let mut hostnames = Vec::new();
    let cycles = 3;
    for i in 0..cycles {
        let t = Instant::now();
        let sb = c.acquire("p", None).await.unwrap();
        acquire_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(sb.name.starts_with("p-"), "{}", sb.name);
        assert_eq!(sb.pool_state.as_deref(), Some("acquired"));
        let out = c.exec_output(&sb.name, &argv(&["hostname"])).await.unwrap();
        first_exec_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(out.code, Some(0));
        hostnames.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
        let p = c.pool("p").await.unwrap();
        assert_eq!(p.acquired_total, i + 1);
        c.delete(&sb.name, true).await.unwrap();
        api_err(c.get(&sb.name).await.unwrap_err(), 404, "not_found");
        wait_pool(&c, "p", 2, 300).await;
    }
    eprintln!("pool acquire through the API (ms): {acquire_ms:.1?}");
    eprintln!("pool acquire + first exec (ms): {first_exec_ms:.1?}");
    hostnames.sort();
    hostnames.dedup();
    assert_eq!(hostnames.len(), cycles as usize, "clones are not twins");
    let p = c.pool("p").await.unwrap();
    assert_eq!(p.acquired_total, cycles);
    assert!(p.restored_total >= 2 + cycles, "{p:?}");
    // Exactly the two ready members remain: nothing leaked.
    assert_eq!(members(&d.dir).len(), 2, "{:?}", members(&d.dir));
    assert_eq!(
        vm_processes(&d.dir)
            .iter()
            .filter(|(_, c)| c.contains("capsa-vmm"))
            .count(),
        2,
        "{:#?}",
        vm_processes(&d.dir)
    );

    // Acquire under a requested name: restored fresh, the pool stays full.
    let named = c.acquire("p", Some("mine")).await.unwrap();
    assert_eq!(named.name, "mine");
    assert_eq!(sh(&c, "mine", "echo ok").await, "ok\n");
    api_err(
        c.acquire("p", Some("mine")).await.unwrap_err(),
        409,
        "conflict",
    );
    c.delete("mine", true).await.unwrap();

    // A daemon restart (kill -9) keeps the pool and adopts its ready members.
    let before = members(&d.dir);
    let tmp = d.take_tmp();
    d.kill9();
    let mut d = common::Daemon::start_on(&d.dir.clone(), &[]);
    if let Some(t) = tmp {
        d.set_tmp(t);
    }
    let c = d.client();
    let p = c.pool("p").await.unwrap();
    assert_eq!(p.ready, 2, "adopted at once: {p:?}");
    assert_eq!(p.restored_total, 0, "{p:?}");
    assert_eq!(members(&d.dir), before);
    let t = Instant::now();
    let sb = c.acquire("p", None).await.unwrap();
    let adopted_ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(sh(&c, &sb.name, "echo adopted").await, "adopted\n");
    eprintln!("acquire of an adopted member (ms): {adopted_ms:.1}");
    c.delete(&sb.name, true).await.unwrap();

    // Deleting the pool destroys its idle members; nothing is left.
    c.delete_pool("p").await.unwrap();
    api_err(c.pool("p").await.unwrap_err(), 404, "not_found");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(members(&d.dir).is_empty() && vm_processes(&d.dir).is_empty()) {
        assert!(
            Instant::now() < deadline,
            "left: {:?} {:#?}",
            members(&d.dir),
            vm_processes(&d.dir)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(c.list().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_endpoints_and_restore() {
    let d = common::Daemon::start();
    let c = d.client();
    c.create(&CreateSandboxRequest {
        name: Some("src".into()),
        memory_mib: Some(256),
        start: true,
        ..Default::default()
    })
    .await
    .unwrap();
    sh(&c, "src", "echo kept > /root/marker; sync").await;
    let src_host = sh(&c, "src", "hostname").await;

    // Bad input.
    let (st, _) = c
        .raw(
            Method::POST,
            "/v1/sandboxes/src/snapshot",
            Some("application/json"),
            "{\"snapshot\":\"../x\"}",
        )
        .await
        .unwrap();
    assert_eq!(st, StatusCode::BAD_REQUEST);
    api_err(
        c.snapshot("ghost", "s1").await.unwrap_err(),
        404,
        "not_found",
    );
    api_err(
        c.delete_snapshot("ghost").await.unwrap_err(),
        404,
        "not_found",
    );

    let t = Instant::now();
    let s = c.snapshot("src", "s1").await.unwrap();
    eprintln!("snapshot of a 256 MiB sandbox: {:?}", t.elapsed());
    assert_eq!(s.name, "s1");
    assert_eq!(s.source.as_deref(), Some("src"));
    assert!(s.size_bytes > 0);
    api_err(c.snapshot("src", "s1").await.unwrap_err(), 409, "conflict");
    let list = c.snapshots().await.unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].memory_mib, Some(256));
    // The source keeps running.
    assert_eq!(sh(&c, "src", "echo alive").await, "alive\n");

    let from = |name: &str, snap: &str| CreateSandboxRequest {
        name: Some(name.into()),
        from_snapshot: Some(snap.into()),
        start: true,
        ..Default::default()
    };
    let mut conflicting = from("c2", "s1");
    conflicting.cpus = Some(2);
    api_err(
        c.create(&conflicting).await.unwrap_err(),
        400,
        "bad_request",
    );
    api_err(
        c.create(&from("c2", "ghost")).await.unwrap_err(),
        404,
        "not_found",
    );

    let t = Instant::now();
    c.create(&from("clone", "s1")).await.unwrap();
    eprintln!("create from snapshot: {:?}", t.elapsed());
    assert_eq!(sh(&c, "clone", "cat /root/marker").await, "kept\n");
    let clone_host = sh(&c, "clone", "hostname").await;
    assert_ne!(clone_host, src_host, "a clone gets a fresh identity");

    // A pool from the named snapshot pins it.
    c.create_pool(&CreatePoolRequest {
        name: "sp".into(),
        size: 1,
        snapshot: Some("s1".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    api_err(c.delete_snapshot("s1").await.unwrap_err(), 409, "conflict");
    wait_pool(&c, "sp", 1, 300).await;
    let m = c.acquire("sp", None).await.unwrap();
    assert_eq!(sh(&c, &m.name, "cat /root/marker").await, "kept\n");
    c.delete(&m.name, true).await.unwrap();
    c.delete_pool("sp").await.unwrap();

    c.delete_snapshot("s1").await.unwrap();
    assert!(c.snapshots().await.unwrap().is_empty());
    assert!(!d.dir.join("snapshots/s1").exists());
    for n in ["src", "clone"] {
        c.delete(n, true).await.unwrap();
    }
}

/// A share attached through the API to a sandbox acquired from a pool (a
/// restored VM: the share is hot-plugged), refused outside the allow-list,
/// and a snapshot refused while it is attached, with the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_on_an_acquired_pool_member() {
    let tmp = tempfile::Builder::new()
        .prefix("cd")
        .tempdir_in("/tmp")
        .unwrap();
    let allowed = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let dir = allowed.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("in.txt"), b"pooled").unwrap();
    let allow = allowed.path().display().to_string();
    let mut d = common::Daemon::start_on(tmp.path(), &["--allow-disk-dir", &allow]);
    d.set_tmp(tmp);
    let c = d.client();
    c.create_pool(&CreatePoolRequest {
        name: "sp".into(),
        size: 1,
        memory_mib: Some(256),
        ..Default::default()
    })
    .await
    .unwrap();
    wait_pool(&c, "sp", 1, 300).await;
    let m = c.acquire("sp", None).await.unwrap();
    let share = |host: String, guest: &str| capsad::api::ShareRequest {
        host,
        guest: guest.into(),
        read_only: false,
    };
    api_err(
        c.share_add(&m.name, &share(outside.path().display().to_string(), "/x"))
            .await
            .unwrap_err(),
        403,
        "path_not_allowed",
    );
    api_err(
        c.share_add(&m.name, &share(dir.display().to_string(), "x/.."))
            .await
            .unwrap_err(),
        400,
        "bad_request",
    );
    let t = Instant::now();
    let l = c
        .share_add(&m.name, &share(dir.display().to_string(), "/data"))
        .await
        .expect("share on an acquired member");
    eprintln!("share through the API on a pool member: {:?}", t.elapsed());
    assert_eq!(l.len(), 1);
    assert_eq!(
        sh(&c, &m.name, "cat /data/in.txt; echo out > /data/out.txt").await,
        "pooled"
    );
    assert_eq!(std::fs::read(dir.join("out.txt")).unwrap(), b"out\n");
    assert_eq!(c.shares(&m.name).await.unwrap()[0].guest, "/data");
    match c.snapshot(&m.name, "withshare").await.unwrap_err() {
        ClientError::Api { detail, .. } => {
            let all = format!("{} {}", detail.message, detail.fix.unwrap_or_default());
            assert!(
                all.contains("/data") && all.contains("capsa share rm"),
                "{all}"
            );
        }
        other => panic!("{other:?}"),
    }
    c.share_remove(&m.name, "/data").await.unwrap();
    assert!(c.shares(&m.name).await.unwrap().is_empty());
    c.snapshot(&m.name, "withoutshare")
        .await
        .expect("snapshot once detached");
    c.delete(&m.name, true).await.unwrap();
}
