//! The binary's own limits, in one place: the operator's listings, the control socket, the
//! server's housekeeping. (The configuration's defaults are together at the top of
//! [`config`](crate::config); the gateway's and the ledger's limits are in their crates'
//! `limits` modules.)

use std::time::Duration;

// The operator's listings.

/// The most accounts one listing returns.
pub const LIST_LIMIT_MAX: usize = 10_000;

/// The most history entries one `account show` returns.
pub const HISTORY_LIMIT_MAX: usize = 1_000;

// The control socket.

/// The longest request line accepted.
pub const CONTROL_REQUEST_BYTES_MAX: u64 = 64 * 1024;

/// The longest a client waits for the server.
pub const CONTROL_CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest the server waits for a connection's request line.
pub const CONTROL_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Control connections served at once; more are closed at once.
pub const CONTROL_CONNECTIONS_MAX: usize = 64;

// The server.

/// How often timed-out reservations are voided.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How often the server looks for a period that ended without its transparency report.
pub const TRANSPARENCY_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How often what capped keys spent is written down (a crash forgets at most this much of it).
pub const KEY_CAPS_WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// How long calls cut off at the end of the drain may take to settle and tell their clients.
pub const CUT_GRACE: Duration = Duration::from_secs(10);
