//! Property test of the tar path sanitizer: whatever the bytes, the result stays inside the root.

use std::path::{Component, PathBuf};

use capsa_oci::{sanitize_path, PathRefusal};
use proptest::prelude::*;

fn pieces() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"..".to_vec()),
        Just(b".".to_vec()),
        Just(b"/".to_vec()),
        Just(b"//".to_vec()),
        Just(b"\0".to_vec()),
        Just(b".wh.".to_vec()),
        "[a-z.]{1,6}".prop_map(|s| s.into_bytes()),
        proptest::collection::vec(any::<u8>(), 1..4),
    ];
    proptest::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]
    #[test]
    fn sanitized_paths_stay_below_the_root(raw in pieces()) {
        match sanitize_path(&raw, 4096) {
            Ok(comps) => {
                let p: PathBuf = comps.iter().collect();
                for c in p.components() {
                    prop_assert!(matches!(c, Component::Normal(_)), "{:?} from {:?}", p, raw);
                }
                for c in &comps {
                    let b = std::os::unix::ffi::OsStrExt::as_bytes(c.as_os_str());
                    prop_assert!(!b.is_empty() && b != b"." && b != b".." && !b.contains(&b'/') && !b.contains(&0));
                }
                prop_assert!(!raw.split(|&b| b == b'/').any(|c| c == b".."));
            }
            Err(PathRefusal::DotDot) => prop_assert!(raw.split(|&b| b == b'/').any(|c| c == b"..")),
            Err(PathRefusal::Nul) => prop_assert!(raw.contains(&0)),
            Err(PathRefusal::TooLong) => prop_assert!(raw.len() > 4096),
        }
    }
}

#[test]
fn examples() {
    let s = |p: &str| sanitize_path(p.as_bytes(), 4096).map(|v| v.iter().collect::<PathBuf>());
    assert_eq!(s("/etc/passwd").unwrap(), PathBuf::from("etc/passwd"));
    assert_eq!(s("./a//b/./c/").unwrap(), PathBuf::from("a/b/c"));
    assert_eq!(s("./").unwrap(), PathBuf::new());
    assert_eq!(s("a/../../b"), Err(PathRefusal::DotDot));
    assert_eq!(s("..."), Ok(PathBuf::from("...")));
    assert_eq!(
        sanitize_path(&[b'a'; 5000], 4096),
        Err(PathRefusal::TooLong)
    );
}
