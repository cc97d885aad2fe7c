//! A run's loop: call the model with the tools → for each tool call, its policy (run it, refuse
//! it, or ask the person and wait) → the results back to the model → until the model answers
//! without a tool call, the budget cannot pay for a step, `max_steps` is reached, or the person
//! stops it. Then the run's toolsets stop and what is left of its budget goes back.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Map, Value, json};
use stipend_gateway::{ApiError, CHARGED_HEADER, Payer};
use stipend_ledger::TransferId;

use crate::journal::{Decided, Entry};
use crate::mcp::{Tool, Toolset};
use crate::{Agents, Approval, Decision, Run, State, Step};

/// How a run ended, and why.
struct Ending {
    state: State,
    error: Option<Value>,
}

impl Ending {
    fn new(state: State) -> Ending {
        Ending { state, error: None }
    }

    fn with(state: State, code: &str, message: impl Into<String>) -> Ending {
        Ending {
            state,
            error: Some(json!({"code": code, "message": message.into()})),
        }
    }
}

/// Runs `run` to its end (from where it was, for a run read back from its journal).
pub(crate) async fn drive(agents: Arc<Agents>, run: Arc<Run>) {
    let workdir = agents.options.workdir_root.join(&run.id);
    let mut toolsets = Vec::new();
    // Absolute: the tool servers run in it and are told its path, which they would otherwise
    // read from where they stand.
    let made = std::fs::create_dir_all(&workdir).and_then(|()| std::fs::canonicalize(&workdir));
    let interrupted = run.inner.lock().interrupted;
    let ending = if interrupted {
        Ending::with(
            State::Failed,
            "interrupted_step",
            "the server stopped during a model call; that call may have been charged, so it is not made again",
        )
    } else {
        match made {
            Err(error) => Ending::with(
                State::Failed,
                "workdir",
                format!("the run's working directory could not be made: {error}"),
            ),
            Ok(workdir) => match start_toolsets(&agents, &run, &workdir, &mut toolsets).await {
                Err(ending) => ending,
                Ok(()) => {
                    let mut stop = run.stop.subscribe();
                    tokio::select! {
                        ending = steps(&agents, &run, &toolsets) => ending,
                        _ = stop.wait_for(|stop| *stop) => Ending::new(State::Stopped),
                    }
                }
            },
        }
    };
    // A run's own toolsets stop with it; shared ones serve on.
    for toolset in toolsets {
        if let Ok(toolset) = Arc::try_unwrap(toolset) {
            toolset.stop().await;
        }
    }
    end(&agents, &run, ending).await;
}

async fn start_toolsets(
    agents: &Agents,
    run: &Run,
    workdir: &std::path::Path,
    toolsets: &mut Vec<Arc<Toolset>>,
) -> Result<(), Ending> {
    for name in &run.toolsets {
        let Some(config) = agents.options.toolsets.iter().find(|t| &t.name == name) else {
            continue;
        };
        let started = if config.shared {
            agents.shared_toolset(config).await
        } else {
            Toolset::start(
                config,
                workdir,
                agents.options.default_policy,
                agents.options.toolset_start_timeout,
            )
            .await
            .map(Arc::new)
        }
        .map_err(|error| Ending::with(State::Failed, "toolset", error.to_string()))?;
        toolsets.push(started);
    }
    Ok(())
}

/// Journals `entries`; a run that cannot be journaled cannot go on.
async fn write(agents: &Agents, run: &Run, entries: Vec<Entry>) -> Result<(), Ending> {
    agents.write(run, entries).await.map_err(|reason| {
        tracing::error!(%reason, run = %run.id, "a run's journal could not be written");
        Ending::with(
            State::Failed,
            "journal",
            "the run's journal could not be written",
        )
    })
}

/// The tool calls of the transcript's last message, if it is the model's, that have no result
/// yet: what a run read back from its journal still has to do.
fn unanswered(messages: &[Value]) -> Vec<Value> {
    let Some(last_call) = messages
        .iter()
        .rposition(|message| message["role"] == "assistant")
    else {
        return Vec::new();
    };
    let answered: Vec<&Value> = messages[last_call + 1..]
        .iter()
        .filter(|message| message["role"] == "tool")
        .map(|message| &message["tool_call_id"])
        .collect();
    messages[last_call]["tool_calls"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|call| !answered.contains(&&call["id"]))
        .cloned()
        .collect()
}

