//! Agent runs end to end, over HTTP on loopback: a real ledger (SQLite), the gateway in front of
//! the scripted test upstream (`script`: each step's tool calls are written in the goal), and
//! real MCP servers from the package registries: `mcp-server-time` (PyPI) as an `auto` toolset
//! and `@modelcontextprotocol/server-filesystem` (npm) as one that asks first. `make test`
//! installs both beside the build (tests/mcp, tests/sdk/requirements.txt).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use stipend_agents::{Agents, AgentsOptions, Policy, ToolsetConfig};
use stipend_gateway::queue::{FairQueue, QueueOptions};
use stipend_gateway::{Backend, Gateway, GatewayOptions, KeyRing, Model, Upstream, UpstreamConfig};
use stipend_ledger::{
    AccountId, AccountKind, Books, Ledger, LedgerOptions, StipendPolicy, Store, SystemClock,
};
use stipend_store_sqlite::SqliteStore;

const STIPEND_CU: u64 = 10_000_000;

/// `mcp-server-time`, installed by `make test` beside the Python the SDK tests use.
fn time_server() -> PathBuf {
    let python = std::env::var("STIPEND_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let path = PathBuf::from(python).with_file_name("mcp-server-time");
    assert!(
        path.exists(),
        "{} is missing: run `make test` (it installs tests/sdk/requirements.txt into a \
         virtualenv), or set STIPEND_PYTHON to a virtualenv's python that has mcp-server-time",
        path.display()
    );
    path
}

/// The filesystem MCP server, installed by `make test` from tests/mcp.
fn files_server() -> PathBuf {
    let modules = std::env::var("STIPEND_MCP_NODE_MODULES")
        .unwrap_or_else(|_| "/var/tmp/stipend-target/mcp/node_modules".to_string());
    let path = PathBuf::from(modules).join(".bin/mcp-server-filesystem");
    assert!(
        path.exists(),
        "{} is missing: run `make test` (it installs tests/mcp), or set \
         STIPEND_MCP_NODE_MODULES to a node_modules that has @modelcontextprotocol/server-filesystem",
        path.display()
    );
    path
}

struct World {
    _dir: tempfile::TempDir,
    ledger: Arc<Ledger>,
    base: String,
    alice: AccountId,
    alice_key: String,
    bob_key: String,
    workdirs: PathBuf,
    http: reqwest::Client,
}

impl World {
    async fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("ledger.db")).unwrap());
        // Ten years a period: no stipend arrives while the tests run.
        let policy =
            StipendPolicy::new(STIPEND_CU, Duration::from_secs(3_650 * 86_400), 0).unwrap();
        let ledger = Arc::new(
            Ledger::open(
                Arc::clone(&store),
                Arc::new(SystemClock),
                LedgerOptions::new(policy),
            )
            .unwrap(),
        );
        let person = |name: &str| {
            ledger
                .create_account(name, AccountKind::Person)
                .unwrap()
                .wait()
                .unwrap()
        };
        let (alice, bob) = (person("alice"), person("bob"));
        let keys = KeyRing::new(store);
        let alice_key = keys.create(alice, 0).unwrap().key;
        let bob_key = keys.create(bob, 0).unwrap().key;
        let (upstream, _) = stipend_testkit::spawn_metered().await.unwrap();
        let model = Model {
            name: "script".to_string(),
            price_prompt_cu: 1,
            price_completion_cu: 1,
            sink: ledger.sink("sink:script").unwrap(),
            backend: Backend::Upstream {
                upstream: Upstream::new(UpstreamConfig {
                    base_url: upstream,
                    api_key: None,
                    timeout: Duration::from_secs(10),
                    idle_connections: 8,
                    roots: Default::default(),
                })
                .unwrap(),
                model: "script".to_string(),
            },
            queue: Arc::new(FairQueue::new(64, QueueOptions::default())),
            max_concurrency: 64,
            counters: Default::default(),
        };
        let gateway = Arc::new(Gateway {
            ledger: Arc::clone(&ledger) as Arc<dyn stipend_ledger::Budget>,
            keys,
            models: BTreeMap::from([("script".to_string(), Arc::new(model))]),
            options: GatewayOptions::default(),
            unrouted: Default::default(),
            calls: Default::default(),
        });
        let workdirs = dir.path().join("runs");
        let mut options = AgentsOptions::new(workdirs.clone());
        options.active_runs_per_person_max = 1_000;
        options.toolsets = vec![
            ToolsetConfig {
                name: "time".to_string(),
                command: time_server().display().to_string(),
                args: Vec::new(),
                default: Some(Policy::Auto),
                overrides: BTreeMap::new(),
            },
            ToolsetConfig {
                name: "files".to_string(),
                command: files_server().display().to_string(),
                args: vec!["{workdir}".to_string()],
                default: Some(Policy::Ask),
                overrides: BTreeMap::from([("list_allowed_directories".to_string(), Policy::Deny)]),
            },
        ];
        let agents = Agents::new(
            Arc::clone(&gateway),
            Arc::clone(&ledger) as Arc<dyn Books>,
            options,
        );
        let router = stipend_gateway::router(gateway).merge(stipend_agents::routes::router(agents));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        World {
            _dir: dir,
            ledger,
            base: format!("http://{address}/v1"),
            alice,
            alice_key,
            bob_key,
            workdirs,
            http: reqwest::Client::new(),
        }
    }

    async fn send(&self, method: &str, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let request = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url),
        }
        .bearer_auth(key);
        let request = match body {
            Some(body) => request.json(&body),
            None => request,
        };
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Starts a run of alice's following `script`; its id.
    async fn start(&self, script: Value, budget_cu: u64, toolsets: &[&str]) -> String {
        let (status, run) = self
            .send(
                "POST",
                "/agents",
                &self.alice_key,
                Some(json!({
                    "goal": format!("Do the scripted thing.\nSCRIPT: {script}"),
                    "model": "script",
                    "budget_cu": budget_cu,
                    "toolsets": toolsets,
                })),
            )
            .await;
        assert_eq!(status, 201, "{run}");
        assert_eq!(run["budget_cu"], budget_cu);
        run["id"].as_str().unwrap().to_string()
    }

    /// Waits until the run is in `state`; the run.
    async fn until(&self, id: &str, state: &str) -> Value {
        for _ in 0..1_000 {
            let (status, run) = self
                .send("GET", &format!("/agents/{id}"), &self.alice_key, None)
                .await;
            assert_eq!(status, 200, "{run}");
            if run["state"] == state {
                return run;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the run never reached {state}");
    }

    fn alice_balance(&self) -> i64 {
        self.ledger.view(self.alice).unwrap().balance_cu
    }
}

fn outcomes(run: &Value) -> Vec<String> {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|step| {
            format!(
                "{}:{}",
                step["kind"].as_str().unwrap(),
                step["outcome"].as_str().unwrap()
            )
        })
        .collect()
}

