//! Stipend's HTTP edge: an OpenAI-compatible API in front of the models, where every call is
//! priced at its worst case, reserved, served, and settled for exactly what it used.
//!
//! This crate is where the wire ends: it knows HTTP, JSON and the OpenAI format, and turns them
//! into ledger calls (`reserve`, `settle`, `void`) on a `stipend_ledger::Budget`, which knows
//! none of them.

pub mod access;
pub mod call;
pub mod caps;
mod embedded;
pub mod error;
mod http1;
pub mod keys;
pub mod limits;
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

use stipend_ledger::{AccountId, Budget};

pub use access::Access;
pub use call::Calls;
pub use caps::KeyCaps;
pub use error::ApiError;
pub use keys::KeyRing;
pub use limits::{GatewayOptions, RESERVATION_MARGIN, RESERVATION_TIMEOUT, UPSTREAM_TIMEOUT_MAX};
pub use routes::{Payer, authenticate, chat_in_process, metrics_router, router};
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
    /// cu per prompt token read from the embedded model's prefix cache instead of computed; at
    /// most `price_prompt_cu`, so that a call's worst case, priced with no hit, bounds it.
    pub price_cached_prompt_cu: u64,
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

/// The header of a plain answer that says what it was charged, in cu.
pub const CHARGED_HEADER: &str = "x-stipend-charged-cu";

/// Everything a request handler needs.
pub struct Gateway {
    /// The ledger: the single-node `Ledger`, or an escrow `Node` of several.
    pub ledger: Arc<dyn Budget>,
    /// The API keys.
    pub keys: KeyRing,
    /// Which models each account may use.
    pub access: Access,
    /// What capped keys spent this period.
    pub caps: Arc<KeyCaps>,
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
