//! The PostgreSQL store on a real server of the tests' own: what a commit writes reads back the
//! same, a failed batch writes nothing, one writer at a time, migrations run once however many
//! start together, and reads survive a server restart.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::OnceLock;

use stipend_ledger::{
    AccountId, AccountKind, AccountRecord, AccountUpdate, Batch, KeyRecord, Lot, LotSource, Store,
    StoreError, Transfer, TransferId, TransferKind, account_name_skeleton,
};
use stipend_store_postgres::PostgresStore;
use stipend_store_postgres::test_server::TestServer;

fn server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| TestServer::start().unwrap())
}

fn record(id: u64, name: &str) -> AccountRecord {
    AccountRecord {
        id: AccountId(id),
        name: name.to_string(),
        kind: AccountKind::Person,
        balance_cu: 0,
        lots: Vec::new(),
        stipend_period: None,
        usage: Vec::new(),
        created_at_ms: 1,
    }
}

fn gift(id: u128, amount_cu: u64) -> Transfer {
    Transfer {
        id: TransferId(id),
        kind: TransferKind::Gift,
        debit: AccountId(1),
        credit: AccountId(2),
        amount_cu,
        created_at_ms: 9,
        lot_expires_at_ms: None,
        period: None,
    }
}

#[test]
fn commits_read_back_the_same_and_survive_reopen() {
    let url = server().fresh_database().unwrap();
    let lot = Lot {
        remaining_cu: 5,
        expires_at_ms: Some(100),
        source: LotSource::Gift,
    };
    {
        let store = PostgresStore::open(&url).unwrap();
        store
            .commit(&Batch {
                created: vec![record(1, "ann"), record(2, "Bo")],
                transfers: vec![
                    gift(42, 5),
                    Transfer {
                        id: TransferId(43),
                        kind: TransferKind::Spend,
                        amount_cu: 1,
                        ..gift(0, 0)
                    },
                ],
                checkpoint: None,
            })
            .unwrap();
        // A checkpoint covers both transfers; a third comes after it.
        store
            .commit(&Batch {
                created: Vec::new(),
                transfers: vec![gift(44, 2)],
                checkpoint: Some(vec![AccountUpdate {
                    id: AccountId(2),
                    kind: AccountKind::Person,
                    balance_cu: 5,
                    lots: vec![lot],
                    stipend_period: Some(7),
                    usage: Vec::new(),
                }]),
            })
            .unwrap();
        store
            .commit(&Batch {
                transfers: vec![gift(45, 3)],
                ..Batch::default()
            })
            .unwrap();
        let key = KeyRecord {
            id: "k1".to_string(),
            account: AccountId(1),
            secret_sha256: [7; 32],
            created_at_ms: 3,
            revoked_at_ms: None,
            cap: None,
            name: None,
        };
        store.insert_key(&key).unwrap();
        assert!(store.revoke_key("k1", 11).unwrap());
        assert!(!store.revoke_key("nope", 11).unwrap());
    }
    let store = PostgresStore::open(&url).unwrap();
    let bo = store.account_by_name("Bo").unwrap().unwrap();
    assert_eq!(
        (bo.balance_cu, bo.lots.clone(), bo.stipend_period),
        (5, vec![lot], Some(7))
    );
    assert_eq!(store.account(AccountId(2)).unwrap(), Some(bo.clone()));
    assert_eq!(
        store
            .account_by_skeleton(&account_name_skeleton("B0B"))
            .unwrap()
            .map(|record| record.name),
        None
    );
    assert_eq!(
        store
            .account_by_skeleton(&account_name_skeleton("b0"))
            .unwrap()
            .map(|record| record.name),
        Some("Bo".to_string())
    );
    assert_eq!(store.account_id_max().unwrap(), Some(AccountId(2)));
    let ids: Vec<u64> = store
        .accounts(Some(AccountId(1)), 10)
        .unwrap()
        .iter()
        .map(|record| record.id.0)
        .collect();
    assert_eq!(ids, [2]);
    assert_eq!(store.transfer(TransferId(42)).unwrap(), Some(gift(42, 5)));
    // Spends are not looked up by id: only caller-chosen ids are.
    assert_eq!(store.transfer(TransferId(43)).unwrap(), None);
    assert_eq!(store.checkpoint_seq().unwrap(), 3);
    let mut tail = Vec::new();
    store
        .transfers_after_checkpoint(&mut |transfer| tail.push(transfer.id.0))
        .unwrap();
    assert_eq!(tail, [45]);
    // An account's history: newest first, spends left out.
    let history: Vec<u128> = store
        .transfers_of(AccountId(2), 10)
        .unwrap()
        .iter()
        .map(|transfer| transfer.id.0)
        .collect();
    assert_eq!(history, [45, 44, 42]);
    let keys = store.keys_of(AccountId(1)).unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].revoked_at_ms, Some(11));
    assert_eq!(store.key("k1").unwrap(), Some(keys[0].clone()));
    // The audit's sums and counts, from one snapshot.
    let mut rows = Vec::new();
    let mut audit_tail = Vec::new();
    let audit = store
        .audit(&mut |row| rows.push(row), &mut |transfer| {
            audit_tail.push(transfer)
        })
        .unwrap();
    assert_eq!((audit.checkpoint_seq, audit.n_transfers), (3, 4));
    assert_eq!((audit.n_self, audit.n_unknown_account), (0, 0));
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[1].credits_cu, rows[1].debits_cu), (8, 0));
    assert_eq!((rows[0].credits_cu, rows[0].debits_cu), (0, 8));
    assert_eq!(audit_tail.len(), 1);
}

