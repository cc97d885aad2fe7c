//! Metering integrity: every token an upstream computes for a call is paid for. Each test is one
//! way compute used to escape the meter (a request shape that multiplies the work, a part of the
//! body the bound did not count, a client that hangs up, usage that lies, an upstream that
//! overruns), against an upstream that computes exactly what a body asks for and counts it. The
//! charge must be at least what it computed and at most what was reserved; the ledger verifies.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::Setup;
use futures_util::StreamExt;
use serde_json::{Value, json};
use stipend_gateway::queue::{FairQueue, QueueOptions};
use stipend_gateway::{Backend, GatewayOptions, Model, Upstream, UpstreamConfig};
use stipend_ledger::verify::verify;
use stipend_testkit::Computed;

/// The honest upstream's models, and its hostile variants.
const MODELS: &[&str] = &[
    "honest",
    "honest-slow",
    "honest-reasoning-slow",
    "honest-chunky-slow",
    "honest-zero-usage",
    "honest-low-usage",
    "honest-no-usage",
    "honest-runaway",
    "honest-stray",
    "honest-reasoning",
    "honest-chunky",
];

/// A gateway in front of the honest upstream, every model at 1 cu a token.
struct Metered {
    setup: Setup,
    computed: Arc<Computed>,
    base: String,
    http: reqwest::Client,
}

impl Metered {
    async fn start() -> Metered {
        let setup = Setup::new();
        let (upstream, computed) = stipend_testkit::spawn_metered().await.unwrap();
        let models = MODELS
            .iter()
            .map(|name| Model {
                name: name.to_string(),
                price_prompt_cu: 1,
                price_cached_prompt_cu: 1,
                price_completion_cu: 1,
                sink: setup.ledger.sink(&format!("sink:{name}")).unwrap(),
                backend: Backend::Upstream {
                    upstream: Upstream::new(UpstreamConfig {
                        base_url: upstream.clone(),
                        api_key: None,
                        timeout: Duration::from_secs(10),
                        idle_connections: 8,
                        roots: Default::default(),
                    })
                    .unwrap(),
                    model: name.to_string(),
                },
                queue: Arc::new(FairQueue::new(16, QueueOptions::default())),
                max_concurrency: 16,
                counters: Default::default(),
            })
            .collect();
        let address = common::serve(
            setup.ledger.clone(),
            setup.keys.clone(),
            models,
            GatewayOptions::default(),
        )
        .await;
        Metered {
            setup,
            computed,
            base: format!("http://{address}/v1"),
            http: reqwest::Client::new(),
        }
    }

    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.setup.key)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    fn balance(&self) -> i64 {
        self.setup.ledger.view(self.setup.alice).unwrap().balance_cu
    }

    /// What alice has reserved now.
    fn held(&self) -> u64 {
        self.setup
            .ledger
            .view(self.setup.alice)
            .unwrap()
            .reserved_cu
    }

    /// Waits until `calls` generations have ended upstream in all and nothing is held: every
    /// call has been settled.
    async fn settled(&self, calls: u64) {
        for _ in 0..1_000 {
            let ended = self.computed.calls_ended.load(Ordering::SeqCst);
            let reserved = self.held();
            if ended >= calls && reserved == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the calls did not settle");
    }

    /// Tokens computed upstream so far, at 1 cu each.
    fn computed_cu(&self) -> i64 {
        let (prompt, completion) = self.computed.tokens();
        (prompt + completion) as i64
    }

    fn verify(&self) {
        self.setup.ledger.flush().unwrap();
        let report = verify(&*self.setup.ledger.store()).unwrap();
        assert!(report.violations.is_empty(), "{report:?}");
    }
}

