//! Per-name serialization of lifecycle operations.
//!
//! Two requests that change the same sandbox (create/delete races, a stop
//! during a start) must not interleave: the second gets `409 conflict` at
//! once instead of waiting, so a client learns that someone else is acting on
//! the name. Different names never contend.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

use crate::error::{ApiError, ApiResult};

/// The lock table.
#[derive(Default)]
pub struct NameLocks {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Held while an operation on one name runs; removes its table entry when
/// nobody else holds it, so the table does not grow with every name ever used.
pub struct NameGuard {
    guard: Option<OwnedMutexGuard<()>>,
    name: String,
    table: Arc<NameLocks>,
}

impl NameLocks {
    /// Takes `name`'s lock, or fails with 409 if an operation on it is running.
    pub fn try_lock(self: &Arc<Self>, name: &str) -> ApiResult<NameGuard> {
        let m = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(name.to_string()).or_default().clone()
        };
        match m.try_lock_owned() {
            Ok(g) => Ok(NameGuard {
                guard: Some(g),
                name: name.to_string(),
                table: self.clone(),
            }),
            Err(_) => Err(ApiError::conflict(format!(
                "another operation on sandbox {name:?} is in progress"
            ))
            .fix("retry once the other request has finished")),
        }
    }
}

impl Drop for NameGuard {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.table.map.lock().unwrap_or_else(|p| p.into_inner());
        // Only the table's own reference left: nobody holds or waits for it.
        if map
            .get(&self.name)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_conflicts_and_table_shrinks() {
        let t = Arc::new(NameLocks::default());
        let g = t.try_lock("a").unwrap();
        assert!(t.try_lock("a").is_err());
        assert!(t.try_lock("b").is_ok());
        drop(g);
        assert!(t.try_lock("a").is_ok());
        assert!(t.map.lock().unwrap().is_empty());
    }
}
