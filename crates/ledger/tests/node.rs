//! Several escrow nodes on one PostgreSQL database (a server of the tests' own): reservations
//! decided in memory against leases, settles committed in batches, leases renewed, returned and,
//! when a node dies, reclaimed; never more spent than a person has, and every acknowledged
//! charge in the database.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use stipend_ledger::node::{EscrowStore, Node, NodeOptions};
use stipend_ledger::{
    AccountId, AccountKind, AccountRecord, Batch, LedgerError, StipendPolicy, Store, SystemClock,
};
use stipend_store_postgres::faults::FaultyEscrow;
use stipend_store_postgres::{LeaseRequest, PostgresEscrow, PostgresStore};

const DAY_MS: i64 = 86_400_000;
const STIPEND_CU: u64 = 100_000;
const ISSUER: AccountId = AccountId(1);
const SINK: AccountId = AccountId(2);
const ADA: AccountId = AccountId(3);
const MINUTE: Duration = Duration::from_secs(60);

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

/// A database with the issuer, a sink and one person, ada, not yet given her stipend.
fn database() -> String {
    let url = common::pg_server().fresh_database().unwrap();
    PostgresStore::open(&url)
        .unwrap()
        .commit(&Batch {
            created: vec![
                record(1, "issuer", AccountKind::Issuer),
                record(2, "sink:model", AccountKind::Sink),
                record(3, "ada", AccountKind::Person),
            ],
            ..Batch::default()
        })
        .unwrap();
    url
}

fn escrow(url: &str, name: &str, ttl: Duration) -> PostgresEscrow {
    PostgresEscrow::new(
        Arc::new(PostgresStore::open_shared(url).unwrap()),
        LeaseRequest {
            policy: policy(),
            issuer: ISSUER,
            node: name.to_string(),
            ttl,
        },
    )
}

fn node_on(escrow: Arc<dyn EscrowStore>, ttl: Duration) -> Node {
    Node::open(
        escrow,
        Arc::new(SystemClock),
        NodeOptions::new(policy(), ISSUER, ttl),
    )
    .unwrap()
}

fn node(url: &str, name: &str, ttl: Duration) -> Node {
    node_on(Arc::new(escrow(url, name, ttl)), ttl)
}

/// Ada's row, what leases hold of it, and what she spent this period.
fn ada(url: &str) -> (i64, u64, u64) {
    let store = PostgresStore::open_read_only(url).unwrap();
    let row = store.account(ADA).unwrap().unwrap();
    let spent = row.usage.iter().map(|usage| usage.charged_cu).sum();
    (row.balance_cu, store.held(ADA).unwrap().0, spent)
}

#[test]
fn three_nodes_spend_one_balance_exactly_and_never_more() {
    let url = database();
    let nodes: Vec<Node> = (0..3)
        .map(|index| node(&url, &format!("n{index}"), Duration::from_secs(5)))
        .collect();
    let acknowledged = AtomicU64::new(0);
    let refused = AtomicU64::new(0);
    let until = Instant::now() + Duration::from_secs(3);
    std::thread::scope(|scope| {
        for (index, node) in nodes.iter().enumerate() {
            for thread in 0..6 {
                let (acknowledged, refused) = (&acknowledged, &refused);
                scope.spawn(move || {
                    let mut x = (index * 97 + thread * 13 + 5) as u64;
                    let mut random = move |n: u64| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x % n
                    };
                    while Instant::now() < until {
                        let amount = 1 + random(3_000);
                        let reservation = match node.reserve(ADA, SINK, amount, MINUTE) {
                            Ok(reservation) => reservation,
                            Err(LedgerError::InsufficientBalance { .. }) => {
                                refused.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            Err(error) => panic!("{error:?}"),
                        };
                        if random(8) == 0 {
                            node.void(reservation.id()).unwrap();
                            continue;
                        }
                        let actual = random(amount + 1);
                        let settlement = node
                            .settle(reservation.id(), actual)
                            .unwrap()
                            .wait()
                            .unwrap();
                        assert_eq!(settlement.charged_cu, actual);
                        acknowledged.fetch_add(settlement.charged_cu, Ordering::Relaxed);
                    }
                });
            }
        }
    });
    let leases_during: usize = nodes.iter().map(Node::leases_held).sum();
    drop(nodes);
    let (balance, held, spent) = ada(&url);
    let acknowledged = acknowledged.load(Ordering::Relaxed);
    // Every acknowledged charge is in the database, nothing else is, nothing stays held, and
    // the stipend was granted once whichever node asked first.
    assert_eq!(spent, acknowledged);
    assert_eq!(held, 0);
    assert_eq!(balance as u64 + spent, STIPEND_CU);
    eprintln!(
        "spent {spent} of {STIPEND_CU} cu; {} refusals; {leases_during} leases held at the end",
        refused.load(Ordering::Relaxed)
    );
    // What is left can be spent to the last cu through any one node.
    let last = node(&url, "last", Duration::from_secs(5));
    let view = last.view(ADA).unwrap();
    assert_eq!(view.available_cu, balance as u64);
    if view.available_cu > 0 {
        let all = last.reserve(ADA, SINK, view.available_cu, MINUTE).unwrap();
        last.settle(all.id(), view.available_cu)
            .unwrap()
            .wait()
            .unwrap();
    }
    assert!(matches!(
        last.reserve(ADA, SINK, 1, MINUTE),
        Err(LedgerError::InsufficientBalance {
            available_cu: 0,
            ..
        })
    ));
    drop(last);
    assert_eq!(ada(&url), (0, 0, STIPEND_CU));
}

