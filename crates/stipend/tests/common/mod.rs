//! Shared by the binary's integration tests: a temp data dir with a config, the real `stipend`
//! binary, and a running server killed on drop.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new(config: &str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("stipend.toml"), config).unwrap();
        Env { dir }
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("stipend.toml")
    }

    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_stipend"))
            .current_dir(self.dir.path())
            .arg("--config")
            .arg(self.config())
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs a command that must succeed and returns its JSON output.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let output = self.run(&all);
        assert!(
            output.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }

    /// Runs a command that must fail with exit code 2 and returns its message.
    pub fn refused(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {output:?}");
        String::from_utf8_lossy(&output.stderr).to_string()
    }

    /// Creates a person and a key for them; returns the key.
    pub fn person_with_key(&self, name: &str) -> String {
        self.json(&["account", "create", name]);
        self.json(&["key", "create", name])["key"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub fn db(&self) -> PathBuf {
        self.dir.path().join("data/ledger.db")
    }
}

pub const CONFIG: &str = r#"
listen = "127.0.0.1:0"
data_dir = "data"
[stipend]
amount = "10 PFLOP"
period = "3650d"             # no new period begins while the tests run
rollover_max = "10 PFLOP"
"#;

/// A running `stipend serve`, killed on drop; its output is printed if a test fails.
pub struct Server {
    child: Child,
    output: std::sync::Arc<std::sync::Mutex<String>>,
    /// The API base URL, e.g. `http://127.0.0.1:PORT/v1`.
    pub base: String,
}

impl Server {
    /// Starts the server; its log (standard error) is kept with its output and shown only if
    /// the test fails, so a passing run stays quiet (the fault tests make it say WARN and ERROR).
    pub fn start(env: &Env) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_stipend"));
        command
            .current_dir(env.dir.path())
            .stderr(Stdio::piped())
            .arg("--config")
            .arg(env.config())
            .arg("serve");
        Server::spawn(command)
    }

    /// Starts the server logging everything (`STIPEND_LOG=trace`) into the file `log`.
    pub fn start_logged(env: &Env, log: &std::path::Path) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_stipend"));
        command
            .current_dir(env.dir.path())
            .env("STIPEND_LOG", "trace")
            .stderr(std::fs::File::create(log).unwrap())
            .arg("--config")
            .arg(env.config())
            .arg("serve");
        Server::spawn(command)
    }

    /// Starts `command` (a `stipend … serve`; its stderr as set, the test's by default) and
    /// waits until it is ready.
    pub fn spawn(mut command: Command) -> Server {
        let mut child = command.stdout(Stdio::piped()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let output = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        // A piped standard error is read into the output too, line by line.
        if let Some(stderr) = child.stderr.take() {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    output
                        .lock()
                        .unwrap()
                        .push_str(&format!("stderr: {line}\n"));
                }
            });
        }
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<String>();
        {
            let output = output.clone();
            std::thread::spawn(move || {
                // Ready once the whole start-up summary is out.
                let mut base = None;
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Some(rest) = line.strip_prefix("Stipend is running on ") {
                        base = Some(rest.trim().to_string());
                    }
                    output.lock().unwrap().push_str(&format!("{line}\n"));
                    if line.starts_with("Press Ctrl-C to stop")
                        && let Some(base) = base.take()
                    {
                        let _ = ready_tx.send(base);
                    }
                }
            });
        }
        let base = ready_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the server did not become ready");
        Server {
            child,
            output,
            base,
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(mut self) -> String {
        self.stop_with("-TERM")
    }

    /// Kills the server with SIGKILL and waits for it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The output so far.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    fn stop_with(&mut self, signal: &str) -> String {
        Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "the server exited with {status}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(50));
        self.output.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("server output:\n{}", self.output.lock().unwrap());
        }
    }
}

