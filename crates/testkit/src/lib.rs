//! A fake OpenAI-compatible upstream, for tests and load runs only. The model name picks the
//! behaviour, so one server covers every failure mode:
//!
//! - anything else (e.g. `echo`): answers `t0 t1 …`, [`REPLY_TOKENS`] tokens or `max_tokens`
//!   if fewer (then `finish_reason: "length"`), with exact usage;
//! - `error-500`: answers 500;
//! - `error-400`: answers 400 with an OpenAI error;
//! - `stall`: never answers;
//! - `drop-mid-stream`: streams half its tokens, then drops the connection;
//! - `slow`: waits 20 ms before each token (and before a non-stream answer);
//! - `sleepy`: the same, 200 ms a token (a request that holds its slot for seconds);
//! - `odd-usage`: reports ten times the completion tokens it produced;
//! - `no-usage`: reports no usage at all;
//! - `trickle`: streams a token every 50 ms and never ends;
//! - `garbage`: answers JSON that is not an object (`[1, 2]`), and streams `data: 5`;
//! - `huge-head`: answers with a 70 KB header, a head over any sane client's limit;
//! - `honest…`: computes exactly what the body asks for and reports it, counting what it
//!   computed in a [`Computed`] (see [`spawn_metered`]): every prompt (the body's bytes the
//!   model reads, over four), and `max_tokens` tokens for each choice (`n`, or `best_of` if
//!   larger, for each prompt of a completion's list). The name's further parts change it:
//!   `-reasoning` (the first half of each choice's tokens as `reasoning_content`), `-chunky`
//!   (ten tokens a chunk), `-slow` (2 ms a token, plain answers too), and the hostile
//!   `-zero-usage` (reports 0/0), `-low-usage` (reports one completion token), `-no-usage`,
//!   `-runaway` (ignores `max_tokens`: a stream never ends, a plain answer is a hundred times
//!   too long and says so), and `-stray` (from its third token, streams a choice at index 10⁹).
//!
//! - `script`: an agent's model, told by the run's goal which tool calls to make at each step
//!   (see [`script`]), counting what it computed as the `honest` models do.
//!
//! Usage: prompt tokens are the prompt's bytes divided by four, rounded up; completion tokens
//! are the tokens produced. Responses never echo the prompt.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// Tokens in a reply when `max_tokens` allows.
pub const REPLY_TOKENS: u64 = 12;

/// What the `honest…` models computed, in tokens, as they computed it.
#[derive(Debug, Default)]
pub struct Computed {
    /// Prompt tokens read.
    pub prompt_tokens: AtomicU64,
    /// Completion tokens generated (streamed or not, whether or not anyone read them).
    pub completion_tokens: AtomicU64,
    /// Calls whose generation has ended (finished, or stopped by the client going away).
    pub calls_ended: AtomicU64,
}

impl Computed {
    /// Prompt and completion tokens computed so far.
    pub fn tokens(&self) -> (u64, u64) {
        (
            self.prompt_tokens.load(Ordering::SeqCst),
            self.completion_tokens.load(Ordering::SeqCst),
        )
    }
}

fn router() -> Router {
    router_metered(Arc::new(Computed::default()))
}

fn router_metered(computed: Arc<Computed>) -> Router {
    let chat = Arc::clone(&computed);
    Router::new()
        .route(
            "/v1/chat/completions",
            post(move |body| answer(body, true, chat)),
        )
        .route(
            "/v1/completions",
            post(move |body| answer(body, false, computed)),
        )
}

/// Serves the fake upstream on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener) -> std::io::Result<()> {
    axum::serve(listener, router()).await
}

/// Like [`spawn`], and also returns what its `honest…` models compute.
pub async fn spawn_metered() -> std::io::Result<(String, Arc<Computed>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let computed = Arc::new(Computed::default());
    let router = router_metered(Arc::clone(&computed));
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok((format!("http://{address}/v1"), computed))
}

