//! The official OpenAI Python SDK against the real server: `tests/sdk/test_openai_sdk.py`,
//! run with the Python named by `STIPEND_PYTHON` (which `make test` points at a virtualenv with
//! the pinned `openai` package; see `tests/sdk/requirements.txt`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use common::{Env, Server};

/// The Python with the pinned `openai` package.
fn python() -> String {
    let python = std::env::var("STIPEND_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let has_sdk = Command::new(&python)
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        has_sdk,
        "{python} cannot import openai: run `make test` (it installs tests/sdk/requirements.txt \
         into a virtualenv), or set STIPEND_PYTHON to a Python that has it"
    );
    python
}

/// Runs one of the SDK test scripts against a server; returns its report.
async fn run_script(script: &'static str, envs: Vec<(&'static str, String)>) -> String {
    let python = python();
    let script = stipend_testkit::repo_path(script);
    let output = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .arg(script)
            .envs(envs)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let report = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(output.status.success(), "the SDK tests failed:\n{report}");
    report
}

#[tokio::test(flavor = "multi_thread")]
async fn the_official_openai_sdk_works_unchanged() {
    let upstream = stipend_testkit::spawn().await.unwrap();
    let env = Env::new(&format!(
        "listen = \"127.0.0.1:0\"\n[stipend]\namount = \"10 TFLOP\"\n\
         [[models]]\nname = \"echo\"\nbackend = \"openai\"\nbase_url = \"{upstream}\"\nparams = \"8B\"\n"
    ));
    let server = Server::start(&env);
    let key = env.person_with_key("alice");
    let report = run_script(
        "tests/sdk/test_openai_sdk.py",
        vec![
            ("STIPEND_BASE_URL", server.base.clone()),
            ("STIPEND_KEY", key),
        ],
    )
    .await;
    assert!(
        report.contains("Ran 7 tests") && report.contains("OK"),
        "{report}"
    );
    let verify = env.json(&["ledger", "verify"]);
    assert_eq!(verify["violations"], serde_json::json!([]));
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_official_openai_sdk_works_with_the_embedded_model() {
    let gguf = stipend_testkit::model_gguf().display().to_string();
    let env = Env::new(&format!(
        "listen = \"127.0.0.1:0\"\n[stipend]\namount = \"3 TFLOP\"\n\
         [[models]]\nname = \"smollm2-135m\"\nbackend = \"embedded\"\npath = \"{gguf}\"\ncontext = 4096\n"
    ));
    let server = Server::start(&env);
    let key = env.person_with_key("alice");
    let report = run_script(
        "tests/sdk/test_openai_sdk_embedded.py",
        vec![
            ("STIPEND_BASE_URL", server.base.clone()),
            ("STIPEND_KEY", key),
            ("STIPEND_MODEL", "smollm2-135m".to_string()),
        ],
    )
    .await;
    assert!(
        report.contains("Ran 6 tests") && report.contains("OK"),
        "{report}"
    );
    let verify = env.json(&["ledger", "verify"]);
    assert_eq!(verify["violations"], serde_json::json!([]));
    server.stop();
}
