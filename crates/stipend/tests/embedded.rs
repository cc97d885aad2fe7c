//! The embedded model end to end: the real `stipend` binary serving the real SmolLM2-135M-Instruct
//! in-process, a real HTTP client on loopback. Answers, streams, usage counted by the model's own
//! tokenizer (checked against a second copy of the model loaded here), exact charges, batching,
//! clients that leave, prompts too long, budgets.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{Env, Server};
use futures_util::StreamExt;
use serde_json::{Value, json};
use stipend_model::{ChatMessage, EmbeddedModel, LoadOptions};

const MODEL: &str = "smollm2-135m";
const FRANCE: &str = "What is the capital of France? Answer in one sentence.";

fn gguf() -> PathBuf {
    stipend_testkit::model_gguf()
}

/// A copy of the model in the test process, to count tokens independently of the server.
fn tokenizer() -> &'static EmbeddedModel {
    static MODEL: OnceLock<EmbeddedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        EmbeddedModel::load(
            &gguf(),
            LoadOptions {
                n_ctx: 64,
                slots: 1,
                ..LoadOptions::default()
            },
        )
        .unwrap()
    })
}

fn chat_prompt_tokens(content: &str) -> u64 {
    let model = tokenizer();
    let prompt = model
        .render_chat(&[ChatMessage {
            role: "user".to_string(),
            content: content.to_string(),
        }])
        .unwrap();
    model.count_tokens(&prompt) as u64
}

/// One server at a time: llama.cpp's threads busy-wait between steps, so two models decoding
/// at once on two cores slow each other down many times over.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Stack {
    env: Env,
    server: Option<Server>,
    base: String,
    http: reqwest::Client,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

impl Stack {
    /// A server with the embedded model (`extra` goes into its `[[models]]` table) and a stipend.
    async fn start(stipend: &str, extra: &str) -> Stack {
        Stack::start_with("", stipend, extra).await
    }

    /// The same, with `top` among the config's top-level keys.
    async fn start_with(top: &str, stipend: &str, extra: &str) -> Stack {
        Stack::launch(top, stipend, extra, false).await
    }

