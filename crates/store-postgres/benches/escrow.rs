//! What escrow costs the database per request: nodes reserving and settling against leases on
//! one person's balance, on a PostgreSQL server of the bench's own, counting every statement a
//! node sends (leases taken, renewed, given back; settle transactions) against the requests
//! served. Two people: one with an ample balance (the steady state), one at the edge of theirs
//! (leases shrink to the call, and the last cu is spent).
//!
//! A second table times what a node decides in memory (a reserve and a void on a lease it holds)
//! while it holds leases for many other people too: the cost of a decision must not grow with
//! how many people a node serves.
//!
//! `cargo bench -p stipend-store-postgres --bench escrow`. `STIPEND_BENCH_SECS` (default 3) per
//! run. The server runs with `fsync = off` (the test server's): the counts do not depend on it,
//! the rates do.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use stipend_ledger::escrow::{Lease, LeaseSpend, SpendOutcome};
use stipend_ledger::node::{EscrowStore, Node, NodeOptions};
use stipend_ledger::{
    AccountId, AccountKind, AccountRecord, Batch, LedgerError, StipendPolicy, Store, StoreError,
    SystemClock,
};
use stipend_store_postgres::test_server::TestServer;
use stipend_store_postgres::{LeaseRequest, PostgresEscrow, PostgresStore};

const ISSUER: AccountId = AccountId(1);
const SINK: AccountId = AccountId(2);
const PERSON: AccountId = AccountId(3);
/// A call of an 8B model, 100 tokens: 1 600 cu.
const CALL_CU: u64 = 1_600;
const TTL: Duration = Duration::from_secs(10);

/// Counts what a node asks of the database.
#[derive(Default)]
struct Counts {
    leases_taken: AtomicU64,
    renewals: AtomicU64,
    releases: AtomicU64,
    settles: AtomicU64,
    reads: AtomicU64,
}

struct Counting {
    inner: PostgresEscrow,
    counts: Arc<Counts>,
}

impl EscrowStore for Counting {
    fn take_lease(
        &self,
        account: AccountId,
        want_cu: u64,
        min_cu: u64,
        now_ms: i64,
    ) -> Result<Option<Lease>, StoreError> {
        self.counts.leases_taken.fetch_add(1, Ordering::Relaxed);
        self.inner.take_lease(account, want_cu, min_cu, now_ms)
    }
    fn renew_lease(&self, lease: i64) -> Result<bool, StoreError> {
        self.counts.renewals.fetch_add(1, Ordering::Relaxed);
        self.inner.renew_lease(lease)
    }
    fn release_lease(&self, lease: i64) -> Result<u64, StoreError> {
        self.counts.releases.fetch_add(1, Ordering::Relaxed);
        self.inner.release_lease(lease)
    }
    fn shrink_lease(&self, lease: i64, amount_cu: u64) -> Result<bool, StoreError> {
        self.counts.releases.fetch_add(1, Ordering::Relaxed);
        self.inner.shrink_lease(lease, amount_cu)
    }
    fn settle_leased(&self, spends: &[LeaseSpend]) -> Result<Vec<SpendOutcome>, StoreError> {
        self.counts.settles.fetch_add(1, Ordering::Relaxed);
        self.inner.settle_leased(spends)
    }
    fn reclaim_expired_leases(&self) -> Result<u64, StoreError> {
        self.inner.reclaim_expired_leases()
    }
    fn settled(&self, first: stipend_ledger::TransferId) -> Result<bool, StoreError> {
        self.inner.settled(first)
    }
    fn account_held(&self, id: AccountId) -> Result<Option<(AccountRecord, u64)>, StoreError> {
        self.counts.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.account_held(id)
    }
    fn lease_ttl(&self) -> Duration {
        self.inner.lease_ttl()
    }
}

fn record(id: u64, name: &str, kind: AccountKind) -> AccountRecord {
    AccountRecord {
        id: AccountId(id),
        name: name.to_string(),
        kind,
        balance_cu: 0,
        lots: Vec::new(),
        stipend_period: None,
        usage: Vec::new(),
        created_at_ms: 0,
    }
}

