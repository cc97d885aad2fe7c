//! Escrow on a real PostgreSQL server: several nodes (each its own connection pool, here in
//! threads) take leases on the same people's balances, spend them, give them back or let them
//! expire, and the database never lets the sum of leases and spends pass what anyone has.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use stipend_ledger::escrow::{LeaseSpend, SpendOutcome};
use stipend_ledger::{
    AccountId, AccountKind, AccountRecord, Batch, Lot, LotSource, StipendPolicy, Store, Transfer,
    TransferId, TransferKind,
};
use stipend_store_postgres::test_server::TestServer;
use stipend_store_postgres::{LeaseRequest, PostgresStore};

const DAY_MS: i64 = 86_400_000;
const STIPEND_CU: u64 = 1_000;
const ISSUER: AccountId = AccountId(1);
const SINK: AccountId = AccountId(2);

fn server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| TestServer::start().unwrap())
}

fn policy() -> StipendPolicy {
    StipendPolicy::new(STIPEND_CU, Duration::from_millis(DAY_MS as u64), STIPEND_CU).unwrap()
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

/// A database with the issuer, one sink and `people` persons (ids 3…), none given a stipend yet.
fn database(people: u64) -> String {
    let url = server().fresh_database().unwrap();
    let store = PostgresStore::open(&url).unwrap();
    let mut created = vec![
        record(1, "issuer", AccountKind::Issuer),
        record(2, "sink:model", AccountKind::Sink),
    ];
    for index in 0..people {
        created.push(record(3 + index, &format!("p{index}"), AccountKind::Person));
    }
    store
        .commit(&Batch {
            created,
            ..Batch::default()
        })
        .unwrap();
    url
}

fn request(node: &str, ttl: Duration) -> LeaseRequest {
    LeaseRequest {
        policy: policy(),
        issuer: ISSUER,
        node: node.to_string(),
        ttl,
    }
}

fn spend_of(lease: i64, account: AccountId, amount_cu: u64, id: u128, now_ms: i64) -> LeaseSpend {
    LeaseSpend {
        lease,
        transfer: Transfer {
            id: TransferId(id),
            kind: TransferKind::Spend,
            debit: account,
            credit: SINK,
            amount_cu,
            created_at_ms: now_ms,
            lot_expires_at_ms: None,
            period: Some(now_ms / DAY_MS),
        },
    }
}

#[test]
fn the_last_compute_goes_to_one_node_only() {
    let url = database(1);
    let person = AccountId(3);
    let nodes: Vec<PostgresStore> = (0..8)
        .map(|_| PostgresStore::open_shared(&url).unwrap())
        .collect();
    let now = 20_000 * DAY_MS;
    // Eight nodes at once each want all of the person's stipend and will take nothing less.
    let won: Vec<bool> = std::thread::scope(|scope| {
        let tries: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(index, node)| {
                scope.spawn(move || {
                    node.take_lease(
                        &request(&format!("n{index}"), Duration::from_secs(30)),
                        person,
                        STIPEND_CU,
                        STIPEND_CU,
                        now,
                    )
                    .unwrap()
                    .is_some()
                })
            })
            .collect();
        tries.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert_eq!(won.iter().filter(|won| **won).count(), 1, "{won:?}");
    // The stipend was applied once, by whichever came first, under the row's lock.
    let store = &nodes[0];
    let row = store.account(person).unwrap().unwrap();
    assert_eq!(row.balance_cu, STIPEND_CU as i64);
    assert_eq!(store.held(person).unwrap(), (STIPEND_CU, 1));
    // The database itself refuses to hold more than a balance, whoever asks.
    let refused = std::process::Command::new("psql")
        .args(["-X", "-q", "-d", &url, "-c"])
        .arg("UPDATE accounts SET held_cu = balance_cu + 1 WHERE id = 3")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("leases_within_balance"), "{message}");
    // Nothing more is available: a lease of even 1 cu is refused.
    assert!(
        store
            .take_lease(&request("late", Duration::from_secs(30)), person, 1, 1, now)
            .unwrap()
            .is_none()
    );
}

#[test]
fn a_lease_past_its_expiry_is_fenced_and_reclaimed() {
    let url = database(1);
    let person = AccountId(3);
    let node = PostgresStore::open_shared(&url).unwrap();
    let now = 20_000 * DAY_MS;
    let short = node
        .take_lease(
            &request("paused", Duration::from_millis(200)),
            person,
            600,
            1,
            now,
        )
        .unwrap()
        .unwrap();
    assert_eq!(short.granted_cu, 600);
    let other = node
        .take_lease(
            &request("other", Duration::from_secs(30)),
            person,
            300,
            1,
            now,
        )
        .unwrap()
        .unwrap();
    // Spent within its life, a lease is charged as decided.
    let outcomes = node
        .settle_leased(&[spend_of(short.id, person, 100, 1, now)])
        .unwrap();
    assert_eq!(outcomes, [SpendOutcome::Charged]);
    // The paused node comes back after its lease expired (by the database's clock): its spend is
    // not charged to the lease, only to what is available (1000 − 100 spent − 500 and 300 held
    // = 100), and the rest is a shortfall, never an overdraft.
    std::thread::sleep(Duration::from_millis(400));
    let outcomes = node
        .settle_leased(&[spend_of(short.id, person, 250, 2, now)])
        .unwrap();
    assert_eq!(outcomes, [SpendOutcome::Unleased { shortfall_cu: 150 }]);
    assert!(!node.renew_lease(short.id, Duration::from_secs(30)).unwrap());
    assert!(node.renew_lease(other.id, Duration::from_secs(30)).unwrap());
    // Anyone may give back expired leases; the live one stays.
    assert_eq!(node.reclaim_expired_leases().unwrap(), 1);
    assert_eq!(node.held(person).unwrap(), (300, 1));
    assert_eq!(node.release_lease(other.id).unwrap(), 300);
    assert_eq!(node.held(person).unwrap(), (0, 0));
    let row = node.account(person).unwrap().unwrap();
    assert_eq!(row.balance_cu, 1_000 - 100 - 100);
    assert_eq!(row.usage[0].charged_cu, 200);
}

#[test]
fn many_nodes_spending_at_once_never_pass_what_anyone_has() {
    const PEOPLE: u64 = 4;
    const NODES: usize = 3;
    const THREADS_PER_NODE: usize = 4;
    let url = database(PEOPLE);
    let nodes: Vec<PostgresStore> = (0..NODES)
        .map(|_| PostgresStore::open_shared(&url).unwrap())
        .collect();
    let now = 20_000 * DAY_MS;
    let charged = AtomicU64::new(0);
    let shortfalls = AtomicU64::new(0);
    let next_id = AtomicU64::new(1);
    let until = Instant::now() + Duration::from_secs(3);
    std::thread::scope(|scope| {
        for (index, node) in nodes.iter().enumerate() {
            for thread in 0..THREADS_PER_NODE {
                let (charged, shortfalls, next_id) = (&charged, &shortfalls, &next_id);
                scope.spawn(move || {
                    let mut x = (index * 31 + thread * 7 + 1) as u64;
                    let mut random = move |n: u64| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x % n
                    };
                    while Instant::now() < until {
                        let person = AccountId(3 + random(PEOPLE));
                        // Short leases, some left to expire mid-use.
                        let ttl = Duration::from_millis(100 + random(400));
                        let Some(lease) = node
                            .take_lease(
                                &request(&format!("n{index}"), ttl),
                                person,
                                1 + random(120),
                                1,
                                now,
                            )
                            .unwrap()
                        else {
                            continue;
                        };
                        let mut left = lease.granted_cu;
                        while left > 0 {
                            let amount = (1 + random(40)).min(left);
                            left -= amount;
                            let id = u128::from(next_id.fetch_add(1, Ordering::Relaxed));
                            let outcome = node
                                .settle_leased(&[spend_of(lease.id, person, amount, id, now)])
                                .unwrap()[0];
                            match outcome {
                                SpendOutcome::Charged => {
                                    charged.fetch_add(amount, Ordering::Relaxed);
                                }
                                SpendOutcome::Unleased { shortfall_cu } => {
                                    charged.fetch_add(amount - shortfall_cu, Ordering::Relaxed);
                                    shortfalls.fetch_add(shortfall_cu, Ordering::Relaxed);
                                }
                            }
                            if random(6) == 0 {
                                break;
                            }
                        }
                        match random(3) {
                            0 => {
                                node.release_lease(lease.id).unwrap();
                            }
                            1 => {
                                node.reclaim_expired_leases().unwrap();
                            }
                            // Left to expire, as a killed node's would.
                            _ => {}
                        }
                    }
                });
            }
        }
    });
    std::thread::sleep(Duration::from_millis(600));
    nodes[0].reclaim_expired_leases().unwrap();
    let store = &nodes[0];
    let mut charged_in_rows = 0;
    for id in 3..3 + PEOPLE {
        let person = AccountId(id);
        let row = store.account(person).unwrap().unwrap();
        assert_eq!(store.held(person).unwrap().1, 0);
        // One stipend each, whatever raced for it; what is left is what was not spent.
        assert_eq!(row.stipend_period, Some(now / DAY_MS));
        let spent: u64 = row.usage.iter().map(|usage| usage.charged_cu).sum();
        assert_eq!(row.balance_cu as u64 + spent, STIPEND_CU, "p{id}");
        charged_in_rows += spent;
    }
    assert_eq!(charged_in_rows, charged.load(Ordering::Relaxed));
    assert!(charged_in_rows <= PEOPLE * STIPEND_CU);
    // The log agrees with the rows: the sink received every charge, the issuer gave every stipend.
    // (Escrow does not move the checkpoint, so the log's sums up to it and the tail after it
    // together are the whole log.)
    let mut rows = Vec::new();
    let mut tail = Vec::new();
    store
        .audit(&mut |row| rows.push(row), &mut |transfer| {
            tail.push(transfer)
        })
        .unwrap();
    let net = |id: AccountId| -> i128 {
        let row = rows.iter().find(|row| row.account.id == id).unwrap();
        let after: i128 = tail
            .iter()
            .map(|transfer| {
                let amount = i128::from(transfer.amount_cu);
                (if transfer.credit == id { amount } else { 0 })
                    - (if transfer.debit == id { amount } else { 0 })
            })
            .sum();
        row.credits_cu - row.debits_cu + after
    };
    assert_eq!(net(SINK), i128::from(charged_in_rows));
    assert_eq!(net(ISSUER), -i128::from(PEOPLE * STIPEND_CU));
    for id in 3..3 + PEOPLE {
        let row = store.account(AccountId(id)).unwrap().unwrap();
        assert_eq!(net(AccountId(id)), i128::from(row.balance_cu), "p{id}");
    }
    eprintln!(
        "charged {charged_in_rows} cu of {} in {} spends; shortfalls {} cu",
        PEOPLE * STIPEND_CU,
        next_id.load(Ordering::Relaxed) - 1,
        shortfalls.load(Ordering::Relaxed)
    );
}