/// Serves the fake upstream over TLS on 127.0.0.1, with the test certificate for `localhost`
/// (`crates/gateway/tests/data/localhost.pem`, signed by the test CA `ca.pem` there), in the
/// background; returns the base URL, `https://localhost:PORT/v1`.
pub async fn spawn_tls() -> std::io::Result<String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let data = repo_path("crates/gateway/tests/data");
    let certificates = CertificateDer::pem_file_iter(data.join("localhost.pem"))
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .map_err(std::io::Error::other)?;
    let key =
        PrivateKeyDer::from_pem_file(data.join("localhost.key")).map_err(std::io::Error::other)?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_no_client_auth()
    .with_single_cert(certificates, key)
    .map_err(std::io::Error::other)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (port, _) = spawn_accepting(Some(acceptor)).await?;
    Ok(format!("https://localhost:{port}/v1"))
}

/// Like [`spawn`], and also counts the TCP connections it accepts (to see connection reuse).
pub async fn spawn_counted() -> std::io::Result<(String, Arc<AtomicUsize>)> {
    let (port, accepted) = spawn_accepting(None).await?;
    Ok((format!("http://127.0.0.1:{port}/v1"), accepted))
}

/// Accepts connections on a free loopback port (through TLS if given) and serves each with
/// hyper; returns the port and the count of connections accepted.
async fn spawn_accepting(
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> std::io::Result<(u16, Arc<AtomicUsize>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let tls = tls.clone();
            tokio::spawn(async move {
                let service = hyper_util::service::TowerToHyperService::new(router());
                let http = hyper::server::conn::http1::Builder::new();
                let _ = match tls {
                    None => {
                        http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await
                    }
                    Some(acceptor) => {
                        let Ok(stream) = acceptor.accept(stream).await else {
                            return;
                        };
                        http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await
                    }
                };
            });
        }
    });
    Ok((port, accepted))
}

/// Binds 127.0.0.1 on a free port, serves in the background, and returns the base URL.
pub async fn spawn() -> std::io::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(serve(listener));
    Ok(format!("http://{address}/v1"))
}

/// The reply's tokens for a request: what `max_tokens` allows, at most [`REPLY_TOKENS`].
pub fn reply_tokens(max_tokens: u64) -> u64 {
    max_tokens.min(REPLY_TOKENS)
}

/// The prompt tokens the fake reports for a body: its prompt's bytes over four.
pub fn prompt_tokens(request: &Value) -> u64 {
    let prompt = if request["messages"].is_null() {
        &request["prompt"]
    } else {
        &request["messages"]
    };
    (prompt.to_string().len() as u64).div_ceil(4)
}

