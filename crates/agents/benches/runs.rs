//! Agent runs at scale, on this machine: N runs at once (10 000 by default, or
//! `STIPEND_BENCH_RUNS`) spread over 100 people, journaled in the embedded store, each calling
//! the scripted test upstream, then a trivial tool (`mcp-server-time`, one shared server) that
//! asks its person first, then answering. It measures
//!
//! - memory per run waiting for approval: the process's resident memory with every run waiting,
//!   less before any started, over N;
//! - from an approval's decision to the run's next model call: the decision, the tool's call,
//!   and the journal's writes, until the model call starts (sampled one run at a time, so that
//!   it is the latency of one decision, not of a queue of them), and to its answer;
//! - steps per second with every remaining run approved at once (model and tool steps), beside
//!   the same machine's in-process chat calls per second through the same gateway and upstream
//!   (the baseline: what the steps cost beyond their model calls);
//! - then as many runs again without a tool server (each asks for a tool it was not given, is
//!   refused, and answers), started at once: steps per second of the loop and its journal alone.
//!
//! `make bench-agents` runs it (it needs the Python virtualenv with `mcp-server-time` that
//! `make test` makes). Figures: docs/benchmarks.md.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stipend_agents::{Agents, AgentsOptions, Decision, Policy, StartRequest, ToolsetConfig};
use stipend_gateway::queue::{FairQueue, QueueOptions};
use stipend_gateway::{
    Backend, Gateway, GatewayOptions, KeyRing, Model, Payer, Upstream, UpstreamConfig,
};
use stipend_ledger::{
    AccountId, AccountKind, Books, Ledger, LedgerOptions, RunJournal, StipendPolicy, Store,
    SystemClock,
};
use stipend_store_sqlite::SqliteStore;

const PEOPLE: usize = 100;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let runs: usize = std::env::var("STIPEND_BENCH_RUNS")
        .ok()
        .and_then(|runs| runs.parse().ok())
        .unwrap_or(10_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(bench(runs));
}

