//! Agent runs under their person's supervision. A person starts a run with a goal, a model, a
//! budget cap and the toolsets it may use; the cap moves from the person to an account of the
//! run's own (kind agent), so the ledger itself keeps the run within it, and what is left goes
//! back when the run ends. Each step is a model call through the gateway's `Call`, in-process,
//! charged to the run's account and queued as its person (a thousand agents get their person's
//! share, not a thousand shares); each tool call the model makes is run, refused, or put to the
//! person first, by its policy. The person sees and steers the run, pauses, resumes or stops
//! it, and decides what it asks.
//!
//! The transcript (the messages and tool results) belongs to the run's person: it is kept only
//! with the run, shown only to that person, and never logged.

mod journal;
pub mod limits;
mod mcp;
pub mod routes;
mod run;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use stipend_gateway::Gateway;
use stipend_ledger::{AccountId, AccountKind, Books, LedgerError, RunJournal, TransferId};
use tokio::sync::{broadcast, oneshot, watch};

pub use mcp::{Policy, ToolError, ToolsetConfig, bounded};

/// The operator's settings for agents.
#[derive(Debug, Clone)]
pub struct AgentsOptions {
    /// The toolsets runs may use.
    pub toolsets: Vec<ToolsetConfig>,
    /// The policy of a tool nothing else gives one.
    pub default_policy: Policy,
    /// The longest a tool call may take.
    pub tool_timeout: Duration,
    /// The longest a toolset's server may take to start and list its tools.
    pub toolset_start_timeout: Duration,
    /// The most bytes of a tool's output the model sees.
    pub tool_output_bytes_max: usize,
    /// Steps a run takes when it does not say.
    pub max_steps_default: u32,
    /// The most steps a run may ask for.
    pub max_steps_max: u32,
    /// `max_tokens` of each model call.
    pub step_max_tokens: u64,
    /// Where runs get their working directories.
    pub workdir_root: PathBuf,
    /// The most runs one person may have that have not ended.
    pub active_runs_per_person_max: usize,
    /// The most runs one person may have kept, ended or not (each keeps its transcript until
    /// it is deleted).
    pub kept_runs_per_person_max: usize,
}

impl AgentsOptions {
    /// The defaults, with runs' directories under `workdir_root`.
    pub fn new(workdir_root: PathBuf) -> AgentsOptions {
        AgentsOptions {
            toolsets: Vec::new(),
            default_policy: Policy::Ask,
            tool_timeout: limits::TOOL_TIMEOUT_DEFAULT,
            toolset_start_timeout: limits::TOOLSET_START_TIMEOUT_DEFAULT,
            tool_output_bytes_max: limits::TOOL_OUTPUT_BYTES_DEFAULT,
            max_steps_default: limits::MAX_STEPS_DEFAULT,
            max_steps_max: limits::MAX_STEPS_MAX,
            step_max_tokens: limits::STEP_MAX_TOKENS_DEFAULT,
            workdir_root,
            active_runs_per_person_max: limits::ACTIVE_RUNS_PER_PERSON_DEFAULT,
            kept_runs_per_person_max: limits::KEPT_RUNS_PER_PERSON_DEFAULT,
        }
    }
}

/// A run's state, as its person sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Working: calling the model or a tool.
    Running,
    /// Waiting for its person to decide what it asked.
    WaitingForApproval,
    /// Paused by its person; it goes on when resumed.
    Paused,
    /// The model answered without asking for a tool.
    Done,
    /// Something failed (the model, a toolset); `error` says what.
    Failed,
    /// Stopped by its person, or at its `max_steps`.
    Stopped,
    /// Its budget could not pay for its next step.
    BudgetExhausted,
}

impl State {
    /// Whether the run has ended.
    pub fn ended(self) -> bool {
        matches!(
            self,
            State::Done | State::Failed | State::Stopped | State::BudgetExhausted
        )
    }
}

/// What a person decided about an approval.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Run the tool, with these arguments if given (edited).
    Approve(Option<Map<String, Value>>),
    /// Run it, and this tool without asking for the rest of the run.
    ApproveForRun(Option<Map<String, Value>>),
    /// Do not run it; the model is told the reason.
    Deny(String),
}

