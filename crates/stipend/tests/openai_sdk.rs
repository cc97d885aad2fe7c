//! The official OpenAI Python SDK against the real server: `tests/sdk/test_openai_sdk.py`,
//! run with the Python named by `STIPEND_PYTHON` (which `make test` points at a virtualenv with
//! the pinned `openai` package; see `tests/sdk/requirements.txt`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use common::{Env, Server};

#[tokio::test(flavor = "multi_thread")]
async fn the_official_openai_sdk_works_unchanged() {
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
    let upstream = stipend_testkit::spawn().await.unwrap();
    let env = Env::new(&format!(
        "listen = \"127.0.0.1:0\"\n[stipend]\namount = \"10 TFLOP\"\n\
         [[models]]\nname = \"echo\"\nbackend = \"openai\"\nbase_url = \"{upstream}\"\nparams = \"8B\"\n"
    ));
    let server = Server::start(&env);
    let key = env.person_with_key("alice");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/sdk/test_openai_sdk.py"
    );
    let output = tokio::task::spawn_blocking({
        let base = server.base.clone();
        move || {
            Command::new(&python)
                .arg(script)
                .env("STIPEND_BASE_URL", base)
                .env("STIPEND_KEY", key)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let report = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the SDK tests failed:\n{report}");
    assert!(
        report.contains("Ran 7 tests") && report.contains("OK"),
        "{report}"
    );
    let verify = env.json(&["ledger", "verify"]);
    assert_eq!(verify["violations"], serde_json::json!([]));
    server.stop();
}
