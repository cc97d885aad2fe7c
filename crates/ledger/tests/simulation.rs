//! A seeded simulation of the ledger on each real store (SQLite, PostgreSQL): random interleavings of reserve,
//! settle (for less, equal and more), void, timeouts, stipend periods, gifts, grants, replays,
//! crashes and reopens, with every invariant checked after every step.
//!
//! `STIPEND_SIM_STEPS` sets the total number of steps (default 20 000), `STIPEND_SIM_SEED` runs
//! one seed only (to replay a failure, which prints its seed).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use rand::seq::IndexedRandom;
use rand::{Rng, RngExt, SeedableRng};
use rand_xorshift::XorShiftRng;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use stipend_ledger::{
    AccountId, AccountKind, Ledger, LedgerError, LedgerOptions, ManualClock, Reservation,
    StipendPolicy, TransferId,
};

use common::Location;

const DAY_MS: i64 = 86_400_000;

struct Sim {
    rng: XorShiftRng,
    location: Location,
    clock: Arc<ManualClock>,
    policy: StipendPolicy,
    checkpoints: Checkpoints,
    ledger: Option<Ledger>,
    spenders: Vec<AccountId>,
    givers: Vec<AccountId>,
    sinks: Vec<AccountId>,
    open: Vec<Reservation>,
    closed: Vec<Reservation>,
    /// Transfer ids used for gifts and grants, with what they were used for.
    used_ids: Vec<(TransferId, Op)>,
    charged_total_cu: u64,
    step: u64,
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Give {
        from: AccountId,
        to: AccountId,
        amount_cu: u64,
    },
    Grant {
        to: AccountId,
        amount_cu: u64,
    },
}

/// How a seed checkpoints: every commit, often, or (practically) never; and whether closing
/// checkpoints, so that reopening replays anything from nothing to the whole log.
#[derive(Clone, Copy)]
struct Checkpoints {
    interval: Duration,
    on_close: bool,
}

fn open_ledger(
    location: &Location,
    clock: Arc<ManualClock>,
    policy: StipendPolicy,
    checkpoints: Checkpoints,
) -> Ledger {
    let store = location.open();
    let mut options = LedgerOptions::new(policy);
    options.commit_batch_max = 7; // small batches, so commits split mid-sequence
    options.checkpoint_interval = checkpoints.interval;
    options.checkpoint_on_close = checkpoints.on_close;
    Ledger::open(store, clock, options).unwrap()
}

impl Sim {
    fn ledger(&self) -> &Ledger {
        self.ledger.as_ref().unwrap()
    }

    fn available(&self, account: AccountId) -> u64 {
        self.ledger().view(account).unwrap().available_cu
    }

    fn check(&self, what: &str) {
        let violations = self.ledger().check_invariants();
        assert!(
            violations.is_empty(),
            "step {} ({what}): {violations:?}",
            self.step
        );
        let sinks_cu: i64 = self
            .sinks
            .iter()
            .map(|sink| self.ledger().view(*sink).unwrap().balance_cu)
            .sum();
        assert_eq!(
            sinks_cu, self.charged_total_cu as i64,
            "step {} ({what}): sinks hold what was charged",
            self.step
        );
    }

    fn audit(&self) {
        self.ledger().flush().unwrap();
        let report = self.location.audit();
        assert!(report.ok(), "step {}: {:?}", self.step, report.violations);
    }

    fn reserve(&mut self) {
        let account = *self.spenders.choose(&mut self.rng).expect("never empty");
        let sink = *self.sinks.choose(&mut self.rng).expect("never empty");
        let amount_cu = 1 + self.rng.random_range(0..700);
        let timeout = Duration::from_millis(1 + self.rng.random_range(0..120_000));
        let available = self.available(account);
        match self.ledger().reserve(account, sink, amount_cu, timeout) {
            Ok(reservation) => {
                assert!(
                    amount_cu <= available,
                    "step {}: reserved beyond available",
                    self.step
                );
                self.open.push(reservation);
            }
            Err(LedgerError::InsufficientBalance { available_cu, .. }) => {
                assert!(
                    amount_cu > available,
                    "step {}: refused within available",
                    self.step
                );
                assert_eq!(available_cu, available);
            }
            Err(error) => panic!("step {}: reserve failed: {error}", self.step),
        }
    }

