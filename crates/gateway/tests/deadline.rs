//! A call never outlives its reservation: a call still running when its hold is about to
//! expire is ended as if `max_tokens` had ended it, and charged for what it produced. (Were it not, the sweep would void the
//! hold and the rest of the answer would be served uncharged.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Setup, serve_with_a_short_hold};
use serde_json::{Value, json};
use stipend_gateway::queue::{FairQueue, QueueOptions};
use stipend_gateway::{Backend, Model, Upstream, UpstreamConfig};
use stipend_ledger::Ledger;

/// The fake upstream's `trickle` (a token every 50 ms, never done) as a model with `slots`.
async fn trickle(ledger: &Ledger, slots: usize) -> Model {
    let upstream = stipend_testkit::spawn().await.unwrap();
    Model {
        name: "trickle".to_string(),
        price_prompt_cu: 1,
        price_cached_prompt_cu: 1,
        price_completion_cu: 1,
        sink: ledger.sink("sink:trickle").unwrap(),
        backend: Backend::Upstream {
            upstream: Upstream::new(UpstreamConfig {
                base_url: upstream,
                api_key: None,
                timeout: Duration::from_secs(5),
                idle_connections: 4,
                roots: Default::default(),
            })
            .unwrap(),
            model: "trickle".to_string(),
        },
        queue: Arc::new(FairQueue::new(slots, QueueOptions::default())),
        max_concurrency: slots,
        counters: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_is_ended_before_its_hold_expires_and_charged_for_what_it_made() {
    let Setup {
        _dir,
        ledger,
        alice,
        keys,
        key,
    } = Setup::new();
    let model = trickle(&ledger, 4).await;
    // A hold of the margin plus one second: the stream must end after about a second.
    let address = serve_with_a_short_hold(ledger.clone(), keys, model).await;

    let before = ledger.view(alice).unwrap().balance_cu;
    let started = std::time::Instant::now();
    let text = reqwest::Client::new()
        .post(format!("http://{address}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": "trickle", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 100000, "stream": true, "stream_options": {"include_usage": true}}))
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
    // It ends as a call at its max_tokens does: a finish of "length", the usage, [DONE].
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|event| serde_json::from_str(event).unwrap())
        .collect();
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length", "{finish}");
    let usage = &chunks[chunks.len() - 1]["usage"];
    let delivered = events.iter().filter(|e| e.contains("\"content\"")).count() as i64;
    assert!(delivered >= 5, "only {delivered} tokens in a second");
    // Charged: the usage shown, which bounds what came (the upstream did not say, so every
    // byte of text delivered counts as a token, and the prompt at its bound); nothing is left
    // held.
    ledger.flush().unwrap();
    let view = ledger.view(alice).unwrap();
    assert_eq!(view.reserved_cu, 0);
    let charged = before - view.balance_cu;
    assert_eq!(usage["total_tokens"].as_i64(), Some(charged), "{usage}");
    assert!(
        usage["completion_tokens"].as_i64().unwrap() >= delivered,
        "{usage} for {delivered} chunks"
    );
    assert!(charged < 100_000, "charged {charged}");
}

/// The embedded model at its time limit: the call ends as if `max_tokens` had ended it
/// (`finish_reason: "length"`), with the text made so far, charged exactly its usage.
#[tokio::test(flavor = "multi_thread")]
async fn an_embedded_call_at_its_time_limit_ends_with_what_it_made() {
    let engine = common::embedded_model(1);
    let Setup {
        _dir,
        ledger,
        alice,
        keys,
        key,
    } = Setup::new();
    let model = Model {
        name: "smollm2-135m".to_string(),
        price_prompt_cu: 1,
        price_cached_prompt_cu: 1,
        price_completion_cu: 1,
        sink: ledger.sink("sink:smollm2-135m").unwrap(),
        backend: Backend::Embedded(Arc::new(engine)),
        queue: Arc::new(FairQueue::new(1, QueueOptions::default())),
        max_concurrency: 1,
        counters: Default::default(),
    };
    let address = serve_with_a_short_hold(ledger.clone(), keys, model).await;

    let before = ledger.view(alice).unwrap().balance_cu;
    let answer: Value = reqwest::Client::new()
        .post(format!("http://{address}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}],
            "max_tokens": 1500,
            "temperature": 0,
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["choices"][0]["finish_reason"], "length", "{answer}");
    let completion_tokens = answer["usage"]["completion_tokens"].as_i64().unwrap();
    // About a second of generation: some tokens, far fewer than the 1500 asked for.
    assert!((1..1_500).contains(&completion_tokens), "{answer}");
    assert!(
        !answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    ledger.flush().unwrap();
    let view = ledger.view(alice).unwrap();
    assert_eq!(view.reserved_cu, 0);
    assert_eq!(
        before - view.balance_cu,
        answer["usage"]["total_tokens"].as_i64().unwrap()
    );
}

/// Time spent waiting for a slot comes out of a call's time: its deadline counts from its
/// reservation, not from its start. A regression test: a call that waited in the queue ran on
/// past the point where its hold could expire (by as long as it had waited).
#[tokio::test(flavor = "multi_thread")]
async fn a_call_that_waited_for_a_slot_ends_before_its_hold_could_expire() {
    let Setup {
        _dir,
        ledger,
        alice,
        keys,
        key,
    } = Setup::new();
    // One slot: the second call waits for the first, which holds it until its own deadline.
    let model = trickle(&ledger, 1).await;
    // Holds of the margin plus two seconds: each call must end two seconds after it reserved.
    let options = stipend_gateway::GatewayOptions {
        reservation_timeout: stipend_gateway::RESERVATION_MARGIN + Duration::from_secs(2),
        ..stipend_gateway::GatewayOptions::default()
    };
    let address = common::serve(ledger.clone(), keys, vec![model], options).await;
    let call = |key: String| {
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let response = reqwest::Client::new()
                .post(format!("http://{address}/v1/chat/completions"))
                .bearer_auth(&key)
                .json(&json!({"model": "trickle", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 100000, "stream": true}))
                .send()
                .await
                .unwrap();
            let _ = response.text().await;
            started.elapsed()
        })
    };
    let first = call(key.clone());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = call(key.clone());
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert!(first < Duration::from_secs(3), "the first ran {first:?}");
    // It waited about two seconds for the slot, so it must end at once when it gets it; counted
    // from its start it would have run two seconds more.
    assert!(
        second < Duration::from_millis(3_200),
        "the second ran {second:?} after reserving"
    );
    ledger.flush().unwrap();
    assert_eq!(ledger.view(alice).unwrap().reserved_cu, 0);
}
