//! The OpenAI-compatible API end to end: the real `stipend` binary on loopback, the fake upstream
//! (`stipend-testkit`) in front of it, a real HTTP client; every call charged exactly, every
//! refusal OpenAI-shaped and free, every fault charged as the product design says.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{Env, Server};
use futures_util::StreamExt;
use serde_json::{Value, json};

/// 8B parameters: 16 cu per token, prompt and completion alike.
const PRICE_CU: u64 = 16;
const FAULT_MODELS: &[&str] = &[
    "garbage",
    "huge-head",
    "error-500",
    "error-400",
    "stall",
    "drop-mid-stream",
    "slow",
    "odd-usage",
    "no-usage",
    "sleepy",
];

struct Stack {
    env: Env,
    server: Option<Server>,
    base: String,
    http: reqwest::Client,
}

impl Stack {
    async fn start(stipend: &str) -> Stack {
        Stack::with_config(&Stack::config(stipend).await)
    }

    /// A config with a fresh fake upstream: `echo` and every fault model.
    async fn config(stipend: &str) -> String {
        let upstream = stipend_testkit::spawn().await.unwrap();
        let mut config = format!(
            "listen = \"127.0.0.1:0\"\n[stipend]\namount = \"{stipend}\"\n\
             [[models]]\nname = \"echo\"\nbackend = \"openai\"\nbase_url = \"{upstream}\"\nparams = \"8B\"\ntimeout = \"2s\"\nmax_concurrency = 64\n"
        );
        for model in FAULT_MODELS {
            config.push_str(&format!(
                "[[models]]\nname = \"{model}\"\nbackend = \"openai\"\nbase_url = \"{upstream}\"\nparams = \"8B\"\ntimeout = \"2s\"\n"
            ));
        }
        config
    }

    /// The real server with this config file.
    fn with_config(config: &str) -> Stack {
        let env = Env::new(config);
        let server = Server::start(&env);
        let base = server.base.clone();
        Stack {
            env,
            server: Some(server),
            base,
            http: reqwest::Client::new(),
        }
    }

    fn person_with_key(&self, name: &str) -> String {
        self.env.person_with_key(name)
    }

    async fn post(&self, key: &str, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    async fn budget(&self, key: &str) -> Value {
        common::budget(&self.http, &self.base, key).await
    }

    async fn metrics(&self) -> String {
        common::metrics(&self.http, &self.base).await
    }

    async fn balance(&self, key: &str) -> i64 {
        self.budget(key).await["balance_cu"].as_i64().unwrap()
    }

    fn verify(&self) {
        let report = self.env.json(&["ledger", "verify"]);
        assert_eq!(report["violations"], json!([]), "{report}");
    }
}

fn chat(model: &str, content: &str, max_tokens: u64) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})
}

/// What the fake upstream reports, priced: its prompt tokens are the messages' JSON bytes / 4.
fn exact_cost(body: &Value, completion_tokens: u64) -> i64 {
    let prompt = stipend_testkit::prompt_tokens(body);
    ((prompt + completion_tokens) * PRICE_CU) as i64
}

