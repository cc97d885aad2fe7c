//! The embedded backend: an OpenAI request becomes a prompt for the in-process model, the
//! model's events become an OpenAI response (plain or SSE), and the charge is exactly the tokens
//! the model computed, counted by its own tokenizer.
//!
//! Each call is driven by a task of its own that holds the reservation and the model's slot, so
//! a client that leaves (mid-stream, or while waiting for a plain answer) stops the generation at
//! the next step and is charged for what was computed until then, never more and never nothing.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use stipend_model::{
    ChatMessage, EmbeddedModel, Event, FinishReason, Generate, Generation, ModelError, Sampling,
    TokenCounts,
};
use tokio::sync::{mpsc, oneshot};

use crate::call::{Bounds, Call, Counted, End, Usage};
use crate::error::ApiError;
use crate::routes::{Endpoint, Parsed};
use crate::{Backend, sse};

impl From<ModelError> for ApiError {
    fn from(error: ModelError) -> ApiError {
        match error {
            ModelError::ContextLengthExceeded {
                n_ctx,
                prompt_tokens,
                max_tokens,
            } => context_length(
                n_ctx as u64,
                prompt_tokens as u64,
                max_tokens as u64,
                "messages",
            ),
            ModelError::Invalid { param, reason } => ApiError::param(param, reason),
            ModelError::Template(reason) => ApiError::InvalidRequest {
                message: format!("The messages do not fit this model's chat template: {reason}"),
                param: Some("messages".to_string()),
            },
            ModelError::Busy => {
                ApiError::Overloaded("The model is at capacity; try again shortly.".to_string())
            }
            error @ (ModelError::Load { .. } | ModelError::Failed(_)) => {
                tracing::error!(%error, "the embedded model failed");
                ApiError::Upstream("the embedded model failed".to_string())
            }
        }
    }
}

fn context_length(
    n_ctx: u64,
    prompt_tokens: u64,
    max_tokens: u64,
    param: &'static str,
) -> ApiError {
    ApiError::ContextLengthExceeded {
        message: format!(
            "This model's maximum context length is {n_ctx} tokens. However, you requested {} tokens ({prompt_tokens} in the {param}, {max_tokens} in the completion). Please reduce the length of the {param} or the completion.",
            prompt_tokens + max_tokens
        ),
        param,
    }
}

/// Refuses what this model cannot do, rather than quietly doing something else.
fn refuse_unsupported(request: &Map<String, Value>) -> Result<(), ApiError> {
    let given = |key: &str| match request.get(key) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Array(items)) => !items.is_empty(),
        Some(Value::Object(fields)) => !fields.is_empty(),
        Some(_) => true,
    };
    for (key, what) in [
        ("functions", "function calls (it takes `tools`)"),
        ("logprobs", "logprobs"),
        ("top_logprobs", "logprobs"),
        ("logit_bias", "logit_bias"),
        ("echo", "echo"),
        ("suffix", "suffix"),
    ] {
        if given(key) {
            return Err(ApiError::param(
                key,
                format!("The embedded model does not support {what}."),
            ));
        }
    }
    if let Some(best_of) = request.get("best_of").and_then(Value::as_i64)
        && best_of != 1
    {
        return Err(ApiError::param("best_of", "only best_of = 1 is supported"));
    }
    match request.get("response_format") {
        None | Some(Value::Null) => Ok(()),
        Some(format) if format.get("type").and_then(Value::as_str) == Some("text") => Ok(()),
        Some(_) => Err(ApiError::param(
            "response_format",
            "The embedded model only writes plain text (response_format type \"text\").",
        )),
    }
}

