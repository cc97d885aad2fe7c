//! Per-key caps: a key may carry a cap of its own, the most it may spend in a stipend period,
//! whatever its account holds (a key handed to a script, say). A call on a capped key holds its
//! worst case against the cap beside its reservation, and counts what it was charged when it
//! settles; a call the cap cannot cover is refused (429 `insufficient_quota`), charged nothing.
//!
//! What a key spent is counted here, in memory, and written to the store about once a second
//! (`write`, which also learns what other servers sharing the database wrote). So a key's
//! spending is exact on one server while it runs; a crash forgets at most the last second's
//! count, and servers sharing a database see each other's within about a second: a cap can be
//! passed by that much. The account's own balance is never passed: the ledger keeps it.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use stipend_ledger::{KeyCap, KeySpend, Store, StoreError};

use crate::ApiError;

/// What a capped key spent and holds in its current period.
#[derive(Debug, Default)]
struct Spend {
    period: i64,
    /// The store's count for the period, as last known.
    written_cu: u64,
    /// Charged since then, not yet written.
    unwritten_cu: u64,
    /// Held by calls in flight.
    held_cu: u64,
}

impl Spend {
    fn used_cu(&self) -> u64 {
        self.written_cu.saturating_add(self.unwritten_cu)
    }
}

/// The capped keys' spending.
pub struct KeyCaps {
    store: Arc<dyn Store>,
    spends: Mutex<HashMap<String, Spend>>,
}

impl KeyCaps {
    /// Counts over `store`.
    pub fn new(store: Arc<dyn Store>) -> KeyCaps {
        KeyCaps {
            store,
            spends: Mutex::new(HashMap::new()),
        }
    }

    /// Holds `worst_cu` of key `id`'s `cap` for a call in `period` (which ends at
    /// `period_ends_ms`), or refuses it if the cap cannot cover it.
    pub(crate) fn hold(
        self: &Arc<Self>,
        id: &str,
        cap: KeyCap,
        period: i64,
        period_ends_ms: i64,
        worst_cu: u64,
    ) -> Result<CapHold, ApiError> {
        let mut spends = self.spends.lock();
        let spend = spends.entry(id.to_string()).or_default();
        if spend.period != period {
            // A new period (or the first sight of the key): start from what the store knows of
            // this period, if anything.
            *spend = Spend {
                period,
                written_cu: if cap.period == period {
                    cap.spent_cu
                } else {
                    0
                },
                unwritten_cu: 0,
                held_cu: spend.held_cu,
            };
        }
        let used_cu = spend.used_cu().saturating_add(spend.held_cu);
        if used_cu.saturating_add(worst_cu) > cap.cap_cu {
            return Err(ApiError::KeyCapReached {
                cap_cu: cap.cap_cu,
                used_cu,
                needed_cu: worst_cu,
                resets_at_ms: period_ends_ms,
            });
        }
        spend.held_cu += worst_cu;
        Ok(CapHold {
            caps: Arc::clone(self),
            id: id.to_string(),
            period,
            held_cu: worst_cu,
        })
    }

    /// What key `id` has spent in `period` (written or not), and holds.
    pub fn used(&self, id: &str, period: i64) -> Option<(u64, u64)> {
        let spends = self.spends.lock();
        let spend = spends.get(id).filter(|spend| spend.period == period)?;
        Some((spend.used_cu(), spend.held_cu))
    }

    /// Writes what keys spent since the last write, and learns each one's count in the store
    /// (which other servers add to). Returns how many keys were written. A failed write keeps
    /// the counts for the next.
    pub fn write(&self) -> Result<usize, StoreError> {
        let pending: Vec<KeySpend> = {
            let mut spends = self.spends.lock();
            spends
                .iter_mut()
                .filter(|(_, spend)| spend.unwritten_cu > 0)
                .map(|(id, spend)| {
                    let spent_cu = std::mem::take(&mut spend.unwritten_cu);
                    KeySpend {
                        id: id.clone(),
                        period: spend.period,
                        spent_cu,
                    }
                })
                .collect()
        };
        if pending.is_empty() {
            return Ok(0);
        }
        let written = self.store.add_key_spends(&pending);
        let mut spends = self.spends.lock();
        match written {
            Ok(totals) => {
                for (spend, total) in pending.iter().zip(totals) {
                    if let Some(known) = spends.get_mut(&spend.id)
                        && known.period == spend.period
                    {
                        known.written_cu = total;
                    }
                }
                // Every key counted stays (one entry per capped key used): dropping one would
                // start it again from its cached record's count, which is older than this.
                Ok(pending.len())
            }
            Err(error) => {
                for spend in &pending {
                    if let Some(known) = spends.get_mut(&spend.id)
                        && known.period == spend.period
                    {
                        known.unwritten_cu += spend.spent_cu;
                    }
                }
                Err(error)
            }
        }
    }
}