    fn settle(&mut self) {
        if self.open.is_empty() {
            return;
        }
        let index = self.rng.random_range(0..self.open.len() as u64) as usize;
        let reservation = self.open.swap_remove(index);
        let held = reservation.amount_cu();
        let actual = match self.rng.random_range(0..3) {
            0 => self.rng.random_range(0..held + 1),
            1 => held,
            _ => held + 1 + self.rng.random_range(0..500),
        };
        let expired = reservation.expires_at_ms() <= self.ledger().now_ms();
        // What the account could cover beyond this hold, seen just before.
        let free = self.available(reservation.account());
        let result = self.ledger().settle(reservation.id(), actual);
        self.closed.push(reservation);
        match result {
            Ok(durable) => {
                assert!(
                    !expired,
                    "step {}: settled a timed-out reservation",
                    self.step
                );
                let settlement = durable.wait().unwrap();
                let expected = actual.min(held + free);
                assert_eq!(settlement.charged_cu, expected, "step {}", self.step);
                assert_eq!(settlement.shortfall_cu, actual - expected);
                self.charged_total_cu += settlement.charged_cu;
            }
            Err(LedgerError::UnknownReservation { .. }) => {
                assert!(
                    expired,
                    "step {}: an open reservation was unknown",
                    self.step
                );
            }
            Err(error) => panic!("step {}: settle failed: {error}", self.step),
        }
    }

    fn void(&mut self) {
        if self.open.is_empty() {
            return;
        }
        let index = self.rng.random_range(0..self.open.len() as u64) as usize;
        let reservation = self.open.swap_remove(index);
        let expired = reservation.expires_at_ms() <= self.ledger().now_ms();
        let result = self.ledger().void(reservation.id());
        self.closed.push(reservation);
        match result {
            Ok(released) => assert_eq!(released, reservation.amount_cu()),
            // A timed-out reservation may already have been swept.
            Err(LedgerError::UnknownReservation { .. }) => assert!(expired, "step {}", self.step),
            Err(error) => panic!("step {}: void failed: {error}", self.step),
        }
    }

    fn reuse_closed(&mut self) {
        if self.closed.is_empty() {
            return;
        }
        let reservation = *self.closed.choose(&mut self.rng).expect("never empty");
        let before = self.available(reservation.account());
        let settle = self.ledger().settle(reservation.id(), 1).map(drop);
        let void = self.ledger().void(reservation.id()).map(drop);
        for result in [settle, void] {
            assert!(
                matches!(result, Err(LedgerError::UnknownReservation { .. })),
                "step {}: {result:?}",
                self.step
            );
        }
        assert_eq!(self.available(reservation.account()), before);
    }

    fn give(&mut self) {
        if !self.used_ids.is_empty() && self.rng.random_range(0..4) == 0 {
            return self.replay();
        }
        let from = *self.givers.choose(&mut self.rng).expect("never empty");
        let to = *self.givers.choose(&mut self.rng).expect("never empty");
        let amount_cu = 1 + self.rng.random_range(0..400);
        let id = TransferId(u128::from(self.rng.next_u64()) << 1);
        let available = self.available(from);
        match self.ledger().give(id, from, to, amount_cu) {
            Ok(durable) => {
                assert!(from != to && amount_cu <= available, "step {}", self.step);
                assert!(!durable.wait().unwrap().replayed);
                self.used_ids.push((
                    id,
                    Op::Give {
                        from,
                        to,
                        amount_cu,
                    },
                ));
            }
            Err(LedgerError::SameAccount) => assert_eq!(from, to),
            Err(LedgerError::InsufficientBalance { .. }) => assert!(amount_cu > available),
            Err(LedgerError::TooManyLots { .. }) => {}
            Err(error) => panic!("step {}: give failed: {error}", self.step),
        }
    }

    fn grant(&mut self) {
        let to = *self.givers.choose(&mut self.rng).expect("never empty");
        let amount_cu = 1 + self.rng.random_range(0..300);
        let now = self.ledger().now_ms();
        let expires = match self.rng.random_range(0..3) {
            0 => None,
            _ => Some(now + 1 + self.rng.random_range(0..3 * DAY_MS as u64) as i64),
        };
        let id = TransferId((u128::from(self.rng.next_u64()) << 1) | 1);
        match self.ledger().grant(id, to, amount_cu, expires) {
            Ok(durable) => {
                durable.wait().unwrap();
                self.used_ids.push((id, Op::Grant { to, amount_cu }));
            }
            Err(LedgerError::TooManyLots { .. }) => {}
            Err(error) => panic!("step {}: grant failed: {error}", self.step),
        }
    }

    /// Replays an earlier id: the same content is a no-op, other content a conflict.
    fn replay(&mut self) {
        let (id, op) = *self.used_ids.choose(&mut self.rng).expect("never empty");
        let tamper = self.rng.random_range(0..2) == 0;
        let result = match op {
            Op::Give {
                from,
                to,
                amount_cu,
            } => self
                .ledger()
                .give(id, from, to, amount_cu + u64::from(tamper)),
            Op::Grant { to, amount_cu } => {
                self.ledger()
                    .grant(id, to, amount_cu + u64::from(tamper), None)
            }
        };
        match result {
            Ok(durable) => {
                assert!(!tamper, "step {}: a changed replay was accepted", self.step);
                assert!(durable.wait().unwrap().replayed, "step {}", self.step);
            }
            Err(LedgerError::TransferConflict { .. }) => assert!(tamper, "step {}", self.step),
            Err(error) => panic!("step {}: replay failed: {error}", self.step),
        }
    }

