//! Every limit of the gateway, in one place: what a client, an upstream or an operator can push
//! against, with the relations between them checked when the crate compiles. The configurable
//! ones are [`GatewayOptions`] (set from `stipend.toml`); the rest are constants.

use std::time::Duration;

// What the operator sets.

/// The gateway's limits.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// Completion tokens reserved when a request gives no `max_tokens`.
    pub max_tokens_default: u64,
    /// The most completion tokens one request may ask for.
    pub max_tokens_max: u64,
    /// The largest request body.
    pub body_bytes_max: usize,
    /// The largest answer accepted from an upstream (a plain, not streamed, answer).
    pub upstream_body_bytes_max: usize,
    /// The longest a request's body may take to arrive, once its head has.
    pub body_read_timeout: Duration,
    /// How long a request's reservation stays open. Every call ends before it can expire: a
    /// stream still running at `reservation_timeout − RESERVATION_MARGIN` is cut off and charged
    /// for what it produced, so nothing is ever served on a hold that timed out.
    pub reservation_timeout: Duration,
    /// Whether the API's listener serves `/metrics` (the default); false when it is served on
    /// a listener of its own ([`metrics_router`](crate::metrics_router)).
    pub metrics_on_api: bool,
}

/// How long a call's reservation stays open by default.
pub const RESERVATION_TIMEOUT: Duration = Duration::from_secs(3_600);

impl Default for GatewayOptions {
    fn default() -> GatewayOptions {
        GatewayOptions {
            max_tokens_default: 1_024,
            max_tokens_max: 131_072,
            body_bytes_max: 4 * 1024 * 1024,
            upstream_body_bytes_max: 16 * 1024 * 1024,
            body_read_timeout: Duration::from_secs(60),
            reservation_timeout: RESERVATION_TIMEOUT,
            metrics_on_api: true,
        }
    }
}

/// How long before its reservation would expire a call is ended.
pub const RESERVATION_MARGIN: Duration = Duration::from_secs(60);

/// The longest an upstream may be given to start answering or between chunks; well under the
/// reservation, so a stalled upstream always times out while the hold still stands.
pub const UPSTREAM_TIMEOUT_MAX: Duration = Duration::from_secs(600);

// The relations between the limits, checked when the crate compiles: a reservation the gateway
// asks for is one the ledger grants; and an upstream that stalls for as long as it may still
// times out while the call's hold stands (a call ends `RESERVATION_MARGIN` before its hold could
// expire).
const _: () = assert!(
    RESERVATION_TIMEOUT.as_secs() <= stipend_ledger::RESERVATION_TIMEOUT_MAX_DEFAULT.as_secs()
);
const _: () = assert!(
    UPSTREAM_TIMEOUT_MAX.as_secs() + RESERVATION_MARGIN.as_secs() < RESERVATION_TIMEOUT.as_secs()
);

// A call.

/// The most choices one call may compute (`n` × `best_of` × prompts): each is metered on its own.
pub const CHOICES_MAX: u64 = 1_024;

/// The most bytes of text one token can decode to, for every tokenizer in use (the longest tokens
/// of common vocabularies are runs of a few dozen spaces or dashes). A choice that delivered more
/// than `max_tokens` times this has provably overrun `max_tokens`.
pub const TOKEN_BYTES_MAX: u64 = 256;

// HTTP: what a client sends, what an upstream answers.

/// How much of a refused request body (over the limit) is read and dropped before the 413 is
/// sent, and for how long, so that a client still writing it reads the 413 rather than a broken
/// pipe; a body declared larger is not waited for.
pub const LINGER_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// See [`LINGER_BYTES_MAX`].
pub const LINGER_TIME_MAX: Duration = Duration::from_secs(2);

/// The longest path quoted back in an error.
pub const PATH_QUOTED_MAX: usize = 200;

/// The largest single SSE event accepted from an upstream.
pub const SSE_EVENT_BYTES_MAX: usize = 1024 * 1024;

/// Chunks buffered between the backend and a slow client.
pub const RELAY_CHANNEL_CAPACITY: usize = 64;

/// The largest response head accepted.
pub const UPSTREAM_HEAD_BYTES_MAX: usize = 64 * 1024;

/// The most response headers accepted.
pub const UPSTREAM_HEADERS_MAX: usize = 64;

/// The longest chunk-size line (with extensions) accepted.
pub const UPSTREAM_CHUNK_LINE_MAX: usize = 1024;

/// An idle connection older than this is not reused. Servers close idle keep-alive connections
/// on their own schedule (uvicorn, under vLLM, after 5 s); one closed while pooled is noticed
/// before reuse (plain TCP) or on first use (the retry in `send`), so this bound is for tidiness,
/// and long enough to keep a TLS session to a distant upstream across quiet spells.
pub const UPSTREAM_IDLE_MAX: Duration = Duration::from_secs(50);

/// The longest a connection to an upstream may take to open (or the upstream's timeout, if
/// shorter).
pub const UPSTREAM_CONNECT_TIMEOUT_MAX: Duration = Duration::from_secs(10);

/// How much of an upstream's error answer is read, and for how long, to say what went wrong.
pub const UPSTREAM_ERROR_BYTES_MAX: usize = 64 * 1024;
/// See [`UPSTREAM_ERROR_BYTES_MAX`].
pub const UPSTREAM_ERROR_TIME_MAX: Duration = Duration::from_secs(5);

/// How much of a finished stream's body (normally just the chunked encoding's last chunk) is read
/// so that its connection can be reused, and for how long; past either, it is closed instead.
pub const DRAIN_BYTES_MAX: usize = 64 * 1024;
/// See [`DRAIN_BYTES_MAX`].
pub const DRAIN_TIME_MAX: Duration = Duration::from_secs(1);

// API keys.

/// The most keys cached; past it the cache is cleared and refills from the store as keys are used.
pub const KEY_CACHE_MAX: usize = 1_000_000;

/// The most unknown ids remembered; past it they are forgotten (a flood of them then costs one
/// store read each again, until the set refills).
pub const UNKNOWN_KEYS_MAX: usize = 65_536;

/// How often a server sharing its database with others follows the keys created and revoked
/// elsewhere: a key made anywhere works, and a revoked one stops, within about this.
pub const KEYS_FOLLOW_INTERVAL: Duration = Duration::from_millis(500);
