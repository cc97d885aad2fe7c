//! An OpenAI-compatible upstream: vLLM, llama.cpp's server, OpenAI itself, or anything that speaks
//! `POST {base_url}/chat/completions`.

use crate::limits::{
    UPSTREAM_CONNECT_TIMEOUT_MAX, UPSTREAM_ERROR_BYTES_MAX, UPSTREAM_ERROR_TIME_MAX,
};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::Value;

use crate::error::ApiError;
use crate::http1;

pub use crate::http1::{Body, Roots};

/// How to reach one upstream.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// E.g. `http://127.0.0.1:9000/v1`.
    pub base_url: String,
    /// Sent as `Authorization: Bearer …`, if set.
    pub api_key: Option<String>,
    /// The longest the upstream may take to start answering, and between stream chunks.
    pub timeout: Duration,
    /// Connections kept open for reuse (the model's `max_concurrency` is a good number).
    pub idle_connections: usize,
    /// What TLS trusts, for an `https://` upstream.
    pub roots: Roots,
}

/// A client for one upstream.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: Arc<http1::Client>,
    timeout: Duration,
    /// The request head's header lines after the standard ones: `Authorization` if a key is set.
    /// Never logged.
    extra_headers: Arc<str>,
}

impl Upstream {
    /// Builds the client (no connection is made until the first call).
    pub fn new(config: UpstreamConfig) -> Result<Upstream, String> {
        let client = http1::Client::new(
            &config.base_url,
            config.timeout.min(UPSTREAM_CONNECT_TIMEOUT_MAX),
            config.idle_connections.max(1),
            config.roots,
        )
        .map_err(|error| format!("base_url: {error}"))?;
        let extra_headers = match &config.api_key {
            None => String::new(),
            Some(key) if key.bytes().all(|byte| byte.is_ascii_graphic()) => {
                format!("Authorization: Bearer {key}\r\n")
            }
            Some(_) => {
                return Err(
                    "the upstream's API key has characters a header cannot carry".to_string(),
                );
            }
        };
        Ok(Upstream {
            client: Arc::new(client),
            timeout: config.timeout,
            extra_headers: extra_headers.into(),
        })
    }

    /// The per-call timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends a JSON body to `path` (under the base URL) and waits for the response head. Upstream
    /// errors are mapped here: a status of 400 or more is read and becomes an [`ApiError`].
    pub async fn post(&self, path: &str, body: &[u8]) -> Result<Body, ApiError> {
        let head = self
            .client
            .request_head(path, &self.extra_headers, body.len());
        let response = match tokio::time::timeout(self.timeout, self.client.send(&head, body)).await
        {
            Err(_) => return Err(ApiError::UpstreamTimeout),
            Ok(Err(error)) => {
                tracing::warn!(%error, "upstream request failed");
                return Err(ApiError::Upstream(match error {
                    http1::Error::Config(_) | http1::Error::Connect(_) => {
                        "cannot reach it".to_string()
                    }
                    http1::Error::Io(_) => "the connection to it failed".to_string(),
                    http1::Error::Protocol(what) => format!("its answer was malformed: {what}"),
                    http1::Error::TooLarge(limit) => {
                        format!("its answer is over the limit of {limit} bytes")
                    }
                }));
            }
            Ok(Ok(response)) => response,
        };
        let status = response.status;
        if status.is_success() {
            return Ok(response.body);
        }
        let text = tokio::time::timeout(
            UPSTREAM_ERROR_TIME_MAX,
            response.body.collect(UPSTREAM_ERROR_BYTES_MAX),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
        // An upstream's own 400 (a prompt too long for it, say) is the client's problem and is
        // passed on as one; anything else is the upstream's.
        let message = serde_json::from_slice::<Value>(&text)
            .ok()
            .and_then(|body| body["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("status {status}"));
        tracing::warn!(%status, "upstream refused");
        if status == StatusCode::BAD_REQUEST {
            return Err(ApiError::InvalidRequest {
                message,
                param: None,
            });
        }
        Err(ApiError::Upstream(format!("status {}", status.as_u16())))
    }

    /// Idle connections kept for reuse (for tests).
    pub fn idle_connections(&self) -> usize {
        self.client.idle_connections()
    }
}
