//! A person's agents on their page: each run's state and spending, and the approvals inbox,
//! where what a run asks is approved (once, or for the rest of the run, with the arguments as
//! asked or edited) or denied with a reason the model is told. The section is redrawn every two
//! seconds while the page is open (`assets/live.js`, from `/fragments/agents`), and works
//! without script by reloading.

use std::sync::Arc;

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::{Map, Value};
use stipend_agents::{AgentError, Agents, Approval, Decision, RunView};
use stipend_ledger::{AccountId, Flops};

use crate::Web;
use crate::limits::{AGENT_GOAL_SHOWN, AGENT_RUNS_SHOWN};
use crate::person::signed_in;
use crate::session::Flash;

/// How a run's state reads.
fn state_words(run: &RunView) -> &'static str {
    use stipend_agents::State;
    match run.state {
        State::Running => "running",
        State::WaitingForApproval => "waiting for you",
        State::Paused => "paused",
        State::Done => "done",
        State::Failed => "failed",
        State::Stopped => "stopped",
        State::BudgetExhausted => "out of budget",
    }
}

/// The agents section's contents: the inbox, then the runs.
pub(crate) fn section(agents: &Agents, person: AccountId) -> Markup {
    let approvals = agents.approvals(person);
    let mut runs = agents.list(person);
    runs.truncate(AGENT_RUNS_SHOWN);
    html! {
        h2 #agents-title { "Your agents" }
        h3 { "Waiting for you" }
        @if approvals.is_empty() {
            p.muted #inbox-empty { "Nothing is waiting for you." }
        }
        @for approval in &approvals {
            (approval_form(approval))
        }
        h3 { "Runs" }
        @if runs.is_empty() {
            p.muted { "No agent runs yet. Start one with " code { "stipend agent start" } " or " code { "POST /v1/agents" } "." }
        } @else {
            div.table-wrap {
                table #runs {
                    thead { tr { th { "Run" } th { "Goal" } th { "State" } th.num { "Steps" } th.num { "Spent" } th.num { "Budget" } } }
                    tbody {
                        @for run in &runs {
                            tr data-run=(run.id) {
                                td { code { (run.id) } }
                                td.goal { (shorten(&run.goal, AGENT_GOAL_SHOWN)) }
                                td.state { (state_words(run)) }
                                td.num { (run.steps.len()) }
                                td.num.spent data-cu=(run.spent_cu) { (Flops(run.spent_cu as i64)) }
                                td.num { (Flops(run.budget_cu as i64)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn approval_form(approval: &Approval) -> Markup {
    let arguments = serde_json::to_string_pretty(&approval.arguments).unwrap_or_default();
    html! {
        form.stack.approval method="post" action={"/approvals/" (approval.id)} data-approval=(approval.id) {
            p {
                "Run " code { (approval.run_id) } " asks to use "
                strong.tool { (approval.tool) } " with:"
            }
            label { "Arguments (edit them to change what it does)"
                textarea.arguments name="arguments" rows="6" spellcheck="false" { (arguments) }
            }
            div.row {
                button.approve type="submit" name="decision" value="approve" { "Approve" }
                button.quiet.approve-for-run type="submit" name="decision" value="approve_for_run" { "Approve for this run" }
            }
            label { "Or deny it, and say why (the agent is told)"
                input.reason type="text" name="reason" maxlength="1000" autocomplete="off";
            }
            button.danger.deny type="submit" name="decision" value="deny" { "Deny" }
        }
    }
}

fn shorten(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        return text.to_string();
    }
    let mut short: String = text.chars().take(max_chars).collect();
    short.push('…');
    short
}

/// `GET /fragments/agents`: the section alone, for the page's script to redraw it.
pub(crate) async fn fragment(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    let Some(agents) = &web.agents else {
        return StatusCode::NOT_FOUND.into_response();
    };
    // Read as a page is (no form: the origin check does not apply to a GET).
    let Some(session) = web
        .sessions
        .peek(&headers)
        .filter(|session| session.role == crate::session::Role::Person)
    else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    if web.gateway.keys.account_of(&session.key_id).ok() != Some(session.account) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    section(agents, session.account).into_response()
}

#[derive(Deserialize)]
pub(crate) struct Decide {
    decision: String,
    #[serde(default)]
    arguments: String,
    #[serde(default)]
    reason: String,
}

/// `POST /approvals/{id}`: the person's decision on what a run asks.
pub(crate) async fn decide(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    form: Result<Form<Decide>, FormRejection>,
) -> Response {
    let session = match signed_in(&web, &headers) {
        Ok(session) => session,
        Err(response) => return *response,
    };
    let flash = match (&web.agents, form) {
        (None, _) => Flash::Refused("Agents do not run on this server.".to_string()),
        (Some(_), Err(_)) => Flash::Refused("Choose approve or deny.".to_string()),
        (Some(agents), Ok(Form(form))) => decide_flash(agents, session.account, &id, form),
    };
    web.sessions.flash(&headers, flash);
    Redirect::to("/#agents").into_response()
}

fn decide_flash(agents: &Agents, person: AccountId, id: &str, form: Decide) -> Flash {
    // The arguments as asked, to tell an edit from none.
    let asked = agents
        .approvals(person)
        .into_iter()
        .find(|approval| approval.id == id)
        .map(|approval| approval.arguments);
    let edited = || -> Result<Option<Map<String, Value>>, String> {
        let text = form.arguments.trim();
        if text.is_empty() {
            return Ok(None);
        }
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(arguments)) => {
                if asked.as_ref() == Some(&Value::Object(arguments.clone())) {
                    Ok(None)
                } else {
                    Ok(Some(arguments))
                }
            }
            Ok(_) => Err("The arguments must be a JSON object.".to_string()),
            Err(error) => Err(format!("The arguments are not JSON: {error}.")),
        }
    };
    let decision = match form.decision.as_str() {
        "approve" => edited().map(Decision::Approve),
        "approve_for_run" => edited().map(Decision::ApproveForRun),
        "deny" => {
            let reason = form.reason.trim();
            Ok(Decision::Deny(if reason.is_empty() {
                "The person denied it.".to_string()
            } else {
                reason.to_string()
            }))
        }
        _ => Err("Choose approve or deny.".to_string()),
    };
    let decision = match decision {
        Ok(decision) => decision,
        Err(message) => return Flash::Refused(message),
    };
    let words = match &decision {
        Decision::Approve(Some(_)) | Decision::ApproveForRun(Some(_)) => {
            "Approved, as you edited it."
        }
        Decision::Approve(None) => "Approved.",
        Decision::ApproveForRun(None) => "Approved, for the rest of this run.",
        Decision::Deny(_) => "Denied; the agent is told why.",
    };
    match agents.decide(person, id, decision) {
        Ok(_) => Flash::Done(words.to_string()),
        Err(AgentError::NotFound(_)) => {
            Flash::Refused("Nothing waits for that answer.".to_string())
        }
        Err(AgentError::Conflict(message)) => Flash::Refused(format!("Not changed: {message}.")),
        Err(error) => Flash::Refused(format!("Not decided: {error}.")),
    }
}