#[test]
fn a_failed_batch_writes_nothing() {
    let url = server().fresh_database().unwrap();
    let store = PostgresStore::open(&url).unwrap();
    store
        .commit(&Batch {
            created: vec![record(1, "ann")],
            ..Batch::default()
        })
        .unwrap();
    // The second account's name is taken: the whole batch, transfer included, is refused.
    let error = store
        .commit(&Batch {
            created: vec![record(2, "bo"), record(3, "ann")],
            transfers: vec![gift(50, 1)],
            checkpoint: None,
        })
        .unwrap_err();
    assert!(matches!(error, StoreError::Io(_)), "{error:?}");
    assert_eq!(store.account_by_name("bo").unwrap(), None);
    assert_eq!(store.transfer(TransferId(50)).unwrap(), None);
}

#[test]
fn one_writer_at_a_time_and_readers_beside_it() {
    let url = server().fresh_database().unwrap();
    let writer = PostgresStore::open(&url).unwrap();
    assert!(PostgresStore::is_locked(&url).unwrap());
    match PostgresStore::open(&url) {
        Err(StoreError::Locked { path }) => assert!(path.contains("127.0.0.1"), "{path}"),
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("two writers"),
    }
    let reader = PostgresStore::open_read_only(&url).unwrap();
    writer
        .commit(&Batch {
            created: vec![record(1, "ann")],
            ..Batch::default()
        })
        .unwrap();
    assert!(reader.account_by_name("ann").unwrap().is_some());
    assert!(
        reader
            .commit(&Batch {
                created: vec![record(2, "bo")],
                ..Batch::default()
            })
            .is_err()
    );
    drop(writer);
    assert!(!PostgresStore::is_locked(&url).unwrap());
    PostgresStore::open(&url).unwrap();
}

#[test]
fn nodes_starting_together_migrate_once() {
    let url = server().fresh_database().unwrap();
    let opened: Vec<Result<PostgresStore, StoreError>> = std::thread::scope(|scope| {
        let starts: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| PostgresStore::open(&url)))
            .collect();
        starts
            .into_iter()
            .map(|start| start.join().unwrap())
            .collect()
    });
    // One claims the store; the others find it migrated and claimed, and say so.
    let claimed = opened.iter().filter(|result| result.is_ok()).count();
    assert_eq!(
        claimed,
        1,
        "{:?}",
        opened.iter().map(|r| r.as_ref().err()).collect::<Vec<_>>()
    );
    for result in &opened {
        if let Err(error) = result {
            assert!(matches!(error, StoreError::Locked { .. }), "{error:?}");
        }
    }
}

#[test]
fn a_store_nobody_set_up_is_not_read() {
    let url = server().fresh_database().unwrap();
    let error = PostgresStore::open_read_only(&url).err().unwrap();
    assert!(error.to_string().contains("no Stipend store"), "{error}");
    let error = PostgresStore::open("postgres://stipend@127.0.0.1:1/none")
        .err()
        .unwrap();
    assert!(matches!(error, StoreError::Io(_)), "{error:?}");
    let error = PostgresStore::open("mysql://x").err().unwrap();
    assert!(error.to_string().contains("database_url"), "{error}");
}

#[test]
fn each_servers_run_journals_read_back_in_order_written_once_and_go_with_their_run() {
    use std::sync::Arc;
    use stipend_ledger::{JournalRecord, RunJournal};
    use stipend_store_postgres::PostgresJournal;
    let url = server().fresh_database().unwrap();
    let store = Arc::new(PostgresStore::open_shared(&url).unwrap());
    let one = PostgresJournal::new(Arc::clone(&store), "host:/srv/one".to_string());
    let two = PostgresJournal::new(Arc::clone(&store), "host:/srv/two".to_string());
    let record = |run: &str, seq: u64, text: &str| JournalRecord {
        run: run.to_string(),
        seq,
        record: text.as_bytes().to_vec(),
    };
    one.journal_append(&[
        record("run_b", 0, "b0"),
        record("run_a", 1, "a1"),
        record("run_a", 0, "a0"),
    ])
    .unwrap();
    two.journal_append(&[record("run_c", 0, "c0")]).unwrap();
    // A record already written is refused, and nothing of its batch is kept.
    assert!(
        one.journal_append(&[record("run_b", 1, "b1"), record("run_a", 0, "again")])
            .is_err()
    );
    let texts = |journal: &PostgresJournal| -> Vec<String> {
        journal
            .journal_load()
            .unwrap()
            .into_iter()
            .map(|r| {
                format!(
                    "{}:{}:{}",
                    r.run,
                    r.seq,
                    String::from_utf8(r.record).unwrap()
                )
            })
            .collect()
    };
    // Each server reads its own runs back, and only those.
    assert_eq!(texts(&one), ["run_a:0:a0", "run_a:1:a1", "run_b:0:b0"]);
    assert_eq!(texts(&two), ["run_c:0:c0"]);
    one.journal_delete("run_a").unwrap();
    two.journal_delete("run_b").unwrap(); // not its own: nothing happens
    assert_eq!(texts(&one), ["run_b:0:b0"]);
}
