//! The `stipend` binary on a PostgreSQL ledger (`database_url`), on a server of the tests' own:
//! every operator command directly on the database and through a running server, a call charged
//! and durable in the database, one server per database, and clear refusals of bad URLs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::OnceLock;

use common::{CONFIG, Env, Server, exercise};
use serde_json::json;
use stipend_store_postgres::test_server::TestServer;

fn pg() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| TestServer::start().unwrap())
}

/// The tests' usual config, its ledger in a fresh database.
fn config_on_a_fresh_database() -> String {
    let url = pg().fresh_database().unwrap();
    format!("database_url = \"{url}\"\n{CONFIG}")
}

#[test]
fn operator_commands_work_directly_on_the_database() {
    let env = Env::new(&config_on_a_fresh_database());
    exercise(&env);
    let output = env.run(&["ledger", "verify"]);
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.starts_with("ok: 4 accounts and 5 transfers"), "{text}");
    // Nothing went to the embedded store.
    assert!(!env.db().exists());
}

#[test]
fn operator_commands_work_while_servers_share_the_database() {
    let env = Env::new(&config_on_a_fresh_database());
    let server = Server::start(&env);
    assert!(
        server
            .output()
            .contains("ledger    PostgreSQL: database test_"),
        "{}",
        server.output()
    );
    exercise(&env);
    // A second server on this machine needs a data_dir of its own (its control socket is
    // there); with one, it serves the same database beside the first.
    let second = env.run(&["serve"]);
    assert_eq!(second.status.code(), Some(2));
    let message = String::from_utf8_lossy(&second.stderr);
    assert!(message.contains("a data_dir of its own"), "{message}");
    let config = std::fs::read_to_string(env.config())
        .unwrap()
        .replace("data_dir = \"data\"", "data_dir = \"data-two\"");
    let two = Env::new(&config);
    let other = Server::start(&two);
    assert_eq!(two.json(&["account", "show", "bob"])["name"], "bob");
    other.stop();
    server.stop();
    let output = env.run(&["ledger", "verify"]);
    assert!(output.status.success(), "{output:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_is_charged_durably_in_the_database() {
    let upstream = stipend_testkit::spawn().await.unwrap();
    let url = pg().fresh_database().unwrap();
    let env = Env::new(&format!(
        "database_url = \"{url}\"\nlisten = \"127.0.0.1:0\"\n[stipend]\namount = \"10 PFLOP\"\n\
         [[models]]\nname = \"echo\"\nbackend = \"openai\"\nbase_url = \"{upstream}\"\nparams = \"8B\"\n"
    ));
    let server = Server::start(&env);
    let key = env.person_with_key("ada");
    let http = reqwest::Client::new();
    let mut charged_total = 0u64;
    for stream in [false, true] {
        let response = http
            .post(format!("{}/chat/completions", server.base))
            .bearer_auth(&key)
            .json(&json!({
                "model": "echo",
                "messages": [{"role": "user", "content": "one two three"}],
                "max_tokens": 5,
                "stream": stream,
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        if stream {
            let text = response.text().await.unwrap();
            assert!(text.contains("[DONE]"), "{text}");
        } else {
            let charged: u64 = response.headers()["x-stipend-charged-cu"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(charged > 0);
            response.text().await.unwrap();
        }
    }
    let budget = common::budget(&http, &server.base, &key).await;
    let spent = 10_000_000 - budget["balance_cu"].as_u64().unwrap();
    assert!(spent > 0, "{budget}");
    charged_total += spent;
    server.stop();
    // After the server is gone, the database holds every charge, and the audit agrees.
    let ada = env.json(&["account", "show", "ada"]);
    assert_eq!(ada["balance_cu"], 10_000_000 - charged_total);
    assert_eq!(ada["usage"][0]["requests"], 2);
    assert_eq!(ada["usage"][0]["charged_cu"], charged_total);
    let verify = env.json(&["ledger", "verify"]);
    assert_eq!(verify["violations"], json!([]));
}

#[test]
fn a_bad_database_url_is_refused_by_name() {
    for (url, expected) in [
        ("mysql://db/stipend", "must be a postgres:// URL"),
        ("postgres://stipend@127.0.0.1/x?sslmode=require", "TLS"),
        (
            "postgres://stipend@127.0.0.1:notaport/x",
            "not a valid PostgreSQL URL",
        ),
    ] {
        let env = Env::new(&format!("database_url = \"{url}\"\n{CONFIG}"));
        let message = env.refused(&["account", "list"]);
        assert!(message.contains("database_url"), "{url}: {message}");
        assert!(message.contains(expected), "{url}: {message}");
    }
    // A database that does not answer is a clear error, not a hang.
    let env = Env::new(&format!(
        "database_url = \"postgres://stipend@127.0.0.1:1/none\"\n{CONFIG}"
    ));
    let message = env.refused(&["account", "list"]);
    assert!(message.contains("PostgreSQL"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_under_load_fails_closed_and_serving_resumes() {
    // A server of its own: this test restarts it.
    let database = TestServer::start().unwrap();
    let url = database.fresh_database().unwrap();
    let upstream = stipend_testkit::spawn().await.unwrap();
    let env = Env::new(&format!(
        "database_url = \"{url}\"\nlisten = \"127.0.0.1:0\"\n[stipend]\namount = \"10 PFLOP\"\n\
         [[models]]\nname = \"echo\"\nbackend = \"openai\"\nbase_url = \"{upstream}\"\nparams = \"8B\"\n"
    ));
    let server = Server::start(&env);
    let key = env.person_with_key("ada");
    let start = env.json(&["account", "show", "ada"])["balance_cu"]
        .as_i64()
        .unwrap();
    let body =
        json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    let cost = ((stipend_testkit::prompt_tokens(&body) + 4) * 16) as i64;
    let http = reqwest::Client::new();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..8 {
        let (http, url, key, body, stop) = (
            http.clone(),
            format!("{}/chat/completions", server.base),
            key.clone(),
            body.clone(),
            std::sync::Arc::clone(&stop),
        );
        load.push(tokio::spawn(async move {
            // (answered, refused, answered after a refusal)
            let mut counts = (0i64, 0i64, 0i64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let response = http
                    .post(&url)
                    .bearer_auth(&key)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                let status = response.status().as_u16();
                let answer: serde_json::Value = response.json().await.unwrap();
                match status {
                    200 => {
                        assert!(answer["choices"].is_array(), "{answer}");
                        counts.0 += 1;
                        if counts.1 > 0 {
                            counts.2 += 1;
                        }
                    }
                    503 => {
                        assert_eq!(answer["error"]["code"], "ledger_unavailable", "{answer}");
                        assert!(
                            answer.get("choices").is_none(),
                            "served uncharged: {answer}"
                        );
                        counts.1 += 1;
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                    other => panic!("unexpected {other}: {answer}"),
                }
            }
            counts
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    database.restart_immediate().unwrap();
    // Serving resumes by itself: wait until every client has been answered since.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answered = 0;
    let mut refused = 0;
    let mut resumed = 0;
    for task in load {
        let (a, r, after) = task.await.unwrap();
        answered += a;
        refused += r;
        resumed += after;
    }
    assert!(refused > 0, "the restart was never noticed");
    assert!(
        resumed > 0,
        "serving did not resume ({answered} answered, {refused} refused)"
    );
    server.stop();
    // Every answered call is charged, exactly; nothing refused is.
    let balance = env.json(&["account", "show", "ada"])["balance_cu"]
        .as_i64()
        .unwrap();
    assert_eq!(
        start - balance,
        answered * cost,
        "{answered} answered, {refused} refused"
    );
    assert_eq!(env.json(&["ledger", "verify"])["violations"], json!([]));
}
