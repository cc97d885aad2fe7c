//! Closing an account on the real binary: a person closes their own (`DELETE /v1/me`, confirmed
//! by their name), an operator closes another (`stipend account close NAME --confirm`). Keys
//! stop working, agent runs and transcripts go, the balance goes back to the issuer, the name is
//! gone from every file of the data directory, and the ledger still verifies.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{Env, Server, budget, echo_call, files_holding};
use serde_json::{Value, json};

/// A name found nowhere else, so that a byte search for it means something.
const NAME: &str = "zelda-name-marker-8841";
/// A goal, whose transcript must go too.
const GOAL: &str = "zelda-goal-marker-5522";

async fn config() -> String {
    let upstream = stipend_testkit::spawn().await.unwrap();
    format!(
        "{}\n[[models]]\nname = \"echo\"\nbackend = \"openai\"\nbase_url = \"{upstream}\"\nparams = \"8B\"\ntimeout = \"5s\"\n",
        common::CONFIG
    )
}

fn issuer_balance(env: &Env) -> i64 {
    env.json(&["account", "show", "issuer"])["balance_cu"]
        .as_i64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_account_keeps_its_amounts_and_loses_everything_else() {
    let env = Env::new(&config().await);
    let key = env.person_with_key(NAME);
    let bob = env.person_with_key("bob");
    env.json(&["grant", NAME, "7 TFLOP"]);
    let operator = env.json(&["admin", "key", "create"])["key"]
        .as_str()
        .unwrap()
        .to_string();
    let server = Server::start(&env);
    let http = reqwest::Client::new();
    let base = server.base.clone();
    // A key named after its person, some calls, a gift, and an agent run with a transcript.
    let named = http
        .post(format!("{base}/admin/accounts/{NAME}/keys"))
        .bearer_auth(&operator)
        .json(&json!({"name": format!("{NAME}'s laptop")}))
        .send()
        .await
        .unwrap();
    assert_eq!(named.status(), 201);
    for _ in 0..3 {
        assert_eq!(echo_call(&http, &base, &key).await, 200);
    }
    env.json(&["give", NAME, "bob", "1 TFLOP"]);
    let run = env.json(&[
        "agent", "--url", &base, "--key", &key, "start", "--goal", GOAL, "--model", "echo",
        "--budget", "1 TFLOP",
    ]);
    let run_id = run["id"].as_str().unwrap().to_string();
    for _ in 0..200 {
        let shown = env.json(&["agent", "--url", &base, "--key", &key, "show", &run_id]);
        if shown["state"] == "done" {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // The operator's export, through the running server, holds the run and its transcript.
    let export = env.json(&["account", "export", NAME]);
    let runs = export["export"]["agent_runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{export}");
    assert_eq!(runs[0]["goal"], GOAL);
    // With no server running: the run as its journal keeps it.
    drop(server);
    let export = env.json(&["account", "export", NAME]);
    let runs = export["export"]["agent_runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{export}");
    assert_eq!(runs[0]["id"], run_id.as_str());
    assert!(runs[0]["journal"].to_string().contains(GOAL), "{export}");
    let server = Server::start(&env);
    let base = server.base.clone();

    // Without the name typed again: refused, and nothing changed.
    let before = budget(&http, &base, &key).await;
    let refused = http
        .delete(format!("{base}/me"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let refused: Value = refused.json().await.unwrap();
    assert_eq!(refused["error"]["param"], "confirm", "{refused}");
    let wrong = http
        .delete(format!("{base}/me?confirm=bob"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 400);
    let garbled = http
        .delete(format!("{base}/me?confirm=a&confirm=b"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(garbled.status(), 400);
    let garbled: Value = garbled.json().await.unwrap();
    assert_eq!(garbled["error"]["param"], "confirm", "{garbled}");
    assert_eq!(budget(&http, &base, &key).await, before);
    assert_eq!(echo_call(&http, &base, &key).await, 200);

    let balance = budget(&http, &base, &key).await["balance_cu"]
        .as_i64()
        .unwrap();
    let issuer_before = issuer_balance(&env);
    let closed = http
        .delete(format!("{base}/me?confirm={NAME}"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(closed.status(), 200);
    let closed: Value = closed.json().await.unwrap();
    assert_eq!(closed["object"], "account.closed");
    let anonymous = closed["account"].as_str().unwrap().to_string();
    assert!(anonymous.starts_with("closed:"), "{closed}");
    assert_eq!(closed["returned_cu"].as_i64().unwrap(), balance);
    assert_eq!(closed["keys_revoked"], 2);
    assert_eq!(closed["runs_erased"], 1);
    // Every compute unit is back with the issuer; the keys open nothing.
    assert_eq!(issuer_balance(&env), issuer_before + balance);
    assert_eq!(echo_call(&http, &base, &key).await, 401);
    let again = http
        .delete(format!("{base}/me?confirm={NAME}"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 401);
    // The amounts stay, under the anonymous name, and nothing more can reach it.
    let shown = env.json(&["account", "show", &anonymous]);
    assert_eq!(shown["kind"], "closed");
    assert_eq!(shown["balance_cu"], 0);
    let message = env.refused(&["grant", &anonymous, "1 TFLOP"]);
    assert!(message.contains("closed"), "{message}");
    let message = env.refused(&["give", "bob", &anonymous, "1 GFLOP"]);
    assert!(message.contains("closed"), "{message}");
    assert!(
        env.refused(&["account", "show", NAME])
            .contains("no account")
    );
    // Bob's own history names the other side by the anonymous name alone.
    let export = http
        .get(format!("{base}/me/export"))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !export.contains(NAME) && export.contains(&anonymous),
        "{export}"
    );
    let verified = env.run(&["ledger", "verify"]);
    assert!(verified.status.success(), "{verified:?}");

    // The operator closes bob: refused without --confirm, then done, and logged.
    let message = env.refused(&["account", "close", "bob"]);
    assert!(message.contains("--confirm"), "{message}");
    assert_eq!(echo_call(&http, &base, &bob).await, 200);
    let bob_closed = env.json(&["account", "close", "bob", "--confirm"]);
    assert_eq!(bob_closed["result"], "closed");
    assert!(bob_closed["returned_cu"].as_u64().unwrap() > 0);
    assert_eq!(echo_call(&http, &base, &bob).await, 401);
    let log = env.json(&["audit"]);
    let closes: Vec<&Value> = log["actions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|action| action["action"] == "account close")
        .collect();
    assert_eq!(closes.len(), 2, "{log}");
    assert_eq!(closes[0]["actor"], "cli");
    assert_eq!(closes[0]["amount_cu"], bob_closed["returned_cu"]);
    assert_eq!(closes[1]["actor"], "the person");
    assert_eq!(closes[1]["account"], anonymous.as_str());
    let verified = env.run(&["ledger", "verify"]);
    assert!(verified.status.success(), "{verified:?}");

    // Stopped: no file of the data directory holds the name, the key's name or the goal.
    drop(server);
    let data = env.dir.path().join("data");
    assert!(
        files_holding(&data, NAME).is_empty(),
        "{:?}",
        files_holding(&data, NAME)
    );
    assert!(
        files_holding(&data, GOAL).is_empty(),
        "{:?}",
        files_holding(&data, GOAL)
    );
    let verified = env.run(&["ledger", "verify"]);
    assert!(verified.status.success(), "{verified:?}");
}