/// The steps, until one ends the run.
async fn steps(agents: &Arc<Agents>, run: &Arc<Run>, toolsets: &[Arc<Toolset>]) -> Ending {
    let tools: HashMap<&str, (&Toolset, &Tool)> = toolsets
        .iter()
        .map(|toolset| &**toolset)
        .flat_map(|toolset| {
            toolset
                .tools()
                .iter()
                .map(move |tool| (tool.offered_as.as_str(), (toolset, tool)))
        })
        .collect();
    let definitions: Vec<&Value> = toolsets
        .iter()
        .flat_map(|toolset| toolset.tools().iter().map(|tool| &tool.definition))
        .collect();
    loop {
        // The model's tool calls first, each to its result.
        let (calls, last) = {
            let inner = run.inner.lock();
            (unanswered(&inner.messages), inner.messages.last().cloned())
        };
        if !calls.is_empty() {
            for call in calls {
                let result = match tool_step(agents, run, &tools, &call).await {
                    Ok(result) => result,
                    Err(ending) => return ending,
                };
                let message = json!({
                    "role": "tool",
                    "tool_call_id": call["id"],
                    "content": result,
                });
                if let Err(ending) = write(
                    agents,
                    run,
                    vec![Entry::Message {
                        message: message.clone(),
                    }],
                )
                .await
                {
                    return ending;
                }
                run.inner.lock().messages.push(message);
            }
            continue;
        }
        // An answer without tool calls is the end (read back, it may already be the last).
        if let Some(last) = last
            && last["role"] == "assistant"
        {
            let answer = last["content"].as_str().unwrap_or("").to_string();
            run.inner.lock().answer = Some(answer);
            return Ending::new(State::Done);
        }
        let taken = run
            .inner
            .lock()
            .messages
            .iter()
            .filter(|message| message["role"] == "assistant")
            .count();
        if taken >= run.max_steps as usize {
            return Ending::with(
                State::Stopped,
                "max_steps",
                format!("the run took its {} steps", run.max_steps),
            );
        }
        wait_while_paused(run).await;
        // What the person said meanwhile, then the call: journaled before it is made.
        let steers: Vec<Value> = run
            .inner
            .lock()
            .steers
            .drain(..)
            .map(|steer| json!({"role": "user", "content": steer}))
            .collect();
        let mut entries: Vec<Entry> = steers
            .iter()
            .map(|message| Entry::Message {
                message: message.clone(),
            })
            .collect();
        entries.push(Entry::ModelCall);
        if let Err(ending) = write(agents, run, entries).await {
            return ending;
        }
        let body = {
            let mut inner = run.inner.lock();
            inner.messages.extend(steers);
            let mut body = json!({
                "model": run.model,
                "messages": inner.messages,
                "max_tokens": agents.options.step_max_tokens,
            });
            if !definitions.is_empty() {
                body["tools"] = json!(definitions);
            }
            body
        };
        let (message, charged_cu) = match model_step(agents, run, body).await {
            Ok(answer) => answer,
            Err(ending) => return ending,
        };
        let asked_for_tools = message["tool_calls"]
            .as_array()
            .is_some_and(|calls| !calls.is_empty());
        let content = message["content"].as_str().unwrap_or("").to_string();
        let step = Step {
            kind: "model".to_string(),
            tool: None,
            arguments: None,
            outcome: if asked_for_tools {
                "asked_for_tools"
            } else {
                "answered"
            }
            .to_string(),
            summary: (!content.is_empty()).then(|| summary(&content)),
            cu: charged_cu,
        };
        if let Err(ending) = write(
            agents,
            run,
            vec![
                Entry::Step { step: step.clone() },
                Entry::Message {
                    message: message.clone(),
                },
            ],
        )
        .await
        {
            return ending;
        }
        run.inner.lock().spent_cu += charged_cu;
        show(run, step);
        run.inner.lock().messages.push(message);
    }
}

/// Waits while the run is paused (its person's pause and resume are journaled as they come).
async fn wait_while_paused(run: &Run) {
    let mut paused = run.paused.subscribe();
    if *paused.borrow() {
        run.set_state(State::Paused);
        let _ = paused.wait_for(|paused| !*paused).await;
    }
    run.set_state(State::Running);
}