/// A message's text: a string, or an array of text parts.
fn message_text(message: &Value, index: usize) -> Result<String, ApiError> {
    let param = || format!("messages[{index}].content");
    match message.get("content") {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(text)) => Ok(text.clone()),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for part in parts {
                match (
                    part.get("type").and_then(Value::as_str),
                    part.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(text)) => texts.push(text),
                    _ => {
                        return Err(ApiError::param(
                            &param(),
                            "The embedded model reads text only: each content part must be {\"type\": \"text\", \"text\": …}.",
                        ));
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        Some(_) => Err(ApiError::param(
            &param(),
            "`content` must be a string or an array of text parts",
        )),
    }
}

fn chat_messages(request: &Map<String, Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let messages = request
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::param("messages", "`messages` must be a non-empty array"))?;
    messages
        .iter()
        .enumerate()
        .map(|(index, message)| {
            let role = match message.get("role").and_then(Value::as_str) {
                // The newer name for the system role.
                Some("developer") => "system",
                Some(role) => role,
                None => "user",
            };
            let content = message_text(message, index)?;
            // The model has no tool-call format of its own: a call it made is shown as the JSON
            // it wrote, and a tool's result as a user message saying so.
            if role == "tool" {
                let id = message
                    .get("tool_call_id")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                return Ok(ChatMessage {
                    role: "user".to_string(),
                    content: format!("The result of tool call {id}: {content}"),
                });
            }
            let mut content = content;
            if role == "assistant"
                && let Some(calls) = message.get("tool_calls").and_then(Value::as_array)
            {
                for call in calls {
                    let function = &call["function"];
                    let arguments = function["arguments"]
                        .as_str()
                        .and_then(|text| serde_json::from_str::<Value>(text).ok())
                        .unwrap_or_else(|| json!({}));
                    if !content.is_empty() {
                        content.push('\n');
                    }
                    content.push_str(
                        &json!({"tool": function["name"], "arguments": arguments}).to_string(),
                    );
                }
            }
            Ok(ChatMessage {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

/// The tools a chat offers the model, and what it must do with them.
struct Offered {
    /// Name, description, parameters' schema.
    tools: Vec<(String, String, Value)>,
    /// Whether it may answer without a tool (`tool_choice` "auto", the default).
    may_answer: bool,
}

/// The request's `tools` and `tool_choice`; `None` when it offers none (or `tool_choice` is
/// "none").
fn offered_tools(request: &Map<String, Value>) -> Result<Option<Offered>, ApiError> {
    let tools = match request.get("tools") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(tools)) if tools.is_empty() => return Ok(None),
        Some(Value::Array(tools)) => tools,
        Some(_) => return Err(ApiError::param("tools", "`tools` must be an array")),
    };
    let mut offered = Vec::with_capacity(tools.len());
    for (index, tool) in tools.iter().enumerate() {
        let function = &tool["function"];
        let name = function["name"].as_str().unwrap_or("");
        if tool["type"] != "function"
            || name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ApiError::param(
                &format!("tools[{index}]"),
                "each tool must be {\"type\": \"function\", \"function\": {\"name\": 1 to 64 of a-z, A-Z, 0-9, _ and -, …}}",
            ));
        }
        let parameters = match &function["parameters"] {
            Value::Null => json!({"type": "object", "properties": {}}),
            Value::Object(schema) => Value::Object(schema.clone()),
            _ => {
                return Err(ApiError::param(
                    &format!("tools[{index}].function.parameters"),
                    "must be a JSON schema object",
                ));
            }
        };
        let description = function["description"].as_str().unwrap_or("").to_string();
        offered.push((name.to_string(), description, parameters));
    }
    let may_answer = match request.get("tool_choice") {
        None | Some(Value::Null) => true,
        Some(Value::String(choice)) if choice == "auto" => true,
        Some(Value::String(choice)) if choice == "none" => return Ok(None),
        Some(Value::String(choice)) if choice == "required" => false,
        Some(Value::Object(choice)) => {
            let named = choice
                .get("function")
                .and_then(|function| function.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::param("tool_choice", "must name a function: {\"type\": \"function\", \"function\": {\"name\": …}}")
                })?;
            offered.retain(|(name, _, _)| name == named);
            if offered.is_empty() {
                return Err(ApiError::param(
                    "tool_choice",
                    format!("names {named:?}, which is not among the tools"),
                ));
            }
            false
        }
        Some(_) => {
            return Err(ApiError::param(
                "tool_choice",
                "must be \"auto\", \"none\", \"required\" or a named function",
            ));
        }
    };
    Ok(Some(Offered {
        tools: offered,
        may_answer,
    }))
}

