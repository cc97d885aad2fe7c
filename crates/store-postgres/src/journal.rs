//! Agent runs' journals in the shared database. Several servers share it, and each runs its own
//! runs: a journal is kept under its server's name (`owner`), which that server reads back when
//! it starts again.

use std::sync::Arc;

use stipend_ledger::{JournalRecord, RunJournal, StoreError};

use crate::{PostgresStore, pg};

/// One server's runs' journals.
pub struct PostgresJournal {
    store: Arc<PostgresStore>,
    owner: String,
}

impl PostgresJournal {
    /// The journals of the runs of the server called `owner` (the same name after a restart).
    pub fn new(store: Arc<PostgresStore>, owner: String) -> PostgresJournal {
        PostgresJournal { store, owner }
    }
}

impl RunJournal for PostgresJournal {
    fn journal_append(&self, records: &[JournalRecord]) -> Result<(), StoreError> {
        let owner = self.owner.clone();
        let runs: Vec<String> = records.iter().map(|record| record.run.clone()).collect();
        let seqs: Vec<i64> = records.iter().map(|record| record.seq as i64).collect();
        let bodies: Vec<Vec<u8>> = records.iter().map(|record| record.record.clone()).collect();
        // One statement: all or none.
        self.store.read(move |client| {
            Box::pin(async move {
                client
                    .execute(
                        "INSERT INTO agent_journal (owner, run, seq, record)
                         SELECT $1, * FROM UNNEST($2::text[], $3::bigint[], $4::bytea[])",
                        &[&owner, &runs, &seqs, &bodies],
                    )
                    .await
                    .map_err(pg)?;
                Ok(())
            })
        })
    }

    fn journal_load(&self) -> Result<Vec<JournalRecord>, StoreError> {
        let owner = self.owner.clone();
        self.store.read(move |client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        "SELECT run, seq, record FROM agent_journal WHERE owner = $1
                         ORDER BY run, seq",
                        &[&owner],
                    )
                    .await
                    .map_err(pg)?;
                Ok(rows
                    .iter()
                    .map(|row| JournalRecord {
                        run: row.get(0),
                        seq: row.get::<_, i64>(1) as u64,
                        record: row.get(2),
                    })
                    .collect())
            })
        })
    }

    fn journal_delete(&self, run: &str) -> Result<(), StoreError> {
        let (owner, run) = (self.owner.clone(), run.to_string());
        self.store.read(move |client| {
            Box::pin(async move {
                client
                    .execute(
                        "DELETE FROM agent_journal WHERE owner = $1 AND run = $2",
                        &[&owner, &run],
                    )
                    .await
                    .map_err(pg)?;
                Ok(())
            })
        })
    }
}
