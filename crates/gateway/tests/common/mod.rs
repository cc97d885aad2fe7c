//! What the gateway's integration tests share: a ledger with a person and her key, and the
//! gateway served on loopback.

#![allow(clippy::unwrap_used, dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use stipend_gateway::{Gateway, GatewayOptions, KeyRing, Model, RESERVATION_MARGIN};
use stipend_ledger::{
    AccountId, AccountKind, Budget, Ledger, LedgerOptions, StipendPolicy, Store, SystemClock,
};
use stipend_store_sqlite::SqliteStore;

/// The test model (SmolLM2), in this process with `slots` slots and the default prefix cache.
pub fn embedded_model(slots: u32) -> stipend_model::EmbeddedModel {
    stipend_model::EmbeddedModel::load(
        &stipend_testkit::model_gguf(),
        stipend_model::LoadOptions {
            slots,
            ..stipend_model::LoadOptions::default()
        },
    )
    .unwrap()
}

/// A ledger on a temporary store with one person, alice, and her key.
pub struct Setup {
    pub _dir: tempfile::TempDir,
    pub ledger: Arc<Ledger>,
    pub alice: AccountId,
    pub keys: KeyRing,
    pub key: String,
}

impl Setup {
    pub fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("ledger.db")).unwrap());
        // A period of ten years: no stipend arrives while the tests run (a day's would at
        // midnight UTC, and a test counting charges by the balance would see it as a refund).
        let policy =
            StipendPolicy::new(10_000_000, Duration::from_secs(3_650 * 86_400), 0).unwrap();
        let ledger = Arc::new(
            Ledger::open(
                Arc::clone(&store),
                Arc::new(SystemClock),
                LedgerOptions::new(policy),
            )
            .unwrap(),
        );
        let alice = ledger
            .create_account("alice", AccountKind::Person)
            .unwrap()
            .wait()
            .unwrap();
        let keys = KeyRing::new(store, ledger.issuer());
        let key = keys.create(alice, 0).unwrap().key;
        Setup {
            _dir: dir,
            ledger,
            alice,
            keys,
            key,
        }
    }
}

/// Serves one model on loopback with reservations that last the margin plus one second, so a
/// call must end after about a second; returns the address.
pub async fn serve_with_a_short_hold(
    ledger: Arc<dyn Budget>,
    keys: KeyRing,
    model: Model,
) -> std::net::SocketAddr {
    let options = GatewayOptions {
        reservation_timeout: RESERVATION_MARGIN + Duration::from_secs(1),
        ..GatewayOptions::default()
    };
    serve(ledger, keys, vec![model], options).await
}

/// Serves models on loopback; returns the address.
pub async fn serve(
    ledger: Arc<dyn Budget>,
    keys: KeyRing,
    models: Vec<Model>,
    options: GatewayOptions,
) -> std::net::SocketAddr {
    let gateway = Arc::new(Gateway {
        ledger,
        access: stipend_gateway::Access::load(keys.store()).unwrap(),
        caps: Arc::new(stipend_gateway::KeyCaps::new(keys.store())),
        keys,
        models: models
            .into_iter()
            .map(|model| (model.name.clone(), Arc::new(model)))
            .collect::<BTreeMap<_, _>>(),
        options,
        unrouted: Default::default(),
        calls: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, stipend_gateway::router(gateway)).await });
    address
}
