//! The operator's page at `/admin`, opened with an operator key (`stipend admin key create`; a
//! person's key never opens it): how each model is used now, how this period's compute is spread
//! across people (the Lorenz curve, the Gini coefficient, the top 1 % and 10 %, the median
//! person), the people and pools (find, create, grant: balances and counts, never content),
//! and the policy in force.

use std::sync::Arc;

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::Deserialize;
use stipend_gateway::Backend;
use stipend_gateway::keys::{self, KeyError};
use stipend_ledger::limits::DAY_MS;
use stipend_ledger::units::{format_duration, parse_amount_cu};
use stipend_ledger::{AccountKind, AccountView, Flops, LedgerError, TransferId};
use stipend_report::Distribution;

use crate::chart;
use crate::limits::{ADMIN_ACCOUNTS_SHOWN, KEY_BYTES_MAX, SEARCH_RESULTS_MAX};
use crate::operator;
use crate::session::{self, Flash, Role, Session};
use crate::{
    SignInForm, Web, clear_cookie, page, refusal, respond, sign_in_form, signed_in_redirect,
};

/// `GET /admin`: the operator's page, or its sign-in form.
pub(crate) async fn home(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Query(query): Query<Search>,
) -> Response {
    let Some(session) = web.sessions.take(&headers) else {
        return sign_in_page(StatusCode::OK, None);
    };
    if session.role != Role::Operator {
        return sign_in_page(
            StatusCode::OK,
            Some("This page is for the operator: sign in with an operator key."),
        );
    }
    if let Err(response) = key_stands(&web, &headers, &session) {
        return *response;
    }
    let gathered = {
        let web = Arc::clone(&web);
        tokio::task::spawn_blocking(move || gather(&web, query)).await
    };
    match gathered {
        Ok(Ok(seen)) => respond(StatusCode::OK, admin_page(&web, &seen, session.flash)),
        Ok(Err(error)) => {
            tracing::warn!(%error, "the operator's page could not be read");
            refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "The ledger cannot be read right now; try again shortly.",
            )
        }
        Err(_) => refusal(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The page could not be drawn.",
        ),
    }
}

/// What the operator asked to see: an account by name, or the page of accounts after an id.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Search {
    q: Option<String>,
    after: Option<u64>,
}

/// What the operator's page shows.
struct Seen {
    distribution: Distribution,
    earlier: Vec<(i64, Distribution)>,
    served_by_day: Vec<(i64, Vec<u64>)>,
    accounts: Vec<AccountView>,
    next_after: Option<u64>,
    found: Option<Result<Vec<AccountView>, String>>,
    query: Option<String>,
    access: stipend_ledger::AccessRules,
}

/// This period's distribution, the page of accounts asked for, and the one searched for.
fn gather(web: &Web, search: Search) -> Result<Seen, LedgerError> {
    let sinks: Vec<_> = web
        .gateway
        .models
        .values()
        .map(|model| model.sink)
        .collect();
    let survey = operator::survey(web.books.as_ref(), &sinks)?;
    let (accounts, next_after) =
        operator::accounts(web.books.as_ref(), search.after, ADMIN_ACCOUNTS_SHOWN)?;
    let query = search
        .q
        .map(|q| q.trim().to_string())
        .filter(|q| !q.is_empty());
    // The people and pools whose names begin with what was typed.
    let found = match &query {
        None => None,
        Some(prefix) => {
            let mut views = Vec::new();
            for (id, _) in web
                .books
                .store()
                .accounts_named_like(prefix, SEARCH_RESULTS_MAX)?
            {
                let view = web.books.view(id)?;
                if matches!(view.kind, AccountKind::Person | AccountKind::Pool) {
                    views.push(view);
                }
            }
            Some(if views.is_empty() {
                Err(format!("Nobody's name begins with {prefix:?}."))
            } else {
                Ok(views)
            })
        }
    };
    Ok(Seen {
        distribution: survey.distribution,
        earlier: survey.earlier,
        served_by_day: survey.served_by_day,
        accounts,
        next_after,
        found,
        query,
        access: web.books.store().access_rules()?,
    })
}

fn key_stands(web: &Web, headers: &HeaderMap, session: &Session) -> Result<(), Box<Response>> {
    match web.gateway.keys.operator_key(&session.key_id) {
        Ok(()) => Ok(()),
        Err(KeyError::Store(error)) => {
            tracing::warn!(%error, "a key could not be checked");
            Err(Box::new(refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "Keys cannot be checked right now; try again shortly.",
            )))
        }
        Err(_) => {
            web.sessions.close(headers);
            let mut response = sign_in_page(
                StatusCode::OK,
                Some("The operator key you signed in with was revoked; sign in with another."),
            );
            clear_cookie(&mut response, headers);
            Err(Box::new(response))
        }
    }
}

