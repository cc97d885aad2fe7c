//! The `honest…` models: an upstream that computes exactly what a body asks for, reports it (or,
//! in its hostile variants, lies about it or overruns), and counts what it computed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::Computed;

/// Fields that steer the generation rather than being read by the model.
const KNOBS: &[&str] = &[
    "model",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "best_of",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "user",
    "logprobs",
    "top_logprobs",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "echo",
];

/// What the model's usage report says.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Report {
    Exact,
    Zero,
    Low,
    None,
}

/// The variant, from the model's name.
#[derive(Clone, Copy)]
struct Mode {
    reasoning: bool,
    tokens_per_chunk: u64,
    token_delay: Duration,
    report: Report,
    runaway: bool,
    stray: bool,
}

impl Mode {
    fn of(model: &str) -> Mode {
        let has = |part: &str| model.split('-').any(|word| word == part);
        Mode {
            reasoning: has("reasoning"),
            tokens_per_chunk: if has("chunky") { 10 } else { 1 },
            token_delay: if has("slow") {
                Duration::from_millis(2)
            } else {
                Duration::ZERO
            },
            report: if model.contains("-zero-usage") {
                Report::Zero
            } else if model.contains("-low-usage") {
                Report::Low
            } else if model.contains("-no-usage") {
                Report::None
            } else {
                Report::Exact
            },
            runaway: has("runaway"),
            stray: has("stray"),
        }
    }
}

/// Tokens of text: about four bytes each.
fn tokens_of(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(4)
}

/// The prompt tokens of each prompt the model reads: a chat's one, or each of a completion's.
/// Everything in the body but the knobs is read; a list of token ids is one token each.
fn prompts(request: &Value, chat: bool) -> Vec<u64> {
    let Some(fields) = request.as_object() else {
        return vec![1];
    };
    let shared: usize = fields
        .iter()
        .filter(|(key, _)| !KNOBS.contains(&key.as_str()) && (chat || *key != "prompt"))
        .map(|(key, value)| key.len() + value.to_string().len())
        .sum();
    let one = |prompt: &Value| match prompt {
        Value::Array(ids) if ids.iter().all(Value::is_number) => {
            ids.len() as u64 + tokens_of(shared)
        }
        other => tokens_of(other.to_string().len() + shared),
    };
    if chat {
        return vec![tokens_of(shared).max(1)];
    }
    match &request["prompt"] {
        Value::Array(items) if !items.iter().all(Value::is_number) => {
            items.iter().map(one).collect()
        }
        prompt => vec![one(prompt)],
    }
}

/// The text of token `index` of a choice.
fn token(index: u64) -> String {
    if index == 0 {
        "t0".to_string()
    } else {
        format!(" t{index}")
    }
}

/// Answers a request to an `honest…` model.
pub(crate) async fn answer(
    request: &Value,
    chat: bool,
    model: &str,
    computed: Arc<Computed>,
) -> Response {
    let mode = Mode::of(model);
    let max_tokens = request["max_tokens"].as_u64().unwrap_or(16);
    let n = request["n"].as_u64().unwrap_or(1).max(1);
    let best_of = request["best_of"].as_u64().unwrap_or(1).max(n);
    let prompts = prompts(request, chat);
    let prompt_tokens: u64 = prompts.iter().sum();
    computed
        .prompt_tokens
        .fetch_add(prompt_tokens, Ordering::SeqCst);
    let returned = prompts.len() as u64 * n;
    // Generations computed for best_of and thrown away: computed at once, never sent.
    let discarded = prompts.len() as u64 * (best_of - n);
    computed
        .completion_tokens
        .fetch_add(discarded * max_tokens, Ordering::SeqCst);
    let tokens = if mode.runaway {
        max_tokens * 100
    } else {
        max_tokens
    };
    let completion_tokens = (returned + discarded) * tokens;
    let usage = match mode.report {
        Report::Exact => Some((prompt_tokens, completion_tokens)),
        Report::Zero => Some((0, 0)),
        Report::Low => Some((prompt_tokens, 1)),
        Report::None => None,
    }
    .map(|(prompt, completion)| {
        json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
    });
    let finish = "length";
    if !request["stream"].as_bool().unwrap_or(false) {
        // The generation runs whether or not anyone waits for its answer.
        let (done, finished) = tokio::sync::oneshot::channel();
        let counter = Arc::clone(&computed);
        let delay = mode.token_delay * tokens as u32;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            counter
                .completion_tokens
                .fetch_add(returned * tokens, Ordering::SeqCst);
            counter.calls_ended.fetch_add(1, Ordering::SeqCst);
            let _ = done.send(());
        });
        let _ = finished.await;
        let choices: Vec<Value> = (0..returned)
            .map(|index| {
                let text: String = (0..tokens).map(token).collect();
                if !chat {
                    return json!({"index": index, "text": text, "finish_reason": finish});
                }
                let mut message = json!({"role": "assistant", "content": text});
                if mode.reasoning {
                    let half = tokens / 2;
                    message["reasoning_content"] = json!((0..half).map(token).collect::<String>());
                    message["content"] = json!((half..tokens).map(token).collect::<String>());
                }
                json!({"index": index, "message": message, "finish_reason": finish})
            })
            .collect();
        let mut body = json!({
            "id": "honest-1",
            "object": if chat { "chat.completion" } else { "text_completion" },
            "created": 0,
            "model": model,
            "choices": choices,
        });
        if let Some(usage) = usage {
            body["usage"] = usage;
        }
        return axum::Json(body).into_response();
    }
    let stream = Stream {
        chat,
        model: model.to_string(),
        mode,
        tokens: if mode.runaway { u64::MAX } else { tokens },
        returned,
        usage,
        step: 0,
        choice: 0,
        ended: false,
        computed,
    };
    let events = futures_util::stream::unfold(stream, |mut stream| async move {
        let event = stream.next().await?;
        Some((Ok::<Bytes, std::io::Error>(Bytes::from(event)), stream))
    });
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(events),
    )
        .into_response()
}

