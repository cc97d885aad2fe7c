//! One model call's whole life, whatever runs it: its bounds, its hold on the budget, its place
//! in the model's fair-share queue, the output it has delivered, and the one function that ends
//! it and decides what it costs.
//!
//! A call is opened by [`Call::open`] (reserve the worst case, then wait for a slot) and ended
//! exactly once by [`Call::end`], which prices the outcome, settles or voids, counts it, and says
//! what the client is to be told. The two backends (the upstream relay and the embedded model)
//! feed it: they report the output they pass on ([`Call::deliver`]) and how they ended ([`End`]).
//! They never settle, void or price anything themselves.
//!
//! The pricing rule, in one place ([`price`]):
//! - usage counted by Stipend itself (the embedded model) is exact;
//! - usage an upstream reports is taken when it agrees with what was visibly delivered (at least
//!   one prompt token, and at least as many completion tokens as chunks that carried output);
//! - otherwise (no usage, usage that contradicts the output, a call cut off) the charge is an
//!   upper bound: every prompt token the body can hold, and a token per byte of generated text
//!   delivered;
//! - and never more than the bounds the call was reserved for.

use crate::limits::TOKEN_BYTES_MAX;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use stipend_ledger::{Budget, ReservationId, Settlement};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::error::ApiError;
use crate::queue::Place;
use crate::{Gateway, Model};

/// What a call may use: the limits it is reserved for and metered against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bounds {
    /// The most prompt tokens the backend can read for the body it is sent.
    pub prompt_tokens_max: u64,
    /// Whether `prompt_tokens_max` is the exact count (the embedded model tokenized it) rather
    /// than a bound.
    pub prompt_exact: bool,
    /// The most completion tokens one choice may have: `max_tokens` as sent to the backend.
    pub max_tokens: u64,
    /// Choices computed: `n` (or `best_of`, if larger) for each prompt.
    pub choices: u64,
    /// The most completion tokens the whole call may be charged: `choices × max_tokens`, plus
    /// any predicted output the backend may bill as completion.
    pub completion_tokens_max: u64,
}

impl Bounds {
    /// The worst case in cu at `model`'s prices, or `None` if it overflows.
    pub(crate) fn worst_cu(&self, model: &Model) -> Option<u64> {
        self.prompt_tokens_max
            .checked_mul(model.price_prompt_cu)?
            .checked_add(
                self.completion_tokens_max
                    .checked_mul(model.price_completion_cu)?,
            )
    }
}

/// Token counts: reported by a backend, or charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Usage {
    pub prompt_tokens: u64,
    /// Of the prompt tokens, those read from the embedded model's prefix cache: priced at
    /// `price_cached_prompt_cu`. Always 0 for an upstream, whose caching Stipend cannot see.
    pub cached_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    /// The counts of an OpenAI `usage` object; `None` unless both are non-negative integers.
    pub(crate) fn from_json(usage: &serde_json::Value) -> Option<Usage> {
        Some(Usage {
            prompt_tokens: usage.get("prompt_tokens")?.as_u64()?,
            cached_tokens: 0,
            completion_tokens: usage.get("completion_tokens")?.as_u64()?,
        })
    }

    /// What these counts cost at `model`'s prices.
    pub(crate) fn cost_cu(&self, model: &Model) -> u64 {
        let cached = self.cached_tokens.min(self.prompt_tokens);
        (self.prompt_tokens - cached)
            .saturating_mul(model.price_prompt_cu)
            .saturating_add(cached.saturating_mul(model.price_cached_prompt_cu))
            .saturating_add(
                self.completion_tokens
                    .saturating_mul(model.price_completion_cu),
            )
    }

    /// An OpenAI `usage` object for these counts: `reported` (the backend's own, which may
    /// carry details such as cached or reasoning tokens) with its three totals replaced.
    pub(crate) fn to_json(self, reported: Option<&str>) -> String {
        let mut usage = reported
            .and_then(|text| {
                serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text).ok()
            })
            .unwrap_or_default();
        usage.insert("prompt_tokens".into(), self.prompt_tokens.into());
        usage.insert("completion_tokens".into(), self.completion_tokens.into());
        usage.insert(
            "total_tokens".into(),
            self.prompt_tokens
                .saturating_add(self.completion_tokens)
                .into(),
        );
        serde_json::Value::Object(usage).to_string()
    }
}

