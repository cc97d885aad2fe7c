//! Stipend's web pages, served by `stipend serve` itself: a person signs in with one of their
//! API keys and sees their budget (what they have, what it buys, when the next stipend comes),
//! what they used, their keys, and can give compute to someone else.
//!
//! Pages are HTML rendered on the server from compile-time-checked templates (maud), with one
//! small stylesheet and no JavaScript; charts are SVG drawn here (`chart`). The pages go through
//! the same services as the API and the CLI (the gateway's [`Budget`](stipend_ledger::Budget)
//! and key ring, the operator's [`Books`]), never around them to the store, and they show counts,
//! never content.

mod admin;
mod agents;
mod api;
pub mod chart;
pub mod limits;
pub mod me;
pub mod operator;
mod person;
pub mod session;
pub mod transparency;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use maud::{DOCTYPE, Markup, html};
use stipend_agents::Agents;
use stipend_gateway::Gateway;
use stipend_ledger::Books;

use crate::session::Sessions;

/// The stylesheet, served at [`STYLESHEET_PATH`].
const STYLESHEET: &str = include_str!("../assets/stipend.css");
/// Where the stylesheet is served.
const STYLESHEET_PATH: &str = "/static/stipend.css";
/// The pages' one script (it redraws the agents section while the page is open), and where it
/// is served.
const SCRIPT: &str = include_str!("../assets/live.js");
const SCRIPT_PATH: &str = "/static/live.js";

/// What the pages may do: the limits the config may set.
#[derive(Debug, Clone, PartialEq)]
pub struct WebOptions {
    /// How long a signed-in session lasts.
    pub session_ttl: Duration,
    /// Sessions held at once; past it, a sign-in ends the oldest.
    pub sessions_max: usize,
    /// How the public transparency report is made.
    pub transparency: transparency::TransparencyOptions,
}

impl Default for WebOptions {
    fn default() -> WebOptions {
        WebOptions {
            session_ttl: limits::SESSION_TTL_DEFAULT,
            sessions_max: limits::SESSIONS_MAX_DEFAULT,
            transparency: transparency::TransparencyOptions::default(),
        }
    }
}

/// The pages' state: the gateway (budgets, models, keys), the books, the agents (where they
/// run), and the sessions.
pub struct Web {
    gateway: Arc<Gateway>,
    books: Arc<dyn Books>,
    agents: Option<Arc<Agents>>,
    sessions: Sessions,
    transparency: transparency::TransparencyOptions,
}

impl Web {
    /// The pages over a gateway, its books and its agents.
    pub fn new(
        gateway: Arc<Gateway>,
        books: Arc<dyn Books>,
        agents: Option<Arc<Agents>>,
        options: WebOptions,
    ) -> Arc<Web> {
        Arc::new(Web {
            gateway,
            books,
            agents,
            sessions: Sessions::new(options.session_ttl, options.sessions_max),
            transparency: options.transparency,
        })
    }
}

/// The pages' routes: `/` (a person's page, or the sign-in form), `/admin` (the operator's), their
/// forms, the public `/transparency` page and `/v1/transparency`, and the stylesheet.
pub fn router(web: Arc<Web>) -> Router {
    Router::new()
        .route("/", get(person::home))
        .route("/signin", post(person::sign_in))
        .route("/signout", post(person::sign_out))
        .route("/keys", post(person::create_key))
        .route("/keys/{id}/revoke", post(person::revoke_key))
        .route("/keys/{id}/name", post(person::rename_key))
        .route("/give", post(person::give))
        .route("/export", get(person::export))
        .route("/close", post(person::close))
        .route("/admin", get(admin::home))
        .route("/admin/signin", post(admin::sign_in))
        .route("/admin/signout", post(admin::sign_out))
        .route("/admin/accounts", post(admin::create_account))
        .route("/admin/grant", post(admin::grant))
        .route("/approvals/{id}", post(agents::decide))
        .route("/fragments/agents", get(agents::fragment))
        .route("/v1/me/export", get(me::export_route))
        .route("/v1/me", axum::routing::delete(me::close_route))
        .route("/v1/transparency", get(transparency::route))
        .route("/transparency", get(transparency::page_route))
        .route(STYLESHEET_PATH, get(stylesheet))
        .route(SCRIPT_PATH, get(script))
        .merge(api::router())
        .layer(DefaultBodyLimit::max(limits::FORM_BYTES_MAX))
        .layer(axum::middleware::map_response(locked_down))
        .with_state(web)
}

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        STYLESHEET,
    )
        .into_response()
}

