//! The upstream backend: a call's body goes to an OpenAI-compatible server, and its answer comes
//! back, plain or streamed chunk by chunk, metered through the [`Call`].
//!
//! Once the upstream has a request, the call runs to its end whether or not its client stays.
//! An upstream's speed is unknown, so a call cut off when its client leaves could only be
//! charged its whole worst case, or else less than it caused; letting it finish charges exactly
//! what the upstream reports. So each call runs in a task of its own, which the client leaving
//! does not stop. It is still bounded: by its deadline (before its hold could expire), the
//! upstream's timeout between chunks, its `max_tokens` (a stream that provably overruns it is
//! cut and ends with `finish_reason: "length"`), and the server's shutdown.

use crate::limits::{DRAIN_BYTES_MAX, DRAIN_TIME_MAX, RELAY_CHANNEL_CAPACITY};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::call::{Call, Counted, End, Ended, Usage};
use crate::error::ApiError;
use crate::rawjson::{self, RawObject};
use crate::routes::Endpoint;
use crate::sse::{self, SseParser};
use crate::upstream::{Body, Upstream};

/// What the upstream backend is asked to do.
pub(crate) struct Request {
    pub upstream: Upstream,
    pub endpoint: Endpoint,
    /// The body to send, with the upstream's model name and `max_tokens` written in.
    pub body: Vec<u8>,
    pub stream: bool,
    /// Whether the client asked for the usage chunk at the end of a stream.
    pub include_usage: bool,
    /// The largest plain answer accepted.
    pub answer_bytes_max: usize,
}

/// Serves a call on an upstream: sends the request from a task of its own and answers with the
/// stream as soon as the upstream's head arrives, or with the whole answer.
pub(crate) async fn serve(call: Call, request: Request) -> Result<Response, ApiError> {
    let (reply, answer) = oneshot::channel();
    tokio::spawn(run(call, request, reply));
    answer.await.unwrap_or(Err(ApiError::Internal))
}

async fn run(call: Call, request: Request, reply: oneshot::Sender<Result<Response, ApiError>>) {
    let mut cut = call.cut_signal();
    let posted = tokio::select! {
        posted = request.upstream.post(request.endpoint.path(), &request.body) => posted,
        () = tokio::time::sleep_until(call.deadline()) => Err(ApiError::UpstreamTimeout),
        error = cut.cut() => Err(error),
    };
    let answer = match posted {
        Ok(answer) => answer,
        Err(error) => {
            let _ = reply.send(Err(call.fail(error).await));
            return;
        }
    };
    let timeout = request.upstream.timeout();
    if request.stream {
        let (sender, receiver) = mpsc::channel::<Bytes>(RELAY_CHANNEL_CAPACITY);
        let _ = reply.send(Ok(sse::response(receiver)));
        relay(call, answer, timeout, sender, &request).await;
    } else {
        let _ = reply.send(plain(call, answer, timeout, &request).await);
    }
}

/// Reads a plain answer, meters and charges it, and writes it back with the model's name and
/// the usage charged.
async fn plain(
    mut call: Call,
    body: Body,
    timeout: Duration,
    request: &Request,
) -> Result<Response, ApiError> {
    let mut cut = call.cut_signal();
    let until = call.deadline().min(Instant::now() + timeout);
    let read = tokio::select! {
        read = tokio::time::timeout_at(until, body.collect(request.answer_bytes_max)) => match read {
            Err(_) => Err(ApiError::UpstreamTimeout),
            Ok(Err(crate::http1::Error::TooLarge(limit))) => Err(ApiError::Upstream(format!(
                "its answer is larger than the limit of {limit} bytes"
            ))),
            Ok(Err(_)) => Err(ApiError::Upstream("the response broke off".to_string())),
            Ok(Ok(text)) => RawObject::parse(text).map_err(|_| {
                ApiError::Upstream("the response is not a JSON object".to_string())
            }),
        },
        error = cut.cut() => Err(error),
    };
    let answer = match read {
        Ok(answer) => answer,
        Err(error) => return Err(call.fail(error).await),
    };
    for choice in answer
        .get::<Vec<&RawValue>>("choices")
        .and_then(Result::ok)
        .unwrap_or_default()
    {
        let (index, bytes) = choice_output(choice);
        // A plain answer is bounded by its size; what it holds beyond the call's bounds is not
        // charged.
        let _ = call.deliver(index, bytes);
    }
    let reported = reported_usage(&answer);
    let model = Arc::clone(call.model());
    let ended = call.end(End::Answered(Counted::Reported(reported))).await;
    if let Some(error) = ended.error {
        return Err(error);
    }
    let model_text = rawjson::string(&model.name);
    // The usage shown is the usage charged: the upstream's own text when they agree (nearly
    // always, and then nothing is rewritten), else the charged counts.
    let written = if reported == Some(ended.usage) {
        answer.write(&[("model", &model_text)], &[])
    } else {
        let usage = ended.usage.to_json(answer.raw("usage"));
        answer.write(&[("model", &model_text), ("usage", &usage)], &[])
    };
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (
                header::HeaderName::from_static(crate::CHARGED_HEADER),
                HeaderValue::from(ended.charged_cu),
            ),
        ],
        written,
    )
        .into_response())
}