/// `GET {base}/{path}` with `key`, as JSON.
pub async fn get_json(http: &reqwest::Client, base: &str, path: &str, key: &str) -> Value {
    http.get(format!("{base}/{path}"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// One small chat call to the test upstream's `echo` model with `key`; its status.
pub async fn echo_call(http: &reqwest::Client, base: &str, key: &str) -> u16 {
    http.post(format!("{base}/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "echo", "max_tokens": 2,
                      "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// `GET /v1/budget` with `key`, as JSON.
pub async fn budget(http: &reqwest::Client, base: &str, key: &str) -> Value {
    get_json(http, base, "budget", key).await
}

/// The server's `/metrics` text (`base` is the API's base URL, ending in `/v1`).
pub async fn metrics(http: &reqwest::Client, base: &str) -> String {
    http.get(base.trim_end_matches("/v1").to_string() + "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the sample `name{model="MODEL"}` in a `/metrics` text; panics if it is absent.
pub fn sample(metrics: &str, name: &str, model: &str) -> u64 {
    let prefix = format!("{name}{{model=\"{model}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in {metrics}"))
        .parse()
        .unwrap()
}

/// A change to a valid chat request, for the tests that send random requests.
#[derive(Debug, Clone)]
pub enum Edit {
    /// Sets a top-level field (added if absent).
    Set(&'static str, Value),
    /// Removes a top-level field.
    Remove(&'static str),
    /// Sets a field of the first message.
    SetInMessage(&'static str, Value),
    /// Appends a message.
    AddMessage(Value),
}

/// What is done to the request's text after the edits.
#[derive(Debug, Clone)]
pub enum Damage {
    None,
    /// Cut at a byte.
    Truncate(proptest::sample::Index),
    /// One byte replaced (possibly making it invalid UTF-8).
    Replace(proptest::sample::Index, u8),
    /// The first key written twice, the first time with another value.
    RepeatKey(Value),
}

fn odd_value() -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        prop_oneof![
            Just(0i64),
            Just(-1),
            Just(1),
            Just(8),
            Just(100_000),
            Just(1 << 53),
            Just(i64::MIN)
        ]
        .prop_map(Value::from),
        Just(json!(u64::MAX)),
        Just(json!(1.5)),
        Just(json!(1e300)),
        Just(json!(-0.0)),
        prop_oneof![
            Just(""),
            Just("echo"),
            Just("nope"),
            Just("user"),
            Just("system"),
            Just("é\u{1F600}\"\\\n"),
            Just("<|im_start|>system"),
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            Just(json!({"role": "user", "content": "hi"})),
            Just(json!({"role": "user", "content": [{"type": "text", "text": "hi"}]})),
            Just(json!({"include_usage": true})),
            Just(json!({"include_usage": "yes"})),
            prop::collection::vec(("[a-z_]{1,6}", inner), 0..3)
                .prop_map(|entries| Value::Object(entries.into_iter().collect())),
        ]
    })
}

fn edit() -> impl proptest::strategy::Strategy<Value = Edit> {
    use proptest::prelude::*;
    let field = prop_oneof![
        Just("model"),
        Just("messages"),
        Just("max_tokens"),
        Just("max_completion_tokens"),
        Just("stream"),
        Just("stream_options"),
        Just("temperature"),
        Just("top_p"),
        Just("n"),
        Just("stop"),
        Just("seed"),
        Just("user"),
        Just("unknown_field"),
    ];
    let message_field = prop_oneof![Just("role"), Just("content"), Just("name")];
    prop_oneof![
        (field.clone(), odd_value()).prop_map(|(field, value)| Edit::Set(field, value)),
        field.prop_map(Edit::Remove),
        (message_field, odd_value()).prop_map(|(field, value)| Edit::SetInMessage(field, value)),
        odd_value().prop_map(Edit::AddMessage),
        Just(Edit::Set("stream", json!(true))),
        Just(Edit::Set("max_tokens", json!(3))),
    ]
}

fn damage() -> impl proptest::strategy::Strategy<Value = Damage> {
    use proptest::prelude::*;
    prop_oneof![
        6 => Just(Damage::None),
        1 => any::<proptest::sample::Index>().prop_map(Damage::Truncate),
        1 => (any::<proptest::sample::Index>(), any::<u8>())
            .prop_map(|(at, byte)| Damage::Replace(at, byte)),
        1 => odd_value().prop_map(Damage::RepeatKey),
    ]
}

/// Random requests: up to three edits of a valid one, then maybe some damage to its text.
pub fn odd_request() -> impl proptest::strategy::Strategy<Value = (Vec<Edit>, Damage)> {
    (proptest::collection::vec(edit(), 0..4), damage())
}

/// A valid chat request to `model` (`"hi"`, `max_tokens` 8) with `edits` and `damage` applied,
/// as bytes.
pub fn odd_body(model: &str, edits: &[Edit], damage: &Damage) -> Vec<u8> {
    let mut body =
        json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8});
    for edit in edits {
        match edit.clone() {
            Edit::Set(field, value) => body[field] = value,
            Edit::Remove(field) => {
                body.as_object_mut().unwrap().remove(field);
            }
            Edit::SetInMessage(field, value) => {
                if let Some(message) = body["messages"].get_mut(0).filter(|m| m.is_object()) {
                    message[field] = value;
                }
            }
            Edit::AddMessage(value) => {
                if let Some(messages) = body["messages"].as_array_mut() {
                    messages.push(value);
                }
            }
        }
    }
    let mut text = serde_json::to_vec(&body).unwrap();
    match damage {
        Damage::None => {}
        Damage::Truncate(at) => text.truncate(at.index(text.len())),
        Damage::Replace(at, byte) => {
            let at = at.index(text.len());
            text[at] = *byte;
        }
        Damage::RepeatKey(value) => {
            // `{"model":...` → `{"model":VALUE,"model":...`: the last one counts.
            if let Some(key) = body.as_object().and_then(|o| o.keys().next()) {
                let first = format!("{{{}:{},", json!(key), value);
                text.splice(0..1, first.into_bytes());
            }
        }
    }
    text
}

/// Posts raw bytes as a chat request, failing the test if no answer starts within `limit`.
/// Returns the response and whether it is a stream.
pub async fn post_chat_bytes(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    body: Vec<u8>,
    limit: Duration,
) -> (reqwest::Response, bool) {
    let response = tokio::time::timeout(
        limit,
        http.post(format!("{base}/chat/completions"))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(body)
            .send(),
    )
    .await
    .expect("the server hung")
    .unwrap();
    let streamed = response
        .headers()
        .get("content-type")
        .is_some_and(|value| value == "text/event-stream");
    (response, streamed)
}

/// A proptest runner for `cases` cases, or `PROPTEST_CASES` if set.
pub fn runner(cases: u32) -> proptest::test_runner::TestRunner {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(cases);
    proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    })
}

/// Every regular file below `dir` that holds `needle`, with where.
pub fn files_holding(dir: &std::path::Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        for entry in std::fs::read_dir(&path).unwrap() {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                let bytes = std::fs::read(entry.path()).unwrap();
                if let Some(at) = bytes
                    .windows(needle.len())
                    .position(|window| window == needle.as_bytes())
                {
                    found.push(format!("{} at byte {at}", entry.path().display()));
                }
            }
        }
    }
    found
}

/// Fails if `marker` is in any file below `dir` (logs, the ledger, its WAL, …) or in the server's
/// `output`: for the rule that prompt and answer text is never written to disk or logs.
pub fn assert_written_nowhere(marker: &str, dir: &std::path::Path, output: &str) {
    assert!(!output.contains(marker), "the server printed {marker}");
    let found = files_holding(dir, marker);
    assert!(found.is_empty(), "{marker} is in {found:?}");
    assert!(
        std::fs::read_dir(dir).unwrap().next().is_some(),
        "nothing was written below {}",
        dir.display()
    );
}

/// Every operator command once, with its edges: what `stipend` does for an operator on a fresh
/// store, whichever store and whether or not a server holds it.
pub fn exercise(env: &Env) {
    let alice = env.json(&["account", "create", "alice"]);
    assert_eq!(alice["balance_cu"], 10_000_000);
    assert_eq!(alice["available_cu"], 10_000_000);
    assert_eq!(alice["reserved_cu"], 0);
    assert!(
        alice["next_grant_at"]
            .as_str()
            .unwrap()
            .ends_with("T00:00:00Z")
    );
    env.json(&["account", "create", "bob"]);
    let lab = env.json(&["account", "create", "lab", "--kind", "pool"]);
    assert_eq!(lab["balance_cu"], 0);
    // Names are held apart from look-alikes, so a grant cannot reach the wrong one.
    let message = env.refused(&["account", "create", "Alice"]);
    assert!(
        message.contains("\"Alice\" is too like the existing \"alice\""),
        "{message}"
    );
    let message = env.refused(&["account", "create", "\u{430}lice"]);
    assert!(message.contains("one script"), "{message}");
    let message = env.refused(&["account", "create", "ｂｏｂ"]);
    assert!(message.contains("\"bob\" already exists"), "{message}");
    assert_eq!(env.json(&["account", "show", "ｂｏｂ"])["name"], "bob");

    let grant = env.json(&["grant", "bob", "3.5 TFLOP", "--id", "abc123"]);
    assert_eq!(grant["amount_cu"], 3_500);
    assert_eq!(grant["replayed"], false);
    // The same id again is a no-op; with another amount it is refused.
    let again = env.json(&["grant", "bob", "3.5 TFLOP", "--id", "abc123"]);
    assert_eq!(again["replayed"], true);
    let message = env.refused(&["grant", "bob", "4 TFLOP", "--id", "abc123"]);
    assert!(
        message.contains("already used for a different transfer"),
        "{message}"
    );

    env.json(&["give", "alice", "bob", "250 GFLOP"]);
    let contribution = env.json(&["give", "alice", "lab", "1 PFLOP"]);
    assert_eq!(contribution["kind"], "pool_contribution");

    let bob = env.json(&["account", "show", "bob"]);
    assert_eq!(bob["balance_cu"], 10_000_000 + 3_500 + 250);
    let history = bob["history"].as_array().unwrap();
    assert_eq!(history.len(), 3);
    assert_eq!(history[0]["kind"], "gift");
    assert_eq!(history[0]["counterparty"], "alice");
    assert_eq!(history[0]["amount_cu"], 250);

    let list = env.json(&["account", "list"]);
    let names: Vec<&str> = list["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|account| account["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["issuer", "alice", "bob", "lab"]);
    let page = env.json(&["account", "list", "--limit", "2"]);
    assert_eq!(page["accounts"].as_array().unwrap().len(), 2);
    assert_eq!(page["next_after"], 2);

    // Bad input: a clear message, exit 2, nothing changed.
    for (args, expected) in [
        (
            &["give", "alice", "nobody", "5"][..],
            "no account named \"nobody\"",
        ),
        (&["give", "alice", "bob", "0"][..], "greater than zero"),
        (&["give", "alice", "bob", "-5"][..], "negative"),
        (&["give", "alice", "bob", "1.5 GFLOP"][..], "whole number"),
        (&["give", "alice", "bob", "100 PFLOP"][..], "available"),
        (&["give", "alice", "alice", "5"][..], "itself"),
        (&["grant", "bob", "5 bananas"][..], "unknown unit"),
        (
            &["grant", "bob", "5", "--id", "xyz"][..],
            "not a transfer id",
        ),
        (
            &["grant", "bob", "5", "--expires-in", "soon"][..],
            "--expires-in",
        ),
        (&["account", "create", "alice"][..], "already exists"),
        (
            &["account", "create", "has space"][..],
            "invalid account name",
        ),
        (&["account", "show", "nobody"][..], "no account named"),
    ] {
        let message = env.refused(args);
        assert!(message.contains(expected), "{args:?}: {message}");
    }
    let alice = env.json(&["account", "show", "alice"]);
    assert_eq!(alice["balance_cu"], 10_000_000 - 250 - 1_000_000);

    // Closing the pool: only when confirmed; all it holds back to the issuer; closed for good.
    let message = env.refused(&["account", "close", "lab"]);
    assert!(message.contains("--confirm"), "{message}");
    let issuer = env.json(&["account", "show", "issuer"])["balance_cu"]
        .as_i64()
        .unwrap();
    let closed = env.json(&["account", "close", "lab", "--confirm"]);
    assert_eq!(closed["returned_cu"], 1_000_000);
    let anonymous = closed["account"].as_str().unwrap().to_string();
    assert!(anonymous.starts_with("closed:"), "{closed}");
    assert_eq!(
        env.json(&["account", "show", "issuer"])["balance_cu"],
        issuer + 1_000_000
    );
    let shown = env.json(&["account", "show", &anonymous]);
    assert_eq!(
        (shown["kind"].as_str(), shown["balance_cu"].as_i64()),
        (Some("closed"), Some(0))
    );
    assert!(
        env.refused(&["account", "show", "lab"])
            .contains("no account named")
    );
    let message = env.refused(&["give", "alice", &anonymous, "5"]);
    assert!(message.contains("closed"), "{message}");
    // Again: nothing more happens.
    let again = env.json(&["account", "close", &anonymous, "--confirm"]);
    assert_eq!(
        (again["account"].as_str(), again["returned_cu"].as_u64()),
        (Some(anonymous.as_str()), Some(0))
    );
    assert_eq!(
        env.json(&["ledger", "verify"])["violations"],
        Value::Array(vec![])
    );
}
