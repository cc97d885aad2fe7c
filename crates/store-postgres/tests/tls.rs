//! The store over TLS, against a server of the tests' own that takes TCP connections over TLS
//! only (its certificate, for `localhost` and 127.0.0.1, signed by the test CA in
//! `crates/gateway/tests/data`): with the CA named, everything works; without it, or without
//! TLS, nothing connects; and a URL's TLS settings are checked before anything is tried.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use stipend_ledger::{AccountId, AccountKind, AccountRecord, Batch, Store};
use stipend_store_postgres::test_server::TestServer;
use stipend_store_postgres::{PostgresStore, check_url};

/// A file of the gateway's test data. The crate's directory is read at run time (cargo sets it):
/// a test binary reused from a build in another checkout must not point back into that one.
fn data(name: &str) -> PathBuf {
    let crate_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    crate_dir.join(format!("../gateway/tests/data/{name}"))
}

fn person(id: u64, name: &str) -> AccountRecord {
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

fn refused(url: &str) -> String {
    match PostgresStore::open(url) {
        Ok(_) => panic!("{url} was let in"),
        Err(error) => error.to_string(),
    }
}

#[test]
fn a_database_that_speaks_only_tls_is_reached_verified_and_only_so() {
    let server = TestServer::start_tls(&data("localhost.pem"), &data("localhost.key")).unwrap();
    let url = server.fresh_database().unwrap();
    let ca = data("ca.pem");
    let verified = format!("{url}?sslmode=verify-full&sslrootcert={}", ca.display());
    assert!(check_url(&verified).unwrap().ends_with("over TLS"));

    // With the CA named: the store works, as over plain TCP.
    {
        let store = PostgresStore::open(&verified).unwrap();
        store
            .commit(&Batch {
                created: vec![person(1, "ada")],
                ..Batch::default()
            })
            .unwrap();
    }
    for mode in ["require", "verify-ca", "prefer"] {
        let url = format!("{url}?sslmode={mode}&sslrootcert={}", ca.display());
        let store = PostgresStore::open_read_only(&url).unwrap();
        assert_eq!(store.account(AccountId(1)).unwrap().unwrap().name, "ada");
    }

    // Without TLS, the server refuses; without the CA, the certificate is not trusted.
    let plain = refused(&url);
    assert!(plain.contains("no encryption"), "{plain}");
    let untrusted = refused(&format!("{url}?sslmode=verify-full"));
    assert!(untrusted.contains("certificate"), "{untrusted}");
    // A CA file that is not one is named as such.
    let not_pem = refused(&format!(
        "{url}?sslmode=require&sslrootcert={}",
        data("README.md").display()
    ));
    assert!(not_pem.contains("sslrootcert"), "{not_pem}");
}

#[test]
fn prefer_falls_back_to_plain_tcp_when_the_server_has_no_tls() {
    let server = TestServer::start().unwrap();
    let url = server.fresh_database().unwrap();
    let store = PostgresStore::open(&format!("{url}?sslmode=prefer")).unwrap();
    store
        .commit(&Batch {
            created: vec![person(1, "ada")],
            ..Batch::default()
        })
        .unwrap();
    drop(store);
    let required = refused(&format!("{url}?sslmode=require"));
    assert!(
        required.contains("TLS") || required.contains("SSL"),
        "{required}"
    );
}

#[test]
fn tls_settings_are_checked_before_connecting() {
    let base = "postgres://stipend@127.0.0.1:1/x";
    for (query, expected) in [
        ("sslmode=sometimes", "sslmode \"sometimes\""),
        ("sslrootcert=/etc/ca.pem", "add sslmode=verify-full"),
        (
            "sslmode=require&sslrootcert=/nonexistent.pem",
            "/nonexistent.pem",
        ),
        ("sslmode=require&sslrootcert=%zz", "bad % escape"),
    ] {
        let message = check_url(&format!("{base}?{query}")).unwrap_err();
        assert!(message.contains(expected), "{query}: {message}");
    }
    assert!(
        check_url(&format!("{base}?sslmode=disable"))
            .unwrap()
            .ends_with("on 127.0.0.1")
    );
    assert!(
        check_url(&format!("{base}?application_name=x&sslmode=prefer"))
            .unwrap()
            .ends_with("over TLS if the server offers it")
    );
    // An escaped path is decoded.
    let message = check_url(&format!(
        "{base}?sslmode=require&sslrootcert=/no%20such.pem"
    ))
    .unwrap_err();
    assert!(message.contains("/no such.pem"), "{message}");
}
