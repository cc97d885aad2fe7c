//! The embedded model's throughput, in one run: a raw llama.cpp decode loop on the same GGUF (the
//! floor: llama.cpp with nothing around it, the same context, batch and thread settings) and
//! Stipend over HTTP (the real binary, streaming chat completions on loopback, its prefix cache
//! off as the loop has none: `--bench prefix_cache` measures the cache), at 1, 2, 4 and 8
//! concurrent streams. Both generate greedily from the same prompts, so they produce the same
//! tokens. Reports prompt tok/s, generated tok/s per stream and combined, time to first token,
//! and RSS.
//!
//! `cargo bench -p stipend --bench embedded` (or `make bench-model`). Knobs:
//! `STIPEND_BENCH_STREAMS` (default `1,2,4,8`), `STIPEND_BENCH_TOKENS` (completion tokens per
//! stream, default 128), `STIPEND_BENCH_ROUNDS` (runs per row, best kept; default 3),
//! `STIPEND_MODEL_GGUF`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::sampling::LlamaSampler;
use serde_json::json;
use stipend_model::{ChatMessage, EmbeddedModel, LoadOptions};

use common::{env_or, slots};

const CONTEXT: u32 = 2_048;
const N_BATCH: u32 = 512;

const QUESTIONS: [&str; 8] = [
    "Write a long story about a lighthouse keeper.",
    "Explain how a steam engine works, in detail.",
    "Describe a day in the life of a medieval baker.",
    "Write a long letter to a friend about a trip to the mountains.",
    "Explain the water cycle to a child, at length.",
    "Tell a long story about a dragon who learns to cook.",
    "Describe the history of the bicycle.",
    "Write a long essay about why people keep gardens.",
];

/// One row's figures.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    prompt_tokens: usize,
    completion_tokens: usize,
    /// Mean time to first token over the streams.
    ttft: Duration,
    /// From the first request to the last token.
    wall: Duration,
    /// Mean over the streams of (completion tokens / time from first to last token).
    per_stream_tok_s: f64,
}

impl Figures {
    fn combined_tok_s(&self) -> f64 {
        self.completion_tokens as f64 / self.wall.as_secs_f64()
    }

    fn prompt_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.ttft.as_secs_f64()
    }
}

fn threads() -> i32 {
    std::thread::available_parallelism().map_or(2, |n| n.get() as i32)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0)
}

