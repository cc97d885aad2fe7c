//! The gateway on escrow nodes: two gateways, each on its own `Node`, share one person's balance
//! in one PostgreSQL database (a server of the tests' own), in front of the honest upstream.
//! Every call answered through either is charged exactly what the upstream computed, in the
//! database, and nothing stays held.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use stipend_gateway::queue::{FairQueue, QueueOptions};
use stipend_gateway::{Backend, Gateway, GatewayOptions, KeyRing, Model, Upstream, UpstreamConfig};
use stipend_ledger::node::{EscrowStore, Node, NodeOptions};
use stipend_ledger::{
    AccountId, AccountKind, AccountRecord, Batch, StipendPolicy, Store, SystemClock,
};
use stipend_store_postgres::faults::FaultyEscrow;
use stipend_store_postgres::test_server::TestServer;
use stipend_store_postgres::{LeaseRequest, PostgresEscrow, PostgresStore};

const STIPEND_CU: u64 = 1_000_000;
const ISSUER: AccountId = AccountId(1);
const SINK: AccountId = AccountId(2);
const ALICE: AccountId = AccountId(3);

fn policy() -> StipendPolicy {
    // Ten years: no new stipend arrives while the tests run.
    StipendPolicy::new(STIPEND_CU, Duration::from_secs(3_650 * 86_400), 0).unwrap()
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

/// One node with leases of 10 s, and a gateway on it serving `honest` at 1 cu a token.
async fn gateway(url: &str, name: &str, upstream: &str) -> (Arc<Node>, String) {
    let ttl = Duration::from_secs(10);
    gateway_on(
        url,
        Arc::new(escrow(url, name, ttl)),
        ttl,
        upstream,
        "honest",
    )
    .await
}

/// A node on `escrow` whose leases live `ttl`, and a gateway on it serving the upstream's
/// `upstream_model` as `honest` at 1 cu a token.
async fn gateway_on(
    url: &str,
    escrow: Arc<dyn EscrowStore>,
    ttl: Duration,
    upstream: &str,
    upstream_model: &str,
) -> (Arc<Node>, String) {
    let store = Arc::new(PostgresStore::open_shared(url).unwrap());
    let node = Arc::new(
        Node::open(
            escrow,
            Arc::new(SystemClock),
            NodeOptions::new(policy(), ISSUER, ttl),
        )
        .unwrap(),
    );
    let model = Model {
        name: "honest".to_string(),
        price_prompt_cu: 1,
        price_cached_prompt_cu: 1,
        price_completion_cu: 1,
        sink: SINK,
        backend: Backend::Upstream {
            upstream: Upstream::new(UpstreamConfig {
                base_url: upstream.to_string(),
                api_key: None,
                timeout: Duration::from_secs(10),
                idle_connections: 8,
                roots: Default::default(),
            })
            .unwrap(),
            model: upstream_model.to_string(),
        },
        queue: Arc::new(FairQueue::new(16, QueueOptions::default())),
        max_concurrency: 16,
        counters: Default::default(),
    };
    let gateway = Arc::new(Gateway {
        ledger: Arc::clone(&node) as Arc<dyn stipend_ledger::Budget>,
        access: stipend_gateway::Access::load(Arc::clone(&store) as Arc<dyn Store>).unwrap(),
        caps: Arc::new(stipend_gateway::KeyCaps::new(
            Arc::clone(&store) as Arc<dyn Store>
        )),
        keys: KeyRing::new(store as Arc<dyn Store>, AccountId(1)),
        models: BTreeMap::from([("honest".to_string(), Arc::new(model))]),
        options: GatewayOptions::default(),
        unrouted: Default::default(),
        calls: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, stipend_gateway::router(gateway)).await });
    (node, format!("http://{address}/v1"))
}

/// The database's accounts and alice's key, written by a store that claims it, then let go.
fn alice_with_key(url: &str) -> String {
    let store = Arc::new(PostgresStore::open(url).unwrap());
    store
        .commit(&Batch {
            created: vec![
                record(1, "issuer", AccountKind::Issuer),
                record(2, "sink:honest", AccountKind::Sink),
                record(3, "alice", AccountKind::Person),
            ],
            ..Batch::default()
        })
        .unwrap();
    KeyRing::new(store as Arc<dyn Store>, AccountId(1))
        .create(ALICE, 0)
        .unwrap()
        .key
}

/// What alice was charged so far, and what leases hold of her balance.
fn alice_spent(url: &str) -> (u64, (u64, u64)) {
    let store = PostgresStore::open_read_only(url).unwrap();
    let alice = store.account(ALICE).unwrap().unwrap();
    let spent = alice.usage.iter().map(|usage| usage.charged_cu).sum();
    (spent, store.held(ALICE).unwrap())
}