/// The usage an answer or a chunk reports, if it reports one.
fn reported_usage(object: &RawObject) -> Option<Usage> {
    object
        .get::<serde_json::Value>("usage")
        .and_then(Result::ok)
        .and_then(|usage| Usage::from_json(&usage))
}

/// How a stream's reading stopped.
enum Stop {
    /// The upstream finished (`[DONE]`, or the end of its body after its usage).
    Done,
    /// Stipend ended it at a bound (`max_tokens` overrun, the time limit) after some output.
    Length,
    /// It broke off.
    BrokeOff(ApiError),
}

/// The client's end of a stream, while it is there.
struct Client {
    sender: Option<mpsc::Sender<Bytes>>,
    deadline: Instant,
}

impl Client {
    /// Resolves when the client has gone (never, if it already has).
    async fn gone(&self) {
        match &self.sender {
            Some(sender) => sender.closed().await,
            None => std::future::pending().await,
        }
    }

    /// Sends bytes; a client that has gone, or does not read them before the call's deadline,
    /// is let go.
    async fn send(&mut self, bytes: Vec<u8>) {
        if let Some(sender) = &self.sender {
            let sent =
                tokio::time::timeout_at(self.deadline, sender.send(Bytes::from(bytes))).await;
            if !matches!(sent, Ok(Ok(()))) {
                self.sender = None;
            }
        }
    }
}

/// What a relayed stream has shown so far.
#[derive(Default)]
struct Seen {
    /// The usage the upstream reported, and its text as sent.
    usage: Option<Usage>,
    usage_text: Option<String>,
    /// The last chunk seen: the chunks Stipend writes itself (the usage, a cut's finish) copy
    /// its id and times.
    last_chunk: Option<RawObject>,
    /// The choices that have carried output, for a cut's own finish.
    choices_seen: u64,
}

impl Seen {
    /// Takes the events of one read: meters each chunk's output through the call, and writes
    /// what the client gets (if it is there) into `out`. Returns how the stream ended, if an
    /// event ended it.
    fn take(
        &mut self,
        events: Vec<String>,
        call: &mut Call,
        request: &Request,
        model_text: &str,
        to_client: bool,
        out: &mut Vec<u8>,
    ) -> Option<Stop> {
        for data in events {
            if data == "[DONE]" {
                return Some(Stop::Done);
            }
            let Ok(chunk) = RawObject::parse_text(data) else {
                return Some(Stop::BrokeOff(ApiError::Upstream(
                    "a stream event is not a JSON object".to_string(),
                )));
            };
            if chunk.raw("error").is_some() {
                return Some(Stop::BrokeOff(ApiError::Upstream(
                    "it reported an error mid-stream".to_string(),
                )));
            }
            if let Some(reported) = reported_usage(&chunk) {
                self.usage = Some(reported);
                self.usage_text = chunk.raw("usage").map(str::to_string);
            }
            let choices = chunk
                .get::<Vec<&RawValue>>("choices")
                .and_then(Result::ok)
                .unwrap_or_default();
            if choices.is_empty() {
                // The usage chunk: sent (if asked for) with the usage charged, once it is durable.
                self.last_chunk = Some(chunk);
                continue;
            }
            let mut within = true;
            for choice in &choices {
                let (index, bytes) = choice_output(choice);
                // An index past the choices asked for ends the stream; it is not echoed back.
                self.choices_seen = self
                    .choices_seen
                    .max(index.saturating_add(1).min(call.choices()));
                within &= call.deliver(index, bytes);
            }
            if !within {
                // Past max_tokens: this chunk is not passed on, and the upstream is stopped.
                self.last_chunk = Some(chunk);
                return Some(Stop::Length);
            }
            if to_client {
                // The usage is the one charged, sent at the end: none rides on content chunks.
                let written = if request.include_usage && chunk.raw("usage").is_some() {
                    chunk.write(&[("model", model_text), ("usage", "null")], &[])
                } else {
                    chunk.write(&[("model", model_text)], &["usage"])
                };
                sse::write_raw(out, &written);
            }
            self.last_chunk = Some(chunk);
        }
        None
    }

