//! Stipend's HTTP edge: an OpenAI-compatible API in front of the models, where every call is
//! priced at its worst case, reserved, served, and settled for exactly what it used.
//!
//! This crate is where the wire ends: it knows HTTP, JSON and the OpenAI format, and turns them
//! into ledger calls (`reserve`, `settle`, `void`) on `stipend_ledger::Ledger`, which knows
//! none of them.

pub mod call;
mod embedded;
pub mod error;
mod http1;
pub mod keys;
pub mod metrics;
pub mod queue;
mod rawjson;
mod relay;
mod routes;
pub mod server;
mod sse;
pub mod upstream;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use stipend_ledger::{AccountId, Ledger};

pub use call::Calls;
pub use error::ApiError;
pub use keys::KeyRing;
pub use routes::{metrics_router, router};
pub use upstream::{Upstream, UpstreamConfig};

/// Where a model runs.
pub enum Backend {
    /// An OpenAI-compatible server.
    Upstream {
        /// How to reach it.
        upstream: Upstream,
        /// The name it knows the model by.
        model: String,
    },
    /// The embedded model, in this process.
    Embedded(Arc<stipend_model::EmbeddedModel>),
}

/// One model clients can ask for.
pub struct Model {
    /// The name clients use.
    pub name: String,
    /// cu per prompt token.
    pub price_prompt_cu: u64,
    /// cu per completion token.
    pub price_completion_cu: u64,
    /// Where its spent compute goes.
    pub sink: AccountId,
    /// Where it runs.
    pub backend: Backend,
    /// Its capacity (for the embedded model: its slots) and the fair-share queue in front.
    pub queue: Arc<queue::FairQueue>,
    /// The same number, for display.
    pub max_concurrency: usize,
    /// Its counters.
    pub counters: metrics::Counters,
}

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
    /// a listener of its own ([`metrics_router`]).
    pub metrics_on_api: bool,
}

/// How long a call's reservation stays open by default.
pub const RESERVATION_TIMEOUT: Duration = Duration::from_secs(3_600);

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

/// The header of a plain answer that says what it was charged, in cu.
pub const CHARGED_HEADER: &str = "x-stipend-charged-cu";

/// How long before its reservation would expire a call is ended.
pub const RESERVATION_MARGIN: Duration = Duration::from_secs(60);

/// The longest an upstream may be given to start answering or between chunks; well under the
/// reservation, so a stalled upstream always times out while the hold still stands.
pub const UPSTREAM_TIMEOUT_MAX: Duration = Duration::from_secs(600);

/// Everything a request handler needs.
pub struct Gateway {
    /// The ledger.
    pub ledger: Arc<Ledger>,
    /// The API keys.
    pub keys: KeyRing,
    /// The models, by name.
    pub models: BTreeMap<String, Arc<Model>>,
    /// The limits.
    pub options: GatewayOptions,
    /// Counters for requests refused before a model was known.
    pub unrouted: metrics::Counters,
    /// The calls in flight.
    pub calls: Calls,
}

impl Gateway {
    /// When a call starting now must end: `RESERVATION_MARGIN` before its hold could expire,
    /// however slowly it runs.
    pub(crate) fn call_deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now()
            + self
                .options
                .reservation_timeout
                .saturating_sub(RESERVATION_MARGIN)
    }
}
