//! The bounded per-sandbox decision log.

use std::collections::VecDeque;
use std::sync::Mutex;

use capsa_core::NetDecision;

/// Most decisions kept; older ones are dropped first.
pub const LOG_CAPACITY: usize = 1024;

/// A ring of the latest decisions.
#[derive(Debug, Default)]
pub struct DecisionLog {
    ring: Mutex<VecDeque<NetDecision>>,
}

impl DecisionLog {
    /// Records one decision (and traces it).
    pub fn record(
        &self,
        kind: &str,
        what: impl Into<String>,
        allowed: bool,
        reason: impl Into<String>,
    ) {
        let d = NetDecision {
            at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            kind: kind.to_string(),
            what: what.into(),
            allowed,
            reason: reason.into(),
        };
        tracing::debug!(kind = %d.kind, what = %d.what, allowed, reason = %d.reason, "network decision");
        if let Ok(mut r) = self.ring.lock() {
            if r.len() >= LOG_CAPACITY {
                r.pop_front();
            }
            r.push_back(d);
        }
    }

    /// The decisions kept, oldest first.
    pub fn snapshot(&self) -> Vec<NetDecision> {
        self.ring
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded() {
        let l = DecisionLog::default();
        for i in 0..(LOG_CAPACITY + 5) {
            l.record("tcp", format!("{i}"), true, "x");
        }
        let s = l.snapshot();
        assert_eq!(s.len(), LOG_CAPACITY);
        assert_eq!(s[0].what, "5");
    }
}