/// What a backend says a call computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counted {
    /// Counted by Stipend (the embedded model's own tokenizer and steps): exact.
    Exact(Usage),
    /// An upstream's report, if it made one. Checked against what was delivered.
    Reported(Option<Usage>),
}

/// Output delivered by one choice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ChoiceOutput {
    chunks: u64,
    bytes: u64,
}

/// The output a call has delivered so far: chunks that carried generated text, and its bytes,
/// per choice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Delivered {
    choices: Vec<ChoiceOutput>,
    chunks: u64,
    bytes: u64,
}

impl Delivered {
    /// Records a chunk of `bytes` of generated text from `choice`; false if the call has
    /// provably overrun its bounds with it (a choice it did not ask for, more chunks than
    /// `max_tokens`, or more text than `max_tokens` tokens can decode to).
    fn record(&mut self, bounds: &Bounds, choice: u64, bytes: u64) -> bool {
        if bytes == 0 {
            return true;
        }
        self.chunks += 1;
        self.bytes = self.bytes.saturating_add(bytes);
        if choice >= bounds.choices {
            return false;
        }
        let index = choice as usize;
        if self.choices.len() <= index {
            self.choices.resize(index + 1, ChoiceOutput::default());
        }
        let output = &mut self.choices[index];
        output.chunks += 1;
        output.bytes = output.bytes.saturating_add(bytes);
        output.chunks <= bounds.max_tokens
            && output.bytes <= bounds.max_tokens.saturating_mul(TOKEN_BYTES_MAX)
    }

    /// Whether anything was delivered.
    pub(crate) fn any(&self) -> bool {
        self.chunks > 0
    }

    /// Whether a report can be believed: a prompt is at least one token, and every chunk that
    /// carried text carried at least one.
    fn agrees_with(&self, usage: Usage) -> bool {
        usage.prompt_tokens > 0 && usage.completion_tokens >= self.chunks
    }
}

/// What a call is charged, in tokens: see the module's documentation.
pub(crate) fn price(bounds: &Bounds, counted: Counted, delivered: &Delivered) -> Usage {
    let trusted = match counted {
        Counted::Exact(usage) => Some(usage),
        Counted::Reported(Some(usage)) if delivered.agrees_with(usage) => Some(usage),
        Counted::Reported(_) => None,
    };
    let usage = trusted.unwrap_or(Usage {
        prompt_tokens: bounds.prompt_tokens_max,
        cached_tokens: 0,
        // A token decodes to at least one byte of text.
        completion_tokens: delivered.bytes,
    });
    let prompt_tokens = usage.prompt_tokens.min(bounds.prompt_tokens_max);
    Usage {
        prompt_tokens,
        cached_tokens: usage.cached_tokens.min(prompt_tokens),
        completion_tokens: usage.completion_tokens.min(bounds.completion_tokens_max),
    }
}

/// How a call ended, as its backend tells it.
#[derive(Debug)]
pub(crate) enum End {
    /// The answer is complete: the backend finished, or the call was ended at one of its bounds
    /// (`max_tokens` overrun, the time limit) with what had been made (`finish_reason:
    /// "length"`). Also a call whose client left: what was computed is charged all the same.
    Answered(Counted),
    /// The call broke off: the backend failed, or the server is shutting down. Charged for the
    /// output delivered before it (nothing, if there was none).
    BrokeOff(ApiError, Counted),
}