#[test]
fn a_dead_nodes_leases_come_back_after_their_life() {
    let url = database();
    let ttl = Duration::from_millis(800);
    let dead = node(&url, "dead", ttl);
    // It spends a little, leases most of ada's balance for a call, then dies holding it.
    let spent = dead.reserve(ADA, SINK, 1_000, MINUTE).unwrap();
    dead.settle(spent.id(), 1_000).unwrap().wait().unwrap();
    let _held = dead.reserve(ADA, SINK, 70_000, MINUTE).unwrap();
    dead.abandon();
    let alive = node(&url, "alive", ttl);
    assert!(matches!(
        alive.reserve(ADA, SINK, 40_000, MINUTE),
        Err(LedgerError::InsufficientBalance { .. })
    ));
    // After the lease's life, it is reclaimed (any node does it) and all is available again.
    let started = Instant::now();
    let reservation = loop {
        match alive.reserve(ADA, SINK, 99_000, MINUTE) {
            Ok(reservation) => break reservation,
            Err(LedgerError::InsufficientBalance { .. })
                if started.elapsed() < Duration::from_secs(10) =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(error) => panic!("{error:?}"),
        }
    };
    alive
        .settle(reservation.id(), 99_000)
        .unwrap()
        .wait()
        .unwrap();
    drop(alive);
    assert_eq!(ada(&url), (0, 0, STIPEND_CU));
}

#[test]
fn a_lease_in_use_is_renewed_so_a_call_may_outlive_its_life() {
    let url = database();
    let ttl = Duration::from_millis(1_000);
    let node = node(&url, "n", ttl);
    let reservation = node.reserve(ADA, SINK, 500, MINUTE).unwrap();
    // Three lease lives later the call ends: its lease was renewed meanwhile, so the charge is
    // made against it (a lease gone would have been reclaimed and the spend charged short).
    std::thread::sleep(3 * ttl);
    let store = PostgresStore::open_read_only(&url).unwrap();
    assert_eq!(
        store.held(ADA).unwrap(),
        (500, 1),
        "the lease was not kept alive"
    );
    let settled = node.settle(reservation.id(), 500).unwrap().wait().unwrap();
    assert_eq!(settled.charged_cu, 500);
    drop(node);
    let (balance, held, spent) = ada(&url);
    assert_eq!((held, spent), (0, 500));
    assert_eq!(balance as u64, STIPEND_CU - 500);
}