fn sign_in_page(status: StatusCode, message: Option<&str>) -> Response {
    let form = SignInForm {
        title: "Operator sign-in",
        intro: html! { "Sign in with an operator key (" code { "stipend admin key create" } " prints one)." },
        action: "/admin/signin",
        label: "Operator key",
    };
    sign_in_form(status, form, message)
}

#[derive(Deserialize)]
pub(crate) struct SignIn {
    key: String,
}

/// `POST /admin/signin`: an operator key opens an operator's session.
pub(crate) async fn sign_in(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    form: Result<Form<SignIn>, FormRejection>,
) -> Response {
    if let Err(refused) = session::same_origin(&headers) {
        return refusal(StatusCode::FORBIDDEN, &refused.to_string());
    }
    let Ok(Form(form)) = form else {
        return sign_in_page(StatusCode::BAD_REQUEST, Some("Enter an operator key."));
    };
    let key = form.key.trim().to_string();
    let checked = if key.len() > KEY_BYTES_MAX {
        Err(KeyError::Invalid)
    } else {
        let (ring, key) = (web.gateway.keys.clone(), key.clone());
        tokio::task::spawn_blocking(move || ring.authenticate_operator(&key))
            .await
            .unwrap_or(Err(KeyError::Invalid))
    };
    match checked {
        Ok(()) => {}
        Err(KeyError::Store(error)) => {
            tracing::warn!(%error, "a key could not be checked");
            return refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "Keys cannot be checked right now; try again shortly.",
            );
        }
        Err(_) => {
            return sign_in_page(
                StatusCode::UNAUTHORIZED,
                Some("That is not an operator key (a person's key never opens this page)."),
            );
        }
    }
    let Some((key_id, _)) = keys::parse(&key) else {
        return sign_in_page(StatusCode::UNAUTHORIZED, Some("That key was not accepted."));
    };
    let token = match web.sessions.open(
        web.gateway.keys.operator(),
        key_id.to_string(),
        Role::Operator,
    ) {
        Ok(token) => token,
        Err(_) => return refusal(StatusCode::SERVICE_UNAVAILABLE, "No session could be made."),
    };
    tracing::info!(key = %key_id, "operator signed in to the web page");
    signed_in_redirect(&web, &headers, &token, "/admin")
}

/// `POST /admin/signout`.
pub(crate) async fn sign_out(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    if let Err(refused) = session::same_origin(&headers) {
        return refusal(StatusCode::FORBIDDEN, &refused.to_string());
    }
    web.sessions.close(&headers);
    let mut response = Redirect::to("/admin").into_response();
    clear_cookie(&mut response, &headers);
    response
}

fn signed_in(web: &Web, headers: &HeaderMap) -> Result<Session, Box<Response>> {
    if let Err(refused) = session::same_origin(headers) {
        return Err(Box::new(refusal(
            StatusCode::FORBIDDEN,
            &refused.to_string(),
        )));
    }
    match web.sessions.take(headers) {
        Some(session) if session.role == Role::Operator => {
            key_stands(web, headers, &session)?;
            Ok(session)
        }
        _ => Err(Box::new(sign_in_page(
            StatusCode::UNAUTHORIZED,
            Some("Your operator session has ended; sign in again."),
        ))),
    }
}

#[derive(Deserialize)]
pub(crate) struct Create {
    name: String,
    kind: String,
}

/// `POST /admin/accounts`: a new person or pool.
pub(crate) async fn create_account(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    form: Result<Form<Create>, FormRejection>,
) -> Response {
    let actor = match signed_in(&web, &headers) {
        Ok(session) => format!("operator key {}", session.key_id),
        Err(response) => return *response,
    };
    let flash = match form {
        Err(_) => Flash::Refused("Give the account a name and a kind.".to_string()),
        Ok(Form(form)) => {
            let kind = match form.kind.as_str() {
                "person" => Some(AccountKind::Person),
                "pool" => Some(AccountKind::Pool),
                _ => None,
            };
            match kind {
                None => Flash::Refused("An account is a person or a pool.".to_string()),
                Some(kind) => {
                    let (books, name) = (Arc::clone(&web.books), form.name);
                    let created = tokio::task::spawn_blocking(move || {
                        operator::create_account(books.as_ref(), &actor, &name, kind)
                    })
                    .await;
                    match created {
                        Ok(Ok(view)) => {
                            Flash::Done(format!("Created {} {}.", view.kind, view.name))
                        }
                        Ok(Err(
                            error @ (LedgerError::AccountExists { .. }
                            | LedgerError::NameConfusable { .. }
                            | LedgerError::InvalidName { .. }),
                        )) => Flash::Refused(format!("Not created: {error}.")),
                        _ => Flash::Refused(
                            "Not created: the ledger is unavailable; try again shortly."
                                .to_string(),
                        ),
                    }
                }
            }
        }
    };
    web.sessions.flash(&headers, flash);
    Redirect::to("/admin").into_response()
}