#[test]
fn servers_opening_a_new_database_together_share_one_issuer() {
    let url = server().fresh_database().unwrap();
    let opened: Vec<AccountId> = std::thread::scope(|scope| {
        let opening: Vec<_> = (0..6)
            .map(|_| {
                scope.spawn(|| {
                    let store = std::sync::Arc::new(PostgresStore::open_shared(&url).unwrap());
                    stipend_store_postgres::PostgresBooks::open(
                        store,
                        policy(),
                        std::sync::Arc::new(stipend_ledger::SystemClock),
                    )
                    .unwrap()
                    .issuer()
                })
            })
            .collect();
        opening
            .into_iter()
            .map(|open| open.join().unwrap())
            .collect()
    });
    assert!(
        opened.iter().all(|issuer| *issuer == opened[0]),
        "{opened:?}"
    );
}

#[test]
fn a_grant_written_by_a_single_writer_still_expires_once_nodes_share_the_database() {
    let url = server().fresh_database().unwrap();
    let person = AccountId(3);
    let expires = 20_000 * DAY_MS + 1_000;
    let now = expires + 1;
    let mut issuer = record(1, "issuer", AccountKind::Issuer);
    issuer.balance_cu = -500;
    let mut grantee = record(3, "p0", AccountKind::Person);
    grantee.balance_cu = 500;
    // This period's stipend is already applied, so only the lot's expiry is due.
    grantee.stipend_period = Some(now / DAY_MS);
    grantee.lots = vec![Lot {
        remaining_cu: 500,
        expires_at_ms: Some(expires),
        source: LotSource::Grant,
    }];
    PostgresStore::open(&url)
        .unwrap()
        .commit(&Batch {
            created: vec![issuer, record(2, "sink:model", AccountKind::Sink), grantee],
            transfers: vec![Transfer {
                id: TransferId(1),
                kind: TransferKind::Grant,
                debit: ISSUER,
                credit: person,
                amount_cu: 500,
                created_at_ms: expires - DAY_MS,
                lot_expires_at_ms: Some(expires),
                period: None,
            }],
            // The rows are as of the end of this batch: a checkpoint covering its transfer.
            checkpoint: Some(Vec::new()),
        })
        .unwrap();
    // The single writer has stopped; a node now shares the database. The expired grant is not
    // there to lease: the row is brought up to date first, and the expiry recorded.
    let node = PostgresStore::open_shared(&url).unwrap();
    assert!(
        node.take_lease(&request("n", Duration::from_secs(30)), person, 500, 1, now)
            .unwrap()
            .is_none()
    );
    let row = node.account(person).unwrap().unwrap();
    assert_eq!(row.balance_cu, 0);
    assert!(row.lots.is_empty());
}