/// The floor: llama.cpp's decode loop with `n` sequences, all prompts at once, then one token
/// per sequence per step, greedy, until each ends or has `max_tokens`.
fn raw_loop(
    backend: &LlamaBackend,
    model: &LlamaModel,
    prompts: &[String],
    max_tokens: usize,
) -> Figures {
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(CONTEXT * slots()))
        .with_n_seq_max(slots())
        .with_kv_unified(false)
        .with_n_batch(N_BATCH)
        .with_n_ubatch(N_BATCH)
        .with_n_threads(threads())
        .with_n_threads_batch(threads());
    let mut context = model.new_context(backend, params).unwrap();
    let vocab = model.vocab();
    let tokens: Vec<_> = prompts
        .iter()
        .map(|prompt| vocab.tokenize(prompt.as_bytes(), false, true))
        .collect();
    let n = prompts.len();
    let mut batch = LlamaBatch::new(N_BATCH as usize, 1);
    let started = Instant::now();
    // The prompts, in batches of at most N_BATCH tokens.
    let mut logits_at = vec![0i32; n];
    let mut queue: Vec<(usize, usize)> = (0..n)
        .flat_map(|seq| (0..tokens[seq].len()).map(move |position| (seq, position)))
        .collect();
    while !queue.is_empty() {
        batch.clear();
        let take = queue.len().min(N_BATCH as usize);
        for (seq, position) in queue.drain(..take) {
            let last = position + 1 == tokens[seq].len();
            batch
                .add(tokens[seq][position], position as i32, &[seq as i32], last)
                .unwrap();
            if last {
                logits_at[seq] = batch.n_tokens() - 1;
            }
        }
        context.decode(&mut batch).unwrap();
    }
    let mut samplers: Vec<LlamaSampler> = (0..n).map(|_| LlamaSampler::greedy()).collect();
    let mut generated = vec![0usize; n];
    let mut positions: Vec<i32> = tokens.iter().map(|t| t.len() as i32).collect();
    let mut first_token: Vec<Option<Instant>> = vec![None; n];
    let mut last_token: Vec<Instant> = vec![started; n];
    let mut active: Vec<bool> = vec![true; n];
    loop {
        batch.clear();
        for seq in 0..n {
            if !active[seq] {
                continue;
            }
            let token = samplers[seq].sample(&context, logits_at[seq]);
            let now = Instant::now();
            first_token[seq].get_or_insert(now);
            if vocab.is_eog(token) {
                active[seq] = false;
                last_token[seq] = now;
                continue;
            }
            generated[seq] += 1;
            last_token[seq] = now;
            if generated[seq] >= max_tokens {
                active[seq] = false;
                continue;
            }
            // Decode the piece as a server must (the text is what it sends).
            let _ = vocab.token_to_piece(token, false, None);
            batch
                .add(token, positions[seq], &[seq as i32], true)
                .unwrap();
            logits_at[seq] = batch.n_tokens() - 1;
            positions[seq] += 1;
        }
        if batch.n_tokens() == 0 {
            break;
        }
        context.decode(&mut batch).unwrap();
    }
    let wall = last_token.iter().max().unwrap().duration_since(started);
    summarize(
        tokens.iter().map(Vec::len).sum(),
        &generated,
        &first_token
            .iter()
            .map(|first| first.unwrap().duration_since(started))
            .collect::<Vec<_>>(),
        &last_token
            .iter()
            .map(|last| last.duration_since(started))
            .collect::<Vec<_>>(),
        wall,
    )
}

fn summarize(
    prompt_tokens: usize,
    generated: &[usize],
    first: &[Duration],
    last: &[Duration],
    wall: Duration,
) -> Figures {
    let n = generated.len();
    let per_stream: f64 = (0..n)
        .map(|i| {
            let span = last[i].saturating_sub(first[i]).as_secs_f64();
            // The first token is the prompt's; the rest are generation.
            generated[i].saturating_sub(1) as f64 / span.max(1e-9)
        })
        .sum::<f64>()
        / n as f64;
    Figures {
        prompt_tokens,
        completion_tokens: generated.iter().sum(),
        ttft: first.iter().sum::<Duration>() / n as u32,
        wall,
        per_stream_tok_s: per_stream,
    }
}