impl Offered {
    /// What the model is told of the tools and of how to answer.
    fn instructions(&self) -> String {
        let mut text = String::from(
            "You can call tools. To call one, reply with only a JSON object {\"tool\": <its name>, \"arguments\": {…}}.",
        );
        if self.may_answer {
            text.push_str(
                " To answer without a tool, reply with only {\"answer\": \"<your answer>\"}.",
            );
        }
        text.push_str("\nTools:");
        for (name, description, parameters) in &self.tools {
            text.push_str(&format!(
                "\n- {name}: {description} Arguments: {parameters}"
            ));
        }
        text
    }

    /// The JSON schema of every reply allowed: a call of one of the tools, with arguments its
    /// schema allows, or (if it may) an answer.
    fn schema(&self) -> Value {
        let mut choices: Vec<Value> = self
            .tools
            .iter()
            .map(|(name, _, parameters)| {
                json!({
                    "type": "object",
                    "properties": {"tool": {"const": name}, "arguments": parameters},
                    "required": ["tool", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        if self.may_answer {
            choices.push(json!({
                "type": "object",
                "properties": {"answer": {"type": "string"}},
                "required": ["answer"],
                "additionalProperties": false,
            }));
        }
        json!({"oneOf": choices})
    }
}

/// A reply of the model's to a chat that offered tools: a tool call (its name and arguments) or
/// an answer; the raw text if it is neither (cut by `max_tokens`, say).
#[derive(Debug, PartialEq)]
pub(crate) enum ToolReply {
    Call { name: String, arguments: Value },
    Answer(String),
}

fn tool_reply(text: &str) -> ToolReply {
    match serde_json::from_str::<Value>(text.trim()) {
        Ok(Value::Object(reply)) => match (
            reply.get("tool"),
            reply.get("arguments"),
            reply.get("answer"),
        ) {
            (Some(Value::String(name)), Some(arguments @ Value::Object(_)), None) => {
                ToolReply::Call {
                    name: name.clone(),
                    arguments: arguments.clone(),
                }
            }
            (None, None, Some(Value::String(answer))) => ToolReply::Answer(answer.clone()),
            _ => ToolReply::Answer(text.to_string()),
        },
        _ => ToolReply::Answer(text.to_string()),
    }
}

fn completion_prompt(request: &Map<String, Value>) -> Result<String, ApiError> {
    match request.get("prompt") {
        Some(Value::String(prompt)) => Ok(prompt.clone()),
        Some(Value::Array(prompts)) if prompts.len() == 1 && prompts[0].is_string() => {
            Ok(prompts[0].as_str().unwrap_or_default().to_string())
        }
        _ => Err(ApiError::param(
            "prompt",
            "The embedded model takes one prompt: a string, or an array of one string.",
        )),
    }
}

fn number(request: &Map<String, Value>, key: &str, default: f32) -> f32 {
    request
        .get(key)
        .and_then(Value::as_f64)
        .map_or(default, |value| value as f32)
}

fn random_u32() -> u32 {
    let mut bytes = [0u8; 4];
    // Without the OS's randomness, the clock is still a different seed each time.
    if getrandom::fill(&mut bytes).is_err() {
        return SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.subsec_nanos());
    }
    u32::from_le_bytes(bytes)
}

fn sampling(request: &Map<String, Value>) -> Sampling {
    Sampling {
        temperature: number(request, "temperature", 1.0),
        top_p: number(request, "top_p", 1.0),
        // Any integer is a seed; without one, every call samples differently.
        seed: request
            .get("seed")
            .and_then(Value::as_i64)
            .map_or_else(random_u32, |seed| {
                (seed as u64 ^ (seed as u64 >> 32)) as u32
            }),
        frequency_penalty: number(request, "frequency_penalty", 0.0),
        presence_penalty: number(request, "presence_penalty", 0.0),
    }
}

fn stop_sequences(request: &Map<String, Value>) -> Vec<String> {
    let stops: Vec<&str> = match request.get("stop") {
        Some(Value::String(stop)) => vec![stop.as_str()],
        Some(Value::Array(stops)) => stops.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    stops
        .into_iter()
        .filter(|stop| !stop.is_empty())
        .map(str::to_string)
        .collect()
}

/// Turns a parsed request into the model's work: renders and tokenizes the prompt (so its
/// tokens are known exactly before anything is reserved) and fits `max_tokens` to the context.
pub(crate) fn prepare(
    engine: &EmbeddedModel,
    parsed: Parsed,
    endpoint: Endpoint,
    max_tokens_default: u64,
) -> Result<(Bounds, Generate, bool), ApiError> {
    let request = &parsed.request.to_map();
    refuse_unsupported(request)?;
    // Tools: put in the prompt, and every reply kept by a grammar to a call of one of them (or
    // an answer), so that whatever this small model chooses, it parses.
    let offered = match endpoint {
        Endpoint::Chat => offered_tools(request)?,
        Endpoint::Completion => None,
    };
    if parsed.choices != 1 {
        return Err(ApiError::param(
            "n",
            "The embedded model makes one choice per call: n = 1.",
        ));
    }
    let (prompt, param) = match endpoint {
        // Only the template's own markers are special tokens, never a message's text.
        Endpoint::Chat => {
            let mut messages = chat_messages(request)?;
            if let Some(offered) = &offered {
                match messages.first_mut() {
                    Some(first) if first.role == "system" => {
                        first.content = format!("{}\n\n{}", first.content, offered.instructions());
                    }
                    _ => messages.insert(
                        0,
                        ChatMessage {
                            role: "system".to_string(),
                            content: offered.instructions(),
                        },
                    ),
                }
            }
            (engine.chat_prompt(&messages)?, "messages")
        }
        Endpoint::Completion => (engine.tokenize(&completion_prompt(request)?), "prompt"),
    };
    if prompt.is_empty() {
        return Err(ApiError::param(param, "The prompt must not be empty."));
    }
    let n_ctx = u64::from(engine.info().n_ctx);
    let prompt_tokens = prompt.len() as u64;
    let room = n_ctx.saturating_sub(prompt_tokens);
    let max_tokens = match parsed.max_tokens_asked {
        Some(asked) if prompt_tokens + asked > n_ctx => {
            return Err(context_length(n_ctx, prompt_tokens, asked, param));
        }
        Some(asked) => asked,
        None if room == 0 => return Err(context_length(n_ctx, prompt_tokens, 1, param)),
        None => max_tokens_default.min(room),
    };
    let grammar = match &offered {
        None => None,
        Some(offered) => Some(
            engine
                .grammar_for_schema(&offered.schema().to_string())
                .map_err(|_| {
                    ApiError::param(
                        "tools",
                        "The embedded model cannot hold its replies to these tools' parameter schemas; simplify them.",
                    )
                })?,
        ),
    };
    let generate = Generate {
        prompt,
        max_tokens: max_tokens as usize,
        stop: stop_sequences(request),
        sampling: sampling(request),
        grammar,
        // Set by the caller, who knows whose call it is.
        owner: 0,
    };
    let bounds = Bounds {
        prompt_tokens_max: prompt_tokens,
        prompt_exact: true,
        max_tokens,
        choices: 1,
        completion_tokens_max: max_tokens,
    };
    Ok((bounds, generate, offered.is_some()))
}

/// How the response is dressed: the same id and time on every chunk.
struct Shape {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
}

impl Shape {
    fn new(model: &str, endpoint: Endpoint) -> Shape {
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl-",
            Endpoint::Completion => "cmpl-",
        };
        let mut bytes = [0u8; 12];
        let _ = getrandom::fill(&mut bytes);
        let mut id = String::with_capacity(prefix.len() + 24);
        id.push_str(prefix);
        for byte in bytes {
            id.push_str(&format!("{byte:02x}"));
        }
        Shape {
            id,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |since| since.as_secs()),
            model: model.to_string(),
            endpoint,
        }
    }

    /// OpenAI's usage object, with the prompt tokens read from the cache in its details.
    fn usage(usage: Usage) -> Value {
        json!({
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        })
    }

    /// The whole answer.
    fn whole(&self, text: String, usage: Usage, finish: FinishReason) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": null},
                "logprobs": null,
                "finish_reason": finish,
            }),
            Endpoint::Completion => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish,
            }),
        };
        json!({
            "id": self.id,
            "object": match self.endpoint {
                Endpoint::Chat => "chat.completion",
                Endpoint::Completion => "text_completion",
            },
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [choice],
            "usage": Shape::usage(usage),
        })
    }

    /// One stream chunk: a role (chat's first chunk), some text, or the finish reason.
    fn chunk(&self, role: bool, text: &str, finish: Option<FinishReason>) -> Bytes {
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let delta = match (role, finish) {
                    (true, _) => json!({"role": "assistant", "content": text}),
                    (false, None) => json!({"content": text}),
                    (false, Some(_)) => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Endpoint::Completion => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
            }
        };
        self.chunk_of(choice)
    }

    /// A stream chunk carrying one choice.
    fn chunk_of(&self, choice: Value) -> Bytes {
        sse::event(&json!({
            "id": self.id,
            "object": self.object_chunk(),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [choice],
        }))
    }

    /// A reply to a chat that offered tools, as a message: a tool call (finish `tool_calls`) or
    /// an answer; cut by `max_tokens` (finish `length`), its raw text.
    fn tool_message(&self, text: &str, finish: FinishReason) -> (Value, String) {
        if finish == FinishReason::Length {
            return (
                json!({"role": "assistant", "content": text, "refusal": null}),
                "length".to_string(),
            );
        }
        match tool_reply(text) {
            ToolReply::Call { name, arguments } => (
                json!({
                    "role": "assistant",
                    "content": null,
                    "refusal": null,
                    "tool_calls": [{
                        "id": format!("call_{}", &self.id[self.id.len() - 24..]),
                        "type": "function",
                        "function": {"name": name, "arguments": arguments.to_string()},
                    }],
                }),
                "tool_calls".to_string(),
            ),
            ToolReply::Answer(answer) => (
                json!({"role": "assistant", "content": answer, "refusal": null}),
                "stop".to_string(),
            ),
        }
    }

    /// One chat stream chunk with the given delta.
    fn chunk_delta(&self, delta: Value, finish: Option<&str>) -> Bytes {
        self.chunk_of(
            json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}),
        )
    }

    /// The usage chunk that ends a stream whose client asked for `include_usage`.
    fn usage_chunk(&self, usage: Usage) -> Bytes {
        sse::event(&json!({
            "id": self.id,
            "object": self.object_chunk(),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [],
            "usage": Shape::usage(usage),
        }))
    }

    fn object_chunk(&self) -> &'static str {
        match self.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        }
    }
}