    /// With `logged`, the server logs everything into `server.log` in its directory.
    async fn launch(top: &str, stipend: &str, extra: &str, logged: bool) -> Stack {
        let turn = ONE_AT_A_TIME.lock().await;
        let config = format!(
            "listen = \"127.0.0.1:0\"\n{top}\n[stipend]\namount = \"{stipend}\"\n\
             [[models]]\nname = \"{MODEL}\"\nbackend = \"embedded\"\npath = \"{}\"\n{extra}\n",
            gguf().display()
        );
        let env = Env::new(&config);
        let server = if logged {
            Server::start_logged(&env, &env.dir.path().join("server.log"))
        } else {
            Server::start(&env)
        };
        let base = server.base.clone();
        Stack {
            env,
            server: Some(server),
            base,
            http: reqwest::Client::new(),
            _turn: turn,
        }
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

    async fn chat(&self, key: &str, body: &Value) -> Value {
        let response = self.post(key, "/chat/completions", body).await;
        assert_eq!(response.status(), 200, "{body}");
        response.json().await.unwrap()
    }

    /// A chat stream, read to its end: its text, its usage chunk, its finish reason.
    async fn stream(&self, key: &str, body: &Value) -> (String, Value, String) {
        let mut body = body.clone();
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let response = self.post(key, "/chat/completions", &body).await;
        assert_eq!(response.status(), 200);
        let text = response.text().await.unwrap();
        let mut content = String::new();
        let mut usage = Value::Null;
        let mut finish = String::new();
        let mut done = false;
        for line in text.lines().filter_map(|line| line.strip_prefix("data: ")) {
            assert!(!done, "data after [DONE]: {text}");
            if line == "[DONE]" {
                done = true;
                continue;
            }
            let chunk: Value = serde_json::from_str(line).unwrap();
            assert_eq!(chunk["model"], MODEL);
            assert_eq!(chunk["object"], "chat.completion.chunk");
            if let Some(choice) = chunk["choices"].get(0) {
                content.push_str(choice["delta"]["content"].as_str().unwrap_or_default());
                if let Some(reason) = choice["finish_reason"].as_str() {
                    finish = reason.to_string();
                }
            } else {
                usage = chunk["usage"].clone();
            }
        }
        assert!(done, "the stream did not end with [DONE]: {text}");
        (content, usage, finish)
    }

    async fn budget(&self, key: &str) -> Value {
        common::budget(&self.http, &self.base, key).await
    }

    async fn balance(&self, key: &str) -> i64 {
        self.budget(key).await["balance_cu"].as_i64().unwrap()
    }

    async fn gauge(&self, name: &str) -> u64 {
        common::sample(&common::metrics(&self.http, &self.base).await, name, MODEL)
    }

    /// Waits (bounded) until no slot is busy and no request holds one.
    async fn wait_idle(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.gauge("stipend_model_slots_busy").await > 0
            || self.gauge("stipend_upstream_in_flight").await > 0
        {
            assert!(Instant::now() < deadline, "the model stayed busy");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn verify(&self) {
        let report = self.env.json(&["ledger", "verify"]);
        assert_eq!(report["violations"], json!([]), "{report}");
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        drop(self.server.take());
    }
}

/// What a call's usage costs at the default model's prices: 1 cu a computed token, nothing for
/// a prompt token read from the prefix cache.
fn charge_of(usage: &Value) -> i64 {
    let count = |value: &Value| value.as_i64().unwrap();
    count(&usage["prompt_tokens"]) - count(&usage["prompt_tokens_details"]["cached_tokens"])
        + count(&usage["completion_tokens"])
}

/// A chat answer's text.
fn content(answer: &Value) -> &str {
    answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
}

fn chat(content: &str, max_tokens: u64) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn it_answers_and_charges_exactly_what_its_tokenizer_counts() {
    let stack = Stack::start("10 TFLOP", "").await;
    let key = stack.env.person_with_key("alice");
    let before = stack.balance(&key).await;

    let answer = stack.chat(&key, &chat(FRANCE, 64)).await;
    let text = answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(text.contains("Paris"), "{answer}");
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["model"], MODEL);
    assert_eq!(answer["choices"][0]["message"]["role"], "assistant");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    let usage = &answer["usage"];
    let prompt_tokens = chat_prompt_tokens(FRANCE);
    assert_eq!(usage["prompt_tokens"], prompt_tokens, "{answer}");
    let completion_tokens = usage["completion_tokens"].as_u64().unwrap();
    assert_eq!(
        completion_tokens,
        tokenizer().count_tokens(&text) as u64,
        "{answer}"
    );
    // 134.5M parameters: 1 cu per token; nothing was cached yet.
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);
    let after = stack.balance(&key).await;
    assert_eq!(before - after, (prompt_tokens + completion_tokens) as i64);

    // The stream at temperature 0 is the same answer, token by token, with the same usage, but
    // for the prompt read from the prefix cache (all of it but its last token), which is free.
    let (streamed, stream_usage, finish) = stack.stream(&key, &chat(FRANCE, 64)).await;
    assert_eq!(streamed, text);
    assert_eq!(finish, "stop");
    assert_eq!(stream_usage["prompt_tokens"], usage["prompt_tokens"]);
    assert_eq!(
        stream_usage["completion_tokens"],
        usage["completion_tokens"]
    );
    assert_eq!(
        stream_usage["prompt_tokens_details"]["cached_tokens"],
        prompt_tokens - 1
    );
    assert_eq!(
        after - stack.balance(&key).await,
        (1 + completion_tokens) as i64
    );

    // max_tokens ends it with "length" and is charged exactly.
    let before = stack.balance(&key).await;
    let short = stack.chat(&key, &chat(FRANCE, 3)).await;
    assert_eq!(short["choices"][0]["finish_reason"], "length");
    assert_eq!(short["usage"]["completion_tokens"], 3);
    assert!(text.starts_with(short["choices"][0]["message"]["content"].as_str().unwrap()));
    assert_eq!(
        before - stack.balance(&key).await,
        charge_of(&short["usage"])
    );
    let (_, usage, finish) = stack.stream(&key, &chat(FRANCE, 3)).await;
    assert_eq!(
        (finish.as_str(), &usage["completion_tokens"]),
        ("length", &json!(3))
    );

    // A stop sequence ends it before the sequence, in both forms.
    let at = text.find("Paris").unwrap();
    let mut stopped = chat(FRANCE, 64);
    stopped["stop"] = json!(["Paris"]);
    let answer = stack.chat(&key, &stopped).await;
    assert_eq!(answer["choices"][0]["message"]["content"], text[..at]);
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    let (streamed, _, finish) = stack.stream(&key, &stopped).await;
    assert_eq!((streamed.as_str(), finish.as_str()), (&text[..at], "stop"));

    // The legacy completions endpoint.
    let response = stack
        .post(
            &key,
            "/completions",
            &json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let completion: Value = response.json().await.unwrap();
    assert_eq!(completion["object"], "text_completion");
    assert_eq!(completion["usage"]["completion_tokens"], 4);
    assert_eq!(
        completion["usage"]["prompt_tokens"],
        tokenizer().count_tokens("The capital of France is")
    );
    assert!(
        !completion["choices"][0]["text"]
            .as_str()
            .unwrap()
            .is_empty()
    );

    // /v1/models tells the context and the price.
    let models = common::get_json(&stack.http, &stack.base, "models", &key).await;
    let entry = &models["data"][0];
    assert_eq!(entry["id"], MODEL);
    assert_eq!(
        (&entry["price_completion_cu"], &entry["context_length"]),
        (&json!(1), &json!(2048))
    );
    stack.wait_idle().await;
    stack.verify();
}

#[tokio::test(flavor = "multi_thread")]
async fn sampling_follows_the_request() {
    let stack = Stack::start("10 TFLOP", "").await;
    let key = stack.env.person_with_key("alice");
    let story = |seed: u64| {
        json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me a short story about a dragon."}],
            "max_tokens": 24,
            "temperature": 1.0,
            "top_p": 0.95,
            "seed": seed,
        })
    };
    let text = |answer: Value| {
        answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let first = text(stack.chat(&key, &story(7)).await);
    assert_eq!(text(stack.chat(&key, &story(7)).await), first);
    let mut others = Vec::new();
    for seed in [100, 101, 102] {
        others.push(text(stack.chat(&key, &story(seed)).await));
    }
    assert!(others.iter().any(|other| *other != first), "{first:?}");
    // Bad values are refused, and cost nothing.
    let before = stack.balance(&key).await;
    for (field, value) in [
        ("temperature", json!(3)),
        ("top_p", json!(-0.1)),
        ("presence_penalty", json!(5)),
        ("seed", json!("x")),
        ("tools", json!("not a list")),
        ("logprobs", json!(true)),
    ] {
        let mut body = chat(FRANCE, 8);
        body[field] = value;
        let response = stack.post(&key, "/chat/completions", &body).await;
        assert_eq!(response.status(), 400, "{field}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["param"], field, "{error}");
    }
    let mut image = chat(FRANCE, 8);
    image["messages"][0]["content"] = json!([{"type": "image_url", "image_url": {"url": "x"}}]);
    let response = stack.post(&key, "/chat/completions", &image).await;
    assert_eq!(response.status(), 400);
    assert_eq!(stack.balance(&key).await, before);
    // Text parts are read as text.
    let mut parts = chat(FRANCE, 64);
    parts["messages"][0]["content"] = json!([{"type": "text", "text": FRANCE}]);
    let answer = stack.chat(&key, &parts).await;
    assert!(content(&answer).contains("Paris"), "{answer}");
    stack.verify();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_embedded_models_tool_calls_always_parse() {
    let stack = Stack::start("1 PFLOP", "").await;
    let key = stack.env.person_with_key("alice");
    let weather = json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }}]);
    let asked = |choice: Value| {
        let mut body = chat("What is the weather in Paris?", 64);
        body["tools"] = weather.clone();
        body["tool_choice"] = choice;
        body
    };
    // Told to call a tool, it calls one of those offered, with arguments its schema allows.
    let answer = stack.chat(&key, &asked(json!("required"))).await;
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{answer}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let arguments: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(arguments["city"].is_string(), "{arguments}");
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    // Streamed, the same call arrives as one delta, and the stream ends `tool_calls`.
    let mut streamed = asked(json!({"type": "function", "function": {"name": "get_weather"}}));
    streamed["stream"] = json!(true);
    let response = stack.post(&key, "/chat/completions", &streamed).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(
        text.contains("\"tool_calls\":[{") && text.contains("get_weather"),
        "{text}"
    );
    assert!(text.contains("\"finish_reason\":\"tool_calls\""), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    // Left free to choose, it calls the tool or answers: either parses.
    let answer = stack.chat(&key, &asked(json!("auto"))).await;
    let finish = answer["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(["tool_calls", "stop"].contains(&finish), "{answer}");
    // Its call and the tool's result go back in the conversation, and it goes on.
    let mut next = asked(json!("auto"));
    next["messages"] = json!([
        {"role": "user", "content": "What is the weather in Paris?"},
        choice["message"],
        {"role": "tool", "tool_call_id": call["id"], "content": "Sunny, 21 °C"},
    ]);
    let answer = stack.chat(&key, &next).await;
    assert_eq!(answer["object"], "chat.completion", "{answer}");
    // A tool of a bad name, or a choice of a tool not offered, is refused.
    let mut bad = asked(json!("auto"));
    bad["tools"][0]["function"]["name"] = json!("get weather!");
    let response = stack.post(&key, "/chat/completions", &bad).await;
    assert_eq!(response.status(), 400);
    let response = stack
        .post(
            &key,
            "/chat/completions",
            &asked(json!({"type": "function", "function": {"name": "nope"}})),
        )
        .await;
    assert_eq!(response.status(), 400);
    stack.verify();
}

#[tokio::test(flavor = "multi_thread")]
async fn eight_concurrent_greedy_requests_answer_as_they_do_one_at_a_time() {
    let stack = Stack::start("10 TFLOP", "slots = 8").await;
    let key = stack.env.person_with_key("alice");
    let questions = [
        FRANCE,
        "Name three colours.",
        "What is 2 + 2?",
        "Write a haiku about the sea.",
        "What is the largest planet in the solar system?",
        "Say hello in Spanish.",
        "Give me a word that rhymes with cat.",
        "What do bees make?",
    ];
    let mut alone = Vec::new();
    for question in questions {
        let answer = stack.chat(&key, &chat(question, 48)).await;
        alone.push(answer["choices"][0]["message"]["content"].clone());
    }
    let bodies: Vec<Value> = questions
        .iter()
        .map(|question| chat(question, 48))
        .collect();
    let together =
        futures_util::future::join_all(bodies.iter().map(|body| stack.chat(&key, body))).await;
    for ((question, alone), together) in questions.iter().zip(&alone).zip(&together) {
        assert_eq!(
            *alone, together["choices"][0]["message"]["content"],
            "{question}"
        );
    }
    stack.wait_idle().await;
    stack.verify();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_frees_its_slot_and_pays_only_for_what_was_computed() {
    let stack = Stack::start("10 TFLOP", "slots = 2").await;
    let key = stack.env.person_with_key("alice");
    let long = "Write a very long story about a lighthouse keeper.";
    let prompt_tokens = chat_prompt_tokens(long) as i64;

    // Mid-stream: read a few chunks, then hang up.
    let before = stack.balance(&key).await;
    let mut body = chat(long, 1_500);
    body["stream"] = json!(true);
    let response = stack.post(&key, "/chat/completions", &body).await;
    let mut chunks = response.bytes_stream();
    let mut received = 0;
    while received < 5 {
        let bytes = chunks.next().await.unwrap().unwrap();
        received += String::from_utf8_lossy(&bytes).matches("data: ").count();
    }
    drop(chunks);
    stack.wait_idle().await;
    let charged = before - stack.balance(&key).await;
    // The prompt, and the few tokens made before the server saw the client go: far fewer than
    // the 1500 it asked for.
    assert!(
        charged > prompt_tokens && charged < prompt_tokens + 300,
        "charged {charged} for a {prompt_tokens}-token prompt"
    );
    assert_eq!(stack.budget(&key).await["reserved_cu"], 0);

    // Waiting for a plain answer, then hanging up: the same, but for the prompt, now cached.
    let before = stack.balance(&key).await;
    let gone = tokio::time::timeout(
        Duration::from_millis(300),
        stack.post(&key, "/chat/completions", &chat(long, 1_500)),
    )
    .await;
    assert!(gone.is_err(), "a 1500-token answer came back in 300 ms");
    stack.wait_idle().await;
    let charged = before - stack.balance(&key).await;
    assert!(charged > 1 && charged < 300, "charged {charged}");

    // The model serves on.
    let answer = stack.chat(&key, &chat(FRANCE, 32)).await;
    assert!(content(&answer).contains("Paris"), "{answer}");
    stack.verify();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prompt_longer_than_the_context_is_a_400_and_the_server_serves_on() {
    let stack = Stack::start("10 TFLOP", "context = 256").await;
    let key = stack.env.person_with_key("alice");
    let before = stack.balance(&key).await;
    let long = "Tell me everything about France. ".repeat(100);
    for body in [chat(&long, 16), chat(FRANCE, 250)] {
        let response = stack.post(&key, "/chat/completions", &body).await;
        assert_eq!(response.status(), 400);
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "context_length_exceeded", "{error}");
        assert_eq!(error["error"]["param"], "messages");
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("maximum context length is 256 tokens"),
            "{error}"
        );
    }
    let response = stack
        .post(
            &key,
            "/completions",
            &json!({"model": MODEL, "prompt": long, "max_tokens": 4}),
        )
        .await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["param"], "prompt");
    assert_eq!(stack.balance(&key).await, before, "refusals are free");
    // Without max_tokens, the completion gets what is left of the context.
    let mut open = chat(FRANCE, 1);
    open.as_object_mut().unwrap().remove("max_tokens");
    let answer = stack.chat(&key, &open).await;
    assert!(content(&answer).contains("Paris"), "{answer}");
    stack.verify();
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_calls_never_overspend_a_small_budget() {
    // 1 TFLOP = 1000 cu: about ten calls of a 42-token prompt and up to 64 tokens each.
    let stack = Stack::start("1 TFLOP", "slots = 4").await;
    let key = stack.env.person_with_key("alice");
    let results = futures_util::future::join_all((0..24).map(|i| {
        let stack = &stack;
        let key = key.clone();
        async move {
            let body = chat(&format!("Count from {i} to {}.", i + 20), 64);
            let response = stack.post(&key, "/chat/completions", &body).await;
            let status = response.status().as_u16();
            let answer: Value = response.json().await.unwrap();
            (status, answer)
        }
    }))
    .await;
    let mut charged = 0;
    let mut refused = 0;
    for (status, answer) in &results {
        match status {
            200 => {
                charged += charge_of(&answer["usage"]);
            }
            429 => {
                refused += 1;
                assert_eq!(answer["error"]["type"], "insufficient_quota");
            }
            other => panic!("{other}: {answer}"),
        }
    }
    assert!(refused > 0, "24 calls fit in a budget for about ten");
    let budget = stack.budget(&key).await;
    // Every answered call was charged exactly its usage, and nothing else was.
    assert_eq!(budget["balance_cu"], 1_000 - charged, "{budget}");
    assert!(budget["available_cu"].as_i64().unwrap() >= 0);
    assert_eq!(budget["reserved_cu"], 0);
    stack.verify();
}

/// `stipend serve` with no config file, as a new user runs it (the model already fetched into
/// `./models`, linked here to spare the download).
fn zero_config_server(dir: &std::path::Path) -> Server {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_stipend"));
    command.current_dir(dir).env_remove("STIPEND_CONFIG").args([
        "serve",
        "--listen",
        "127.0.0.1:0",
    ]);
    Server::spawn(command)
}

#[tokio::test(flavor = "multi_thread")]
async fn with_no_config_file_it_serves_the_embedded_model_to_a_demo_person() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("models")).unwrap();
    std::os::unix::fs::symlink(
        gguf(),
        dir.path()
            .join("models")
            .join("SmolLM2-135M-Instruct.Q4_1.gguf"),
    )
    .unwrap();
    let server = zero_config_server(dir.path());
    let output = server.output();
    assert!(
        output.contains("smollm2-135m")
            && output.contains("1 cu/prompt token (0 cu if cached), 1 cu/completion token")
            && output.contains("8 slots of 2048 tokens"),
        "{output}"
    );
    let key = output
        .lines()
        .find_map(|line| line.trim().strip_prefix("export KEY="))
        .unwrap_or_else(|| panic!("no key printed: {output}"))
        .to_string();
    assert!(output.contains("/v1/chat/completions"), "{output}");
    let http = reqwest::Client::new();
    let answer: Value = http
        .post(format!("{}/chat/completions", server.base))
        .bearer_auth(&key)
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": FRANCE}], "temperature": 0}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{answer}"
    );
    let budget: Value = common::budget(&http, &server.base, &key).await;
    assert_eq!(budget["account"], "demo");
    let used = &budget["models"][0]["usage_this_period"];
    assert_eq!(used["requests"], 1);
    assert_eq!(used["charged_cu"], answer["usage"]["total_tokens"]);
    server.stop();

    // Started again: the same demo person, its key still good, and no new key printed.
    let server = zero_config_server(dir.path());
    let output = server.output();
    assert!(!output.contains("export KEY="), "{output}");
    assert!(
        output.contains("its key was shown when it was made"),
        "{output}"
    );
    let budget: Value = common::budget(&http, &server.base, &key).await;
    assert_eq!(budget["models"][0]["usage_this_period"]["requests"], 1);
    server.stop();
}