/// One streaming call: returns (prompt tokens, completion tokens, first token at, last at).
async fn stream_call(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    question: &str,
    max_tokens: usize,
    started: Instant,
) -> (usize, usize, Duration, Duration) {
    let body = json!({
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let call = common::stream_chat(http, base, key, &body, started).await;
    (
        call.prompt_tokens,
        call.completion_tokens,
        call.first,
        call.last,
    )
}

async fn over_http(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    n: usize,
    max_tokens: usize,
) -> Figures {
    let started = Instant::now();
    let calls = futures_util::future::join_all(
        QUESTIONS[..n]
            .iter()
            .map(|question| stream_call(http, base, key, question, max_tokens, started)),
    )
    .await;
    let wall = calls.iter().map(|call| call.3).max().unwrap();
    summarize(
        calls.iter().map(|call| call.0).sum(),
        &calls.iter().map(|call| call.1).collect::<Vec<_>>(),
        &calls.iter().map(|call| call.2).collect::<Vec<_>>(),
        &calls.iter().map(|call| call.3).collect::<Vec<_>>(),
        wall,
    )
}

fn best(runs: Vec<Figures>) -> Figures {
    runs.into_iter()
        .max_by(|a, b| a.combined_tok_s().total_cmp(&b.combined_tok_s()))
        .unwrap()
}

fn main() {
    let gguf = stipend_testkit::model_gguf();
    let streams: Vec<usize> = std::env::var("STIPEND_BENCH_STREAMS")
        .unwrap_or_else(|_| "1,2,4,8".to_string())
        .split(',')
        .map(|n| n.trim().parse().unwrap())
        .collect();
    let max_tokens: usize = env_or("STIPEND_BENCH_TOKENS", 128);
    let rounds: usize = env_or("STIPEND_BENCH_ROUNDS", 3);

    // The same prompts both ways: rendered with the model's own template.
    let prompts: Vec<String> = {
        let renderer = EmbeddedModel::load(
            &gguf,
            LoadOptions {
                n_ctx: 64,
                slots: 1,
                ..LoadOptions::default()
            },
        )
        .unwrap();
        QUESTIONS
            .iter()
            .map(|question| {
                renderer
                    .render_chat(&[ChatMessage {
                        role: "user".to_string(),
                        content: question.to_string(),
                    }])
                    .unwrap()
            })
            .collect()
    };

    // The raw loop, in this process.
    let mut raw = Vec::new();
    let raw_rss_kib;
    {
        let backend = stipend_model::backend().unwrap();
        let model =
            LlamaModel::load_from_file(backend, &gguf, &LlamaModelParams::default()).unwrap();
        for &n in &streams {
            let runs = (0..rounds)
                .map(|_| raw_loop(backend, &model, &prompts[..n], max_tokens))
                .collect();
            raw.push(best(runs));
        }
        // The loop's process with the model and one context of 8 slots × 2048 tokens.
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(CONTEXT * slots()))
            .with_n_seq_max(slots())
            .with_kv_unified(false)
            .with_n_batch(N_BATCH)
            .with_n_ubatch(N_BATCH);
        let _context = model.new_context(backend, params).unwrap();
        raw_rss_kib = rss_kib(std::process::id());
    }

    // Stipend over HTTP: the real binary, the same model, slots and context.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("stipend.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\n[stipend]\namount = \"1 PFLOP\"\n\
             [[models]]\nname = \"smollm2-135m\"\nbackend = \"embedded\"\npath = \"{}\"\n\
             slots = {}\ncontext = {CONTEXT}\nprefix_cache = \"off\"\n",
            gguf.display(),
            slots()
        ),
    )
    .unwrap();
    let server = common::Served::start(&config, dir.path());
    let (base, key) = (server.base.clone(), server.person_with_key("bench"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let http = reqwest::Client::new();
    let mut served = Vec::new();
    runtime.block_on(async {
        // One call to warm up the connection and the model.
        over_http(&http, &base, &key, 1, 8).await;
        for &n in &streams {
            let mut runs = Vec::new();
            for _ in 0..rounds {
                runs.push(over_http(&http, &base, &key, n, max_tokens).await);
            }
            served.push(best(runs));
        }
    });
    let served_rss_kib = rss_kib(server.child.id());
    drop(server);

    println!(
        "embedded model: SmolLM2-135M-Instruct Q4_1, {} slots × {CONTEXT} tokens, n_batch {N_BATCH}, {} threads, greedy, up to {max_tokens} tokens per stream, best of {rounds}",
        slots(),
        threads()
    );
    println!(
        "| streams | what | prompt tok/s | TTFT (mean) | gen tok/s per stream | gen tok/s combined | combined vs raw |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for ((n, raw), served) in streams.iter().zip(&raw).zip(&served) {
        for (what, figures) in [("raw llama.cpp loop", raw), ("Stipend over HTTP", served)] {
            println!(
                "| {n} | {what} | {:.0} | {:.0} ms | {:.1} | {:.1} | {:.2}× |",
                figures.prompt_tok_s(),
                figures.ttft.as_secs_f64() * 1e3,
                figures.per_stream_tok_s,
                figures.combined_tok_s(),
                figures.combined_tok_s() / raw.combined_tok_s(),
            );
        }
    }
    println!(
        "RSS: raw loop process {} MB (model + one {}-slot context); Stipend server {} MB after the run",
        raw_rss_kib / 1024,
        slots(),
        served_rss_kib / 1024
    );
}
