//! The guest kernel command line as a value: parse, merge (last wins), render.
//!
//! Several layers add arguments (backend defaults, the image, the library, the
//! user's `--append`); treating the line as a string would let an early
//! `quiet` and a later `loglevel=7` both survive in undefined order. Here a
//! later `key=value` replaces an earlier one with the same key.

use std::fmt;

/// Longest command line the x86 Linux boot protocol accepts (`COMMAND_LINE_SIZE`).
pub const MAX_CMDLINE_LEN: usize = 2048;

/// Keys Linux honours more than once, which must not be deduplicated.
const REPEATABLE: &[&str] = &["console"];

/// Why a kernel command line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CmdlineError {
    /// A double quote was opened and never closed.
    #[error("unbalanced double quote in {0:?}; fix: close the quote")]
    UnbalancedQuote(String),
    /// A parameter has no key (`=value`).
    #[error("parameter {0:?} has an empty key; fix: write it as key=value")]
    EmptyKey(String),
    /// Control characters (newline, NUL, ...) cannot be passed to the kernel.
    #[error("parameter {0:?} contains a control character; fix: remove it")]
    ControlChar(String),
    /// A value holds a double quote, which Linux cannot escape.
    #[error("value of {0:?} contains a double quote, which the kernel cannot parse; fix: drop the quote")]
    QuoteInValue(String),
    /// The rendered line is longer than the kernel accepts.
    #[error("command line is {0} bytes, more than the kernel's {MAX_CMDLINE_LEN}; fix: pass fewer or shorter arguments")]
    TooLong(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Param {
    key: String,
    value: Option<String>,
}

/// A Linux kernel command line: kernel parameters, then arguments for init after `--`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct KernelCmdline {
    params: Vec<Param>,
    init_args: Vec<String>,
}

impl KernelCmdline {
    /// An empty command line.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a command line; duplicate keys keep the last value.
    pub fn parse(line: &str) -> Result<Self, CmdlineError> {
        let mut out = Self::new();
        out.extend_from_str(line)?;
        Ok(out)
    }

    /// Parses `line` and merges it into this one, later values winning.
    pub fn extend_from_str(&mut self, line: &str) -> Result<(), CmdlineError> {
        let mut after_dashes = false;
        for token in tokenize(line)? {
            if after_dashes {
                self.init_args.push(token);
            } else if token == "--" {
                after_dashes = true;
            } else {
                let (key, value) = match token.split_once('=') {
                    Some((k, v)) => (k.to_string(), Some(v.to_string())),
                    None => (token.clone(), None),
                };
                if key.is_empty() {
                    return Err(CmdlineError::EmptyKey(token));
                }
                self.insert(key, value);
            }
        }
        Ok(())
    }

    /// Sets `key=value`, replacing any earlier value of `key`.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), CmdlineError> {
        check_word(key)?;
        if key.is_empty() || key.contains('=') || key.contains(' ') {
            return Err(CmdlineError::EmptyKey(key.to_string()));
        }
        check_word(value)?;
        if value.contains('"') {
            return Err(CmdlineError::QuoteInValue(key.to_string()));
        }
        self.insert(key.to_string(), Some(value.to_string()));
        Ok(())
    }

    /// Sets a bare flag such as `quiet`.
    pub fn flag(&mut self, key: &str) -> Result<(), CmdlineError> {
        check_word(key)?;
        if key.is_empty() || key.contains('=') || key.contains(' ') || key.contains('"') {
            return Err(CmdlineError::EmptyKey(key.to_string()));
        }
        self.insert(key.to_string(), None);
        Ok(())
    }

    /// Removes every occurrence of `key`.
    pub fn remove(&mut self, key: &str) {
        self.params.retain(|p| p.key != key);
    }

    /// The value of `key`: `None` if absent, `Some(None)` for a bare flag.
    pub fn get(&self, key: &str) -> Option<Option<&str>> {
        self.params
            .iter()
            .rev()
            .find(|p| p.key == key)
            .map(|p| p.value.as_deref())
    }

    /// Arguments passed to init (after `--`).
    pub fn init_args(&self) -> &[String] {
        &self.init_args
    }

    /// Renders the line and checks it fits the kernel's limit.
    pub fn render(&self) -> Result<String, CmdlineError> {
        let s = self.to_string();
        if s.len() >= MAX_CMDLINE_LEN {
            return Err(CmdlineError::TooLong(s.len()));
        }
        Ok(s)
    }

    fn insert(&mut self, key: String, value: Option<String>) {
        if !REPEATABLE.contains(&key.as_str()) {
            self.params.retain(|p| p.key != key);
        }
        self.params.push(Param { key, value });
    }
}

fn check_word(s: &str) -> Result<(), CmdlineError> {
    if s.chars().any(|c| c.is_control()) {
        return Err(CmdlineError::ControlChar(s.to_string()));
    }
    Ok(())
}

