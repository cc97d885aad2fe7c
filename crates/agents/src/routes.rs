//! The agents' HTTP API, for the run's person (their keys): runs under `/v1/agents`, their
//! approvals under `/v1/approvals`. A run or approval of someone else's is a 404, as one that
//! does not exist. Errors are OpenAI-shaped.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde_json::{Map, Value, json};
use stipend_ledger::{AccountId, LedgerError};

use crate::{AgentError, Agents, Decision, StartRequest};

/// The agents' routes.
pub fn router(agents: Arc<Agents>) -> Router {
    Router::new()
        .route("/v1/agents", post(start).get(list))
        .route("/v1/agents/{id}", get(show).delete(delete))
        .route("/v1/agents/{id}/events", get(events))
        .route("/v1/agents/{id}/steer", post(steer))
        .route("/v1/agents/{id}/pause", post(pause))
        .route("/v1/agents/{id}/resume", post(resume))
        .route("/v1/agents/{id}/stop", post(stop))
        .route("/v1/approvals", get(approvals))
        .route("/v1/approvals/{id}", post(decide))
        .with_state(agents)
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let (status, kind, code, param) = match &self {
            AgentError::Invalid { param, .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                param.map(str::to_string),
            ),
            AgentError::NotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("not_found"),
                None,
            ),
            AgentError::Conflict(_) => (
                StatusCode::CONFLICT,
                "invalid_request_error",
                Some("conflict"),
                None,
            ),
            AgentError::Quota { code, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                if *code == "insufficient_quota" {
                    "insufficient_quota"
                } else {
                    "requests"
                },
                Some(*code),
                None,
            ),
            AgentError::Ledger(LedgerError::Unavailable { .. } | LedgerError::Store(_)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("ledger_unavailable"),
                None,
            ),
            AgentError::Ledger(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                None,
                None,
            ),
        };
        let message = match &self {
            AgentError::Ledger(error) => {
                tracing::error!(%error, "agents: the ledger refused");
                "The budget ledger could not do this right now.".to_string()
            }
            other => other.to_string(),
        };
        (
            status,
            Json(
                json!({"error": {"message": message, "type": kind, "param": param, "code": code}}),
            ),
        )
            .into_response()
    }
}

/// The person a request's key belongs to: a request without a good key is refused (401)
/// before its handler runs.
struct Person(AccountId);

impl FromRequestParts<Arc<Agents>> for Person {
    type Rejection = stipend_gateway::ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        agents: &Arc<Agents>,
    ) -> Result<Person, stipend_gateway::ApiError> {
        stipend_gateway::authenticate(agents.gateway(), &parts.headers).map(Person)
    }
}

/// An answer: the JSON of what was asked for, or the error.
fn reply(result: Result<impl serde::Serialize, AgentError>) -> Response {
    match result {
        Ok(answer) => Json(answer).into_response(),
        Err(error) => error.into_response(),
    }
}

/// A JSON object body, or a 400 that says why not.
fn object(body: &Bytes) -> Result<Map<String, Value>, AgentError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(AgentError::Invalid {
            message: "The body must be a JSON object.".to_string(),
            param: None,
        }),
        Err(error) => Err(AgentError::Invalid {
            message: format!("The body is not valid JSON: {error}."),
            param: None,
        }),
    }
}

fn invalid(param: &'static str, message: &str) -> AgentError {
    AgentError::Invalid {
        message: message.to_string(),
        param: Some(param),
    }
}

fn start_request(body: &Bytes) -> Result<StartRequest, AgentError> {
    let body = object(body)?;
    for key in body.keys() {
        if !["goal", "model", "budget_cu", "toolsets", "max_steps"].contains(&key.as_str()) {
            return Err(AgentError::Invalid {
                message: format!(
                    "Unknown field {key:?}: a run takes goal, model, budget_cu, toolsets and max_steps."
                ),
                param: None,
            });
        }
    }
    let goal = body["goal"]
        .as_str()
        .ok_or_else(|| invalid("goal", "`goal` must be a string"))?;
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("model", "`model` must be a string"))?;
    let budget_cu = body
        .get("budget_cu")
        .and_then(Value::as_u64)
        .ok_or_else(|| invalid("budget_cu", "`budget_cu` must be a whole number of cu"))?;
    let toolsets = match body.get("toolsets") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(names)) => names
            .iter()
            .map(|name| name.as_str().map(str::to_string))
            .collect::<Option<Vec<String>>>()
            .ok_or_else(|| invalid("toolsets", "`toolsets` must be a list of names"))?,
        Some(_) => return Err(invalid("toolsets", "`toolsets` must be a list of names")),
    };
    let max_steps = match body.get("max_steps") {
        None | Some(Value::Null) => None,
        Some(value) => Some(
            value
                .as_u64()
                .and_then(|steps| u32::try_from(steps).ok())
                .ok_or_else(|| invalid("max_steps", "`max_steps` must be a whole number"))?,
        ),
    };
    Ok(StartRequest {
        goal: goal.to_string(),
        model: model.to_string(),
        budget_cu,
        toolsets,
        max_steps,
    })
}

