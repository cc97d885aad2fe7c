//! The routes: parse and check a request, price its worst case, reserve, call the upstream,
//! settle exactly, answer.

use crate::limits::PATH_QUOTED_MAX;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use stipend_ledger::units::{format_duration, format_utc};
use stipend_ledger::{AccountId, AccountKind};

use crate::call::{Bounds, Call};
use crate::error::ApiError;
use crate::limits::{CHOICES_MAX, LINGER_BYTES_MAX, LINGER_TIME_MAX};
use crate::rawjson::{self, RawError, RawObject};
use crate::{Backend, Gateway, Model};

/// Tokens added per chat message to the prompt's upper bound, for the role markers a chat
/// template wraps around each message.
const MESSAGE_OVERHEAD_TOKENS: u64 = 8;
/// Tokens added to every prompt's upper bound (a template's preamble).
const PROMPT_OVERHEAD_TOKENS: u64 = 16;
// The most stop sequences, as OpenAI allows: the embedded model's own limit.
use stipend_model::STOP_SEQUENCES_MAX;

/// Builds the API's router (with `/metrics`, unless it is served apart).
pub fn router(gateway: Arc<Gateway>) -> Router {
    let mut router = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/budget", get(budget))
        .route("/healthz", get(healthz));
    if gateway.options.metrics_on_api {
        router = router.route("/metrics", get(metrics));
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(gateway)
}

/// `/metrics` (and `/healthz`) alone, for a listener of their own (`metrics_listen`): an
/// operator's scraper need not reach the public API, nor the public the metrics.
pub fn metrics_router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(gateway)
}

/// Which OpenAI endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Chat,
    Completion,
}

impl Endpoint {
    /// The path under the API's base.
    pub(crate) fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/chat/completions",
            Endpoint::Completion => "/completions",
        }
    }

    /// The `object` of a stream chunk.
    pub(crate) fn chunk_object(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        }
    }
}

async fn not_found(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    unknown_path(method, uri, false)
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    unknown_path(method, uri, true)
}

fn unknown_path(method: axum::http::Method, uri: axum::http::Uri, other_method: bool) -> ApiError {
    let mut path = uri.path().to_string();
    if path.len() > PATH_QUOTED_MAX {
        let mut end = PATH_QUOTED_MAX;
        while !path.is_char_boundary(end) {
            end -= 1;
        }
        path.truncate(end);
        path.push('…');
    }
    ApiError::UnknownPath {
        method: method.to_string(),
        path,
        other_method,
    }
}

async fn healthz(State(gateway): State<Arc<Gateway>>) -> Response {
    match gateway.ledger.check_open() {
        Ok(_) => (StatusCode::OK, Json(json!({"status": "ok"}))).into_response(),
        Err(_) => ApiError::LedgerUnavailable.into_response(),
    }
}

/// The account a request's key spends from: one `Authorization: Bearer` key, known and not
/// revoked.
pub fn authenticate(gateway: &Gateway, headers: &HeaderMap) -> Result<AccountId, ApiError> {
    authenticate_key(gateway, headers).map(|key| key.account)
}

/// The key a request presents, checked as [`authenticate`] does: its record.
fn authenticate_key(
    gateway: &Gateway,
    headers: &HeaderMap,
) -> Result<Arc<stipend_ledger::KeyRecord>, ApiError> {
    // Two keys: which one pays is not for the server to guess.
    if headers.get_all("authorization").iter().nth(1).is_some() {
        return Err(ApiError::InvalidRequest {
            message: "The request has more than one Authorization header; send one key."
                .to_string(),
            param: None,
        });
    }
    let presented = headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| ApiError::from(crate::keys::KeyError::Missing))?;
    Ok(gateway.keys.authenticate_key(presented)?)
}

