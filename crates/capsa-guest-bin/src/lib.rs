//! The static `capsa-init` guest binary, for the host side.
//!
//! `build.rs` compiles the `capsa-guest` crate with a nested
//! `cargo build --release --target x86_64-unknown-linux-gnu` and
//! `-C target-feature=+crt-static` (glibc, fully static, no `PT_INTERP`), and
//! this crate embeds the result. Host code that assembles an initramfs
//! should prefer [`init_binary_override`] (a prebuilt binary named by
//! [`INIT_OVERRIDE_ENV`]) and fall back to [`init_binary`].
#![deny(missing_docs)]

use std::borrow::Cow;
use std::path::PathBuf;

/// Environment variable naming a prebuilt static `capsa-init` to use instead
/// of the embedded one (handy when iterating on the guest without rebuilding
/// the host binaries).
pub const INIT_OVERRIDE_ENV: &str = "CAPSA_GUEST_INIT";

/// Target triple the embedded binary was built for.
pub const INIT_TARGET: &str = "x86_64-unknown-linux-gnu";

static INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/capsa-init"));

/// The embedded static `capsa-init` (ELF bytes, ready to be the initramfs `/init`).
pub fn init_binary() -> Cow<'static, [u8]> {
    Cow::Borrowed(INIT)
}

/// The path in `$CAPSA_GUEST_INIT`, if set and not empty.
///
/// Read at run time, not build time; the caller reads the file (and should
/// check it is a static binary, as the embedded one is).
pub fn init_binary_override() -> Option<PathBuf> {
    std::env::var_os(INIT_OVERRIDE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    #[test]
    fn embedded_binary_is_an_elf_executable() {
        let bin = super::init_binary();
        assert!(
            bin.len() > 100_000,
            "suspiciously small: {} bytes",
            bin.len()
        );
        assert_eq!(&bin[..4], b"\x7fELF");
    }
}
