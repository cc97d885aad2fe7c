//! The ledger's behaviour on the real SQLite store: reserve, settle, void, stipends, gifts,
//! grants, idempotency, bad input, timeouts and restarts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use std::time::Duration;

use common::{DAY_MS, Harness, T0, policy};
use stipend_ledger::{
    AccountId, AccountKind, KeptReport, KeyRecord, KeySpend, LedgerError, LotSource, ModelAccess,
    OperatorAction, TransferId, TransferKind,
};

const MINUTE: Duration = Duration::from_secs(60);

fn a_new_person_receives_the_stipend_at_once() {
    let h = Harness::new(policy(1_000, 1_000));
    let ann = h
        .ledger()
        .create_account("ann", AccountKind::Person)
        .unwrap()
        .wait()
        .unwrap();
    let view = h.ledger().view(ann).unwrap();
    assert_eq!(view.balance_cu, 1_000);
    assert_eq!(view.available_cu, 1_000);
    assert_eq!(view.reserved_cu, 0);
    assert_eq!(view.next_grant_at_ms, Some((T0 / DAY_MS + 1) * DAY_MS));
    assert!(h.verify().ok());
}

fn reserve_settle_charges_exactly_and_releases_the_rest() {
    let h = Harness::new(policy(1_000, 1_000));
    let ledger = h.ledger();
    let ann = ledger
        .create_account("ann", AccountKind::Person)
        .unwrap()
        .wait()
        .unwrap();
    let sink = ledger.sink("sink:model").unwrap();
    let reservation = ledger.reserve(ann, sink, 400, MINUTE).unwrap();
    let view = ledger.view(ann).unwrap();
    assert_eq!(
        (view.balance_cu, view.reserved_cu, view.available_cu),
        (1_000, 400, 600)
    );
    let settlement = ledger
        .settle(reservation.id(), 150)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(settlement.charged_cu, 150);
    assert_eq!(settlement.released_cu, 250);
    assert_eq!(settlement.shortfall_cu, 0);
    let view = ledger.view(ann).unwrap();
    assert_eq!(
        (view.balance_cu, view.reserved_cu, view.available_cu),
        (850, 0, 850)
    );
    assert_eq!(ledger.view(sink).unwrap().balance_cu, 150);
    let period = T0 / DAY_MS;
    assert_eq!(
        ledger.view(ann).unwrap().usage,
        vec![stipend_ledger::Usage {
            sink,
            period,
            day: T0 / DAY_MS,
            requests: 1,
            charged_cu: 150
        }]
    );
    // An account's history lists grants, gifts and stipends; spends are counted, not listed.
    ledger.flush().unwrap();
    let history = ledger.history(ann, 10).unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].kind, TransferKind::Stipend);
    assert!(h.verify().ok(), "{:?}", h.verify());
}

fn refusal_carries_the_available_balance_and_next_grant_and_changes_nothing() {
    let h = Harness::new(policy(1_000, 1_000));
    let ledger = h.ledger();
    let ann = ledger
        .create_account("ann", AccountKind::Person)
        .unwrap()
        .wait()
        .unwrap();
    let sink = ledger.sink("sink:model").unwrap();
    let _held = ledger.reserve(ann, sink, 900, MINUTE).unwrap();
    let error = ledger.reserve(ann, sink, 101, MINUTE).unwrap_err();
    assert_eq!(
        error,
        LedgerError::InsufficientBalance {
            account: ann,
            needed_cu: 101,
            available_cu: 100,
            next_grant_at_ms: Some((T0 / DAY_MS + 1) * DAY_MS),
        }
    );
    assert!(error.to_string().contains("100 GFLOP available"), "{error}");
    let view = ledger.view(ann).unwrap();
    assert_eq!((view.reserved_cu, view.available_cu), (900, 100));
    ledger.reserve(ann, sink, 100, MINUTE).unwrap();
    assert_eq!(ledger.view(ann).unwrap().available_cu, 0);
}

fn settling_more_than_reserved_charges_what_the_balance_covers_and_reports_the_shortfall() {
    let h = Harness::new(policy(1_000, 1_000));
    let ledger = h.ledger();
    let ann = ledger
        .create_account("ann", AccountKind::Person)
        .unwrap()
        .wait()
        .unwrap();
    let sink = ledger.sink("sink:model").unwrap();
    let small = ledger.reserve(ann, sink, 100, MINUTE).unwrap();
    let other = ledger.reserve(ann, sink, 700, MINUTE).unwrap();
    // 100 reserved, 200 free beyond both holds; asking 5000 charges 300.
    let settlement = ledger.settle(small.id(), 5_000).unwrap().wait().unwrap();
    assert_eq!(settlement.charged_cu, 300);
    assert_eq!(settlement.shortfall_cu, 4_700);
    let view = ledger.view(ann).unwrap();
    assert_eq!(
        (view.balance_cu, view.reserved_cu, view.available_cu),
        (700, 700, 0)
    );
    // The other hold is intact and still fully settleable.
    let settlement = ledger.settle(other.id(), 700).unwrap().wait().unwrap();
    assert_eq!(settlement.charged_cu, 700);
    assert_eq!(ledger.view(ann).unwrap().balance_cu, 0);
    assert!(h.verify().ok());
}

