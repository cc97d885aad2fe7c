//! Every limit of the web crate, in one place.

use std::time::Duration;

/// How long a signed-in session lasts from its sign-in, by default (`[web] session_ttl`).
pub const SESSION_TTL_DEFAULT: Duration = Duration::from_secs(12 * 3_600);
/// The longest a session may be made to last.
pub const SESSION_TTL_MAX: Duration = Duration::from_secs(30 * 24 * 3_600);
/// Sessions held at once, by default; past it, signing in ends the oldest.
pub const SESSIONS_MAX_DEFAULT: usize = 100_000;
/// The largest form a page may post.
pub const FORM_BYTES_MAX: usize = 16 * 1024;
/// Transfers shown in a person's recent history.
pub const HISTORY_SHOWN: usize = 20;
/// Keys shown on a person's page (the newest).
pub const KEYS_SHOWN: usize = 100;
/// Accounts shown on a page of the operator's list.
pub const ADMIN_ACCOUNTS_SHOWN: usize = 50;
/// The most accounts one page of the admin API's list scans.
pub const ADMIN_LIST_MAX: usize = 1_000;
/// The most accounts and groups one model's access rule names.
pub const ACCESS_SUBJECTS_MAX: usize = 1_000;
/// The most accounts a search on the operator's page shows.
pub const SEARCH_RESULTS_MAX: usize = 50;
/// How long closing an account waits for the calls that started before its keys were revoked.
pub const CLOSE_WAIT_MAX: Duration = Duration::from_secs(10);
/// Accounts read at a time when the operator's page adds up this period's distribution.
pub const PEOPLE_SCANNED_PAGE: usize = 10_000;
/// Agent runs shown on a person's page (the newest).
pub const AGENT_RUNS_SHOWN: usize = 50;
/// Characters of a run's goal shown in the list.
pub const AGENT_GOAL_SHOWN: usize = 200;
/// The longest name a key may have, in characters.
pub const KEY_NAME_CHARS_MAX: usize = 64;
/// The longest key a sign-in form may carry (a real one is under 100 bytes).
pub const KEY_BYTES_MAX: usize = 256;

const _: () = assert!(SESSION_TTL_DEFAULT.as_secs() <= SESSION_TTL_MAX.as_secs());