    /// The stream's last events, once its charge is durable: the error; or a cut's own finish
    /// (if Stipend cut it), the usage chunk with the usage charged (if asked for), and `[DONE]`.
    fn closing(&self, ended: Ended, stop: &Stop, request: &Request, model_text: &str) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(error) = ended.error {
            out.extend_from_slice(&sse::event(&error.body()));
            return out;
        }
        // A chunk of Stipend's own: the last chunk seen with these fields, or a bare one.
        let own = |fields: &[(&str, &str)], removed: &[&str], bare: String| match &self.last_chunk {
            Some(chunk) => chunk.write(fields, removed),
            None => bare.into_bytes(),
        };
        if matches!(stop, Stop::Length) {
            let finish = length_choices(request.endpoint, self.choices_seen.max(1));
            let written = own(
                &[("model", model_text), ("choices", &finish)],
                &["usage"],
                format!(
                    r#"{{"object":"{}","model":{model_text},"choices":{finish}}}"#,
                    request.endpoint.chunk_object()
                ),
            );
            sse::write_raw(&mut out, &written);
        }
        if request.include_usage {
            let charged = ended.usage.to_json(self.usage_text.as_deref());
            let written = own(
                &[
                    ("model", model_text),
                    ("choices", "[]"),
                    ("usage", &charged),
                ],
                &[],
                format!(
                    r#"{{"object":"{}","model":{model_text},"choices":[],"usage":{charged}}}"#,
                    request.endpoint.chunk_object()
                ),
            );
            sse::write_raw(&mut out, &written);
        }
        out.extend_from_slice(sse::DONE);
        out
    }
}