async fn error_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    let error = body["error"].clone();
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(
        error.get("type").is_some() && error.get("param").is_some() && error.get("code").is_some(),
        "{body}"
    );
    (status, error)
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_and_completions_are_charged_exactly() {
    let stack = Stack::start("10 TFLOP").await;
    let key = stack.person_with_key("alice");
    let start = stack.balance(&key).await;
    assert_eq!(start, 10_000);

    let body = chat("echo", "What is the capital of France?", 5);
    let response = stack.post(&key, "/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["model"], "echo");
    assert_eq!(answer["choices"][0]["message"]["content"], "t0 t1 t2 t3 t4");
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    assert_eq!(answer["usage"]["completion_tokens"], 5);
    let after_chat = stack.balance(&key).await;
    assert_eq!(start - after_chat, exact_cost(&body, 5));

    let body = json!({"model": "echo", "prompt": "Once upon a time", "max_tokens": 3});
    let response = stack.post(&key, "/completions", &body).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["choices"][0]["text"], "t0 t1 t2");
    let after_completion = stack.balance(&key).await;
    assert_eq!(after_chat - after_completion, exact_cost(&body, 3));

    let budget = stack.budget(&key).await;
    assert_eq!(budget["reserved_cu"], 0);
    let echo = budget["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|model| model["model"] == "echo")
        .unwrap();
    assert_eq!(echo["usage_this_period"]["requests"], 2);
    assert_eq!(
        echo["usage_this_period"]["charged_cu"],
        start - after_completion
    );
    assert_eq!(budget["available_cu"], after_completion);
    assert_eq!(budget["stipend_cu"], 10_000);
    assert_eq!(budget["period"], "1d");
    assert!(
        budget["next_grant_at"]
            .as_str()
            .unwrap()
            .ends_with("T00:00:00Z")
    );

    let models = common::get_json(&stack.http, &stack.base, "models", &key).await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"echo") && ids.contains(&"slow"), "{models}");

    // The operator's view: counts by model and outcome, and exactly what was charged.
    let metrics = stack.metrics().await;
    assert!(
        metrics.contains("stipend_requests_total{model=\"echo\",outcome=\"ok\"} 2\n"),
        "{metrics}"
    );
    let charged = start - after_completion;
    assert!(
        metrics.contains(&format!(
            "stipend_charged_cu_total{{model=\"echo\"}} {charged}\n"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("stipend_request_duration_seconds_count{model=\"echo\"} 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("stipend_reservations_open 0\n"),
        "{metrics}"
    );
    assert!(!metrics.contains("alice"), "metrics never name a person");
    stack.verify();
}

async fn read_sse(response: reqwest::Response) -> Vec<String> {
    let text = response.text().await.unwrap();
    text.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_pass_through_and_charge_before_done() {
    let stack = Stack::start("10 TFLOP").await;
    let key = stack.person_with_key("alice");
    let start = stack.balance(&key).await;

    // With usage asked for: content chunks, then the usage chunk, then [DONE].
    let mut body = chat("echo", "Tell me a story", 4);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let response = stack.post(&key, "/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = read_sse(response).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "t0 t1 t2 t3");
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 4);
    assert!(chunks.iter().all(|c| c["model"] == "echo"));
    let after = stack.balance(&key).await;
    assert_eq!(start - after, exact_cost(&body, 4));

    // Without: no usage chunk and no usage field at all, still charged exactly.
    let mut body = chat("echo", "Tell me a story", 4);
    body["stream"] = json!(true);
    let events = read_sse(stack.post(&key, "/chat/completions", &body).await).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    for event in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(event).unwrap();
        assert!(chunk.get("usage").is_none(), "{chunk}");
        assert!(!chunk["choices"].as_array().unwrap().is_empty(), "{chunk}");
    }
    assert_eq!(after - stack.balance(&key).await, exact_cost(&body, 4));
    stack.verify();
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_are_openai_shaped_and_change_nothing() {
    let stack = Stack::start("10 TFLOP").await;
    let key = stack.person_with_key("alice");
    let start = stack.budget(&key).await;
    let url = format!("{}/chat/completions", stack.base);

    // Keys.
    let response = stack
        .http
        .post(&url)
        .json(&chat("echo", "hi", 5))
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(response).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    // The same key with its last secret digit changed.
    let last = if key.ends_with('0') { '1' } else { '0' };
    let forged = format!("{}{last}", &key[..key.len() - 1]);
    assert_ne!(forged, key);
    let (status, _) = error_of(
        stack
            .post(&forged, "/chat/completions", &chat("echo", "hi", 5))
            .await,
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = error_of(
        stack
            .post("sk-nonsense", "/chat/completions", &chat("echo", "hi", 5))
            .await,
    )
    .await;
    assert_eq!(status, 401);

    // Bodies.
    let cases: Vec<(Value, u16, Option<&str>)> = vec![
        (chat("no-such-model", "hi", 5), 404, None),
        (
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            400,
            Some("model"),
        ),
        (json!({"model": "echo"}), 400, Some("messages")),
        (
            json!({"model": "echo", "messages": []}),
            400,
            Some("messages"),
        ),
        (
            json!({"model": "echo", "messages": [{"content": "hi"}]}),
            400,
            Some("messages[0].role"),
        ),
        (
            json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}], "n": 2000}),
            400,
            Some("n"),
        ),
        (
            json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}),
            400,
            Some("max_tokens"),
        ),
        (
            json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}),
            400,
            Some("max_tokens"),
        ),
        (
            json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}),
            400,
            Some("max_tokens"),
        ),
        (
            json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}),
            400,
            Some("temperature"),
        ),
        (
            json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}], "top_p": -1}),
            400,
            Some("top_p"),
        ),
        (
            json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}),
            400,
            Some("stream"),
        ),
        (
            json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}], "stop": [1, 2]}),
            400,
            Some("stop"),
        ),
        (
            json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}),
            400,
            Some("stop"),
        ),
        (json!(["not", "an", "object"]), 400, None),
    ];
    for (body, expected_status, expected_param) in cases {
        let (status, error) = error_of(stack.post(&key, "/chat/completions", &body).await).await;
        assert_eq!(status, expected_status, "{body}: {error}");
        assert_eq!(error["param"].as_str(), expected_param, "{body}: {error}");
    }
    let response = stack
        .http
        .post(&url)
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body("{\"model\": \"echo\", \"messages\": [")
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(response).await;
    assert_eq!(status, 400);
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("parse the JSON"),
        "{error}"
    );
    let huge = json!({"model": "echo", "messages": [{"role": "user", "content": "x".repeat(5 * 1024 * 1024)}]});
    // Its own connection: the server stops reading at the limit and closes it.
    let response = reqwest::Client::new()
        .post(&url)
        .bearer_auth(&key)
        .json(&huge)
        .send()
        .await
        .unwrap();
    let (status, _) = error_of(response).await;
    assert_eq!(status, 413);
    // An unknown path is a 404, a known one with the wrong method a 405, both OpenAI-shaped.
    let (status, error) = error_of(
        stack
            .http
            .get(format!("{}/nowhere", stack.base))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(error["code"], "unknown_url", "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("GET /v1/nowhere"),
        "{error}"
    );
    let (status, error) = error_of(
        stack
            .http
            .get(format!("{}/chat/completions", stack.base))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 405, "{error}");
    // A declared length over the limit is a 413 at once, before any body is sent; a chunked
    // body with a bad chunk size is a 400 that says the body could not be read.
    let address = stack
        .base
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nConnection: close\r\n"
    );
    let started = std::time::Instant::now();
    let answered = exchange(&address, &format!("{head}Content-Length: 10000000\r\n\r\n")).await;
    assert!(answered.starts_with("HTTP/1.1 413"), "{answered}");
    assert!(started.elapsed() < Duration::from_secs(5));
    for size in ["zz", "-1"] {
        let answered = exchange(
            &address,
            &format!("{head}Transfer-Encoding: chunked\r\n\r\n{size}\r\nabc\r\n0\r\n\r\n"),
        )
        .await;
        assert!(answered.starts_with("HTTP/1.1 400"), "{size}: {answered}");
        assert!(answered.contains("could not be read"), "{answered}");
    }

    // A worst case beyond the budget: 429 insufficient_quota, no retries wanted, facts in headers.
    let response = stack
        .post(&key, "/chat/completions", &chat("echo", "hi", 100_000))
        .await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["x-should-retry"], "false");
    assert_eq!(response.headers()["x-stipend-available-cu"], "10000");
    assert!(
        response.headers()["x-stipend-next-grant"]
            .to_str()
            .unwrap()
            .ends_with("T00:00:00Z")
    );
    let (_, error) = error_of(response).await;
    assert_eq!(error["type"], "insufficient_quota");
    assert_eq!(error["code"], "budget_exhausted");
    assert!(
        error["message"].as_str().unwrap().contains("10 TFLOP"),
        "{error}"
    );

    assert_eq!(
        stack.budget(&key).await,
        start,
        "no refusal changed anything"
    );
    stack.verify();
    let metrics = stack.metrics().await;
    assert!(
        metrics.contains("stipend_requests_total{model=\"\",outcome=\"unauthorized\"} 3\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("stipend_requests_total{model=\"echo\",outcome=\"budget_exhausted\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("stipend_charged_cu_total{model=\"echo\"} 0\n"),
        "{metrics}"
    );

    // Revoking a key stops it at once, on the running server.
    let id = key
        .trim_start_matches("sk-stipend-")
        .split('-')
        .next()
        .unwrap();
    stack.env.json(&["key", "revoke", id]);
    let (status, error) = error_of(
        stack
            .post(&key, "/chat/completions", &chat("echo", "hi", 5))
            .await,
    )
    .await;
    assert_eq!(status, 401);
    assert!(
        error["message"].as_str().unwrap().contains("revoked"),
        "{error}"
    );
    let listed = stack.env.json(&["key", "list", "alice"]);
    assert!(listed["keys"][0]["revoked_at"].is_string(), "{listed}");
    assert!(
        listed["keys"][0].get("key").is_none(),
        "a secret is never shown again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_faults_charge_what_the_design_says() {
    let stack = Stack::start("10 TFLOP").await;
    let key = stack.person_with_key("alice");
    let mut balance = stack.balance(&key).await;

    // Failures before any output: nothing charged.
    for (model, status) in [
        ("error-500", 502),
        ("error-400", 400),
        ("stall", 504),
        ("garbage", 502),
    ] {
        let (got, error) = error_of(
            stack
                .post(&key, "/chat/completions", &chat(model, "hi", 5))
                .await,
        )
        .await;
        assert_eq!(got, status, "{model}: {error}");
        assert_eq!(
            stack.balance(&key).await,
            balance,
            "{model} charged something"
        );
    }
    let mut body = chat("stall", "hi", 5);
    body["stream"] = json!(true);
    let (got, _) = error_of(stack.post(&key, "/chat/completions", &body).await).await;
    assert_eq!(got, 504);
    assert_eq!(stack.balance(&key).await, balance);
    // An answer whose head is over the client's limit: a 502 that says so, not "cannot reach".
    let (got, error) = error_of(
        stack
            .post(&key, "/chat/completions", &chat("huge-head", "hi", 5))
            .await,
    )
    .await;
    assert_eq!(got, 502, "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("head is too large"),
        "{error}"
    );
    assert_eq!(stack.balance(&key).await, balance);
    // An upstream streaming something that is not a chunk: an error event, nothing charged.
    let mut body = chat("garbage", "hi", 5);
    body["stream"] = json!(true);
    let events = read_sse(stack.post(&key, "/chat/completions", &body).await).await;
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_error", "{last}");
    assert_eq!(stack.balance(&key).await, balance);

    // Usage reported beyond what was asked: charged at the bound, not the report.
    let body = chat("odd-usage", "hi", 6);
    assert_eq!(
        stack.post(&key, "/chat/completions", &body).await.status(),
        200
    );
    let now = stack.balance(&key).await;
    assert_eq!(balance - now, exact_cost(&body, 6));
    balance = now;

    // No usage at all: an upper bound is charged (the prompt at its bound, a token per byte of
    // text), and the answer shows it: its usage and its x-stipend-charged-cu header.
    let body = chat("no-usage", "hi", 6);
    let response = stack.post(&key, "/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let charged_header: u64 = response.headers()["x-stipend-charged-cu"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let answer: Value = response.json().await.unwrap();
    // A token per byte of text, at most max_tokens.
    let text_bytes = (answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .len() as u64)
        .min(6);
    let now = stack.balance(&key).await;
    let bound = (messages_bound(&body) + text_bytes) * PRICE_CU;
    assert_eq!((balance - now) as u64, bound);
    assert_eq!(charged_header, bound);
    assert_eq!(
        answer["usage"]["prompt_tokens"].as_u64(),
        Some(messages_bound(&body))
    );
    assert_eq!(
        answer["usage"]["completion_tokens"].as_u64(),
        Some(text_bytes)
    );
    balance = now;

    // A stream that completes without usage: the same bound, over the text it delivered.
    let mut body = chat("no-usage", "hi", 6);
    body["stream"] = json!(true);
    let events = read_sse(stack.post(&key, "/chat/completions", &body).await).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let delivered = events.iter().filter(|e| e.contains("\"content\"")).count() as u64;
    assert_eq!(delivered, 6);
    let now = stack.balance(&key).await;
    assert_eq!(
        (balance - now) as u64,
        (messages_bound(&body) + content_bytes(&events).min(6)) * PRICE_CU
    );
    balance = now;

    // A stream dropped half way: what was delivered is charged (the same bound), and the
    // client is told with an error event, not [DONE].
    let mut body = chat("drop-mid-stream", "hi", 12);
    body["stream"] = json!(true);
    let response = stack.post(&key, "/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let events = read_sse(response).await;
    assert_ne!(events.last().unwrap(), "[DONE]");
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    // The fake sends 6 of 12 tokens and then drops; a chunk in flight may die with the connection.
    let delivered = events.iter().filter(|e| e.contains("\"content\"")).count() as u64;
    assert!((1..=6).contains(&delivered), "{delivered} chunks delivered");
    let now = stack.balance(&key).await;
    let charged = (messages_bound(&body) + content_bytes(&events).min(12)) * PRICE_CU;
    assert_eq!((balance - now) as u64, charged);
    // The error event says what broke and what the output so far was charged.
    assert_eq!(last["error"]["code"], "cut_short", "{last}");
    let message = last["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("the stream broke off") && message.contains(&format!("({charged} cu)")),
        "{message}"
    );
    assert_eq!(stack.budget(&key).await["reserved_cu"], 0);
    stack.verify();
    let metrics = stack.metrics().await;
    assert!(
        metrics.contains("stipend_upstream_errors_total{model=\"error-500\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("stipend_upstream_errors_total{model=\"stall\"} 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("stipend_streams_cut_short_total{model=\"drop-mid-stream\"} 1\n"),
        "{metrics}"
    );
}

/// The bytes of text a stream's chunks carried.
fn content_bytes(events: &[String]) -> u64 {
    events
        .iter()
        .filter_map(|event| serde_json::from_str::<Value>(event).ok())
        .filter_map(|chunk| {
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::len)
        })
        .sum::<usize>() as u64
}

/// The gateway's prompt bound for a chat body: the bytes of the body it forwards (with
/// `stream_options` asking for usage, in a stream) + 8 per message + 16.
fn messages_bound(body: &Value) -> u64 {
    let messages = body["messages"].as_array().unwrap();
    let mut forwarded = body.clone();
    if body["stream"] == json!(true) {
        forwarded["stream_options"] = json!({"include_usage": true});
    }
    serde_json::to_vec(&forwarded).unwrap().len() as u64 + 8 * messages.len() as u64 + 16
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_leaving_mid_stream_does_not_stop_the_call_or_its_charge() {
    // A regression test: a client that hung up used to stop the upstream and pay for what had
    // reached it, or nothing; the upstream had computed more.
    let stack = Stack::start("10 TFLOP").await;
    let key = stack.person_with_key("alice");
    let balance = stack.balance(&key).await;
    let mut body = chat("slow", "hi", 12);
    body["stream"] = json!(true);
    let response = stack.post(&key, "/chat/completions", &body).await;
    let mut stream = response.bytes_stream();
    let mut seen = String::new();
    while !seen.contains(" t1") {
        seen.push_str(&String::from_utf8_lossy(
            &stream.next().await.unwrap().unwrap(),
        ));
    }
    drop(stream); // hang up after two tokens of twelve
    // The relay reads the upstream to its end and charges what it reports.
    let mut reserved = 1;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        reserved = stack.budget(&key).await["reserved_cu"].as_i64().unwrap();
        if reserved == 0 {
            break;
        }
    }
    assert_eq!(reserved, 0, "the hold was not released");
    let charged = balance - stack.balance(&key).await;
    assert_eq!(
        charged,
        exact_cost(&body, 12),
        "the whole answer, as reported"
    );
    stack.verify();
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_concurrent_requests_never_overspend() {
    // A stipend of 10 requests' worst case: each asks 10 tokens of a short prompt.
    let body = chat("echo", "hi", 10);
    let worst = (messages_bound(&body) + 10) * PRICE_CU;
    let stack = Stack::start(&format!("{}", worst * 10)).await;
    let key = stack.person_with_key("alice");
    let start = stack.balance(&key).await;
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let http = stack.http.clone();
        let url = format!("{}/chat/completions", stack.base);
        let key = key.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let response = http
                .post(url)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            (status, body)
        }));
    }
    let mut succeeded = 0i64;
    for task in tasks {
        let (status, body) = task.await.unwrap();
        match status {
            200 => succeeded += 1,
            429 => assert_eq!(body["error"]["type"], "insufficient_quota", "{body}"),
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    let charged = start - stack.balance(&key).await;
    assert!(succeeded >= 10, "only {succeeded} succeeded");
    assert!(charged <= start, "charged {charged} of {start}");
    assert_eq!(charged, succeeded * exact_cost(&body, 10));
    stack.verify();
    let output = stack.server.unwrap().stop();
    assert!(output.contains("the ledger is flushed"), "{output}");
}

/// An operator's upstream behind TLS with a private CA: trusted through `ca_file`, called and
/// charged exactly; the same upstream without `ca_file` is refused (502) and costs nothing.
#[tokio::test(flavor = "multi_thread")]
async fn an_https_upstream_with_a_private_ca_is_verified_called_and_charged() {
    let upstream = stipend_testkit::spawn_tls().await.unwrap();
    let ca = stipend_testkit::repo_path("crates/gateway/tests/data/ca.pem");
    let config = format!(
        "listen = \"127.0.0.1:0\"\n[stipend]\namount = \"10 TFLOP\"\n\
         [[models]]\nname = \"echo\"\nbackend = \"openai\"\nbase_url = \"{upstream}\"\nparams = \"8B\"\nca_file = \"{}\"\n\
         [[models]]\nname = \"untrusted\"\nbackend = \"openai\"\nbase_url = \"{upstream}\"\nupstream_model = \"echo\"\nparams = \"8B\"\n",
        ca.display()
    );
    let stack = Stack::with_config(&config);
    let key = stack.person_with_key("alice");
    let start = stack.balance(&key).await;

    let body = chat("echo", "What is the capital of France?", 5);
    for _ in 0..2 {
        let response = stack.post(&key, "/chat/completions", &body).await;
        assert_eq!(response.status(), 200);
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["choices"][0]["message"]["content"], "t0 t1 t2 t3 t4");
    }
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = read_sse(stack.post(&key, "/chat/completions", &streamed).await).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let after = stack.balance(&key).await;
    assert_eq!(start - after, 3 * exact_cost(&body, 5));

    let mut refused = body.clone();
    refused["model"] = json!("untrusted");
    let (status, error) = error_of(stack.post(&key, "/chat/completions", &refused).await).await;
    assert_eq!(status, 502, "{error}");
    let budget = stack.budget(&key).await;
    assert_eq!(budget["balance_cu"].as_i64().unwrap(), after);
    assert_eq!(budget["reserved_cu"], 0);
    stack.verify();
}

/// Sends one odd request and checks the product's promise for it: it is answered and charged
/// exactly what the answer says (a stream: what it carried), or refused with an OpenAI-shaped
/// error and charged nothing; no reservation is left open either way.
async fn check_odd_request(
    stack: &Stack,
    key: &str,
    body: Vec<u8>,
) -> Result<(), proptest::test_runner::TestCaseError> {
    use proptest::prelude::*;
    let before = stack.budget(key).await;
    let (response, streamed) = common::post_chat_bytes(
        &stack.http,
        &stack.base,
        key,
        body.clone(),
        Duration::from_secs(20),
    )
    .await;
    let status = response.status().as_u16();
    let expected_cost = if status == 200 {
        // Accepted, so the body was JSON: the fake upstream saw the same messages.
        let sent: Value = serde_json::from_slice(&body).unwrap();
        let prompt = stipend_testkit::prompt_tokens(&sent);
        if streamed {
            let events = read_sse(response).await;
            prop_assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
            let text: String = events[..events.len() - 1]
                .iter()
                .map(|event| serde_json::from_str::<Value>(event).unwrap())
                .filter_map(|chunk| {
                    chunk["choices"][0]["delta"]["content"]
                        .as_str()
                        .map(str::to_string)
                })
                .collect();
            let completion = text.split_whitespace().count() as u64;
            ((prompt + completion) * PRICE_CU) as i64
        } else {
            let answer: Value = response.json().await.unwrap();
            let usage = &answer["usage"];
            prop_assert_eq!(usage["prompt_tokens"].as_u64(), Some(prompt), "{}", answer);
            let completion = usage["completion_tokens"].as_u64().unwrap();
            prop_assert!(
                answer["choices"][0]["message"]["content"].is_string(),
                "{}",
                answer
            );
            ((prompt + completion) * PRICE_CU) as i64
        }
    } else {
        let (status, error) = error_of(response).await;
        prop_assert!(
            [400, 404, 413, 429].contains(&status),
            "{} for {}: {}",
            status,
            String::from_utf8_lossy(&body),
            error
        );
        0
    };
    let after = stack.budget(key).await;
    prop_assert_eq!(
        before["balance_cu"].as_i64().unwrap() - after["balance_cu"].as_i64().unwrap(),
        expected_cost,
        "status {} for {}",
        status,
        String::from_utf8_lossy(&body)
    );
    prop_assert_eq!(&after["reserved_cu"], &json!(0));
    Ok(())
}

/// Random requests built from a valid one (fields set to values of every type and size, removed,
/// added; messages of odd shapes; the text cut, a byte replaced, a key repeated), against the
/// real server: each is answered and charged exactly, or refused with an OpenAI-shaped error
/// and charged nothing. Then the ledger verifies and the server still serves.
#[test]
fn random_bodies_are_answered_or_refused_and_charged_exactly() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let stack = runtime.block_on(Stack::start("1 PFLOP"));
    let key = stack.person_with_key("alice");
    // `PROPTEST_CASES` runs more (or fewer) cases; 300 take a few seconds.
    let mut runner = common::runner(300);
    let strategy = common::odd_request();
    runner
        .run(&strategy, |(edits, damage)| {
            runtime.block_on(check_odd_request(
                &stack,
                &key,
                common::odd_body("echo", &edits, &damage),
            ))
        })
        .unwrap();
    stack.verify();
    runtime.block_on(async {
        let response = stack
            .post(&key, "/chat/completions", &chat("echo", "hi", 2))
            .await;
        assert_eq!(response.status(), 200);
    });
}

/// Prompt and answer text is never written to disk or to the logs (the product's invariant 4),
/// even with every log level on and on every path: answered, streamed, refused for a bad body, a
/// bad field, an unknown model, a body too large, the upstream refusing or failing, a stream
/// broken off or left by its client, the legacy completions endpoint; nor is it in what reads
/// the counts back (the exports, the transparency report).
#[tokio::test(flavor = "multi_thread")]
async fn prompts_reach_no_log_and_no_file() {
    const MARKER: &str = "zq-prompt-marker-4471";
    let config = Stack::config("1 PFLOP").await;
    let env = Env::new(&config);
    let log = env.dir.path().join("server.log");
    let server = Server::start_logged(&env, &log);
    let stack = Stack {
        base: server.base.clone(),
        server: Some(server),
        env,
        http: reqwest::Client::new(),
    };
    let key = stack.person_with_key("alice");
    let said = format!("please repeat {MARKER} back");

    let answered = stack
        .post(&key, "/chat/completions", &chat("echo", &said, 4))
        .await;
    assert_eq!(answered.status(), 200);
    let mut streamed = chat("echo", &said, 4);
    streamed["stream"] = json!(true);
    let events = read_sse(stack.post(&key, "/chat/completions", &streamed).await).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let legacy = json!({"model": "echo", "prompt": said, "max_tokens": 4});
    assert_eq!(
        stack.post(&key, "/completions", &legacy).await.status(),
        200
    );

    for (model, stream) in [
        ("error-400", false),
        ("error-500", false),
        ("garbage", false),
        ("drop-mid-stream", true),
        ("garbage", true),
    ] {
        let mut body = chat(model, &said, 4);
        body["stream"] = json!(stream);
        let response = stack.post(&key, "/chat/completions", &body).await;
        let _ = response.text().await;
    }
    // A bad field holding the text, an unknown model named by it, a body cut off in it, one over
    // the size limit full of it.
    let mut bad_field = chat("echo", &said, 4);
    bad_field["max_tokens"] = json!(said);
    let mut unknown_model = chat("echo", &said, 4);
    unknown_model["model"] = json!(MARKER);
    for body in [bad_field, unknown_model] {
        let status = stack.post(&key, "/chat/completions", &body).await.status();
        assert!(status.is_client_error(), "{status}");
    }
    let cut = serde_json::to_string(&chat("echo", &said, 4)).unwrap();
    let cut = &cut[..cut.find(MARKER).unwrap() + 8];
    let huge = chat("echo", &said.repeat(200_000), 4);
    for body in [cut.as_bytes().to_vec(), serde_json::to_vec(&huge).unwrap()] {
        let sent = reqwest::Client::new()
            .post(format!("{}/chat/completions", stack.base))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        // Past the size limit the server may answer 413 and close before the client has
        // written it all, which the client sees as a broken pipe.
        if let Ok(response) = sent {
            assert!(response.status().is_client_error(), "{}", response.status());
        }
    }
    // A client that leaves a stream half way.
    let mut slow = chat("slow", &said, 50);
    slow["stream"] = json!(true);
    let mut response = stack.post(&key, "/chat/completions", &slow).await;
    response.chunk().await.unwrap();
    drop(response);

    // What reads the counts back (the person's export, the public report, the operator's
    // export and report) holds none of the text either.
    let http = reqwest::Client::new();
    let export = http
        .get(format!("{}/me/export", stack.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(export.status(), 200);
    assert!(!export.text().await.unwrap().contains(MARKER));
    let report = http
        .get(format!("{}/transparency", stack.base))
        .send()
        .await
        .unwrap();
    // The last complete period's report, made now.
    assert_eq!(report.status(), 200);
    assert!(!report.text().await.unwrap().contains(MARKER));
    let exported = stack.env.run(&["--json", "account", "export", "alice"]);
    assert!(exported.status.success());
    assert!(!String::from_utf8_lossy(&exported.stdout).contains(MARKER));

    let mut stack = stack;
    let output = stack.server.take().unwrap().stop();
    let written = std::fs::read_to_string(&log).unwrap();
    assert!(
        written.contains("client left mid-stream") && written.contains("upstream refused"),
        "the log was not on: {written}"
    );
    common::assert_written_nowhere(MARKER, stack.env.dir.path(), &output);
}

/// Sends raw bytes on a new connection and returns all the server answers before it closes.
async fn exchange(address: &str, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).to_string()
}

/// Reads from `stream` until the server closes it (or resets it); returns what came and how long
/// that took. Fails the test if the server keeps it open for 10 s.
async fn until_closed(mut stream: tokio::net::TcpStream) -> (String, Duration) {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer)).await {
            Err(_) => panic!(
                "the server kept the connection open: {}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buffer[..n]),
        }
    }
    (
        String::from_utf8_lossy(&got).into_owned(),
        started.elapsed(),
    )
}

/// A client may not hold a connection without sending (`client_read_timeout`, here 1 s): half a
/// request head, nothing at all, an idle kept-alive connection and a body that stops coming are
/// each cut off (the body with an OpenAI-shaped 408, nothing charged), while an answer that takes
/// longer than the limit, plain or streamed, is served whole.
#[tokio::test(flavor = "multi_thread")]
async fn silent_clients_are_cut_off_and_slow_answers_are_not() {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    let config = format!(
        "client_read_timeout = \"1s\"\n{}",
        Stack::config("10 TFLOP").await
    );
    let stack = Stack::with_config(&config);
    let key = stack.person_with_key("alice");
    let start = stack.balance(&key).await;
    let address = stack
        .base
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_string();

    // Half a head, then nothing.
    let mut half = TcpStream::connect(&address).await.unwrap();
    half.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (_, after) = until_closed(half).await;
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}"
    );
    // Nothing at all.
    let (_, after) = until_closed(TcpStream::connect(&address).await.unwrap()).await;
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}"
    );
    // One request answered, then an idle kept-alive connection.
    let mut idle = TcpStream::connect(&address).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (answered, after) = until_closed(idle).await;
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}"
    );
    // A body that stops coming.
    let mut body = TcpStream::connect(&address).await.unwrap();
    body.write_all(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\""
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (answered, after) = until_closed(body).await;
    assert!(answered.starts_with("HTTP/1.1 408"), "{answered}");
    let error: Value =
        serde_json::from_str(&answered[answered.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    assert_eq!(error["error"]["code"], "request_timeout", "{error}");
    assert!(
        after >= Duration::from_millis(900),
        "answered after {after:?}"
    );

    // Answers that take longer than the limit: 8 tokens at 200 ms each.
    let body = chat("sleepy", "take your time", 8);
    let answered: Value = stack
        .post(&key, "/chat/completions", &body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answered["usage"]["completion_tokens"], 8, "{answered}");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = read_sse(stack.post(&key, "/chat/completions", &streamed).await).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(events.len(), 8 + 2, "{events:?}");

    // Only the two answers were charged.
    assert_eq!(start - stack.balance(&key).await, 2 * exact_cost(&body, 8));
    assert_eq!(stack.budget(&key).await["reserved_cu"], 0);
    stack.verify();
}

/// The server raises its soft limit on open files to the hard one (started here with a soft
/// limit of 256, as a shell's `ulimit -Sn` leaves it), since each client and upstream connection
/// takes a descriptor.
#[tokio::test(flavor = "multi_thread")]
async fn the_open_files_limit_is_raised_to_the_hard_one() {
    let env = Env::new(
        "listen = \"127.0.0.1:0\"\n[[models]]\nname = \"m\"\nbackend = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\nparams = \"8B\"\n",
    );
    let mut command = std::process::Command::new("sh");
    command
        .current_dir(env.dir.path())
        .arg("-c")
        .arg("ulimit -Sn 256 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_stipend"))
        .arg("--config")
        .arg(env.config())
        .arg("serve");
    let server = Server::spawn(command);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).unwrap();
    let open_files: Vec<&str> = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect();
    assert_eq!(open_files[0], open_files[1], "{limits}");
    assert_ne!(open_files[0], "256", "{limits}");
    server.stop();
}

