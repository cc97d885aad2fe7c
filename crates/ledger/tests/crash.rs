//! Durability through SIGKILL: a child process runs a write load on the real store and is killed
//! at a random moment, many times over the same store. After each kill, the audit passes and
//! every settle, gift and grant the child saw acknowledged is in the store.
//!
//! `STIPEND_CRASH_ROUNDS` sets the number of kills (default 12).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rand::{RngExt, SeedableRng};
use rand_xorshift::XorShiftRng;
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stipend_ledger::{
    AccountKind, Ledger, LedgerError, LedgerOptions, StipendPolicy, Store, SystemClock, TransferId,
    verify,
};
use stipend_store_sqlite::SqliteStore;

const CHILD_ENV: &str = "STIPEND_CRASH_CHILD_DB";
const PERSONS: usize = 8;

/// The child: runs when the test binary is started with `STIPEND_CRASH_CHILD_DB` set, and prints
/// one `ACK <transfer id>` line for each change it saw become durable.
#[test]
fn crash_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(Path::new(&path)).unwrap());
    let policy = StipendPolicy::new(1 << 40, Duration::from_secs(86_400), 1 << 40).unwrap();
    let ledger = Ledger::open(store, Arc::new(SystemClock), LedgerOptions::new(policy)).unwrap();
    let mut persons = Vec::new();
    for index in 0..PERSONS {
        let name = format!("p{index}");
        let id = match ledger.create_account(&name, AccountKind::Person) {
            Ok(created) => created.wait().unwrap(),
            Err(LedgerError::AccountExists { .. }) => ledger.account_id(&name).unwrap(),
            Err(error) => panic!("{error}"),
        };
        persons.push(id);
    }
    let sink = ledger.sink("sink:model").unwrap();
    println!("READY");
    std::io::stdout().flush().unwrap();
    let ack = |id: TransferId| {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ACK {id}").unwrap();
        out.flush().unwrap();
    };
    std::thread::scope(|scope| {
        for thread in 0..8usize {
            let ledger = &ledger;
            let persons = &persons;
            scope.spawn(move || {
                for round in 0usize.. {
                    let person = persons[(thread + round) % PERSONS];
                    match round % 10 {
                        0 => {
                            let to = persons[(thread + round + 1) % PERSONS];
                            let posted = ledger
                                .give(TransferId::random(), person, to, 1 + round as u64 % 50)
                                .unwrap()
                                .wait()
                                .unwrap();
                            ack(posted.transfer.id);
                        }
                        1 => {
                            let posted = ledger
                                .grant(TransferId::random(), person, 100, None)
                                .unwrap()
                                .wait()
                                .unwrap();
                            ack(posted.transfer.id);
                        }
                        _ => {
                            let worst = 10 + round as u64 % 90;
                            let reservation = ledger
                                .reserve(person, sink, worst, Duration::from_secs(60))
                                .unwrap();
                            let settlement = ledger
                                .settle(reservation.id(), worst / 2 + 1)
                                .unwrap()
                                .wait()
                                .unwrap();
                            if let Some(id) = settlement.transfer {
                                ack(id);
                            }
                        }
                    }
                }
            });
        }
    });
}

#[test]
fn sigkill_at_random_moments_loses_nothing_acknowledged() {
    let rounds: usize = std::env::var("STIPEND_CRASH_ROUNDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(12);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill delays seeded with {seed}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let mut delays = XorShiftRng::seed_from_u64(seed);
    let mut acknowledged_total = 0usize;
    for round in 0..rounds {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut acknowledged = Vec::new();
            let mut ready = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // The test harness may print its own words before ours on the same line.
                if line.ends_with("READY") {
                    ready = true;
                } else if let Some((_, id)) = line.split_once("ACK ") {
                    acknowledged.push(TransferId::parse(id).unwrap());
                }
            }
            (ready, acknowledged)
        });
        // Wait for start-up, then kill somewhere in the next 20–300 ms of load.
        let started = Instant::now();
        std::thread::sleep(Duration::from_millis(150));
        let delay = 20 + delays.random_range(0..280);
        std::thread::sleep(Duration::from_millis(delay));
        let killed = Command::new("kill")
            .args(["-KILL", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let status = child.wait().unwrap();
        assert!(!status.success(), "round {round}: the child was not killed");
        let (ready, acknowledged) = reader.join().unwrap();
        assert!(
            ready,
            "round {round}: the child never started ({:?})",
            started.elapsed()
        );
        acknowledged_total += acknowledged.len();

        let store = SqliteStore::open_read_only(&path).unwrap();
        let report = verify(&store).unwrap();
        assert!(report.ok(), "round {round}: {:?}", report.violations);
        // Spends are not indexed by id, so read every id in the log once.
        let logged: HashSet<TransferId> = {
            let connection = rusqlite::Connection::open(&path).unwrap();
            let mut statement = connection.prepare("SELECT id FROM transfers").unwrap();
            statement
                .query_map([], |row| row.get::<_, Vec<u8>>(0))
                .unwrap()
                .map(|id| TransferId(u128::from_be_bytes(id.unwrap().try_into().unwrap())))
                .collect()
        };
        let missing: Vec<_> = acknowledged
            .iter()
            .filter(|id| !logged.contains(id))
            .collect();
        assert!(
            missing.is_empty(),
            "round {round}: {} of {} acknowledged transfers are missing, e.g. {}",
            missing.len(),
            acknowledged.len(),
            missing[0]
        );
    }
    assert!(
        acknowledged_total > rounds * 10,
        "the load was too light to mean anything: {acknowledged_total} acknowledgements"
    );
    eprintln!("{rounds} kills, {acknowledged_total} acknowledged transfers, all present");
}
