//! A person's agent run through the real binary: `stipend serve` with the scripted test upstream
//! and the filesystem MCP server (npm), driven by the `stipend agent` commands with the person's
//! own key: start, see what it asks, approve it with edited arguments, and read how it ended.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{Env, Server};
use serde_json::Value;

fn files_server() -> PathBuf {
    let modules = std::env::var("STIPEND_MCP_NODE_MODULES")
        .unwrap_or_else(|_| "/var/tmp/stipend-target/mcp/node_modules".to_string());
    let path = PathBuf::from(modules).join(".bin/mcp-server-filesystem");
    assert!(
        path.exists(),
        "{} is missing: run `make test` (it installs tests/mcp)",
        path.display()
    );
    path
}

fn agent(env: &Env, server: &Server, key: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec!["agent", "--url", &server.base, "--key", key];
    all.extend_from_slice(args);
    env.run(&all)
}

fn agent_json(env: &Env, server: &Server, key: &str, args: &[&str]) -> Value {
    let mut all = vec!["--json", "agent", "--url", &server.base, "--key", key];
    all.extend_from_slice(args);
    let output = env.run(&all);
    assert!(output.status.success(), "{args:?}: {output:?}");
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Starts a run of the scripted model with the files toolset; its id.
fn start_files_run(env: &Env, server: &Server, key: &str, goal: &str, budget: &str) -> String {
    let run = agent_json(
        env,
        server,
        key,
        &[
            "start",
            "--goal",
            goal,
            "--model",
            "script",
            "--budget",
            budget,
            "--toolset",
            "files",
        ],
    );
    run["id"].as_str().unwrap().to_string()
}

fn until(env: &Env, server: &Server, key: &str, id: &str, state: &str) -> Value {
    for _ in 0..300 {
        let run = agent_json(env, server, key, &["show", id]);
        if run["state"] == state {
            return run;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the run never reached {state}");
}

fn config(upstream: &str) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n[stipend]\namount = \"10 PFLOP\"\nperiod = \"3650d\"\n\
         [[models]]\nname = \"script\"\nbackend = \"openai\"\nbase_url = \"{upstream}\"\nparams = \"8B\"\n\
         [[toolsets]]\nname = \"files\"\ncommand = \"{}\"\nargs = [\"{{workdir}}\"]\n\
         policy = {{ default = \"ask\", read_text_file = \"auto\" }}\n",
        files_server().display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_waiting_for_approval_outlives_a_killed_server_and_repeats_nothing() {
    let upstream = stipend_testkit::spawn().await.unwrap();
    let env = Env::new(&config(&upstream));
    let server = Server::start(&env);
    let key = env.person_with_key("ada");
    let before = env.json(&["account", "show", "ada"])["balance_cu"]
        .as_i64()
        .unwrap();
    let script = r#"SCRIPT: [{"call":[{"name":"files__write_file","arguments":{"path":"a.txt","content":"once"}}]},{"say":"written"}]"#;
    let id = start_files_run(&env, &server, &key, script, "500000");
    let waiting = until(&env, &server, &key, &id, "waiting_for_approval");
    let approval = waiting["approval"]["id"].as_str().unwrap().to_string();
    let first_step_cu = waiting["spent_cu"].as_i64().unwrap();
    assert!(first_step_cu > 0);
    server.kill();
    // While no server runs, the cap sits in the run's account.
    let held = env.json(&["account", "show", "ada"])["balance_cu"]
        .as_i64()
        .unwrap();
    assert_eq!(held, before - 500_000);
    let server = Server::start(&env);
    assert!(
        server.output().contains("Resumed 1 agent runs"),
        "{}",
        server.output()
    );
    // It still waits, for the same approval, having spent what it had.
    let again = until(&env, &server, &key, &id, "waiting_for_approval");
    assert_eq!(again["approval"]["id"], approval.as_str());
    assert_eq!(again["spent_cu"], first_step_cu);
    let approved = agent(&env, &server, &key, &["approve", &approval]);
    assert!(approved.status.success(), "{approved:?}");
    let done = until(&env, &server, &key, &id, "done");
    let outcomes: Vec<String> = done["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|step| {
            format!(
                "{}:{}",
                step["kind"].as_str().unwrap(),
                step["outcome"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        ["model:asked_for_tools", "tool:approved", "model:answered"]
    );
    let note = env.dir.path().join("data/agents").join(&id).join("a.txt");
    assert_eq!(std::fs::read_to_string(note).unwrap(), "once");
    // Two model calls in all were charged: none was made twice, and the rest came back.
    let spent = done["spent_cu"].as_i64().unwrap();
    let account = format!("agent:{}:{id}", env.json(&["account", "show", "ada"])["id"]);
    let run_account = env.json(&["account", "show", &account]);
    assert_eq!(run_account["usage"][0]["requests"], 2, "{run_account}");
    assert_eq!(
        run_account["usage"][0]["charged_cu"], spent,
        "{run_account}"
    );
    assert_eq!(run_account["balance_cu"], 0, "{run_account}");
    let after = env.json(&["account", "show", "ada"])["balance_cu"]
        .as_i64()
        .unwrap();
    assert_eq!(after, before - spent);
    server.stop();
    let verify = env.json(&["ledger", "verify"]);
    assert_eq!(verify["violations"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_runs_an_agent_and_approves_what_it_asks_from_the_cli() {
    let upstream = stipend_testkit::spawn().await.unwrap();
    let env = Env::new(&config(&upstream));
    let server = Server::start(&env);
    let key = env.person_with_key("ada");
    let before = env.json(&["account", "show", "ada"])["balance_cu"]
        .as_i64()
        .unwrap();
    let script = r#"SCRIPT: [{"call":[{"name":"files__write_file","arguments":{"path":"note.txt","content":"from the model"}}]},{"say":"noted"}]"#;
    let id = start_files_run(&env, &server, &key, script, "200000");
    let waiting = until(&env, &server, &key, &id, "waiting_for_approval");
    let approval = waiting["approval"]["id"].as_str().unwrap().to_string();
    let listed = agent(&env, &server, &key, &["approvals"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        text.contains(&approval) && text.contains("files__write_file"),
        "{text}"
    );
    let approved = agent(
        &env,
        &server,
        &key,
        &[
            "approve",
            &approval,
            "--arguments",
            r#"{"path":"note.txt","content":"from the CLI"}"#,
        ],
    );
    assert!(approved.status.success(), "{approved:?}");
    let done = until(&env, &server, &key, &id, "done");
    let note = env
        .dir
        .path()
        .join("data/agents")
        .join(&id)
        .join("note.txt");
    assert_eq!(std::fs::read_to_string(note).unwrap(), "from the CLI");
    let shown = agent(&env, &server, &key, &["show", &id]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("files__write_file") && text.contains("approved"),
        "{text}"
    );
    assert!(text.contains("answer: noted"), "{text}");
    // What the run spent left ada, and nothing more.
    let spent = done["spent_cu"].as_i64().unwrap();
    assert!(spent > 0);
    let after = env.json(&["account", "show", "ada"])["balance_cu"]
        .as_i64()
        .unwrap();
    assert_eq!(after, before - spent);
    // Deciding again is a conflict; a key that is not ada's finds nothing; no key, no entry.
    let again = agent(
        &env,
        &server,
        &key,
        &["deny", &approval, "--reason", "changed my mind"],
    );
    assert_eq!(again.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("409"),
        "{again:?}"
    );
    let bob = env.person_with_key("bob");
    let other = agent(&env, &server, &bob, &["show", &id]);
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("404"),
        "{other:?}"
    );
    let nobody = agent(&env, &server, "sk-stipend-0-0", &["list"]);
    assert!(
        String::from_utf8_lossy(&nobody.stderr).contains("401"),
        "{nobody:?}"
    );
}

/// `mcp-server-time`, installed by `make test` beside the Python the SDK tests use.
fn time_server() -> PathBuf {
    let python = std::env::var("STIPEND_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let path = PathBuf::from(python).with_file_name("mcp-server-time");
    assert!(
        path.exists(),
        "{} is missing: run `make test`",
        path.display()
    );
    path
}

#[test]
fn a_run_on_the_embedded_model_makes_tool_calls_that_parse_and_ends() {
    let env = Env::new(&format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n[stipend]\namount = \"10 PFLOP\"\nperiod = \"3650d\"\n\
         [agents]\nstep_max_tokens = 200\n\
         [[models]]\nname = \"smollm2-135m\"\nbackend = \"embedded\"\npath = \"{}\"\n\
         [[toolsets]]\nname = \"time\"\ncommand = \"{}\"\nshared = true\npolicy = {{ default = \"auto\" }}\n",
        stipend_testkit::model_gguf().display(),
        time_server().display()
    ));
    let server = Server::start(&env);
    let key = env.person_with_key("ada");
    let run = agent_json(
        &env,
        &server,
        &key,
        &[
            "start",
            "--goal",
            "What time is it now in Tokyo? Use the time tool.",
            "--model",
            "smollm2-135m",
            "--budget",
            "5000000",
            "--toolset",
            "time",
            "--max-steps",
            "3",
        ],
    );
    let id = run["id"].as_str().unwrap().to_string();
    let mut ended = Value::Null;
    for _ in 0..1_200 {
        let run = agent_json(&env, &server, &key, &["show", &id]);
        if ["done", "stopped", "failed", "budget_exhausted"]
            .contains(&run["state"].as_str().unwrap())
        {
            ended = run;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // It ends by itself: answering, or at its step limit; never failing on what the model wrote.
    let state = ended["state"].as_str().unwrap_or("still running");
    assert!(["done", "stopped"].contains(&state), "{ended}");
    let steps = ended["steps"].as_array().unwrap();
    assert!(!steps.is_empty(), "{ended}");
    for step in steps.iter().filter(|step| step["kind"] == "tool") {
        let tool = step["tool"].as_str().unwrap();
        assert!(tool.starts_with("time__"), "{step}");
        let outcome = step["outcome"].as_str().unwrap();
        assert!(
            outcome.starts_with("auto"),
            "a tool call that did not parse: {step}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_transcript_is_its_persons_alone_and_goes_when_the_run_is_deleted() {
    const MARKER: &str = "zebra-orchid-7731";
    let upstream = stipend_testkit::spawn().await.unwrap();
    let env = Env::new(&config(&upstream));
    let log = env.dir.path().join("server.log");
    let server = Server::start_logged(&env, &log);
    let key = env.person_with_key("ada");
    let script = format!(
        r#"Remember {MARKER}.
SCRIPT: [{{"call":[{{"name":"files__write_file","arguments":{{"path":"n.txt","content":"{MARKER}"}}}}]}},{{"say":"kept {MARKER}"}}]"#
    );
    let id = start_files_run(&env, &server, &key, &script, "500000");
    let waiting = until(&env, &server, &key, &id, "waiting_for_approval");
    let approval = waiting["approval"]["id"].as_str().unwrap().to_string();
    assert!(
        agent(&env, &server, &key, &["approve", &approval])
            .status
            .success()
    );
    let done = until(&env, &server, &key, &id, "done");
    // Its person sees it all; the server's log (at trace) holds none of it.
    assert!(done["answer"].as_str().unwrap().contains(MARKER), "{done}");
    let log_now = std::fs::read_to_string(&log).unwrap();
    assert!(
        !log_now.contains(MARKER),
        "{}",
        log_now
            .lines()
            .filter(|line| line.contains(MARKER))
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Deleted, nothing of it is left on disk: not its journal, not its working directory.
    assert!(
        agent(&env, &server, &key, &["delete", &id])
            .status
            .success()
    );
    let output = server.stop();
    let log_text = std::fs::read_to_string(&log).unwrap();
    common::assert_written_nowhere(
        MARKER,
        &env.dir.path().join("data"),
        &format!("{output}{log_text}"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_shared_database_a_killed_servers_runs_go_on_when_it_starts_again() {
    let database = stipend_store_postgres::test_server::TestServer::start().unwrap();
    let url = database.fresh_database().unwrap();
    let upstream = stipend_testkit::spawn().await.unwrap();
    let env = Env::new(&format!(
        "database_url = \"{url}\"\nlease_ttl = \"2s\"\n{}",
        config(&upstream)
    ));
    let server = Server::start(&env);
    let key = env.person_with_key("ada");
    let before = env.json(&["account", "show", "ada"])["balance_cu"]
        .as_i64()
        .unwrap();
    let script = r#"SCRIPT: [{"call":[{"name":"files__write_file","arguments":{"path":"p.txt","content":"shared"}}]},{"say":"done"}]"#;
    let id = start_files_run(&env, &server, &key, script, "500000");
    let waiting = until(&env, &server, &key, &id, "waiting_for_approval");
    let approval = waiting["approval"]["id"].as_str().unwrap().to_string();
    server.kill();
    // The same server (its data_dir) starts again: its runs are read back from the database.
    let server = Server::start(&env);
    assert!(
        server.output().contains("Resumed 1 agent runs"),
        "{}",
        server.output()
    );
    let again = until(&env, &server, &key, &id, "waiting_for_approval");
    assert_eq!(again["approval"]["id"], approval.as_str());
    assert!(
        agent(&env, &server, &key, &["approve", &approval])
            .status
            .success()
    );
    let done = until(&env, &server, &key, &id, "done");
    let note = env.dir.path().join("data/agents").join(&id).join("p.txt");
    assert_eq!(std::fs::read_to_string(note).unwrap(), "shared");
    // What the run spent left ada; the rest of the cap came back once its leases were let go.
    let spent = done["spent_cu"].as_i64().unwrap();
    let mut after = 0;
    for _ in 0..100 {
        after = env.json(&["account", "show", "ada"])["balance_cu"]
            .as_i64()
            .unwrap();
        if after == before - spent {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(after, before - spent);
    server.stop();
    let verify = env.json(&["ledger", "verify"]);
    assert_eq!(verify["violations"], serde_json::json!([]));
}