/// A shutdown whose drain runs out cuts the calls still running: each stream ends with the
/// `cut_short` error event naming what its output so far was charged, and the charge is on disk.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_cut_at_the_end_of_the_drain_says_so_and_is_charged() {
    let config = format!(
        "drain_timeout = \"1s\"\n{}",
        Stack::config("10 TFLOP").await
    );
    let mut stack = Stack::with_config(&config);
    let key = stack.person_with_key("alice");
    let balance = stack.balance(&key).await;
    // `sleepy` takes 200 ms a token: twelve outlast the drain.
    let mut body = chat("sleepy", "hi", 12);
    body["stream"] = json!(true);
    let response = stack.post(&key, "/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    while !text.contains("t0") {
        text.push_str(&String::from_utf8_lossy(
            &stream.next().await.unwrap().unwrap(),
        ));
    }
    let server = stack.server.take().unwrap();
    let stopping = tokio::task::spawn_blocking(move || server.stop());
    while let Some(piece) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&piece.unwrap()));
    }
    let output = stopping.await.unwrap();
    assert!(output.contains("the ledger is flushed"), "{output}");
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .collect();
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "cut_short", "{last}");
    let message = last["error"]["message"].as_str().unwrap();
    assert!(message.contains("shutting down"), "{message}");
    let delivered = events.iter().filter(|e| e.contains("\"content\"")).count();
    assert!((1..12).contains(&delivered), "{delivered} tokens of 12");
    // Charged what its output so far is bounded by, as the event says; on disk.
    let alice = stack.env.json(&["account", "show", "alice"]);
    let charged = balance - alice["balance_cu"].as_i64().unwrap();
    assert!(charged > 0);
    assert!(message.contains(&format!("({charged} cu)")), "{message}");
    stack.verify();
}

/// With `metrics_listen`, `/metrics` is served on that address only: an operator's scraper need
/// not reach the public API, and the public cannot read the metrics there.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_can_be_served_apart_from_the_api() {
    let config = format!(
        "metrics_listen = \"127.0.0.1:0\"\n{}",
        Stack::config("10 TFLOP").await
    );
    let stack = Stack::with_config(&config);
    let key = stack.person_with_key("alice");
    assert_eq!(
        stack
            .post(&key, "/chat/completions", &chat("echo", "hi", 2))
            .await
            .status(),
        200
    );
    let output = stack.server.as_ref().unwrap().output();
    let metrics_url = output
        .lines()
        .find_map(|line| line.trim().strip_prefix("metrics   "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no metrics address in {output}"))
        .to_string();
    assert!(
        !metrics_url.contains(stack.base.trim_end_matches("/v1")),
        "{metrics_url}"
    );
    let text = stack
        .http
        .get(&metrics_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("stipend_requests_total{model=\"echo\",outcome=\"ok\"} 1\n"),
        "{text}"
    );
    let on_api = stack
        .http
        .get(stack.base.trim_end_matches("/v1").to_string() + "/metrics")
        .send()
        .await
        .unwrap();
    assert_eq!(on_api.status(), 404);
}