/// One model call, charged to the run's account and queued as its person: the assistant's
/// message and what it was charged.
async fn model_step(agents: &Agents, run: &Run, body: Value) -> Result<(Value, u64), Ending> {
    let payer = Payer {
        account: run.account,
        key: None,
        queued_as: run.person,
    };
    let body = Bytes::from(body.to_string());
    // A full queue or a busy server is a wait, not an end: the run's calls take its person's
    // turns, one after another, however many runs the person has.
    let mut waited = 0u32;
    let response = loop {
        let answer = stipend_gateway::chat_in_process(
            Arc::clone(agents.gateway()),
            payer.clone(),
            body.clone(),
        )
        .await;
        let pause = match answer {
            Ok(response) => break response,
            Err(ApiError::BudgetExhausted {
                needed_cu,
                available_cu,
                ..
            }) => {
                // A step reserves its worst case: its whole request (the tools' descriptions
                // included) and `step_max_tokens` of answer, at the model's prices.
                return Err(Ending::with(
                    State::BudgetExhausted,
                    "budget_exhausted",
                    format!(
                        "the run's next step may cost up to {needed_cu} cu (its whole request and the longest answer it may get, at the model's prices), and {available_cu} cu of its budget are left"
                    ),
                ));
            }
            Err(ApiError::RateLimited { retry_after_s, .. }) => {
                std::time::Duration::from_secs(retry_after_s.max(1))
            }
            Err(ApiError::Overloaded(_)) => std::time::Duration::from_secs(1),
            Err(other) => return Err(Ending::with(State::Failed, "model", other.reason())),
        };
        waited += 1;
        if waited == 1 {
            tracing::debug!(run = %run.id, "a run's step waits for its person's turn");
        }
        // Spread at random, so that many waiting runs do not come back at the same moment.
        let spread = std::time::Duration::from_millis((TransferId::random().0 % 500) as u64);
        tokio::time::sleep(pause + spread).await;
    };
    let charged_cu = response
        .headers()
        .get(CHARGED_HEADER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok())
        .unwrap_or(0);
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .map_err(|error| Ending::with(State::Failed, "model", error.to_string()))?;
    let answer: Value = serde_json::from_slice(&bytes)
        .map_err(|_| Ending::with(State::Failed, "model", "the model's answer is not JSON"))?;
    let message = answer["choices"][0]["message"].clone();
    if !message.is_object() {
        return Err(Ending::with(
            State::Failed,
            "model",
            "the model's answer has no message",
        ));
    }
    // Kept as the model said it, less what the next request must not carry.
    let mut kept = Map::new();
    kept.insert("role".to_string(), json!("assistant"));
    kept.insert("content".to_string(), message["content"].clone());
    if let Some(calls) = message.get("tool_calls").filter(|calls| calls.is_array()) {
        kept.insert("tool_calls".to_string(), calls.clone());
    }
    Ok((Value::Object(kept), charged_cu))
}