#[derive(Deserialize)]
pub(crate) struct Grant {
    name: String,
    amount: String,
    id: String,
}

/// `POST /admin/grant`: compute from the issuer to an account, once per form.
pub(crate) async fn grant(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    form: Result<Form<Grant>, FormRejection>,
) -> Response {
    let actor = match signed_in(&web, &headers) {
        Ok(session) => format!("operator key {}", session.key_id),
        Err(response) => return *response,
    };
    let flash = match form {
        Err(_) => Flash::Refused("Say whom to grant to and how much.".to_string()),
        Ok(Form(form)) => grant_flash(&web, &actor, form).await,
    };
    web.sessions.flash(&headers, flash);
    Redirect::to("/admin").into_response()
}

async fn grant_flash(web: &Arc<Web>, actor: &str, form: Grant) -> Flash {
    let name = form.name.trim().to_string();
    let amount_cu = match parse_amount_cu(form.amount.trim()) {
        Ok(0) => return Flash::Refused("Grant more than nothing.".to_string()),
        Ok(amount_cu) => amount_cu,
        Err(error) => {
            return Flash::Refused(format!(
                "{:?} is not an amount ({error}); write e.g. 2 TFLOP.",
                form.amount.trim()
            ));
        }
    };
    let Some(id) = TransferId::parse(form.id.trim()) else {
        return Flash::Refused("The form is damaged; reload the page.".to_string());
    };
    let granted = {
        let (books, name, actor) = (Arc::clone(&web.books), name.clone(), actor.to_string());
        tokio::task::spawn_blocking(move || {
            operator::grant(books.as_ref(), &actor, &name, amount_cu, id, None)
        })
        .await
    };
    match granted {
        Ok(Ok((_, posted))) if posted.replayed => {
            Flash::Done("That grant was already made; nothing more was sent.".to_string())
        }
        Ok(Ok((to, _))) => Flash::Done(format!("Granted {} to {to}.", Flops(amount_cu as i64))),
        Ok(Err(LedgerError::UnknownAccount { .. })) => {
            Flash::Refused(format!("Nobody is named {name:?}."))
        }
        Ok(Err(
            error @ (LedgerError::InvalidAmount { .. }
            | LedgerError::BalanceLimit { .. }
            | LedgerError::TooManyLots { .. }
            | LedgerError::WrongKind { .. }
            | LedgerError::TransferConflict { .. }),
        )) => Flash::Refused(format!("Not granted: {error}.")),
        _ => {
            Flash::Refused("Not granted: the ledger is unavailable; try again shortly.".to_string())
        }
    }
}

/// A UTC day as a date: `2026-12-05`.
fn day_label(day: i64) -> String {
    stipend_ledger::units::format_utc(day * DAY_MS)
        .chars()
        .take(10)
        .collect()
}

fn percent(share: f64) -> String {
    format!("{:.1} %", share * 100.0)
}