fn void_and_double_settle_are_handled() {
    let h = Harness::new(policy(1_000, 1_000));
    let ledger = h.ledger();
    let ann = ledger
        .create_account("ann", AccountKind::Person)
        .unwrap()
        .wait()
        .unwrap();
    let sink = ledger.sink("sink:model").unwrap();
    let reservation = ledger.reserve(ann, sink, 300, MINUTE).unwrap();
    assert_eq!(ledger.void(reservation.id()).unwrap(), 300);
    assert_eq!(ledger.view(ann).unwrap().available_cu, 1_000);
    assert!(matches!(
        ledger.settle(reservation.id(), 10),
        Err(LedgerError::UnknownReservation { .. })
    ));
    assert!(matches!(
        ledger.void(reservation.id()),
        Err(LedgerError::UnknownReservation { .. })
    ));
    let reservation = ledger.reserve(ann, sink, 300, MINUTE).unwrap();
    ledger.settle(reservation.id(), 10).unwrap().wait().unwrap();
    assert!(matches!(
        ledger.settle(reservation.id(), 10),
        Err(LedgerError::UnknownReservation { .. })
    ));
    assert_eq!(ledger.view(ann).unwrap().balance_cu, 990);
    assert!(h.verify().ok());
}

fn timed_out_reservations_are_voided() {
    let h = Harness::new(policy(1_000, 1_000));
    let ledger = h.ledger();
    let ann = ledger
        .create_account("ann", AccountKind::Person)
        .unwrap()
        .wait()
        .unwrap();
    let sink = ledger.sink("sink:model").unwrap();
    let reservation = ledger
        .reserve(ann, sink, 800, Duration::from_secs(5))
        .unwrap();
    h.clock.advance_ms(4_999);
    assert_eq!(ledger.view(ann).unwrap().available_cu, 200);
    h.clock.advance_ms(1);
    // The deadline has passed: the next touch of the ledger voids it.
    assert_eq!(ledger.sweep().unwrap(), 1);
    assert_eq!(ledger.view(ann).unwrap().available_cu, 1_000);
    assert!(matches!(
        ledger.settle(reservation.id(), 1),
        Err(LedgerError::UnknownReservation { .. })
    ));
    // A settle after the deadline but before any sweep is refused too, and releases the hold.
    let late = ledger
        .reserve(ann, sink, 500, Duration::from_secs(1))
        .unwrap();
    h.clock.advance_ms(1_000);
    assert!(ledger.settle(late.id(), 1).is_err());
    assert_eq!(ledger.view(ann).unwrap().available_cu, 1_000);
    assert_eq!(ledger.open_reservations(), 0);
}

fn stipends_arrive_lazily_with_the_rollover_cap_across_many_periods() {
    let mut h = Harness::new(policy(1_000, 1_500));
    let ann = h
        .ledger()
        .create_account("ann", AccountKind::Person)
        .unwrap()
        .wait()
        .unwrap();
    let sink = h.ledger().sink("sink:model").unwrap();
    let spend = |h: &Harness, amount| {
        let r = h.ledger().reserve(ann, sink, amount, MINUTE).unwrap();
        h.ledger().settle(r.id(), amount).unwrap().wait().unwrap();
    };
    spend(&h, 400);
    assert_eq!(h.ledger().view(ann).unwrap().balance_cu, 600);
    // Next period: 600 carried (under the 1500 cap) + 1000.
    h.clock.advance_ms(DAY_MS);
    assert_eq!(h.ledger().view(ann).unwrap().balance_cu, 1_600);
    // Next: 1500 carried at most + 1000.
    h.clock.advance_ms(DAY_MS);
    assert_eq!(h.ledger().view(ann).unwrap().balance_cu, 2_500);
    // A year idle changes nothing beyond the cap, and survives a restart.
    h.clock.advance_ms(365 * DAY_MS);
    h.reopen();
    let view = h.ledger().view(ann).unwrap();
    assert_eq!(view.balance_cu, 2_500);
    assert_eq!(view.lots.len(), 1);
    assert_eq!(view.lots[0].source, LotSource::Stipend);
    let report = h.verify();
    assert!(report.ok(), "{report:?}");
}

fn a_grant_expires_and_spending_burns_the_soonest_expiry_first() {
    let h = Harness::new(policy(1_000, 0));
    let ledger = h.ledger();
    let ann = ledger
        .create_account("ann", AccountKind::Person)
        .unwrap()
        .wait()
        .unwrap();
    let sink = ledger.sink("sink:model").unwrap();
    let late = T0 + 10 * DAY_MS;
    ledger
        .grant(TransferId(1), ann, 500, Some(late))
        .unwrap()
        .wait()
        .unwrap();
    ledger
        .grant(TransferId(2), ann, 300, None)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(ledger.view(ann).unwrap().balance_cu, 1_800);
    // 1200 spent: the stipend (expires tonight) first, then 200 of the dated grant.
    let r = ledger.reserve(ann, sink, 1_200, MINUTE).unwrap();
    ledger.settle(r.id(), 1_200).unwrap().wait().unwrap();
    let lots = ledger.view(ann).unwrap().lots;
    assert_eq!(lots.len(), 2);
    assert_eq!(
        (lots[0].remaining_cu, lots[0].expires_at_ms),
        (300, Some(late))
    );
    assert_eq!((lots[1].remaining_cu, lots[1].expires_at_ms), (300, None));
    // Past the grant's expiry: it goes, the undated one stays, a fresh stipend arrives.
    h.clock.set_ms(late);
    let view = ledger.view(ann).unwrap();
    assert_eq!(view.balance_cu, 300 + 1_000);
    assert!(h.verify().ok());
}

