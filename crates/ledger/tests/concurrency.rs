//! Many threads against one account: no overspend, exact charges, a clean audit.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{Harness, policy};
use stipend_ledger::{AccountKind, LedgerError};

fn sixty_four_threads_on_one_account_never_overspend() {
    const THREADS: u64 = 64;
    const ROUNDS: u64 = 200;
    const STIPEND_CU: u64 = 100_000;
    let h = Harness::new(policy(STIPEND_CU, 0));
    let ledger = h.ledger();
    let ann = ledger
        .create_account("ann", AccountKind::Person)
        .unwrap()
        .wait()
        .unwrap();
    let sink = ledger.sink("sink:model").unwrap();
    let charged = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let charged = Arc::clone(&charged);
            let refused = Arc::clone(&refused);
            scope.spawn(move || {
                for round in 0..ROUNDS {
                    // Worst cases from 1 to 64 cu; actual use below, at and above them.
                    let worst_cu = 1 + (thread * 7 + round) % 64;
                    let actual_cu = match round % 3 {
                        0 => worst_cu / 2,
                        1 => worst_cu,
                        _ => worst_cu + 3,
                    };
                    match ledger.reserve(ann, sink, worst_cu, Duration::from_secs(60)) {
                        Ok(reservation) => {
                            let settlement = ledger
                                .settle(reservation.id(), actual_cu)
                                .unwrap()
                                .wait()
                                .unwrap();
                            assert!(settlement.charged_cu <= actual_cu);
                            charged.fetch_add(settlement.charged_cu, Ordering::Relaxed);
                        }
                        Err(LedgerError::InsufficientBalance { .. }) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(error) => panic!("unexpected: {error}"),
                    }
                }
            });
        }
    });
    let charged = charged.load(Ordering::Relaxed);
    let view = ledger.view(ann).unwrap();
    assert!(
        charged <= STIPEND_CU,
        "charged {charged} of a {STIPEND_CU} stipend"
    );
    assert_eq!(view.balance_cu as u64, STIPEND_CU - charged);
    assert_eq!(ledger.view(sink).unwrap().balance_cu as u64, charged);
    assert_eq!(view.reserved_cu, 0);
    // The load is sized to exhaust the stipend, so refusals must have happened.
    assert!(refused.load(Ordering::Relaxed) > 0);
    assert!(ledger.check_invariants().is_empty());
    let report = h.verify();
    assert!(report.ok(), "{report:?}");
}

on_every_store!(sixty_four_threads_on_one_account_never_overspend,);
