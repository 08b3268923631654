//! Builds (or fetches from the cache) the default guest bundle and prints it.
//!
//! `RUST_LOG=capsa_image=debug cargo run --release -p capsa-image --example bundle -- [CACHE_DIR [MODULE...]]`

fn main() {
    tracing_subscriber_init();
    let cache_dir = std::env::args_os().nth(1).map(std::path::PathBuf::from);
    let extra_modules = std::env::args().skip(2).collect();
    let opts = capsa_image::BundleOptions {
        cache_dir,
        extra_modules,
        ..Default::default()
    };
    let start = std::time::Instant::now();
    match capsa_image::build(&opts, &capsa_image::Progress::new()) {
        Ok(b) => {
            println!("built/cached in {:?}", start.elapsed());
            println!("{b:#?}");
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

fn tracing_subscriber_init() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_timer(tracing_subscriber::fmt::time::uptime())
        .init();
}