/// One step of a run, as its person sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    /// `model` (a model call) or `tool` (a tool call).
    pub kind: String,
    /// The tool (`toolset__tool`), for a tool step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// The arguments it ran with (after any edit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<Value>,
    /// How it went: `auto`, `approved`, `approved_for_run`, `denied`, `refused_by_policy`, or
    /// for a model step `answered` / `asked_for_tools`.
    pub outcome: String,
    /// A short summary of the tool's result, or of the model's answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// cu charged for the step (model steps).
    pub cu: u64,
}

/// A pending approval, as its person sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Approval {
    /// Its id.
    pub id: String,
    /// The run that asks.
    pub run_id: String,
    /// The tool (`toolset__tool`).
    pub tool: String,
    /// The arguments the model gave.
    pub arguments: Value,
    /// When it was asked (RFC 3339).
    pub created_at: String,
}

/// A run as its person sees it.
#[derive(Debug, Clone, Serialize)]
pub struct RunView {
    /// Its id.
    pub id: String,
    /// Its state.
    pub state: State,
    /// The goal it was given.
    pub goal: String,
    /// The model it calls.
    pub model: String,
    /// Its budget cap.
    pub budget_cu: u64,
    /// What it spent so far.
    pub spent_cu: u64,
    /// Its steps so far.
    pub steps: Vec<Step>,
    /// The most steps it may take.
    pub max_steps: u32,
    /// The toolsets it may use.
    pub toolsets: Vec<String>,
    /// Its final answer, once done.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// What it waits for, if it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
    /// Why it ended, if it failed or was stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
    /// When it started (RFC 3339).
    pub created_at: String,
}

/// What a person asks for when starting a run.
#[derive(Debug, Clone)]
pub struct StartRequest {
    /// What the run is to do.
    pub goal: String,
    /// The model to call.
    pub model: String,
    /// The cap, in cu, moved from the person to the run.
    pub budget_cu: u64,
    /// The toolsets it may use.
    pub toolsets: Vec<String>,
    /// The most steps (model calls) it may take.
    pub max_steps: Option<u32>,
}