/// Random requests built from a valid one (see `common::odd_request`) against the embedded
/// model: each is answered and charged what the model computed, or refused with an
/// OpenAI-shaped error for nothing; no input stops the model (llama.cpp aborts the process on
/// an oversized batch or position). Then the ledger verifies and the model still answers.
#[test]
fn random_bodies_are_answered_or_refused_and_charged_exactly() {
    use proptest::prelude::*;
    use proptest::test_runner::TestCaseError;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // A short default completion, so that a request without max_tokens is quick too.
    let stack = runtime.block_on(Stack::start_with(
        "max_tokens_default = 8",
        "1 PFLOP",
        "slots = 2",
    ));
    let key = stack.env.person_with_key("alice");
    let mut runner = common::runner(64);
    runner
        .run(&common::odd_request(), |(edits, damage)| {
            let body = common::odd_body(MODEL, &edits, &damage);
            let shown = String::from_utf8_lossy(&body).into_owned();
            runtime.block_on(async {
                let before = stack.budget(&key).await["balance_cu"].as_i64().unwrap();
                let (response, streamed) = common::post_chat_bytes(
                    &stack.http,
                    &stack.base,
                    &key,
                    body,
                    Duration::from_secs(60),
                )
                .await;
                let status = response.status().as_u16();
                let text = response.text().await.unwrap();
                let after = stack.budget(&key).await;
                let charged = before - after["balance_cu"].as_i64().unwrap();
                prop_assert_eq!(&after["reserved_cu"], &json!(0), "{}", shown);
                match (status, streamed) {
                    (200, false) => {
                        let answer: Value = serde_json::from_str(&text).unwrap();
                        prop_assert!(answer["choices"][0]["message"]["content"].is_string());
                        // 1 cu a token, prompt and completion alike, but none for a cached one.
                        prop_assert_eq!(
                            charged,
                            charge_of(&answer["usage"]),
                            "{}: {}",
                            shown,
                            answer
                        );
                    }
                    (200, true) => {
                        prop_assert!(text.ends_with("data: [DONE]\n\n"), "{}", text);
                        // Without usage asked for, the stream does not say its tokens: the
                        // charge is some, and no more than the context (2048 tokens) holds.
                        prop_assert!(
                            charged > 0 && charged <= 2048,
                            "{} charged {}",
                            shown,
                            charged
                        );
                    }
                    _ => {
                        let error: Value = serde_json::from_str(&text)
                            .map_err(|_| TestCaseError::fail(format!("{status}: {text}")))?;
                        prop_assert!(
                            [400, 404, 413, 429].contains(&status)
                                && error["error"]["message"]
                                    .as_str()
                                    .is_some_and(|m| !m.is_empty())
                                && error["error"].get("param").is_some()
                                && error["error"].get("code").is_some(),
                            "{} for {}: {}",
                            status,
                            shown,
                            text
                        );
                        prop_assert_eq!(charged, 0, "{}", shown);
                    }
                }
                Ok(())
            })
        })
        .unwrap();
    runtime.block_on(async {
        stack.wait_idle().await;
        stack.verify();
        let answer = stack.chat(&key, &json!({"model": MODEL, "messages": [{"role": "user", "content": FRANCE}], "max_tokens": 16, "temperature": 0})).await;
        assert!(answer["choices"][0]["message"]["content"].as_str().unwrap().contains("Paris"));
    });
}

