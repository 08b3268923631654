//! The one naming rule for sandboxes, VMs, snapshots and pools: a name
//! becomes a directory name and part of socket paths, so it is short, has no
//! separators or `..`, and nothing hidden.

/// Longest name (a pool member adds 9 characters to its pool's name).
pub const MAX_NAME_LEN: usize = 63;

/// What every face says about a bad name, after the problem.
pub const NAME_RULE: &str = "use 1-63 characters [a-z0-9][a-z0-9_.-]*, e.g. `my-box.1`";

/// Checks `name` against the rule; the problem in words otherwise.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    let Some(&first) = name.as_bytes().first() else {
        return Err("it is empty");
    };
    if name.len() > MAX_NAME_LEN {
        return Err("it is longer than 63 characters");
    }
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err("it must start with a lowercase letter or a digit");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err("only lowercase letters, digits, '_', '.' and '-' are allowed");
    }
    if name.contains("..") {
        return Err("it must not contain '..'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule() {
        for ok in ["a", "box-1", "0.x_y", &"a".repeat(63)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            ".a",
            "A",
            "a/b",
            "a..b",
            "a b",
            "é",
            &"a".repeat(64),
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