fn write(path: &str, content: &str) -> Value {
    json!({"call": [{"name": "files__write_file", "arguments": {"path": path, "content": content}}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_tool_runs_and_its_result_reaches_the_model() {
    let world = World::new().await;
    let before = world.alice_balance();
    let script = json!([
        {"call": [{"name": "time__get_current_time", "arguments": {"timezone": "Europe/Paris"}}]},
        {"say": "it is time"},
    ]);
    let id = world.start(script, 100_000, &["time"]).await;
    let run = world.until(&id, "done").await;
    assert_eq!(
        outcomes(&run),
        ["model:asked_for_tools", "tool:auto", "model:answered"]
    );
    let answer = run["answer"].as_str().unwrap();
    assert!(answer.starts_with("it is time"), "{answer}");
    assert!(
        answer.contains("Europe/Paris"),
        "the tool's result did not reach the model: {answer}"
    );
    // Exactly what the two model steps cost left alice; the rest of the cap came back.
    let spent = run["spent_cu"].as_u64().unwrap();
    let steps: u64 = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["cu"].as_u64().unwrap())
        .sum();
    assert!(spent > 0);
    assert_eq!(spent, steps);
    assert_eq!(world.alice_balance(), before - spent as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_risky_tool_waits_for_approval_and_runs_with_the_edited_arguments() {
    let world = World::new().await;
    let script = json!([write("note.txt", "from the model"), {"say": "written"}]);
    let id = world.start(script, 100_000, &["files"]).await;
    let run = world.until(&id, "waiting_for_approval").await;
    let approval = run["approval"].clone();
    assert_eq!(approval["tool"], "files__write_file");
    assert_eq!(approval["arguments"]["content"], "from the model");
    let note = world.workdirs.join(&id).join("note.txt");
    assert!(!note.exists(), "written before it was approved");
    // Alice sees it among her approvals; bob sees nothing of hers.
    let (_, listed) = world
        .send("GET", "/approvals", &world.alice_key, None)
        .await;
    assert_eq!(listed["data"][0]["id"], approval["id"]);
    let (_, others) = world.send("GET", "/approvals", &world.bob_key, None).await;
    assert_eq!(others["data"], json!([]));
    let approval_path = format!("/approvals/{}", approval["id"].as_str().unwrap());
    let edited = json!({"decision": "approve", "arguments": {"path": "note.txt", "content": "edited by alice"}});
    let (status, _) = world
        .send("POST", &approval_path, &world.bob_key, Some(edited.clone()))
        .await;
    assert_eq!(status, 404);
    let (status, body) = world
        .send(
            "POST",
            &approval_path,
            &world.alice_key,
            Some(edited.clone()),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let run = world.until(&id, "done").await;
    assert_eq!(std::fs::read_to_string(&note).unwrap(), "edited by alice");
    assert_eq!(
        outcomes(&run),
        ["model:asked_for_tools", "tool:approved", "model:answered"]
    );
    assert_eq!(run["steps"][1]["arguments"]["content"], "edited by alice");
    // An approval is used once.
    let (status, body) = world
        .send("POST", &approval_path, &world.alice_key, Some(edited))
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "conflict");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_is_told_to_the_model_and_nothing_runs() {
    let world = World::new().await;
    let script = json!([write("note.txt", "x"), {"say": "understood"}]);
    let id = world.start(script, 100_000, &["files"]).await;
    let run = world.until(&id, "waiting_for_approval").await;
    let path = format!("/approvals/{}", run["approval"]["id"].as_str().unwrap());
    let (status, body) = world
        .send(
            "POST",
            &path,
            &world.alice_key,
            Some(json!({"decision": "deny", "reason": "not in my notes, please"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let run = world.until(&id, "done").await;
    assert!(
        run["answer"]
            .as_str()
            .unwrap()
            .contains("not in my notes, please"),
        "{run}"
    );
    assert!(!world.workdirs.join(&id).join("note.txt").exists());
    assert_eq!(
        outcomes(&run),
        ["model:asked_for_tools", "tool:denied", "model:answered"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approved_for_the_run_a_tool_no_longer_asks_and_a_denied_one_never_runs() {
    let world = World::new().await;
    let script = json!([
        write("a.txt", "one"),
        write("b.txt", "two"),
        {"call": [{"name": "files__list_allowed_directories", "arguments": {}}]},
        {"say": "both written"},
    ]);
    let id = world.start(script, 100_000, &["files"]).await;
    let run = world.until(&id, "waiting_for_approval").await;
    let path = format!("/approvals/{}", run["approval"]["id"].as_str().unwrap());
    let (status, _) = world
        .send(
            "POST",
            &path,
            &world.alice_key,
            Some(json!({"decision": "approve_for_run"})),
        )
        .await;
    assert_eq!(status, 200);
    let run = world.until(&id, "done").await;
    assert_eq!(
        outcomes(&run),
        [
            "model:asked_for_tools",
            "tool:approved_for_run",
            "model:asked_for_tools",
            "tool:approved_for_run",
            "model:asked_for_tools",
            "tool:refused_by_policy",
            "model:answered"
        ]
    );
    let dir = world.workdirs.join(&id);
    assert_eq!(std::fs::read_to_string(dir.join("b.txt")).unwrap(), "two");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_ends_at_its_cap_and_the_rest_comes_back() {
    let world = World::new().await;
    let before = world.alice_balance();
    let step =
        json!({"call": [{"name": "time__get_current_time", "arguments": {"timezone": "UTC"}}]});
    let script = Value::from(vec![step; 50]);
    // Enough for several steps, not fifty: each step reserves its worst case (a token for
    // every byte of its request, which carries this long script, and 1 024 for its answer) and
    // is charged about a quarter of the request's bytes.
    let budget = 30_000;
    let id = world.start(script, budget, &["time"]).await;
    let run = world.until(&id, "budget_exhausted").await;
    let spent = run["spent_cu"].as_u64().unwrap();
    assert!(spent > 0 && spent <= budget, "spent {spent} of {budget}");
    assert_eq!(run["error"]["code"], "budget_exhausted");
    let tools_run = outcomes(&run)
        .iter()
        .filter(|step| *step == "tool:auto")
        .count();
    assert!(tools_run >= 2, "{run}");
    // Nothing beyond what the steps cost left alice: the cap's rest came back.
    for _ in 0..100 {
        if world.alice_balance() == before - spent as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(world.alice_balance(), before - spent as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_pauses_steers_resumes_and_stops_their_runs() {
    let world = World::new().await;
    let script = json!([write("note.txt", "x"), {"say": "finished"}]);
    let id = world.start(script.clone(), 100_000, &["files"]).await;
    let run = world.until(&id, "waiting_for_approval").await;
    let (status, _) = world
        .send(
            "POST",
            &format!("/agents/{id}/steer"),
            &world.alice_key,
            Some(json!({"message": "write it in French"})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = world
        .send(
            "POST",
            &format!("/agents/{id}/pause"),
            &world.alice_key,
            None,
        )
        .await;
    assert_eq!(status, 200);
    let path = format!("/approvals/{}", run["approval"]["id"].as_str().unwrap());
    world
        .send(
            "POST",
            &path,
            &world.alice_key,
            Some(json!({"decision": "approve"})),
        )
        .await;
    // The tool runs; the next step waits for the resume.
    world.until(&id, "paused").await;
    let (status, _) = world
        .send(
            "POST",
            &format!("/agents/{id}/resume"),
            &world.alice_key,
            None,
        )
        .await;
    assert_eq!(status, 200);
    let run = world.until(&id, "done").await;
    assert!(
        run["answer"]
            .as_str()
            .unwrap()
            .contains("write it in French"),
        "{run}"
    );

    // Stopped while it waits: it ends at once, and its budget comes back whole but for the
    // one step it took.
    let before = world.alice_balance();
    let id = world.start(script, 100_000, &["files"]).await;
    world.until(&id, "waiting_for_approval").await;
    let (status, _) = world
        .send(
            "POST",
            &format!("/agents/{id}/stop"),
            &world.alice_key,
            None,
        )
        .await;
    assert_eq!(status, 200);
    let run = world.until(&id, "stopped").await;
    let spent = run["spent_cu"].as_u64().unwrap();
    for _ in 0..100 {
        if world.alice_balance() == before - spent as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(world.alice_balance(), before - spent as i64);
    let (_, approvals) = world
        .send("GET", "/approvals", &world.alice_key, None)
        .await;
    assert_eq!(approvals["data"], json!([]));
    // An ended run takes no more steering.
    let (status, _) = world
        .send(
            "POST",
            &format!("/agents/{id}/steer"),
            &world.alice_key,
            Some(json!({"message": "go on"})),
        )
        .await;
    assert_eq!(status, 409);
    // Deleted, it is gone.
    let (status, _) = world
        .send("DELETE", &format!("/agents/{id}"), &world.alice_key, None)
        .await;
    assert_eq!(status, 200);
    let (status, _) = world
        .send("GET", &format!("/agents/{id}"), &world.alice_key, None)
        .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_persons_key_finds_nothing_and_bad_requests_are_refused() {
    let world = World::new().await;
    let script = json!([write("note.txt", "x")]);
    let id = world.start(script, 100_000, &["files"]).await;
    world.until(&id, "waiting_for_approval").await;
    for (method, path) in [
        ("GET", format!("/agents/{id}")),
        ("GET", format!("/agents/{id}/events")),
        ("POST", format!("/agents/{id}/pause")),
        ("POST", format!("/agents/{id}/resume")),
        ("POST", format!("/agents/{id}/stop")),
        ("DELETE", format!("/agents/{id}")),
    ] {
        let (status, body) = world.send(method, &path, &world.bob_key, None).await;
        assert_eq!(status, 404, "{method} {path}: {body}");
    }
    let (status, _) = world
        .send(
            "POST",
            &format!("/agents/{id}/steer"),
            &world.bob_key,
            Some(json!({"message": "hi"})),
        )
        .await;
    assert_eq!(status, 404);
    let (_, listed) = world.send("GET", "/agents", &world.bob_key, None).await;
    assert_eq!(listed["data"], json!([]));
    let (_, listed) = world.send("GET", "/agents", &world.alice_key, None).await;
    assert_eq!(listed["data"][0]["id"], id.as_str());
    // Bad starts change nothing.
    let before = world.alice_balance();
    for (body, param) in [
        (
            json!({"goal": "x", "model": "gpt-9", "budget_cu": 10}),
            "model",
        ),
        (
            json!({"goal": "x", "model": "script", "budget_cu": 0}),
            "budget_cu",
        ),
        (
            json!({"goal": "x", "model": "script", "budget_cu": 10, "toolsets": ["shell"]}),
            "toolsets",
        ),
        (
            json!({"goal": "", "model": "script", "budget_cu": 10}),
            "goal",
        ),
        (
            json!({"goal": "x", "model": "script", "budget_cu": 10, "max_steps": 0}),
            "max_steps",
        ),
    ] {
        let (status, error) = world
            .send("POST", "/agents", &world.alice_key, Some(body))
            .await;
        assert_eq!(status, 400, "{error}");
        assert_eq!(error["error"]["param"], param, "{error}");
    }
    let (status, error) = world
        .send(
            "POST",
            "/agents",
            &world.alice_key,
            Some(json!({"goal": "x", "model": "script", "budget_cu": 100 * STIPEND_CU})),
        )
        .await;
    assert_eq!(status, 429, "{error}");
    assert_eq!(error["error"]["code"], "insufficient_quota");
    assert_eq!(world.alice_balance(), before);
    let (status, _) = world
        .send("GET", "/agents", "sk-stipend-nonsense", None)
        .await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_runs_at_once_all_end_and_are_charged_exactly() {
    let world = World::new().await;
    let before = world.alice_balance();
    // Each run asks for a tool it does not have, is told so, and answers: two model steps.
    let script = json!([{"call": [{"name": "nothing__here", "arguments": {}}]}, {"say": "fine"}]);
    let mut starts = Vec::new();
    for _ in 0..1_000 {
        let (http, base, key, script) = (
            world.http.clone(),
            world.base.clone(),
            world.alice_key.clone(),
            script.clone(),
        );
        starts.push(tokio::spawn(async move {
            let response = http
                .post(format!("{base}/agents"))
                .bearer_auth(key)
                .json(&json!({"goal": format!("SCRIPT: {script}"), "model": "script", "budget_cu": 5_000}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 201);
        }));
    }
    for start in starts {
        start.await.unwrap();
    }
    let mut runs = Vec::new();
    for _ in 0..1_000 {
        let (_, listed) = world.send("GET", "/agents", &world.alice_key, None).await;
        runs = listed["data"].as_array().unwrap().clone();
        if runs.iter().all(|run| run["state"] == "done") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(runs.len(), 1_000);
    let not_done: Vec<&Value> = runs.iter().filter(|run| run["state"] != "done").collect();
    assert!(
        not_done.is_empty(),
        "{} runs not done, e.g. {}",
        not_done.len(),
        not_done[0]
    );
    for run in &runs {
        assert_eq!(
            outcomes(run),
            [
                "model:asked_for_tools",
                "tool:unknown_tool",
                "model:answered"
            ]
        );
    }
    let spent: u64 = runs
        .iter()
        .map(|run| run["spent_cu"].as_u64().unwrap())
        .sum();
    for _ in 0..100 {
        if world.alice_balance() == before - spent as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(world.alice_balance(), before - spent as i64);
}
