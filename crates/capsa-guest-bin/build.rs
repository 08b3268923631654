//! Builds `capsa-init` (crate `capsa-guest`) as a fully static binary with a
//! nested cargo, so that the host crates can embed it with `include_bytes!`.
//!
//! Why a nested cargo: the guest binary needs different flags
//! (`+crt-static`) and an explicit `--target` (so proc-macros and build
//! scripts are unaffected), which an ordinary dependency cannot have. The
//! nested build uses its own target dir inside `OUT_DIR`, so it never waits
//! for the outer build's lock.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guest architecture (capsa boots x86_64 guests).
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";
/// Name of the guest binary and of the file placed in `OUT_DIR`.
const BIN: &str = "capsa-init";

fn main() {
    if let Err(msg) = run() {
        eprintln!("\nerror: capsa-guest-bin: {msg}\n");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env_var("OUT_DIR")?);
    let dest = out_dir.join(BIN);
    let guest_dir = manifest_dir.join("../capsa-guest");
    let workspace_manifest = manifest_dir.join("../../Cargo.toml");

    println!("cargo:rerun-if-changed=build.rs");
    // The guest speaks capsa-proto: a protocol change must rebuild the embedded guest.
    let proto_dir = manifest_dir.join("../capsa-proto");
    println!("cargo:rerun-if-changed={}", proto_dir.join("src").display());
    println!(
        "cargo:rerun-if-changed={}",
        proto_dir.join("Cargo.toml").display()
    );
    println!("cargo:rerun-if-changed={}", guest_dir.join("src").display());
    println!(
        "cargo:rerun-if-changed={}",
        guest_dir.join("Cargo.toml").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        manifest_dir.join("../../Cargo.lock").display()
    );
    println!("cargo:rerun-if-env-changed=DOCS_RS");

    if env::var_os("DOCS_RS").is_some() {
        // docs.rs builds offline without the workspace; docs do not need the binary.
        fs::write(&dest, b"").map_err(|e| format!("write {}: {e}", dest.display()))?;
        return Ok(());
    }
    if !guest_dir.join("Cargo.toml").is_file() || !workspace_manifest.is_file() {
        return Err(format!(
            "the capsa-guest sources are not next to this crate ({} missing); \
             fix: build capsa-guest-bin from the capsa workspace checkout",
            guest_dir.display()
        ));
    }

    let target_dir = out_dir.join("guest-target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(&cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--locked")
        .args(["--target", GUEST_TARGET])
        .args(["-p", "capsa-guest", "--bin", BIN])
        .arg("--manifest-path")
        .arg(&workspace_manifest)
        .arg("--target-dir")
        .arg(&target_dir);
    clean_env(&mut cmd);
    cmd.env(
        "RUSTFLAGS",
        "-C target-feature=+crt-static -C strip=symbols",
    );

    let output = cmd.output().map_err(|e| {
        format!(
            "cannot run {}: {e}; fix: make cargo available on PATH",
            cargo.to_string_lossy()
        )
    })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "the nested static build of capsa-guest failed ({}):\n{}\n\
             fix: install the Rust target (`rustup target add {GUEST_TARGET}`) and static glibc \
             (`apt-get install libc6-dev`), then rebuild",
            output.status,
            tail.join("\n")
        ));
    }

    let built = target_dir.join(GUEST_TARGET).join("release").join(BIN);
    let bytes = fs::read(&built).map_err(|e| format!("read {}: {e}", built.display()))?;
    check_static(&bytes).map_err(|why| {
        format!(
            "{} is not a static binary ({why}); fix: install static glibc (`apt-get install libc6-dev`) \
             and make sure no linker override drops `+crt-static`",
            built.display()
        )
    })?;
    write_if_changed(&dest, &bytes)
}

fn env_var(name: &str) -> Result<String, String> {
    env::var(name).map_err(|_| format!("cargo did not set {name}; fix: build with cargo"))
}

/// Drops what the outer cargo tells its build scripts (and what a user set
/// for the outer build) that would change or break the nested one: target
/// dir, flags, wrappers (clippy-driver), build-script variables.
fn clean_env(cmd: &mut Command) {
    const KEEP: &[&str] = &[
        "CARGO_HOME",
        "CARGO_MAKEFLAGS", // the outer jobserver: share its job tokens
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
        "CARGO_TERM_",
    ];
    const DROP: &[&str] = &[
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CLIPPY_ARGS",
        "TARGET",
        "HOST",
        "OUT_DIR",
        "PROFILE",
        "OPT_LEVEL",
        "DEBUG",
        "NUM_JOBS",
        "RUSTC_LINKER",
    ];
    for (key, _) in env::vars_os() {
        let Some(k) = key.to_str() else { continue };
        let cargo_var = (k.starts_with("CARGO") || k.starts_with("__CARGO"))
            && !KEEP.iter().any(|p| k.starts_with(p));
        if cargo_var || DROP.contains(&k) {
            cmd.env_remove(k);
        }
    }
}

/// Rejects dynamically linked ELF files (those with a `PT_INTERP` program header).
fn check_static(elf: &[u8]) -> Result<(), String> {
    const PT_INTERP: u32 = 3;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return Err("not a little-endian ELF64 file".into());
    }
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    };
    let phoff = u64_at(0x20).ok_or("truncated header")? as usize;
    let phentsize = u16_at(0x36).ok_or("truncated header")? as usize;
    let phnum = u16_at(0x3A).ok_or("truncated header")? as usize;
    for i in 0..phnum {
        let off = phoff
            .checked_add(i.checked_mul(phentsize).ok_or("bad program headers")?)
            .ok_or("bad program headers")?;
        let p_type = elf
            .get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or("truncated program headers")?;
        if p_type == PT_INTERP {
            return Err("it has a PT_INTERP (dynamic loader) header".into());
        }
    }
    Ok(())
}

/// Keeps the mtime (and so the dependents' freshness) when nothing changed.
fn write_if_changed(dest: &Path, bytes: &[u8]) -> Result<(), String> {
    if fs::read(dest).map(|old| old == bytes).unwrap_or(false) {
        return Ok(());
    }
    fs::write(dest, bytes).map_err(|e| format!("write {}: {e}", dest.display()))
}