fn gifts_keep_their_expiry_and_pools_receive_contributions() {
    let h = Harness::new(policy(1_000, 0));
    let ledger = h.ledger();
    let ann = ledger
        .create_account("ann", AccountKind::Person)
        .unwrap()
        .wait()
        .unwrap();
    let bo = ledger
        .create_account("bo", AccountKind::Person)
        .unwrap()
        .wait()
        .unwrap();
    let pool = ledger
        .create_account("lab", AccountKind::Pool)
        .unwrap()
        .wait()
        .unwrap();
    let gift = ledger
        .give(TransferId(10), ann, bo, 400)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(gift.transfer.kind, TransferKind::Gift);
    assert!(!gift.replayed);
    let contribution = ledger
        .give(TransferId(11), ann, pool, 100)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(contribution.transfer.kind, TransferKind::PoolContribution);
    assert_eq!(ledger.view(ann).unwrap().balance_cu, 500);
    let bo_view = ledger.view(bo).unwrap();
    assert_eq!(bo_view.balance_cu, 1_400);
    let gifted = bo_view
        .lots
        .iter()
        .find(|lot| lot.source == LotSource::Gift)
        .unwrap();
    let tonight = (T0 / DAY_MS + 1) * DAY_MS;
    assert_eq!(
        gifted.expires_at_ms,
        Some(tonight),
        "a gift of stipend expires with it"
    );
    // Tomorrow (no rollover) the gifted stipend is gone like the rest.
    h.clock.set_ms(tonight);
    assert_eq!(ledger.view(bo).unwrap().balance_cu, 1_000);
    assert_eq!(ledger.view(pool).unwrap().balance_cu, 0);
    assert!(h.verify().ok());
}

fn replaying_a_transfer_id_is_a_no_op_and_reusing_it_is_a_conflict() {
    let mut h = Harness::new(policy(1_000, 1_000));
    let ann = h
        .ledger()
        .create_account("ann", AccountKind::Person)
        .unwrap()
        .wait()
        .unwrap();
    let bo = h
        .ledger()
        .create_account("bo", AccountKind::Person)
        .unwrap()
        .wait()
        .unwrap();
    let id = TransferId(77);
    let first = h.ledger().give(id, ann, bo, 100).unwrap();
    // Replayed before the first is durable, and again after.
    let again = h.ledger().give(id, ann, bo, 100).unwrap().wait().unwrap();
    assert!(again.replayed);
    assert!(!first.wait().unwrap().replayed);
    assert_eq!(h.ledger().view(ann).unwrap().balance_cu, 900);
    h.reopen();
    assert!(
        h.ledger()
            .give(id, ann, bo, 100)
            .unwrap()
            .wait()
            .unwrap()
            .replayed
    );
    assert_eq!(
        h.ledger().give(id, ann, bo, 101).unwrap_err(),
        LedgerError::TransferConflict { id }
    );
    assert_eq!(
        h.ledger().grant(id, ann, 100, None).unwrap_err(),
        LedgerError::TransferConflict { id }
    );
    let grant = TransferId(78);
    h.ledger()
        .grant(grant, ann, 5, None)
        .unwrap()
        .wait()
        .unwrap();
    assert!(
        h.ledger()
            .grant(grant, ann, 5, None)
            .unwrap()
            .wait()
            .unwrap()
            .replayed
    );
    assert_eq!(h.ledger().view(ann).unwrap().balance_cu, 905);
    assert_eq!(h.ledger().view(bo).unwrap().balance_cu, 1_100);
    assert!(h.verify().ok());
}

