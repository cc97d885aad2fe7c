//! The one API error type at the HTTP edge. Each variant maps to a status and an OpenAI-shaped
//! body, `{"error": {"message", "type", "param", "code"}}`, which is what OpenAI clients parse.
//! Internal details never reach the client; they go to the log.

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use stipend_ledger::units::format_utc;
use stipend_ledger::{Flops, LedgerError};

use crate::keys::KeyError;

/// Why a request was refused. A refused request changed nothing in the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// 401: no key, a bad key, a revoked key.
    Unauthorized(String),
    /// 400: malformed JSON, wrong types, bad values.
    InvalidRequest {
        /// For a person.
        message: String,
        /// The offending field, if one.
        param: Option<String>,
    },
    /// 400 `context_length_exceeded`: the prompt and the completion asked for do not fit the
    /// model's context.
    ContextLengthExceeded {
        /// For a person.
        message: String,
        /// `messages` or `prompt`.
        param: &'static str,
    },
    /// 404: no such path, or 405: not with that method.
    UnknownPath {
        /// The request's method.
        method: String,
        /// The request's path (cut to a length that fits a message).
        path: String,
        /// Whether the path exists with another method (405).
        other_method: bool,
    },
    /// 404: no such model, or not for this key.
    ModelNotFound(String),
    /// 413: the body is over the limit.
    PayloadTooLarge(usize),
    /// 408: the body did not arrive in time (its length in seconds).
    BodyTimeout(u64),
    /// 429 `insufficient_quota`: the budget cannot cover the request's worst case.
    BudgetExhausted {
        /// What the request needed, in cu.
        needed_cu: u64,
        /// What is available, in cu.
        available_cu: u64,
        /// When the next stipend arrives (ms since the epoch), if ever.
        next_grant_at_ms: Option<i64>,
    },
    /// 429 `insufficient_quota`: the key's own cap for this period cannot cover the request,
    /// whatever the account holds. Nothing was charged.
    KeyCapReached {
        /// The key's cap per period, in cu.
        cap_cu: u64,
        /// What the key has spent or holds this period, in cu.
        used_cu: u64,
        /// What the request needed, in cu.
        needed_cu: u64,
        /// When the next period begins (ms since the epoch).
        resets_at_ms: i64,
    },
    /// 429 `rate_limit_exceeded`: the model's fair-share queue is full for this person or for
    /// everyone, or the request waited too long for a slot. Nothing was charged.
    RateLimited {
        /// Which bound.
        reason: stipend_fairshare::Rejection,
        /// When to try again (`Retry-After`).
        retry_after_s: u64,
    },
    /// 503: the server is at a limit; try again shortly.
    Overloaded(String),
    /// 502: the upstream model server failed.
    Upstream(String),
    /// 504: the upstream model server did not answer in time.
    UpstreamTimeout,
    /// A call that failed after producing output (sent as a stream's last event): what was
    /// produced was charged, and the message says how much.
    CutShort {
        /// What went wrong.
        reason: String,
        /// What was charged for the output produced before it.
        charged_cu: u64,
    },
    /// 503: the server is shutting down (sent in a stream that it cut, or instead of an answer).
    ShuttingDown,
    /// 503: the ledger cannot be written, so nothing is served (fail closed).
    LedgerUnavailable,
    /// 500: a bug.
    Internal,
}