async fn models(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let account = match authenticate(&gateway, &headers) {
        Ok(account) => account,
        Err(error) => return error.into_response(),
    };
    let data: Vec<Value> = gateway
        .models
        .values()
        .filter(|model| gateway.access.allows(&model.name, account))
        .map(|model| {
            let mut entry = json!({
                "id": model.name,
                "object": "model",
                "created": 0,
                "owned_by": "stipend",
                "price_prompt_cu": model.price_prompt_cu,
                "price_completion_cu": model.price_completion_cu,
            });
            if let Backend::Embedded(engine) = &model.backend {
                entry["context_length"] = json!(engine.info().n_ctx);
                entry["slots"] = json!(engine.info().slots);
                entry["prefix_cache"] = json!(engine.info().prefix_cache.name());
                entry["price_cached_prompt_cu"] = json!(model.price_cached_prompt_cu);
            }
            entry
        })
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn budget(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let account = match authenticate(&gateway, &headers) {
        Ok(account) => account,
        Err(error) => return error.into_response(),
    };
    let view = match gateway.ledger.view(account) {
        Ok(view) => view,
        Err(error) => return ApiError::from(error).into_response(),
    };
    let policy = gateway.ledger.policy();
    let person = view.kind == AccountKind::Person;
    Json(json!({
        "object": "budget",
        "account": view.name,
        "balance_cu": view.balance_cu,
        "reserved_cu": view.reserved_cu,
        "available_cu": view.available_cu,
        "next_grant_at": view.next_grant_at_ms.map(format_utc),
        "stipend_cu": if person { Some(policy.amount_cu()) } else { None },
        "period": format_duration(policy.period()),
        "rollover_max_cu": policy.rollover_max_cu(),
        // The models this account may use, and any other it was charged for this period.
        "models": gateway.models.values().filter(|model| {
            gateway.access.allows(&model.name, account)
                || view.usage.iter().any(|usage| usage.sink == model.sink)
        }).map(|model| {
            let used = view.usage.iter().find(|usage| usage.sink == model.sink);
            json!({
                "model": model.name,
                "price_prompt_cu": model.price_prompt_cu,
                "price_cached_prompt_cu": model.price_cached_prompt_cu,
                "price_completion_cu": model.price_completion_cu,
                "completion_tokens_available": view.available_cu / model.price_completion_cu.max(1),
                "usage_this_period": {
                    "requests": used.map_or(0, |usage| usage.requests),
                    "charged_cu": used.map_or(0, |usage| usage.charged_cu),
                },
                // Where this account's oldest waiting request stands in the model's fair-share
                // queue (1: next), or null when none waits.
                "queue_position": model.queue.position(account.0),
            })
        }).collect::<Vec<_>>(),
        // What each model was charged per UTC day over the last days, oldest first: counts only.
        "usage_by_day": view.daily.iter().filter_map(|usage| {
            let model = gateway.models.values().find(|model| model.sink == usage.sink)?;
            let day: String = format_utc(usage.day * stipend_ledger::limits::DAY_MS)
                .chars()
                .take(10)
                .collect();
            Some(json!({
                "day": day,
                "model": model.name,
                "requests": usage.requests,
                "charged_cu": usage.charged_cu,
            }))
        }).collect::<Vec<_>>(),
    }))
    .into_response()
}

async fn metrics(State(gateway): State<Arc<Gateway>>) -> Response {
    let stats = gateway.ledger.writer_stats();
    let embedded: Vec<(&String, &Arc<stipend_model::EmbeddedModel>)> = gateway
        .models
        .values()
        .filter_map(|model| match &model.backend {
            Backend::Embedded(engine) => Some((&model.name, engine)),
            Backend::Upstream { .. } => None,
        })
        .collect();
    let gauges = crate::metrics::Gauges {
        reservations_open: gateway.ledger.open_reservations(),
        ledger_commits: stats.commits,
        ledger_checkpoints: stats.checkpoints,
        ledger_commit_seconds: stats.commit_us_total as f64 / 1e6,
        in_flight: gateway
            .models
            .values()
            .map(|model| (model.name.clone(), model.queue.load().0))
            .collect(),
        slots_busy: embedded
            .iter()
            .map(|(name, engine)| (name.to_string(), engine.busy_slots()))
            .collect(),
        prefix_cache: embedded
            .iter()
            .map(|(name, engine)| (name.to_string(), engine.cache_stats()))
            .collect(),
    };
    let queues: Vec<crate::metrics::QueueView<'_>> = gateway
        .models
        .values()
        .map(|model| {
            let (running, waiting) = model.queue.load();
            crate::metrics::QueueView {
                model: &model.name,
                running,
                waiting,
                counters: &model.queue.counters,
            }
        })
        .collect();
    let models: Vec<(&str, &crate::metrics::Counters)> = gateway
        .models
        .values()
        .map(|model| (model.name.as_str(), &model.counters))
        .collect();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        crate::metrics::render(&models, &gateway.unrouted, &gauges, &queues),
    )
        .into_response()
}