/// Runs `nodes` nodes of `threads` threads each on one person with a stipend of `stipend_cu`
/// for `secs` seconds (or until the balance is spent); prints what the database was asked.
fn run(server: &TestServer, label: &str, stipend_cu: u64, nodes: usize, threads: usize, secs: u64) {
    let url = server.fresh_database().unwrap();
    PostgresStore::open(&url)
        .unwrap()
        .commit(&Batch {
            created: vec![
                record(1, "issuer", AccountKind::Issuer),
                record(2, "sink:model", AccountKind::Sink),
                record(3, "person", AccountKind::Person),
            ],
            ..Batch::default()
        })
        .unwrap();
    let policy = StipendPolicy::new(stipend_cu, Duration::from_secs(86_400), 0).unwrap();
    let counts = Arc::new(Counts::default());
    let running: Vec<Node> = (0..nodes)
        .map(|index| {
            let escrow = PostgresEscrow::new(
                Arc::new(PostgresStore::open_shared(&url).unwrap()),
                LeaseRequest {
                    policy,
                    issuer: ISSUER,
                    node: format!("n{index}"),
                    ttl: TTL,
                },
            );
            Node::open(
                Arc::new(Counting {
                    inner: escrow,
                    counts: Arc::clone(&counts),
                }),
                Arc::new(SystemClock),
                NodeOptions::new(policy, ISSUER, TTL),
            )
            .unwrap()
        })
        .collect();
    let requests = AtomicU64::new(0);
    let refused = AtomicU64::new(0);
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    std::thread::scope(|scope| {
        for node in &running {
            for _ in 0..threads {
                let (requests, refused) = (&requests, &refused);
                scope.spawn(move || {
                    while Instant::now() < until {
                        match node.reserve(PERSON, SINK, CALL_CU, Duration::from_secs(60)) {
                            Ok(reservation) => {
                                node.settle(reservation.id(), CALL_CU)
                                    .unwrap()
                                    .wait()
                                    .unwrap();
                                requests.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(LedgerError::InsufficientBalance { .. }) => {
                                if refused.fetch_add(1, Ordering::Relaxed) > 1_000 {
                                    return;
                                }
                            }
                            Err(error) => panic!("{error:?}"),
                        }
                    }
                });
            }
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    drop(running);
    let requests = requests.load(Ordering::Relaxed) as f64;
    let per = |counter: &AtomicU64| counter.load(Ordering::Relaxed) as f64 / requests;
    let leases = per(&counts.leases_taken);
    let renewals = per(&counts.renewals);
    let releases = per(&counts.releases);
    let settles = per(&counts.settles);
    let reads = per(&counts.reads);
    let store = PostgresStore::open_read_only(&url).unwrap();
    let person = store.account(PERSON).unwrap().unwrap();
    println!(
        "| {label} | {nodes} × {threads} | {requests:.0} | {:.0} | {leases:.4} | {renewals:.4} | {releases:.4} | {:.4} | {settles:.3} | {reads:.4} | {:.1} % |",
        requests / elapsed,
        leases + renewals + releases,
        100.0 * (stipend_cu as f64 - person.balance_cu as f64) / stipend_cu as f64,
    );
}

/// The time of one reserve and void, decided in memory on a lease the node holds, while the node
/// also holds a lease for each of `others` other people (each with a call open on it).
fn decide_among(server: &TestServer, others: u64, calls: u32) -> Duration {
    let url = server.fresh_database().unwrap();
    let mut created = vec![
        record(1, "issuer", AccountKind::Issuer),
        record(2, "sink:model", AccountKind::Sink),
    ];
    for index in 0..=others {
        created.push(record(3 + index, &format!("p{index}"), AccountKind::Person));
    }
    PostgresStore::open(&url)
        .unwrap()
        .commit(&Batch {
            created,
            ..Batch::default()
        })
        .unwrap();
    let ttl = Duration::from_secs(600);
    let policy = StipendPolicy::new(CALL_CU * 1_000, Duration::from_secs(86_400), 0).unwrap();
    let escrow = PostgresEscrow::new(
        Arc::new(PostgresStore::open_shared(&url).unwrap()),
        LeaseRequest {
            policy,
            issuer: ISSUER,
            node: "n".to_string(),
            ttl,
        },
    );
    let node = Node::open(
        Arc::new(escrow),
        Arc::new(SystemClock),
        NodeOptions::new(policy, ISSUER, ttl),
    )
    .unwrap();
    let open = Duration::from_secs(60);
    // Everyone's first lease is cut to their first call, which stays open; the measured
    // person's second call takes a lease of a tenth of what they have, which the loop uses.
    let mut held = Vec::new();
    for index in 1..=others {
        held.push(
            node.reserve(AccountId(3 + index), SINK, CALL_CU, open)
                .unwrap(),
        );
    }
    held.push(node.reserve(PERSON, SINK, CALL_CU, open).unwrap());
    node.void(node.reserve(PERSON, SINK, CALL_CU, open).unwrap().id())
        .unwrap();
    assert!(node.leases_held() as u64 >= others + 2);
    let started = Instant::now();
    for _ in 0..calls {
        let reservation = node.reserve(PERSON, SINK, CALL_CU, open).unwrap();
        node.void(reservation.id()).unwrap();
    }
    let elapsed = started.elapsed() / calls;
    for reservation in held {
        node.void(reservation.id()).unwrap();
    }
    elapsed
}

fn main() {
    let secs = std::env::var("STIPEND_BENCH_SECS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(3);
    let server = TestServer::start().unwrap();
    println!(
        "escrow: what a node asks the database per request (a call of {CALL_CU} cu, reserved and \
         settled), {secs} s a run"
    );
    println!();
    println!(
        "| person | nodes × threads | requests | req/s | leases taken | renewals | given back | lease writes | settle commits | reads | of the balance spent |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    // An ample balance: ten million calls' worth.
    run(&server, "ample", CALL_CU * 10_000_000, 1, 8, secs);
    run(&server, "ample", CALL_CU * 10_000_000, 3, 4, secs);
    // At the edge: 2 000 calls' worth, spent to the end.
    run(&server, "at the edge", CALL_CU * 2_000, 1, 8, secs);
    run(&server, "at the edge", CALL_CU * 2_000, 3, 4, secs);
    println!();
    println!("decisions in memory: one reserve and void on a lease the node holds");
    println!();
    println!("| other people with leases on the node | per reserve and void | ratio to none |");
    println!("| --- | --- | --- |");
    let calls = 200_000;
    let alone = decide_among(&server, 0, calls);
    for others in [0, 300, 3_000] {
        let among = if others == 0 {
            alone
        } else {
            decide_among(&server, others, calls)
        };
        println!(
            "| {others} | {:.2} µs | {:.2} |",
            among.as_secs_f64() * 1e6,
            among.as_secs_f64() / alone.as_secs_f64()
        );
    }
}