impl ApiError {
    /// A 400 naming a field.
    pub fn param(param: &str, message: impl Into<String>) -> ApiError {
        ApiError::InvalidRequest {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }

    fn parts(&self) -> (StatusCode, &'static str, Option<&'static str>, String) {
        match self {
            ApiError::Unauthorized(message) => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
                message.clone(),
            ),
            ApiError::InvalidRequest { message, .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                message.clone(),
            ),
            ApiError::ContextLengthExceeded { message, .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("context_length_exceeded"),
                message.clone(),
            ),
            ApiError::UnknownPath {
                method,
                path,
                other_method,
            } => (
                if *other_method {
                    StatusCode::METHOD_NOT_ALLOWED
                } else {
                    StatusCode::NOT_FOUND
                },
                "invalid_request_error",
                Some("unknown_url"),
                format!(
                    "Invalid URL ({method} {path}). Stipend serves POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /v1/budget, /v1/agents, /v1/approvals, GET /healthz and GET /metrics."
                ),
            ),
            ApiError::ModelNotFound(model) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
                format!("The model `{model}` does not exist or you do not have access to it."),
            ),
            ApiError::PayloadTooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("request_too_large"),
                format!("The request body is larger than the limit of {limit} bytes."),
            ),
            ApiError::BodyTimeout(seconds) => (
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                Some("request_timeout"),
                format!(
                    "The request body did not arrive within {seconds} s. Nothing was charged."
                ),
            ),
            ApiError::BudgetExhausted {
                needed_cu,
                available_cu,
                next_grant_at_ms,
            } => (
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                Some("budget_exhausted"),
                format!(
                    "Your compute budget cannot cover this request: it may need up to {} ({needed_cu} cu) and {} ({available_cu} cu) is available. {}",
                    Flops(*needed_cu as i64),
                    Flops(*available_cu as i64),
                    match next_grant_at_ms {
                        Some(at) => format!(
                            "Your next stipend arrives at {}. Lower max_tokens to fit what is left.",
                            format_utc(*at)
                        ),
                        None => "This account receives no stipend.".to_string(),
                    }
                ),
            ),
            ApiError::KeyCapReached {
                cap_cu,
                used_cu,
                needed_cu,
                resets_at_ms,
            } => (
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                Some("key_cap_reached"),
                format!(
                    "This key's cap of {} ({cap_cu} cu) a period cannot cover this request: it has used {} ({used_cu} cu) and the request may need up to {} ({needed_cu} cu). The cap starts again at {}; lower max_tokens to fit what is left, or use another key.",
                    Flops(*cap_cu as i64),
                    Flops(*used_cu as i64),
                    Flops(*needed_cu as i64),
                    format_utc(*resets_at_ms),
                ),
            ),
            ApiError::RateLimited { reason, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                Some(reason.as_str()),
                match reason {
                    stipend_fairshare::Rejection::PersonQueueFull => "You already have as many requests waiting for this model as one person may; this one was not queued. Nothing was charged.".to_string(),
                    stipend_fairshare::Rejection::QueueFull => "This model's queue is full; try again shortly. Nothing was charged.".to_string(),
                    stipend_fairshare::Rejection::WaitTooLong => "This model was busy for longer than a request may wait; try again later. Nothing was charged.".to_string(),
                },
            ),
            ApiError::Overloaded(message) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("overloaded"),
                message.clone(),
            ),
            ApiError::Upstream(message) => (
                StatusCode::BAD_GATEWAY,
                "api_error",
                Some("upstream_error"),
                format!("The model server failed: {message}. Nothing was charged."),
            ),
            ApiError::UpstreamTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "api_error",
                Some("upstream_timeout"),
                "The model server did not answer in time. Nothing was charged.".to_string(),
            ),
            ApiError::CutShort { reason, charged_cu } => (
                StatusCode::BAD_GATEWAY,
                "api_error",
                Some("cut_short"),
                format!(
                    "The call broke off: {reason}. The output produced before that was charged: {} ({charged_cu} cu).",
                    Flops(*charged_cu as i64)
                ),
            ),
            ApiError::ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("shutting_down"),
                "The server is shutting down; try again shortly.".to_string(),
            ),
            ApiError::LedgerUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("ledger_unavailable"),
                "The budget ledger is unavailable, so no request can be served right now."
                    .to_string(),
            ),
            ApiError::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                None,
                "Internal error.".to_string(),
            ),
        }
    }

    /// What went wrong, in a few words, for a longer message.
    pub fn reason(&self) -> String {
        match self {
            ApiError::Upstream(message) => format!("the model server failed: {message}"),
            ApiError::UpstreamTimeout => "the model server did not answer in time".to_string(),
            ApiError::CutShort { reason, .. } => reason.clone(),
            ApiError::ShuttingDown => "the server is shutting down".to_string(),
            ApiError::LedgerUnavailable => {
                "the budget ledger became unreachable, so this server could not keep the call's hold on your balance"
                    .to_string()
            }
            other => other.parts().3,
        }
    }

    /// The JSON body, as also sent inside a stream.
    pub fn body(&self) -> serde_json::Value {
        let (_, kind, code, message) = self.parts();
        let param = match self {
            ApiError::InvalidRequest { param, .. } => param.clone(),
            ApiError::ContextLengthExceeded { param, .. } => Some(param.to_string()),
            _ => None,
        };
        json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
    }
}

impl From<KeyError> for ApiError {
    fn from(error: KeyError) -> ApiError {
        match error {
            KeyError::Store(error) => {
                tracing::error!(%error, "key lookup failed");
                ApiError::LedgerUnavailable
            }
            other => ApiError::Unauthorized(other.to_string()),
        }
    }
}