async fn chat_completions(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve_counted(gateway, headers, body, Endpoint::Chat).await
}

async fn completions(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve_counted(gateway, headers, body, Endpoint::Completion).await
}

/// Serves a request and counts its outcome under its model (or unrouted, if refused before one
/// was known).
async fn serve_counted(
    gateway: Arc<Gateway>,
    headers: HeaderMap,
    body: Body,
    endpoint: Endpoint,
) -> Response {
    let started = std::time::Instant::now();
    let mut model = None;
    let result = serve(Arc::clone(&gateway), headers, body, endpoint, &mut model).await;
    let outcome = crate::metrics::Outcome::of(&result);
    match &model {
        Some(model) => model.counters.request(outcome, started.elapsed()),
        None => gateway.unrouted.request(outcome, started.elapsed()),
    }
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Reads a request's body: at most `limit` bytes, within `waited`. A declared length over the
/// limit is refused at once, before any of the body is read; a body that cannot be read (a bad
/// chunk size, a connection that broke) is a 400 that says so, not "too large".
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    waited: std::time::Duration,
) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if let Some(length) = declared
        && length > limit as u64
    {
        if length <= LINGER_BYTES_MAX {
            tokio::spawn(discard(body));
        }
        return Err(ApiError::PayloadTooLarge(limit));
    }
    let mut body = body;
    let read = async {
        let mut collected = Vec::new();
        while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
            if let Some(data) = frame?.data_ref() {
                if collected.len() + data.len() > limit {
                    return Ok::<_, axum::Error>(None);
                }
                collected.extend_from_slice(data);
            }
        }
        Ok(Some(Bytes::from(collected)))
    };
    match tokio::time::timeout(waited, read).await {
        Err(_) => Err(ApiError::BodyTimeout(waited.as_secs())),
        Ok(Ok(Some(collected))) => Ok(collected),
        Ok(Ok(None)) => {
            tokio::spawn(discard(body));
            Err(ApiError::PayloadTooLarge(limit))
        }
        Ok(Err(error)) => Err(ApiError::InvalidRequest {
            message: format!("The request body could not be read: {}.", error),
            param: None,
        }),
    }
}

/// Reads and drops what is left of a refused body, within bounds, while the refusal is sent: a
/// client still writing its body when the connection closes would get a broken pipe instead of
/// the 413 (nginx lingers the same way). A body past the bounds is not waited for.
async fn discard(mut body: Body) {
    let _ = tokio::time::timeout(LINGER_TIME_MAX, async {
        let mut discarded = 0u64;
        while let Some(Ok(frame)) = http_body_util::BodyExt::frame(&mut body).await {
            discarded += frame.data_ref().map_or(0, |data| data.len() as u64);
            if discarded > LINGER_BYTES_MAX {
                break;
            }
        }
    })
    .await;
}

/// A request parsed and checked the same way for every backend.
pub(crate) struct Parsed {
    pub model: Arc<Model>,
    pub stream: bool,
    pub include_usage: bool,
    /// `max_completion_tokens` or `max_tokens`, if given (checked to be 1 to the maximum).
    pub max_tokens_asked: Option<u64>,
    /// Chat messages (0 for a legacy completion).
    pub messages: u64,
    /// Choices the backend computes: `n` (or `best_of`, if larger) for each prompt.
    pub choices: u64,
    pub request: RawObject,
}