fn admin_page(web: &Web, seen: &Seen, flash: Option<Flash>) -> Markup {
    let distribution = &seen.distribution;
    let policy = web.gateway.ledger.policy();
    let period_ms = policy.period().as_millis() as i64;
    let series: Vec<String> = web.gateway.models.keys().cloned().collect();
    let served_columns: Vec<chart::Column> = seen
        .served_by_day
        .iter()
        .map(|(day, parts)| chart::Column {
            label: day_label(*day),
            parts: parts.clone(),
        })
        .collect();
    let served_tallest = seen
        .served_by_day
        .iter()
        .map(|(_, parts)| parts.iter().sum::<u64>())
        .max()
        .unwrap_or(0);
    let lorenz_words = distribution
        .lorenz
        .iter()
        .enumerate()
        .map(|(index, share)| format!("the poorest {} % used {}", index * 10, percent(*share)))
        .collect::<Vec<_>>()
        .join("; ");
    page(
        "Operator",
        None,
        html! {
            section.card.wide {
                div.row {
                    h2 { "Operator" }
                    form.inline method="post" action="/admin/signout" {
                        button.quiet #signout type="submit" { "Sign out" }
                    }
                }
                @match &flash {
                    Some(Flash::Done(text)) => p.flash.done #flash { (text) },
                    Some(Flash::Refused(text)) => p.flash.refused #flash { (text) },
                    Some(Flash::NewKey(_)) | None => {}
                }
            }
            section.card.wide #models aria-labelledby="models-title" {
                h2 #models-title { "Models now" }
                div.table-wrap {
                    table #models-table {
                        thead { tr {
                            th { "Model" } th.num { "Busy" } th.num { "Capacity" } th.num { "Waiting" }
                            th.num { "Admitted" } th.num { "Mean wait" } th.num { "Served" }
                        } }
                        tbody {
                            @for model in web.gateway.models.values() {
                                @let (running, waiting) = model.queue.load();
                                @let capacity = match &model.backend {
                                    Backend::Embedded(engine) => engine.info().slots as usize,
                                    Backend::Upstream { .. } => model.max_concurrency,
                                };
                                @let admitted = model.queue.counters.admitted.load(std::sync::atomic::Ordering::Relaxed);
                                @let wait_us = model.queue.counters.wait_sum_us.load(std::sync::atomic::Ordering::Relaxed);
                                tr data-model=(model.name) {
                                    td { (model.name) }
                                    td.num.busy { (running) }
                                    td.num { (capacity) }
                                    td.num.waiting { (waiting) }
                                    td.num { (admitted) }
                                    td.num { @if admitted > 0 { (format!("{:.1} ms", wait_us as f64 / admitted as f64 / 1_000.0)) } @else { "–" } }
                                    td.num.served data-cu=(model.counters.charged_cu()) { (Flops(model.counters.charged_cu() as i64)) }
                                }
                            }
                        }
                    }
                }
                p.muted { "Served: compute charged for each model's calls since this server started." }
                h3 { "Served per day" }
                (chart::columns(
                    "served-chart",
                    "Compute served per day, per model",
                    &format!(
                        "A column per UTC day over the last {} days, stacked by model; the tallest is {}. The table below has the numbers.",
                        seen.served_by_day.len(),
                        Flops(served_tallest as i64)
                    ),
                    &series,
                    &served_columns,
                    &Flops(served_tallest as i64).to_string(),
                ))
                div.table-wrap {
                    table #served-table {
                        caption { "Days with any use" }
                        thead { tr {
                            th { "Day" }
                            @for name in &series { th.num { (name) } }
                        } }
                        tbody {
                            @for (day, parts) in seen.served_by_day.iter().filter(|(_, parts)| parts.iter().any(|part| *part > 0)) {
                                tr data-day=(day_label(*day)) {
                                    td { (day_label(*day)) }
                                    @for part in parts { td.num data-cu=(part) { (Flops(*part as i64)) } }
                                }
                            }
                        }
                    }
                }
            }
            section.card #distribution aria-labelledby="distribution-title" {
                h2 #distribution-title { "How this period's compute is shared" }
                dl.figures {
                    dt { "Gini coefficient" }
                    dd #gini data-value=(distribution.gini) { (format!("{:.3}", distribution.gini)) }
                    dt { "Top 1 % used" }
                    dd #top1 data-value=(distribution.top_1pct_share) { (percent(distribution.top_1pct_share)) }
                    dt { "Top 10 % used" }
                    dd #top10 data-value=(distribution.top_10pct_share) { (percent(distribution.top_10pct_share)) }
                    dt { "The median person used" }
                    dd #median data-value=(distribution.median_cu) { (Flops(distribution.median_cu.round() as i64)) }
                    dt { "People" }
                    dd #people { (distribution.people) ", of whom " (distribution.people_active) " used compute" }
                    dt { "Used in all" }
                    dd #used data-cu=(distribution.used_cu) { (Flops(distribution.used_cu.min(i64::MAX as u128) as i64)) }
                }
                @if !seen.earlier.is_empty() {
                    h3 { "Earlier periods" }
                    div.table-wrap {
                        table #earlier {
                            caption { "Counting everyone with an account now" }
                            thead { tr { th { "Began" } th.num { "Gini" } th.num { "Top 10 %" } th.num { "Median" } th.num { "Used any" } } }
                            tbody {
                                @for (period, earlier) in &seen.earlier {
                                    tr data-period=(period) {
                                        td { (day_label(period * period_ms / DAY_MS)) }
                                        td.num.gini data-value=(earlier.gini) { (format!("{:.3}", earlier.gini)) }
                                        td.num { (percent(earlier.top_10pct_share)) }
                                        td.num { (Flops(earlier.median_cu.round() as i64)) }
                                        td.num { (earlier.people_active) }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            section.card aria-labelledby="lorenz-title" {
                h2 #lorenz-title { "Lorenz curve" }
                (chart::lorenz(
                    "lorenz-chart",
                    "Lorenz curve of compute used this period",
                    &format!("The further the curve sags below the diagonal, the less equal the sharing: {lorenz_words}."),
                    &distribution.lorenz,
                ))
                div.table-wrap {
                    table #lorenz-table {
                        caption { "The same curve, as numbers" }
                        thead { tr { th { "The poorest" } th.num { "used" } } }
                        tbody {
                            @for (index, share) in distribution.lorenz.iter().enumerate() {
                                tr { td { (index * 10) " % of people" } td.num data-value=(share) { (percent(*share)) } }
                            }
                        }
                    }
                }
            }
            section.card.wide #people aria-labelledby="people-title" {
                h2 #people-title { "People and pools" }
                form.row method="get" action="/admin" {
                    label { "Find by the start of a name"
                        input #search type="text" name="q" value=[seen.query.as_deref()] maxlength="128";
                    }
                    button #search-submit type="submit" { "Find" }
                }
                @if let Some(found) = &seen.found {
                    @match found {
                        Ok(views) => div #found { (account_table(views)) },
                        Err(message) => p.flash.refused #found { (message) },
                    }
                }
                h2 { "All, by when they were made" }
                (account_table(&seen.accounts))
                @if let Some(after) = seen.next_after {
                    p { a href={"/admin?after=" (after)} { "More" } }
                }
                div.forms {
                    form.stack method="post" action="/admin/accounts" {
                        h3 { "Create" }
                        label { "Name" input #create-name type="text" name="name" required maxlength="128" autocomplete="off"; }
                        label { "Kind"
                            select #create-kind name="kind" {
                                option value="person" { "person" }
                                option value="pool" { "pool" }
                            }
                        }
                        button #create-submit type="submit" { "Create" }
                    }
                    form.stack method="post" action="/admin/grant" {
                        h3 { "Grant" }
                        input type="hidden" name="id" value=(TransferId::random());
                        label { "To" input #grant-to type="text" name="name" required maxlength="128" autocomplete="off"; }
                        label { "How much (e.g. 5 PFLOP)" input #grant-amount type="text" name="amount" required maxlength="64" autocomplete="off"; }
                        button #grant-submit type="submit" { "Grant" }
                    }
                }
            }
            section.card.wide #policy aria-labelledby="policy-title" {
                h2 #policy-title { "The policy in force" }
                dl.figures {
                    dt { "Stipend" }
                    dd #policy-stipend { (Flops(policy.amount_cu() as i64)) " per person every " (format_duration(policy.period())) }
                    dt { "Carried over" }
                    dd { "at most " (Flops(policy.rollover_max_cu() as i64)) }
                    dt { "Models" }
                    dd {
                        @for model in web.gateway.models.values() {
                            (model.name) ": " (model.price_prompt_cu) " cu a prompt token"
                            @if model.price_cached_prompt_cu != model.price_prompt_cu {
                                " (" (model.price_cached_prompt_cu) " if cached)"
                            }
                            ", "
                            (model.price_completion_cu) " cu a completion token; "
                            @match seen.access.models.iter().find(|rule| rule.model == model.name) {
                                None => "open to everyone",
                                Some(rule) => span.restricted data-model=(model.name) {
                                    "only " (rule.accounts.len()) " accounts"
                                    @if !rule.groups.is_empty() { " and the groups " (rule.groups.join(", ")) }
                                },
                            }
                            br;
                        }
                    }
                }
            }
        },
    )
}

fn account_table(accounts: &[AccountView]) -> Markup {
    html! {
        div.table-wrap {
            table.accounts {
                thead { tr {
                    th { "Name" } th { "Kind" } th.num { "Balance" } th.num { "Available" } th.num { "Used this period" }
                } }
                tbody {
                    @for view in accounts {
                        @let used: u64 = view.usage.iter().map(|usage| usage.charged_cu).sum();
                        tr data-account=(view.name) {
                            td { (view.name) }
                            td { (view.kind) }
                            td.num.balance data-cu=(view.balance_cu) { (Flops(view.balance_cu)) }
                            td.num { (Flops(view.available_cu as i64)) }
                            td.num { (Flops(used as i64)) }
                        }
                    }
                }
            }
        }
    }
}