/// What ending a call came to.
#[derive(Debug)]
pub(crate) struct Ended {
    /// The tokens charged, which the client is shown as its usage.
    pub usage: Usage,
    /// The cu charged.
    pub charged_cu: u64,
    /// What to tell the client instead of an answer: the call broke off (`cut_short` naming the
    /// charge, if anything was charged), or its charge could not be recorded.
    pub error: Option<ApiError>,
}

/// A reservation held for a call. Settling consumes it; dropping it unsettled voids it, so
/// nothing is ever left held or charged by accident.
struct Hold {
    ledger: Arc<dyn Budget>,
    id: Option<ReservationId>,
}

impl Hold {
    /// Charges `cost_cu` and waits until the charge is durable.
    async fn settle(mut self, cost_cu: u64) -> Result<Settlement, ApiError> {
        let Some(id) = self.id.take() else {
            return Err(ApiError::Internal);
        };
        let settlement = self.ledger.settle(id, cost_cu)?.await?;
        if settlement.shortfall_cu > 0 {
            tracing::warn!(
                shortfall_cu = settlement.shortfall_cu,
                "usage beyond the reservation could not be charged in full"
            );
        }
        Ok(settlement)
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            // Already gone (timed out) is fine: either way nothing is held or charged.
            let _ = self.ledger.void(id);
        }
    }
}

/// The calls in flight, for a bounded shutdown: how many are open, and the signal that ends them.
pub struct Calls {
    open: AtomicUsize,
    idle: Notify,
    cut: watch::Sender<bool>,
}

impl Default for Calls {
    fn default() -> Calls {
        Calls {
            open: AtomicUsize::new(0),
            idle: Notify::new(),
            cut: watch::Sender::new(false),
        }
    }
}

impl Calls {
    /// Calls open now (reserved, and not yet settled or voided).
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Ends every call in flight, and any opened after: each stops its backend, is charged for
    /// what it delivered, and tells its client it was cut short.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Resolves once no call is open.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// A call counted in [`Calls`] while it lives.
struct Registered {
    gateway: Arc<Gateway>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if self.gateway.calls.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.gateway.calls.idle.notify_waiters();
        }
    }
}

/// Resolves when a call must be cut: the server cuts every call (shutdown past its drain), or
/// the call's hold on its person's balance can no longer be kept (an escrow node that could not
/// renew the lease under it; see [`Budget::hold_until`]).
#[derive(Clone)]
pub(crate) struct CutSignal {
    server: watch::Receiver<bool>,
    hold: Option<HoldWatch>,
}

/// A hold that lasts only as long as the lease under it is renewed.
#[derive(Clone)]
struct HoldWatch {
    ledger: Arc<dyn Budget>,
    id: ReservationId,
    /// The moment the call must have ended by, as last asked.
    until: std::time::Instant,
}

