//! `script`: an agent's model that does what its goal tells it, step by step, for deterministic
//! agent loops. The run's first user message holds a line `SCRIPT: [...]`, a JSON array; the
//! reply to a request is the entry at the number of assistant messages the request carries:
//!
//! - `{"call": [{"name": "files__write_file", "arguments": {...}}, ...]}`: those tool calls;
//! - `{"say": "text"}`: an answer without tool calls (the run is done).
//!
//! Past the end it answers `done`. Every answer ends with `SEEN: ` and a JSON array of the
//! contents of the tool messages (and of any user message after the first) that reached it, so
//! a test can see what the model was told: a denial's reason, a steer, a tool's result. Plain
//! answers only, with exact usage: the prompt's bytes over four, the reply's over four.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::Computed;

/// Answers one request of the `script` model.
pub(crate) fn answer(request: &Value, computed: &Arc<Computed>) -> Response {
    let messages = request["messages"].as_array().cloned().unwrap_or_default();
    let script: Vec<Value> = messages
        .iter()
        .find(|message| message["role"] == "user")
        .and_then(|message| message["content"].as_str())
        .and_then(|goal| goal.lines().find_map(|line| line.strip_prefix("SCRIPT: ")))
        .and_then(|script| serde_json::from_str(script).ok())
        .unwrap_or_default();
    let step = messages
        .iter()
        .filter(|message| message["role"] == "assistant")
        .count();
    let first_user = messages
        .iter()
        .position(|message| message["role"] == "user");
    let seen: Vec<&Value> = messages
        .iter()
        .enumerate()
        .filter(|(index, message)| {
            message["role"] == "tool" || (message["role"] == "user" && Some(*index) != first_user)
        })
        .map(|(_, message)| &message["content"])
        .collect();
    let entry = script.get(step).cloned().unwrap_or(json!({"say": "done"}));
    let message = match entry.get("call").and_then(Value::as_array) {
        Some(calls) => {
            let tool_calls: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(index, call)| {
                    json!({
                        "id": format!("call_{step}_{index}"),
                        "type": "function",
                        "function": {
                            "name": call["name"],
                            "arguments": call["arguments"].to_string(),
                        },
                    })
                })
                .collect();
            json!({"role": "assistant", "content": null, "tool_calls": tool_calls})
        }
        None => {
            let say = entry["say"].as_str().unwrap_or("done");
            let content = format!(
                "{say}\nSEEN: {}",
                Value::from(seen.into_iter().cloned().collect::<Vec<_>>())
            );
            json!({"role": "assistant", "content": content})
        }
    };
    let max_tokens = request["max_tokens"]
        .as_u64()
        .or_else(|| request["max_completion_tokens"].as_u64())
        .unwrap_or(u64::MAX);
    let prompt_tokens = crate::prompt_tokens(request);
    let completion_tokens = (message.to_string().len() as u64)
        .div_ceil(4)
        .clamp(1, max_tokens.max(1));
    computed
        .prompt_tokens
        .fetch_add(prompt_tokens, Ordering::SeqCst);
    computed
        .completion_tokens
        .fetch_add(completion_tokens, Ordering::SeqCst);
    computed.calls_ended.fetch_add(1, Ordering::SeqCst);
    let finish = if message.get("tool_calls").is_some() {
        "tool_calls"
    } else {
        "stop"
    };
    axum::Json(json!({
        "id": format!("chatcmpl-script-{step}"),
        "object": "chat.completion",
        "created": 0,
        "model": request["model"],
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }))
    .into_response()
}
