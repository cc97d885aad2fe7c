//! The `stipend` binary on a PostgreSQL ledger (`database_url`), on a server of the tests' own:
//! every operator command directly on the database and through a running server, a call charged
//! and durable in the database, one server per database, a database reached over verified TLS,
//! and clear refusals of bad URLs.

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
    assert!(text.starts_with("ok: 4 accounts and 6 transfers"), "{text}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_across_a_network_is_reached_over_verified_tls() {
    // A server of its own that takes TCP over TLS only, its certificate signed by the test CA.
    let data = stipend_testkit::repo_path("crates/gateway/tests/data");
    let database =
        TestServer::start_tls(&data.join("localhost.pem"), &data.join("localhost.key")).unwrap();
    let url = database.fresh_database().unwrap();
    let upstream = stipend_testkit::spawn().await.unwrap();
    let config = |url: &str| {
        format!(
            "database_url = \"{url}\"\nlisten = \"127.0.0.1:0\"\n[stipend]\namount = \"10 PFLOP\"\n\
             [[models]]\nname = \"echo\"\nbackend = \"openai\"\nbase_url = \"{upstream}\"\nparams = \"8B\"\n"
        )
    };
    // Without the CA, nothing is reached, and the operator is told why.
    let untrusted = Env::new(&config(&format!("{url}?sslmode=verify-full")));
    let message = untrusted.refused(&["account", "list"]);
    assert!(message.contains("invalid peer certificate"), "{message}");
    let env = Env::new(&config(&format!(
        "{url}?sslmode=verify-full&sslrootcert={}",
        data.join("ca.pem").display()
    )));
    let server = Server::start(&env);
    assert!(server.output().contains("over TLS"), "{}", server.output());
    let key = env.person_with_key("ada");
    let response = reqwest::Client::new()
        .post(format!("{}/chat/completions", server.base))
        .bearer_auth(&key)
        .json(&json!({
            "model": "echo",
            "messages": [{"role": "user", "content": "one two three"}],
            "max_tokens": 5,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let charged: u64 = response.headers()["x-stipend-charged-cu"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(charged > 0);
    server.stop();
    let ada = env.json(&["account", "show", "ada"]);
    assert_eq!(ada["usage"][0]["charged_cu"], charged);
    let verify = env.json(&["ledger", "verify"]);
    assert_eq!(verify["violations"], json!([]));
}

#[test]
fn a_bad_database_url_is_refused_by_name() {
    for (url, expected) in [
        ("mysql://db/stipend", "must be a postgres:// URL"),
        (
            "postgres://stipend@127.0.0.1/x?sslmode=sometimes",
            "sslmode",
        ),
        (
            "postgres://stipend@127.0.0.1/x?sslmode=verify-full&sslrootcert=/nonexistent.pem",
            "sslrootcert /nonexistent.pem",
        ),
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

/// A config for one of several servers on one database: its own data_dir, short leases.
fn node_config(url: &str, upstream: &str, amount_cu: u64, data_dir: &str) -> String {
    format!(
        "database_url = \"{url}\"\nlease_ttl = \"2s\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{data_dir}\"\n\
         [stipend]\namount = {amount_cu}\n\
         [[models]]\nname = \"echo\"\nbackend = \"openai\"\nbase_url = \"{upstream}\"\nparams = \"8B\"\n"
    )
}

/// Spends what is left through one server, one call at a time, down to the last call that
/// fits: until the budget refuses three times in a row (what other servers held is given back
/// within moments of their calls ending). Returns how many calls were answered.
async fn spend_down(base: &str, key: &str, body: &serde_json::Value) -> i64 {
    let http = reqwest::Client::new();
    let (mut answered, mut refused_in_a_row) = (0, 0);
    while refused_in_a_row < 3 {
        let response = http
            .post(format!("{base}/chat/completions"))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .unwrap();
        match response.status().as_u16() {
            200 => {
                answered += 1;
                refused_in_a_row = 0;
            }
            429 => {
                refused_in_a_row += 1;
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            other => panic!("unexpected {other}: {}", response.text().await.unwrap()),
        }
    }
    answered
}

/// What a call of `body` reserves: its worst case, as the refusal of one says it.
async fn worst_case(base: &str, key: &str, body: &serde_json::Value) -> i64 {
    let refusal: serde_json::Value = reqwest::Client::new()
        .post(format!("{base}/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let message = refusal["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let needed = message
        .split(" cu)")
        .next()
        .and_then(|head| head.rsplit('(').next())
        .and_then(|number| number.parse().ok());
    needed.unwrap_or_else(|| panic!("not a refusal for the budget: {refusal}"))
}

/// Sends `calls` calls spread over `bases`, 16 at a time; returns (answered, refused for the
/// budget, failed without an answer).
async fn load(bases: &[String], key: &str, calls: usize) -> (i64, i64, i64) {
    let http = reqwest::Client::new();
    let body =
        json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (http, bases, key, body, next) = (
            http.clone(),
            bases.to_vec(),
            key.to_string(),
            body.clone(),
            std::sync::Arc::clone(&next),
        );
        tasks.push(tokio::spawn(async move {
            let mut counts = (0i64, 0i64, 0i64);
            loop {
                let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if index >= calls {
                    return counts;
                }
                let mut call = body.clone();
                call["stream"] = json!(index % 3 == 0);
                let sent = http
                    .post(format!("{}/chat/completions", bases[index % bases.len()]))
                    .bearer_auth(&key)
                    .json(&call)
                    .send()
                    .await;
                let Ok(response) = sent else {
                    counts.2 += 1;
                    continue;
                };
                let status = response.status().as_u16();
                let Ok(text) = response.text().await else {
                    counts.2 += 1;
                    continue;
                };
                match status {
                    200 if text.contains("[DONE]") || text.contains("\"choices\"") => counts.0 += 1,
                    200 => counts.2 += 1,
                    429 => {
                        assert!(text.contains("insufficient_quota"), "{text}");
                        counts.1 += 1;
                    }
                    // A server being killed may refuse or cut what it had in hand.
                    _ => counts.2 += 1,
                }
            }
        }));
    }
    let mut total = (0, 0, 0);
    for task in tasks {
        let (answered, refused, failed) = task.await.unwrap();
        total = (total.0 + answered, total.1 + refused, total.2 + failed);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_on_one_balance_never_overspend_and_a_killed_ones_leases_come_back() {
    let upstream = stipend_testkit::spawn().await.unwrap();
    let url = pg().fresh_database().unwrap();
    let body =
        json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    let cost = ((stipend_testkit::prompt_tokens(&body) + 4) * 16) as i64;
    // A stipend that covers 50 calls.
    let amount = 50 * cost as u64;
    let envs: Vec<Env> = (0..3)
        .map(|index| Env::new(&node_config(&url, &upstream, amount, &format!("n{index}"))))
        .collect();
    let mut servers: Vec<Option<Server>> =
        envs.iter().map(|env| Some(Server::start(env))).collect();
    let bases: Vec<String> = servers
        .iter()
        .map(|server| server.as_ref().unwrap().base.clone())
        .collect();
    let key = envs[0].person_with_key("ada");
    // 600 calls over three servers, for a budget of about 50: every answered call charged
    // exactly, the others refused for the budget (429 insufficient_quota), none failed.
    let (answered, refused, failed) = load(&bases, &key, 600).await;
    assert_eq!(failed, 0);
    assert_eq!(answered + refused, 600);
    let ada = envs[1].json(&["account", "show", "ada"]);
    assert_eq!(ada["usage"][0]["requests"], answered);
    assert_eq!(ada["usage"][0]["charged_cu"], answered * cost);
    assert!(answered * cost <= amount as i64);
    // What is left is spent through one server, down to the last call that fits: a call
    // reserves its worst case (the body's bytes as prompt tokens, and max_tokens), so less than
    // that stays.
    let more = spend_down(&bases[0], &key, &body).await;
    let worst = worst_case(&bases[0], &key, &body).await;
    let ada = envs[1].json(&["account", "show", "ada"]);
    assert_eq!(ada["usage"][0]["charged_cu"], (answered + more) * cost);
    assert!(ada["available_cu"].as_i64().unwrap() < worst, "{ada}");
    let answered = answered + more;
    // Another 50 calls' worth, spent while one server is killed with SIGKILL.
    let left = ada["balance_cu"].as_i64().unwrap();
    envs[2].json(&["grant", "ada", &(50 * cost).to_string()]);
    let killer = {
        let server = servers[2].take().unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(150)).await;
            server.kill();
        })
    };
    // A history checker beside the load: at every moment it looks, ada's charges are within
    // what she was granted, her balance is never negative, and what leases hold is within it.
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let checker = {
        let (config, watching) = (envs[0].config(), std::sync::Arc::clone(&watching));
        let granted = amount as i64 + 50 * cost;
        tokio::task::spawn_blocking(move || {
            let mut looks = 0;
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                let output = std::process::Command::new(env!("CARGO_BIN_EXE_stipend"))
                    .args(["--config"])
                    .arg(&config)
                    .args(["--json", "account", "show", "ada"])
                    .output()
                    .unwrap();
                let ada: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
                let charged = ada["usage"][0]["charged_cu"].as_i64().unwrap_or(0);
                let balance = ada["balance_cu"].as_i64().unwrap();
                assert!(charged <= granted, "charged {charged} of {granted}: {ada}");
                assert!(balance >= 0, "{ada}");
                assert_eq!(balance + charged, granted, "{ada}");
                assert!(ada["reserved_cu"].as_i64().unwrap() <= balance, "{ada}");
                looks += 1;
            }
            looks
        })
    };
    let (answered_two, _, failed_two) = load(&bases, &key, 300).await;
    killer.await.unwrap();
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    assert!(checker.await.unwrap() > 0);
    // The killed server's leases come back after their life; then the rest can be spent
    // through the others, to the last call.
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    let answered_three = spend_down(&bases[0], &key, &body).await;
    let ada = envs[0].json(&["account", "show", "ada"]);
    let charged = ada["usage"][0]["charged_cu"].as_i64().unwrap();
    // Everything answered was charged; nothing beyond what was granted; a call whose server
    // died before answering may have been charged (its client saw no answer), no more.
    let answered_all = answered + answered_two + answered_three;
    assert!(
        charged >= answered_all * cost,
        "{charged} < {answered_all} calls"
    );
    assert!(charged <= (answered_all + failed_two) * cost);
    // Nothing stranded: the dead server's leases came back, every cu is accounted for, and
    // what is left is less than one call's worst case.
    assert_eq!(
        ada["balance_cu"].as_i64().unwrap(),
        amount as i64 + 50 * cost - charged
    );
    assert_eq!(ada["available_cu"], ada["balance_cu"]);
    assert!(ada["available_cu"].as_i64().unwrap() < worst, "{ada}");
    assert!(left < worst);
    for server in servers.iter_mut().filter_map(Option::take) {
        server.stop();
    }
    let verify = envs[0].json(&["ledger", "verify"]);
    assert_eq!(verify["violations"], json!([]), "{verify}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_paused_past_its_leases_acknowledges_only_what_was_charged() {
    let upstream = stipend_testkit::spawn().await.unwrap();
    let url = pg().fresh_database().unwrap();
    let envs: Vec<Env> = (0..2)
        .map(|index| {
            Env::new(&node_config(
                &url,
                &upstream,
                10_000_000,
                &format!("p{index}"),
            ))
        })
        .collect();
    let servers: Vec<Server> = envs.iter().map(Server::start).collect();
    let key = envs[0].person_with_key("ada");
    let start = envs[0].json(&["account", "show", "ada"])["balance_cu"]
        .as_i64()
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Clients on both servers; each sums the charges it was told of (x-stipend-charged-cu).
    let mut clients = Vec::new();
    for index in 0..8 {
        let (base, key, stop) = (
            servers[index % 2].base.clone(),
            key.clone(),
            std::sync::Arc::clone(&stop),
        );
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut told = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let response = http
                    .post(format!("{base}/chat/completions"))
                    .bearer_auth(&key)
                    .json(&json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))
                    .send()
                    .await
                    .unwrap();
                if response.status() == 200 {
                    told += response.headers()["x-stipend-charged-cu"]
                        .to_str()
                        .unwrap()
                        .parse::<i64>()
                        .unwrap();
                }
                response.bytes().await.unwrap();
            }
            told
        }));
    }
    // Pause the second server (SIGSTOP) for more than two lease lives, then let it go on.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let pid = servers[1].pid().to_string();
    std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut told = 0;
    for client in clients {
        told += client.await.unwrap();
    }
    for server in servers {
        server.stop();
    }
    // Every charge a client was told of is in the database, and nothing else; nothing is held.
    let ada = envs[0].json(&["account", "show", "ada"]);
    let charged = ada["usage"][0]["charged_cu"].as_i64().unwrap();
    assert_eq!(charged, told);
    assert_eq!(ada["balance_cu"].as_i64().unwrap(), start - charged);
    assert_eq!(ada["available_cu"], ada["balance_cu"]);
    assert_eq!(envs[0].json(&["ledger", "verify"])["violations"], json!([]));
}