async fn serve(
    gateway: Arc<Gateway>,
    headers: HeaderMap,
    body: Body,
    endpoint: Endpoint,
    routed: &mut Option<Arc<Model>>,
) -> Result<Response, ApiError> {
    let key = authenticate_key(&gateway, &headers)?;
    let payer = Payer {
        account: key.account,
        queued_as: key.account,
        key: Some(key),
    };
    let limit = gateway.options.body_bytes_max;
    // A body sent a byte a minute would hold its connection and task forever: a person's key
    // buys no right to that.
    let waited = gateway.options.body_read_timeout;
    let bytes = read_body(&headers, body, limit, waited).await?;
    serve_bytes(gateway, payer, bytes, endpoint, routed).await
}

/// Who pays for a call, and whose turn it takes in the fair-share queue.
#[derive(Debug, Clone)]
pub struct Payer {
    /// The account charged.
    pub account: AccountId,
    /// The key the call was made with, whose cap (if it has one) it counts against; `None`
    /// for an agent's calls, which its run's own account bounds.
    pub key: Option<Arc<stipend_ledger::KeyRecord>>,
    /// The account whose share of the queue the call takes: the person behind an agent's
    /// account, so that a thousand agents get their person's share, not a thousand shares.
    pub queued_as: AccountId,
}

impl Payer {
    /// An account that pays for itself and queues as itself.
    pub fn own(account: AccountId) -> Payer {
        Payer {
            account,
            key: None,
            queued_as: account,
        }
    }
}

/// A chat completion asked for in this process (an agent's step), not over HTTP: parsed,
/// bounded, reserved, queued, served and settled as any other, and answered as a client would
/// be (a plain answer carries [`CHARGED_HEADER`](crate::CHARGED_HEADER)).
pub async fn chat_in_process(
    gateway: Arc<Gateway>,
    payer: Payer,
    body: Bytes,
) -> Result<Response, ApiError> {
    if body.len() > gateway.options.body_bytes_max {
        return Err(ApiError::PayloadTooLarge(gateway.options.body_bytes_max));
    }
    let started = std::time::Instant::now();
    let mut model = None;
    let result = serve_bytes(
        Arc::clone(&gateway),
        payer,
        body,
        Endpoint::Chat,
        &mut model,
    )
    .await;
    let outcome = crate::metrics::Outcome::of(&result);
    match &model {
        Some(model) => model.counters.request(outcome, started.elapsed()),
        None => gateway.unrouted.request(outcome, started.elapsed()),
    }
    result
}

async fn serve_bytes(
    gateway: Arc<Gateway>,
    payer: Payer,
    bytes: Bytes,
    endpoint: Endpoint,
    routed: &mut Option<Arc<Model>>,
) -> Result<Response, ApiError> {
    let parsed = parse(&gateway, bytes, endpoint)?;
    // A model this payer may not use is one that does not exist, for them (an agent's calls
    // are its person's).
    if !gateway.access.allows(&parsed.model.name, payer.queued_as) {
        return Err(ApiError::ModelNotFound(parsed.model.name.clone()));
    }
    let model = Arc::clone(&parsed.model);
    *routed = Some(Arc::clone(&model));
    let (stream, include_usage) = (parsed.stream, parsed.include_usage);
    match &model.backend {
        Backend::Upstream {
            upstream,
            model: upstream_model,
        } => {
            let (bounds, body) = for_upstream(&gateway, parsed, upstream_model);
            let call = Call::open(&gateway, payer, &model, bounds).await?;
            crate::relay::serve(
                call,
                crate::relay::Request {
                    upstream: upstream.clone(),
                    endpoint,
                    body,
                    stream,
                    include_usage,
                    answer_bytes_max: gateway.options.upstream_body_bytes_max,
                },
            )
            .await
        }
        Backend::Embedded(engine) => {
            // Rendering the template and tokenizing is CPU work: off the async threads.
            let engine = Arc::clone(engine);
            let default = gateway.options.max_tokens_default;
            let (bounds, mut generate, tools) = tokio::task::spawn_blocking(move || {
                crate::embedded::prepare(&engine, parsed, endpoint, default)
            })
            .await
            .map_err(|_| ApiError::Internal)??;
            // The prefix cache is the person's: an agent's calls reuse what its person's left.
            generate.owner = payer.queued_as.0;
            let call = Call::open(&gateway, payer, &model, bounds).await?;
            crate::embedded::serve(call, generate, stream, include_usage, endpoint, tools).await
        }
    }
}

