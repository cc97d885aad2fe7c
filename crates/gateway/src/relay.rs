//! Streaming: pass the upstream's chunks through as they come, charge exactly what was produced,
//! and make the charge durable before the stream's last byte (`data: [DONE]`).
//!
//! The relay runs in its own task and writes into a bounded channel that is the response body.
//! When the client goes away, hyper drops the body, the channel closes, the relay stops reading
//! the upstream (dropping the connection, so the upstream stops generating), and charges what had
//! been produced by then.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use stipend_ledger::{Ledger, ReservationId, Settlement};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::queue::Place;
use crate::rawjson::RawObject;
use crate::routes::Checked;
use crate::{Gateway, Model};

/// Chunks buffered between the upstream and a slow client.
pub(crate) const RELAY_CHANNEL_CAPACITY: usize = 64;
/// The largest single SSE event accepted from an upstream.
const SSE_EVENT_BYTES_MAX: usize = 1024 * 1024;

/// A reservation held for a request. Settling consumes it; dropping it unsettled (an error, a
/// client gone before any output) voids it, so nothing is ever left held or charged by accident.
pub(crate) struct Hold {
    ledger: Arc<Ledger>,
    id: Option<ReservationId>,
}

impl Hold {
    pub(crate) fn new(ledger: Arc<Ledger>, id: ReservationId) -> Hold {
        Hold {
            ledger,
            id: Some(id),
        }
    }

    /// Charges `cost_cu` and waits until the charge is durable.
    pub(crate) async fn settle(mut self, cost_cu: u64) -> Result<Settlement, ApiError> {
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

/// Token counts an upstream reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    pub(crate) fn from_json(usage: &Value) -> Option<Usage> {
        Some(Usage {
            prompt_tokens: usage.get("prompt_tokens")?.as_u64()?,
            completion_tokens: usage.get("completion_tokens")?.as_u64()?,
        })
    }

    /// What the usage costs, counting no more than the request could have used: the upstream was
    /// told `max_tokens`, and the prompt cannot exceed its bound, so a report beyond either is
    /// the upstream's error and is not charged to the person.
    pub(crate) fn cost_cu(&self, model: &Model, checked: &Checked) -> u64 {
        let prompt_tokens = self.prompt_tokens.min(checked.prompt_tokens_max);
        let completion_tokens = self.completion_tokens.min(checked.max_tokens);
        if (prompt_tokens, completion_tokens) != (self.prompt_tokens, self.completion_tokens) {
            tracing::warn!(
                model = %model.name,
                prompt_tokens = self.prompt_tokens,
                completion_tokens = self.completion_tokens,
                "upstream reported more usage than the request allowed; charging the bound"
            );
        }
        prompt_tokens
            .saturating_mul(model.price_prompt_cu)
            .saturating_add(completion_tokens.saturating_mul(model.price_completion_cu))
    }
}

/// Splits an SSE byte stream into the `data:` payloads of its events.
#[derive(Default)]
struct SseParser {
    /// The start of an event not yet complete.
    buffer: Vec<u8>,
    /// Where in `buffer` the search for the blank line that ends the event goes on: every
    /// position before it was looked at. Without it, an event arriving in many small reads was
    /// searched from its start on each read, quadratic in its size: a slow upstream could keep
    /// the HTTP worker busy for seconds with one 1 MiB event sent a few bytes at a time.
    searched: usize,
}

impl SseParser {
    fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, ApiError> {
        self.buffer
            .extend(bytes.iter().filter(|byte| **byte != b'\r'));
        let mut events = Vec::new();
        let mut start = 0;
        let mut from = self.searched;
        while let Some(at) = self.buffer[from..]
            .windows(2)
            .position(|pair| pair == b"\n\n")
        {
            let end = from + at;
            let event = &self.buffer[start..end];
            let mut data: Option<String> = None;
            for line in event.split(|byte| *byte == b'\n') {
                if let Some(rest) = line.strip_prefix(b"data:") {
                    let rest = String::from_utf8_lossy(rest.trim_ascii_start());
                    match &mut data {
                        None => data = Some(rest.into_owned()),
                        Some(data) => {
                            data.push('\n');
                            data.push_str(&rest);
                        }
                    }
                }
            }
            events.extend(data);
            start = end + 2;
            from = start;
        }
        self.buffer.drain(..start);
        // A blank line may still start at the last byte, once the next one comes.
        self.searched = self.buffer.len().saturating_sub(1);
        if self.buffer.len() > SSE_EVENT_BYTES_MAX {
            return Err(ApiError::Upstream(
                "a stream event is too large".to_string(),
            ));
        }
        Ok(events)
    }
}

pub(crate) fn sse(value: &Value) -> Bytes {
    let mut out = Vec::new();
    write_sse(&mut out, value);
    Bytes::from(out)
}