/// Where the answer goes.
enum Output {
    /// A stream's body.
    Stream(mpsc::Sender<Bytes>),
    /// The handler waiting for the whole answer (taken when it is sent).
    Whole(Option<oneshot::Sender<Result<Response, ApiError>>>),
}

impl Output {
    /// Resolves once the client has gone.
    async fn closed(&mut self) {
        match self {
            Output::Stream(sender) => sender.closed().await,
            Output::Whole(Some(reply)) => reply.closed().await,
            Output::Whole(None) => std::future::pending().await,
        }
    }

    /// Sends bytes down a stream; false if the client has gone.
    async fn send(&self, bytes: Bytes) -> bool {
        match self {
            Output::Stream(sender) => sender.send(bytes).await.is_ok(),
            Output::Whole(_) => true,
        }
    }

    fn reply(&mut self, answer: Result<Response, ApiError>) {
        if let Output::Whole(reply) = self
            && let Some(reply) = reply.take()
        {
            let _ = reply.send(answer);
        }
    }
}

/// Starts the generation and answers: a stream at once, or the whole answer when it is done.
pub(crate) async fn serve(
    call: Call,
    generate: Generate,
    stream: bool,
    include_usage: bool,
    endpoint: Endpoint,
    tools: bool,
) -> Result<Response, ApiError> {
    let Backend::Embedded(engine) = &call.model().backend else {
        return Err(ApiError::Internal);
    };
    let generation = match engine.generate(generate) {
        Ok(generation) => generation,
        Err(error) => return Err(call.fail(ApiError::from(error)).await),
    };
    let shape = Shape::new(&call.model().name, endpoint);
    let (output, answer) = if stream {
        let (sender, receiver) = mpsc::channel::<Bytes>(crate::limits::RELAY_CHANNEL_CAPACITY);
        (Output::Stream(sender), Answer::Stream(receiver))
    } else {
        let (reply, answer) = oneshot::channel();
        (Output::Whole(Some(reply)), Answer::Whole(answer))
    };
    tokio::spawn(drive(call, generation, output, shape, include_usage, tools));
    match answer {
        Answer::Stream(receiver) => Ok(sse::response(receiver)),
        Answer::Whole(answer) => answer.await.map_err(|_| ApiError::Internal)?,
    }
}

