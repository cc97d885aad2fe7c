//! Prometheus metrics, as text on `GET /metrics`. Counts only: labels are the configured model
//! names and a fixed set of outcomes, never a person, a key or a request.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::ApiError;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered (for a stream: started).
    Ok,
    /// A bad key.
    Unauthorized,
    /// A bad request, an unknown model, a body too large.
    Invalid,
    /// The budget could not cover it.
    BudgetExhausted,
    /// The fair-share queue turned it away.
    RateLimited,
    /// A server limit.
    Overloaded,
    /// The upstream failed.
    UpstreamError,
    /// The upstream timed out.
    UpstreamTimeout,
    /// The ledger could not be written.
    LedgerUnavailable,
    /// A bug.
    Internal,
}

const OUTCOMES: [Outcome; 10] = [
    Outcome::Ok,
    Outcome::Unauthorized,
    Outcome::Invalid,
    Outcome::BudgetExhausted,
    Outcome::RateLimited,
    Outcome::Overloaded,
    Outcome::UpstreamError,
    Outcome::UpstreamTimeout,
    Outcome::LedgerUnavailable,
    Outcome::Internal,
];

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Unauthorized => "unauthorized",
            Outcome::Invalid => "invalid",
            Outcome::BudgetExhausted => "budget_exhausted",
            Outcome::RateLimited => "rate_limited",
            Outcome::Overloaded => "overloaded",
            Outcome::UpstreamError => "upstream_error",
            Outcome::UpstreamTimeout => "upstream_timeout",
            Outcome::LedgerUnavailable => "ledger_unavailable",
            Outcome::Internal => "internal",
        }
    }

    fn index(self) -> usize {
        OUTCOMES
            .iter()
            .position(|outcome| *outcome == self)
            .unwrap_or(0)
    }

    /// The outcome of a result.
    pub fn of<T>(result: &Result<T, ApiError>) -> Outcome {
        match result {
            Ok(_) => Outcome::Ok,
            Err(ApiError::Unauthorized(_)) => Outcome::Unauthorized,
            Err(
                ApiError::InvalidRequest { .. }
                | ApiError::ContextLengthExceeded { .. }
                | ApiError::ModelNotFound(_)
                | ApiError::UnknownPath { .. }
                | ApiError::PayloadTooLarge(_)
                | ApiError::BodyTimeout(_),
            ) => Outcome::Invalid,
            Err(ApiError::BudgetExhausted { .. }) => Outcome::BudgetExhausted,
            Err(ApiError::RateLimited { .. }) => Outcome::RateLimited,
            Err(ApiError::Overloaded(_) | ApiError::ShuttingDown) => Outcome::Overloaded,
            Err(ApiError::Upstream(_) | ApiError::CutShort { .. }) => Outcome::UpstreamError,
            Err(ApiError::UpstreamTimeout) => Outcome::UpstreamTimeout,
            Err(ApiError::LedgerUnavailable) => Outcome::LedgerUnavailable,
            Err(ApiError::Internal) => Outcome::Internal,
        }
    }
}

/// Latency histogram bucket bounds, in seconds.
const LATENCY_BUCKETS_S: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// One model's counters (or, for requests refused before a model was known, the gateway's).
#[derive(Debug, Default)]
pub struct Counters {
    outcomes: [AtomicU64; OUTCOMES.len()],
    charged_cu: AtomicU64,
    streams_cut_short: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS_S.len()],
    latency_sum_us: AtomicU64,
    latency_count: AtomicU64,
}