/// A field's value as a small JSON value (for scalars and short options; never for messages).
fn scalar(request: &RawObject, key: &str) -> Option<Value> {
    match request.get::<Value>(key) {
        None | Some(Ok(Value::Null)) => None,
        Some(Ok(value)) => Some(value),
        // The body parsed as a whole, so each field's text is JSON; this cannot happen.
        Some(Err(_)) => Some(Value::Null),
    }
}

fn integer(request: &RawObject, key: &str) -> Result<Option<i64>, ApiError> {
    match scalar(request, key) {
        None => Ok(None),
        Some(value) => value
            .as_i64()
            .map(Some)
            .ok_or_else(|| ApiError::param(key, format!("`{key}` must be an integer"))),
    }
}

fn number_in(request: &RawObject, key: &str, low: f64, high: f64) -> Result<(), ApiError> {
    match scalar(request, key) {
        None => Ok(()),
        Some(value) => match value.as_f64() {
            Some(number) if (low..=high).contains(&number) => Ok(()),
            _ => Err(ApiError::param(
                key,
                format!("`{key}` must be a number from {low} to {high}"),
            )),
        },
    }
}

/// What the gateway reads of a chat message: its role. The rest is the backend's.
#[derive(serde::Deserialize)]
struct MessageHead<'a> {
    #[serde(borrow)]
    role: std::borrow::Cow<'a, str>,
}

/// Checks what every backend needs of a request body; the reply is a 400 naming the field.
fn parse(gateway: &Gateway, bytes: Bytes, endpoint: Endpoint) -> Result<Parsed, ApiError> {
    let request = parse_object(bytes)?;
    let model_name = match request.get::<String>("model") {
        Some(Ok(name)) => name,
        _ => {
            return Err(ApiError::param(
                "model",
                "you must give `model` as a string",
            ));
        }
    };
    let model = gateway
        .models
        .get(&model_name)
        .cloned()
        .ok_or(ApiError::ModelNotFound(model_name))?;
    let (stream, include_usage) = parse_stream(&request)?;
    let max_tokens_asked = parse_max_tokens(&request, gateway.options.max_tokens_max)?;
    check_sampling(&request)?;
    let messages = match endpoint {
        Endpoint::Chat => count_messages(&request)?,
        Endpoint::Completion => {
            if !matches!(
                request.raw("prompt").and_then(|raw| raw.bytes().next()),
                Some(b'"' | b'[')
            ) {
                return Err(ApiError::param(
                    "prompt",
                    "`prompt` must be a string or an array",
                ));
            }
            0
        }
    };
    let choices = count_choices(&request, endpoint)?;
    Ok(Parsed {
        model,
        stream,
        include_usage,
        max_tokens_asked,
        messages,
        choices,
        request,
    })
}

/// The body as a JSON object, read at its top level only.
fn parse_object(bytes: Bytes) -> Result<RawObject, ApiError> {
    match RawObject::parse(bytes) {
        Ok(request) => Ok(request),
        Err(RawError::Syntax(error)) => Err(ApiError::InvalidRequest {
            message: format!("We could not parse the JSON body of your request: {error}"),
            param: None,
        }),
        Err(RawError::NotObject) => Err(ApiError::InvalidRequest {
            message: "The request body must be a JSON object.".to_string(),
            param: None,
        }),
    }
}