/// Why an agents request was refused.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// 400: the request is wrong; `param` names the field.
    #[error("{message}")]
    Invalid {
        /// What is wrong.
        message: String,
        /// The field.
        param: Option<&'static str>,
    },
    /// 404: no such run or approval for this person.
    #[error("no {0} with that id")]
    NotFound(&'static str),
    /// 409: the run or approval is not in a state that allows it.
    #[error("{0}")]
    Conflict(String),
    /// 429: the person has too many runs going, or too little for the cap.
    #[error("{message}")]
    Quota {
        /// What is short.
        message: String,
        /// `insufficient_quota` or `rate_limit_exceeded`.
        code: &'static str,
    },
    /// 503 / 500: the ledger refused or failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// A run's mutable part, under its lock.
pub(crate) struct RunInner {
    pub state: State,
    pub spent_cu: u64,
    pub steps: Vec<Step>,
    pub answer: Option<String>,
    pub error: Option<Value>,
    pub pending: Option<(Approval, oneshot::Sender<Decision>)>,
    pub approved_tools: HashSet<String>,
    /// Approvals asked so far (the next one's number).
    pub approvals_asked: u64,
    pub steers: Vec<String>,
    /// The messages so far: the transcript, the person's alone.
    pub messages: Vec<Value>,
    /// The next journal record's number.
    pub journal_seq: u64,
    /// Read back from the journal: tool calls put to the person and not yet decided, by call
    /// id (asked again with the same approval after a restart).
    pub asked: HashMap<String, Approval>,
    /// Read back: decisions made and not yet acted on, by call id.
    pub decided: HashMap<String, journal::Decided>,
    /// Read back: tool calls started, by call id (one without a result ran at most partly).
    pub started: HashSet<String>,
    /// Read back: a model call was under way when the server stopped.
    pub interrupted: bool,
    /// What was left of the budget went back.
    pub returned: bool,
}

impl RunInner {
    fn new(goal: &str) -> RunInner {
        RunInner {
            state: State::Running,
            spent_cu: 0,
            steps: Vec::new(),
            answer: None,
            error: None,
            pending: None,
            approved_tools: HashSet::new(),
            approvals_asked: 0,
            steers: Vec::new(),
            messages: vec![json!({"role": "user", "content": goal})],
            journal_seq: 0,
            asked: HashMap::new(),
            decided: HashMap::new(),
            started: HashSet::new(),
            interrupted: false,
            returned: false,
        }
    }
}

/// One run.
pub(crate) struct Run {
    pub id: String,
    pub person: AccountId,
    pub account: AccountId,
    pub goal: String,
    pub model: String,
    pub budget_cu: u64,
    pub max_steps: u32,
    pub toolsets: Vec<String>,
    pub created_at: String,
    pub inner: Mutex<RunInner>,
    /// Paused (true) or not; the loop waits on it between steps.
    pub paused: watch::Sender<bool>,
    /// Set when the person stops the run.
    pub stop: watch::Sender<bool>,
    /// Steps and state changes as they happen (the events stream).
    pub events: broadcast::Sender<Value>,
}

impl Run {
    pub(crate) fn view(&self) -> RunView {
        let inner = self.inner.lock();
        RunView {
            id: self.id.clone(),
            state: inner.state,
            goal: self.goal.clone(),
            model: self.model.clone(),
            budget_cu: self.budget_cu,
            spent_cu: inner.spent_cu,
            steps: inner.steps.clone(),
            max_steps: self.max_steps,
            toolsets: self.toolsets.clone(),
            answer: inner.answer.clone(),
            approval: inner.pending.as_ref().map(|(approval, _)| approval.clone()),
            error: inner.error.clone(),
            created_at: self.created_at.clone(),
        }
    }

    /// Tells whoever watches the run's events.
    pub(crate) fn publish(&self, event: Value) {
        let _ = self.events.send(event);
    }

    pub(crate) fn set_state(&self, state: State) {
        {
            let mut inner = self.inner.lock();
            if inner.state == state || inner.state.ended() {
                return;
            }
            inner.state = state;
        }
        self.publish(json!({"type": "state", "state": state}));
    }
}

/// Every run on this server.
pub struct Agents {
    pub(crate) gateway: Arc<Gateway>,
    pub(crate) books: Arc<dyn Books>,
    pub(crate) options: AgentsOptions,
    pub(crate) runs: Mutex<BTreeMap<String, Arc<Run>>>,
    /// Where runs are journaled; without one, runs live in memory and end with the server.
    pub(crate) journal: Option<journal::Journal>,
    /// The shared toolsets' servers, started at their first use.
    pub(crate) shared: tokio::sync::Mutex<HashMap<String, Arc<mcp::Toolset>>>,
}

impl Agents {
    /// Agents on `gateway` (its models, keys and budget), moving caps with `books`, whose runs
    /// live in memory only.
    pub fn new(
        gateway: Arc<Gateway>,
        books: Arc<dyn Books>,
        options: AgentsOptions,
    ) -> Arc<Agents> {
        Arc::new(Agents {
            gateway,
            books,
            options,
            runs: Mutex::new(BTreeMap::new()),
            journal: None,
            shared: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Agents whose runs are journaled in `store` (the ledger's), so that they outlive their
    /// server: call [`Agents::resume`] before serving.
    pub fn with_journal(
        gateway: Arc<Gateway>,
        books: Arc<dyn Books>,
        options: AgentsOptions,
        store: Arc<dyn RunJournal>,
    ) -> std::io::Result<Arc<Agents>> {
        Ok(Arc::new(Agents {
            gateway,
            books,
            options,
            runs: Mutex::new(BTreeMap::new()),
            journal: Some(journal::Journal::start(store)?),
            shared: tokio::sync::Mutex::new(HashMap::new()),
        }))
    }

    /// A shared toolset's server, started at its first use (in the runs' root directory) and
    /// kept; one that has stopped is started again.
    pub(crate) async fn shared_toolset(
        &self,
        config: &ToolsetConfig,
    ) -> Result<Arc<mcp::Toolset>, ToolError> {
        let mut shared = self.shared.lock().await;
        if let Some(toolset) = shared.get(&config.name)
            && !toolset.closed()
        {
            return Ok(Arc::clone(toolset));
        }
        std::fs::create_dir_all(&self.options.workdir_root).map_err(|error| ToolError::Start {
            toolset: config.name.clone(),
            reason: format!("{}: {error}", self.options.workdir_root.display()),
        })?;
        let toolset = Arc::new(
            mcp::Toolset::start(
                config,
                &self.options.workdir_root,
                self.options.default_policy,
                self.options.toolset_start_timeout,
            )
            .await?,
        );
        shared.insert(config.name.clone(), Arc::clone(&toolset));
        Ok(toolset)
    }

    /// Journals `entries` for `run` (durably), if runs are journaled.
    pub(crate) async fn write(
        &self,
        run: &Run,
        entries: Vec<journal::Entry>,
    ) -> Result<(), String> {
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        let first = {
            let mut inner = run.inner.lock();
            let first = inner.journal_seq;
            inner.journal_seq += entries.len() as u64;
            first
        };
        journal.append(&run.id, first, &entries).await
    }

    /// Reads every journaled run back and sets those that had not ended going again, where
    /// they were: a pending approval waits again (same id), a tool call started but not
    /// finished is run again when its policy is auto and asked again when it is ask, a model
    /// call cut off by the stop is not made again (it may have been charged: the run ends
    /// `failed`). Runs that ended keep their view; what an ended run still held goes back.
    /// Returns how many runs go on.
    pub async fn resume(self: &Arc<Agents>) -> Result<usize, AgentError> {
        let Some(journal) = &self.journal else {
            return Ok(0);
        };
        let loaded = journal
            .load()
            .map_err(|error| AgentError::Ledger(LedgerError::Store(error)))?;
        let mut going = 0;
        for (id, entries) in loaded {
            let Some(run) = replay(&id, entries) else {
                tracing::error!(run = %id, "a run's journal does not begin with its start; left as it is");
                continue;
            };
            let run = Arc::new(run);
            self.runs.lock().insert(id, Arc::clone(&run));
            let (ended, returned) = {
                let inner = run.inner.lock();
                (inner.state.ended(), inner.returned)
            };
            if !ended {
                going += 1;
                tokio::spawn(run::drive(Arc::clone(self), run));
            } else if !returned {
                tokio::spawn(run::give_back(Arc::clone(self), run));
            }
        }
        Ok(going)
    }

    /// The gateway the runs call models through.
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Starts a run for `person`: checks the request, moves the cap to a new agent account, and
    /// sets the run going.
    pub fn start(
        self: &Arc<Agents>,
        person: AccountId,
        request: StartRequest,
    ) -> Result<RunView, AgentError> {
        let invalid = |message: String, param: &'static str| AgentError::Invalid {
            message,
            param: Some(param),
        };
        if request.goal.trim().is_empty() {
            return Err(invalid(
                "`goal` must say what the run is to do".into(),
                "goal",
            ));
        }
        if request.goal.len() > limits::MESSAGE_BYTES_MAX {
            return Err(invalid("`goal` is longer than 64 KiB".into(), "goal"));
        }
        if !self.gateway.models.contains_key(&request.model) {
            return Err(invalid(
                format!(
                    "there is no model {:?} (GET /v1/models lists them)",
                    request.model
                ),
                "model",
            ));
        }
        if request.budget_cu == 0 {
            return Err(invalid(
                "`budget_cu` must be at least 1".into(),
                "budget_cu",
            ));
        }
        let mut seen = HashSet::new();
        for name in &request.toolsets {
            if !self
                .options
                .toolsets
                .iter()
                .any(|toolset| &toolset.name == name)
            {
                let known: Vec<&str> = self
                    .options
                    .toolsets
                    .iter()
                    .map(|toolset| toolset.name.as_str())
                    .collect();
                return Err(invalid(
                    format!("there is no toolset {name:?}; this server has {known:?}"),
                    "toolsets",
                ));
            }
            if !seen.insert(name) {
                return Err(invalid(
                    format!("toolset {name:?} is named twice"),
                    "toolsets",
                ));
            }
        }
        let max_steps = request.max_steps.unwrap_or(self.options.max_steps_default);
        if max_steps == 0 || max_steps > self.options.max_steps_max {
            return Err(invalid(
                format!(
                    "`max_steps` must be from 1 to {}",
                    self.options.max_steps_max
                ),
                "max_steps",
            ));
        }
        let (kept, active) = self
            .runs
            .lock()
            .values()
            .filter(|run| run.person == person)
            .fold((0, 0), |(kept, active), run| {
                let going = !run.inner.lock().state.ended();
                (kept + 1, active + usize::from(going))
            });
        if active >= self.options.active_runs_per_person_max {
            return Err(AgentError::Quota {
                message: format!(
                    "You have {active} runs going, the most this server allows; stop or wait for one."
                ),
                code: "rate_limit_exceeded",
            });
        }
        // Ended runs are kept, transcripts and all, until their person deletes them: bounded, so
        // that nobody can fill the server's memory with them.
        if kept >= self.options.kept_runs_per_person_max {
            return Err(AgentError::Quota {
                message: format!(
                    "You keep {kept} runs, the most this server allows; delete some you no longer need (DELETE /v1/agents/{{id}})."
                ),
                code: "rate_limit_exceeded",
            });
        }
        let id = format!("run_{:032x}", TransferId::random().0);
        // Named for its person, for the operator's listings.
        let account = self
            .books
            .create_account(&agent_account_name(person, &id), AccountKind::Agent)?;
        let (events, _) = broadcast::channel(limits::EVENTS_BUFFERED);
        let run = Arc::new(Run {
            id: id.clone(),
            person,
            account,
            goal: request.goal.clone(),
            model: request.model,
            budget_cu: request.budget_cu,
            max_steps,
            toolsets: request.toolsets,
            created_at: stipend_ledger::units::format_utc(self.books.now_ms()),
            inner: Mutex::new(RunInner::new(&request.goal)),
            paused: watch::Sender::new(false),
            stop: watch::Sender::new(false),
            events,
        });
        // Journaled before the cap moves, so that no compute can sit in an account no journal
        // knows: a run read back whose cap never moved ends at its first step, having spent
        // nothing.
        let journaled = tokio::runtime::Handle::current().block_on(self.write(
            &run,
            vec![journal::Entry::Start {
                person: person.0,
                account: account.0,
                goal: run.goal.clone(),
                model: run.model.clone(),
                budget_cu: run.budget_cu,
                max_steps: run.max_steps,
                toolsets: run.toolsets.clone(),
                created_at: run.created_at.clone(),
            }],
        ));
        if let Err(reason) = journaled {
            tracing::error!(%reason, "a run could not be journaled");
            return Err(AgentError::Ledger(LedgerError::Unavailable { reason }));
        }
        // The cap moves to the run: the ledger then keeps the run within it.
        let moved = self
            .books
            .give(TransferId::random(), person, account, request.budget_cu);
        if let Err(error) = moved {
            if let Some(journal) = &self.journal
                && let Err(error) = journal.delete(&id)
            {
                tracing::error!(%error, run = %id, "a run that never began could not be unjournaled");
            }
            return Err(match error {
                LedgerError::InsufficientBalance { available_cu, .. } => AgentError::Quota {
                    message: format!(
                        "The budget of {} cu is more than you have available ({available_cu} cu).",
                        request.budget_cu
                    ),
                    code: "insufficient_quota",
                },
                other => other.into(),
            });
        }
        self.runs.lock().insert(id, Arc::clone(&run));
        let view = run.view();
        tokio::spawn(run::drive(Arc::clone(self), run));
        Ok(view)
    }

    /// A run of `person`'s.
    pub(crate) fn run_of(&self, person: AccountId, id: &str) -> Result<Arc<Run>, AgentError> {
        self.runs
            .lock()
            .get(id)
            .filter(|run| run.person == person)
            .cloned()
            .ok_or(AgentError::NotFound("run"))
    }

    /// `person`'s runs, newest first.
    pub fn list(&self, person: AccountId) -> Vec<RunView> {
        let runs: Vec<Arc<Run>> = self
            .runs
            .lock()
            .values()
            .filter(|run| run.person == person)
            .cloned()
            .collect();
        let mut views: Vec<RunView> = runs.iter().map(|run| run.view()).collect();
        views.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        views
    }

    /// One of `person`'s runs.
    pub fn show(&self, person: AccountId, id: &str) -> Result<RunView, AgentError> {
        Ok(self.run_of(person, id)?.view())
    }

    /// A run's events from now on: steps and state changes.
    pub fn events(
        &self,
        person: AccountId,
        id: &str,
    ) -> Result<(RunView, broadcast::Receiver<Value>), AgentError> {
        let run = self.run_of(person, id)?;
        let receiver = run.events.subscribe();
        Ok((run.view(), receiver))
    }

    /// A message the model sees at the run's next step; journaled before it is taken, so that
    /// it outlives a restart.
    pub async fn steer(
        &self,
        person: AccountId,
        id: &str,
        message: String,
    ) -> Result<RunView, AgentError> {
        let run = self.run_of(person, id)?;
        if message.trim().is_empty() || message.len() > limits::MESSAGE_BYTES_MAX {
            return Err(AgentError::Invalid {
                message: "`message` must be 1 byte to 64 KiB".to_string(),
                param: Some("message"),
            });
        }
        ended_conflict(&run)?;
        self.write(
            &run,
            vec![journal::Entry::Steer {
                message: message.clone(),
            }],
        )
        .await
        .map_err(|reason| AgentError::Ledger(LedgerError::Unavailable { reason }))?;
        run.inner.lock().steers.push(message);
        Ok(run.view())
    }

    /// Pauses a run (between steps) or resumes it; journaled before it is taken.
    pub async fn pause(
        &self,
        person: AccountId,
        id: &str,
        pause: bool,
    ) -> Result<RunView, AgentError> {
        let run = self.run_of(person, id)?;
        ended_conflict(&run)?;
        self.write(&run, vec![journal::Entry::Paused { paused: pause }])
            .await
            .map_err(|reason| AgentError::Ledger(LedgerError::Unavailable { reason }))?;
        run.paused.send_replace(pause);
        if pause {
            let waiting = run.inner.lock().state == State::WaitingForApproval;
            if !waiting {
                run.set_state(State::Paused);
            }
        } else if run.inner.lock().state == State::Paused {
            run.set_state(State::Running);
        }
        Ok(run.view())
    }

    /// Stops a run: it ends at once (a tool call under way is abandoned), and what is left of
    /// its budget goes back.
    pub fn stop(&self, person: AccountId, id: &str) -> Result<RunView, AgentError> {
        let run = self.run_of(person, id)?;
        if run.inner.lock().state.ended() {
            return Ok(run.view());
        }
        run.stop.send_replace(true);
        Ok(run.view())
    }

    /// Deletes a run, its transcript and its working directory; a run still going is stopped
    /// first.
    pub async fn delete(&self, person: AccountId, id: &str) -> Result<(), AgentError> {
        let run = self.run_of(person, id)?;
        run.stop.send_replace(true);
        // The loop ends within its current step's bound; wait for it to have given the budget
        // back before the run is forgotten.
        let mut ended = run.events.subscribe();
        while !run.inner.lock().state.ended() {
            let _ = tokio::time::timeout(Duration::from_millis(100), ended.recv()).await;
        }
        self.runs.lock().remove(id);
        if let Some(journal) = &self.journal
            && let Err(error) = journal.delete(id)
        {
            tracing::error!(%error, run = %id, "a deleted run's journal could not be removed");
        }
        // What its tools wrote goes with it.
        let workdir = self.options.workdir_root.join(id);
        if workdir.exists()
            && let Err(error) = std::fs::remove_dir_all(&workdir)
        {
            tracing::warn!(%error, run = %id, "a deleted run's working directory could not be removed");
        }
        Ok(())
    }

    /// `person`'s pending approvals, across their runs.
    pub fn approvals(&self, person: AccountId) -> Vec<Approval> {
        let runs: Vec<Arc<Run>> = self
            .runs
            .lock()
            .values()
            .filter(|run| run.person == person)
            .cloned()
            .collect();
        let mut approvals: Vec<Approval> = runs
            .iter()
            .filter_map(|run| run.inner.lock().pending.as_ref().map(|(a, _)| a.clone()))
            .collect();
        approvals.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        approvals
    }

    /// Decides one of `person`'s approvals; an approval is decided once (a second time is a
    /// conflict).
    pub fn decide(
        &self,
        person: AccountId,
        approval_id: &str,
        decision: Decision,
    ) -> Result<RunView, AgentError> {
        let run_id = approval_id
            .strip_prefix("appr_")
            .and_then(|rest| rest.split_once('_'))
            .map(|(run, _)| format!("run_{run}"))
            .ok_or(AgentError::NotFound("approval"))?;
        let run = self
            .run_of(person, &run_id)
            .map_err(|_| AgentError::NotFound("approval"))?;
        let sender = {
            let mut inner = run.inner.lock();
            match &inner.pending {
                Some((approval, _)) if approval.id == approval_id => {
                    inner.pending.take().map(|(_, sender)| sender)
                }
                _ => {
                    let asked_before = approval_id
                        .rsplit('_')
                        .next()
                        .and_then(|n| n.parse::<u64>().ok())
                        .is_some_and(|n| n < inner.approvals_asked);
                    return Err(if asked_before {
                        AgentError::Conflict("this approval was already decided".to_string())
                    } else {
                        AgentError::NotFound("approval")
                    });
                }
            }
        };
        if let Some(sender) = sender {
            let _ = sender.send(decision);
        }
        Ok(run.view())
    }
}

/// A conflict if the run has ended.
fn ended_conflict(run: &Run) -> Result<(), AgentError> {
    let state = run.inner.lock().state;
    if state.ended() {
        return Err(AgentError::Conflict(format!(
            "the run has ended ({})",
            json!(state)
        )));
    }
    Ok(())
}

/// A run rebuilt from its journal; `None` if the journal does not begin with its start.
fn replay(id: &str, entries: Vec<journal::Entry>) -> Option<Run> {
    use journal::{Decided, Entry};
    let mut entries = entries.into_iter();
    let Some(Entry::Start {
        person,
        account,
        goal,
        model,
        budget_cu,
        max_steps,
        toolsets,
        created_at,
    }) = entries.next()
    else {
        return None;
    };
    let mut inner = RunInner::new(&goal);
    inner.journal_seq = 1;
    let mut paused = false;
    for entry in entries {
        inner.journal_seq += 1;
        match entry {
            Entry::Start { .. } => {}
            Entry::ModelCall => inner.interrupted = true,
            Entry::Message { message } => {
                if message["role"] == "assistant" {
                    inner.interrupted = false;
                }
                // A steer taken into the transcript is no longer waiting.
                if message["role"] == "user" && !inner.steers.is_empty() {
                    inner.steers.remove(0);
                }
                inner.messages.push(message);
            }
            Entry::Steer { message } => inner.steers.push(message),
            Entry::Step { step } => {
                if step.kind == "model" {
                    inner.spent_cu += step.cu;
                }
                inner.steps.push(step);
            }
            Entry::Asked { approval, call_id } => {
                inner.approvals_asked += 1;
                inner.asked.insert(call_id, approval);
            }
            Entry::Decided {
                call_id, decision, ..
            } => {
                if let (Some(approval), Decided::ApproveForRun { .. }) =
                    (inner.asked.get(&call_id), &decision)
                {
                    let tool = approval.tool.clone();
                    inner.approved_tools.insert(tool);
                }
                inner.asked.remove(&call_id);
                inner.decided.insert(call_id, decision);
            }
            Entry::ToolStarted { call_id } => {
                inner.started.insert(call_id);
            }
            Entry::Paused { paused: now } => paused = now,
            Entry::Ended {
                state,
                error,
                answer,
            } => {
                inner.state = state;
                inner.error = error;
                inner.answer = answer;
            }
            Entry::Returned => inner.returned = true,
        }
    }
    if paused && !inner.state.ended() {
        inner.state = State::Paused;
    }
    let (events, _) = broadcast::channel(limits::EVENTS_BUFFERED);
    Some(Run {
        id: id.to_string(),
        person: AccountId(person),
        account: AccountId(account),
        goal,
        model,
        budget_cu,
        max_steps,
        toolsets,
        created_at,
        inner: Mutex::new(inner),
        paused: watch::Sender::new(paused),
        stop: watch::Sender::new(false),
        events,
    })
}

/// The name of a run's account: `agent:<person's id>:<run id>`.
/// The person a run's journal belongs to, from its first record (`Store::journal_starts`).
pub fn journaled_person(first_record: &[u8]) -> Option<AccountId> {
    match serde_json::from_slice(first_record).ok()? {
        journal::Entry::Start { person, .. } => Some(AccountId(person)),
        _ => None,
    }
}

/// The start of every agent account name of `person`'s runs (`agent:<person id>:`).
pub fn agent_account_prefix(person: AccountId) -> String {
    format!("agent:{}:", person.0)
}

fn agent_account_name(person: AccountId, run: &str) -> String {
    format!("{}{run}", agent_account_prefix(person))
}