impl CutSignal {
    /// Resolves once the call is to be cut (at once if it already is), with what to tell its
    /// client.
    pub(crate) async fn cut(&mut self) -> ApiError {
        let server = &mut self.server;
        let shutdown = async {
            if server.wait_for(|cut| *cut).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let hold_lost = async {
            let Some(hold) = &mut self.hold else {
                return std::future::pending::<()>().await;
            };
            // Asked again each time the moment comes: a renewal moves it on.
            loop {
                tokio::time::sleep_until(Instant::from_std(hold.until)).await;
                match hold.ledger.hold_until(hold.id) {
                    Some(until) if until > std::time::Instant::now() => hold.until = until,
                    _ => return,
                }
            }
        };
        tokio::select! {
            () = shutdown => ApiError::ShuttingDown,
            () = hold_lost => {
                tracing::warn!("a call was cut: the lease under its hold could not be renewed");
                ApiError::LedgerUnavailable
            }
        }
    }
}

/// One model call, from its reservation to its settled charge.
pub(crate) struct Call {
    model: Arc<Model>,
    bounds: Bounds,
    hold: Hold,
    /// The hold on the key's cap, if the key has one.
    cap: Option<crate::caps::CapHold>,
    place: Place,
    deadline: Instant,
    delivered: Delivered,
    cut: CutSignal,
    client_gone: bool,
    // Last, so the call is counted until its hold and place are released.
    registered: Registered,
}

impl Call {
    /// Opens a call: reserves its worst case from `account`, then waits in the model's
    /// fair-share queue for a slot. The payer's account is charged (the account a key spends
    /// from, or an agent's); the call queues as the payer's person, so all of one person's calls,
    /// their agents' included, share one person's turn. A refusal (budget, queue)
    /// changes nothing; a caller that goes away while waiting leaves the queue and voids the
    /// reservation.
    pub(crate) async fn open(
        gateway: &Arc<Gateway>,
        payer: crate::routes::Payer,
        model: &Arc<Model>,
        bounds: Bounds,
    ) -> Result<Call, ApiError> {
        let account = payer.account;
        let worst_cu = bounds
            .worst_cu(model)
            .ok_or_else(|| ApiError::param("max_tokens", "the request is too large to price"))?;
        // A capped key holds the worst case against its cap first; a refusal by the ledger
        // below lets it go.
        let cap = match payer
            .key
            .as_ref()
            .and_then(|key| key.cap.map(|cap| (key, cap)))
        {
            None => None,
            Some((key, cap)) => {
                let policy = gateway.ledger.policy();
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |since| since.as_millis() as i64);
                let period = policy.period_index(now_ms);
                Some(gateway.caps.hold(
                    &key.id,
                    cap,
                    period,
                    policy.next_grant_at_ms(now_ms),
                    worst_cu,
                )?)
            }
        };
        let reservation = gateway.ledger.reserve(
            account,
            model.sink,
            worst_cu,
            gateway.options.reservation_timeout,
        )?;
        // The call must end before the hold can expire, counted from the reservation: time spent
        // waiting for a slot comes out of it.
        let deadline = gateway.call_deadline();
        gateway.calls.open.fetch_add(1, Ordering::SeqCst);
        let registered = Registered {
            gateway: Arc::clone(gateway),
        };
        let hold = Hold {
            ledger: Arc::clone(&gateway.ledger),
            id: Some(reservation.id()),
        };
        // The prompt's service, charged to the payer's counter on admission: exact for the
        // embedded model; for an upstream its byte bound over four (the usual bytes per token),
        // trued up to the charge when the call ends.
        let prompt_tokens = if bounds.prompt_exact {
            bounds.prompt_tokens_max
        } else {
            bounds.prompt_tokens_max.div_ceil(4)
        };
        let place = model
            .queue
            .enter(
                payer.queued_as.0,
                prompt_tokens.saturating_mul(model.price_prompt_cu),
            )
            .await?;
        Ok(Call {
            model: Arc::clone(model),
            bounds,
            hold,
            cap,
            place,
            deadline,
            delivered: Delivered::default(),
            cut: CutSignal {
                server: gateway.calls.cut.subscribe(),
                hold: gateway
                    .ledger
                    .hold_until(reservation.id())
                    .map(|until| HoldWatch {
                        ledger: Arc::clone(&gateway.ledger),
                        id: reservation.id(),
                        until,
                    }),
            },
            client_gone: false,
            registered,
        })
    }

    /// The model.
    pub(crate) fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Choices the call computes (each metered on its own).
    pub(crate) fn choices(&self) -> u64 {
        self.bounds.choices
    }

    /// When the call must end: before its hold could expire, however slowly it runs.
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The signal that the call is to be cut.
    pub(crate) fn cut_signal(&self) -> CutSignal {
        self.cut.clone()
    }

    /// Records a chunk of generated text passed on from `choice` (its bytes, decoded); false if
    /// the call has provably overrun its `max_tokens` with it and must be ended.
    pub(crate) fn deliver(&mut self, choice: u64, bytes: u64) -> bool {
        if bytes > 0 {
            // Service delivered, for the fair-share counter: about a token a chunk.
            self.place.charge(self.model.price_completion_cu);
        }
        self.delivered.record(&self.bounds, choice, bytes)
    }