async fn bench(runs: usize) {
    let python = std::env::var("STIPEND_PYTHON").expect(
        "STIPEND_PYTHON: a virtualenv's python with mcp-server-time (make bench-agents sets it)",
    );
    let time_server = PathBuf::from(python).with_file_name("mcp-server-time");
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Arc::new(SqliteStore::open(&dir.path().join("ledger.db")).unwrap());
    let policy = StipendPolicy::new(100_000_000, Duration::from_secs(3_650 * 86_400), 0).unwrap();
    let ledger = Arc::new(
        Ledger::open(
            Arc::clone(&sqlite) as Arc<dyn Store>,
            Arc::new(SystemClock),
            LedgerOptions::new(policy),
        )
        .unwrap(),
    );
    let people: Vec<AccountId> = (0..PEOPLE)
        .map(|index| {
            ledger
                .create_account(&format!("person{index}"), AccountKind::Person)
                .unwrap()
                .wait()
                .unwrap()
        })
        .collect();
    let (upstream, _) = stipend_testkit::spawn_metered().await.unwrap();
    let model = Model {
        name: "script".to_string(),
        price_prompt_cu: 1,
        price_cached_prompt_cu: 1,
        price_completion_cu: 1,
        sink: ledger.sink("sink:script").unwrap(),
        backend: Backend::Upstream {
            upstream: Upstream::new(UpstreamConfig {
                base_url: upstream,
                api_key: None,
                timeout: Duration::from_secs(60),
                idle_connections: 64,
                roots: Default::default(),
            })
            .unwrap(),
            model: "script".to_string(),
        },
        queue: Arc::new(FairQueue::new(
            64,
            QueueOptions {
                queue_depth_max_per_person: runs,
                queue_depth_max: runs * 2,
                queue_wait_max: Duration::from_secs(600),
            },
        )),
        max_concurrency: 64,
        counters: Default::default(),
    };
    let gateway = Arc::new(Gateway {
        ledger: Arc::clone(&ledger) as Arc<dyn stipend_ledger::Budget>,
        keys: KeyRing::new(Arc::clone(&sqlite) as Arc<dyn Store>, ledger.issuer()),
        access: stipend_gateway::Access::load(Arc::clone(&sqlite) as Arc<dyn Store>).unwrap(),
        caps: Arc::new(stipend_gateway::KeyCaps::new(
            Arc::clone(&sqlite) as Arc<dyn Store>
        )),
        models: BTreeMap::from([("script".to_string(), Arc::new(model))]),
        options: GatewayOptions::default(),
        unrouted: Default::default(),
        calls: Default::default(),
    });
    let mut options = AgentsOptions::new(dir.path().join("runs"));
    options.active_runs_per_person_max = runs;
    options.kept_runs_per_person_max = runs * 2;
    options.toolsets = vec![ToolsetConfig {
        name: "time".to_string(),
        command: time_server.display().to_string(),
        args: Vec::new(),
        default: Some(Policy::Ask),
        overrides: BTreeMap::new(),
        shared: true,
    }];
    let agents = Agents::with_journal(
        Arc::clone(&gateway),
        Arc::clone(&ledger) as Arc<dyn Books>,
        options,
        Arc::clone(&sqlite) as Arc<dyn RunJournal>,
    )
    .unwrap();

    // The baseline: plain chat calls through the same gateway and upstream, 64 at a time.
    let baseline_calls = 4_000;
    let started = Instant::now();
    let mut calls = Vec::new();
    for index in 0..64 {
        let gateway = Arc::clone(&gateway);
        let payer = Payer::own(people[index % PEOPLE]);
        calls.push(tokio::spawn(async move {
            for _ in 0..baseline_calls / 64 {
                let body = json!({"model": "script", "max_tokens": 64, "messages": [
                    {"role": "user", "content": "SCRIPT: [{\"say\": \"hello\"}]"}]});
                let response = stipend_gateway::chat_in_process(
                    Arc::clone(&gateway),
                    payer.clone(),
                    body.to_string().into(),
                )
                .await
                .unwrap();
                axum::body::to_bytes(response.into_body(), usize::MAX)
                    .await
                    .unwrap();
            }
        }));
    }
    for call in calls {
        call.await.unwrap();
    }
    let baseline_per_s = (baseline_calls / 64 * 64) as f64 / started.elapsed().as_secs_f64();

    // N runs, each waiting for its person's approval of its tool call.
    let script = json!([
        {"call": [{"name": "time__get_current_time", "arguments": {"timezone": "UTC"}}]},
        {"say": "done"},
    ]);
    let rss_before = rss_bytes();
    let started = Instant::now();
    let mut starts = Vec::new();
    for index in 0..runs {
        let agents = Arc::clone(&agents);
        let person = people[index % PEOPLE];
        let goal = format!("SCRIPT: {script}");
        starts.push(tokio::task::spawn_blocking(move || {
            let run = agents
                .start(
                    person,
                    StartRequest {
                        goal,
                        model: "script".to_string(),
                        budget_cu: 50_000,
                        toolsets: vec!["time".to_string()],
                        max_steps: None,
                    },
                )
                .unwrap();
            (person, run.id)
        }));
    }
    let mut started_runs = Vec::new();
    for start in starts {
        started_runs.push(start.await.unwrap());
    }
    let waiting = loop {
        let waiting: usize = people
            .iter()
            .map(|person| agents.approvals(*person).len())
            .sum();
        if waiting == runs {
            break waiting;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1_800),
            "{waiting} of {runs} waiting"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let to_waiting = started.elapsed();
    // Let what the runs' start left behind settle before the reading.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_waiting = rss_bytes();
    let per_run = rss_waiting.saturating_sub(rss_before) as f64 / waiting as f64;

    // One decision at a time: from it to the run's next model call, and to its answer.
    let sample = runs.min(1_000);
    let mut to_call = Vec::with_capacity(sample);
    let mut to_answer = Vec::with_capacity(sample);
    for (person, id) in &started_runs[..sample] {
        let (view, mut events) = agents.events(*person, id).unwrap();
        let approval = view.approval.unwrap().id;
        let decided = Instant::now();
        agents
            .decide(*person, &approval, Decision::Approve(None))
            .unwrap();
        loop {
            let event: Value = events.recv().await.unwrap();
            if event["type"] == "step" && event["step"]["kind"] == "tool" {
                to_call.push(decided.elapsed());
            }
            if event["type"] == "step" && event["step"]["kind"] == "model" {
                to_answer.push(decided.elapsed());
                break;
            }
        }
    }
    to_call.sort();
    to_answer.sort();

    // The rest at once: steps per second.
    let rest = &started_runs[sample..];
    // Each run's end is awaited on its own events, so that watching costs nothing measurable.
    let mut ends = Vec::with_capacity(rest.len());
    let mut approvals = Vec::with_capacity(rest.len());
    for (person, id) in rest {
        let (view, mut events) = agents.events(*person, id).unwrap();
        approvals.push((*person, view.approval.unwrap().id));
        ends.push(tokio::spawn(async move {
            loop {
                let event: Value = events.recv().await.unwrap();
                if event["type"] == "state" && event["state"] == "done" {
                    return;
                }
            }
        }));
    }
    let started = Instant::now();
    for (person, approval) in approvals {
        agents
            .decide(person, &approval, Decision::Approve(None))
            .unwrap();
    }
    for end in ends {
        end.await.unwrap();
    }
    let elapsed = started.elapsed();
    // Each of the rest takes two steps after its approval: the tool, then the model's answer.
    let steps_per_s = (rest.len() * 2) as f64 / elapsed.as_secs_f64();

    // The same number of runs without a tool server: each asks for a tool it was not given
    // (refused at once, journaled), then answers. What a step costs the loop and the journal,
    // apart from the tool server.
    let bare = json!([{"call": [{"name": "absent__tool", "arguments": {}}]}, {"say": "done"}]);
    let started = Instant::now();
    let mut bare_runs = Vec::with_capacity(rest.len());
    for index in 0..rest.len() {
        let agents = Arc::clone(&agents);
        let person = people[index % PEOPLE];
        let goal = format!("SCRIPT: {bare}");
        bare_runs.push(tokio::spawn(async move {
            let run = tokio::task::spawn_blocking({
                let agents = Arc::clone(&agents);
                move || {
                    agents
                        .start(
                            person,
                            StartRequest {
                                goal,
                                model: "script".to_string(),
                                budget_cu: 50_000,
                                toolsets: Vec::new(),
                                max_steps: None,
                            },
                        )
                        .unwrap()
                }
            })
            .await
            .unwrap();
            let (view, mut events) = agents.events(person, &run.id).unwrap();
            if view.state == stipend_agents::State::Done {
                return;
            }
            loop {
                let event: Value = events.recv().await.unwrap();
                if event["type"] == "state" && event["state"] == "done" {
                    return;
                }
            }
        }));
    }
    for run in bare_runs {
        run.await.unwrap();
    }
    // Three steps each: the model, the refused tool, the model's answer.
    let bare_steps_per_s = (rest.len() * 3) as f64 / started.elapsed().as_secs_f64();

    println!(
        "| runs | to all waiting | memory per waiting run | decision → next model call p50 / p99 | decision → its answer p50 / p99 | steps/s (rest approved at once) | in-process chat calls/s (baseline) | steps/s ÷ calls/s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {runs} | {:.1} s | {:.1} KiB | {:.2} / {:.2} ms | {:.2} / {:.2} ms | {:.0} | {:.0} | {:.2} |",
        to_waiting.as_secs_f64(),
        per_run / 1024.0,
        percentile(&to_call, 0.5).as_secs_f64() * 1e3,
        percentile(&to_call, 0.99).as_secs_f64() * 1e3,
        percentile(&to_answer, 0.5).as_secs_f64() * 1e3,
        percentile(&to_answer, 0.99).as_secs_f64() * 1e3,
        steps_per_s,
        baseline_per_s,
        steps_per_s / baseline_per_s,
    );
    println!(
        "\nWithout a tool server ({} runs started at once, each a model call, a refused tool call, a model call): {bare_steps_per_s:.0} steps/s, {:.2} of the baseline.",
        rest.len(),
        bare_steps_per_s / baseline_per_s
    );
}