/// A stream in progress: one chunk a step for each choice, then the finishes, the usage and
/// `[DONE]`. Counts its tokens as it makes them, and its end when dropped.
struct Stream {
    chat: bool,
    model: String,
    mode: Mode,
    tokens: u64,
    returned: u64,
    usage: Option<Value>,
    /// Tokens made for each choice so far.
    step: u64,
    /// The choice whose chunk is next in this step.
    choice: u64,
    ended: bool,
    computed: Arc<Computed>,
}

impl Stream {
    fn chunk(&self, choices: Value) -> String {
        let object = if self.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        format!(
            "data: {}\n\n",
            json!({"id": "honest-1", "object": object, "created": 0, "model": self.model, "choices": choices})
        )
    }

    async fn next(&mut self) -> Option<String> {
        if self.ended {
            return None;
        }
        if self.step < self.tokens {
            if self.choice == 0 {
                let pause = if self.mode.runaway {
                    Duration::from_millis(1)
                } else {
                    self.mode.token_delay * self.mode.tokens_per_chunk as u32
                };
                tokio::time::sleep(pause).await;
            }
            let count = self.mode.tokens_per_chunk.min(self.tokens - self.step);
            let text: String = (self.step..self.step + count).map(token).collect();
            self.computed
                .completion_tokens
                .fetch_add(count, Ordering::SeqCst);
            // A stray choice: one the request did not ask for, at a huge index.
            let index = if self.mode.stray && self.step >= 2 {
                1_000_000_000
            } else {
                self.choice
            };
            let reasoning = self.mode.reasoning && self.step < self.tokens / 2;
            let choice = match (self.chat, reasoning) {
                (false, _) => json!({"index": index, "text": text, "finish_reason": null}),
                (true, true) => {
                    json!({"index": index, "delta": {"reasoning_content": text}, "finish_reason": null})
                }
                (true, false) => {
                    json!({"index": index, "delta": {"content": text}, "finish_reason": null})
                }
            };
            self.choice += 1;
            if self.choice == self.returned {
                self.choice = 0;
                self.step += count;
            }
            return Some(self.chunk(json!([choice])));
        }
        self.ended = true;
        self.computed.calls_ended.fetch_add(1, Ordering::SeqCst);
        let finishes: Vec<Value> = (0..self.returned)
            .map(|index| {
                if self.chat {
                    json!({"index": index, "delta": {}, "finish_reason": "length"})
                } else {
                    json!({"index": index, "text": "", "finish_reason": "length"})
                }
            })
            .collect();
        let mut out = self.chunk(json!(finishes));
        if let Some(usage) = &self.usage {
            out.push_str(&format!(
                "data: {}\n\n",
                json!({"id": "honest-1", "object": "chat.completion.chunk", "created": 0, "model": self.model, "choices": [], "usage": usage})
            ));
        }
        out.push_str("data: [DONE]\n\n");
        Some(out)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if !self.ended {
            // Stopped by the connection closing: its generation ends here.
            self.computed.calls_ended.fetch_add(1, Ordering::SeqCst);
        }
    }
}