/// One tool call the model made: run, refused, or put to the person first, by its policy (or
/// by what the journal says was decided before a restart). What the model is told.
async fn tool_step(
    agents: &Agents,
    run: &Run,
    tools: &HashMap<&str, (&Toolset, &Tool)>,
    call: &Value,
) -> Result<String, Ending> {
    let call_id = call["id"].as_str().unwrap_or("").to_string();
    let name = call["function"]["name"].as_str().unwrap_or("").to_string();
    let arguments = match call["function"]["arguments"]
        .as_str()
        .map(serde_json::from_str)
    {
        Some(Ok(Value::Object(arguments))) => arguments,
        _ => {
            let message =
                format!("The arguments for {name} are not a JSON object; nothing was run.");
            note(
                agents,
                run,
                tool_record(&name, None, "bad_arguments", &message),
            )
            .await?;
            return Ok(message);
        }
    };
    let Some((toolset, tool)) = tools.get(name.as_str()) else {
        let message = format!("There is no tool {name}; nothing was run.");
        note(
            agents,
            run,
            tool_record(&name, Some(&arguments), "unknown_tool", &message),
        )
        .await?;
        return Ok(message);
    };
    let (approved_for_run, decided, asked, started) = {
        let mut inner = run.inner.lock();
        (
            inner.approved_tools.contains(&name),
            inner.decided.remove(&call_id),
            inner.asked.remove(&call_id),
            inner.started.remove(&call_id),
        )
    };
    let (arguments, outcome) = match tool.policy {
        crate::Policy::Deny => {
            let message = format!("The operator's policy does not allow {name}; nothing was run.");
            note(
                agents,
                run,
                tool_record(&name, Some(&arguments), "refused_by_policy", &message),
            )
            .await?;
            return Ok(message);
        }
        crate::Policy::Auto => (arguments, "auto"),
        crate::Policy::Ask if approved_for_run => (arguments, "approved_for_run"),
        crate::Policy::Ask => {
            // Decided before a restart and not yet started: that decision stands. Started and
            // cut off: asked again. Asked and not decided: the same approval waits again.
            let decision = match decided {
                Some(decided) if !started => decision_of(decided),
                _ => ask(agents, run, &call_id, &name, arguments.clone(), asked).await?,
            };
            match decision {
                Decision::Approve(edited) => (edited.unwrap_or(arguments), "approved"),
                Decision::ApproveForRun(edited) => {
                    run.inner.lock().approved_tools.insert(name.clone());
                    (edited.unwrap_or(arguments), "approved_for_run")
                }
                Decision::Deny(reason) => {
                    let message = format!("The person denied {name}: {reason}");
                    note(
                        agents,
                        run,
                        tool_record(&name, Some(&arguments), "denied", &message),
                    )
                    .await?;
                    return Ok(message);
                }
            }
        }
    };
    // Journaled as started: a tool call cut off by a stop is run again (auto) or asked again.
    write(
        agents,
        run,
        vec![Entry::ToolStarted {
            call_id: call_id.clone(),
        }],
    )
    .await?;
    let result = toolset
        .call(
            &tool.name,
            arguments.clone(),
            agents.options.tool_timeout,
            agents.options.tool_output_bytes_max,
        )
        .await;
    let (text, outcome) = match result {
        Ok((text, false)) => (text, outcome.to_string()),
        Ok((text, true)) => (
            format!("The tool reported an error: {text}"),
            format!("{outcome}, tool_error"),
        ),
        Err(error) => (
            format!("The tool failed: {error}"),
            format!("{outcome}, failed"),
        ),
    };
    note(
        agents,
        run,
        tool_record(&name, Some(&arguments), &outcome, &text),
    )
    .await?;
    Ok(text)
}

fn decision_of(decided: Decided) -> Decision {
    match decided {
        Decided::Approve { arguments } => Decision::Approve(arguments),
        Decided::ApproveForRun { arguments } => Decision::ApproveForRun(arguments),
        Decided::Deny { reason } => Decision::Deny(reason),
    }
}

fn decided_of(decision: &Decision) -> Decided {
    match decision {
        Decision::Approve(arguments) => Decided::Approve {
            arguments: arguments.clone(),
        },
        Decision::ApproveForRun(arguments) => Decided::ApproveForRun {
            arguments: arguments.clone(),
        },
        Decision::Deny(reason) => Decided::Deny {
            reason: reason.clone(),
        },
    }
}

/// Puts a tool call to the run's person (again, with the same approval, if it was asked before
/// a restart) and waits for the decision, journaled before it is acted on.
async fn ask(
    agents: &Agents,
    run: &Run,
    call_id: &str,
    tool: &str,
    arguments: Map<String, Value>,
    asked_before: Option<Approval>,
) -> Result<Decision, Ending> {
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let approval = match asked_before {
        Some(approval) => approval,
        None => {
            let approval = {
                let mut inner = run.inner.lock();
                let number = inner.approvals_asked;
                inner.approvals_asked += 1;
                Approval {
                    id: format!(
                        "appr_{}_{number}",
                        run.id.strip_prefix("run_").unwrap_or(&run.id)
                    ),
                    run_id: run.id.clone(),
                    tool: tool.to_string(),
                    arguments: Value::Object(arguments),
                    created_at: stipend_ledger::units::format_utc(agents.books.now_ms()),
                }
            };
            write(
                agents,
                run,
                vec![Entry::Asked {
                    approval: approval.clone(),
                    call_id: call_id.to_string(),
                }],
            )
            .await?;
            approval
        }
    };
    run.inner.lock().pending = Some((approval.clone(), sender));
    run.set_state(State::WaitingForApproval);
    run.publish(json!({"type": "approval", "approval": approval}));
    // A dropped sender (the run deleted) is a denial; a stop ends the run around this wait.
    let decision = receiver
        .await
        .unwrap_or_else(|_| Decision::Deny("the run was stopped".to_string()));
    write(
        agents,
        run,
        vec![Entry::Decided {
            approval_id: approval.id.clone(),
            call_id: call_id.to_string(),
            decision: decided_of(&decision),
        }],
    )
    .await?;
    run.set_state(State::Running);
    Ok(decision)
}