fn bad_input_is_refused_and_changes_nothing() {
    let h = Harness::new(policy(1_000, 1_000));
    let ledger = h.ledger();
    let ann = ledger
        .create_account("ann", AccountKind::Person)
        .unwrap()
        .wait()
        .unwrap();
    let pool = ledger
        .create_account("lab", AccountKind::Pool)
        .unwrap()
        .wait()
        .unwrap();
    let sink = ledger.sink("sink:model").unwrap();
    let issuer = ledger.issuer();
    let before = ledger.view(ann).unwrap();
    let stranger = stipend_ledger::AccountId(9_999);
    let cases: Vec<(&str, Result<(), LedgerError>)> = vec![
        (
            "zero reserve",
            ledger.reserve(ann, sink, 0, MINUTE).map(drop),
        ),
        (
            "huge reserve",
            ledger.reserve(ann, sink, u64::MAX, MINUTE).map(drop),
        ),
        (
            "zero timeout",
            ledger.reserve(ann, sink, 1, Duration::ZERO).map(drop),
        ),
        (
            "long timeout",
            ledger
                .reserve(ann, sink, 1, Duration::from_secs(86_400))
                .map(drop),
        ),
        (
            "unknown account",
            ledger.reserve(stranger, sink, 1, MINUTE).map(drop),
        ),
        (
            "sink as spender",
            ledger.reserve(sink, sink, 1, MINUTE).map(drop),
        ),
        (
            "person as sink",
            ledger.reserve(ann, pool, 1, MINUTE).map(drop),
        ),
        (
            "unknown reservation",
            ledger
                .settle(stipend_ledger::ReservationId(12345), 1)
                .map(drop),
        ),
        (
            "zero gift",
            ledger.give(TransferId(1), ann, pool, 0).map(drop),
        ),
        (
            "self gift",
            ledger.give(TransferId(2), ann, ann, 1).map(drop),
        ),
        (
            "gift too large",
            ledger.give(TransferId(3), ann, pool, 1_001).map(drop),
        ),
        (
            "gift to sink",
            ledger.give(TransferId(4), ann, sink, 1).map(drop),
        ),
        (
            "gift from issuer",
            ledger.give(TransferId(5), issuer, ann, 1).map(drop),
        ),
        (
            "zero grant",
            ledger.grant(TransferId(6), ann, 0, None).map(drop),
        ),
        (
            "grant to sink",
            ledger.grant(TransferId(7), sink, 1, None).map(drop),
        ),
        (
            "grant expired",
            ledger.grant(TransferId(8), ann, 1, Some(T0 - 1)).map(drop),
        ),
        (
            "duplicate name",
            ledger.create_account("ann", AccountKind::Person).map(drop),
        ),
        (
            "empty name",
            ledger.create_account("", AccountKind::Person).map(drop),
        ),
        (
            "bad name",
            ledger.create_account("a b", AccountKind::Person).map(drop),
        ),
        (
            "second issuer",
            ledger.create_account("x", AccountKind::Issuer).map(drop),
        ),
    ];
    for (what, result) in cases {
        let error = result.expect_err(what);
        assert!(!error.to_string().is_empty(), "{what}");
    }
    assert_eq!(ledger.view(ann).unwrap(), before);
    assert_eq!(ledger.view(pool).unwrap().balance_cu, 0);
    assert_eq!(ledger.open_reservations(), 0);
    let report = h.verify();
    assert!(report.ok(), "{report:?}");
    // Only the issuer, ann's stipend and the accounts' creation were ever written.
    assert_eq!(report.n_transfers, 1);
}

fn a_restart_keeps_every_settle_and_voids_open_reservations() {
    let mut h = Harness::new(policy(1_000, 1_000));
    let ann = h
        .ledger()
        .create_account("ann", AccountKind::Person)
        .unwrap()
        .wait()
        .unwrap();
    let sink = h.ledger().sink("sink:model").unwrap();
    let settled = h.ledger().reserve(ann, sink, 100, MINUTE).unwrap();
    h.ledger().settle(settled.id(), 60).unwrap().wait().unwrap();
    let open = h.ledger().reserve(ann, sink, 500, MINUTE).unwrap();
    h.reopen();
    let view = h.ledger().view(ann).unwrap();
    assert_eq!(
        (view.balance_cu, view.reserved_cu, view.available_cu),
        (940, 0, 940)
    );
    assert!(matches!(
        h.ledger().settle(open.id(), 1),
        Err(LedgerError::UnknownReservation { .. })
    ));
    assert_eq!(h.ledger().view(sink).unwrap().balance_cu, 60);
    assert!(h.verify().ok());
    // Usage this period survives the restart; the next period starts from zero.
    let view = h.ledger().view(ann).unwrap();
    assert_eq!(view.usage.len(), 1);
    assert_eq!((view.usage[0].requests, view.usage[0].charged_cu), (1, 60));
    h.clock.advance_ms(DAY_MS);
    assert_eq!(h.ledger().view(ann).unwrap().usage, vec![]);
}

/// A real store that can be told to fail its commits, as a full disk or a lost volume would.
struct FailingStore {
    inner: std::sync::Arc<dyn stipend_ledger::Store>,
    fail: std::sync::atomic::AtomicBool,
    /// Held by a test to keep commits waiting, so that it can queue several changes first.
    gate: std::sync::Mutex<()>,
}

