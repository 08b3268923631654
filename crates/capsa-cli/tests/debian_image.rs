//! `capsa image build NAME --debian bookworm --packages python3,git`, offline: every HTTP
//! request goes to a dead proxy, so only the .deb and package-list cache can serve mmdebstrap.
//! `scripts/test.sh` provisions that cache from the Debian mirror before the tests (a package
//! registry, like its `apt-get install`); the cache is shared (`$CAPSA_DEB_CACHE`, default
//! ~/.cache/capsa/debian), the image store is private to the test. Then the image boots:
//! python3 and git run in it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn need(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is missing; fix: run scripts/setup.sh (apt-get install mmdebstrap erofs-utils)"
    );
}

fn deb_cache() -> PathBuf {
    std::env::var_os("CAPSA_DEB_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/capsa/debian")
        })
}

fn capsa(tmp: &Path, args: &[&str], proxy: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_capsa"));
    c.args(args)
        .env("XDG_CACHE_HOME", tmp.join("cache"))
        .env("CAPSA_DEB_CACHE", deb_cache());
    if let Some(p) = proxy {
        c.env("http_proxy", p).env("https_proxy", p);
    }
    c.output().unwrap()
}

fn built(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `dump.erofs --path` of one file: its description, or None if absent.
fn stat(img: &str, path: &str) -> Option<String> {
    let out = Command::new("dump.erofs")
        .arg(format!("--path={path}"))
        .arg(img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success() && text.contains("File :")).then_some(text)
}

#[test]
fn debian_image_with_python3_and_git() {
    need("mmdebstrap");
    need("dump.erofs");
    let tmp = tempfile::tempdir().unwrap();
    let args = [
        "image",
        "build",
        "py:test",
        "--debian",
        "bookworm",
        "--packages",
        "python3,git",
        "--json",
    ];
    // Offline from the first build on: a dead proxy for every HTTP request.
    let offline = Some("http://127.0.0.1:9");
    let lists = deb_cache().join("bookworm/lists");
    assert!(
        lists.is_dir(),
        "no Debian package cache in {}; fix: run scripts/test.sh (it provisions it from the \
         mirror), or `capsa image build x --debian bookworm --packages python3,git` once",
        lists.display()
    );
    let v = built(&capsa(tmp.path(), &args, offline));
    eprintln!("first build: {v}");
    let img = v["rootfs"].as_str().unwrap().to_string();
    let git = stat(&img, "/usr/bin/git").expect("no /usr/bin/git");
    assert!(
        git.contains("regular file") && git.contains("0755"),
        "{git}"
    );
    let py = stat(&img, "/usr/bin/python3").expect("no /usr/bin/python3");
    assert!(py.contains("symlink"), "{py}");
    assert!(stat(&img, "/usr/bin/python3.11").is_some());
    assert!(stat(&img, "/usr/lib/python3.11/sqlite3/__init__.py").is_some());
    assert!(stat(&img, "/usr/bin/bash").is_some());
    // bookworm is merged-/usr: /bin is a symlink (a chroot resolves /bin/bash through it).
    assert!(stat(&img, "/bin").is_some_and(|s| s.contains("symlink")));
    // Package lists and the apt cache are not part of the image.
    for dir in ["/var/cache/apt/archives", "/var/lib/apt/lists"] {
        let out = Command::new("dump.erofs")
            .args(["--ls", &format!("--path={dir}"), &img])
            .output()
            .unwrap();
        let ls = String::from_utf8_lossy(&out.stdout);
        assert!(!ls.contains(".deb") && !ls.contains("Packages"), "{ls}");
    }

    let out = capsa(tmp.path(), &["image", "inspect", "py:test"], None);
    assert!(out.status.success());
    let i: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(i["config"]["Cmd"][0], "/bin/bash", "{i}");
    assert!(i["config"]["Env"][0].as_str().unwrap().starts_with("PATH="));
    assert_eq!(i["layers"].as_array().unwrap().len(), 1);

    // Rebuild (mmdebstrap again) with every HTTP request sent to a dead proxy: only the
    // caches can serve it, and the result is the same image.
    let again = [
        "image",
        "build",
        "py:again",
        "--debian",
        "bookworm",
        "--packages",
        "git,python3",
        "--json",
        "--convert",
        "none",
        "--rebuild",
    ];
    let v2 = built(&capsa(tmp.path(), &again, Some("http://127.0.0.1:9")));
    eprintln!("rebuild: {v2}");
    assert_eq!(v2["cached_image"], false, "{v2}");
    assert_eq!(v2["cached_lists"], true, "{v2}");
    assert_eq!(v2["debs_downloaded"], 0, "{v2}");
    assert_eq!(
        v2["digest"], v["digest"],
        "the rebuild is not the same image"
    );
    // Without --rebuild, the same inputs reuse the stored image at once.
    let v3 = built(&capsa(
        tmp.path(),
        &again[..again.len() - 1],
        Some("http://127.0.0.1:9"),
    ));
    assert_eq!(v3["cached_image"], true, "{v3}");
    assert_eq!(v3["digest"], v["digest"]);

    // The image boots: python3 (with sqlite3) and git run in it.
    let run = |cmd: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_capsa"))
            .args(["run", "--image", "py:test", "--memory", "512M", "--"])
            .args(cmd)
            .env("CAPSA_IMAGE_STORE", tmp.path().join("cache/capsa/images"))
            .env("http_proxy", "http://127.0.0.1:9")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(run(&["python3", "-c", "import sqlite3; print(2+2)"]), "4");
    assert!(run(&["git", "--version"]).starts_with("git version"));

    let out = capsa(
        tmp.path(),
        &[
            "image",
            "build",
            "x",
            "--debian",
            "bookworm",
            "--packages",
            "python3,-oAPT::Evil=1",
        ],
        None,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a Debian package name"), "{err}");
    let out = capsa(tmp.path(), &["image", "build", "x"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--debian"));
}
