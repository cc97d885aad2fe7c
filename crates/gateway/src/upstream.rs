//! An OpenAI-compatible upstream: vLLM, llama.cpp's server, OpenAI itself, or anything that speaks
//! `POST {base_url}/chat/completions`.

use std::time::Duration;

use serde_json::Value;

use crate::error::ApiError;

/// How to reach one upstream.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// E.g. `http://127.0.0.1:9000/v1`.
    pub base_url: String,
    /// Sent as `Authorization: Bearer …`, if set.
    pub api_key: Option<String>,
    /// The longest the upstream may take to start answering, and between stream chunks.
    pub timeout: Duration,
}

/// A client for one upstream.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: reqwest::Client,
    config: UpstreamConfig,
    prepared: std::sync::Arc<Prepared>,
}

/// What every call needs, worked out once at start.
#[derive(Debug)]
struct Prepared {
    /// The endpoints' URLs, parsed once (parsing per call showed in profiles).
    chat_url: reqwest::Url,
    completions_url: reqwest::Url,
    /// `Bearer …`, built once and marked sensitive so it is never logged.
    authorization: Option<reqwest::header::HeaderValue>,
}

impl Upstream {
    /// Builds the client.
    pub fn new(config: UpstreamConfig) -> Result<Upstream, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|error| format!("cannot build the HTTP client: {error}"))?;
        let base = config.base_url.trim_end_matches('/');
        let url = |path: &str| {
            reqwest::Url::parse(&format!("{base}{path}"))
                .map_err(|error| format!("base_url {:?} is not a URL: {error}", config.base_url))
        };
        let authorization = match &config.api_key {
            None => None,
            Some(key) => {
                let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
                    .map_err(|_| {
                        "the upstream's API key has characters a header cannot carry".to_string()
                    })?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        let prepared = std::sync::Arc::new(Prepared {
            chat_url: url("/chat/completions")?,
            completions_url: url("/completions")?,
            authorization,
        });
        Ok(Upstream {
            client,
            config,
            prepared,
        })
    }

    /// The per-call timeout.
    pub fn timeout(&self) -> Duration {
        self.config.timeout
    }

    /// Sends a request and waits for the response head (status and headers). Upstream errors
    /// are mapped here: a status of 400 or more is read and becomes an [`ApiError`].
    pub async fn post(&self, path: &str, body: &Value) -> Result<reqwest::Response, ApiError> {
        let url = match path {
            "/chat/completions" => self.prepared.chat_url.clone(),
            "/completions" => self.prepared.completions_url.clone(),
            other => reqwest::Url::parse(&format!(
                "{}{other}",
                self.config.base_url.trim_end_matches('/')
            ))
            .map_err(|_| ApiError::Internal)?,
        };
        let mut request = self.client.post(url).json(body);
        if let Some(authorization) = &self.prepared.authorization {
            request = request.header(reqwest::header::AUTHORIZATION, authorization.clone());
        }
        let response = match tokio::time::timeout(self.config.timeout, request.send()).await {
            Err(_) => return Err(ApiError::UpstreamTimeout),
            Ok(Err(error)) if error.is_timeout() => return Err(ApiError::UpstreamTimeout),
            Ok(Err(error)) => {
                tracing::warn!(%error, "upstream request failed");
                return Err(ApiError::Upstream("cannot reach it".to_string()));
            }
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let text = tokio::time::timeout(Duration::from_secs(5), response.text())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        // An upstream's own 400 (a prompt too long for it, say) is the client's problem and is
        // passed on as one; anything else is the upstream's.
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|body| body["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("status {status}"));
        tracing::warn!(%status, "upstream refused");
        if status == reqwest::StatusCode::BAD_REQUEST {
            return Err(ApiError::InvalidRequest {
                message,
                param: None,
            });
        }
        Err(ApiError::Upstream(format!("status {}", status.as_u16())))
    }
}