async fn answer(body: Bytes, chat: bool, computed: Arc<Computed>) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "not json").into_response();
    };
    let model = request["model"].as_str().unwrap_or("echo").to_string();
    if model.starts_with("honest") {
        return honest::answer(&request, chat, &model, computed).await;
    }
    if model == "script" && chat {
        return script::answer(&request, &computed);
    }
    let max_tokens = request["max_tokens"].as_u64().unwrap_or(16);
    let stream = request["stream"].as_bool().unwrap_or(false);
    let prompt_tokens = prompt_tokens(&request);
    let tokens = reply_tokens(max_tokens);
    let delay = match model.as_str() {
        "slow" => Duration::from_millis(20),
        "sleepy" => Duration::from_millis(200),
        "trickle" => Duration::from_millis(50),
        _ => Duration::ZERO,
    };
    let tokens = if model == "trickle" {
        u64::MAX / 4
    } else {
        tokens
    };
    match model.as_str() {
        "error-500" => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "upstream exploded").into_response();
        }
        "error-400" => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"error": {"message": "prompt too long for this model", "type": "invalid_request_error"}})),
            )
                .into_response();
        }
        "stall" => {
            tokio::time::sleep(Duration::from_secs(3_600)).await;
        }
        "garbage" if stream => {
            return (
                [(header::CONTENT_TYPE, "text/event-stream")],
                "data: 5\n\ndata: [DONE]\n\n",
            )
                .into_response();
        }
        "garbage" => return axum::Json(json!([1, 2])).into_response(),
        "huge-head" => {
            return ([("x-padding", "a".repeat(70_000))], axum::Json(json!({}))).into_response();
        }
        _ => {}
    }
    let reported_completion = if model == "odd-usage" {
        tokens * 10
    } else {
        tokens
    };
    let usage = (model != "no-usage").then(|| {
        json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": reported_completion,
            "total_tokens": prompt_tokens + reported_completion,
        })
    });
    let finish = if tokens < REPLY_TOKENS {
        "length"
    } else {
        "stop"
    };
    if !stream {
        tokio::time::sleep(delay * tokens as u32).await;
        let text: Vec<String> = (0..tokens).map(|index| format!("t{index}")).collect();
        let text = text.join(" ");
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": text, "finish_reason": finish})
        };
        let mut body = json!({
            "id": "fake-1",
            "object": if chat { "chat.completion" } else { "text_completion" },
            "created": 0,
            "model": model,
            "choices": [choice],
        });
        if let Some(usage) = usage {
            body["usage"] = usage;
        }
        return axum::Json(body).into_response();
    }
    let include_usage = request["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    let drop_after = (model == "drop-mid-stream").then_some(tokens / 2);
    let events = futures_util::stream::unfold(0u64, move |index| {
        let model = model.clone();
        let usage = usage.clone();
        async move {
            if drop_after == Some(index) {
                // Drop the connection: the stream ends in an error, with no [DONE].
                return Some((Err(std::io::Error::other("dropped")), u64::MAX));
            }
            if index == u64::MAX {
                return None;
            }
            tokio::time::sleep(delay).await;
            let event = if index < tokens {
                let piece = if index == 0 {
                    "t0".to_string()
                } else {
                    format!(" t{index}")
                };
                let choice = if chat {
                    json!({"index": 0, "delta": {"content": piece}, "finish_reason": Value::Null})
                } else {
                    json!({"index": 0, "text": piece, "finish_reason": Value::Null})
                };
                let mut chunk = json!({"id": "fake-1", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [choice]});
                if include_usage {
                    chunk["usage"] = Value::Null;
                }
                format!("data: {chunk}\n\n")
            } else if index == tokens {
                let choice = if chat {
                    json!({"index": 0, "delta": {}, "finish_reason": finish})
                } else {
                    json!({"index": 0, "text": "", "finish_reason": finish})
                };
                format!(
                    "data: {}\n\n",
                    json!({"id": "fake-1", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [choice]})
                )
            } else if index == tokens + 1 {
                match (include_usage, usage) {
                    (true, Some(usage)) => format!(
                        "data: {}\n\n",
                        json!({"id": "fake-1", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [], "usage": usage})
                    ),
                    _ => String::new(),
                }
            } else if index == tokens + 2 {
                "data: [DONE]\n\n".to_string()
            } else {
                return None;
            };
            Some((Ok::<Bytes, std::io::Error>(Bytes::from(event)), index + 1))
        }
    });
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(events),
    )
        .into_response()
}

mod honest;
pub mod script;

/// A path in the repository, from the crate being tested or benchmarked. Read at run time
/// (cargo sets `CARGO_MANIFEST_DIR` for tests and benches): a test binary reused from a build in
/// another checkout must not point back into that checkout.
pub fn repo_path(relative: &str) -> std::path::PathBuf {
    let crate_dir = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
        || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        std::path::PathBuf::from,
    );
    // Every crate is at crates/NAME.
    crate_dir.join("../..").join(relative)
}

/// The embedded default model for tests and benchmarks: `STIPEND_MODEL_GGUF`, or the repository's
/// `models/` directory (where `stipend model fetch`, which `make test` runs, puts it).
///
/// # Panics
///
/// If the file is missing, saying how to fetch it.
pub fn model_gguf() -> std::path::PathBuf {
    let path = std::env::var_os("STIPEND_MODEL_GGUF")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| repo_path("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    #[allow(clippy::panic)]
    if !path.is_file() {
        panic!(
            "{} is missing: run `stipend model fetch` (make test does)",
            path.display()
        );
    }
    path
}