    fn advance(&mut self) {
        let delta = match self.rng.random_range(0..10) {
            0 => DAY_MS * (1 + self.rng.random_range(0..3) as i64),
            1 => DAY_MS / 3,
            _ => self.rng.random_range(0..30_000) as i64,
        };
        self.clock.advance_ms(delta);
    }

    fn crash(&mut self) {
        let balances: HashMap<AccountId, i64> = self
            .spenders
            .iter()
            .chain(&self.sinks)
            .map(|id| (*id, self.ledger().view(*id).unwrap().balance_cu))
            .collect();
        self.ledger = None;
        self.ledger = Some(open_ledger(
            &self.location,
            self.clock.clone(),
            self.policy,
            self.checkpoints,
        ));
        for (id, balance) in balances {
            let view = self.ledger().view(id).unwrap();
            assert_eq!(
                view.balance_cu, balance,
                "step {}: balance after reopen",
                self.step
            );
            assert_eq!(
                view.reserved_cu, 0,
                "step {}: reservations survive a restart",
                self.step
            );
        }
        self.closed.append(&mut self.open);
        self.audit();
    }
}

fn run(seed: u64, steps: u64, dir: &Path) {
    let dir = dir.join(format!("sim-{seed}"));
    std::fs::create_dir_all(&dir).unwrap();
    let location = Location::fresh(&dir);
    let clock = Arc::new(ManualClock::new(
        20_000 * DAY_MS + (seed % 1_000) as i64 * 60_000,
    ));
    let policy = StipendPolicy::new(1_000, Duration::from_millis(DAY_MS as u64), 1_500).unwrap();
    let checkpoints = Checkpoints {
        interval: match seed % 3 {
            0 => Duration::ZERO,
            1 => Duration::from_millis(20),
            _ => Duration::from_secs(3_600),
        },
        on_close: seed.is_multiple_of(2),
    };
    let ledger = open_ledger(&location, clock.clone(), policy, checkpoints);
    let mut spenders = Vec::new();
    for name in ["ann", "bo", "cy", "di"] {
        spenders.push(
            ledger
                .create_account(name, AccountKind::Person)
                .unwrap()
                .wait()
                .unwrap(),
        );
    }
    let pool = ledger
        .create_account("lab", AccountKind::Pool)
        .unwrap()
        .wait()
        .unwrap();
    spenders.push(pool);
    let givers = spenders.clone();
    let sinks = vec![
        ledger.sink("sink:a").unwrap(),
        ledger.sink("sink:b").unwrap(),
    ];
    let mut sim = Sim {
        rng: XorShiftRng::seed_from_u64(seed),
        location,
        clock,
        policy,
        checkpoints,
        ledger: Some(ledger),
        spenders,
        givers,
        sinks,
        open: Vec::new(),
        closed: Vec::new(),
        used_ids: Vec::new(),
        charged_total_cu: 0,
        step: 0,
    };
    for step in 0..steps {
        sim.step = step;
        let choice = sim.rng.random_range(0..100);
        let what = match choice {
            0..=29 => {
                sim.reserve();
                "reserve"
            }
            30..=54 => {
                sim.settle();
                "settle"
            }
            55..=61 => {
                sim.void();
                "void"
            }
            62..=65 => {
                sim.reuse_closed();
                "reuse"
            }
            66..=77 => {
                sim.give();
                "give"
            }
            78..=83 => {
                sim.grant();
                "grant"
            }
            84..=97 => {
                sim.advance();
                "advance"
            }
            _ => {
                sim.crash();
                "crash"
            }
        };
        sim.check(what);
        if step % 97 == 0 {
            sim.audit();
        }
    }
    sim.audit();
}

fn random_interleavings_keep_every_invariant() {
    let steps: u64 = std::env::var("STIPEND_SIM_STEPS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(20_000);
    let seeds: Vec<u64> = match std::env::var("STIPEND_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("STIPEND_SIM_SEED is a number")],
        Err(_) => (1..=20).collect(),
    };
    // fsync costs nothing on tmpfs; durability itself is the crash test's subject.
    let base = if Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let per_seed = (steps / seeds.len() as u64).max(1);
    for seed in seeds {
        let outcome = std::panic::catch_unwind(|| run(seed, per_seed, base.path()));
        if let Err(panic) = outcome {
            eprintln!("simulation failed with STIPEND_SIM_SEED={seed} ({per_seed} steps)");
            std::panic::resume_unwind(panic);
        }
    }
}

on_every_store!(random_interleavings_keep_every_invariant);
