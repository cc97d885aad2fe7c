//! A call never outlives its reservation: a stream still running when its hold is about to
//! expire is cut off and charged for what it produced. (Were it not, the sweep would void the
//! hold and the rest of the answer would be served uncharged.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use stipend_gateway::queue::{FairQueue, QueueOptions};
use stipend_gateway::{
    Backend, Gateway, GatewayOptions, KeyRing, Model, RESERVATION_MARGIN, Upstream, UpstreamConfig,
};
use stipend_ledger::{AccountKind, Ledger, LedgerOptions, StipendPolicy, Store, SystemClock};
use stipend_store_sqlite::SqliteStore;

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_is_cut_before_its_hold_expires_and_charged_for_what_it_made() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("ledger.db")).unwrap());
    let policy = StipendPolicy::new(10_000_000, Duration::from_secs(86_400), 0).unwrap();
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
    let sink = ledger.sink("sink:trickle").unwrap();
    let keys = KeyRing::new(Arc::clone(&store));
    let key = keys.create(alice, 0).unwrap().key;
    let upstream = stipend_testkit::spawn().await.unwrap();
    let model = Model {
        name: "trickle".to_string(),
        price_prompt_cu: 1,
        price_completion_cu: 1,
        sink,
        backend: Backend::Upstream {
            upstream: Upstream::new(UpstreamConfig {
                base_url: upstream,
                api_key: None,
                timeout: Duration::from_secs(5),
            })
            .unwrap(),
            model: "trickle".to_string(),
        },
        queue: Arc::new(FairQueue::new(4, QueueOptions::default())),
        max_concurrency: 4,
        counters: Default::default(),
    };
    // A hold of the margin plus one second: the stream must end after about a second.
    let options = GatewayOptions {
        reservation_timeout: RESERVATION_MARGIN + Duration::from_secs(1),
        ..GatewayOptions::default()
    };
    let gateway = Arc::new(Gateway {
        ledger: Arc::clone(&ledger),
        keys,
        models: BTreeMap::from([("trickle".to_string(), Arc::new(model))]),
        options,
        unrouted: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, stipend_gateway::router(gateway)).await });

    let before = ledger.view(alice).unwrap().balance_cu;
    let started = std::time::Instant::now();
    let text = reqwest::Client::new()
        .post(format!("http://{address}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": "trickle", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 100000, "stream": true}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(3),
        "the stream ran {elapsed:?}"
    );
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_timeout", "{last}");
    let delivered = events.iter().filter(|e| e.contains("\"content\"")).count() as i64;
    assert!(delivered >= 5, "only {delivered} tokens in a second");
    // Charged: the tokens that came, and the prompt's estimate; nothing is left held.
    ledger.flush().unwrap();
    let view = ledger.view(alice).unwrap();
    assert_eq!(view.reserved_cu, 0);
    let charged = before - view.balance_cu;
    assert!(
        charged >= delivered && charged < delivered + 100,
        "charged {charged} for {delivered} tokens"
    );
}