impl From<LedgerError> for ApiError {
    fn from(error: LedgerError) -> ApiError {
        match error {
            LedgerError::InsufficientBalance {
                needed_cu,
                available_cu,
                next_grant_at_ms,
                ..
            } => ApiError::BudgetExhausted {
                needed_cu,
                available_cu,
                next_grant_at_ms,
            },
            LedgerError::InvalidAmount { reason } => ApiError::param("max_tokens", reason),
            LedgerError::WrongKind { .. } => {
                ApiError::Unauthorized("this key's account cannot spend compute".to_string())
            }
            LedgerError::Overloaded { what } => ApiError::Overloaded(format!(
                "The server is at capacity ({what}); try again shortly."
            )),
            LedgerError::Unavailable { .. } | LedgerError::Store(_) => {
                tracing::error!(%error, "ledger unavailable");
                ApiError::LedgerUnavailable
            }
            other => {
                tracing::error!(error = %other, "unexpected ledger error");
                ApiError::Internal
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _, _, _) = self.parts();
        let mut headers = HeaderMap::new();
        if let ApiError::BudgetExhausted {
            available_cu,
            next_grant_at_ms,
            ..
        } = &self
        {
            // The official SDKs retry 429s unless told not to; a spent budget will not refill
            // by retrying.
            headers.insert("x-should-retry", HeaderValue::from_static("false"));
            headers.insert("x-stipend-available-cu", HeaderValue::from(*available_cu));
            if let Some(at) = next_grant_at_ms
                && let Ok(value) = HeaderValue::from_str(&format_utc(*at))
            {
                headers.insert("x-stipend-next-grant", value);
            }
        }
        if matches!(self, ApiError::KeyCapReached { .. }) {
            headers.insert("x-should-retry", HeaderValue::from_static("false"));
        }
        if let ApiError::RateLimited { retry_after_s, .. } = &self {
            headers.insert("retry-after", HeaderValue::from(*retry_after_s));
        }
        if matches!(self, ApiError::Overloaded(_) | ApiError::ShuttingDown) {
            headers.insert("retry-after", HeaderValue::from_static("1"));
        }
        (status, headers, axum::Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Every refusal as a client receives it: status, the headers that steer retries, and the
    /// OpenAI-shaped body.
    #[test]
    fn every_error_has_openais_shape() {
        let errors = [
            ApiError::Unauthorized("the key is revoked".to_string()),
            ApiError::param("temperature", "`temperature` must be a number from 0 to 2"),
            ApiError::ContextLengthExceeded {
                message: "This model's maximum context length is 2048 tokens.".to_string(),
                param: "messages",
            },
            ApiError::UnknownPath {
                method: "GET".to_string(),
                path: "/v1/nothing".to_string(),
                other_method: false,
            },
            ApiError::UnknownPath {
                method: "GET".to_string(),
                path: "/v1/chat/completions".to_string(),
                other_method: true,
            },
            ApiError::ModelNotFound("gpt-9".to_string()),
            ApiError::PayloadTooLarge(4_194_304),
            ApiError::BodyTimeout(30),
            ApiError::BudgetExhausted {
                needed_cu: 5_000,
                available_cu: 1_200,
                next_grant_at_ms: Some(1_796_083_200_000),
            },
            ApiError::KeyCapReached {
                cap_cu: 2_000,
                used_cu: 1_500,
                needed_cu: 600,
                resets_at_ms: 1_796_083_200_000,
            },
            ApiError::RateLimited {
                reason: stipend_fairshare::Rejection::PersonQueueFull,
                retry_after_s: 2,
            },
            ApiError::Overloaded(
                "The server is at capacity (reservations); try again shortly.".to_string(),
            ),
            ApiError::Upstream("HTTP 500".to_string()),
            ApiError::UpstreamTimeout,
            ApiError::CutShort {
                reason: "the model server broke off".to_string(),
                charged_cu: 420,
            },
            ApiError::ShuttingDown,
            ApiError::LedgerUnavailable,
            ApiError::Internal,
        ];
        let mut out = String::new();
        for error in errors {
            let body = error.body();
            let response = error.into_response();
            out.push_str(&format!("{}\n", response.status()));
            for name in [
                "retry-after",
                "x-should-retry",
                "x-stipend-available-cu",
                "x-stipend-next-grant",
            ] {
                if let Some(value) = response.headers().get(name) {
                    out.push_str(&format!("{name}: {}\n", value.to_str().unwrap()));
                }
            }
            out.push_str(&serde_json::to_string(&body).unwrap());
            out.push_str("\n\n");
        }
        insta::assert_snapshot!(out);
    }
}