/// Relays a stream: passes each chunk on as it comes (with the model renamed), meters its
/// output, reads on to the end when the client leaves, ends the call, and then sends the usage
/// chunk (if asked for) and `[DONE]`, or the error, once the charge is durable.
async fn relay(
    mut call: Call,
    mut chunks: Body,
    timeout: Duration,
    sender: mpsc::Sender<Bytes>,
    request: &Request,
) {
    let model = Arc::clone(call.model());
    let model_text = rawjson::string(&model.name);
    let deadline = call.deadline();
    let mut cut = call.cut_signal();
    let mut client = Client {
        sender: Some(sender),
        deadline,
    };
    let mut parser = SseParser::default();
    let mut seen = Seen::default();
    let stop = loop {
        let next = tokio::select! {
            () = client.gone(), if client.sender.is_some() => {
                client.sender = None;
                left(&mut call);
                continue;
            }
            error = cut.cut() => break Stop::BrokeOff(error),
            next = tokio::time::timeout_at(
                deadline.min(Instant::now() + timeout),
                chunks.chunk(),
            ) => next,
        };
        let bytes = match next {
            Err(_) if Instant::now() >= deadline && call.delivered_any() => break Stop::Length,
            Err(_) => break Stop::BrokeOff(ApiError::UpstreamTimeout),
            Ok(Ok(None)) if seen.usage.is_some() => break Stop::Done,
            Ok(Ok(None)) => {
                break Stop::BrokeOff(ApiError::Upstream(
                    "the stream ended before it was done".to_string(),
                ));
            }
            Ok(Err(_)) => {
                break Stop::BrokeOff(ApiError::Upstream("the stream broke off".to_string()));
            }
            Ok(Ok(Some(bytes))) => bytes,
        };
        let events = match parser.push(&bytes) {
            Ok(events) => events,
            Err(error) => break Stop::BrokeOff(error),
        };
        // Everything this read carried goes to the client in one write: a burst of events (an
        // upstream that batches, or a fast one) costs one send, not one per event.
        let mut out = Vec::new();
        let to_client = client.sender.is_some();
        let ended = seen.take(events, &mut call, request, &model_text, to_client, &mut out);
        if !out.is_empty() {
            client.send(out).await;
            if client.sender.is_none() {
                left(&mut call);
            }
        }
        if let Some(stop) = ended {
            break stop;
        }
    };
    // A finished stream's connection can be kept for the next call once the rest of its body
    // (the end of the chunked encoding, after `[DONE]`) is read; any other ending closes it
    // now, so that the upstream stops generating.
    let (end, finished) = match &stop {
        Stop::Done => (End::Answered(Counted::Reported(seen.usage)), Some(chunks)),
        Stop::Length => {
            drop(chunks);
            (End::Answered(Counted::Reported(None)), None)
        }
        Stop::BrokeOff(error) => {
            drop(chunks);
            (End::BrokeOff(error.clone(), Counted::Reported(None)), None)
        }
    };
    let ended = call.end(end).await;
    if client.sender.is_some() {
        client
            .send(seen.closing(ended, &stop, request, &model_text))
            .await;
    }
    drop(client); // the client has everything: end its body now
    if let Some(body) = finished {
        drain(body).await;
    }
}

/// Notes that a stream's client left: the upstream is read on to its end, and charged.
fn left(call: &mut Call) {
    tracing::info!(model = %call.model().name, "client left mid-stream; reading the upstream to its end");
    call.client_left();
}