impl stipend_ledger::Store for FailingStore {
    fn account(
        &self,
        id: stipend_ledger::AccountId,
    ) -> Result<Option<stipend_ledger::AccountRecord>, stipend_ledger::StoreError> {
        self.inner.account(id)
    }
    fn account_by_name(
        &self,
        name: &str,
    ) -> Result<Option<stipend_ledger::AccountRecord>, stipend_ledger::StoreError> {
        self.inner.account_by_name(name)
    }
    fn probe_write(&self) -> Result<(), stipend_ledger::StoreError> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(stipend_ledger::StoreError::Io("injected".to_string()));
        }
        self.inner.probe_write()
    }
    fn account_by_skeleton(
        &self,
        skeleton: &str,
    ) -> Result<Option<stipend_ledger::AccountRecord>, stipend_ledger::StoreError> {
        self.inner.account_by_skeleton(skeleton)
    }
    fn accounts(
        &self,
        after: Option<stipend_ledger::AccountId>,
        limit: usize,
    ) -> Result<Vec<stipend_ledger::AccountRecord>, stipend_ledger::StoreError> {
        self.inner.accounts(after, limit)
    }
    fn account_id_max(
        &self,
    ) -> Result<Option<stipend_ledger::AccountId>, stipend_ledger::StoreError> {
        self.inner.account_id_max()
    }
    fn transfer(
        &self,
        id: TransferId,
    ) -> Result<Option<stipend_ledger::Transfer>, stipend_ledger::StoreError> {
        self.inner.transfer(id)
    }
    fn transfers_of(
        &self,
        account: stipend_ledger::AccountId,
        limit: usize,
    ) -> Result<Vec<stipend_ledger::Transfer>, stipend_ledger::StoreError> {
        self.inner.transfers_of(account, limit)
    }
    fn checkpoint_seq(&self) -> Result<i64, stipend_ledger::StoreError> {
        self.inner.checkpoint_seq()
    }
    fn transfers_after_checkpoint(
        &self,
        visit: &mut dyn FnMut(stipend_ledger::Transfer),
    ) -> Result<(), stipend_ledger::StoreError> {
        self.inner.transfers_after_checkpoint(visit)
    }
    fn commit(&self, batch: &stipend_ledger::Batch) -> Result<(), stipend_ledger::StoreError> {
        drop(self.gate.lock().unwrap());
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(stipend_ledger::StoreError::Io(
                "database or disk is full".to_string(),
            ));
        }
        self.inner.commit(batch)
    }
    fn insert_key(
        &self,
        key: &stipend_ledger::KeyRecord,
    ) -> Result<(), stipend_ledger::StoreError> {
        self.inner.insert_key(key)
    }
    fn revoke_key(&self, id: &str, at_ms: i64) -> Result<bool, stipend_ledger::StoreError> {
        self.inner.revoke_key(id, at_ms)
    }
    fn key(
        &self,
        id: &str,
    ) -> Result<Option<stipend_ledger::KeyRecord>, stipend_ledger::StoreError> {
        self.inner.key(id)
    }
    fn keys_of(
        &self,
        account: stipend_ledger::AccountId,
    ) -> Result<Vec<stipend_ledger::KeyRecord>, stipend_ledger::StoreError> {
        self.inner.keys_of(account)
    }
    fn audit(
        &self,
        visit_account: &mut dyn FnMut(stipend_ledger::AuditRow),
        visit_tail: &mut dyn FnMut(stipend_ledger::Transfer),
    ) -> Result<stipend_ledger::TransferAudit, stipend_ledger::StoreError> {
        self.inner.audit(visit_account, visit_tail)
    }
}

fn a_failed_commit_fails_the_ledger_closed_until_the_store_takes_writes_again() {
    // Guards against serving uncharged: once a commit fails, memory is ahead of the store, so
    // nothing more may be decided until the ledger has reloaded from it.
    let dir = tempfile::tempdir().unwrap();
    let location = common::Location::fresh(dir.path());
    let clock = std::sync::Arc::new(stipend_ledger::ManualClock::new(T0));
    let store = std::sync::Arc::new(FailingStore {
        inner: location.open(),
        fail: std::sync::atomic::AtomicBool::new(false),
        gate: std::sync::Mutex::new(()),
    });
    let ledger = stipend_ledger::Ledger::open(
        store.clone(),
        clock.clone(),
        stipend_ledger::LedgerOptions::new(policy(1_000, 1_000)),
    )
    .unwrap();
    let ann = ledger
        .create_account("ann", AccountKind::Person)
        .unwrap()
        .wait()
        .unwrap();
    let sink = ledger.sink("sink:model").unwrap();
    let kept = ledger.reserve(ann, sink, 100, MINUTE).unwrap();
    ledger.settle(kept.id(), 100).unwrap().wait().unwrap();
    let held = ledger.reserve(ann, sink, 200, MINUTE).unwrap();
    store.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    // Two settles decided before the failure is known (the commits held back meanwhile):
    // neither is ever acknowledged, however late it is asked about.
    let gate = store.gate.lock().unwrap();
    let lost = ledger.reserve(ann, sink, 50, MINUTE).unwrap();
    let also_lost = ledger.reserve(ann, sink, 30, MINUTE).unwrap();
    let first = ledger.settle(lost.id(), 50).unwrap();
    let second = ledger.settle(also_lost.id(), 30).unwrap();
    drop(gate);
    let error = first.wait().unwrap_err();
    assert!(
        matches!(error, LedgerError::Unavailable { .. }),
        "{error:?}"
    );
    // Everything after is refused, reads included, while the store refuses writes.
    assert!(matches!(
        ledger.reserve(ann, sink, 1, MINUTE),
        Err(LedgerError::Unavailable { .. })
    ));
    assert!(matches!(
        ledger.settle(held.id(), 1),
        Err(LedgerError::Unavailable { .. })
    ));
    assert!(matches!(
        ledger.view(ann),
        Err(LedgerError::Unavailable { .. })
    ));
    assert!(matches!(
        ledger.flush(),
        Err(LedgerError::Unavailable { .. })
    ));
    std::thread::sleep(std::time::Duration::from_millis(1_500));
    assert!(matches!(
        ledger.view(ann),
        Err(LedgerError::Unavailable { .. })
    ));
    // The store takes writes again: the same ledger reopens by itself, as a restart would have
    // reopened it: exactly what was acknowledged, no reservation left open.
    store.fail.store(false, std::sync::atomic::Ordering::SeqCst);
    let started = std::time::Instant::now();
    let view = loop {
        match ledger.view(ann) {
            Ok(view) => break view,
            Err(_) if started.elapsed() < std::time::Duration::from_secs(10) => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(error) => panic!("the ledger did not reopen: {error:?}"),
        }
    };
    assert_eq!((view.balance_cu, view.reserved_cu), (900, 0));
    assert!(second.wait().is_err(), "a lost settle was acknowledged");
    assert!(matches!(
        ledger.settle(held.id(), 1),
        Err(LedgerError::UnknownReservation { .. })
    ));
    let again = ledger.reserve(ann, sink, 40, MINUTE).unwrap();
    ledger.settle(again.id(), 40).unwrap().wait().unwrap();
    drop(ledger);
    drop(store);
    let ledger = stipend_ledger::Ledger::open(
        location.open(),
        clock,
        stipend_ledger::LedgerOptions::new(policy(1_000, 1_000)),
    )
    .unwrap();
    let view = ledger.view(ann).unwrap();
    assert_eq!((view.balance_cu, view.reserved_cu), (860, 0));
    ledger.flush().unwrap();
    assert!(location.audit().ok());
}

