//! The embedded model's prefix cache belongs to a person: an agent's calls reuse what its
//! person's calls left (and the other way round), and nobody else's; cached prompt tokens are
//! charged at their own price, and usage says how many there were.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::Setup;
use serde_json::{Value, json};
use stipend_gateway::queue::{FairQueue, QueueOptions};
use stipend_gateway::{Backend, CHARGED_HEADER, Gateway, GatewayOptions, Model, Payer};
use stipend_ledger::{AccountId, AccountKind};

/// Calls `body` in process as `payer`: its usage and the cu charged.
async fn call(gateway: &Arc<Gateway>, payer: Payer, body: &Value) -> (Value, i64) {
    let response =
        stipend_gateway::chat_in_process(Arc::clone(gateway), payer, body.to_string().into())
            .await
            .unwrap();
    assert_eq!(response.status(), 200);
    let charged: i64 = response.headers()[CHARGED_HEADER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let answer: Value = serde_json::from_slice(&bytes).unwrap();
    (answer["usage"].clone(), charged)
}

fn payer(account: AccountId, queued_as: AccountId) -> Payer {
    Payer {
        account,
        key: None,
        queued_as,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agents_calls_share_their_persons_cache_and_nobody_elses() {
    let engine = common::embedded_model(2);
    let Setup {
        _dir,
        ledger,
        alice,
        keys,
        ..
    } = Setup::new();
    let create = |name: &str| {
        ledger
            .create_account(name, AccountKind::Person)
            .unwrap()
            .wait()
            .unwrap()
    };
    let (bob, agent) = (create("bob"), create("alices-agent"));
    let model = Model {
        name: "smollm2-135m".to_string(),
        price_prompt_cu: 3,
        price_cached_prompt_cu: 1,
        price_completion_cu: 5,
        sink: ledger.sink("sink:smollm2-135m").unwrap(),
        backend: Backend::Embedded(Arc::new(engine)),
        queue: Arc::new(FairQueue::new(2, QueueOptions::default())),
        max_concurrency: 2,
        counters: Default::default(),
    };
    let gateway = Arc::new(Gateway {
        ledger: ledger.clone(),
        access: stipend_gateway::Access::load(keys.store()).unwrap(),
        caps: Arc::new(stipend_gateway::KeyCaps::new(keys.store())),
        keys,
        models: BTreeMap::from([(model.name.clone(), Arc::new(model))]),
        options: GatewayOptions::default(),
        unrouted: Default::default(),
        calls: Default::default(),
    });
    let body = json!({
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        "max_tokens": 8,
        "temperature": 0,
    });
    let cost = |usage: &Value| {
        let count = |field: &str| usage[field].as_i64().unwrap();
        let cached = usage["prompt_tokens_details"]["cached_tokens"]
            .as_i64()
            .unwrap();
        (count("prompt_tokens") - cached) * 3 + cached + count("completion_tokens") * 5
    };
    let balance = |account| ledger.view(account).unwrap().balance_cu;
    let before = [balance(alice), balance(agent)];

    // The agent's call, which queues (and caches) as alice.
    let (first, charged) = call(&gateway, payer(agent, alice), &body).await;
    assert_eq!(
        first["prompt_tokens_details"]["cached_tokens"], 0,
        "{first}"
    );
    assert_eq!(charged, cost(&first));
    // Alice herself: all but the prompt's last token come from her agent's call.
    let (second, charged_alice) = call(&gateway, Payer::own(alice), &body).await;
    let prompt_tokens = second["prompt_tokens"].as_i64().unwrap();
    assert_eq!(
        second["prompt_tokens_details"]["cached_tokens"],
        prompt_tokens - 1,
        "{second}"
    );
    assert_eq!(charged_alice, cost(&second));
    assert!(charged_alice < charged, "{charged_alice} < {charged}");
    // Bob, with the same prompt: nothing of alice's.
    let (third, _) = call(&gateway, Payer::own(bob), &body).await;
    assert_eq!(
        third["prompt_tokens_details"]["cached_tokens"], 0,
        "{third}"
    );

    ledger.flush().unwrap();
    assert_eq!(
        [before[0] - balance(alice), before[1] - balance(agent)],
        [charged_alice, charged],
        "each paid its own call"
    );
}
