//! Runs' journals in the ledger's store: each step is written (durably) before it is acted on,
//! so that after a restart, or a kill, a run goes on where it was. Appends from every run are
//! committed many to a transaction by one writer thread, as the ledger's own changes are.
//!
//! What is written is the run's person's own (its goal, the model's messages, tool results):
//! kept for that run only, read back only to rebuild it, and deleted with it.

use std::sync::Arc;
use std::sync::mpsc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use stipend_ledger::{JournalRecord, RunJournal, StoreError};
use tokio::sync::oneshot;

use crate::{Approval, State, Step};

/// One record of a run's journal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub(crate) enum Entry {
    /// The run began: who, what, and with how much.
    Start {
        person: u64,
        account: u64,
        goal: String,
        model: String,
        budget_cu: u64,
        max_steps: u32,
        toolsets: Vec<String>,
        created_at: String,
    },
    /// A model call is about to be made: if the server stops before its answer is written,
    /// the call may have been charged, and it is not made again.
    ModelCall,
    /// A message added to the transcript: the model's, a tool's result, or a steer.
    Message { message: Value },
    /// A step, as its person sees it.
    Step { step: Step },
    /// A tool call was put to the person.
    Asked { approval: Approval, call_id: String },
    /// The person decided it.
    Decided {
        approval_id: String,
        call_id: String,
        decision: Decided,
    },
    /// A tool call was started (its result follows as a message).
    ToolStarted { call_id: String },
    /// Paused (true) or resumed, by its person.
    Paused { paused: bool },
    /// A message from its person for the model's next step (a `Message` when it is taken).
    Steer { message: String },
    /// The run ended.
    Ended {
        state: State,
        error: Option<Value>,
        answer: Option<String>,
    },
    /// What was left of its budget went back to its person.
    Returned,
}

/// A decision as journaled.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub(crate) enum Decided {
    Approve {
        arguments: Option<serde_json::Map<String, Value>>,
    },
    ApproveForRun {
        arguments: Option<serde_json::Map<String, Value>>,
    },
    Deny {
        reason: String,
    },
}

type Reply = oneshot::Sender<Result<(), String>>;

/// The journal's writer.
pub(crate) struct Journal {
    store: Arc<dyn RunJournal>,
    queue: mpsc::Sender<(Vec<JournalRecord>, Reply)>,
}

impl Journal {
    /// A writer thread for `store`.
    pub(crate) fn start(store: Arc<dyn RunJournal>) -> std::io::Result<Journal> {
        let (queue, receiver) = mpsc::channel::<(Vec<JournalRecord>, Reply)>();
        let writer = Arc::clone(&store);
        std::thread::Builder::new()
            .name("agents-journal".to_string())
            .spawn(move || {
                while let Ok(first) = receiver.recv() {
                    let mut batch = vec![first];
                    while let Ok(next) = receiver.try_recv() {
                        batch.push(next);
                        if batch.len() >= crate::limits::JOURNAL_BATCH_MAX {
                            break;
                        }
                    }
                    let records: Vec<JournalRecord> = batch
                        .iter()
                        .flat_map(|(records, _)| records.iter().cloned())
                        .collect();
                    let result = writer
                        .journal_append(&records)
                        .map_err(|error| error.to_string());
                    for (_, reply) in batch {
                        let _ = reply.send(result.clone());
                    }
                }
            })?;
        Ok(Journal { store, queue })
    }

    /// Writes `entries` as records `first..` of `run`; returns once they are durable.
    pub(crate) async fn append(
        &self,
        run: &str,
        first: u64,
        entries: &[Entry],
    ) -> Result<(), String> {
        let records = entries
            .iter()
            .enumerate()
            .map(|(index, entry)| {
                serde_json::to_vec(entry)
                    .map(|record| JournalRecord {
                        run: run.to_string(),
                        seq: first + index as u64,
                        record,
                    })
                    .map_err(|error| error.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (reply, done) = oneshot::channel();
        self.queue
            .send((records, reply))
            .map_err(|_| "the journal's writer is gone".to_string())?;
        done.await
            .map_err(|_| "the journal's writer is gone".to_string())?
    }

    /// Every run's entries, in order, by run.
    pub(crate) fn load(&self) -> Result<Vec<(String, Vec<Entry>)>, StoreError> {
        let mut runs: Vec<(String, Vec<Entry>)> = Vec::new();
        for record in self.store.journal_load()? {
            let entry: Entry = serde_json::from_slice(&record.record).map_err(|error| {
                StoreError::Corrupt(format!(
                    "run {}'s journal record {}: {error}",
                    record.run, record.seq
                ))
            })?;
            match runs.last_mut() {
                Some((run, entries)) if *run == record.run => entries.push(entry),
                _ => runs.push((record.run, vec![entry])),
            }
        }
        Ok(runs)
    }

    /// Forgets a run's journal.
    pub(crate) fn delete(&self, run: &str) -> Result<(), StoreError> {
        self.store.journal_delete(run)
    }
}