/// `stream`, and `stream_options.include_usage`.
fn parse_stream(request: &RawObject) -> Result<(bool, bool), ApiError> {
    let stream = match scalar(request, "stream") {
        None => false,
        Some(Value::Bool(stream)) => stream,
        Some(_) => return Err(ApiError::param("stream", "`stream` must be true or false")),
    };
    let include_usage = match scalar(request, "stream_options") {
        None => false,
        Some(Value::Object(options)) => match options.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(include)) => *include,
            Some(_) => {
                return Err(ApiError::param(
                    "stream_options.include_usage",
                    "`include_usage` must be true or false",
                ));
            }
        },
        Some(_) => {
            return Err(ApiError::param(
                "stream_options",
                "`stream_options` must be an object",
            ));
        }
    };
    Ok((stream, include_usage))
}

/// `max_completion_tokens` (or else `max_tokens`), if given: from 1 to `max`.
fn parse_max_tokens(request: &RawObject, max: u64) -> Result<Option<u64>, ApiError> {
    let asked = match integer(request, "max_completion_tokens")? {
        Some(tokens) => Some(("max_completion_tokens", tokens)),
        None => integer(request, "max_tokens")?.map(|tokens| ("max_tokens", tokens)),
    };
    match asked {
        None => Ok(None),
        Some((key, tokens)) if tokens < 1 => Err(ApiError::param(
            key,
            format!("`{key}` must be at least 1, got {tokens}"),
        )),
        Some((key, tokens)) if tokens as u64 > max => Err(ApiError::param(
            key,
            format!("`{key}` must be at most {max}, got {tokens}"),
        )),
        Some((_, tokens)) => Ok(Some(tokens as u64)),
    }
}

/// The sampling options every backend takes, in OpenAI's ranges.
fn check_sampling(request: &RawObject) -> Result<(), ApiError> {
    number_in(request, "temperature", 0.0, 2.0)?;
    number_in(request, "top_p", 0.0, 1.0)?;
    number_in(request, "frequency_penalty", -2.0, 2.0)?;
    number_in(request, "presence_penalty", -2.0, 2.0)?;
    integer(request, "seed")?;
    match scalar(request, "stop") {
        None | Some(Value::String(_)) => Ok(()),
        Some(Value::Array(stops))
            if stops.len() <= STOP_SEQUENCES_MAX && stops.iter().all(Value::is_string) =>
        {
            Ok(())
        }
        Some(_) => Err(ApiError::param(
            "stop",
            format!("`stop` must be a string or up to {STOP_SEQUENCES_MAX} strings"),
        )),
    }
}

/// A chat's messages: a non-empty array, each with a known role. Returns how many.
fn count_messages(request: &RawObject) -> Result<u64, ApiError> {
    let messages = match request.get::<Vec<&serde_json::value::RawValue>>("messages") {
        Some(Ok(messages)) if !messages.is_empty() => messages,
        _ => {
            return Err(ApiError::param(
                "messages",
                "`messages` must be a non-empty array",
            ));
        }
    };
    for (index, message) in messages.iter().enumerate() {
        let role = serde_json::from_str::<MessageHead<'_>>(message.get());
        if !matches!(
            role.as_ref().map(|head| head.role.as_ref()),
            Ok("system" | "developer" | "user" | "assistant" | "tool")
        ) {
            return Err(ApiError::param(
                &format!("messages[{index}].role"),
                "each message needs a `role` of system, developer, user, assistant or tool",
            ));
        }
    }
    Ok(messages.len() as u64)
}