    /// Whether any output was delivered.
    pub(crate) fn delivered_any(&self) -> bool {
        self.delivered.any()
    }

    /// Notes that the client left: the call goes on (or, for the embedded model, stops and is
    /// charged what it computed), and nothing more is sent.
    pub(crate) fn client_left(&mut self) {
        self.client_gone = true;
    }

    /// Ends a call that failed before any output: voids it, and returns what to tell the client
    /// (the error, or why its end could not be recorded).
    pub(crate) async fn fail(self, error: ApiError) -> ApiError {
        let ended = self
            .end(End::BrokeOff(error.clone(), Counted::Reported(None)))
            .await;
        ended.error.unwrap_or(error)
    }

    /// Ends the call: prices it, frees its slot, settles the charge (durably) or voids the
    /// hold, counts it, and says what the client is to be told.
    pub(crate) async fn end(self, end: End) -> Ended {
        let Call {
            model,
            bounds,
            hold,
            cap,
            place,
            delivered,
            client_gone,
            registered,
            ..
        } = self;
        let (counted, broke_off) = match end {
            End::Answered(counted) => (counted, None),
            End::BrokeOff(error, counted) => (counted, Some(error)),
        };
        // A call that broke off before any output is charged nothing (invariant 3).
        let usage = if broke_off.is_some() && !delivered.any() {
            Usage::default()
        } else {
            price(&bounds, counted, &delivered)
        };
        if let Counted::Reported(Some(reported)) = counted
            && usage != reported
        {
            tracing::warn!(
                model = %model.name,
                reported_prompt_tokens = reported.prompt_tokens,
                reported_completion_tokens = reported.completion_tokens,
                charged_prompt_tokens = usage.prompt_tokens,
                charged_completion_tokens = usage.completion_tokens,
                "the upstream's usage is beyond the request's bounds or below what it delivered"
            );
        }
        let cost_cu = usage.cost_cu(&model);
        // The slot is free while the charge is made durable.
        place.finish(cost_cu);
        let settled = if usage == Usage::default() {
            drop(hold); // nothing computed: void
            Ok(0)
        } else {
            hold.settle(cost_cu)
                .await
                .map(|settlement| settlement.charged_cu)
        };
        // Output had begun and did not end as it should: the client saw a cut, or left one.
        if delivered.any() && (broke_off.is_some() || client_gone) {
            model.counters.stream_cut_short();
        }
        drop(registered);
        match settled {
            Ok(charged_cu) => {
                model.counters.charged(charged_cu);
                if let Some(cap) = cap {
                    cap.settle(charged_cu);
                }
                let error = broke_off.map(|error| {
                    tracing::warn!(model = %model.name, ?error, charged_cu, "a call broke off");
                    if charged_cu > 0 {
                        ApiError::CutShort {
                            reason: error.reason(),
                            charged_cu,
                        }
                    } else {
                        error
                    }
                });
                Ended {
                    usage,
                    charged_cu,
                    error,
                }
            }
            Err(error) => {
                tracing::error!(model = %model.name, ?error, "a call's charge could not be recorded");
                Ended {
                    usage: Usage::default(),
                    charged_cu: 0,
                    error: Some(error),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: Bounds = Bounds {
        prompt_tokens_max: 100,
        prompt_exact: false,
        max_tokens: 10,
        choices: 2,
        completion_tokens_max: 20,
    };

    fn delivered(chunks: &[(u64, u64)]) -> Delivered {
        let mut delivered = Delivered::default();
        for (choice, bytes) in chunks {
            delivered.record(&BOUNDS, *choice, *bytes);
        }
        delivered
    }

    fn usage(prompt_tokens: u64, completion_tokens: u64) -> Usage {
        Usage {
            prompt_tokens,
            cached_tokens: 0,
            completion_tokens,
        }
    }

    #[test]
    fn a_report_that_agrees_with_the_output_is_charged_as_reported() {
        let three_chunks = delivered(&[(0, 5), (0, 4), (1, 3)]);
        assert_eq!(
            price(
                &BOUNDS,
                Counted::Reported(Some(usage(40, 3))),
                &three_chunks
            ),
            usage(40, 3)
        );
        // Nothing delivered (a plain answer with empty text): a report of no completion is fine.
        assert_eq!(
            price(
                &BOUNDS,
                Counted::Reported(Some(usage(40, 0))),
                &Delivered::default()
            ),
            usage(40, 0)
        );
    }

    #[test]
    fn a_missing_or_contradicted_report_is_charged_an_upper_bound() {
        let three_chunks = delivered(&[(0, 5), (0, 4), (1, 3)]);
        let bound = usage(100, 12);
        assert_eq!(
            price(&BOUNDS, Counted::Reported(None), &three_chunks),
            bound
        );
        // Zero for a non-empty answer, fewer tokens than chunks, no prompt at all.
        for report in [usage(0, 0), usage(40, 2), usage(0, 3)] {
            assert_eq!(
                price(&BOUNDS, Counted::Reported(Some(report)), &three_chunks),
                bound,
                "{report:?}"
            );
        }
        // The byte bound is capped by the completion bound.
        let long = delivered(&[(0, 2_000)]);
        assert_eq!(
            price(&BOUNDS, Counted::Reported(None), &long),
            usage(100, 20)
        );
    }

    #[test]
    fn nothing_is_charged_beyond_the_bounds_even_when_counted_exactly() {
        assert_eq!(
            price(
                &BOUNDS,
                Counted::Reported(Some(usage(1_000, 1_000))),
                &Delivered::default()
            ),
            usage(100, 20)
        );
        assert_eq!(
            price(&BOUNDS, Counted::Exact(usage(7, 0)), &delivered(&[(0, 50)])),
            usage(7, 0),
            "exact counts are not second-guessed"
        );
    }

    #[test]
    fn cached_prompt_tokens_are_priced_apart_and_never_above_the_prompt() {
        let counted = Usage {
            prompt_tokens: 60,
            cached_tokens: 45,
            completion_tokens: 5,
        };
        let charged = price(&BOUNDS, Counted::Exact(counted), &Delivered::default());
        assert_eq!(charged, counted);
        // Cached tokens beyond the prompt are a bug's count: never more than the prompt.
        let impossible = price(
            &BOUNDS,
            Counted::Exact(Usage {
                cached_tokens: 500,
                ..counted
            }),
            &Delivered::default(),
        );
        assert_eq!(impossible.cached_tokens, 60);
        // An upstream's report is never taken as cached: its caching is not ours to see.
        assert_eq!(
            Usage::from_json(&serde_json::json!({
                "prompt_tokens": 60,
                "completion_tokens": 5,
                "prompt_tokens_details": {"cached_tokens": 45},
            })),
            Some(usage(60, 5))
        );
    }

    #[test]
    fn an_overrun_is_seen_at_the_first_chunk_past_the_bounds() {
        let mut delivered = Delivered::default();
        for _ in 0..BOUNDS.max_tokens {
            assert!(delivered.record(&BOUNDS, 0, 1));
        }
        assert!(delivered.record(&BOUNDS, 1, 1), "the other choice has room");
        assert!(
            !delivered.record(&BOUNDS, 0, 1),
            "an eleventh token for choice 0"
        );
        assert!(
            !Delivered::default().record(&BOUNDS, 2, 1),
            "a choice not asked for"
        );
        assert!(
            !Delivered::default().record(&BOUNDS, 0, BOUNDS.max_tokens * TOKEN_BYTES_MAX + 1),
            "more text than ten tokens can hold"
        );
        assert!(
            Delivered::default().record(&BOUNDS, 0, 0),
            "empty text is no output"
        );
    }
}
