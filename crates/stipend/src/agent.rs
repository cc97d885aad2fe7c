//! `stipend agent …`: a person's side of their agent runs, as a client of a running server's
//! API (`/v1/agents`, `/v1/approvals`) with the person's own key. Unlike the operator's commands,
//! nothing here touches the store: a person acts on their runs as any client would.

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// What to ask of the server.
#[derive(Debug)]
pub enum Action {
    /// Start a run.
    Start {
        /// What the run is to do.
        goal: String,
        /// The model.
        model: String,
        /// The cap, in cu.
        budget_cu: u64,
        /// Its toolsets.
        toolsets: Vec<String>,
        /// The most steps.
        max_steps: Option<u32>,
    },
    /// The person's runs.
    List,
    /// One run.
    Show(String),
    /// The person's pending approvals.
    Approvals,
    /// Approve an approval, perhaps for the rest of the run, perhaps with edited arguments.
    Approve {
        /// The approval.
        id: String,
        /// Approve this tool for the rest of the run.
        for_run: bool,
        /// The arguments to run it with instead.
        arguments: Option<Value>,
    },
    /// Deny an approval, saying why (the model sees the reason).
    Deny {
        /// The approval.
        id: String,
        /// Why.
        reason: String,
    },
    /// A message the model sees at the run's next step.
    Steer {
        /// The run.
        id: String,
        /// The message.
        message: String,
    },
    /// Pause a run.
    Pause(String),
    /// Resume a run.
    Resume(String),
    /// Stop a run.
    Stop(String),
    /// Delete a run and its transcript.
    Delete(String),
}

/// Sends `action` to the server at `base` (`http://host:port/v1`) with `key`; the answer.
pub fn call(base: &str, key: &str, action: Action) -> anyhow::Result<Value> {
    let (method, path, body) = match action {
        Action::Start {
            goal,
            model,
            budget_cu,
            toolsets,
            max_steps,
        } => {
            let mut body =
                json!({"goal": goal, "model": model, "budget_cu": budget_cu, "toolsets": toolsets});
            if let Some(steps) = max_steps {
                body["max_steps"] = json!(steps);
            }
            ("POST", "/agents".to_string(), Some(body))
        }
        Action::List => ("GET", "/agents".to_string(), None),
        Action::Show(id) => ("GET", format!("/agents/{id}"), None),
        Action::Approvals => ("GET", "/approvals".to_string(), None),
        Action::Approve {
            id,
            for_run,
            arguments,
        } => {
            let decision = if for_run {
                "approve_for_run"
            } else {
                "approve"
            };
            let mut body = json!({"decision": decision});
            if let Some(arguments) = arguments {
                body["arguments"] = arguments;
            }
            ("POST", format!("/approvals/{id}"), Some(body))
        }
        Action::Deny { id, reason } => (
            "POST",
            format!("/approvals/{id}"),
            Some(json!({"decision": "deny", "reason": reason})),
        ),
        Action::Steer { id, message } => (
            "POST",
            format!("/agents/{id}/steer"),
            Some(json!({"message": message})),
        ),
        Action::Pause(id) => ("POST", format!("/agents/{id}/pause"), None),
        Action::Resume(id) => ("POST", format!("/agents/{id}/resume"), None),
        Action::Stop(id) => ("POST", format!("/agents/{id}/stop"), None),
        Action::Delete(id) => ("DELETE", format!("/agents/{id}"), None),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .context("cannot make an HTTP client")?;
        let url = format!("{}{path}", base.trim_end_matches('/'));
        let request = match method {
            "GET" => client.get(&url),
            "DELETE" => client.delete(&url),
            _ => client.post(&url),
        }
        .bearer_auth(key);
        let request = match body {
            Some(body) => request.json(&body),
            None => request,
        };
        let response = request.send().await.with_context(|| {
            format!("cannot reach the server at {base} (is `stipend serve` running?)")
        })?;
        let status = response.status();
        let answer: Value = response
            .json()
            .await
            .with_context(|| format!("the server's answer to {method} {path} is not JSON"))?;
        if !status.is_success() {
            let message = answer["error"]["message"].as_str().unwrap_or("no message");
            bail!("{method} {path}: {status}: {message}");
        }
        Ok(answer)
    })
}

/// A run, an approval or a list of either, as text.
pub fn render(answer: &Value) -> String {
    let mut out = String::new();
    match answer["data"].as_array() {
        Some(items) if items.is_empty() => out.push_str("(none)\n"),
        Some(items) => {
            for item in items {
                out.push_str(&line(item));
            }
        }
        None if answer["steps"].is_array() => out.push_str(&run(answer)),
        None => out.push_str(&line(answer)),
    }
    out
}

fn line(item: &Value) -> String {
    if item["run_id"].is_string() {
        format!(
            "{}  {}  {}  {}\n",
            text(&item["id"]),
            text(&item["tool"]),
            item["arguments"],
            text(&item["created_at"])
        )
    } else if item["state"].is_string() {
        format!(
            "{}  {:<20}  {} of {} cu  {}\n",
            text(&item["id"]),
            text(&item["state"]),
            item["spent_cu"],
            item["budget_cu"],
            first_line(text(&item["goal"]))
        )
    } else {
        format!("{item}\n")
    }
}

fn run(run: &Value) -> String {
    let mut out = format!(
        "run {}: {}\nmodel {}, {} of {} cu spent, toolsets {}\ngoal: {}\n",
        text(&run["id"]),
        text(&run["state"]),
        text(&run["model"]),
        run["spent_cu"],
        run["budget_cu"],
        run["toolsets"],
        first_line(text(&run["goal"])),
    );
    for (index, step) in run["steps"].as_array().into_iter().flatten().enumerate() {
        let what = match step["tool"].as_str() {
            Some(tool) => format!("{tool} {}", step["arguments"]),
            None => "model".to_string(),
        };
        out.push_str(&format!(
            "  {:>3}. {what}: {} ({} cu){}\n",
            index + 1,
            text(&step["outcome"]),
            step["cu"],
            step["summary"]
                .as_str()
                .map(|summary| format!(" — {}", first_line(summary)))
                .unwrap_or_default(),
        ));
    }
    if let Some(approval) = run["approval"].as_object() {
        out.push_str(&format!(
            "waiting for approval {}: {} {}\n",
            text(&approval["id"]),
            text(&approval["tool"]),
            approval["arguments"]
        ));
    }
    if let Some(answer) = run["answer"].as_str() {
        out.push_str(&format!("answer: {answer}\n"));
    }
    if let Some(message) = run["error"]["message"].as_str() {
        out.push_str(&format!("why it ended: {message}\n"));
    }
    out
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or("")
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}