/// Access rules: a model restricted to accounts and groups, groups' members added and taken
/// out, a rule lifted; each change counted, and all of it kept across a restart.
fn access_rules_are_kept_and_counted() {
    let mut h = Harness::new(policy(1_000, 1_000));
    let store = h.ledger().store();
    let before = store.access_rules().unwrap();
    assert!(before.models.is_empty() && before.groups.is_empty());
    store
        .set_model_access("big", &[AccountId(7)], &["staff".to_string()])
        .unwrap();
    store
        .set_model_access("small", &[AccountId(8), AccountId(9)], &[])
        .unwrap();
    assert!(store.set_group_member("staff", AccountId(3), true).unwrap());
    assert!(store.set_group_member("staff", AccountId(4), true).unwrap());
    assert!(
        !store.set_group_member("staff", AccountId(4), true).unwrap(),
        "already a member"
    );
    assert!(
        store
            .set_group_member("staff", AccountId(3), false)
            .unwrap()
    );
    assert!(
        !store
            .set_group_member("staff", AccountId(3), false)
            .unwrap(),
        "not a member"
    );
    store.set_model_access("small", &[], &[]).unwrap();
    let version = store.access_version().unwrap();
    assert_eq!(version, before.version + 6);
    drop(store);
    h.reopen();
    let rules = h.ledger().store().access_rules().unwrap();
    assert_eq!(rules.version, version);
    assert_eq!(
        rules.models,
        vec![ModelAccess {
            model: "big".to_string(),
            accounts: vec![AccountId(7)],
            groups: vec!["staff".to_string()],
        }]
    );
    assert_eq!(
        rules.groups,
        vec![("staff".to_string(), vec![AccountId(4)])]
    );
}

/// A key's cap and what it spent: set, counted per period (a new period starts again from
/// nothing, an older one's spending is not counted in a newer), kept across a restart.
fn key_caps_count_spending_per_period() {
    let mut h = Harness::new(policy(1_000, 1_000));
    let store = h.ledger().store();
    let key = |id: &str| KeyRecord {
        id: id.to_string(),
        account: AccountId(5),
        secret_sha256: [1; 32],
        created_at_ms: 1,
        revoked_at_ms: None,
        cap: None,
        name: None,
    };
    store.insert_key(&key("a")).unwrap();
    store.insert_key(&key("b")).unwrap();
    assert!(store.set_key_cap("a", Some(500)).unwrap());
    assert!(!store.set_key_cap("nope", Some(1)).unwrap());
    let spend = |id: &str, period: i64, spent_cu: u64| KeySpend {
        id: id.to_string(),
        period,
        spent_cu,
    };
    assert_eq!(
        store
            .add_key_spends(&[spend("a", 7, 100), spend("a", 7, 50), spend("gone", 7, 9)])
            .unwrap(),
        vec![100, 150, 0]
    );
    // A new period starts from nothing; a late count of the old one does not reach the new.
    assert_eq!(
        store.add_key_spends(&[spend("a", 8, 20)]).unwrap(),
        vec![20]
    );
    assert_eq!(
        store.add_key_spends(&[spend("a", 7, 999)]).unwrap(),
        vec![0]
    );
    let cap = store.key("a").unwrap().unwrap().cap.unwrap();
    assert_eq!((cap.cap_cu, cap.period, cap.spent_cu), (500, 8, 20));
    assert_eq!(store.key("b").unwrap().unwrap().cap, None);
    drop(store);
    h.reopen();
    let store = h.ledger().store();
    assert_eq!(store.key("a").unwrap().unwrap().cap, Some(cap));
    // Lifting the cap keeps the count; setting it again finds it.
    assert!(store.set_key_cap("a", None).unwrap());
    assert_eq!(store.key("a").unwrap().unwrap().cap, None);
    store.set_key_cap("a", Some(40)).unwrap();
    assert_eq!(store.key("a").unwrap().unwrap().cap.unwrap().spent_cu, 20);
    // A key's name is its person's to set and take away.
    assert!(store.set_key_name("a", Some("the script")).unwrap());
    assert_eq!(
        store.key("a").unwrap().unwrap().name.as_deref(),
        Some("the script")
    );
    assert!(store.set_key_name("a", None).unwrap());
    assert_eq!(store.key("a").unwrap().unwrap().name, None);
    assert!(!store.set_key_name("nope", Some("x")).unwrap());
}