/// Appends one SSE event carrying `value`.
fn write_sse(out: &mut Vec<u8>, value: &Value) {
    out.extend_from_slice(b"data: ");
    // Writing a JSON value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
    out.extend_from_slice(b"\n\n");
}

/// Appends one SSE event carrying JSON text.
fn write_sse_raw(out: &mut Vec<u8>, json: &[u8]) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(json);
    out.extend_from_slice(b"\n\n");
}

/// What the relay reads of a stream chunk's choice: whether it carries output.
#[derive(serde::Deserialize)]
struct ChoiceHead<'a> {
    #[serde(borrow, default)]
    delta: Option<DeltaHead<'a>>,
    #[serde(borrow, default)]
    text: Option<std::borrow::Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct DeltaHead<'a> {
    #[serde(borrow, default)]
    content: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    tool_calls: Option<&'a serde_json::value::RawValue>,
}

/// Whether a choice produced output: text, content, or tool calls. A choice of another shape
/// produced none.
fn produced_output(choice: &serde_json::value::RawValue) -> bool {
    let Ok(choice) = serde_json::from_str::<ChoiceHead<'_>>(choice.get()) else {
        return false;
    };
    let delta = choice.delta.as_ref();
    delta
        .and_then(|delta| delta.content.as_ref())
        .is_some_and(|content| !content.is_empty())
        || choice.text.as_ref().is_some_and(|text| !text.is_empty())
        || delta
            .and_then(|delta| delta.tool_calls)
            .is_some_and(|calls| calls.get().starts_with('['))
}

enum Outcome {
    Done,
    Failed(ApiError),
    ClientGone,
}

/// Starts relaying an upstream stream; returns the response to send.
pub(crate) fn stream(
    gateway: Arc<Gateway>,
    checked: Checked,
    hold: Hold,
    upstream: crate::upstream::Body,
    timeout: Duration,
    place: Place,
) -> Response {
    let (sender, receiver) = mpsc::channel::<Bytes>(RELAY_CHANNEL_CAPACITY);
    tokio::spawn(relay(
        gateway, checked, hold, upstream, timeout, sender, place,
    ));
    sse_response(receiver)
}