#[test]
fn a_lease_that_cannot_be_renewed_ends_its_calls_while_it_still_lives() {
    let url = database();
    let ttl = Duration::from_millis(1_000);
    let faulty = Arc::new(FaultyEscrow::new(escrow(&url, "n", ttl)));
    let node = node_on(Arc::clone(&faulty) as Arc<dyn EscrowStore>, ttl);
    let reservation = node.reserve(ADA, SINK, 500, MINUTE).unwrap();
    let first = node.hold_until(reservation.id());
    assert!(first > Instant::now() && first < Instant::now() + ttl);
    // Renewed, the moment a call must end by moves on, past the lease's first life.
    std::thread::sleep(2 * ttl);
    assert!(
        node.hold_until(reservation.id()) > Instant::now(),
        "renewals did not move the hold on"
    );
    // Renewals refused: the moment comes, while the lease still lives in the database, so the
    // call cut then is charged against it in full.
    faulty.refuse_renewals(true);
    let give_up = Instant::now() + 3 * ttl;
    while Instant::now() < node.hold_until(reservation.id()) {
        assert!(Instant::now() < give_up, "the hold outlived its lease");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(faulty.renewals_refused() > 0);
    let store = PostgresStore::open_read_only(&url).unwrap();
    assert_eq!(
        store.held(ADA).unwrap(),
        (500, 1),
        "the lease must still live when its calls are cut"
    );
    let settled = node.settle(reservation.id(), 300).unwrap().wait().unwrap();
    assert_eq!((settled.charged_cu, settled.shortfall_cu), (300, 0));
    // A reservation that is gone holds nothing: its moment is now.
    assert!(node.hold_until(reservation.id()) <= Instant::now());
    drop(node);
    let (_, held, spent) = ada(&url);
    assert_eq!((held, spent), (0, 300));
}

#[test]
fn leases_cut_thin_are_given_back_so_the_last_cu_can_be_spent() {
    let url = database();
    let node = node(&url, "n", Duration::from_secs(30));
    // A first lease of 40 000, voided: it stays on the node, all free.
    let first = node.reserve(ADA, SINK, 40_000, MINUTE).unwrap();
    node.void(first.id()).unwrap();
    // A second of 50 000, spent whole: the database has 10 000 left available, the node's first
    // lease 40 000 free.
    let second = node.reserve(ADA, SINK, 50_000, MINUTE).unwrap();
    node.settle(second.id(), 50_000).unwrap().wait().unwrap();
    // 45 000 fits in neither alone, but ada has 50 000: the first lease goes back and the call
    // gets one lease of what she has.
    let third = node.reserve(ADA, SINK, 45_000, MINUTE).unwrap();
    node.settle(third.id(), 45_000).unwrap().wait().unwrap();
    let rest = node.reserve(ADA, SINK, 5_000, MINUTE).unwrap();
    node.settle(rest.id(), 5_000).unwrap().wait().unwrap();
    drop(node);
    assert_eq!(ada(&url), (0, 0, STIPEND_CU));
}

#[test]
fn a_node_paused_past_its_lease_is_fenced_and_acknowledges_only_what_was_charged() {
    let url = database();
    let ttl = Duration::from_millis(1_000);
    let paused = node(&url, "paused", ttl);
    // It holds 60 000 cu for a call, then stops (no commits, no renewals) for three lease lives.
    let held = paused.reserve(ADA, SINK, 60_000, MINUTE).unwrap();
    paused.pause_writer_for_tests(3 * ttl);
    // Meanwhile its lease expires, and another node spends everything ada has.
    let other = node(&url, "other", ttl);
    let started = Instant::now();
    let all = loop {
        match other.reserve(ADA, SINK, STIPEND_CU, MINUTE) {
            Ok(reservation) => break reservation,
            Err(LedgerError::InsufficientBalance { .. })
                if started.elapsed() < Duration::from_secs(10) =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(error) => panic!("{error:?}"),
        }
    };
    other.settle(all.id(), STIPEND_CU).unwrap().wait().unwrap();
    // The paused node comes back and its call ends: nothing is left to charge it against, and
    // it says so rather than acknowledging a charge that was never made.
    std::thread::sleep((3 * ttl).saturating_sub(started.elapsed()) + Duration::from_millis(100));
    let settled = paused.settle(held.id(), 60_000).unwrap().wait().unwrap();
    assert_eq!((settled.charged_cu, settled.shortfall_cu), (0, 60_000));
    drop(paused);
    drop(other);
    // Never more than ada had.
    assert_eq!(ada(&url), (0, 0, STIPEND_CU));
}

#[test]
fn a_commit_whose_answer_was_lost_is_acknowledged_if_it_happened_and_only_then() {
    let url = database();
    let ttl = Duration::from_secs(30);
    let losing = Arc::new(FaultyEscrow::new(escrow(&url, "losing", ttl)));
    let node = node_on(Arc::clone(&losing) as Arc<dyn EscrowStore>, ttl);
    // Committed, the answer lost: the node asks, finds it, and acknowledges it.
    let first = node.reserve(ADA, SINK, 700, MINUTE).unwrap();
    losing.lose_next_answer(true);
    let settled = node.settle(first.id(), 700).unwrap().wait().unwrap();
    assert_eq!(settled.charged_cu, 700);
    // Never committed: the node says so, and refuses work until the database answers again.
    let second = node.reserve(ADA, SINK, 300, MINUTE).unwrap();
    losing.lose_next_answer(false);
    assert!(node.settle(second.id(), 300).unwrap().wait().is_err());
    drop(node);
    let (balance, _, spent) = ada(&url);
    assert_eq!(spent, 700);
    assert_eq!(balance as u64, STIPEND_CU - 700);
}

#[test]
fn a_bad_amount_or_timeout_is_refused_and_takes_no_lease() {
    let url = database();
    let node = node(&url, "n", Duration::from_secs(30));
    for amount_cu in [0, stipend_ledger::limits::AMOUNT_MAX_CU + 1] {
        assert!(matches!(
            node.reserve(ADA, SINK, amount_cu, MINUTE),
            Err(LedgerError::InvalidAmount { .. })
        ));
    }
    let longest =
        NodeOptions::new(policy(), ISSUER, Duration::from_secs(30)).reservation_timeout_max;
    for timeout in [Duration::ZERO, longest + Duration::from_secs(1)] {
        assert!(matches!(
            node.reserve(ADA, SINK, 10, timeout),
            Err(LedgerError::InvalidTimeout { .. })
        ));
    }
    assert_eq!(node.leases_held(), 0);
    assert_eq!(ada(&url), (0, 0, 0));
    // A good call still goes through.
    let reservation = node.reserve(ADA, SINK, 10, MINUTE).unwrap();
    node.settle(reservation.id(), 10).unwrap().wait().unwrap();
    assert_eq!(ada(&url).2, 10);
}