/// A person's export: every transfer naming the account, spends included, oldest first, and
/// none of anyone else's.
fn all_transfers_of_an_account_include_its_spends() {
    let h = Harness::new(policy(1_000, 1_000));
    let ledger = h.ledger();
    let person = |name: &str| {
        ledger
            .create_account(name, AccountKind::Person)
            .unwrap()
            .wait()
            .unwrap()
    };
    let (ann, bo) = (person("ann"), person("bo"));
    let sink = ledger.sink("sink:m").unwrap();
    for (account, cu) in [(ann, 10), (bo, 20), (ann, 30)] {
        let reservation = ledger
            .reserve(account, sink, cu, Duration::from_secs(60))
            .unwrap();
        ledger.settle(reservation.id(), cu).unwrap().wait().unwrap();
    }
    ledger
        .give(TransferId(77), bo, ann, 5)
        .unwrap()
        .wait()
        .unwrap();
    ledger.flush().unwrap();
    let mine = ledger.store().all_transfers_of(ann).unwrap();
    let seen: Vec<(TransferKind, u64)> = mine
        .iter()
        .map(|transfer| (transfer.kind, transfer.amount_cu))
        .collect();
    assert_eq!(
        seen,
        [
            (TransferKind::Stipend, 1_000),
            (TransferKind::Spend, 10),
            (TransferKind::Spend, 30),
            (TransferKind::Gift, 5),
        ]
    );
    assert!(
        mine.iter()
            .all(|transfer| transfer.debit == ann || transfer.credit == ann)
    );
}

/// The operator log: entries kept in order, read newest first a page at a time, across a restart.
fn the_operator_log_keeps_who_did_what() {
    let mut h = Harness::new(policy(1_000, 1_000));
    let store = h.ledger().store();
    assert!(store.actions(None, 10).unwrap().is_empty());
    for n in 0..5u64 {
        store
            .record_action(&OperatorAction {
                at_ms: 1_000 + n as i64,
                actor: "cli".to_string(),
                action: "grant".to_string(),
                account: Some(AccountId(n + 2)),
                object: (n == 3).then(|| "a key".to_string()),
                amount_cu: Some(n * 10),
            })
            .unwrap();
    }
    drop(store);
    h.reopen();
    let store = h.ledger().store();
    let page = store.actions(None, 2).unwrap();
    assert_eq!(
        page.iter()
            .map(|(_, action)| action.at_ms)
            .collect::<Vec<_>>(),
        [1_004, 1_003]
    );
    assert_eq!(page[1].1.object.as_deref(), Some("a key"));
    let next = store.actions(Some(page[1].0), 10).unwrap();
    assert_eq!(
        next.iter()
            .map(|(_, action)| action.amount_cu)
            .collect::<Vec<_>>(),
        [Some(20), Some(10), Some(0)]
    );
    assert_eq!(next[2].1.account, Some(AccountId(2)));
}

/// Closing an account: its whole balance back to the issuer in one transfer, closed for good
/// (no stipend, grant, gift or reservation), its name erased, across a restart; refused while a
/// reservation holds compute; `verify` still passes.
fn closing_returns_everything_and_closes_for_good() {
    let mut h = Harness::new(policy(1_000, 1_000));
    let (ann, sink, issuer) = {
        let ledger = h.ledger();
        let ann = ledger
            .create_account("ann", AccountKind::Person)
            .unwrap()
            .wait()
            .unwrap();
        let sink = ledger.sink("sink:model").unwrap();
        ledger
            .grant(TransferId(7), ann, 500, None)
            .unwrap()
            .wait()
            .unwrap();
        let spent = ledger.reserve(ann, sink, 100, MINUTE).unwrap();
        ledger.settle(spent.id(), 100).unwrap().wait().unwrap();
        (ann, sink, ledger.issuer())
    };
    let ledger = h.ledger();
    // A call in flight holds compute: not yet.
    let open = ledger.reserve(ann, sink, 50, MINUTE).unwrap();
    assert!(matches!(
        ledger.close(ann),
        Err(LedgerError::AccountBusy {
            reserved_cu: 50,
            ..
        })
    ));
    ledger.void(open.id()).unwrap();
    let issuer_before = ledger.view(issuer).unwrap().balance_cu;
    let posted = ledger.close(ann).unwrap().wait().unwrap().unwrap();
    assert_eq!(posted.transfer.kind, TransferKind::Closure);
    assert_eq!(posted.transfer.amount_cu, 1_400);
    assert_eq!(
        ledger.view(issuer).unwrap().balance_cu,
        issuer_before + 1_400
    );
    let view = ledger.view(ann).unwrap();
    assert_eq!(
        (view.kind, view.balance_cu, view.available_cu),
        (AccountKind::Closed, 0, 0)
    );
    assert!(view.lots.is_empty());
    // Closed for good: nothing comes in, nothing is reserved; a second close does nothing.
    assert!(matches!(
        ledger.grant(TransferId(8), ann, 10, None),
        Err(LedgerError::WrongKind { .. })
    ));
    assert!(ledger.reserve(ann, sink, 10, MINUTE).is_err());
    assert!(ledger.close(ann).unwrap().wait().unwrap().is_none());
    ledger.erase_names(ann, "closed:0123").unwrap();
    assert_eq!(ledger.view(ann).unwrap().name, "closed:0123");
    assert!(matches!(
        ledger.account_id("ann"),
        Err(LedgerError::UnknownAccount { .. })
    ));
    // Nobody can be made under a closed account's kind of name.
    assert!(matches!(
        ledger.create_account("closed:abc", AccountKind::Person),
        Err(LedgerError::InvalidName { .. })
    ));
    ledger.flush().unwrap();
    // Across a restart and a new period: still closed, empty, anonymous; no stipend arrives.
    h.reopen();
    h.clock.advance_ms(DAY_MS);
    let ledger = h.ledger();
    let view = ledger.view(ann).unwrap();
    assert_eq!((view.kind, view.balance_cu), (AccountKind::Closed, 0));
    assert_eq!(view.name, "closed:0123");
    assert_eq!(ledger.account_id("closed:0123").unwrap(), ann);
    ledger.flush().unwrap();
    let report = h.location.audit();
    assert!(report.violations.is_empty(), "{:?}", report.violations);
}

