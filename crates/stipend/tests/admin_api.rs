//! The operator's JSON API (`/v1/admin`) on the real binary: only an operator key opens it;
//! accounts are listed page by page, created and granted to (once per transfer id); keys are
//! made and revoked; the distribution is the one the test computes itself. Every refusal is
//! OpenAI-shaped and changes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Env, Server, budget};
use serde_json::{Value, json};

async fn config() -> String {
    let upstream = stipend_testkit::spawn().await.unwrap();
    format!(
        "{}\n[[models]]\nname = \"echo\"\nbackend = \"openai\"\nbase_url = \"{upstream}\"\nparams = \"8B\"\ntimeout = \"5s\"\n",
        common::CONFIG
    )
}

struct Admin {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Admin {
    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}/admin/{path}", self.base))
            .bearer_auth(&self.key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }
}

/// An OpenAI-shaped error with this status and code.
fn refused(answer: &(u16, Value), status: u16, code: Option<&str>) {
    assert_eq!(answer.0, status, "{}", answer.1);
    let error = &answer.1["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        answer.1
    );
    assert!(error["type"].is_string(), "{}", answer.1);
    if let Some(code) = code {
        assert_eq!(error["code"], code, "{}", answer.1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_operator_key_opens_it_and_it_manages_accounts_and_keys() {
    let env = Env::new(&config().await);
    let alice = env.person_with_key("alice");
    let operator = env.json(&["admin", "key", "create"])["key"]
        .as_str()
        .unwrap()
        .to_string();
    let server = Server::start(&env);
    let http = reqwest::Client::new();
    let admin = Admin {
        http: http.clone(),
        base: server.base.clone(),
        key: operator.clone(),
    };

    // No key, a person's key, a made-up key: 401, OpenAI-shaped.
    let none = http
        .get(format!("{}/admin/accounts", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(none.status(), 401);
    for key in [alice.as_str(), "sk-stipend-0123456789abcdef-nope"] {
        let stranger = Admin {
            http: http.clone(),
            base: server.base.clone(),
            key: key.to_string(),
        };
        refused(
            &stranger.get("accounts").await,
            401,
            Some("invalid_api_key"),
        );
        refused(
            &stranger.post("accounts", json!({"name": "mallory"})).await,
            401,
            Some("invalid_api_key"),
        );
    }

    // Create people and a pool; bad ones are refused and make nothing.
    for name in ["bob", "carol", "dave", "erin"] {
        let (status, account) = admin.post("accounts", json!({"name": name})).await;
        assert_eq!(status, 201, "{account}");
        assert_eq!(account["kind"], "person");
        assert_eq!(account["balance_cu"], 10_000_000);
    }
    let (status, pool) = admin
        .post("accounts", json!({"name": "lab", "kind": "pool"}))
        .await;
    assert_eq!((status, pool["kind"].as_str()), (201, Some("pool")));
    refused(
        &admin.post("accounts", json!({"name": "bob"})).await,
        409,
        Some("conflict"),
    );
    refused(
        &admin
            .post("accounts", json!({"name": "zed", "kind": "sink"}))
            .await,
        400,
        None,
    );
    refused(
        &admin.post("accounts", json!({"nom": "zed"})).await,
        400,
        None,
    );
    let garbage = http
        .post(format!("{}/admin/accounts", server.base))
        .bearer_auth(&operator)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), 400);

    // Listed page by page: every person and pool once, nothing else.
    let mut names = Vec::new();
    let mut after: Option<u64> = None;
    loop {
        let path = match after {
            Some(after) => format!("accounts?limit=2&after={after}"),
            None => "accounts?limit=2".to_string(),
        };
        let (status, page) = admin.get(&path).await;
        assert_eq!(status, 200, "{page}");
        for account in page["data"].as_array().unwrap() {
            names.push(account["name"].as_str().unwrap().to_string());
        }
        match page["next_after"].as_u64() {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    names.sort();
    assert_eq!(names, ["alice", "bob", "carol", "dave", "erin", "lab"]);

    // A grant moves compute once per transfer id.
    let grant = json!({"amount": "3 TFLOP", "id": "00000000000000000000000000abc123"});
    let (status, first) = admin.post("accounts/bob/grants", grant.clone()).await;
    assert_eq!(
        (status, first["replayed"].as_bool()),
        (200, Some(false)),
        "{first}"
    );
    let (_, again) = admin.post("accounts/bob/grants", grant).await;
    assert_eq!(again["replayed"], true);
    let (_, bob) = admin.get("accounts/bob").await;
    assert_eq!(bob["balance_cu"], 10_000_000 + 3_000);
    refused(
        &admin
            .post(
                "accounts/bob/grants",
                json!({"amount": "5 TFLOP", "id": "abc123"}),
            )
            .await,
        409,
        Some("conflict"),
    );
    refused(
        &admin
            .post("accounts/nobody/grants", json!({"amount": 5}))
            .await,
        404,
        Some("not_found"),
    );
    refused(
        &admin
            .post("accounts/bob/grants", json!({"amount": "lots"}))
            .await,
        400,
        None,
    );
    refused(
        &admin
            .post("accounts/bob/grants", json!({"amount": 0}))
            .await,
        400,
        None,
    );
    refused(&admin.get("accounts/nobody").await, 404, Some("not_found"));
    let (_, bob) = admin.get("accounts/bob").await;
    assert_eq!(
        bob["balance_cu"],
        10_000_000 + 3_000,
        "a refusal changed nothing"
    );

    // Keys: made (shown once), listed without secrets, revoked at once.
    let (status, key) = admin
        .send(
            reqwest::Method::POST,
            "accounts/carol/keys",
            Some(json!({"name": "carol's laptop"})),
        )
        .await;
    assert_eq!(status, 201, "{key}");
    assert_eq!(key["name"], "carol's laptop");
    let carol = key["key"].as_str().unwrap().to_string();
    assert_eq!(
        budget(&http, &server.base, &carol).await["account"],
        "carol"
    );
    let (_, listed) = admin.get("accounts/carol/keys").await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
    assert!(!listed.to_string().contains(&carol), "a secret was listed");
    let id = key["id"].as_str().unwrap();
    let (status, revoked) = admin
        .send(reqwest::Method::DELETE, &format!("keys/{id}"), None)
        .await;
    assert_eq!(status, 200);
    assert!(revoked["revoked_at"].is_string());
    let gone = http
        .get(format!("{}/budget", server.base))
        .bearer_auth(&carol)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 401);
    refused(
        &admin
            .send(reqwest::Method::DELETE, "keys/0123456789abcdef", None)
            .await,
        404,
        Some("not_found"),
    );
    // A pool can have a key; the issuer cannot have one this way.
    assert_eq!(
        admin
            .send(reqwest::Method::POST, "accounts/lab/keys", None)
            .await
            .0,
        201
    );
    refused(
        &admin
            .send(reqwest::Method::POST, "accounts/issuer/keys", None)
            .await,
        409,
        None,
    );
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_distribution_is_exact() {
    let env = Env::new(&config().await);
    let keys: Vec<String> = (0..6)
        .map(|index| env.person_with_key(&format!("p{index}")))
        .collect();
    let operator = env.json(&["admin", "key", "create"])["key"]
        .as_str()
        .unwrap()
        .to_string();
    let server = Server::start(&env);
    let http = reqwest::Client::new();
    // The i-th person makes i² calls.
    for (index, key) in keys.iter().enumerate() {
        for _ in 0..index * index {
            let status = http
                .post(format!("{}/chat/completions", server.base))
                .bearer_auth(key)
                .json(&json!({"model": "echo", "max_tokens": 2,
                              "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap()
                .status();
            assert_eq!(status, 200);
        }
    }
    let mut used = Vec::new();
    for key in &keys {
        used.push(
            budget(&http, &server.base, key).await["models"][0]["usage_this_period"]["charged_cu"]
                .as_u64()
                .unwrap() as f64,
        );
    }
    let n = used.len() as f64;
    let total: f64 = used.iter().sum();
    let pairs: f64 = used
        .iter()
        .flat_map(|a| used.iter().map(move |b| (a - b).abs()))
        .sum();
    let admin = Admin {
        http,
        base: server.base.clone(),
        key: operator,
    };
    let (status, report) = admin.get("distribution").await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["people_with_stipend"], 6);
    assert_eq!(report["people_active"], 5);
    assert_eq!(report["used_cu"].as_f64().unwrap(), total);
    let gini = report["gini"].as_f64().unwrap();
    assert!((gini - pairs / (2.0 * n * total)).abs() < 1e-9, "{report}");
    let lorenz = report["lorenz"].as_array().unwrap();
    assert_eq!(lorenz.len(), 11);
    assert_eq!(lorenz[0].as_f64(), Some(0.0));
    assert!((lorenz[10].as_f64().unwrap() - 1.0).abs() < 1e-12);
    let mut sorted = used.clone();
    sorted.sort_by(f64::total_cmp);
    assert_eq!(
        report["median_cu"].as_f64().unwrap(),
        (sorted[2] + sorted[3]) / 2.0
    );
    drop(server);
}

/// A chat call's status and error code.
async fn call(http: &reqwest::Client, base: &str, key: &str, model: &str) -> (u16, Value) {
    let response = http
        .post(format!("{base}/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": model, "max_tokens": 2,
                      "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// The models `key` is shown by `/v1/models`.
async fn listed(http: &reqwest::Client, base: &str, key: &str) -> Vec<String> {
    let models: Value = http
        .get(format!("{base}/models"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|model| model["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restricted_model_does_not_exist_for_anyone_else() {
    let upstream = stipend_testkit::spawn().await.unwrap();
    let mut config = config().await;
    config.push_str(&format!(
        "[[models]]\nname = \"big\"\nbackend = \"openai\"\nbase_url = \"{upstream}\"\nupstream_model = \"echo\"\nparams = \"8B\"\ntimeout = \"5s\"\n"
    ));
    let env = Env::new(&config);
    let alice = env.person_with_key("alice");
    let bob = env.person_with_key("bob");
    let carol = env.person_with_key("carol");
    let operator = env.json(&["admin", "key", "create"])["key"]
        .as_str()
        .unwrap()
        .to_string();
    let server = Server::start(&env);
    let http = reqwest::Client::new();
    let base = server.base.clone();
    let admin = Admin {
        http: http.clone(),
        base: base.clone(),
        key: operator,
    };
    // Open to all at first.
    assert_eq!(call(&http, &base, &alice, "big").await.0, 200);

    // `big` for bob and the staff group (carol); alice is told it does not exist.
    let (status, rules) = admin
        .send(
            reqwest::Method::PUT,
            "models/big/access",
            Some(json!({"accounts": ["bob"], "groups": ["staff"]})),
        )
        .await;
    assert_eq!(status, 200, "{rules}");
    let (status, _) = admin
        .send(reqwest::Method::PUT, "groups/staff/members/carol", None)
        .await;
    assert_eq!(status, 200);
    let refused_call = call(&http, &base, &alice, "big").await;
    refused(&refused_call, 404, Some("model_not_found"));
    assert_eq!(listed(&http, &base, &alice).await, ["echo"]);

    assert_eq!(
        call(&http, &base, &alice, "echo").await.0,
        200,
        "other models stay open"
    );
    assert_eq!(call(&http, &base, &bob, "big").await.0, 200);
    assert_eq!(call(&http, &base, &carol, "big").await.0, 200);
    assert_eq!(listed(&http, &base, &carol).await, ["big", "echo"]);
    // Alice was charged nothing for the refused call: `big` shows her one call from before it
    // was closed (a model she was charged for this period stays in her budget).
    let seen = budget(&http, &base, &alice).await;
    let big = seen["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|model| model["model"] == "big")
        .unwrap()
        .clone();
    assert_eq!(big["usage_this_period"]["requests"], 1, "{seen}");

    // Joining the group lets her in at once; leaving it shuts her out again.
    admin
        .send(reqwest::Method::PUT, "groups/staff/members/alice", None)
        .await;
    assert_eq!(call(&http, &base, &alice, "big").await.0, 200);
    let (_, left) = admin
        .send(reqwest::Method::DELETE, "groups/staff/members/alice", None)
        .await;
    assert_eq!(left["changed"], true);
    assert_eq!(call(&http, &base, &alice, "big").await.0, 404);
    let (_, shown) = admin.get("access").await;
    assert_eq!(
        shown["groups"],
        json!([{"group": "staff", "members": ["carol"]}]),
        "{shown}"
    );

    // Bad rules are refused and change nothing.
    refused(
        &admin
            .send(
                reqwest::Method::PUT,
                "models/nope/access",
                Some(json!({"accounts": ["bob"]})),
            )
            .await,
        404,
        None,
    );
    refused(
        &admin
            .send(
                reqwest::Method::PUT,
                "models/big/access",
                Some(json!({"accounts": ["nobody"]})),
            )
            .await,
        404,
        None,
    );
    refused(
        &admin
            .send(
                reqwest::Method::PUT,
                "models/big/access",
                Some(json!({"groups": ["Bad Name"]})),
            )
            .await,
        400,
        None,
    );
    assert_eq!(call(&http, &base, &bob, "big").await.0, 200);
    assert_eq!(call(&http, &base, &alice, "big").await.0, 404);

    // The rules outlive a restart.
    let output = server.stop();
    assert!(output.contains("Stopping"), "{output}");
    let server = Server::start(&env);
    let base = server.base.clone();
    assert_eq!(call(&http, &base, &alice, "big").await.0, 404);
    assert_eq!(call(&http, &base, &carol, "big").await.0, 200);

    // Opened to everyone again.
    let admin = Admin {
        http: http.clone(),
        base: base.clone(),
        key: admin.key,
    };
    let (status, _) = admin
        .send(reqwest::Method::PUT, "models/big/access", Some(json!({})))
        .await;
    assert_eq!(status, 200);
    assert_eq!(call(&http, &base, &alice, "big").await.0, 200);
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_cap_is_refused_and_the_cap_outlives_a_restart() {
    let env = Env::new(&config().await);
    let uncapped = env.person_with_key("alice");
    let operator = env.json(&["admin", "key", "create"])["key"]
        .as_str()
        .unwrap()
        .to_string();
    let server = Server::start(&env);
    let http = reqwest::Client::new();
    let base = server.base.clone();
    let admin = Admin {
        http: http.clone(),
        base: base.clone(),
        key: operator,
    };
    let (_, key) = admin
        .send(reqwest::Method::POST, "accounts/alice/keys", None)
        .await;
    let capped = key["key"].as_str().unwrap().to_string();
    let id = key["id"].as_str().unwrap().to_string();
    // 5 000 cu a period: a handful of these calls (each holds about 2 000 cu at worst, and is
    // charged far less).
    let (status, set) = admin
        .send(
            reqwest::Method::PUT,
            &format!("keys/{id}/cap"),
            Some(json!({"cap": 5_000})),
        )
        .await;
    assert_eq!(
        (status, set["cap_cu"].as_u64()),
        (200, Some(5_000)),
        "{set}"
    );
    refused(
        &admin
            .send(
                reqwest::Method::PUT,
                "keys/0123456789abcdef/cap",
                Some(json!({"cap": 1})),
            )
            .await,
        404,
        None,
    );
    refused(
        &admin
            .send(
                reqwest::Method::PUT,
                &format!("keys/{id}/cap"),
                Some(json!({"cap": "lots"})),
            )
            .await,
        400,
        None,
    );

    let mut answered = 0;
    let refusal = loop {
        let (status, body) = call(&http, &base, &capped, "echo").await;
        if status != 200 {
            break (status, body);
        }
        answered += 1;
        assert!(answered < 50, "the cap never bit");
    };
    assert!(answered >= 1, "{refusal:?}");
    refused(&refusal, 429, Some("key_cap_reached"));
    assert_eq!(refusal.1["error"]["type"], "insufficient_quota");
    let spent = budget(&http, &base, &uncapped).await;
    let charged = spent["models"][0]["usage_this_period"]["charged_cu"]
        .as_u64()
        .unwrap();
    assert!(charged <= 5_000, "{spent}");
    assert_eq!(
        spent["models"][0]["usage_this_period"]["requests"], answered,
        "the refused call was charged nothing"
    );
    // The account is far from empty: another key of alice's is not capped.
    assert_eq!(call(&http, &base, &uncapped, "echo").await.0, 200);
    let headers = http
        .post(format!("{base}/chat/completions"))
        .bearer_auth(&capped)
        .json(&json!({"model": "echo", "max_tokens": 2,
                      "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(headers.status(), 429);
    assert_eq!(headers.headers()["x-should-retry"], "false");

    // What the key spent is written down: after a restart it is still over its cap.
    server.stop();
    let server = Server::start(&env);
    let base = server.base.clone();
    assert_eq!(call(&http, &base, &capped, "echo").await.0, 429);
    // Without a cap it works again.
    let admin = Admin {
        http: http.clone(),
        base: base.clone(),
        key: admin.key,
    };
    let (status, _) = admin
        .send(
            reqwest::Method::PUT,
            &format!("keys/{id}/cap"),
            Some(json!({"cap": null})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(call(&http, &base, &capped, "echo").await.0, 200);
    drop(server);
}

/// Calls `model` with `key` until it answers `status` (the CLI's changes reach a running server
/// within its follow interval); panics after 5 s.
async fn until_status(http: &reqwest::Client, base: &str, key: &str, model: &str, status: u16) {
    for _ in 0..100 {
        if call(http, base, key, model).await.0 == status {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{model} never answered {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sets_access_and_caps_on_a_running_server() {
    let upstream = stipend_testkit::spawn().await.unwrap();
    let mut config = config().await;
    config.push_str(&format!(
        "[[models]]\nname = \"big\"\nbackend = \"openai\"\nbase_url = \"{upstream}\"\nupstream_model = \"echo\"\nparams = \"8B\"\ntimeout = \"5s\"\n"
    ));
    let env = Env::new(&config);
    let alice = env.person_with_key("alice");
    let bob = env.person_with_key("bob");
    let server = Server::start(&env);
    let http = reqwest::Client::new();
    let base = server.base.clone();

    // Through the control socket: big for bob and the group staff.
    let rules = env.json(&[
        "model",
        "access",
        "big",
        "--account",
        "bob",
        "--group",
        "staff",
    ]);
    assert_eq!(
        rules["models"],
        json!([{"model": "big", "accounts": ["bob"], "groups": ["staff"]}])
    );
    until_status(&http, &base, &alice, "big", 404).await;
    assert_eq!(call(&http, &base, &bob, "big").await.0, 200);
    env.json(&["group", "add", "staff", "alice"]);
    until_status(&http, &base, &alice, "big", 200).await;
    let shown = env.run(&["model", "rules"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("big: only bob, group staff"), "{text}");
    assert!(text.contains("group staff: alice"), "{text}");
    env.json(&["group", "remove", "staff", "alice"]);
    until_status(&http, &base, &alice, "big", 404).await;
    // Refusals: a model not in the config, a bad group, no one named.
    assert!(
        env.refused(&["model", "access", "nope", "--open"])
            .contains("no model named")
    );
    assert!(
        env.refused(&["group", "add", "Bad Group", "alice"])
            .contains("not a group name")
    );
    assert!(env.refused(&["model", "access", "big"]).contains("--open"));
    env.json(&["model", "access", "big", "--open"]);
    until_status(&http, &base, &alice, "big", 200).await;

    // A cap set from the CLI bites at once.
    let keys = env.json(&["key", "list", "alice"]);
    let id = keys["keys"][0]["id"].as_str().unwrap().to_string();
    let capped = env.json(&["key", "cap", &id, "1 GFLOP"]);
    assert_eq!(capped["cap_cu"], 1);
    let refusal = call(&http, &base, &alice, "echo").await;
    refused(&refusal, 429, Some("key_cap_reached"));
    let listed = env.run(&["key", "list", "alice"]);
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("cap 1 GFLOP a period"),
        "{listed:?}"
    );
    env.json(&["key", "cap", &id, "none"]);
    assert_eq!(call(&http, &base, &alice, "echo").await.0, 200);
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_log_says_who_changed_what_and_nothing_of_what_people_do() {
    let env = Env::new(&config().await);
    let alice = env.person_with_key("alice");
    env.json(&["account", "create", "bob"]);
    let operator = env.json(&["admin", "key", "create"])["key"]
        .as_str()
        .unwrap()
        .to_string();
    let operator_id = operator.split('-').nth(2).unwrap().to_string();
    let server = Server::start(&env);
    let http = reqwest::Client::new();
    let admin = Admin {
        http: http.clone(),
        base: server.base.clone(),
        key: operator,
    };
    // The CLI (through the running server) and the admin API each change something.
    env.json(&["grant", "bob", "7 TFLOP"]);
    let (status, _) = admin
        .post("accounts/alice/grants", json!({"amount": 2_000}))
        .await;
    assert_eq!(status, 200);
    // A person's own call is nobody's business here.
    assert_eq!(call(&http, &server.base, &alice, "echo").await.0, 200);
    let log = env.json(&["audit"]);
    let actions = log["actions"].as_array().unwrap();
    let said: Vec<(String, String, String, Option<u64>)> = actions
        .iter()
        .map(|action| {
            (
                action["actor"].as_str().unwrap().to_string(),
                action["action"].as_str().unwrap().to_string(),
                action["account"].as_str().unwrap_or("").to_string(),
                action["amount_cu"].as_u64(),
            )
        })
        .collect();
    assert_eq!(
        said,
        [
            (
                format!("operator key {operator_id}"),
                "grant".into(),
                "alice".into(),
                Some(2_000)
            ),
            ("cli".into(), "grant".into(), "bob".into(), Some(7_000)),
            // The policy the server started with: its first start logs it.
            (
                "config".into(),
                "policy".into(),
                String::new(),
                Some(10_000_000)
            ),
            (
                "cli".into(),
                "operator key create".into(),
                String::new(),
                None
            ),
            ("cli".into(), "account create".into(), "bob".into(), None),
            ("cli".into(), "key create".into(), "alice".into(), None),
            ("cli".into(), "account create".into(), "alice".into(), None),
        ],
        "{log}"
    );
    // The same through the admin API, a page at a time.
    let (_, first) = admin.get("audit?limit=2").await;
    assert_eq!(first["data"].as_array().unwrap().len(), 2);
    let before = first["next_before"].as_i64().unwrap();
    let (_, rest) = admin.get(&format!("audit?before={before}")).await;
    assert_eq!(rest["data"].as_array().unwrap().len(), 5);
    let text = String::from_utf8_lossy(&env.run(&["audit"]).stdout).to_string();
    assert!(text.contains("grant  bob  7 TFLOP"), "{text}");
    let policy = actions[2]["object"].as_str().unwrap().to_string();
    assert!(
        policy.contains("stipend 10000000 cu every 3650d")
            && policy.contains("echo 16/16 cu a token"),
        "{policy}"
    );
    // Started again on the same config: nothing new. On a changed one: the change is logged.
    drop(server);
    let server = Server::start(&env);
    let policies = |env: &Env| -> Vec<String> {
        env.json(&["audit"])["actions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|action| action["action"] == "policy")
            .map(|action| action["object"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(policies(&env), std::slice::from_ref(&policy));
    drop(server);
    let changed = format!(
        "transparency_epsilon = 0.5\n{}",
        std::fs::read_to_string(env.config()).unwrap()
    );
    std::fs::write(env.config(), changed).unwrap();
    let server = Server::start(&env);
    let logged = policies(&env);
    assert_eq!(logged.len(), 2, "{logged:?}");
    assert!(logged[0].contains("transparency ε 0.5"), "{logged:?}");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_exports_every_transfer_of_theirs_and_nothing_of_anyone_else() {
    let env = Env::new(&config().await);
    let alice = env.person_with_key("alice");
    let bob = env.person_with_key("bob");
    let operator = env.json(&["admin", "key", "create"])["key"]
        .as_str()
        .unwrap()
        .to_string();
    let server = Server::start(&env);
    let http = reqwest::Client::new();
    let base = server.base.clone();
    for _ in 0..3 {
        assert_eq!(call(&http, &base, &alice, "echo").await.0, 200);
    }
    assert_eq!(call(&http, &base, &bob, "echo").await.0, 200);
    env.json(&["give", "alice", "bob", "1 TFLOP"]);
    env.json(&["give", "bob", "alice", "2 TFLOP"]);
    env.json(&["grant", "alice", "5 TFLOP"]);
    env.json(&["grant", "bob", "9 TFLOP"]);

    let response = http
        .get(format!("{base}/me/export"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .contains("attachment")
    );
    let text = response.text().await.unwrap();
    let export: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(export["account"]["name"], "alice");
    let transfers = export["transfers"].as_array().unwrap();
    let kinds: Vec<&str> = transfers
        .iter()
        .map(|transfer| transfer["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "stipend", "spend", "spend", "spend", "gift", "gift", "grant"
        ],
        "{export}"
    );
    // Every transfer is there: they add up to the balance, which began at nothing.
    let total: i64 = transfers
        .iter()
        .map(|transfer| transfer["amount_cu"].as_i64().unwrap())
        .sum();
    assert_eq!(total, export["account"]["balance_cu"].as_i64().unwrap());
    assert_eq!(export["usage_this_period"][0]["requests"], 3);
    assert_eq!(export["keys"].as_array().unwrap().len(), 1);
    // Nothing of bob's but his name on alice's own gifts: not his key, his call, his grant.
    let bob_id = bob.split('-').nth(2).unwrap();
    assert!(!text.contains(bob_id));
    assert!(
        transfers
            .iter()
            .all(|transfer| transfer["amount_cu"].as_i64().unwrap().abs() != 9_000),
        "bob's grant"
    );
    // No secret, not even alice's own.
    let alice_secret = alice.split('-').nth(3).unwrap();
    assert!(!text.contains(alice_secret));
    // The operator's CLI exports the same (through the running server), and says so in the log.
    let cli = env.json(&["account", "export", "alice"])["export"].clone();
    assert_eq!(cli["transfers"], export["transfers"]);
    assert_eq!(cli["keys"], export["keys"]);
    assert_eq!(
        env.json(&["audit"])["actions"][0]["action"],
        "account export"
    );
    // Only a person's key opens it.
    for key in [operator.as_str(), "sk-stipend-0123456789abcdef-nope"] {
        let refused = http
            .get(format!("{base}/me/export"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 401);
    }
    drop(server);
}
