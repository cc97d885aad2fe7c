//! Server-sent events: splitting an upstream's stream into its events' data, and writing events
//! and `text/event-stream` responses.

use crate::limits::SSE_EVENT_BYTES_MAX;
use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::error::ApiError;

/// The event that ends an OpenAI stream.
pub(crate) const DONE: &[u8] = b"data: [DONE]\n\n";

/// Splits an SSE byte stream into the `data:` payloads of its events.
#[derive(Default)]
pub(crate) struct SseParser {
    /// The start of an event not yet complete.
    buffer: Vec<u8>,
    /// Where in `buffer` the search for the blank line that ends the event goes on: every
    /// position before it was looked at. Without it, an event arriving in many small reads was
    /// searched from its start on each read, quadratic in its size: a slow upstream could keep
    /// the HTTP worker busy for seconds with one 1 MiB event sent a few bytes at a time.
    searched: usize,
}

impl SseParser {
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, ApiError> {
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

/// One SSE event carrying `value`.
pub(crate) fn event(value: &Value) -> Bytes {
    let mut out = Vec::new();
    // Writing a JSON value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, value);
    let mut framed = Vec::with_capacity(out.len() + 8);
    write_raw(&mut framed, &out);
    Bytes::from(framed)
}

/// Appends one SSE event carrying JSON text.
pub(crate) fn write_raw(out: &mut Vec<u8>, json: &[u8]) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(json);
    out.extend_from_slice(b"\n\n");
}

/// A `text/event-stream` response whose body is what arrives on `receiver`; the body ends when
/// every sender is gone, and the client leaving closes the channel.
pub(crate) fn response(receiver: mpsc::Receiver<Bytes>) -> Response {
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
}