/// Splits on ASCII whitespace, keeping double-quoted runs together and dropping the quotes,
/// as the kernel's `next_arg` does.
fn tokenize(line: &str) -> Result<Vec<String>, CmdlineError> {
    let mut tokens = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut has_token = false;
    for c in line.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                has_token = true;
            }
            c if c.is_ascii_whitespace() && !in_quotes => {
                if has_token {
                    tokens.push(std::mem::take(&mut cur));
                    has_token = false;
                }
            }
            c if c.is_control() => return Err(CmdlineError::ControlChar(line.to_string())),
            c => {
                cur.push(c);
                has_token = true;
            }
        }
    }
    if in_quotes {
        return Err(CmdlineError::UnbalancedQuote(line.to_string()));
    }
    if has_token {
        tokens.push(cur);
    }
    Ok(tokens)
}

impl fmt::Display for KernelCmdline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut sep = |f: &mut fmt::Formatter<'_>| {
            if !std::mem::replace(&mut first, false) {
                f.write_str(" ")?;
            }
            Ok::<(), fmt::Error>(())
        };
        for p in &self.params {
            sep(f)?;
            match &p.value {
                Some(v) if v.is_empty() || v.contains(char::is_whitespace) => {
                    write!(f, "{}=\"{}\"", p.key, v)?
                }
                Some(v) => write!(f, "{}={}", p.key, v)?,
                None => f.write_str(&p.key)?,
            }
        }
        if !self.init_args.is_empty() {
            sep(f)?;
            f.write_str("--")?;
            for a in &self.init_args {
                if a.contains(char::is_whitespace) {
                    write!(f, " \"{a}\"")?;
                } else {
                    write!(f, " {a}")?;
                }
            }
        }
        Ok(())
    }
}

impl From<KernelCmdline> for String {
    fn from(c: KernelCmdline) -> String {
        c.to_string()
    }
}

impl TryFrom<String> for KernelCmdline {
    type Error = CmdlineError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        KernelCmdline::parse(&s)
    }
}

impl std::str::FromStr for KernelCmdline {
    type Err = CmdlineError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KernelCmdline::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_value_wins_and_keeps_order_of_last() {
        let c = KernelCmdline::parse("quiet loglevel=3 panic=1 loglevel=7").unwrap();
        assert_eq!(c.to_string(), "quiet panic=1 loglevel=7");
        assert_eq!(c.get("loglevel"), Some(Some("7")));
        assert_eq!(c.get("quiet"), Some(None));
        assert_eq!(c.get("nope"), None);
    }

    #[test]
    fn console_is_repeatable() {
        let c = KernelCmdline::parse("console=tty0 console=ttyS0").unwrap();
        assert_eq!(c.to_string(), "console=tty0 console=ttyS0");
    }

    #[test]
    fn quotes_round_trip() {
        let c = KernelCmdline::parse(r#"a="x y" b -- "init arg" two"#).unwrap();
        assert_eq!(c.get("a"), Some(Some("x y")));
        assert_eq!(c.init_args(), ["init arg", "two"]);
        let again = KernelCmdline::parse(&c.to_string()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn merge_later_wins() {
        let mut c = KernelCmdline::parse("console=ttyS0 quiet panic=-1").unwrap();
        c.extend_from_str("panic=5 foo").unwrap();
        c.set("capsa.mode", "shell").unwrap();
        assert_eq!(
            c.render().unwrap(),
            "console=ttyS0 quiet panic=5 foo capsa.mode=shell"
        );
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            KernelCmdline::parse("a=\"open"),
            Err(CmdlineError::UnbalancedQuote(_))
        ));
        assert!(matches!(
            KernelCmdline::parse("=v"),
            Err(CmdlineError::EmptyKey(_))
        ));
        assert!(matches!(
            KernelCmdline::parse("a\u{1}b"),
            Err(CmdlineError::ControlChar(_))
        ));
        let mut c = KernelCmdline::new();
        assert!(c.set("k", "has\"quote").is_err());
        assert!(c.set("", "v").is_err());
        c.set("big", &"x".repeat(MAX_CMDLINE_LEN)).unwrap();
        assert!(matches!(c.render(), Err(CmdlineError::TooLong(_))));
    }

    #[test]
    fn serde_as_string() {
        let c = KernelCmdline::parse("quiet a=1").unwrap();
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(j, "\"quiet a=1\"");
        let back: KernelCmdline = serde_json::from_str(&j).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn never_panics_on_arbitrary_input() {
        // A cheap deterministic fuzz: every byte string either parses or errors.
        let mut seed: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..5000 {
            let len = (seed % 40) as usize;
            let mut s = String::new();
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                s.push(b" =\"-ab\n\x00\xc3"[(seed % 9) as usize] as char);
            }
            if let Ok(c) = KernelCmdline::parse(&s) {
                let _ = KernelCmdline::parse(&c.to_string());
            }
        }
    }
}