/// The gateway's worst case for a body (1 cu a token): the bytes it forwards, the template's
/// overheads, and `max_tokens` for every choice.
fn worst_cu(body: &Value, choices: u64) -> i64 {
    let mut forwarded = body.clone();
    if body["stream"] == json!(true) {
        forwarded["stream_options"] = json!({"include_usage": true});
    }
    let messages = body["messages"].as_array().map_or(0, Vec::len) as u64;
    let bytes = serde_json::to_vec(&forwarded).unwrap().len() as u64;
    (bytes + 8 * messages + 16 * choices + body["max_tokens"].as_u64().unwrap() * choices) as i64
}

fn chat(model: &str, content: &str, max_tokens: u64) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})
}

async fn events(response: reqwest::Response) -> Vec<String> {
    let text = response.text().await.unwrap();
    text.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// Checks a call that ran to its end: charged at least what the upstream computed for it, at
/// most its worst case, and exactly what the answer's usage and header say.
async fn check_plain(metered: &Metered, path: &str, body: &Value, choices: u64, calls: u64) {
    let (balance, computed) = (metered.balance(), metered.computed_cu());
    let response = metered.post(path, body).await;
    assert_eq!(response.status(), 200, "{body}");
    let header: i64 = response.headers()["x-stipend-charged-cu"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let answer: Value = response.json().await.unwrap();
    metered.settled(calls).await;
    let charged = balance - metered.balance();
    let caused = metered.computed_cu() - computed;
    assert!(charged >= caused, "charged {charged} for {caused} computed");
    assert!(charged <= worst_cu(body, choices), "charged {charged}");
    assert_eq!(header, charged);
    assert_eq!(
        answer["usage"]["total_tokens"].as_i64(),
        Some(charged),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn work_multiplied_by_the_request_is_in_the_bound_and_paid_for() {
    let metered = Metered::start().await;
    // Row 1: a list of 500 prompts is 500 choices of max_tokens each.
    let prompts = json!({"model": "honest", "prompt": vec!["hi"; 500], "max_tokens": 100});
    check_plain(&metered, "/completions", &prompts, 500, 1).await;
    assert!(metered.computed.tokens().1 >= 50_000);
    // Row 4: best_of computes every generation, though it returns one.
    let best_of = json!({"model": "honest", "prompt": "Once", "best_of": 20, "max_tokens": 100});
    check_plain(&metered, "/completions", &best_of, 20, 2).await;
    // n choices of a chat.
    let mut n = chat("honest", "hi", 50);
    n["n"] = json!(3);
    check_plain(&metered, "/chat/completions", &n, 3, 3).await;
    // Past the limit on choices: refused, naming the field, for nothing.
    let balance = metered.balance();
    for (path, body, param) in [
        (
            "/chat/completions",
            json!({"model": "honest", "messages": [{"role": "user", "content": "hi"}], "n": 2000}),
            "n",
        ),
        (
            "/completions",
            json!({"model": "honest", "prompt": vec!["hi"; 2000], "max_tokens": 1}),
            "prompt",
        ),
        (
            "/completions",
            json!({"model": "honest", "prompt": "hi", "n": 3, "best_of": 2}),
            "best_of",
        ),
    ] {
        let response = metered.post(path, &body).await;
        assert_eq!(response.status(), 400);
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["param"], param, "{error}");
    }
    assert_eq!(metered.balance(), balance);
    metered.verify();
}

#[tokio::test(flavor = "multi_thread")]
async fn every_part_of_the_body_the_model_reads_is_in_the_bound() {
    // Row 2: a tiny message with a 295 KB function list, or the same as a response schema.
    let metered = Metered::start().await;
    let properties: serde_json::Map<String, Value> = (0..9_000)
        .map(|index| (format!("field_{index:05}"), json!({"type": "string"})))
        .collect();
    let schema = json!({"type": "object", "properties": properties});
    let mut functions = chat("honest", "hi", 5);
    functions["functions"] = json!([{"name": "f", "parameters": schema}]);
    assert!(functions.to_string().len() > 200_000);
    check_plain(&metered, "/chat/completions", &functions, 1, 1).await;
    let mut format = chat("honest", "hi", 5);
    format["response_format"] =
        json!({"type": "json_schema", "json_schema": {"name": "s", "schema": schema}});
    check_plain(&metered, "/chat/completions", &format, 1, 2).await;
    let mut unknown = chat("honest", "hi", 5);
    unknown["some_future_field"] = json!("x".repeat(100_000));
    check_plain(&metered, "/chat/completions", &unknown, 1, 3).await;
    metered.verify();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_hangs_up_pays_for_what_it_caused() {
    // Row 3: five plain calls whose client leaves after 0.3 s, the upstream answering 1000
    // tokens after 2 s.
    let metered = Arc::new(Metered::start().await);
    let (balance, computed) = (metered.balance(), metered.computed_cu());
    let body = chat("honest-slow", "Write a long story.", 1_000);
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let metered = Arc::clone(&metered);
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let sent = tokio::time::timeout(
                Duration::from_millis(300),
                metered.post("/chat/completions", &body),
            )
            .await;
            assert!(sent.is_err(), "the answer came too early to test a hang-up");
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    metered.settled(5).await;
    let charged = balance - metered.balance();
    let caused = metered.computed_cu() - computed;
    assert!(caused >= 5_000, "{caused}");
    assert!(charged >= caused, "charged {charged} for {caused} computed");
    assert!(charged <= 5 * worst_cu(&body, 1));

    // Row 5: streams that carry reasoning, or ten tokens a chunk, left after their first chunks.
    for (model, max_tokens) in [("honest-reasoning-slow", 200), ("honest-chunky-slow", 420)] {
        let (balance, computed) = (metered.balance(), metered.computed_cu());
        let calls = metered.computed.calls_ended.load(Ordering::SeqCst);
        let mut body = chat(model, "Think first.", max_tokens);
        body["stream"] = json!(true);
        let mut stream = metered
            .post("/chat/completions", &body)
            .await
            .bytes_stream();
        let first = stream.next().await.unwrap().unwrap();
        assert!(!first.is_empty());
        drop(stream);
        metered.settled(calls + 1).await;
        let charged = balance - metered.balance();
        let caused = metered.computed_cu() - computed;
        assert!(caused > max_tokens as i64, "{model}: {caused}");
        assert!(charged >= caused, "{model}: charged {charged} for {caused}");
        assert!(charged <= worst_cu(&body, 1));
    }
    metered.verify();
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_that_contradicts_the_output_is_not_believed() {
    // Row 6: usage of 0/0 after ten chunks of text, none at all, or (in a stream, where the
    // chunks can be counted) one completion token for ten chunks. (A plain answer that
    // under-reports by a little cannot be caught without the upstream's tokenizer.)
    let metered = Metered::start().await;
    let mut calls = 0;
    for (model, stream) in [
        ("honest-zero-usage", false),
        ("honest-zero-usage", true),
        ("honest-low-usage", true),
        ("honest-no-usage", false),
        ("honest-no-usage", true),
        ("honest-chunky", false),
        ("honest-chunky", true),
    ] {
        {
            calls += 1;
            let (balance, computed) = (metered.balance(), metered.computed_cu());
            let mut body = chat(model, "hi", 10);
            body["stream"] = json!(stream);
            if stream {
                body["stream_options"] = json!({"include_usage": true});
            }
            let response = metered.post("/chat/completions", &body).await;
            assert_eq!(response.status(), 200);
            let shown = if stream {
                let events = events(response).await;
                assert_eq!(events.last().unwrap(), "[DONE]");
                let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
                usage["usage"]["total_tokens"].as_i64()
            } else {
                let answer: Value = response.json().await.unwrap();
                answer["usage"]["total_tokens"].as_i64()
            };
            metered.settled(calls).await;
            let charged = balance - metered.balance();
            let caused = metered.computed_cu() - computed;
            assert!(
                charged >= caused,
                "{model} {stream}: charged {charged} for {caused}"
            );
            assert!(charged <= worst_cu(&body, 1));
            assert_eq!(shown, Some(charged), "{model} {stream}");
        }
    }
    metered.verify();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_overruns_max_tokens_is_cut() {
    // Row 7: an upstream that ignores max_tokens and never stops.
    let metered = Metered::start().await;
    let balance = metered.balance();
    let mut body = chat("honest-runaway", "hi", 10);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let started = std::time::Instant::now();
    let events = tokio::time::timeout(
        Duration::from_secs(10),
        events(metered.post("/chat/completions", &body).await),
    )
    .await
    .expect("the stream was not cut");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|event| serde_json::from_str(event).unwrap())
        .collect();
    let content = chunks
        .iter()
        .filter(|chunk| chunk["choices"][0]["delta"]["content"].is_string())
        .count();
    assert_eq!(content, 10, "no more than max_tokens chunks are passed on");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length", "{finish}");
    metered.settled(1).await;
    let charged = balance - metered.balance();
    // It computed past its bound: the whole bound is charged, never more.
    assert_eq!(charged, worst_cu(&body, 1));
    assert_eq!(
        chunks.last().unwrap()["usage"]["total_tokens"].as_i64(),
        Some(charged)
    );

    // A choice nobody asked for ends the stream too, and is not echoed back.
    let (balance, computed) = (metered.balance(), metered.computed_cu());
    let mut body = chat("honest-stray", "hi", 10);
    body["stream"] = json!(true);
    let stray = crate::events(metered.post("/chat/completions", &body).await).await;
    assert_eq!(stray.last().unwrap(), "[DONE]");
    let finish: Value = serde_json::from_str(&stray[stray.len() - 2]).unwrap();
    assert_eq!(
        finish["choices"],
        json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "length"}])
    );
    metered.settled(2).await;
    // Charged an upper bound (the stream did not finish): at least what was computed.
    let charged = balance - metered.balance();
    let caused = metered.computed_cu() - computed;
    assert!(charged >= caused, "charged {charged} for {caused}");
    assert!(charged <= worst_cu(&body, 1));

    // A plain answer a hundred times too long is charged its bound, no more.
    let balance = metered.balance();
    let body = chat("honest-runaway", "hi", 10);
    let response = metered.post("/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    metered.settled(3).await;
    let charged = balance - metered.balance();
    assert_eq!(
        answer["usage"]["completion_tokens"], 10,
        "{}",
        answer["usage"]
    );
    assert_eq!(answer["usage"]["total_tokens"].as_i64(), Some(charged));
    assert!(charged <= worst_cu(&body, 1));
    metered.verify();
}

#[tokio::test(flavor = "multi_thread")]
async fn two_authorization_headers_are_refused() {
    let metered = Metered::start().await;
    let balance = metered.balance();
    let response = metered
        .http
        .post(format!("{}/chat/completions", metered.base))
        .header("authorization", format!("Bearer {}", metered.setup.key))
        .header("authorization", "Bearer sk-stipend-someone-else")
        .json(&chat("honest", "hi", 5))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Authorization"),
        "{error}"
    );
    assert_eq!(metered.balance(), balance);
}

mod properties {
    //! Random request shapes against the honest upstream, plain and streamed, with random
    //! hang-ups: the charge is never below what the upstream computed, or the request was
    //! refused for nothing.

    use proptest::prelude::*;

    use super::*;

    fn odd() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            Just(json!(0)),
            Just(json!(-1)),
            Just(json!(2)),
            Just(json!(1.5)),
            Just(json!("x")),
            Just(json!([])),
            Just(json!({})),
            "[a-z ]{0,300}".prop_map(Value::from),
        ]
    }

    /// A request: endpoint, body, and when (if at all) its client hangs up.
    fn request() -> impl Strategy<Value = (bool, Value, Option<u64>)> {
        let model = prop::sample::select(vec![
            "honest",
            "honest-reasoning",
            "honest-chunky",
            "honest-slow",
            "honest-zero-usage",
            "honest-no-usage",
        ]);
        // Every field of OpenAI's chat and completions requests, and one it does not have.
        let field = prop::sample::select(vec![
            "n",
            "best_of",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "functions",
            "function_call",
            "response_format",
            "stop",
            "temperature",
            "top_p",
            "frequency_penalty",
            "presence_penalty",
            "logit_bias",
            "logprobs",
            "top_logprobs",
            "echo",
            "suffix",
            "seed",
            "prediction",
            "modalities",
            "audio",
            "reasoning_effort",
            "metadata",
            "store",
            "service_tier",
            "web_search_options",
            "user",
            "max_completion_tokens",
            "stream_options",
            "unknown_field",
        ]);
        (
            any::<bool>(),
            model,
            1u64..40,
            any::<bool>(),
            prop::collection::vec((field, odd()), 0..4),
            1usize..4,
            prop::option::of(0u64..60),
        )
            .prop_map(
                |(chat, model, max_tokens, stream, fields, prompts, hang_up)| {
                    let mut body = if chat {
                        json!({"model": model, "messages": [{"role": "user", "content": "hello"}]})
                    } else if prompts == 1 {
                        json!({"model": model, "prompt": "hello"})
                    } else {
                        json!({"model": model, "prompt": vec!["hello"; prompts]})
                    };
                    body["max_tokens"] = json!(max_tokens);
                    body["stream"] = json!(stream);
                    for (field, value) in fields {
                        body[field] = value;
                    }
                    (chat, body, hang_up)
                },
            )
    }

    async fn check(
        metered: &Metered,
        chat: bool,
        body: Value,
        hang_up: Option<u64>,
    ) -> Result<(), TestCaseError> {
        let (balance, computed) = (metered.balance(), metered.computed_cu());
        let calls = metered.computed.calls_ended.load(Ordering::SeqCst);
        let path = if chat {
            "/chat/completions"
        } else {
            "/completions"
        };
        let stream = body["stream"] == json!(true);
        let send = metered.post(path, &body);
        let status = match hang_up {
            Some(after_ms) if !stream => {
                match tokio::time::timeout(Duration::from_millis(after_ms), send).await {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let _ = response.bytes().await;
                        status
                    }
                    // Left before the head: accepted or refused, we cannot tell yet.
                    Err(_) => 0,
                }
            }
            Some(after_ms) => {
                let response = send.await;
                let status = response.status().as_u16();
                let mut chunks = response.bytes_stream();
                let _ = tokio::time::timeout(Duration::from_millis(after_ms), async {
                    while chunks.next().await.is_some() {}
                })
                .await;
                status
            }
            None => {
                let response = send.await;
                let status = response.status().as_u16();
                let _ = response.bytes().await;
                status
            }
        };
        if status == 200 || status == 0 {
            // Accepted (or unknown): wait until its upstream call has ended and it settled.
            for _ in 0..500 {
                let held = metered.held();
                let ended = metered.computed.calls_ended.load(Ordering::SeqCst);
                if held == 0 && (ended > calls || status == 0) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if status == 0 {
                // The upstream may not have been called at all (refused before); give a
                // started call the time to end.
                tokio::time::sleep(Duration::from_millis(100)).await;
                metered.settled(0).await;
            }
        }
        let charged = balance - metered.balance();
        let caused = metered.computed_cu() - computed;
        prop_assert!(
            charged >= caused,
            "charged {} for {} computed: {} {}",
            charged,
            caused,
            status,
            body
        );
        if status != 200 && status != 0 {
            prop_assert!((400..500).contains(&status), "{} for {}", status, body);
            prop_assert_eq!(charged, 0, "refused but charged: {}", body);
        }
        Ok(())
    }

    #[test]
    fn the_charge_is_never_below_what_the_upstream_computed() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let metered = runtime.block_on(Metered::start());
        let cases = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|cases| cases.parse().ok())
            .unwrap_or(120);
        let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
            cases,
            failure_persistence: None,
            ..proptest::test_runner::Config::default()
        });
        runner
            .run(&request(), |(chat, body, hang_up)| {
                runtime.block_on(check(&metered, chat, body, hang_up))
            })
            .unwrap();
        metered.verify();
    }
}