/// A `text/event-stream` response whose body is what arrives on `receiver`; the body ends when
/// every sender is gone, and the client leaving closes the channel.
pub(crate) fn sse_response(receiver: mpsc::Receiver<Bytes>) -> Response {
    let body = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver
            .recv()
            .await
            .map(|bytes| (Ok::<Bytes, std::io::Error>(bytes), receiver))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

async fn relay(
    gateway: Arc<Gateway>,
    checked: Checked,
    hold: Hold,
    mut chunks: crate::upstream::Body,
    timeout: Duration,
    sender: mpsc::Sender<Bytes>,
    place: Place,
) {
    let model = Arc::clone(&checked.model);
    // The whole stream ends before its hold could expire, however slowly it trickles.
    let deadline = gateway.call_deadline();
    let mut parser = SseParser::default();
    let mut usage: Option<Usage> = None;
    let mut usage_chunk: Option<RawObject> = None;
    let model_text = crate::rawjson::string(&model.name);
    let mut chunks_with_output = 0u64;
    let outcome = 'read: loop {
        let next = tokio::select! {
            _ = sender.closed() => break 'read Outcome::ClientGone,
            next = tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + timeout),
                chunks.chunk(),
            ) => next,
        };
        let bytes = match next {
            Err(_) if tokio::time::Instant::now() >= deadline => {
                break 'read Outcome::Failed(ApiError::CutShort {
                    reason: "the call reached its time limit".to_string(),
                    charged_cu: 0,
                });
            }
            Err(_) => break 'read Outcome::Failed(ApiError::UpstreamTimeout),
            Ok(Ok(None)) if usage.is_some() => break 'read Outcome::Done,
            Ok(Ok(None)) => {
                break 'read Outcome::Failed(ApiError::Upstream(
                    "the stream ended before it was done".to_string(),
                ));
            }
            Ok(Err(_)) => {
                break 'read Outcome::Failed(ApiError::Upstream(
                    "the stream broke off".to_string(),
                ));
            }
            Ok(Ok(Some(bytes))) => bytes,
        };
        let events = match parser.push(&bytes) {
            Ok(events) => events,
            Err(error) => break 'read Outcome::Failed(error),
        };
        // Everything this read carried goes to the client in one write: a burst of events (an
        // upstream that batches, or a fast one) costs one send, not one per event.
        let mut out = Vec::new();
        let mut ended = None;
        for data in events {
            if data == "[DONE]" {
                ended = Some(Outcome::Done);
                break;
            }
            let Ok(chunk) = RawObject::parse_text(data) else {
                ended = Some(Outcome::Failed(ApiError::Upstream(
                    "a stream event is not a JSON object".to_string(),
                )));
                break;
            };
            if chunk.raw("error").is_some() {
                ended = Some(Outcome::Failed(ApiError::Upstream(
                    "it reported an error mid-stream".to_string(),
                )));
                break;
            }
            if let Some(reported) = chunk
                .get::<Value>("usage")
                .and_then(Result::ok)
                .and_then(|reported| Usage::from_json(&reported))
            {
                usage = Some(reported);
            }
            let choices = chunk
                .get::<Vec<&serde_json::value::RawValue>>("choices")
                .and_then(Result::ok)
                .unwrap_or_default();
            if choices.is_empty() {
                // The usage chunk: sent (if asked for) only once the charge is durable.
                usage_chunk = Some(chunk);
                continue;
            }
            if choices.iter().any(|choice| produced_output(choice)) {
                chunks_with_output += 1;
                // Service delivered, for the fair-share counter: about a token per chunk.
                place.charge(model.price_completion_cu);
            }
            let remove: &[&str] = if checked.include_usage {
                &[]
            } else {
                &["usage"]
            };
            write_sse_raw(&mut out, &chunk.write(&[("model", &model_text)], remove));
        }
        if !out.is_empty() && sender.send(Bytes::from(out)).await.is_err() {
            break 'read Outcome::ClientGone;
        }
        if let Some(outcome) = ended {
            break 'read outcome;
        }
    };
    // A finished stream's connection can be kept for the next call once the rest of its body
    // (the end of the chunked encoding, after `[DONE]`) is read; any other outcome closes it
    // now, so that an abandoned generation stops costing anything.
    let finished = match outcome {
        Outcome::Done => Some(chunks),
        _ => {
            drop(chunks);
            None
        }
    };
    let cost_cu = match usage {
        Some(usage) => Some(usage.cost_cu(&model, &checked)),
        // No usage (the client left, or the upstream broke off): charge what was produced, one
        // token per content chunk, and the prompt as its byte bound over four (the usual bytes
        // per token), since the prompt was processed.
        None if chunks_with_output > 0 => {
            let prompt_tokens = checked.prompt_tokens_max.div_ceil(4);
            Some(
                Usage {
                    prompt_tokens,
                    completion_tokens: chunks_with_output,
                }
                .cost_cu(&model, &checked),
            )
        }
        None => None,
    };
    // The slot is free while the charge is made durable.
    place.finish(cost_cu.unwrap_or(0));
    let settled = match cost_cu {
        Some(cost_cu) => hold.settle(cost_cu).await.map(|settlement| {
            model.counters.charged(settlement.charged_cu);
            Some(settlement)
        }),
        None => {
            drop(hold); // nothing produced: void
            Ok(None)
        }
    };
    if !matches!(outcome, Outcome::Done) {
        model.counters.stream_cut_short();
    }
    match (outcome, settled) {
        (Outcome::ClientGone, _) => {
            tracing::info!(model = %model.name, chunks_with_output, "client left mid-stream");
        }
        (Outcome::Done, Ok(_)) => {
            if checked.include_usage
                && let Some(chunk) = usage_chunk
            {
                let mut out = Vec::new();
                write_sse_raw(&mut out, &chunk.write(&[("model", &model_text)], &[]));
                let _ = sender.send(Bytes::from(out)).await;
            }
            let _ = sender.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
        }
        (Outcome::Done, Err(error)) | (Outcome::Failed(_), Err(error)) => {
            tracing::error!(model = %model.name, ?error, "a stream's charge could not be recorded");
            let _ = sender.send(sse(&error.body())).await;
        }
        (Outcome::Failed(error), Ok(settlement)) => {
            tracing::warn!(model = %model.name, ?error, chunks_with_output, "upstream stream failed");
            // Say what was charged for the output already sent, if anything was.
            let error = match settlement {
                Some(settlement) if settlement.charged_cu > 0 => ApiError::CutShort {
                    reason: error.reason(),
                    charged_cu: settlement.charged_cu,
                },
                _ => error,
            };
            let _ = sender.send(sse(&error.body())).await;
        }
    }
    drop(sender); // the client has everything: end its body now
    if let Some(body) = finished {
        drain(body).await;
    }
}

