//! The embedded model's prefix cache, in one run: Stipend with the cache per person, Stipend
//! with it off, and llama.cpp's own `llama-server` (its default cache; `bench/llama-server.sh`
//! builds it from the same vendored llama.cpp), on the same GGUF, slots, context, batch and
//! threads. Three workloads, every call streamed, greedy, up to `STIPEND_BENCH_TOKENS` (128)
//! completion tokens:
//! - *repeat*: one person sends the same chat prompt again and again, one call at a time;
//! - *conversation*: one person's 10-turn chat, each turn the whole conversation so far;
//! - *8 people*: eight people at once, each sending their own prompt three times.
//!
//! For `STIPEND_BENCH_ROUNDS` (5) rounds, each workload runs on the three servers back to back.
//!
//! Then the *flips*: how often a greedy answer read after a cache hit differs from the answer
//! decoded from scratch (the model in this process, no HTTP), over `STIPEND_BENCH_FLIPS`
//! (100) prompts, for a repeated prompt and for a conversation's second turn.
//!
//! `cargo bench -p stipend --bench prefix_cache` (or `make bench-cache`). Knobs:
//! `STIPEND_LLAMA_SERVER` (the llama-server binary; without it, Stipend alone),
//! `STIPEND_BENCH_ONLY` (`speed` or `flips`), `STIPEND_BENCH_ROUNDS` (5), `STIPEND_BENCH_SLOTS`
//! (8), `STIPEND_MODEL_GGUF`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stipend_model::{
    ChatMessage, EmbeddedModel, Generate, LoadOptions, PrefixCache, Sampling, collect,
};

use common::{env_or, slots};

const CONTEXT: u32 = 2_048;
const N_BATCH: u32 = 512;
const MODEL: &str = "smollm2-135m";

/// The repeated prompt: 88 tokens with the system message and the template.
const REPEATED: &str = "You are helping me plan a small vegetable garden behind a terraced house in a rainy northern town. The beds get sun in the morning only, the soil is heavy clay, and I have about two hours a week to spend on it. Suggest what to grow first and why, briefly.";

const PEOPLE: [&str; 8] = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a steam engine works, in detail, for a curious teenager.",
    "Describe a day in the life of a medieval baker in a busy market town.",
    "Write a long letter to a friend about a trip to the mountains in autumn.",
    "Explain the water cycle to a child, at length, with examples from home.",
    "Tell a long story about a dragon who learns to cook for a village.",
    "Describe the history of the bicycle from its invention to the present day.",
    "Write a long essay about why people keep gardens, even in small cities.",
];

fn threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// One streamed call's figures.
#[derive(Debug, Clone, Copy)]
struct Streamed {
    prompt_tokens: usize,
    ttft: Duration,
    completion_tokens: usize,
    /// From the first content to the last.
    generating: Duration,
    done: Duration,
}

/// A server under test: what it is, where, and a key per person to call it with.
struct Server {
    what: &'static str,
    base: String,
    keys: Vec<String>,
    /// Stipend's process, stopped when dropped.
    _stipend: Option<common::Served>,
    /// llama-server's process, stopped with the server.
    llama_server: Option<Child>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = &mut self.llama_server {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn stipend(dir: &std::path::Path, prefix_cache: &str, what: &'static str) -> Server {
    let gguf = stipend_testkit::model_gguf();
    let config = dir.join(format!("stipend-{prefix_cache}.toml"));
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"data-{prefix_cache}\"\n[stipend]\namount = \"1000 PFLOP\"\n\
             [[models]]\nname = \"{MODEL}\"\nbackend = \"embedded\"\npath = \"{}\"\n\
             slots = {}\ncontext = {CONTEXT}\nprefix_cache = \"{prefix_cache}\"\n",
            gguf.display(),
            slots()
        ),
    )
    .unwrap();
    let served = common::Served::start(&config, dir);
    let keys = (0..PEOPLE.len())
        .map(|person| served.person_with_key(&format!("person{person}")))
        .collect();
    Server {
        what,
        base: served.base.clone(),
        keys,
        _stipend: Some(served),
        llama_server: None,
    }
}

