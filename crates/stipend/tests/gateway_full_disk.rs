//! Fail closed: when the ledger cannot be written (here, a full disk), requests are refused with
//! 503 and never served uncharged; once the disk is freed the server serves again by itself, and
//! exactly what was acknowledged is charged (checked again after a restart). The data directory is a 2 MiB tmpfs, so this test needs root (CI runs as root).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Env, Server};
use serde_json::{Value, json};

struct Mount(PathBuf);

impl Mount {
    fn tmpfs(path: &Path, size: &str) -> Option<Mount> {
        std::fs::create_dir_all(path).unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .status()
            .ok()?;
        status.success().then(|| Mount(path.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| output.stdout.starts_with(b"0"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_fails_closed_and_serving_resumes_when_it_is_freed() {
    if !is_root() {
        eprintln!(
            "SKIPPED a_full_disk_fails_closed_and_serving_resumes_when_it_is_freed: mounting a tmpfs needs root"
        );
        return;
    }
    let upstream = stipend_testkit::spawn().await.unwrap();
    let env = Env::new(&format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n[stipend]\namount = \"10 PFLOP\"\n\
         [[models]]\nname = \"echo\"\nbackend = \"openai\"\nbase_url = \"{upstream}\"\nparams = \"8B\"\n"
    ));
    let data = env.dir.path().join("data");
    let _mount = Mount::tmpfs(&data, "2m").expect("cannot mount a tmpfs as root");
    let server = Server::start(&env);
    let key = env.person_with_key("alice");
    let http = reqwest::Client::new();
    let body =
        json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    let call = || async {
        let response = http
            .post(format!("{}/chat/completions", server.base))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json::<Value>().await.unwrap())
    };
    let cost = ((stipend_testkit::prompt_tokens(&body) + 4) * 16) as i64;
    let start = env.json(&["account", "show", "alice"])["balance_cu"]
        .as_i64()
        .unwrap();
    let (status, _) = call().await;
    assert_eq!(status, 200);
    let mut acknowledged = 1;

    // Fill the disk.
    let mut filler = std::fs::File::create(data.join("filler")).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while filler.write_all(&chunk).is_ok() {}
    while filler.write_all(&chunk[..512]).is_ok() {}
    drop(filler);

    let mut refused = None;
    for _ in 0..200 {
        let (status, answer) = call().await;
        match status {
            200 => acknowledged += 1,
            503 => {
                refused = Some(answer);
                break;
            }
            other => panic!("unexpected {other}: {answer}"),
        }
    }
    let refused = refused.expect("a full disk never refused a request");
    assert_eq!(refused["error"]["code"], "ledger_unavailable", "{refused}");
    assert!(
        refused.get("choices").is_none(),
        "an answer was served uncharged"
    );
    // Closed for everything now, health included.
    let (status, _) = call().await;
    assert_eq!(status, 503);
    let health = http
        .get(server.base.trim_end_matches("/v1").to_string() + "/healthz")
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 503);

    // Still closed a while later: the ledger probes the store, which still refuses writes.
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let (status, _) = call().await;
    assert_eq!(status, 503);

    // Free the disk: the server reopens by itself, without a restart.
    std::fs::remove_file(data.join("filler")).unwrap();
    let reopened = std::time::Instant::now();
    loop {
        let (status, answer) = call().await;
        match status {
            200 => {
                acknowledged += 1;
                break;
            }
            503 if reopened.elapsed() < std::time::Duration::from_secs(15) => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            other => panic!("the server did not reopen: {other}: {answer}"),
        }
    }
    let health = http
        .get(server.base.trim_end_matches("/v1").to_string() + "/healthz")
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    // And after a restart, exactly the acknowledged calls are charged.
    server.kill();
    let report = env.json(&["ledger", "verify"]);
    assert_eq!(report["violations"], json!([]), "{report}");
    let server = Server::start(&env);
    let balance = env.json(&["account", "show", "alice"])["balance_cu"]
        .as_i64()
        .unwrap();
    assert_eq!(
        start - balance,
        acknowledged * cost,
        "{acknowledged} calls were answered"
    );
    server.stop();
}