/// Reads what is left of a finished stream's body (normally just the chunked encoding's last
/// chunk), so its connection goes back to the pool; gives up, closing it, past a small bound.
async fn drain(mut body: crate::upstream::Body) {
    const DRAIN_BYTES_MAX: usize = 64 * 1024;
    const DRAIN_TIME_MAX: Duration = Duration::from_secs(1);
    let _ = tokio::time::timeout(DRAIN_TIME_MAX, async {
        let mut drained = 0;
        while let Ok(Some(piece)) = body.chunk().await {
            drained += piece.len();
            if drained > DRAIN_BYTES_MAX {
                break;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_split_across_reads() {
        let mut parser = SseParser::default();
        assert_eq!(parser.push(b"data: {\"a\"").unwrap(), Vec::<String>::new());
        assert_eq!(
            parser
                .push(b":1}\r\n\r\ndata: [DONE]\n\n: comment\n\n")
                .unwrap(),
            vec!["{\"a\":1}".to_string(), "[DONE]".to_string()]
        );
        let mut parser = SseParser::default();
        assert!(parser.push(&vec![b'x'; SSE_EVENT_BYTES_MAX + 1]).is_err());
    }

    mod properties {
        //! However the upstream's bytes are cut into reads, the same events come out.

        use proptest::prelude::*;

        use super::super::*;

        /// One event's text and the payload it carries (`None` for an event with no data).
        fn event() -> impl Strategy<Value = (String, Option<String>)> {
            let line_end = prop_oneof![Just("\n"), Just("\r\n")];
            let payload = "[{}\\[\\]\":,a-z0-9 ]{0,12}";
            (
                prop::collection::vec(payload, 0..3),
                line_end,
                any::<bool>(),
                any::<bool>(),
            )
                .prop_map(|(lines, end, comment, field)| {
                    let mut text = String::new();
                    if comment {
                        text.push_str(&format!(": keep-alive{end}"));
                    }
                    if field {
                        text.push_str(&format!("event: chunk{end}"));
                    }
                    for line in &lines {
                        text.push_str(&format!("data: {line}{end}"));
                    }
                    text.push_str(end);
                    let data = (!lines.is_empty()).then(|| {
                        lines
                            .iter()
                            .map(|line| line.trim_start().to_string())
                            .collect::<Vec<_>>()
                            .join("\n")
                    });
                    (text, data)
                })
        }

        proptest! {
            #[test]
            fn events_do_not_depend_on_where_reads_end(
                events in prop::collection::vec(event(), 0..8),
                cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
            ) {
                let stream: String = events.iter().map(|(text, _)| text.as_str()).collect();
                let expected: Vec<String> =
                    events.into_iter().filter_map(|(_, data)| data).collect();
                let mut cuts: Vec<usize> =
                    cuts.iter().map(|cut| cut.index(stream.len() + 1)).collect();
                cuts.push(0);
                cuts.push(stream.len());
                cuts.sort_unstable();
                let mut parser = SseParser::default();
                let mut got = Vec::new();
                for read in cuts.windows(2) {
                    got.extend(parser.push(&stream.as_bytes()[read[0]..read[1]]).unwrap());
                }
                prop_assert_eq!(got, expected);
            }
        }
    }

    #[test]
    fn a_large_event_in_small_reads_is_searched_once() {
        // A regression test: each read searched the whole event so far, so a 1 MiB event
        // arriving 3 bytes at a time was ~10^11 byte comparisons.
        let mut parser = SseParser::default();
        let payload = "x".repeat(SSE_EVENT_BYTES_MAX - 16);
        let event = format!("data: {payload}\n\n");
        let mut events = Vec::new();
        for read in event.as_bytes().chunks(3) {
            events.extend(parser.push(read).unwrap());
            // The next read's search starts at the end of what came, not at the event's start.
            assert_eq!(parser.searched, parser.buffer.len().saturating_sub(1));
        }
        assert_eq!(events, vec![payload]);
    }

    #[test]
    fn multi_line_data_is_joined_and_events_without_data_are_skipped() {
        let mut parser = SseParser::default();
        assert_eq!(
            parser
                .push(b"event: x\ndata: {\"a\":\ndata:1}\n\nid: 7\n\ndata:[DONE]\n\n")
                .unwrap(),
            vec!["{\"a\":\n1}".to_string(), "[DONE]".to_string()]
        );
    }

    #[test]
    fn output_is_content_text_or_tool_calls() {
        let produced = |choice: &str| {
            produced_output(serde_json::from_str::<&serde_json::value::RawValue>(choice).unwrap())
        };
        assert!(produced(r#"{"index":0,"delta":{"content":"Hi"}}"#));
        assert!(produced(r#"{"index":0,"text":"Hi"}"#));
        assert!(produced(r#"{"delta":{"tool_calls":[{"index":0}]}}"#));
        assert!(produced(r#"{"delta":{"content":"\u00e9"}}"#));
        assert!(!produced(
            r#"{"index":0,"delta":{"content":""},"finish_reason":"stop"}"#
        ));
        assert!(!produced(r#"{"delta":{"role":"assistant"}}"#));
        assert!(!produced(r#"{"delta":null}"#));
        assert!(!produced(r#"{"delta":{"tool_calls":null}}"#));
        assert!(!produced("5"));
    }
}