/// The choices a call computes: every prompt is answered with `n` choices, each drawn from
/// `best_of` generations; at most [`CHOICES_MAX`].
fn count_choices(request: &RawObject, endpoint: Endpoint) -> Result<u64, ApiError> {
    let n = count(request, "n")?;
    let best_of = count(request, "best_of")?;
    if let (Some(n), Some(best_of)) = (n, best_of)
        && best_of < n
    {
        return Err(ApiError::param(
            "best_of",
            format!("`best_of` ({best_of}) must be at least `n` ({n})"),
        ));
    }
    let prompts = match endpoint {
        Endpoint::Chat => 1,
        Endpoint::Completion => prompts(request)?,
    };
    let per_prompt = n.unwrap_or(1).max(best_of.unwrap_or(1));
    prompts
        .checked_mul(per_prompt)
        .filter(|choices| *choices <= CHOICES_MAX)
        .ok_or_else(|| {
            ApiError::param(
                if prompts > 1 { "prompt" } else { "n" },
                format!(
                    "The request asks for {prompts} prompt(s) × {per_prompt} choice(s); a call may compute at most {CHOICES_MAX} choices."
                ),
            )
        })
}

/// A count of choices (`n`, `best_of`): an integer from 1 to [`CHOICES_MAX`], if given.
fn count(request: &RawObject, key: &str) -> Result<Option<u64>, ApiError> {
    match integer(request, key)? {
        None => Ok(None),
        Some(value) if (1..=CHOICES_MAX as i64).contains(&value) => Ok(Some(value as u64)),
        Some(value) => Err(ApiError::param(
            key,
            format!("`{key}` must be from 1 to {CHOICES_MAX}, got {value}"),
        )),
    }
}

/// How many prompts a completion request's `prompt` holds: a string or an array of token ids
/// is one; an array of strings or of token arrays is one each.
fn prompts(request: &RawObject) -> Result<u64, ApiError> {
    let Some(Ok(Value::Array(items))) = request.get::<Value>("prompt") else {
        return Ok(1);
    };
    if items.is_empty() {
        return Err(ApiError::param(
            "prompt",
            "`prompt` must not be an empty array",
        ));
    }
    if items.iter().all(Value::is_number) {
        return Ok(1);
    }
    Ok(items.len() as u64)
}

/// Bounds an upstream request and writes the body to forward.
fn for_upstream(gateway: &Gateway, parsed: Parsed, upstream_model: &str) -> (Bounds, Vec<u8>) {
    let Parsed {
        stream,
        max_tokens_asked,
        messages,
        choices,
        request,
        ..
    } = parsed;
    let max_tokens = max_tokens_asked.unwrap_or(gateway.options.max_tokens_default);
    let model_text = rawjson::string(upstream_model);
    let max_tokens_text = max_tokens.to_string();
    let mut replace = vec![
        ("model", model_text.as_str()),
        ("max_tokens", max_tokens_text.as_str()),
    ];
    if stream {
        // Ask for usage always: it is what the charge is made of. It is stripped on the way back
        // if the client did not ask for it.
        replace.push(("stream_options", r#"{"include_usage":true}"#));
    }
    let body = request.write(&replace, &["max_completion_tokens"]);
    // A prompt's tokens are at most its bytes (byte-level tokenizers never make a token of less
    // than one byte) plus the template's markers. Every part of the body the model may read
    // (messages, tools, functions, a response format's schema, a completion's prompts, and any
    // field an upstream adds) is somewhere in its bytes, and JSON text is at least as long as the
    // text it carries, so the whole body's length bounds the prompt without a tokenizer for
    // every upstream, whatever fields it reads.
    let prompt_tokens_max =
        body.len() as u64 + MESSAGE_OVERHEAD_TOKENS * messages + PROMPT_OVERHEAD_TOKENS * choices;
    // A predicted output's rejected tokens are billed as completion tokens (OpenAI).
    let predicted_max = request.raw("prediction").map_or(0, |raw| raw.len() as u64);
    let bounds = Bounds {
        prompt_tokens_max,
        prompt_exact: false,
        max_tokens,
        choices,
        completion_tokens_max: max_tokens
            .saturating_mul(choices)
            .saturating_add(predicted_max),
    };
    (bounds, body)
}