/// The choices of a chunk that ends `n` choices at their length.
fn length_choices(endpoint: Endpoint, n: u64) -> String {
    let choices: Vec<String> = (0..n)
        .map(|index| match endpoint {
            Endpoint::Chat => format!(
                r#"{{"index":{index},"delta":{{}},"logprobs":null,"finish_reason":"length"}}"#
            ),
            Endpoint::Completion => {
                format!(r#"{{"index":{index},"text":"","logprobs":null,"finish_reason":"length"}}"#)
            }
        })
        .collect();
    format!("[{}]", choices.join(","))
}

/// Reads what is left of a finished stream's body (normally just the chunked encoding's last
/// chunk), so its connection goes back to the pool; gives up, closing it, past a small bound.
async fn drain(mut body: Body) {
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

/// Which choice a choice object is, and how many bytes of generated text it carries: every
/// string in its `delta` (a stream's chunk), `message` (a plain chat answer) or `text` (a
/// completion) except the role. That counts `content`, `reasoning_content`, `reasoning`,
/// `refusal`, `tool_calls` and `function_call` (names and arguments), audio, and whatever other
/// text an upstream streams, so no kind of output passes unmetered. A choice that cannot be read
/// counts as choice 0 with all its bytes.
pub(crate) fn choice_output(choice: &RawValue) -> (u64, u64) {
    match serde_json::from_str::<ChoiceText>(choice.get()) {
        Ok(text) => (
            text.index.unwrap_or(0),
            text.delta.0 + text.message.0 + text.text.0,
        ),
        Err(_) => (0, choice.get().len() as u64),
    }
}

/// What the meter reads of a choice.
#[derive(Deserialize)]
struct ChoiceText {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    delta: TextBytes,
    #[serde(default)]
    message: TextBytes,
    #[serde(default)]
    text: TextBytes,
}

/// The bytes of text in a JSON value: every string in it, decoded, except the values of `role`
/// keys. Read without building the value (strings without escapes are borrowed, not copied).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct TextBytes(u64);

impl<'de> Deserialize<'de> for TextBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<TextBytes, D::Error> {
        deserializer.deserialize_any(TextVisitor)
    }
}

struct TextVisitor;

impl<'de> Visitor<'de> for TextVisitor {
    type Value = TextBytes;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<TextBytes, E> {
        Ok(TextBytes(0))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<TextBytes, E> {
        Ok(TextBytes(0))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<TextBytes, E> {
        Ok(TextBytes(0))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<TextBytes, E> {
        Ok(TextBytes(0))
    }

    fn visit_unit<E: de::Error>(self) -> Result<TextBytes, E> {
        Ok(TextBytes(0))
    }

    fn visit_none<E: de::Error>(self) -> Result<TextBytes, E> {
        Ok(TextBytes(0))
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<TextBytes, D::Error> {
        TextBytes::deserialize(deserializer)
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<TextBytes, E> {
        Ok(TextBytes(text.len() as u64))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TextBytes, A::Error> {
        let mut total = 0u64;
        while let Some(TextBytes(bytes)) = seq.next_element()? {
            total = total.saturating_add(bytes);
        }
        Ok(TextBytes(total))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TextBytes, A::Error> {
        let mut total = 0u64;
        while let Some(IsRole(role)) = map.next_key()? {
            if role {
                map.next_value::<IgnoredAny>()?;
            } else {
                total = total.saturating_add(map.next_value::<TextBytes>()?.0);
            }
        }
        Ok(TextBytes(total))
    }
}

/// Whether a key is `role`, read without copying it.
struct IsRole(bool);

impl<'de> Deserialize<'de> for IsRole {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<IsRole, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = IsRole;
            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<IsRole, E> {
                Ok(IsRole(key == "role"))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(choice: &str) -> (u64, u64) {
        choice_output(serde_json::from_str::<&RawValue>(choice).unwrap())
    }

    #[test]
    fn every_kind_of_generated_text_is_metered() {
        assert_eq!(output(r#"{"index":0,"delta":{"content":"Hi"}}"#), (0, 2));
        assert_eq!(output(r#"{"index":2,"text":"Hi"}"#), (2, 2));
        assert_eq!(
            output(r#"{"index":0,"delta":{"reasoning_content":"hmm","content":null}}"#),
            (0, 3)
        );
        assert_eq!(output(r#"{"delta":{"reasoning":"hmm!"}}"#), (0, 4));
        assert_eq!(output(r#"{"delta":{"refusal":"no"}}"#), (0, 2));
        assert_eq!(
            output(
                r#"{"delta":{"tool_calls":[{"index":0,"function":{"name":"f","arguments":"{}"}}]}}"#
            ),
            (0, 3)
        );
        assert_eq!(
            output(r#"{"delta":{"function_call":{"name":"go","arguments":"x"}}}"#),
            (0, 3)
        );
        assert_eq!(
            output(r#"{"message":{"role":"assistant","content":"\u00e9t\u00e9","refusal":null}}"#),
            (0, 5),
            "decoded bytes, and the role is not output"
        );
        assert_eq!(output(r#"{"delta":{"content":"\u00e9"}}"#), (0, 2));
        assert_eq!(output(r#"{"delta":{"some_new_field":"abc"}}"#), (0, 3));
    }

    #[test]
    fn chunks_without_generated_text_are_not_output() {
        assert_eq!(
            output(r#"{"index":0,"delta":{"content":""},"finish_reason":"stop"}"#),
            (0, 0)
        );
        assert_eq!(output(r#"{"delta":{"role":"assistant"}}"#), (0, 0));
        assert_eq!(output(r#"{"delta":null}"#), (0, 0));
        assert_eq!(output(r#"{"delta":{"tool_calls":null}}"#), (0, 0));
        assert_eq!(
            output(r#"{"index":0,"delta":{},"logprobs":{"content":[{"token":"x"}]}}"#),
            (0, 0),
            "log probabilities repeat output, they are not more of it"
        );
    }

    #[test]
    fn an_unreadable_choice_counts_all_its_bytes() {
        assert_eq!(output("5"), (0, 1));
        let odd = r#"{"index":"one","text":"abc"}"#;
        assert_eq!(output(odd), (0, odd.len() as u64));
    }
}
