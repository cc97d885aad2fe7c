//! Runs read back from their journal in the ledger's store, as a server stopped at some moment
//! would have left it: each picks up where it was. A tool call started but not finished runs
//! again when its policy is auto (tools run at least once); a decision made but not acted on
//! stands; an approval asked but not decided waits again, with the same id; a model call cut off
//! is not made again (it may have been charged) and ends the run; a run that ended but had not
//! given its budget back gives it back.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{World, begun, outcomes, records};
use serde_json::{Value, json};

const RUN: &str = "run_0000000000000000000000000000000a";

fn asked_for(call_id: &str, tool: &str, arguments: Value) -> Vec<Value> {
    vec![
        json!({"t": "model_call"}),
        json!({"t": "step", "step": {"kind": "model", "outcome": "asked_for_tools", "cu": 700}}),
        json!({"t": "message", "message": {"role": "assistant", "content": null, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": tool, "arguments": arguments.to_string()}}
        ]}}),
    ]
}

/// The script the model follows from its second step on: answer, saying what it saw.
const THEN_ANSWER: &str =
    r#"SCRIPT: [{"call":[{"name":"unused","arguments":{}}]},{"say":"went on"}]"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_tool_call_cut_off_runs_again_and_the_run_goes_on() {
    let world = World::journaled(Box::new(|ledger, alice| {
        let mut entries = vec![begun(ledger, alice, RUN, THEN_ANSWER, &["time"], 100_000)];
        entries.extend(asked_for(
            "call_0_0",
            "time__get_current_time",
            json!({"timezone": "Asia/Tokyo"}),
        ));
        entries.push(json!({"t": "tool_started", "call_id": "call_0_0"}));
        records(RUN, &entries)
    }))
    .await;
    let run = world.until(RUN, "done").await;
    assert_eq!(
        outcomes(&run),
        ["model:asked_for_tools", "tool:auto", "model:answered"]
    );
    let answer = run["answer"].as_str().unwrap();
    assert!(
        answer.starts_with("went on") && answer.contains("Asia/Tokyo"),
        "{answer}"
    );
    // Its first step's 700 cu were charged before the stop (in the journal, not the ledger,
    // here): only the second step was charged now, and the rest of the cap came back.
    let second = run["steps"][2]["cu"].as_u64().unwrap();
    assert_eq!(run["spent_cu"].as_u64().unwrap(), 700 + second);
    world
        .balance_comes_to(common::STIPEND_CU as i64 - second as i64)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_asked_before_a_stop_waits_again_and_a_decision_made_stands() {
    let waiting = "run_0000000000000000000000000000000b";
    let decided = "run_0000000000000000000000000000000c";
    let world = World::journaled(Box::new(move |ledger, alice| {
        let approval = json!({
            "id": "appr_0000000000000000000000000000000b_0",
            "run_id": waiting,
            "tool": "files__write_file",
            "arguments": {"path": "a.txt", "content": "asked"},
            "created_at": "2026-12-05T00:00:00Z",
        });
        let mut first = vec![begun(ledger, alice, waiting, THEN_ANSWER, &["files"], 100_000)];
        first.extend(asked_for("call_0_0", "files__write_file", json!({"path": "a.txt", "content": "asked"})));
        first.push(json!({"t": "asked", "approval": approval, "call_id": "call_0_0"}));
        let mut second = vec![begun(ledger, alice, decided, THEN_ANSWER, &["files"], 100_000)];
        second.extend(asked_for("call_0_0", "files__write_file", json!({"path": "b.txt", "content": "asked"})));
        let approval = json!({
            "id": "appr_0000000000000000000000000000000c_0",
            "run_id": decided,
            "tool": "files__write_file",
            "arguments": {"path": "b.txt", "content": "asked"},
            "created_at": "2026-12-05T00:00:00Z",
        });
        second.push(json!({"t": "asked", "approval": approval, "call_id": "call_0_0"}));
        second.push(json!({"t": "decided", "approval_id": "appr_0000000000000000000000000000000c_0",
            "call_id": "call_0_0", "decision": {"decision": "approve", "arguments": {"path": "b.txt", "content": "edited"}}}));
        let mut all = records(waiting, &first);
        all.extend(records(decided, &second));
        all
    }))
    .await;
    // Decided before the stop: it runs as decided, without asking again.
    let run = world.until(decided, "done").await;
    assert_eq!(
        outcomes(&run),
        ["model:asked_for_tools", "tool:approved", "model:answered"]
    );
    let written = world.workdirs.join(decided).join("b.txt");
    assert_eq!(std::fs::read_to_string(written).unwrap(), "edited");
    // Asked and not decided: the same approval waits, and deciding it goes on.
    let run = world.until(waiting, "waiting_for_approval").await;
    assert_eq!(
        run["approval"]["id"],
        "appr_0000000000000000000000000000000b_0"
    );
    let (status, body) = world
        .send(
            "POST",
            "/approvals/appr_0000000000000000000000000000000b_0",
            &world.alice_key,
            Some(json!({"decision": "approve"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    world.until(waiting, "done").await;
    let written = world.workdirs.join(waiting).join("a.txt");
    assert_eq!(std::fs::read_to_string(written).unwrap(), "asked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_call_cut_off_is_not_made_again_and_an_ended_run_gives_its_budget_back() {
    let cut = "run_0000000000000000000000000000000d";
    let ended = "run_0000000000000000000000000000000e";
    let world = World::journaled(Box::new(move |ledger, alice| {
        let first = vec![
            begun(ledger, alice, cut, THEN_ANSWER, &[], 100_000),
            json!({"t": "model_call"}),
        ];
        let second = vec![
            begun(ledger, alice, ended, THEN_ANSWER, &[], 50_000),
            json!({"t": "ended", "state": "stopped", "error": null, "answer": null}),
        ];
        let mut all = records(cut, &first);
        all.extend(records(ended, &second));
        all
    }))
    .await;
    let run = world.until(cut, "failed").await;
    assert_eq!(run["error"]["code"], "interrupted_step");
    assert_eq!(run["steps"], json!([]));
    let run = world.until(ended, "stopped").await;
    assert_eq!(run["budget_cu"], 50_000);
    // Nothing was charged: both caps came back whole.
    world.balance_comes_to(common::STIPEND_CU as i64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steer_and_a_pause_given_before_a_stop_outlive_it() {
    let world = World::journaled(Box::new(|ledger, alice| {
        let entries = vec![
            begun(ledger, alice, RUN, THEN_ANSWER, &[], 100_000),
            json!({"t": "steer", "message": "say it in French"}),
            json!({"t": "paused", "paused": true}),
        ];
        records(RUN, &entries)
    }))
    .await;
    // Still paused after the restart; resumed, it takes the steer at its next step.
    let run = world.until(RUN, "paused").await;
    assert_eq!(run["steps"], json!([]));
    let (status, _) = world
        .send(
            "POST",
            &format!("/agents/{RUN}/resume"),
            &world.alice_key,
            None,
        )
        .await;
    assert_eq!(status, 200);
    let run = world.until(RUN, "done").await;
    assert!(
        run["answer"].as_str().unwrap().contains("say it in French"),
        "{run}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_journaled_before_its_cap_moved_ends_having_spent_nothing() {
    // The server stopped between journaling the run and moving its cap: its account is empty.
    let world = World::journaled(Box::new(|ledger, alice| {
        let account = ledger
            .create_account(
                &format!("agent:{}:{RUN}", alice.0),
                stipend_ledger::AccountKind::Agent,
            )
            .unwrap()
            .wait()
            .unwrap();
        let start = json!({
            "t": "start", "person": alice.0, "account": account.0, "goal": THEN_ANSWER,
            "model": "script", "budget_cu": 100_000, "max_steps": 8, "toolsets": [],
            "created_at": "2026-12-05T00:00:00Z",
        });
        records(RUN, &[start])
    }))
    .await;
    let run = world.until(RUN, "budget_exhausted").await;
    assert_eq!(run["spent_cu"], 0);
    assert_eq!(world.alice_balance(), common::STIPEND_CU as i64);
}