/// What the handler hands back: a stream's body at once, or the whole answer when it is done.
enum Answer {
    Stream(mpsc::Receiver<Bytes>),
    Whole(oneshot::Receiver<Result<Response, ApiError>>),
}

fn exact(counts: TokenCounts) -> Counted {
    Counted::Exact(Usage {
        prompt_tokens: counts.prompt_tokens as u64,
        cached_tokens: counts.cached_prompt_tokens as u64,
        completion_tokens: counts.completion_tokens as u64,
    })
}

/// Runs one call from the first event to its end: the model's counts are exact, so a client
/// that leaves stops the generation at the next step and is charged what was computed by then.
async fn drive(
    mut call: Call,
    mut generation: Generation,
    mut output: Output,
    shape: Shape,
    include_usage: bool,
    tools: bool,
) {
    let stream = matches!(output, Output::Stream(_));
    let deadline = call.deadline();
    let mut cut = call.cut_signal();
    let mut text = String::new();
    let mut client_gone = false;
    let mut time_up = false;
    // Why the call was cut, once it is.
    let mut cut_off: Option<ApiError> = None;
    // How the call ended, and the finish reason of an answer to send.
    let (end, finish) = loop {
        let event = tokio::select! {
            () = output.closed(), if !client_gone => {
                generation.cancel();
                client_gone = true;
                call.client_left();
                continue;
            }
            () = tokio::time::sleep_until(deadline), if !time_up => {
                generation.cancel();
                time_up = true;
                continue;
            }
            error = cut.cut(), if cut_off.is_none() => {
                generation.cancel();
                cut_off = Some(error);
                continue;
            }
            event = generation.recv() => event,
        };
        match event {
            Some(Event::Started { .. }) => {
                if stream && shape.endpoint == Endpoint::Chat && !client_gone {
                    // The role comes first, as OpenAI streams it.
                    if !output.send(shape.chunk(true, "", None)).await {
                        generation.cancel();
                        client_gone = true;
                        call.client_left();
                    }
                }
            }
            Some(Event::Text(piece)) => {
                // The model stops at max_tokens itself; its counts, not the text, are charged.
                let _ = call.deliver(0, piece.len() as u64);
                // A reply to tools is read whole before it is sent: a call or an answer.
                if stream && !tools {
                    if !client_gone && !output.send(shape.chunk(false, &piece, None)).await {
                        generation.cancel();
                        client_gone = true;
                        call.client_left();
                    }
                } else {
                    text.push_str(&piece);
                }
            }
            Some(Event::Done { counts, finish }) => {
                break (End::Answered(exact(counts)), Some(finish));
            }
            Some(Event::Cancelled { counts }) if client_gone => {
                break (End::Answered(exact(counts)), None);
            }
            Some(Event::Cancelled { counts }) => match cut_off.take() {
                Some(error) => break (End::BrokeOff(error, exact(counts)), None),
                // At its time limit a call ends as if max_tokens had: with what it made, charged.
                None => {
                    tracing::warn!(model = %call.model().name, "a call reached its time limit");
                    break (End::Answered(exact(counts)), Some(FinishReason::Length));
                }
            },
            Some(Event::Failed { error, counts }) => {
                break (End::BrokeOff(ApiError::from(error), exact(counts)), None);
            }
            None => {
                break (
                    End::BrokeOff(
                        ApiError::from(ModelError::Failed(
                            "the model's worker is gone".to_string(),
                        )),
                        Counted::Exact(Usage::default()),
                    ),
                    None,
                );
            }
        }
    };
    let model_name = call.model().name.clone();
    let ended = call.end(end).await;
    if client_gone {
        tracing::info!(model = %model_name, completion_tokens = ended.usage.completion_tokens, "client left; generation stopped");
        return;
    }
    match (ended.error, finish) {
        (Some(error), _) => fail(&mut output, error).await,
        (None, Some(finish)) if tools => {
            let (message, finish) = shape.tool_message(&text, finish);
            if stream {
                let mut delta = message.clone();
                if let Some(calls) = delta.get_mut("tool_calls").and_then(Value::as_array_mut) {
                    for (index, call) in calls.iter_mut().enumerate() {
                        call["index"] = json!(index);
                    }
                }
                let _ = output.send(shape.chunk_delta(delta, None)).await;
                let _ = output
                    .send(shape.chunk_delta(json!({}), Some(&finish)))
                    .await;
                if include_usage {
                    let _ = output.send(shape.usage_chunk(ended.usage)).await;
                }
                let _ = output.send(Bytes::from_static(sse::DONE)).await;
            } else {
                let mut answer = shape.whole(String::new(), ended.usage, FinishReason::Stop);
                answer["choices"][0]["message"] = message;
                answer["choices"][0]["finish_reason"] = json!(finish);
                output.reply(Ok(charged(answer, ended.charged_cu)));
            }
        }
        (None, Some(finish)) => {
            if stream {
                let _ = output.send(shape.chunk(false, "", Some(finish))).await;
                if include_usage {
                    let _ = output.send(shape.usage_chunk(ended.usage)).await;
                }
                let _ = output.send(Bytes::from_static(sse::DONE)).await;
            } else {
                let answer = shape.whole(text, ended.usage, finish);
                output.reply(Ok(charged(answer, ended.charged_cu)));
            }
        }
        (None, None) => {}
    }
}

