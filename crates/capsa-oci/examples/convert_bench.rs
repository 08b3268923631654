//! Measures unpack + conversion of one image to ext4, EROFS and EROFS-lz4hc.
//!
//! `cargo run --release -p capsa-oci --example convert_bench -- [--files N] [--from-dir DIR] [--runs R]`
//!
//! The image has one gzip layer: either N generated files (mixed text-like and random content,
//! sizes 100 B to 256 KiB, plus symlinks and hardlinks) or a host directory tree.

use std::io::Write;
use std::time::Instant;

use capsa_oci::{FsFormat, Limits, Store};
use sha2::Digest as _;

fn sha_hex(d: &[u8]) -> String {
    sha2::Sha256::digest(d)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn generated_layer(n: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let words = [
        "import", "def", "return", "self", "class", "lambda", "for", "in", "print", "value",
    ];
    for i in 0..n {
        let dir = format!("usr/lib/gen/d{:03}", i % 200);
        let size = (100f64 * (2621.44f64).powf((rnd() % 1000) as f64 / 1000.0)) as usize;
        let mut data = Vec::with_capacity(size);
        if i % 2 == 0 {
            while data.len() < size {
                data.extend_from_slice(words[(rnd() % 10) as usize].as_bytes());
                data.push(if rnd() % 8 == 0 { b'\n' } else { b' ' });
            }
            data.truncate(size);
        } else {
            while data.len() < size {
                data.extend_from_slice(&rnd().to_le_bytes());
            }
            data.truncate(size);
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(1_600_000_000);
        b.append_data(&mut h, format!("{dir}/f{i}.py"), &data[..])
            .unwrap();
        if i % 10 == 0 {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_mtime(1_600_000_000);
            h.set_size(0);
            h.set_mode(0o777);
            b.append_link(&mut h, format!("{dir}/l{i}"), format!("f{i}.py"))
                .unwrap();
        }
        if i % 40 == 0 {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Link);
            h.set_mtime(1_600_000_000);
            h.set_size(0);
            h.set_mode(0o777);
            b.append_link(&mut h, format!("{dir}/h{i}"), format!("{dir}/f{i}.py"))
                .unwrap();
        }
    }
    b.into_inner().unwrap()
}

fn dir_layer(dir: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all("tree", dir).unwrap();
    b.into_inner().unwrap()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    let get = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let files: usize = get("--files").and_then(|s| s.parse().ok()).unwrap_or(5000);
    let runs: usize = get("--runs").and_then(|s| s.parse().ok()).unwrap_or(5);
    let tar = match get("--from-dir") {
        Some(d) => dir_layer(&d),
        None => generated_layer(files),
    };
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();

    let base = std::env::var_os("BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::tempdir_in(base).unwrap();
    let layout = tmp.path().join("layout");
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    let put = |d: &[u8]| {
        let h = sha_hex(d);
        std::fs::write(layout.join("blobs/sha256").join(&h), d).unwrap();
        (format!("sha256:{h}"), d.len())
    };
    let (ld, ls) = put(&gz);
    let cfg = serde_json::json!({"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[format!("sha256:{}", sha_hex(&tar))]}});
    let (cd, cs) = put(&serde_json::to_vec(&cfg).unwrap());
    let m = serde_json::json!({"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
        "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":cd,"size":cs},
        "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":ld,"size":ls}]});
    let (md, ms) = put(&serde_json::to_vec(&m).unwrap());
    let idx = serde_json::json!({"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":md,"size":ms}]});
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&idx).unwrap()).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();

    let store = Store::open(tmp.path().join("store")).unwrap();
    let t = Instant::now();
    let rec = store.load(&layout).unwrap().remove(0);
    let load_s = t.elapsed().as_secs_f64();
    println!(
        "image: {:.1} MB tar, {:.1} MB gzip; load (verify + store) {:.2} s",
        tar.len() as f64 / 1e6,
        gz.len() as f64 / 1e6,
        load_s
    );

    let mut stage_times = Vec::new();
    let mut entries = 0;
    for _ in 0..runs {
        let d = tempfile::tempdir_in(store.root().join("tmp")).unwrap();
        let t = Instant::now();
        let r = store.stage(&rec, d.path(), Limits::default()).unwrap();
        stage_times.push(t.elapsed().as_secs_f64());
        entries = r.entries;
    }
    println!(
        "unpack only: {entries} entries, median {:.2} s over {runs} runs",
        median(stage_times)
    );

    let formats: Vec<FsFormat> = match get("--formats") {
        Some(f) => f.split(',').filter_map(FsFormat::parse).collect(),
        None => vec![FsFormat::Ext4, FsFormat::Erofs, FsFormat::ErofsLz4hc],
    };
    for format in formats {
        let mut times = Vec::new();
        let mut sizes = (0, 0);
        let mut first: Option<Vec<u8>> = None;
        let mut identical = true;
        for _ in 0..runs {
            let _ = std::fs::remove_file(store.rootfs_path(&rec, format));
            let t = Instant::now();
            let r = store.rootfs(&rec, format, Limits::default()).unwrap();
            times.push(t.elapsed().as_secs_f64());
            sizes = (r.image.size, r.image.allocated);
            let bytes = std::fs::read(&r.image.path).unwrap();
            match &first {
                None => first = Some(bytes),
                Some(f) => {
                    if *f != bytes && std::env::var_os("BENCH_KEEP").is_some() {
                        std::fs::write(format!("/tmp/bench-a.{}", format.ext()), f).unwrap();
                        std::fs::write(format!("/tmp/bench-b.{}", format.ext()), &bytes).unwrap();
                    }
                    identical &= *f == bytes
                }
            }
        }
        let t = Instant::now();
        store.rootfs(&rec, format, Limits::default()).unwrap();
        let cached = t.elapsed().as_secs_f64();
        println!(
            "{:<12} unpack+convert median {:.2} s (min {:.2}, max {:.2}); size {:.1} MB apparent, {:.1} MB allocated; cached {:.1} ms; identical across runs: {identical}",
            format.ext(),
            median(times.clone()),
            times.iter().cloned().fold(f64::MAX, f64::min),
            times.iter().cloned().fold(0.0, f64::max),
            sizes.0 as f64 / 1e6,
            sizes.1 as f64 / 1e6,
            cached * 1e3
        );
    }
}