/// Transparency reports: kept once per period (a second keep returns the first), read back
/// across a restart, and listed with the ε each spent.
fn a_period_report_is_kept_once() {
    let mut h = Harness::new(policy(1_000, 1_000));
    let store = h.ledger().store();
    assert_eq!(store.report(86_400_000).unwrap(), None);
    let report = |start: i64, body: &str| KeptReport {
        period_start_ms: start,
        epsilon: 1.0,
        made_at_ms: start + 86_400_000,
        body: body.to_string(),
    };
    assert_eq!(
        store.keep_report(&report(86_400_000, "first")).unwrap(),
        "first"
    );
    assert_eq!(
        store.keep_report(&report(86_400_000, "second")).unwrap(),
        "first"
    );
    let mut half = report(0, "earlier");
    half.epsilon = 0.5;
    assert_eq!(store.keep_report(&half).unwrap(), "earlier");
    drop(store);
    h.reopen();
    let store = h.ledger().store();
    assert_eq!(store.report(86_400_000).unwrap().as_deref(), Some("first"));
    assert_eq!(store.reports().unwrap(), [(0, 0.5), (86_400_000, 1.0)]);
}

/// The operator's search: accounts whose names begin with what was typed, in name order.
fn accounts_are_found_by_the_start_of_their_name() {
    let h = Harness::new(policy(1_000, 1_000));
    for name in ["alice", "alicia", "al", "bob", "ålice", "zoe"] {
        h.ledger()
            .create_account(name, AccountKind::Person)
            .unwrap()
            .wait()
            .unwrap();
    }
    h.ledger().flush().unwrap();
    let store = h.ledger().store();
    let names = |prefix: &str, limit: usize| -> Vec<String> {
        store
            .accounts_named_like(prefix, limit)
            .unwrap()
            .into_iter()
            .map(|(_, name)| name)
            .collect()
    };
    assert_eq!(names("ali", 10), ["alice", "alicia"]);
    assert_eq!(names("al", 10), ["al", "alice", "alicia"]);
    assert_eq!(names("al", 2), ["al", "alice"]);
    assert_eq!(names("å", 10), ["ålice"]);
    assert!(names("x", 10).is_empty());
    // A prefix that is a name is found too; every id names its account.
    for (id, name) in store.accounts_named_like("bob", 10).unwrap() {
        assert_eq!(h.ledger().view(id).unwrap().name, name);
    }
}

on_every_store!(
    closing_returns_everything_and_closes_for_good,
    a_period_report_is_kept_once,
    all_transfers_of_an_account_include_its_spends,
    the_operator_log_keeps_who_did_what,
    accounts_are_found_by_the_start_of_their_name,
    key_caps_count_spending_per_period,
    access_rules_are_kept_and_counted,
    a_new_person_receives_the_stipend_at_once,
    reserve_settle_charges_exactly_and_releases_the_rest,
    refusal_carries_the_available_balance_and_next_grant_and_changes_nothing,
    settling_more_than_reserved_charges_what_the_balance_covers_and_reports_the_shortfall,
    void_and_double_settle_are_handled,
    timed_out_reservations_are_voided,
    stipends_arrive_lazily_with_the_rollover_cap_across_many_periods,
    a_grant_expires_and_spending_burns_the_soonest_expiry_first,
    gifts_keep_their_expiry_and_pools_receive_contributions,
    replaying_a_transfer_id_is_a_no_op_and_reusing_it_is_a_conflict,
    bad_input_is_refused_and_changes_nothing,
    a_restart_keeps_every_settle_and_voids_open_reservations,
    a_failed_commit_fails_the_ledger_closed_until_the_store_takes_writes_again,
);