/// A plain answer, with the header that says what it was charged.
fn charged(answer: Value, charged_cu: u64) -> Response {
    let mut response = Json(answer).into_response();
    response.headers_mut().insert(
        axum::http::header::HeaderName::from_static(crate::CHARGED_HEADER),
        axum::http::HeaderValue::from(charged_cu),
    );
    response
}

/// Ends a call with an error: an error event in a stream, or the error as the answer.
async fn fail(output: &mut Output, error: ApiError) {
    match output {
        Output::Stream(_) => {
            let _ = output.send(sse::event(&error.body())).await;
        }
        Output::Whole(_) => output.reply(Err(error)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn shape(endpoint: Endpoint) -> Shape {
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl-",
            Endpoint::Completion => "cmpl-",
        };
        Shape {
            id: format!("{prefix}0123456789abcdef01234567"),
            created: 1_796_000_000,
            model: "smollm2-135m".to_string(),
            endpoint,
        }
    }

    #[test]
    fn a_reply_to_tools_is_a_call_or_an_answer() {
        assert_eq!(
            tool_reply(r#" {"tool": "get_weather", "arguments": {"city": "Paris"}} "#),
            ToolReply::Call {
                name: "get_weather".to_string(),
                arguments: json!({"city": "Paris"}),
            }
        );
        assert_eq!(
            tool_reply(r#"{"answer": "It is sunny."}"#),
            ToolReply::Answer("It is sunny.".to_string())
        );
        // Neither (cut short, or both at once): the text as it is.
        for text in [
            r#"{"tool": "get_weather", "argu"#,
            r#"{"tool": "f", "arguments": {}, "answer": "x"}"#,
        ] {
            assert_eq!(tool_reply(text), ToolReply::Answer(text.to_string()));
        }
    }

    #[test]
    fn the_replies_allowed_follow_tool_choice() {
        let request = |choice: Value| {
            let mut request = Map::new();
            request.insert(
                "tools".to_string(),
                json!([
                    {"type": "function", "function": {"name": "a"}},
                    {"type": "function", "function": {"name": "b", "parameters": {"type": "object"}}},
                ]),
            );
            request.insert("tool_choice".to_string(), choice);
            request
        };
        let auto = offered_tools(&request(json!("auto"))).unwrap().unwrap();
        assert_eq!(auto.schema()["oneOf"].as_array().unwrap().len(), 3);
        assert!(auto.instructions().contains("\"answer\""));
        let required = offered_tools(&request(json!("required"))).unwrap().unwrap();
        assert_eq!(required.schema()["oneOf"].as_array().unwrap().len(), 2);
        assert!(!required.instructions().contains("\"answer\""));
        let named = offered_tools(&request(
            json!({"type": "function", "function": {"name": "b"}}),
        ))
        .unwrap()
        .unwrap();
        assert_eq!(
            named.schema()["oneOf"][0]["properties"]["tool"]["const"],
            "b"
        );
        assert_eq!(named.schema()["oneOf"].as_array().unwrap().len(), 1);
        assert!(offered_tools(&request(json!("none"))).unwrap().is_none());
        assert!(offered_tools(&request(json!("sometimes"))).is_err());
        assert!(
            offered_tools(&request(
                json!({"type": "function", "function": {"name": "c"}})
            ))
            .is_err()
        );
    }

    /// What OpenAI's clients parse of an embedded model's answers, whole and streamed, for both
    /// endpoints: every field and its place.
    #[test]
    fn the_answers_have_openais_shapes() {
        let usage = Usage {
            prompt_tokens: 12,
            cached_tokens: 8,
            completion_tokens: 3,
        };
        let mut out = String::new();
        for endpoint in [Endpoint::Chat, Endpoint::Completion] {
            let shape = shape(endpoint);
            let whole = shape.whole("Hi there".to_string(), usage, FinishReason::Stop);
            out.push_str(&serde_json::to_string_pretty(&whole).unwrap());
            out.push('\n');
            for chunk in [
                shape.chunk(true, "", None),
                shape.chunk(false, "Hi", None),
                shape.chunk(false, "", Some(FinishReason::Length)),
                shape.usage_chunk(usage),
            ] {
                out.push_str(std::str::from_utf8(&chunk).unwrap());
            }
        }
        insta::assert_snapshot!(out);
    }
}
