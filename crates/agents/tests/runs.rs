//! Agent runs end to end, over HTTP on loopback: a real ledger (SQLite), the gateway in front of
//! the scripted test upstream (`script`: each step's tool calls are written in the goal), and
//! real MCP servers from the package registries: `mcp-server-time` (PyPI) as an `auto` toolset
//! and `@modelcontextprotocol/server-filesystem` (npm) as one that asks first. `make test`
//! installs both beside the build (tests/mcp, tests/sdk/requirements.txt).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{STIPEND_CU, World, outcomes};
use serde_json::{Value, json};

fn write(path: &str, content: &str) -> Value {
    json!({"call": [{"name": "files__write_file", "arguments": {"path": path, "content": content}}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_tool_runs_and_its_result_reaches_the_model() {
    let world = World::new().await;
    let before = world.alice_balance();
    let script = json!([
        {"call": [{"name": "time__get_current_time", "arguments": {"timezone": "Europe/Paris"}}]},
        {"say": "it is time"},
    ]);
    let id = world.start(script, 100_000, &["time"]).await;
    let run = world.until(&id, "done").await;
    assert_eq!(
        outcomes(&run),
        ["model:asked_for_tools", "tool:auto", "model:answered"]
    );
    let answer = run["answer"].as_str().unwrap();
    assert!(answer.starts_with("it is time"), "{answer}");
    assert!(
        answer.contains("Europe/Paris"),
        "the tool's result did not reach the model: {answer}"
    );
    // Exactly what the two model steps cost left alice; the rest of the cap came back.
    let spent = run["spent_cu"].as_u64().unwrap();
    let steps: u64 = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["cu"].as_u64().unwrap())
        .sum();
    assert!(spent > 0);
    assert_eq!(spent, steps);
    assert_eq!(world.alice_balance(), before - spent as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_risky_tool_waits_for_approval_and_runs_with_the_edited_arguments() {
    let world = World::new().await;
    let script = json!([write("note.txt", "from the model"), {"say": "written"}]);
    let id = world.start(script, 100_000, &["files"]).await;
    let run = world.until(&id, "waiting_for_approval").await;
    let approval = run["approval"].clone();
    assert_eq!(approval["tool"], "files__write_file");
    assert_eq!(approval["arguments"]["content"], "from the model");
    let note = world.workdirs.join(&id).join("note.txt");
    assert!(!note.exists(), "written before it was approved");
    // Alice sees it among her approvals; bob sees nothing of hers.
    let (_, listed) = world
        .send("GET", "/approvals", &world.alice_key, None)
        .await;
    assert_eq!(listed["data"][0]["id"], approval["id"]);
    let (_, others) = world.send("GET", "/approvals", &world.bob_key, None).await;
    assert_eq!(others["data"], json!([]));
    let approval_path = format!("/approvals/{}", approval["id"].as_str().unwrap());
    let edited = json!({"decision": "approve", "arguments": {"path": "note.txt", "content": "edited by alice"}});
    let (status, _) = world
        .send("POST", &approval_path, &world.bob_key, Some(edited.clone()))
        .await;
    assert_eq!(status, 404);
    let (status, body) = world
        .send(
            "POST",
            &approval_path,
            &world.alice_key,
            Some(edited.clone()),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let run = world.until(&id, "done").await;
    assert_eq!(std::fs::read_to_string(&note).unwrap(), "edited by alice");
    assert_eq!(
        outcomes(&run),
        ["model:asked_for_tools", "tool:approved", "model:answered"]
    );
    assert_eq!(run["steps"][1]["arguments"]["content"], "edited by alice");
    // An approval is used once.
    let (status, body) = world
        .send("POST", &approval_path, &world.alice_key, Some(edited))
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "conflict");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_is_told_to_the_model_and_nothing_runs() {
    let world = World::new().await;
    let script = json!([write("note.txt", "x"), {"say": "understood"}]);
    let id = world.start(script, 100_000, &["files"]).await;
    let run = world.until(&id, "waiting_for_approval").await;
    let path = format!("/approvals/{}", run["approval"]["id"].as_str().unwrap());
    let (status, body) = world
        .send(
            "POST",
            &path,
            &world.alice_key,
            Some(json!({"decision": "deny", "reason": "not in my notes, please"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let run = world.until(&id, "done").await;
    assert!(
        run["answer"]
            .as_str()
            .unwrap()
            .contains("not in my notes, please"),
        "{run}"
    );
    assert!(!world.workdirs.join(&id).join("note.txt").exists());
    assert_eq!(
        outcomes(&run),
        ["model:asked_for_tools", "tool:denied", "model:answered"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approved_for_the_run_a_tool_no_longer_asks_and_a_denied_one_never_runs() {
    let world = World::new().await;
    let script = json!([
        write("a.txt", "one"),
        write("b.txt", "two"),
        {"call": [{"name": "files__list_allowed_directories", "arguments": {}}]},
        {"say": "both written"},
    ]);
    let id = world.start(script, 100_000, &["files"]).await;
    let run = world.until(&id, "waiting_for_approval").await;
    let path = format!("/approvals/{}", run["approval"]["id"].as_str().unwrap());
    let (status, _) = world
        .send(
            "POST",
            &path,
            &world.alice_key,
            Some(json!({"decision": "approve_for_run"})),
        )
        .await;
    assert_eq!(status, 200);
    let run = world.until(&id, "done").await;
    assert_eq!(
        outcomes(&run),
        [
            "model:asked_for_tools",
            "tool:approved_for_run",
            "model:asked_for_tools",
            "tool:approved_for_run",
            "model:asked_for_tools",
            "tool:refused_by_policy",
            "model:answered"
        ]
    );
    let dir = world.workdirs.join(&id);
    assert_eq!(std::fs::read_to_string(dir.join("b.txt")).unwrap(), "two");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_ends_at_its_cap_and_the_rest_comes_back() {
    let world = World::new().await;
    let before = world.alice_balance();
    let step =
        json!({"call": [{"name": "time__get_current_time", "arguments": {"timezone": "UTC"}}]});
    let script = Value::from(vec![step; 50]);
    // Enough for several steps, not fifty: each step reserves its worst case (a token for
    // every byte of its request, which carries this long script, and 1 024 for its answer) and
    // is charged about a quarter of the request's bytes.
    let budget = 30_000;
    let id = world.start(script, budget, &["time"]).await;
    let run = world.until(&id, "budget_exhausted").await;
    let spent = run["spent_cu"].as_u64().unwrap();
    assert!(spent > 0 && spent <= budget, "spent {spent} of {budget}");
    assert_eq!(run["error"]["code"], "budget_exhausted");
    let why = run["error"]["message"].as_str().unwrap();
    assert!(
        why.contains("may cost up to") && why.contains("cu of its budget are left"),
        "{why}"
    );
    let tools_run = outcomes(&run)
        .iter()
        .filter(|step| *step == "tool:auto")
        .count();
    assert!(tools_run >= 2, "{run}");
    // Nothing beyond what the steps cost left alice: the cap's rest came back.
    world.balance_comes_to(before - spent as i64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_pauses_steers_resumes_and_stops_their_runs() {
    let world = World::new().await;
    let script = json!([write("note.txt", "x"), {"say": "finished"}]);
    let id = world.start(script.clone(), 100_000, &["files"]).await;
    let run = world.until(&id, "waiting_for_approval").await;
    let (status, _) = world
        .send(
            "POST",
            &format!("/agents/{id}/steer"),
            &world.alice_key,
            Some(json!({"message": "write it in French"})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = world
        .send(
            "POST",
            &format!("/agents/{id}/pause"),
            &world.alice_key,
            None,
        )
        .await;
    assert_eq!(status, 200);
    let path = format!("/approvals/{}", run["approval"]["id"].as_str().unwrap());
    world
        .send(
            "POST",
            &path,
            &world.alice_key,
            Some(json!({"decision": "approve"})),
        )
        .await;
    // The tool runs; the next step waits for the resume.
    world.until(&id, "paused").await;
    let (status, _) = world
        .send(
            "POST",
            &format!("/agents/{id}/resume"),
            &world.alice_key,
            None,
        )
        .await;
    assert_eq!(status, 200);
    let run = world.until(&id, "done").await;
    assert!(
        run["answer"]
            .as_str()
            .unwrap()
            .contains("write it in French"),
        "{run}"
    );

    // Stopped while it waits: it ends at once, and its budget comes back whole but for the
    // one step it took.
    let before = world.alice_balance();
    let id = world.start(script, 100_000, &["files"]).await;
    world.until(&id, "waiting_for_approval").await;
    let (status, _) = world
        .send(
            "POST",
            &format!("/agents/{id}/stop"),
            &world.alice_key,
            None,
        )
        .await;
    assert_eq!(status, 200);
    let run = world.until(&id, "stopped").await;
    let spent = run["spent_cu"].as_u64().unwrap();
    world.balance_comes_to(before - spent as i64).await;
    let (_, approvals) = world
        .send("GET", "/approvals", &world.alice_key, None)
        .await;
    assert_eq!(approvals["data"], json!([]));
    // An ended run takes no more steering.
    let (status, _) = world
        .send(
            "POST",
            &format!("/agents/{id}/steer"),
            &world.alice_key,
            Some(json!({"message": "go on"})),
        )
        .await;
    assert_eq!(status, 409);
    // Deleted, it is gone.
    let (status, _) = world
        .send("DELETE", &format!("/agents/{id}"), &world.alice_key, None)
        .await;
    assert_eq!(status, 200);
    let (status, _) = world
        .send("GET", &format!("/agents/{id}"), &world.alice_key, None)
        .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_persons_key_finds_nothing_and_bad_requests_are_refused() {
    let world = World::new().await;
    let script = json!([write("note.txt", "x")]);
    let id = world.start(script, 100_000, &["files"]).await;
    world.until(&id, "waiting_for_approval").await;
    for (method, path) in [
        ("GET", format!("/agents/{id}")),
        ("GET", format!("/agents/{id}/events")),
        ("POST", format!("/agents/{id}/pause")),
        ("POST", format!("/agents/{id}/resume")),
        ("POST", format!("/agents/{id}/stop")),
        ("DELETE", format!("/agents/{id}")),
    ] {
        let (status, body) = world.send(method, &path, &world.bob_key, None).await;
        assert_eq!(status, 404, "{method} {path}: {body}");
    }
    let (status, _) = world
        .send(
            "POST",
            &format!("/agents/{id}/steer"),
            &world.bob_key,
            Some(json!({"message": "hi"})),
        )
        .await;
    assert_eq!(status, 404);
    let (_, listed) = world.send("GET", "/agents", &world.bob_key, None).await;
    assert_eq!(listed["data"], json!([]));
    let (_, listed) = world.send("GET", "/agents", &world.alice_key, None).await;
    assert_eq!(listed["data"][0]["id"], id.as_str());
    // Bad starts change nothing.
    let before = world.alice_balance();
    for (body, param) in [
        (
            json!({"goal": "x", "model": "gpt-9", "budget_cu": 10}),
            "model",
        ),
        (
            json!({"goal": "x", "model": "script", "budget_cu": 0}),
            "budget_cu",
        ),
        (
            json!({"goal": "x", "model": "script", "budget_cu": 10, "toolsets": ["shell"]}),
            "toolsets",
        ),
        (
            json!({"goal": "", "model": "script", "budget_cu": 10}),
            "goal",
        ),
        (
            json!({"goal": "x", "model": "script", "budget_cu": 10, "max_steps": 0}),
            "max_steps",
        ),
    ] {
        let (status, error) = world
            .send("POST", "/agents", &world.alice_key, Some(body))
            .await;
        assert_eq!(status, 400, "{error}");
        assert_eq!(error["error"]["param"], param, "{error}");
    }
    let (status, error) = world
        .send(
            "POST",
            "/agents",
            &world.alice_key,
            Some(json!({"goal": "x", "model": "script", "budget_cu": 100 * STIPEND_CU})),
        )
        .await;
    assert_eq!(status, 429, "{error}");
    assert_eq!(error["error"]["code"], "insufficient_quota");
    assert_eq!(world.alice_balance(), before);
    let (status, _) = world
        .send("GET", "/agents", "sk-stipend-nonsense", None)
        .await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_runs_at_once_all_end_and_are_charged_exactly() {
    // Journaled, as a server on the embedded store runs them: every step is written before it
    // is acted on, many runs' records to a transaction.
    let world = World::journaled(Box::new(|_, _| Vec::new())).await;
    let before = world.alice_balance();
    // Each run asks for a tool it does not have, is told so, and answers: two model steps.
    let script = json!([{"call": [{"name": "nothing__here", "arguments": {}}]}, {"say": "fine"}]);
    let mut starts = Vec::new();
    for _ in 0..1_000 {
        let (http, base, key, script) = (
            world.http.clone(),
            world.base.clone(),
            world.alice_key.clone(),
            script.clone(),
        );
        starts.push(tokio::spawn(async move {
            let response = http
                .post(format!("{base}/agents"))
                .bearer_auth(key)
                .json(&json!({"goal": format!("SCRIPT: {script}"), "model": "script", "budget_cu": 5_000}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 201);
        }));
    }
    for start in starts {
        start.await.unwrap();
    }
    let mut runs = Vec::new();
    for _ in 0..1_000 {
        let (_, listed) = world.send("GET", "/agents", &world.alice_key, None).await;
        runs = listed["data"].as_array().unwrap().clone();
        if runs.iter().all(|run| run["state"] == "done") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(runs.len(), 1_000);
    let not_done: Vec<&Value> = runs.iter().filter(|run| run["state"] != "done").collect();
    assert!(
        not_done.is_empty(),
        "{} runs not done, e.g. {}",
        not_done.len(),
        not_done[0]
    );
    for run in &runs {
        assert_eq!(
            outcomes(run),
            [
                "model:asked_for_tools",
                "tool:unknown_tool",
                "model:answered"
            ]
        );
    }
    let spent: u64 = runs
        .iter()
        .map(|run| run["spent_cu"].as_u64().unwrap())
        .sum();
    world.balance_comes_to(before - spent as i64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_events_stream_its_steps_as_they_happen_and_end_with_it() {
    let world = World::new().await;
    let script = json!([write("note.txt", "x"), {"say": "finished"}]);
    let id = world.start(script, 100_000, &["files"]).await;
    let run = world.until(&id, "waiting_for_approval").await;
    let response = world
        .http
        .get(format!("{}/agents/{id}/events", world.base))
        .bearer_auth(&world.alice_key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let path = format!("/approvals/{}", run["approval"]["id"].as_str().unwrap());
    let (status, _) = world
        .send(
            "POST",
            &path,
            &world.alice_key,
            Some(json!({"decision": "approve"})),
        )
        .await;
    assert_eq!(status, 200);
    // The whole stream: it ends when the run does.
    let text = tokio::time::timeout(Duration::from_secs(30), response.text())
        .await
        .expect("the events stream did not end with the run")
        .unwrap();
    let events: Vec<Value> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(|data| serde_json::from_str(data).unwrap())
        .collect();
    let kinds: Vec<String> = events
        .iter()
        .map(|event| match event["type"].as_str().unwrap() {
            "run" => format!("run:{}", event["run"]["state"].as_str().unwrap()),
            "state" => format!("state:{}", event["state"].as_str().unwrap()),
            "step" => format!("step:{}", event["step"]["kind"].as_str().unwrap()),
            other => other.to_string(),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "run:waiting_for_approval",
            "state:running",
            "step:tool",
            "step:model",
            "state:done"
        ],
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_server_runs_under_limits_a_hung_call_times_out_and_long_output_is_cut() {
    let world = World::new().await;
    let script = json!([
        {"call": [{"name": "limits__limits", "arguments": {}}]},
        {"call": [{"name": "limits__sleep", "arguments": {"seconds": 30}}]},
        {"call": [{"name": "limits__shout", "arguments": {"size": 100000}}]},
        {"say": "done"},
    ]);
    let id = world.start(script, 1_000_000, &["limits"]).await;
    let run = world.until(&id, "done").await;
    let steps = run["steps"].as_array().unwrap();
    let tools: Vec<&Value> = steps.iter().filter(|step| step["kind"] == "tool").collect();
    // prlimit: open files, file size, no core dumps, CPU seconds.
    assert_eq!(tools[0]["outcome"], "auto");
    assert_eq!(
        tools[0]["summary"],
        "nofile=1024 fsize=1073741824 core=0 cpu=3600"
    );
    // A call that does not answer within tool_timeout (3 s here) fails, and the run goes on.
    assert_eq!(tools[1]["outcome"], "auto, failed", "{run}");
    assert!(
        tools[1]["summary"]
            .as_str()
            .unwrap()
            .contains("did not answer within 3 s")
    );
    // What the model sees of a long result is cut at tool_output_bytes_max (4 096 here).
    let answer = run["answer"].as_str().unwrap();
    let seen: Vec<String> = serde_json::from_str(answer.split_once("SEEN: ").unwrap().1).unwrap();
    assert!(
        seen[2].starts_with(&"A".repeat(4_096)),
        "{}",
        &seen[2][..64]
    );
    assert!(
        seen[2].ends_with("[cut: 95904 more bytes not shown]"),
        "{}",
        &seen[2][4_000..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_keeps_a_bounded_number_of_runs_and_deleting_one_makes_room() {
    let world = World::with(|options| {
        options.active_runs_per_person_max = 2;
        options.kept_runs_per_person_max = 3;
    })
    .await;
    // Two waiting for approval: a third may not start while they go.
    let waits = json!([write("a.txt", "x")]);
    let first = world.start(waits.clone(), 100_000, &["files"]).await;
    let second = world.start(waits, 100_000, &["files"]).await;
    world.until(&first, "waiting_for_approval").await;
    world.until(&second, "waiting_for_approval").await;
    let body = json!({"goal": "SCRIPT: []", "model": "script", "budget_cu": 100_000});
    let (status, error) = world
        .send("POST", "/agents", &world.alice_key, Some(body.clone()))
        .await;
    assert_eq!(status, 429, "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("runs going")
    );
    // One stopped: a third runs (and ends); three are kept, so a fourth may not start.
    world
        .send(
            "POST",
            &format!("/agents/{first}/stop"),
            &world.alice_key,
            None,
        )
        .await;
    world.until(&first, "stopped").await;
    let (status, third) = world
        .send("POST", "/agents", &world.alice_key, Some(body.clone()))
        .await;
    assert_eq!(status, 201, "{third}");
    world.until(third["id"].as_str().unwrap(), "done").await;
    let (status, error) = world
        .send("POST", "/agents", &world.alice_key, Some(body.clone()))
        .await;
    assert_eq!(status, 429, "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("delete some")
    );
    // Deleting one makes room; bob's count is his own.
    world
        .send(
            "DELETE",
            &format!("/agents/{first}"),
            &world.alice_key,
            None,
        )
        .await;
    let (status, _) = world
        .send("POST", "/agents", &world.alice_key, Some(body.clone()))
        .await;
    assert_eq!(status, 201);
    let (status, _) = world
        .send("POST", "/agents", &world.bob_key, Some(body))
        .await;
    assert_eq!(status, 201);
}