impl Counters {
    /// Counts a request's outcome and its time to answer (for a stream: to its first byte).
    pub fn request(&self, outcome: Outcome, latency: Duration) {
        self.outcomes[outcome.index()].fetch_add(1, Ordering::Relaxed);
        let seconds = latency.as_secs_f64();
        for (bucket, bound) in self.latency_buckets.iter().zip(LATENCY_BUCKETS_S) {
            if seconds <= bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_sum_us
            .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
        self.latency_count.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts compute charged.
    pub fn charged(&self, cu: u64) {
        self.charged_cu.fetch_add(cu, Ordering::Relaxed);
    }

    /// Counts a stream that ended early (upstream failure or client gone).
    pub fn stream_cut_short(&self) {
        self.streams_cut_short.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests that ended with this outcome so far.
    pub fn outcome_count(&self, outcome: Outcome) -> u64 {
        self.outcomes[outcome.index()].load(Ordering::Relaxed)
    }
}

/// Gauges read at scrape time.
pub struct Gauges {
    /// Reservations open now.
    pub reservations_open: usize,
    /// Ledger commits so far.
    pub ledger_commits: u64,
    /// Ledger checkpoints so far.
    pub ledger_checkpoints: u64,
    /// Time inside ledger commits so far.
    pub ledger_commit_seconds: f64,
    /// Requests in flight (upstream, or in the embedded model's slots), by model.
    pub in_flight: Vec<(String, usize)>,
    /// Embedded models' slots generating right now, by model.
    pub slots_busy: Vec<(String, usize)>,
}

/// One model's fair-share queue, for `/metrics`.
pub struct QueueView<'a> {
    /// The model.
    pub model: &'a str,
    /// Requests running now (read together with `waiting`).
    pub running: usize,
    /// Requests waiting now.
    pub waiting: usize,
    /// Its counters.
    pub counters: &'a crate::queue::QueueCounters,
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders the fair-share queues' gauges and counters.
fn render_queues(out: &mut String, queues: &[QueueView<'_>]) {
    header(
        out,
        "stipend_queue_running",
        "gauge",
        "Requests holding a slot of a model, read together with stipend_queue_depth.",
    );
    for queue in queues {
        let _ = writeln!(
            out,
            "stipend_queue_running{{model=\"{}\"}} {}",
            queue.model, queue.running
        );
    }
    header(
        out,
        "stipend_queue_depth",
        "gauge",
        "Requests waiting in a model's fair-share queue.",
    );
    for queue in queues {
        let _ = writeln!(
            out,
            "stipend_queue_depth{{model=\"{}\"}} {}",
            queue.model, queue.waiting
        );
    }
    header(
        out,
        "stipend_queue_rejections_total",
        "counter",
        "Requests the fair-share queue turned away, by reason.",
    );
    for queue in queues {
        for (reason, count) in crate::queue::REJECTIONS
            .iter()
            .zip(&queue.counters.rejected)
        {
            let _ = writeln!(
                out,
                "stipend_queue_rejections_total{{model=\"{}\",reason=\"{}\"}} {}",
                queue.model,
                reason.as_str(),
                count.load(Ordering::Relaxed)
            );
        }
    }
    header(
        out,
        "stipend_queue_wait_seconds",
        "histogram",
        "Time from reservation to a slot, for requests given one.",
    );
    for queue in queues {
        let counters = queue.counters;
        for (bound, bucket) in crate::queue::WAIT_BUCKETS_S
            .iter()
            .zip(&counters.wait_buckets)
        {
            let _ = writeln!(
                out,
                "stipend_queue_wait_seconds_bucket{{model=\"{}\",le=\"{bound}\"}} {}",
                queue.model,
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = counters.admitted.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "stipend_queue_wait_seconds_bucket{{model=\"{}\",le=\"+Inf\"}} {count}",
            queue.model
        );
        let _ = writeln!(
            out,
            "stipend_queue_wait_seconds_sum{{model=\"{}\"}} {}",
            queue.model,
            counters.wait_sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "stipend_queue_wait_seconds_count{{model=\"{}\"}} {count}",
            queue.model
        );
    }
}

/// Renders every counter in the Prometheus text format.
pub fn render(
    models: &[(&str, &Counters)],
    unrouted: &Counters,
    gauges: &Gauges,
    queues: &[QueueView<'_>],
) -> String {
    let mut out = String::new();
    render_queues(&mut out, queues);
    let all: Vec<(&str, &Counters)> = models
        .iter()
        .copied()
        .chain(std::iter::once(("", unrouted)))
        .collect();
    header(
        &mut out,
        "stipend_requests_total",
        "counter",
        "API requests by model and outcome (model \"\" before a model was known).",
    );
    for (model, counters) in &all {
        for outcome in OUTCOMES {
            let _ = writeln!(
                out,
                "stipend_requests_total{{model=\"{model}\",outcome=\"{}\"}} {}",
                outcome.label(),
                counters.outcome_count(outcome)
            );
        }
    }
    header(
        &mut out,
        "stipend_charged_cu_total",
        "counter",
        "Compute charged, in cu (1 cu = 1 GFLOP).",
    );
    for (model, counters) in models {
        let _ = writeln!(
            out,
            "stipend_charged_cu_total{{model=\"{model}\"}} {}",
            counters.charged_cu.load(Ordering::Relaxed)
        );
    }
    header(
        &mut out,
        "stipend_upstream_errors_total",
        "counter",
        "Upstream failures and timeouts, by model.",
    );
    for (model, counters) in models {
        let errors = counters.outcome_count(Outcome::UpstreamError)
            + counters.outcome_count(Outcome::UpstreamTimeout);
        let _ = writeln!(
            out,
            "stipend_upstream_errors_total{{model=\"{model}\"}} {errors}"
        );
    }
    header(
        &mut out,
        "stipend_streams_cut_short_total",
        "counter",
        "Streams that ended early: the upstream broke off or the client left.",
    );
    for (model, counters) in models {
        let _ = writeln!(
            out,
            "stipend_streams_cut_short_total{{model=\"{model}\"}} {}",
            counters.streams_cut_short.load(Ordering::Relaxed)
        );
    }
    header(
        &mut out,
        "stipend_request_duration_seconds",
        "histogram",
        "Time to answer (streams: to the first byte), by model.",
    );
    for (model, counters) in models {
        for (bucket, bound) in counters.latency_buckets.iter().zip(LATENCY_BUCKETS_S) {
            let _ = writeln!(
                out,
                "stipend_request_duration_seconds_bucket{{model=\"{model}\",le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = counters.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "stipend_request_duration_seconds_bucket{{model=\"{model}\",le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "stipend_request_duration_seconds_sum{{model=\"{model}\"}} {}",
            counters.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "stipend_request_duration_seconds_count{{model=\"{model}\"}} {count}"
        );
    }
    header(
        &mut out,
        "stipend_upstream_in_flight",
        "gauge",
        "Requests in flight, by model: upstream, or holding a slot of an embedded model.",
    );
    for (model, in_flight) in &gauges.in_flight {
        let _ = writeln!(
            out,
            "stipend_upstream_in_flight{{model=\"{model}\"}} {in_flight}"
        );
    }
    header(
        &mut out,
        "stipend_model_slots_busy",
        "gauge",
        "An embedded model's sequence slots generating right now.",
    );
    for (model, busy) in &gauges.slots_busy {
        let _ = writeln!(out, "stipend_model_slots_busy{{model=\"{model}\"}} {busy}");
    }
    header(
        &mut out,
        "stipend_reservations_open",
        "gauge",
        "Reservations open now.",
    );
    let _ = writeln!(
        out,
        "stipend_reservations_open {}",
        gauges.reservations_open
    );
    header(
        &mut out,
        "stipend_ledger_commits_total",
        "counter",
        "Group commits to the store.",
    );
    let _ = writeln!(
        out,
        "stipend_ledger_commits_total {}",
        gauges.ledger_commits
    );
    header(
        &mut out,
        "stipend_ledger_checkpoints_total",
        "counter",
        "Checkpoints of account state.",
    );
    let _ = writeln!(
        out,
        "stipend_ledger_checkpoints_total {}",
        gauges.ledger_checkpoints
    );
    header(
        &mut out,
        "stipend_ledger_commit_seconds_total",
        "counter",
        "Time spent inside store commits.",
    );
    let _ = writeln!(
        out,
        "stipend_ledger_commit_seconds_total {}",
        gauges.ledger_commit_seconds
    );
    out
}
