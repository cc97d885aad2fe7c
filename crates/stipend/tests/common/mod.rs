//! Shared by the binary's integration tests: a temp data dir with a config, the real `stipend`
//! binary, and a running server killed on drop.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

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
period = "1d"
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
    pub fn start(env: &Env) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_stipend"));
        command
            .current_dir(env.dir.path())
            .arg("--config")
            .arg(env.config())
            .arg("serve");
        Server::spawn(command)
    }

    /// Starts `command` (a `stipend … serve`) and waits until it is ready.
    pub fn spawn(mut command: Command) -> Server {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let output = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
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
