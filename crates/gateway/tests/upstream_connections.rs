//! Upstream connections are kept and reused: a plain answer's and a finished stream's connection
//! go back to the pool (the stream's after the end of its chunked body, read once the client has
//! `[DONE]`), and so does a stream whose client left, since it is read to its end.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::Setup;
use futures_util::StreamExt;
use serde_json::json;
use stipend_gateway::queue::{FairQueue, QueueOptions};
use stipend_gateway::{Backend, GatewayOptions, Model, Upstream, UpstreamConfig};

#[tokio::test(flavor = "multi_thread")]
async fn finished_calls_reuse_one_connection_and_so_does_a_stream_its_client_left() {
    let setup = Setup::new();
    let (url, accepted) = stipend_testkit::spawn_counted().await.unwrap();
    let upstream = Upstream::new(UpstreamConfig {
        base_url: url,
        api_key: None,
        timeout: Duration::from_secs(5),
        idle_connections: 4,
        roots: Default::default(),
    })
    .unwrap();
    let model = |name: &str| Model {
        name: name.to_string(),
        price_prompt_cu: 1,
        price_cached_prompt_cu: 1,
        price_completion_cu: 1,
        sink: setup.ledger.sink(&format!("sink:{name}")).unwrap(),
        backend: Backend::Upstream {
            upstream: upstream.clone(),
            model: name.to_string(),
        },
        queue: Arc::new(FairQueue::new(4, QueueOptions::default())),
        max_concurrency: 4,
        counters: Default::default(),
    };
    let address = common::serve(
        setup.ledger.clone(),
        setup.keys.clone(),
        vec![model("echo"), model("slow")],
        GatewayOptions::default(),
    )
    .await;
    let http = reqwest::Client::new();
    let call = |model: &str, max_tokens: u64, stream: bool| {
        http.post(format!("http://{address}/v1/chat/completions"))
            .bearer_auth(&setup.key)
            .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "stream": stream}))
            .send()
    };

    for stream in [false, true, false, true, true] {
        let text = call("echo", 4, stream).await.unwrap().text().await.unwrap();
        assert!(text.contains("t3"), "{text}");
        // The stream's connection returns once its body is drained, just after [DONE].
        for _ in 0..100 {
            if upstream.idle_connections() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            upstream.idle_connections(),
            1,
            "after a call (stream: {stream})"
        );
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one connection for five calls"
    );

    // A stream whose client leaves half way (`slow` takes 20 ms a token, 240 ms in all) is
    // read to its end, to be charged what the upstream reports; so its connection is kept too.
    let response = call("slow", 12, true).await.unwrap();
    let mut body = response.bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);
    for _ in 0..100 {
        if upstream.idle_connections() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(upstream.idle_connections(), 1);
    let text = call("echo", 4, false).await.unwrap().text().await.unwrap();
    assert!(text.contains("t3"), "{text}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    setup.ledger.flush().unwrap();
    assert_eq!(setup.ledger.view(setup.alice).unwrap().reserved_cu, 0);
}