/// A streamed call asking for `max_tokens` tokens: how long it took, and what came.
async fn stream(base: &str, key: &str, max_tokens: u64) -> (Duration, String) {
    let started = std::time::Instant::now();
    let response = reqwest::Client::new()
        .post(format!("{base}/chat/completions"))
        .bearer_auth(key)
        .json(&json!({
            "model": "honest",
            "messages": [{"role": "user", "content": "a long answer, please"}],
            "max_tokens": max_tokens,
            "stream": true,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    (started.elapsed(), body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_lease_cannot_be_renewed_is_cut_before_the_lease_ends() {
    let server = TestServer::start().unwrap();
    let url = server.fresh_database().unwrap();
    let key = alice_with_key(&url);
    let (upstream, _) = stipend_testkit::spawn_metered().await.unwrap();
    let ttl = Duration::from_secs(2);
    let faulty = Arc::new(FaultyEscrow::new(escrow(&url, "faulty", ttl)));
    let (node, base) = gateway_on(
        &url,
        Arc::clone(&faulty) as Arc<dyn EscrowStore>,
        ttl,
        &upstream,
        "honest-slow",
    )
    .await;
    // Renewed, a call outlives its lease's life: 2 000 tokens at 2 ms each.
    let (took, body) = stream(&base, &key, 2_000).await;
    assert!(
        took > ttl,
        "the call was too quick to show anything: {took:?}"
    );
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    assert!(!body.contains("\"error\""), "{body}");
    let (before, _) = alice_spent(&url);
    // Once its lease has gone back (idle), the next call takes a new one, which cannot be
    // renewed: the call is cut before the lease ends, charged what it delivered, and told so.
    let give_up = std::time::Instant::now() + 4 * ttl;
    while node.leases_held() > 0 {
        assert!(
            std::time::Instant::now() < give_up,
            "an idle lease was kept"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    faulty.refuse_renewals(true);
    let (took, body) = stream(&base, &key, 2_000).await;
    assert!(took < ttl, "the call outlived its lease: {took:?}");
    assert!(faulty.renewals_refused() > 0);
    assert!(body.contains("\"code\":\"cut_short\""), "{body}");
    assert!(!body.contains("[DONE]"), "{body}");
    // The tokens delivered, and their text's bytes: with no usage from the upstream, a call cut
    // is charged its prompt's bound and at most a token a byte of what it delivered.
    let (delivered, bytes) = body
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<serde_json::Value>(data).ok())
        .filter_map(|chunk| {
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::len)
        })
        .filter(|len| *len > 0)
        .fold((0u64, 0u64), |(tokens, bytes), len| {
            (tokens + 1, bytes + len as u64)
        });
    let told: u64 = body
        .split(" cu).")
        .next()
        .and_then(|head| head.rsplit('(').next())
        .and_then(|cu| cu.parse().ok())
        .unwrap_or_else(|| panic!("the cut names no charge: {body}"));
    node.close();
    let (after, held) = alice_spent(&url);
    assert_eq!(
        after - before,
        told,
        "charged other than the client was told"
    );
    assert!(
        delivered > 0 && told >= delivered && told <= bytes + 512,
        "{delivered} tokens ({bytes} bytes) delivered, {told} cu charged"
    );
    assert_eq!(held, (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_balance_charge_exactly_what_was_computed() {
    let server = TestServer::start().unwrap();
    let url = server.fresh_database().unwrap();
    let key = alice_with_key(&url);
    let (upstream, computed) = stipend_testkit::spawn_metered().await.unwrap();
    let (one, base_one) = gateway(&url, "one", &upstream).await;
    let (two, base_two) = gateway(&url, "two", &upstream).await;
    let http = reqwest::Client::new();
    let mut calls = Vec::new();
    for index in 0..40u64 {
        let base = if index % 2 == 0 { &base_one } else { &base_two };
        let (http, url, key) = (
            http.clone(),
            format!("{base}/chat/completions"),
            key.clone(),
        );
        calls.push(tokio::spawn(async move {
            let response = http
                .post(url)
                .bearer_auth(key)
                .json(&json!({
                    "model": "honest",
                    "messages": [{"role": "user", "content": format!("call {index} asks a question")}],
                    "max_tokens": 20 + index,
                    "stream": index % 4 == 1,
                }))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response.text().await.unwrap();
        }));
    }
    for call in calls {
        call.await.unwrap();
    }
    // Both nodes gone (their leases given back), the database holds exactly what was computed.
    one.close();
    two.close();
    let store = PostgresStore::open_read_only(&url).unwrap();
    let alice = store.account(ALICE).unwrap().unwrap();
    let spent: u64 = alice.usage.iter().map(|usage| usage.charged_cu).sum();
    let (prompt, completion) = computed.tokens();
    assert_eq!(
        spent,
        prompt + completion,
        "computed {prompt} + {completion}"
    );
    assert_eq!(
        alice.usage.iter().map(|usage| usage.requests).sum::<u64>(),
        40
    );
    assert_eq!(alice.balance_cu as u64 + spent, STIPEND_CU);
    assert_eq!(store.held(ALICE).unwrap(), (0, 0));
}

#[test]
fn a_key_revoked_anywhere_stops_everywhere_that_follows() {
    let server = TestServer::start().unwrap();
    let url = server.fresh_database().unwrap();
    {
        let store = PostgresStore::open(&url).unwrap();
        store
            .commit(&Batch {
                created: vec![
                    record(1, "issuer", AccountKind::Issuer),
                    record(3, "alice", AccountKind::Person),
                ],
                ..Batch::default()
            })
            .unwrap();
    }
    let ring = |url: &str| {
        KeyRing::new(
            Arc::new(PostgresStore::open_shared(url).unwrap()) as Arc<dyn Store>,
            AccountId(1),
        )
    };
    let (here, there) = (ring(&url), ring(&url));
    let position = here.follow(None).unwrap();
    // A key made on one server works on the other at once: nothing of it was remembered there.
    let key = there.create(ALICE, 0).unwrap().key;
    assert_eq!(here.authenticate(&key).unwrap(), ALICE);
    // Revoked on the other: remembered here as valid until this server follows the changes.
    let id = key.split('-').nth(2).unwrap().to_string();
    assert!(there.revoke(&id, 1).unwrap());
    assert_eq!(here.authenticate(&key).unwrap(), ALICE);
    here.follow(Some(position)).unwrap();
    assert!(matches!(
        here.authenticate(&key),
        Err(stipend_gateway::keys::KeyError::Revoked)
    ));
}