async fn start(State(agents): State<Arc<Agents>>, Person(person): Person, body: Bytes) -> Response {
    let request = match start_request(&body) {
        Ok(request) => request,
        Err(error) => return error.into_response(),
    };
    // Moving the cap waits for the ledger's commit: off the async threads.
    let starting = Arc::clone(&agents);
    match tokio::task::spawn_blocking(move || starting.start(person, request)).await {
        Ok(Ok(run)) => (StatusCode::CREATED, Json(run)).into_response(),
        Ok(Err(error)) => error.into_response(),
        Err(_) => AgentError::Conflict("the run could not be started".to_string()).into_response(),
    }
}

async fn list(State(agents): State<Arc<Agents>>, Person(person): Person) -> Response {
    Json(json!({"object": "list", "data": agents.list(person)})).into_response()
}

async fn show(
    State(agents): State<Arc<Agents>>,
    Person(person): Person,
    Path(id): Path<String>,
) -> Response {
    reply(agents.show(person, &id))
}

async fn delete(
    State(agents): State<Arc<Agents>>,
    Person(person): Person,
    Path(id): Path<String>,
) -> Response {
    reply(
        agents
            .delete(person, &id)
            .await
            .map(|()| json!({"id": id, "deleted": true})),
    )
}

async fn events(
    State(agents): State<Arc<Agents>>,
    Person(person): Person,
    Path(id): Path<String>,
) -> Response {
    let (run, receiver) = match agents.events(person, &id) {
        Ok(opened) => opened,
        Err(error) => return error.into_response(),
    };
    // The run as it is now, then what happens to it; the stream ends when the run does.
    let first = json!({"type": "run", "run": run});
    let ended = run.state.ended();
    let stream = futures_util::stream::unfold(
        (Some(first), receiver, ended),
        |(first, mut receiver, ended)| async move {
            if let Some(first) = first {
                return Some((event(&first), (None, receiver, ended)));
            }
            if ended {
                return None;
            }
            loop {
                match receiver.recv().await {
                    Ok(next) => {
                        let ended = next["type"] == "state"
                            && next["state"].as_str().is_some_and(|state| {
                                ["done", "failed", "stopped", "budget_exhausted"].contains(&state)
                            });
                        return Some((event(&next), (None, receiver, ended)));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn event(value: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(value.to_string()))
}

async fn steer(
    State(agents): State<Arc<Agents>>,
    Person(person): Person,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let message = object(&body).and_then(|body| {
        body.get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| invalid("message", "`message` must be a string"))
    });
    let steered = match message {
        Ok(message) => agents.steer(person, &id, message).await,
        Err(error) => Err(error),
    };
    reply(steered)
}

async fn pause(
    State(agents): State<Arc<Agents>>,
    Person(person): Person,
    Path(id): Path<String>,
) -> Response {
    reply(agents.pause(person, &id, true).await)
}

async fn resume(
    State(agents): State<Arc<Agents>>,
    Person(person): Person,
    Path(id): Path<String>,
) -> Response {
    reply(agents.pause(person, &id, false).await)
}

async fn stop(
    State(agents): State<Arc<Agents>>,
    Person(person): Person,
    Path(id): Path<String>,
) -> Response {
    reply(agents.stop(person, &id))
}

async fn approvals(State(agents): State<Arc<Agents>>, Person(person): Person) -> Response {
    Json(json!({"object": "list", "data": agents.approvals(person)})).into_response()
}

fn decision(body: &Bytes) -> Result<Decision, AgentError> {
    let body = object(body)?;
    let arguments = match body.get("arguments") {
        None | Some(Value::Null) => None,
        Some(Value::Object(arguments)) => Some(arguments.clone()),
        Some(_) => return Err(invalid("arguments", "`arguments` must be a JSON object")),
    };
    let reason = body
        .get("reason")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    match body.get("decision").and_then(Value::as_str) {
        Some("approve") => Ok(Decision::Approve(arguments)),
        Some("approve_for_run") => Ok(Decision::ApproveForRun(arguments)),
        Some("deny") if arguments.is_some() => Err(invalid(
            "arguments",
            "a denial takes a reason, not arguments",
        )),
        Some("deny") => Ok(Decision::Deny(if reason.trim().is_empty() {
            "no reason given".to_string()
        } else {
            reason
        })),
        _ => Err(invalid(
            "decision",
            "`decision` must be \"approve\", \"approve_for_run\" or \"deny\"",
        )),
    }
}

async fn decide(
    State(agents): State<Arc<Agents>>,
    Person(person): Person,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    reply(decision(&body).and_then(|decision| agents.decide(person, &id, decision)))
}