async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        SCRIPT,
    )
        .into_response()
}

/// Headers every page carries: nothing of it is cached (a page shows a person's budget and,
/// once, a new key), framed, sniffed or sent on as a referrer, and it loads nothing but this
/// server's stylesheet and script.
async fn locked_down(mut response: Response) -> Response {
    let headers = response.headers_mut();
    let defaults: [(header::HeaderName, &str); 5] = [
        (header::CACHE_CONTROL, "no-store"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'self'; img-src 'self'; script-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
    ];
    for (name, value) in defaults {
        if !headers.contains_key(&name) {
            headers.insert(name, HeaderValue::from_static(value));
        }
    }
    response
}

/// A whole page: `title`, the signed-in account's name if any (with the sign-out button), and
/// the body.
fn page(title: &str, who: Option<&str>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Stipend" }
                link rel="stylesheet" href=(STYLESHEET_PATH);
            }
            body {
                header.top {
                    a.brand href="/" { "Stipend" }
                    @if let Some(who) = who {
                        span.who { "Signed in as " strong #who { (who) } }
                        form.inline method="post" action="/signout" {
                            button.quiet #signout type="submit" { "Sign out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// What a sign-in form asks for: the person's key or the operator's.
struct SignInForm {
    /// The page's title and heading.
    title: &'static str,
    /// A line on where such a key comes from.
    intro: Markup,
    /// Where the form posts.
    action: &'static str,
    /// The field's label.
    label: &'static str,
}

/// A sign-in page, saying why the last try was refused if it was.
fn sign_in_form(status: StatusCode, form: SignInForm, message: Option<&str>) -> Response {
    respond(
        status,
        page(
            form.title,
            None,
            html! {
                section.card.wide.signin {
                    h2 { (form.title) }
                    p.muted { (form.intro) }
                    @if let Some(message) = message {
                        p.flash.refused #signin-refused { (message) }
                    }
                    form.stack method="post" action=(form.action) {
                        label { (form.label)
                            input #key type="password" name="key" autocomplete="current-password"
                                required maxlength=(limits::KEY_BYTES_MAX) spellcheck="false";
                        }
                        button #signin type="submit" { "Sign in" }
                    }
                }
            },
        ),
    )
}

/// A redirect to `location` that hands the browser its new session.
fn signed_in_redirect(web: &Web, headers: &HeaderMap, token: &str, location: &str) -> Response {
    let mut response = axum::response::Redirect::to(location).into_response();
    let cookie = session::cookie(token, web.sessions.ttl(), session::over_tls(headers));
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// Makes the browser forget its session.
fn clear_cookie(response: &mut Response, headers: &HeaderMap) {
    if let Ok(value) = HeaderValue::from_str(&session::cookie_cleared(session::over_tls(headers))) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
}

/// A page with a status.
fn respond(status: StatusCode, markup: Markup) -> Response {
    (status, markup).into_response()
}

/// A page that says a request was refused, and why.
fn refusal(status: StatusCode, message: &str) -> Response {
    respond(
        status,
        page(
            "Refused",
            None,
            html! {
                section.card.wide {
                    h2 { "Refused" }
                    p.flash.refused #refusal { (message) }
                    p { a href="/" { "Back to Stipend" } }
                }
            },
        ),
    )
}
