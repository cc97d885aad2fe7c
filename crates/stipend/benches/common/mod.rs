//! What the embedded model's benchmarks share: the real `stipend` binary started from a config,
//! keys made with its CLI, and a streamed chat call timed at the client.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;

/// An environment variable's value, or `default` when it is unset or does not parse.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// Slots of the model's context, every way it is run (`STIPEND_BENCH_SLOTS`, default 8).
pub fn slots() -> u32 {
    env_or("STIPEND_BENCH_SLOTS", 8)
}

/// `stipend serve` on a config file; killed when dropped.
pub struct Served {
    pub child: Child,
    /// Its API's base URL.
    pub base: String,
    config: PathBuf,
}

impl Served {
    /// Starts the server on `config` (written by the caller), in `dir`, and waits until it says
    /// where it is.
    pub fn start(config: &Path, dir: &Path) -> Served {
        let mut child = Command::new(env!("CARGO_BIN_EXE_stipend"))
            .arg("--config")
            .arg(config)
            .arg("serve")
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let base = loop {
            let line = lines.next().expect("the server stopped").unwrap();
            if let Some(rest) = line.strip_prefix("Stipend is running on ") {
                break rest.trim().to_string();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Served {
            child,
            base,
            config: config.to_path_buf(),
        }
    }

    /// Makes the account `name` (a person) and a key for it, with the CLI.
    pub fn person_with_key(&self, name: &str) -> String {
        let run = |args: &[&str]| {
            let output = Command::new(env!("CARGO_BIN_EXE_stipend"))
                .arg("--config")
                .arg(&self.config)
                .arg("--json")
                .args(args)
                .output()
                .unwrap();
            assert!(output.status.success(), "{output:?}");
            serde_json::from_slice::<Value>(&output.stdout).unwrap()
        };
        run(&["account", "create", name]);
        run(&["key", "create", name])["key"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One streamed call, as its client saw it.
#[derive(Debug, Clone)]
pub struct StreamedCall {
    /// From the usage chunk (0 if there was none).
    pub prompt_tokens: usize,
    /// From the usage chunk, or else the chunks that carried text.
    pub completion_tokens: usize,
    /// The first and the last chunk with text, from `started`.
    pub first: Duration,
    pub last: Duration,
    pub text: String,
}

/// Sends a streaming chat completion `body` (with `stream` and, for the counts, `stream_options`
/// set by the caller) and reads it to its end.
pub async fn stream_chat(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    body: &Value,
    started: Instant,
) -> StreamedCall {
    let response = http
        .post(format!("{base}/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{base}");
    let mut chunks = response.bytes_stream();
    let mut buffer = String::new();
    let (mut first, mut last) = (None, Duration::ZERO);
    let (mut text, mut pieces, mut usage) = (String::new(), 0, Value::Null);
    while let Some(bytes) = chunks.next().await {
        buffer.push_str(&String::from_utf8_lossy(&bytes.unwrap()));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let chunk: Value = serde_json::from_str(data).unwrap();
            let content = chunk["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or_default();
            if !content.is_empty() {
                let now = started.elapsed();
                first.get_or_insert(now);
                last = now;
                pieces += 1;
                text.push_str(content);
            }
            if !chunk["usage"].is_null() {
                usage = chunk["usage"].clone();
            }
        }
    }
    StreamedCall {
        prompt_tokens: usage["prompt_tokens"].as_u64().unwrap_or(0) as usize,
        completion_tokens: usage["completion_tokens"]
            .as_u64()
            .map_or(pieces, |n| n as usize),
        first: first.unwrap_or(last),
        last,
        text,
    }
}