/// Prompt and answer text reaches no log and no file on the embedded path either, with every
/// log level on: answered, streamed, a prompt too long for the context, a client that leaves.
#[tokio::test(flavor = "multi_thread")]
async fn prompts_reach_no_log_and_no_file() {
    const MARKER: &str = "zq-prompt-marker-4471";
    let stack = Stack::launch("", "10 TFLOP", "context = 256", true).await;
    let key = stack.env.person_with_key("alice");
    let said = format!("Repeat after me: {MARKER} {MARKER}.");
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": said}], "max_tokens": 24, "temperature": 0});
    let answer = stack.chat(&key, &body).await;
    assert!(answer["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    let (_, usage, _) = stack.stream(&key, &body).await;
    assert!(usage["total_tokens"].as_u64().unwrap() > 0);
    let long = json!({"model": MODEL, "messages": [{"role": "user", "content": said.repeat(40)}]});
    let response = stack.post(&key, "/chat/completions", &long).await;
    assert_eq!(response.status(), 400);
    let counting = format!("{MARKER}: count from 1 to 300, one number per line.");
    let leaving = json!({"model": MODEL, "messages": [{"role": "user", "content": counting}], "max_tokens": 120, "stream": true});
    let mut response = stack.post(&key, "/chat/completions", &leaving).await;
    assert_eq!(response.status(), 200);
    response.chunk().await.unwrap();
    drop(response);
    stack.wait_idle().await;

    let mut stack = stack;
    let output = stack.server.take().unwrap().stop();
    let log = std::fs::read_to_string(stack.env.dir.path().join("server.log")).unwrap();
    assert!(log.contains("client left"), "the log was not on: {log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a log file");
    common::assert_written_nowhere(MARKER, stack.env.dir.path(), &output);
}

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn cached_tokens(usage: &Value) -> i64 {
    usage["prompt_tokens_details"]["cached_tokens"]
        .as_i64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_turn_of_a_conversation_is_read_from_the_cache_and_charged_less() {
    let stack = Stack::start("10 TFLOP", "slots = 2").await;
    let key = stack.env.person_with_key("alice");
    let mut messages = vec![json!({"role": "system", "content": "You are a patient teacher."})];
    let (mut previous_prompt_tokens, mut cached_total, mut prompt_total) = (0, 0, 0);
    for turn in 0..10 {
        messages.push(json!({"role": "user", "content": format!("Tell me one short fact about the number {turn}.")}));
        let body =
            json!({"model": MODEL, "messages": messages, "max_tokens": 24, "temperature": 0});
        let before = stack.balance(&key).await;
        let answer = stack.chat(&key, &body).await;
        let usage = &answer["usage"];
        let cached = cached_tokens(usage);
        if turn == 0 {
            assert_eq!(cached, 0, "{answer}");
        } else {
            // The earlier turns, questions and answers, come from the cache.
            assert!(
                cached >= previous_prompt_tokens,
                "turn {turn}: {cached} cached, the previous prompt had {previous_prompt_tokens}"
            );
        }
        assert_eq!(before - stack.balance(&key).await, charge_of(usage));
        previous_prompt_tokens = usage["prompt_tokens"].as_i64().unwrap();
        prompt_total += previous_prompt_tokens;
        cached_total += cached;
        messages.push(json!({"role": "assistant", "content": content(&answer)}));
    }
    // Most of what the conversation sent was never computed again.
    assert!(
        cached_total * 10 > prompt_total * 8,
        "{cached_total} of {prompt_total}"
    );
    let metrics = common::metrics(&stack.http, &stack.base).await;
    assert_eq!(
        common::sample(&metrics, "stipend_prefix_cache_hits_total", MODEL),
        9
    );
    assert_eq!(
        common::sample(&metrics, "stipend_prefix_cache_tokens_total", MODEL),
        cached_total as u64
    );
    stack.verify();
}

/// The two-sample Kolmogorov–Smirnov test: the p-value of the largest gap between the two
/// samples' distribution functions (the asymptotic distribution, with Stephens' correction).
fn kolmogorov_smirnov(a: &[f64], b: &[f64]) -> f64 {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (n, m) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j, mut gap) = (0, 0, 0.0f64);
    while i < a.len() && j < b.len() {
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        gap = gap.max((i as f64 / n - j as f64 / m).abs());
    }
    let effective = (n * m / (n + m)).sqrt();
    let lambda = (effective + 0.12 + 0.11 / effective) * gap;
    let p: f64 = (1..=100)
        .map(|k| {
            let k = k as f64;
            2.0 * (-1.0f64).powf(k - 1.0) * (-2.0 * k * k * lambda * lambda).exp()
        })
        .sum();
    p.clamp(0.0, 1.0)
}

#[test]
fn the_kolmogorov_smirnov_test_tells_apart_only_what_differs() {
    let spread = |offset: f64| -> Vec<f64> { (0..30).map(|i| offset + f64::from(i)).collect() };
    assert!(kolmogorov_smirnov(&spread(0.0), &spread(0.5)) > 0.5);
    assert!(kolmogorov_smirnov(&spread(0.0), &spread(100.0)) < 1e-6);
}

/// A timing audit in the manner of Gu et al. ("Auditing Prompt Caching in Language Model APIs",
/// 2025): bob sends the prompt alice has just sent, or a fresh one, in random order, and the
/// times of his calls are compared. With the cache per person they cannot be told apart; alice's
/// own repeats, the same way, can.
#[tokio::test(flavor = "multi_thread")]
async fn nobody_can_time_what_another_person_asked() {
    const TRIALS: usize = 16;
    let stack = Stack::start("10 TFLOP", "slots = 4").await;
    let (alice, bob) = (
        stack.env.person_with_key("alice"),
        stack.env.person_with_key("bob"),
    );
    // A prompt of about 70 tokens no one has sent before.
    let secret = |trial: usize, salt: &str| {
        format!(
            "Case {trial}{salt}: the vault code is {} and the courier leaves at {} from gate {}. {}",
            trial * 7919 % 10_000,
            trial % 24,
            trial * 31 % 97,
            "Summarise the plan in one line and keep it secret. ".repeat(2)
        )
    };
    let timed = |key: String, prompt: String| {
        let stack = &stack;
        async move {
            let started = Instant::now();
            let answer = stack.chat(&key, &chat(&prompt, 1)).await;
            (
                started.elapsed().as_secs_f64(),
                cached_tokens(&answer["usage"]),
            )
        }
    };
    // The order of the three kinds of trial, shuffled by a fixed permutation.
    let mut order: Vec<(usize, usize)> = (0..TRIALS)
        .flat_map(|trial| (0..3).map(move |kind| (trial, kind)))
        .collect();
    for index in (1..order.len()).rev() {
        order.swap(index, (index * 2_654_435_761) % (index + 1));
    }
    let (mut after_alice, mut fresh, mut repeated) = (vec![], vec![], vec![]);
    let mut bob_cached = Vec::new();
    for (trial, kind) in order {
        match kind {
            0 => {
                let prompt = secret(trial, "");
                timed(alice.clone(), prompt.clone()).await;
                let (seconds, cached) = timed(bob.clone(), prompt).await;
                after_alice.push(seconds);
                bob_cached.push(cached);
            }
            1 => {
                timed(alice.clone(), secret(trial, "a")).await;
                let (seconds, cached) = timed(bob.clone(), secret(trial, "b")).await;
                fresh.push(seconds);
                bob_cached.push(cached);
            }
            _ => {
                let prompt = secret(trial, "c");
                timed(alice.clone(), prompt.clone()).await;
                let (seconds, cached) = timed(alice.clone(), prompt).await;
                assert!(cached > 50, "alice's own repeat is cached: {cached}");
                repeated.push(seconds);
            }
        }
    }
    // Bob reuses only his own calls' template prefix, the same whatever alice sent.
    let template = chat_prompt_tokens("") as i64;
    assert!(
        bob_cached.iter().all(|cached| *cached < template),
        "bob reused more than a template's worth: {bob_cached:?}"
    );
    let unseen = kolmogorov_smirnov(&after_alice, &fresh);
    let seen = kolmogorov_smirnov(&repeated, &fresh);
    eprintln!("timing audit: p = {unseen:.3} for another's prompt, {seen:.1e} for one's own");
    assert!(
        unseen > 1e-3,
        "bob's time tells what alice sent (p = {unseen}): {after_alice:?} against {fresh:?}"
    );
    assert!(
        seen < 1e-4,
        "the audit cannot see a cache hit (p = {seen}): {repeated:?} against {fresh:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shared_cache_reuses_anyones_prompt_and_says_so() {
    let stack = Stack::start("10 TFLOP", "slots = 2\nprefix_cache = \"shared\"").await;
    let (alice, bob) = (
        stack.env.person_with_key("alice"),
        stack.env.person_with_key("bob"),
    );
    let first = stack.chat(&alice, &chat(FRANCE, 16)).await;
    assert_eq!(cached_tokens(&first["usage"]), 0);
    let before = stack.balance(&bob).await;
    let second = stack.chat(&bob, &chat(FRANCE, 16)).await;
    let prompt_tokens = chat_prompt_tokens(FRANCE) as i64;
    assert_eq!(cached_tokens(&second["usage"]), prompt_tokens - 1);
    assert_eq!(content(&second), content(&first));
    assert_eq!(
        before - stack.balance(&bob).await,
        charge_of(&second["usage"])
    );
    let models = common::get_json(&stack.http, &stack.base, "models", &bob).await;
    assert_eq!(
        (
            &models["data"][0]["prefix_cache"],
            &models["data"][0]["price_cached_prompt_cu"]
        ),
        (&json!("shared"), &json!(0))
    );
}

/// More people than slots, each with a long prompt, round after round: the least recently used
/// caches are evicted, a person's repeat right after their call is still a hit, and the server's
/// memory stays within what the slots' cache took once it was full.
#[tokio::test(flavor = "multi_thread")]
async fn more_people_than_slots_evict_each_other_and_memory_stays_put() {
    const PEOPLE: usize = 8;
    let stack = Stack::start("10 TFLOP", "slots = 4\ncontext = 1024").await;
    let keys: Vec<String> = (0..PEOPLE)
        .map(|person| stack.env.person_with_key(&format!("person{person}")))
        .collect();
    let prompt = |person: usize| {
        format!(
            "I am person {person}. {}",
            format!("Here is my long note number {person} about rivers and hills. ").repeat(12)
        )
    };
    let pid = stack.server.as_ref().unwrap().pid();
    let mut rss = Vec::new();
    for _round in 0..2 {
        for (person, key) in keys.iter().enumerate() {
            let answer = stack.chat(key, &chat(&prompt(person), 2)).await;
            // Eight people take turns on four slots: each one's cache was evicted before their
            // turn came round again; only the template's prefix is ever reused.
            assert!(cached_tokens(&answer["usage"]) < 40, "{}", answer["usage"]);
        }
        rss.push(rss_kib(pid));
    }
    // The last of the round, again at once: still cached.
    let last = PEOPLE - 1;
    let answer = stack.chat(&keys[last], &chat(&prompt(last), 2)).await;
    let prompt_tokens = answer["usage"]["prompt_tokens"].as_i64().unwrap();
    assert!(prompt_tokens > 150, "{prompt_tokens}");
    assert_eq!(cached_tokens(&answer["usage"]), prompt_tokens - 1);
    let metrics = common::metrics(&stack.http, &stack.base).await;
    let evictions = common::sample(&metrics, "stipend_prefix_cache_evictions_total", MODEL);
    assert!(
        evictions >= (2 * PEOPLE - 4) as u64,
        "{evictions} evictions"
    );
    assert!(
        rss[1] < rss[0] + 16 * 1024,
        "the server grew from {} KiB to {} KiB over a round of evictions",
        rss[0],
        rss[1]
    );
    stack.verify();
}
