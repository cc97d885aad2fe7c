//! Account names on the real store: normalized when created and looked up, held apart from
//! names they could be taken for, and the ledger's own names reserved.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;

use common::{Harness, policy};
use stipend_ledger::{AccountKind, LedgerError};

fn create(h: &Harness, name: &str) -> Result<stipend_ledger::AccountId, LedgerError> {
    h.ledger()
        .create_account(name, AccountKind::Person)
        .and_then(|durable| durable.wait())
}

fn a_name_like_an_existing_one_is_refused_and_names_it() {
    let h = Harness::new(policy(1_000, 1_000));
    create(&h, "alice").unwrap();
    for (asked, normalized) in [
        ("Alice", "Alice"),
        ("ALICE", "ALICE"),
        ("a1ice", "a1ice"),
        ("ａｌｉce", "alice"),
    ] {
        match create(&h, asked) {
            Err(LedgerError::NameConfusable { name, existing }) => {
                assert_eq!(name, normalized);
                assert_eq!(existing, "alice");
            }
            Err(LedgerError::AccountExists { name }) if normalized == "alice" => {
                assert_eq!(name, "alice");
            }
            other => panic!("{asked:?}: {other:?}"),
        }
    }
    // The homoglyph of the issue: a Cyrillic а in a Latin name is not a name at all.
    assert!(matches!(
        create(&h, "\u{430}lice"),
        Err(LedgerError::InvalidName { .. })
    ));
    // A whole-script look-alike: every letter Cyrillic.
    create(&h, "ace").unwrap();
    let error = create(&h, "\u{430}\u{441}\u{435}").unwrap_err();
    assert!(
        matches!(&error, LedgerError::NameConfusable { existing, .. } if existing == "ace"),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("too like the existing \"ace\""),
        "{error}"
    );
    // Names that differ are fine.
    create(&h, "alicia").unwrap();
    create(&h, "алиса").unwrap();
    assert!(h.verify().ok());
}

fn names_not_yet_durable_are_held_apart_too() {
    let h = Harness::new(policy(1_000, 1_000));
    let ledger = h.ledger();
    // Not waited on: the first is still in the writer's queue when the second is asked for.
    let first = ledger.create_account("bob1", AccountKind::Person).unwrap();
    let second = ledger.create_account("bobl", AccountKind::Person);
    assert!(
        matches!(&second, Err(LedgerError::NameConfusable { existing, .. }) if existing == "bob1"),
        "{:?}",
        second.err()
    );
    first.wait().unwrap();
    assert!(matches!(
        ledger.create_account("BOB1", AccountKind::Pool),
        Err(LedgerError::NameConfusable { .. })
    ));
}

fn lookups_normalize_the_name_asked_for() {
    let h = Harness::new(policy(1_000, 1_000));
    let id = create(&h, "ｆｉｏｎａ").unwrap();
    assert_eq!(h.ledger().view(id).unwrap().name, "fiona");
    assert_eq!(h.ledger().account_id("fiona").unwrap(), id);
    assert_eq!(h.ledger().account_id("ﬁona").unwrap(), id);
    assert_eq!(h.ledger().account_id("ｆｉｏｎａ").unwrap(), id);
    // Lookups are exact past normalization: a look-alike finds nothing rather than the wrong one.
    assert!(matches!(
        h.ledger().account_id("Fiona"),
        Err(LedgerError::UnknownAccount { .. })
    ));
}

fn the_ledgers_own_names_are_reserved() {
    let h = Harness::new(policy(1_000, 1_000));
    for name in ["issuer", "sink:smollm2-135m"] {
        let error = create(&h, name).unwrap_err();
        assert!(
            matches!(&error, LedgerError::InvalidName { reason } if reason.contains("reserved")),
            "{name}: {error:?}"
        );
    }
    // A sink takes its prefix, and model names hold slashes.
    let sink = h.ledger().sink("sink:meta-llama/Llama-3.1-8B").unwrap();
    assert_eq!(
        h.ledger()
            .account_id("sink:meta-llama/Llama-3.1-8B")
            .unwrap(),
        sink
    );
    // A person that looks like a sink is still held apart from it.
    let error = create(&h, "SINK:meta-llama/llama-3.1-8b").unwrap_err();
    assert!(
        matches!(error, LedgerError::NameConfusable { .. }),
        "{error:?}"
    );
}

on_every_store!(
    a_name_like_an_existing_one_is_refused_and_names_it,
    names_not_yet_durable_are_held_apart_too,
    lookups_normalize_the_name_asked_for,
    the_ledgers_own_names_are_reserved,
);
