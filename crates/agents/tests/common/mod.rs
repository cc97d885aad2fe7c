//! Shared by the agents' tests: a ledger (SQLite), the gateway in front of the scripted test
//! upstream, the agents' API on loopback, and real MCP servers from the package registries.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use stipend_agents::{Agents, AgentsOptions, Policy, ToolsetConfig};
use stipend_gateway::queue::{FairQueue, QueueOptions};
use stipend_gateway::{Backend, Gateway, GatewayOptions, KeyRing, Model, Upstream, UpstreamConfig};
use stipend_ledger::{
    AccountId, AccountKind, Books, JournalRecord, Ledger, LedgerOptions, RunJournal, StipendPolicy,
    Store, SystemClock,
};
use stipend_store_sqlite::SqliteStore;

pub const STIPEND_CU: u64 = 10_000_000;

/// `mcp-server-time`, installed by `make test` beside the Python the SDK tests use.
pub fn time_server() -> PathBuf {
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
pub fn files_server() -> PathBuf {
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

pub struct World {
    _dir: tempfile::TempDir,
    pub ledger: Arc<Ledger>,
    pub base: String,
    pub alice: AccountId,
    pub alice_key: String,
    pub bob_key: String,
    pub workdirs: PathBuf,
    pub http: reqwest::Client,
}

/// Writes a journal, as a server stopped at some moment would have left it, before the agents
/// start: given the ledger and alice, it makes what the runs need and returns their records.
pub type Prepare = Box<dyn FnOnce(&Ledger, AccountId) -> Vec<JournalRecord>>;

impl World {
    /// Runs in memory only.
    pub async fn new() -> World {
        World::build(None, |_| {}).await
    }

    /// Runs in memory only, with the options as `tweak` leaves them.
    pub async fn with(tweak: impl FnOnce(&mut AgentsOptions)) -> World {
        World::build(None, tweak).await
    }

    /// Runs journaled in the ledger's store, which holds what `prepare` writes; the agents read
    /// it back (resume) before serving.
    pub async fn journaled(prepare: Prepare) -> World {
        World::build(Some(prepare), |_| {}).await
    }

    async fn build(prepare: Option<Prepare>, tweak: impl FnOnce(&mut AgentsOptions)) -> World {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = Arc::new(SqliteStore::open(&dir.path().join("ledger.db")).unwrap());
        let store: Arc<dyn Store> = Arc::clone(&sqlite) as Arc<dyn Store>;
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
        let keys = KeyRing::new(store, ledger.issuer());
        let alice_key = keys.create(alice, 0).unwrap().key;
        let bob_key = keys.create(bob, 0).unwrap().key;
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
            access: stipend_gateway::Access::load(keys.store()).unwrap(),
            caps: Arc::new(stipend_gateway::KeyCaps::new(keys.store())),
            keys,
            models: BTreeMap::from([("script".to_string(), Arc::new(model))]),
            options: GatewayOptions::default(),
            unrouted: Default::default(),
            calls: Default::default(),
        });
        let workdirs = dir.path().join("runs");
        let mut options = AgentsOptions::new(workdirs.clone());
        options.active_runs_per_person_max = 1_000;
        options.tool_timeout = Duration::from_secs(3);
        options.tool_output_bytes_max = 4_096;
        options.kept_runs_per_person_max = 2_000;
        options.toolsets = vec![
            ToolsetConfig {
                name: "time".to_string(),
                command: time_server().display().to_string(),
                args: Vec::new(),
                default: Some(Policy::Auto),
                overrides: BTreeMap::new(),
                shared: true,
            },
            ToolsetConfig {
                name: "limits".to_string(),
                command: time_server().with_file_name("python").display().to_string(),
                args: vec![
                    stipend_testkit::repo_path("tests/mcp/limits_server.py")
                        .display()
                        .to_string(),
                ],
                default: Some(Policy::Auto),
                overrides: BTreeMap::new(),
                shared: false,
            },
            ToolsetConfig {
                name: "files".to_string(),
                command: files_server().display().to_string(),
                args: vec!["{workdir}".to_string()],
                default: Some(Policy::Ask),
                overrides: BTreeMap::from([("list_allowed_directories".to_string(), Policy::Deny)]),
                shared: false,
            },
        ];
        tweak(&mut options);
        let agents = match prepare {
            None => Agents::new(
                Arc::clone(&gateway),
                Arc::clone(&ledger) as Arc<dyn Books>,
                options,
            ),
            Some(prepare) => {
                let records = prepare(&ledger, alice);
                sqlite.journal_append(&records).unwrap();
                let agents = Agents::with_journal(
                    Arc::clone(&gateway),
                    Arc::clone(&ledger) as Arc<dyn Books>,
                    options,
                    sqlite as Arc<dyn RunJournal>,
                )
                .unwrap();
                agents.resume().await.unwrap();
                agents
            }
        };
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

    pub async fn send(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
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
    pub async fn start(&self, script: Value, budget_cu: u64, toolsets: &[&str]) -> String {
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
    pub async fn until(&self, id: &str, state: &str) -> Value {
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

    /// Waits (a few seconds at most) until alice's balance is `expected`: what a run holds
    /// comes back once its last call has settled.
    pub async fn balance_comes_to(&self, expected: i64) {
        for _ in 0..200 {
            if self.alice_balance() == expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(self.alice_balance(), expected);
    }

    pub fn alice_balance(&self) -> i64 {
        self.ledger.view(self.alice).unwrap().balance_cu
    }
}

pub fn outcomes(run: &Value) -> Vec<String> {
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

/// A run's journal records, from its entries as the agents write them (JSON).
pub fn records(run: &str, entries: &[Value]) -> Vec<JournalRecord> {
    entries
        .iter()
        .enumerate()
        .map(|(seq, entry)| JournalRecord {
            run: run.to_string(),
            seq: seq as u64,
            record: serde_json::to_vec(entry).unwrap(),
        })
        .collect()
}

/// An agent account for a run of alice's, holding `budget_cu` of hers, as a start makes it;
/// the run's start entry.
pub fn begun(
    ledger: &Ledger,
    alice: AccountId,
    run: &str,
    goal: &str,
    toolsets: &[&str],
    budget_cu: u64,
) -> Value {
    let account = ledger
        .create_account(&format!("agent:{}:{run}", alice.0), AccountKind::Agent)
        .unwrap()
        .wait()
        .unwrap();
    Books::give(
        ledger,
        stipend_ledger::TransferId::random(),
        alice,
        account,
        budget_cu,
    )
    .unwrap();
    json!({
        "t": "start",
        "person": alice.0,
        "account": account.0,
        "goal": goal,
        "model": "script",
        "budget_cu": budget_cu,
        "max_steps": 8,
        "toolsets": toolsets,
        "created_at": "2026-12-05T00:00:00Z",
    })
}