fn llama_server(binary: &str) -> Server {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let child = Command::new(binary)
        .args(["-m", &stipend_testkit::model_gguf().display().to_string()])
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["-np", &slots().to_string()])
        .args(["-c", &(CONTEXT * slots()).to_string()])
        .args(["-b", &N_BATCH.to_string(), "-ub", &N_BATCH.to_string()])
        .args(["-t", &threads().to_string(), "-tb", &threads().to_string()])
        .args(["--no-kv-unified", "--no-webui", "--log-disable"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}/v1");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = std::process::Command::new("curl")
            .args(["-sf", &format!("http://127.0.0.1:{port}/health")])
            .output()
            .is_ok_and(|output| output.status.success());
        if ready {
            break;
        }
        assert!(Instant::now() < deadline, "llama-server did not start");
        std::thread::sleep(Duration::from_millis(200));
    }
    Server {
        what: "llama-server",
        base,
        keys: vec!["none".to_string(); PEOPLE.len()],
        _stipend: None,
        llama_server: Some(child),
    }
}

/// One streamed chat call; returns its figures and its answer.
async fn call(
    http: &reqwest::Client,
    server: &Server,
    person: usize,
    messages: &[Value],
    max_tokens: usize,
) -> (Streamed, String) {
    let body = json!({
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let started = Instant::now();
    let call = common::stream_chat(http, &server.base, &server.keys[person], &body, started).await;
    let streamed = Streamed {
        prompt_tokens: call.prompt_tokens,
        ttft: call.first,
        completion_tokens: call.completion_tokens,
        generating: call.last.saturating_sub(call.first),
        done: started.elapsed(),
    };
    (streamed, call.text)
}

fn user(content: &str) -> Value {
    json!({"role": "user", "content": content})
}

/// The model's own default system message, given explicitly: llama-server's template would drop
/// it, so both servers read the same tokens.
fn system() -> Value {
    json!({"role": "system", "content": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"})
}

/// A workload's figures: the median time to first token of the calls that could hit the
/// cache, and generated tokens per second (each stream's, and all together).
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    /// The repeated prompt's tokens, as the server counted them (0 elsewhere).
    prompt_tokens: usize,
    ttft_median: Duration,
    per_stream_tok_s: f64,
    combined_tok_s: f64,
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn figures(calls: &[Streamed], wall: Duration) -> Figures {
    let per_stream = calls
        .iter()
        .map(|call| {
            call.completion_tokens.saturating_sub(1) as f64
                / call.generating.as_secs_f64().max(1e-9)
        })
        .sum::<f64>()
        / calls.len() as f64;
    Figures {
        prompt_tokens: 0,
        ttft_median: median(calls.iter().map(|call| call.ttft).collect()),
        per_stream_tok_s: per_stream,
        combined_tok_s: calls
            .iter()
            .map(|call| call.completion_tokens)
            .sum::<usize>() as f64
            / wall.as_secs_f64(),
    }
}

/// The same prompt ten times, one call at a time, after one call that fills the cache.
async fn repeat(http: &reqwest::Client, server: &Server, max_tokens: usize) -> Figures {
    let messages = [system(), user(REPEATED)];
    let (first, _) = call(http, server, 0, &messages, max_tokens).await;
    let prompt_tokens = first.prompt_tokens;
    let mut calls = Vec::new();
    let started = Instant::now();
    let mut wall = Duration::ZERO;
    for _ in 0..10 {
        let before = started.elapsed();
        let (streamed, _) = call(http, server, 0, &messages, max_tokens).await;
        wall += started.elapsed() - before;
        calls.push(streamed);
    }
    Figures {
        prompt_tokens,
        ..figures(&calls, wall)
    }
}

/// A ten-turn conversation; the figures of turns 2 to 10, which can reuse the earlier turns.
async fn conversation(http: &reqwest::Client, server: &Server, max_tokens: usize) -> Figures {
    let mut messages = vec![json!({"role": "system", "content": "You are a patient teacher."})];
    let mut calls = Vec::new();
    let mut wall = Duration::ZERO;
    for turn in 0..10 {
        messages.push(user(&format!(
            "Tell me one fact about the number {turn}, in two sentences."
        )));
        let (streamed, text) = call(http, server, 1, &messages, max_tokens).await;
        if turn > 0 {
            wall += streamed.done;
            calls.push(streamed);
        }
        messages.push(json!({"role": "assistant", "content": text}));
    }
    figures(&calls, wall)
}

/// Eight people at once, each sending their own prompt three times: the figures of the second
/// and third, which can reuse the first.
async fn eight_people(http: &reqwest::Client, server: &Server, max_tokens: usize) -> Figures {
    let mut calls = Vec::new();
    let mut wall = Duration::ZERO;
    for round in 0..3 {
        let started = Instant::now();
        let round_calls = futures_util::future::join_all(PEOPLE.iter().enumerate().map(
            |(person, prompt)| async move {
                call(http, server, person, &[system(), user(prompt)], max_tokens)
                    .await
                    .0
            },
        ))
        .await;
        if round > 0 {
            wall += started.elapsed();
            calls.extend(round_calls);
        }
    }
    figures(&calls, wall)
}

fn speed(max_tokens: usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut servers = vec![
        stipend(dir.path(), "person", "Stipend, cache per person"),
        stipend(dir.path(), "off", "Stipend, cache off"),
    ];
    match std::env::var("STIPEND_LLAMA_SERVER") {
        Ok(binary) => servers.push(llama_server(&binary)),
        Err(_) => println!("(STIPEND_LLAMA_SERVER is not set: Stipend alone)"),
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // A connection per call: the servers take turns, and one idle for minutes may have closed a
    // kept-alive connection just as it is reused.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    type Workload =
        for<'a> fn(
            &'a reqwest::Client,
            &'a Server,
            usize,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Figures> + 'a>>;
    let workloads: [(&str, Workload); 3] = [
        ("repeat", |http, server, max| {
            Box::pin(repeat(http, server, max))
        }),
        ("conversation", |http, server, max| {
            Box::pin(conversation(http, server, max))
        }),
        ("8 people", |http, server, max| {
            Box::pin(eight_people(http, server, max))
        }),
    ];
    let rounds = env_or("STIPEND_BENCH_ROUNDS", 5).max(1);
    // results[workload][server]: one Figures per round.
    let mut results = vec![vec![Vec::new(); servers.len()]; workloads.len()];
    runtime.block_on(async {
        for server in &servers {
            call(&http, server, 0, &[system(), user("Hello")], 8).await;
        }
        // Each workload runs on every server back to back, in an order that turns every round,
        // so that a server is compared with runs seconds away, not minutes: this machine's
        // speed drifts by more than the differences measured.
        for round in 0..rounds {
            for (workload, (name, run)) in workloads.iter().enumerate() {
                for offset in 0..servers.len() {
                    let index = (round + offset) % servers.len();
                    eprintln!("round {}, {name}: {}", round + 1, servers[index].what);
                    results[workload][index].push(run(&http, &servers[index], max_tokens).await);
                }
            }
        }
    });
    println!(
        "prefix cache: SmolLM2-135M-Instruct Q4_1, {} slots × {CONTEXT} tokens, n_batch {N_BATCH}, {} threads, streamed, greedy, up to {max_tokens} tokens, median of {rounds} rounds, the servers taking turns at each workload",
        slots(),
        threads()
    );
    println!(
        "| workload | server | TTFT (median, calls that can hit) | gen tok/s per stream | gen tok/s combined | combined vs llama-server (median, lowest–highest of the rounds) |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    let middle = |rounds: &Vec<Figures>| {
        let mut rounds = rounds.clone();
        rounds.sort_by(|a, b| a.combined_tok_s.total_cmp(&b.combined_tok_s));
        rounds[rounds.len() / 2]
    };
    for (index, server) in servers.iter().enumerate() {
        println!(
            "{}: the repeated prompt is {} tokens",
            server.what, results[0][index][0].prompt_tokens
        );
    }
    for (workload, (name, _)) in workloads.iter().enumerate() {
        let baseline = servers
            .iter()
            .position(|server| server.what == "llama-server");
        for (index, server) in servers.iter().enumerate() {
            let figures = middle(&results[workload][index]);
            // Each round's ratio to the baseline's run of the same round, seconds apart.
            let ratios = baseline.map(|baseline| {
                let mut ratios: Vec<f64> = results[workload][index]
                    .iter()
                    .zip(&results[workload][baseline])
                    .map(|(run, base)| run.combined_tok_s / base.combined_tok_s)
                    .collect();
                ratios.sort_by(f64::total_cmp);
                ratios
            });
            println!(
                "| {name} | {} | {:.0} ms | {:.1} | {:.1} | {} |",
                server.what,
                figures.ttft_median.as_secs_f64() * 1e3,
                figures.per_stream_tok_s,
                figures.combined_tok_s,
                ratios.map_or("–".to_string(), |ratios| format!(
                    "{:.2}× ({:.2}–{:.2})",
                    ratios[ratios.len() / 2],
                    ratios[0],
                    ratios[ratios.len() - 1]
                )),
            );
        }
    }
}

/// Questions to ask, made from parts: `count` different ones.
fn questions(count: usize) -> Vec<String> {
    let subjects = [
        "the moon",
        "a river",
        "bread",
        "a violin",
        "the ocean",
        "a volcano",
        "honey",
        "a clock",
        "snow",
        "a library",
        "copper",
        "the wind",
        "a bridge",
        "tea",
        "a forest",
        "glass",
    ];
    let asks = [
        "What is {} made of? Answer in one sentence.",
        "Give me one surprising fact about {}.",
        "Describe {} to a child in two sentences.",
        "Why do people care about {}? Be brief.",
        "Write a short poem about {}.",
        "List three words that go with {}.",
        "What would a scientist say about {}?",
        "Tell me a one-line story about {}.",
        "How old is the idea of {}? Answer briefly.",
        "Compare {} with a mountain in one sentence.",
        "What colour is {} usually, and why?",
        "What sound does {} make? Answer in a sentence.",
        "Explain {} in exactly one sentence.",
    ];
    asks.iter()
        .flat_map(|ask| {
            subjects
                .iter()
                .map(move |subject| ask.replace("{}", subject))
        })
        .take(count)
        .collect()
}

fn greedy(prompt: stipend_model::Prompt, max_tokens: usize) -> Generate {
    Generate {
        prompt,
        max_tokens,
        stop: Vec::new(),
        sampling: Sampling {
            temperature: 0.0,
            ..Sampling::default()
        },
        grammar: None,
        owner: 1,
    }
}

fn flips(count: usize, max_tokens: usize) {
    let load = |prefix_cache| {
        EmbeddedModel::load(
            &stipend_testkit::model_gguf(),
            LoadOptions {
                n_ctx: CONTEXT,
                slots: 1,
                n_batch: N_BATCH,
                prefix_cache,
                ..LoadOptions::default()
            },
        )
        .unwrap()
    };
    let (fresh, cached) = (load(PrefixCache::Off), load(PrefixCache::PerOwner));
    let chat = |model: &EmbeddedModel, messages: &[(&str, &str)]| {
        model
            .chat_prompt(
                &messages
                    .iter()
                    .map(|(role, content)| ChatMessage {
                        role: role.to_string(),
                        content: content.to_string(),
                    })
                    .collect::<Vec<_>>(),
            )
            .unwrap()
    };
    let answer = |model: &EmbeddedModel, prompt| {
        collect(model.generate(greedy(prompt, max_tokens)).unwrap()).unwrap()
    };
    let questions = questions(count);
    let (mut repeat_flips, mut turn_flips, mut turn_cached) = (0, 0, 0);
    // Of answers that differ, how many characters they agree on first.
    let mut agreed = Vec::new();
    let agreement = |a: &str, b: &str| a.chars().zip(b.chars()).take_while(|(a, b)| a == b).count();
    for (index, question) in questions.iter().enumerate() {
        // A repeat: the second reading decodes only the prompt's last token.
        let prompt = chat(&fresh, &[("user", question)]);
        let from_scratch = answer(&fresh, prompt.clone());
        answer(&cached, prompt.clone());
        let hit = answer(&cached, prompt);
        assert_eq!(
            hit.counts.cached_prompt_tokens,
            hit.counts.prompt_tokens - 1
        );
        if hit.text != from_scratch.text {
            repeat_flips += 1;
            agreed.push(agreement(&hit.text, &from_scratch.text));
        }
        // A second turn: the first turn and its answer come from the cache, the new question
        // is decoded in one batch of its own.
        let next = &questions[(index + 7) % questions.len()];
        let turn = [
            ("user", question.as_str()),
            ("assistant", from_scratch.text.as_str()),
            ("user", next.as_str()),
        ];
        let from_scratch = answer(&fresh, chat(&fresh, &turn));
        let hit = answer(&cached, chat(&cached, &turn));
        turn_cached += usize::from(hit.counts.cached_prompt_tokens > 0);
        if hit.text != from_scratch.text {
            turn_flips += 1;
            agreed.push(agreement(&hit.text, &from_scratch.text));
        }
    }
    agreed.sort_unstable();
    println!(
        "greedy answers (up to {max_tokens} tokens) that differ after a cache hit, over {count} prompts: \
         a repeated prompt {repeat_flips} ({:.1} %), a second turn {turn_flips} ({:.1} %; {turn_cached} of them hit); \
         those that differ agree on their first {} characters (median)",
        100.0 * repeat_flips as f64 / count as f64,
        100.0 * turn_flips as f64 / count as f64,
        agreed.get(agreed.len() / 2).copied().unwrap_or(0),
    );
}

fn main() {
    let max_tokens: usize = env_or("STIPEND_BENCH_TOKENS", 128);
    let only = std::env::var("STIPEND_BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "speed" {
        speed(max_tokens);
    }
    if only.is_empty() || only == "flips" {
        flips(env_or("STIPEND_BENCH_FLIPS", 100), 32);
    }
}
