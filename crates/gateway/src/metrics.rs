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
            Err(ApiError::BudgetExhausted { .. } | ApiError::KeyCapReached { .. }) => {
                Outcome::BudgetExhausted
            }
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

    /// Compute charged so far, in cu.
    pub fn charged_cu(&self) -> u64 {
        self.charged_cu.load(Ordering::Relaxed)
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
    /// Embedded models' prefix caches: hits, tokens reused, evictions, by model.
    pub prefix_cache: Vec<(String, stipend_model::CacheStats)>,
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

/// The Prometheus text format, one metric family at a time.
struct Exposition {
    out: String,
}

impl Exposition {
    /// Starts a family: its help and its type.
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample. Label values are configured model names and fixed words, which need no
    /// escaping (model names are letters, digits and `- _ . : /`).
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (index, (label, text)) in labels.iter().enumerate() {
                if index > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{label}=\"{text}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A histogram's samples: its cumulative buckets, `+Inf`, the sum in seconds and the count.
    fn histogram(
        &mut self,
        name: &str,
        label: (&str, &str),
        buckets: impl IntoIterator<Item = (f64, u64)>,
        sum_us: u64,
        count: u64,
    ) {
        let bucket_name = format!("{name}_bucket");
        for (bound, value) in buckets {
            self.sample(&bucket_name, &[label, ("le", &bound.to_string())], value);
        }
        self.sample(&bucket_name, &[label, ("le", "+Inf")], count);
        self.sample(&format!("{name}_sum"), &[label], sum_us as f64 / 1e6);
        self.sample(&format!("{name}_count"), &[label], count);
    }
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// The fair-share queues' gauges and counters.
fn render_queues(out: &mut Exposition, queues: &[QueueView<'_>]) {
    out.family(
        "stipend_queue_running",
        "gauge",
        "Requests holding a slot of a model, read together with stipend_queue_depth.",
    );
    for queue in queues {
        out.sample(
            "stipend_queue_running",
            &[("model", queue.model)],
            queue.running,
        );
    }
    out.family(
        "stipend_queue_depth",
        "gauge",
        "Requests waiting in a model's fair-share queue.",
    );
    for queue in queues {
        out.sample(
            "stipend_queue_depth",
            &[("model", queue.model)],
            queue.waiting,
        );
    }
    out.family(
        "stipend_queue_rejections_total",
        "counter",
        "Requests the fair-share queue turned away, by reason.",
    );
    for queue in queues {
        for (reason, count) in crate::queue::REJECTIONS
            .iter()
            .zip(&queue.counters.rejected)
        {
            out.sample(
                "stipend_queue_rejections_total",
                &[("model", queue.model), ("reason", reason.as_str())],
                load(count),
            );
        }
    }
    out.family(
        "stipend_queue_wait_seconds",
        "histogram",
        "Time from reservation to a slot, for requests given one.",
    );
    for queue in queues {
        let counters = queue.counters;
        out.histogram(
            "stipend_queue_wait_seconds",
            ("model", queue.model),
            crate::queue::WAIT_BUCKETS_S
                .iter()
                .zip(&counters.wait_buckets)
                .map(|(bound, bucket)| (*bound, load(bucket))),
            load(&counters.wait_sum_us),
            load(&counters.admitted),
        );
    }
}

/// Each model's requests: outcomes, compute charged, failures, streams cut short, latency.
fn render_requests(out: &mut Exposition, models: &[(&str, &Counters)], unrouted: &Counters) {
    out.family(
        "stipend_requests_total",
        "counter",
        "API requests by model and outcome (model \"\" before a model was known).",
    );
    for (model, counters) in models.iter().copied().chain([("", unrouted)]) {
        for outcome in OUTCOMES {
            out.sample(
                "stipend_requests_total",
                &[("model", model), ("outcome", outcome.label())],
                counters.outcome_count(outcome),
            );
        }
    }
    out.family(
        "stipend_charged_cu_total",
        "counter",
        "Compute charged, in cu (1 cu = 1 GFLOP).",
    );
    for (model, counters) in models {
        out.sample(
            "stipend_charged_cu_total",
            &[("model", model)],
            load(&counters.charged_cu),
        );
    }
    out.family(
        "stipend_upstream_errors_total",
        "counter",
        "Upstream failures and timeouts, by model.",
    );
    for (model, counters) in models {
        let errors = counters.outcome_count(Outcome::UpstreamError)
            + counters.outcome_count(Outcome::UpstreamTimeout);
        out.sample("stipend_upstream_errors_total", &[("model", model)], errors);
    }
    out.family(
        "stipend_streams_cut_short_total",
        "counter",
        "Streams that ended early: the upstream broke off or the client left.",
    );
    for (model, counters) in models {
        out.sample(
            "stipend_streams_cut_short_total",
            &[("model", model)],
            load(&counters.streams_cut_short),
        );
    }
    out.family(
        "stipend_request_duration_seconds",
        "histogram",
        "Time to answer (streams: to the first byte), by model.",
    );
    for (model, counters) in models {
        out.histogram(
            "stipend_request_duration_seconds",
            ("model", model),
            LATENCY_BUCKETS_S
                .iter()
                .zip(&counters.latency_buckets)
                .map(|(bound, bucket)| (*bound, load(bucket))),
            load(&counters.latency_sum_us),
            load(&counters.latency_count),
        );
    }
}

/// What is read at scrape time: calls in flight, busy slots, the ledger's reservations and
/// commits.
fn render_gauges(out: &mut Exposition, gauges: &Gauges) {
    out.family(
        "stipend_upstream_in_flight",
        "gauge",
        "Requests in flight, by model: upstream, or holding a slot of an embedded model.",
    );
    for (model, in_flight) in &gauges.in_flight {
        out.sample("stipend_upstream_in_flight", &[("model", model)], in_flight);
    }
    out.family(
        "stipend_model_slots_busy",
        "gauge",
        "An embedded model's sequence slots generating right now.",
    );
    for (model, busy) in &gauges.slots_busy {
        out.sample("stipend_model_slots_busy", &[("model", model)], busy);
    }
    type Read = fn(&stipend_model::CacheStats) -> u64;
    let cache_families: [(&str, &str, Read); 3] = [
        (
            "stipend_prefix_cache_hits_total",
            "Calls to an embedded model that reused cached prompt tokens.",
            |stats| stats.hits,
        ),
        (
            "stipend_prefix_cache_tokens_total",
            "Prompt tokens an embedded model read from its prefix cache instead of computing.",
            |stats| stats.cached_tokens,
        ),
        (
            "stipend_prefix_cache_evictions_total",
            "Slots of an embedded model whose cached tokens were cleared for a call that could not reuse them.",
            |stats| stats.evictions,
        ),
    ];
    for (name, help, value) in cache_families {
        out.family(name, "counter", help);
        for (model, stats) in &gauges.prefix_cache {
            out.sample(name, &[("model", model)], value(stats));
        }
    }
    out.family(
        "stipend_reservations_open",
        "gauge",
        "Reservations open now.",
    );
    out.sample("stipend_reservations_open", &[], gauges.reservations_open);
    out.family(
        "stipend_ledger_commits_total",
        "counter",
        "Group commits to the store.",
    );
    out.sample("stipend_ledger_commits_total", &[], gauges.ledger_commits);
    out.family(
        "stipend_ledger_checkpoints_total",
        "counter",
        "Checkpoints of account state.",
    );
    out.sample(
        "stipend_ledger_checkpoints_total",
        &[],
        gauges.ledger_checkpoints,
    );
    out.family(
        "stipend_ledger_commit_seconds_total",
        "counter",
        "Time spent inside store commits.",
    );
    out.sample(
        "stipend_ledger_commit_seconds_total",
        &[],
        gauges.ledger_commit_seconds,
    );
}

/// Renders every counter in the Prometheus text format.
pub fn render(
    models: &[(&str, &Counters)],
    unrouted: &Counters,
    gauges: &Gauges,
    queues: &[QueueView<'_>],
) -> String {
    let mut out = Exposition { out: String::new() };
    render_queues(&mut out, queues);
    render_requests(&mut out, models, unrouted);
    render_gauges(&mut out, gauges);
    out.out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::QueueCounters;

    /// The whole exposition for fixed counts: names, labels, help texts and bucket bounds are
    /// what dashboards and alerts are built on, so any change to them shows here.
    #[test]
    fn the_exposition_is_stable() {
        let model = Counters::default();
        model.request(Outcome::Ok, Duration::from_millis(30));
        model.request(Outcome::Ok, Duration::from_millis(700));
        model.request(Outcome::BudgetExhausted, Duration::from_micros(400));
        model.request(Outcome::UpstreamTimeout, Duration::from_secs(3));
        model.charged(1_234);
        model.stream_cut_short();
        let unrouted = Counters::default();
        unrouted.request(Outcome::Unauthorized, Duration::from_micros(50));
        let queue = QueueCounters::default();
        queue.rejected[1].store(2, Ordering::Relaxed);
        // Cumulative, as the queue counts them: one wait within 0.1 s, two more within 0.25 s.
        for (index, bucket) in queue.wait_buckets.iter().enumerate().skip(3) {
            bucket.store(if index == 3 { 1 } else { 3 }, Ordering::Relaxed);
        }
        queue.wait_sum_us.store(450_000, Ordering::Relaxed);
        queue.admitted.store(3, Ordering::Relaxed);
        let gauges = Gauges {
            reservations_open: 4,
            ledger_commits: 17,
            ledger_checkpoints: 2,
            ledger_commit_seconds: 0.125,
            in_flight: vec![("smollm2-135m".to_string(), 3)],
            slots_busy: vec![("smollm2-135m".to_string(), 2)],
            prefix_cache: vec![(
                "smollm2-135m".to_string(),
                stipend_model::CacheStats {
                    hits: 5,
                    cached_tokens: 640,
                    evictions: 1,
                },
            )],
        };
        let text = render(
            &[("smollm2-135m", &model)],
            &unrouted,
            &gauges,
            &[QueueView {
                model: "smollm2-135m",
                running: 2,
                waiting: 5,
                counters: &queue,
            }],
        );
        insta::assert_snapshot!(text);
    }
}
