//! Every limit of the ledger, in one place: the sizes of amounts, stipends, periods, lots and
//! names, and the engine's bounds ([`LedgerOptions`]). Each keeps sums far from `i64::MAX`, so
//! that the arithmetic an operator or a client can reach is checked, not wrapped.

use std::time::Duration;

use crate::policy::StipendPolicy;

/// The largest amount the ledger accepts in one operation. Balances are `i64`; keeping single
/// amounts far below `i64::MAX` leaves room to add many of them without overflow checks failing
/// on ordinary input.
pub const AMOUNT_MAX_CU: u64 = 1 << 60;

/// The largest stipend per period. Keeps every sum of a few stipends far from `i64::MAX`.
pub const STIPEND_MAX_CU: u64 = 1 << 50;

/// The shortest period.
pub const PERIOD_MIN: Duration = Duration::from_secs(1);

/// The longest period (about ten years).
pub const PERIOD_MAX: Duration = Duration::from_secs(3_650 * 86_400);

/// The most lots one account may hold. Lots with the same expiry and source merge, so real
/// accounts hold a handful; the cap keeps a flood of oddly-dated grants from growing one account
/// without bound.
pub const LOTS_MAX: usize = 64;
/// Days of an account's usage kept, by model and day, for the charts of its recent use (the
/// current period's counts are kept whatever its length).
pub const USAGE_DAYS_KEPT: i64 = 31;
/// The most usage counts an account keeps (one per model, period and day); past it the oldest
/// days go first, never the current period's.
pub const USAGE_ENTRIES_MAX: usize = 128;
/// A UTC day, in ms: usage is counted per day since the UNIX epoch.
pub const DAY_MS: i64 = 86_400_000;

/// The longest account name, in bytes of its normalized form.
pub const ACCOUNT_NAME_LEN_MAX: usize = 128;

/// The longest a reservation may be held, by default (`LedgerOptions::reservation_timeout_max`).
pub const RESERVATION_TIMEOUT_MAX_DEFAULT: Duration = Duration::from_secs(3_600);

/// How often timed-out reservations are looked for, at most.
pub const SWEEP_INTERVAL_MS: i64 = 100;

/// Limits and policy for one ledger.
#[derive(Debug, Clone)]
pub struct LedgerOptions {
    /// The stipend every person receives.
    pub policy: StipendPolicy,
    /// The longest a reservation may stay open.
    pub reservation_timeout_max: Duration,
    /// The most reservations open at once.
    pub reservations_open_max: usize,
    /// The most queued changes written in one commit.
    pub commit_batch_max: usize,
    /// The most changes waiting for the writer before new work is refused.
    pub pending_mutations_max: usize,
    /// How often changed accounts are checkpointed. Longer means fewer writes and a longer log
    /// tail to replay after a crash.
    pub checkpoint_interval: Duration,
    /// Checkpoint at once when this many accounts have changed since the last checkpoint.
    pub checkpoint_dirty_max: usize,
    /// Checkpoint when the ledger closes, so the next start replays nothing. Turned off only by
    /// tests of recovery.
    pub checkpoint_on_close: bool,
}

impl LedgerOptions {
    /// The defaults, with this policy.
    pub fn new(policy: StipendPolicy) -> LedgerOptions {
        LedgerOptions {
            policy,
            reservation_timeout_max: RESERVATION_TIMEOUT_MAX_DEFAULT,
            reservations_open_max: 1_000_000,
            commit_batch_max: 32_768,
            pending_mutations_max: 1 << 20,
            checkpoint_interval: Duration::from_secs(1),
            checkpoint_dirty_max: 200_000,
            checkpoint_on_close: true,
        }
    }
}

// A few stipends (a person's, a pool's gifts) and many single amounts sum far inside a balance.
const _: () = assert!(STIPEND_MAX_CU < AMOUNT_MAX_CU);
const _: () = assert!(AMOUNT_MAX_CU < (i64::MAX as u64) / 4);

/// How often a ledger whose commit failed probes the store for writes, to reopen by itself.
pub const RECOVERY_INTERVAL: Duration = Duration::from_secs(1);

// An escrow node (`node`).

/// A lease that covers fewer calls like the one it was taken for is given back as soon as it
/// is idle: the person is near the end of their balance, and what is left belongs wherever the
/// next call goes.
pub const EDGE_CALLS: u64 = 8;

/// The most people whose last available balance a node remembers to size their next lease.
pub const AVAILABLE_HINTS_MAX: usize = 1_000_000;

/// How long a node asks whether a commit whose acknowledgement was lost happened.
pub const COMMIT_CHECK_TIME: Duration = Duration::from_secs(3);