fn tool_record(
    name: &str,
    arguments: Option<&Map<String, Value>>,
    outcome: &str,
    text: &str,
) -> Step {
    Step {
        kind: "tool".to_string(),
        tool: Some(name.to_string()),
        arguments: arguments.map(|arguments| Value::Object(arguments.clone())),
        outcome: outcome.to_string(),
        summary: Some(summary(text)),
        cu: 0,
    }
}

/// The first 200 characters of `text`, for a step's summary.
fn summary(text: &str) -> String {
    match text.char_indices().nth(200) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

/// Journals a step, then shows it.
async fn note(agents: &Agents, run: &Run, step: Step) -> Result<(), Ending> {
    write(agents, run, vec![Entry::Step { step: step.clone() }]).await?;
    show(run, step);
    Ok(())
}

/// Adds a step to the run's view and tells whoever follows it.
fn show(run: &Run, step: Step) {
    let event = json!({"type": "step", "step": step});
    run.inner.lock().steps.push(step);
    run.publish(event);
}

/// Ends the run: its state journaled, then what is left of its budget back to its person.
async fn end(agents: &Agents, run: &Run, ending: Ending) {
    let answer = {
        let mut inner = run.inner.lock();
        inner.pending = None;
        if inner.error.is_none() {
            inner.error = ending.error.clone();
        }
        inner.answer.clone()
    };
    let ended = Entry::Ended {
        state: ending.state,
        error: ending.error,
        answer,
    };
    if let Err(reason) = agents.write(run, vec![ended]).await {
        tracing::error!(%reason, run = %run.id, "a run's end could not be journaled");
    }
    give_back_inner(agents, run).await;
    run.set_state(ending.state);
}

/// Gives back what an ended run's account still holds (after a restart, for a run that ended
/// before it could).
pub(crate) async fn give_back(agents: Arc<Agents>, run: Arc<Run>) {
    give_back_inner(&agents, &run).await;
}

/// What is left of the run's budget back to its person, once no call of its holds any (a model
/// call under way when the run was stopped goes on to its settle); journaled.
async fn give_back_inner(agents: &Agents, run: &Run) {
    // Nothing of the account may be held when it is emptied: a call still settling, or (on a
    // shared database) a server's lease not yet given back, which it is once idle.
    let waited = std::time::Instant::now();
    let left = loop {
        let (books, account) = (Arc::clone(&agents.books), run.account);
        let view = tokio::task::spawn_blocking(move || books.view(account))
            .await
            .unwrap_or(Err(stipend_ledger::LedgerError::Unavailable {
                reason: "the task reading a run's account failed".to_string(),
            }));
        match view {
            Ok(view) if view.available_cu as i64 == view.balance_cu => break view.available_cu,
            Ok(_) if waited.elapsed() < crate::limits::END_WAIT_MAX => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Ok(view) => {
                tracing::warn!(run = %run.id, "part of a run's budget was still held when it ended; it stays with the run's account");
                break view.available_cu;
            }
            Err(error) => {
                tracing::error!(%error, run = %run.id, "a run's account could not be read");
                return;
            }
        }
    };
    if left > 0 {
        let (books, account, person) = (Arc::clone(&agents.books), run.account, run.person);
        let given = tokio::task::spawn_blocking(move || {
            books.give(TransferId::random(), account, person, left)
        })
        .await;
        if !matches!(given, Ok(Ok(_))) {
            tracing::error!(run = %run.id, left, "a run's unspent budget could not be given back");
            return;
        }
    }
    run.inner.lock().returned = true;
    if let Err(reason) = agents.write(run, vec![Entry::Returned]).await {
        tracing::error!(%reason, run = %run.id, "a run's return could not be journaled");
    }
}