/// A call's hold on its key's cap: settled with what the call was charged, or let go (dropped)
/// when it was charged nothing.
pub(crate) struct CapHold {
    caps: Arc<KeyCaps>,
    id: String,
    period: i64,
    held_cu: u64,
}

impl CapHold {
    /// Counts `charged_cu` against the cap and lets the hold go.
    pub(crate) fn settle(self, charged_cu: u64) {
        let mut spends = self.caps.spends.lock();
        if let Some(spend) = spends.get_mut(&self.id)
            && spend.period == self.period
        {
            spend.unwritten_cu = spend.unwritten_cu.saturating_add(charged_cu);
        }
        // The hold itself is released by drop.
    }
}

impl Drop for CapHold {
    fn drop(&mut self) {
        let mut spends = self.caps.spends.lock();
        if let Some(spend) = spends.get_mut(&self.id) {
            spend.held_cu = spend.held_cu.saturating_sub(self.held_cu);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use stipend_ledger::{AccountId, KeyRecord};

    fn caps_with_key() -> (tempfile::TempDir, Arc<dyn Store>, Arc<KeyCaps>) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            stipend_store_sqlite::SqliteStore::open(&dir.path().join("ledger.db")).unwrap(),
        );
        store
            .insert_key(&KeyRecord {
                id: "k".to_string(),
                account: AccountId(2),
                secret_sha256: [0; 32],
                created_at_ms: 0,
                revoked_at_ms: None,
                cap: None,
                name: None,
            })
            .unwrap();
        store.set_key_cap("k", Some(1_000)).unwrap();
        let caps = Arc::new(KeyCaps::new(Arc::clone(&store)));
        (dir, store, caps)
    }

    fn cap(spent_cu: u64, period: i64) -> KeyCap {
        KeyCap {
            cap_cu: 1_000,
            period,
            spent_cu,
        }
    }

    #[test]
    fn holds_count_against_the_cap_until_settled_or_let_go() {
        let (_dir, store, caps) = caps_with_key();
        let first = caps.hold("k", cap(0, 1), 1, 99, 600).unwrap();
        // 600 held: another 600 would pass the cap of 1 000.
        assert!(matches!(
            caps.hold("k", cap(0, 1), 1, 99, 600),
            Err(ApiError::KeyCapReached {
                used_cu: 600,
                needed_cu: 600,
                ..
            })
        ));
        first.settle(100);
        assert_eq!(caps.used("k", 1), Some((100, 0)));
        // Let go unsettled (a call charged nothing): nothing counted.
        drop(caps.hold("k", cap(0, 1), 1, 99, 900).unwrap());
        assert_eq!(caps.used("k", 1), Some((100, 0)));
        // Written down: the store counts it, and a new server starts from there.
        assert_eq!(caps.write().unwrap(), 1);
        // Regression: after a write, the count stands even when the key's record (cached when
        // the key was first used) still says nothing was spent.
        assert!(matches!(
            caps.hold("k", cap(0, 1), 1, 99, 901),
            Err(ApiError::KeyCapReached { used_cu: 100, .. })
        ));
        let written = store.key("k").unwrap().unwrap().cap.unwrap();
        assert_eq!((written.period, written.spent_cu), (1, 100));
        let restarted = Arc::new(KeyCaps::new(Arc::clone(&store)));
        assert!(restarted.hold("k", written, 1, 99, 901).is_err());
        assert!(restarted.hold("k", written, 1, 99, 900).is_ok());
        // A new period starts from nothing.
        assert!(restarted.hold("k", written, 2, 199, 1_000).is_ok());
    }

    #[test]
    fn a_failed_write_keeps_the_count() {
        let (dir, store, caps) = caps_with_key();
        caps.hold("k", cap(0, 1), 1, 99, 300).unwrap().settle(300);
        // The store's file made read-only under it: the write fails and the count stays.
        drop(store);
        let read_only = Arc::new(
            stipend_store_sqlite::SqliteStore::open_read_only(&dir.path().join("ledger.db"))
                .unwrap(),
        );
        let caps_ro = Arc::new(KeyCaps::new(read_only as Arc<dyn Store>));
        caps_ro
            .hold("k", cap(0, 1), 1, 99, 300)
            .unwrap()
            .settle(300);
        assert!(caps_ro.write().is_err());
        assert_eq!(caps_ro.used("k", 1), Some((300, 0)));
        assert!(caps_ro.hold("k", cap(0, 1), 1, 99, 701).is_err());
        // The writable one writes its own.
        assert_eq!(caps.write().unwrap(), 1);
    }
}
