//! The public transparency report (`stipend_report::transparency`) as Stipend publishes it: the
//! last complete period gathered from the books, made once with noise, kept in the store, and
//! shown at `GET /v1/transparency` (JSON, no key), at `/transparency` (a page) and by `stipend
//! report`. A kept report is never made again, so asking twice returns the same numbers and
//! spends no more of the privacy budget.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use stipend_ledger::units::{format_utc, parse_utc};
use stipend_ledger::{AccountId, AccountKind, Books, KeptReport, LedgerError, StoreError};
use stipend_report::noise::OsRandomness;
use stipend_report::transparency::{self, Estimate, Period, PersonPeriod, Report, ReportError};

use crate::api::AdminError;
use crate::limits::PEOPLE_SCANNED_PAGE;
use crate::{Web, chart, page};

/// The report's settings, from the config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TransparencyOptions {
    /// The privacy budget each period's report spends (`transparency_epsilon`).
    pub epsilon: f64,
    /// Each person's compute is clipped at this (`transparency_clip_cu`); `None`: the stipend
    /// plus the rollover cap, the most a person's own stipend lets them spend in a period.
    pub clip_cu: Option<u64>,
}

/// The default ε of a report.
pub const EPSILON_DEFAULT: f64 = 1.0;

impl Default for TransparencyOptions {
    fn default() -> TransparencyOptions {
        TransparencyOptions {
            epsilon: EPSILON_DEFAULT,
            clip_cu: None,
        }
    }
}

impl TransparencyOptions {
    /// The clipping bound in effect under `policy`.
    pub fn clip_cu(&self, policy: &stipend_ledger::StipendPolicy) -> u64 {
        self.clip_cu
            .unwrap_or_else(|| policy.amount_cu().saturating_add(policy.rollover_max_cu()))
            .max(1)
    }
}

/// A report as published: the period in words, when it was made, how, and the numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Published {
    /// Always `transparency_report`.
    pub object: String,
    /// When the period began (RFC 3339, UTC).
    pub period_start: String,
    /// When it ended.
    pub period_end: String,
    /// When the report was made.
    pub made_at: String,
    /// How the numbers were made private, in a sentence.
    pub method: String,
    /// The numbers.
    #[serde(flatten)]
    pub report: Report,
}

/// Why no report can be shown.
#[derive(Debug, thiserror::Error)]
pub enum TransparencyError {
    /// The time asked for is not when a period began.
    #[error("{0} is not the start of a stipend period; periods begin at {1}")]
    NotAPeriodStart(String, String),
    /// The period has not ended yet.
    #[error("the period that began at {0} has not ended; its report is made when it does")]
    NotEnded(String),
    /// No report was made for that period (the server was not running when it ended).
    #[error("no report was made for the period that began at {0}")]
    NotKept(String),
    /// The settings are not ones a report can be made with.
    #[error(transparent)]
    Settings(#[from] ReportError),
    /// The books could not be read.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<TransparencyError> for AdminError {
    fn from(error: TransparencyError) -> AdminError {
        match error {
            TransparencyError::NotAPeriodStart(..) => AdminError::Invalid {
                message: error.to_string(),
                param: Some("period_start"),
            },
            TransparencyError::NotEnded(_) | TransparencyError::NotKept(_) => {
                AdminError::NotFound(error.to_string())
            }
            TransparencyError::Settings(_) | TransparencyError::Store(_) => {
                tracing::warn!(%error, "the transparency report cannot be made");
                AdminError::Unavailable
            }
            TransparencyError::Ledger(error) => AdminError::from(error),
        }
    }
}

/// Makes reports one at a time in this process, so that two requests at a period's end make one.
static MAKING: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// The kept report of the period that began at `period_start` (RFC 3339, as reports show it),
/// or of the last complete period when `None`; the last complete period's is made and kept
/// first if it was not yet. Returns its JSON as kept.
pub fn report(
    books: &dyn Books,
    options: &TransparencyOptions,
    period_start: Option<&str>,
) -> Result<String, TransparencyError> {
    let policy = books.policy();
    let last = policy.period_index(books.now_ms()) - 1;
    let period = match period_start {
        None => last,
        Some(text) => {
            let ms = parse_utc(text.trim()).ok_or_else(|| {
                TransparencyError::NotAPeriodStart(
                    text.to_string(),
                    format_utc(policy.period_start_ms(last)),
                )
            })?;
            let index = policy.period_index(ms);
            if policy.period_start_ms(index) != ms {
                return Err(TransparencyError::NotAPeriodStart(
                    text.to_string(),
                    format_utc(policy.period_start_ms(index)),
                ));
            }
            index
        }
    };
    let start_ms = policy.period_start_ms(period);
    if period > last {
        return Err(TransparencyError::NotEnded(format_utc(start_ms)));
    }
    let store = books.store();
    if let Some(body) = store.report(start_ms)? {
        return Ok(body);
    }
    if period < last {
        return Err(TransparencyError::NotKept(format_utc(start_ms)));
    }
    let _making = MAKING.lock();
    if let Some(body) = store.report(start_ms)? {
        return Ok(body);
    }
    let gathered = last_period(books)?;
    let clip_cu = options.clip_cu(policy);
    let report = transparency::publish(
        &gathered,
        options.epsilon,
        clip_cu,
        &mut OsRandomness::new(),
    )?;
    let made_at_ms = books.now_ms();
    let published = Published {
        object: "transparency_report".to_string(),
        period_start: format_utc(gathered.start_ms),
        period_end: format_utc(gathered.end_ms),
        made_at: format_utc(made_at_ms),
        method: format!(
            "Each person's compute used and granted is clipped at {clip_cu} cu; every number \
             carries discrete Laplace noise, with ε = {} split across the numbers as `budget` \
             shows; error95 is each number's 95 % error bar.",
            options.epsilon
        ),
        report,
    };
    let body = serde_json::to_string(&published)
        .map_err(|error| StoreError::Io(format!("cannot write the report: {error}")))?;
    let kept = store.keep_report(&KeptReport {
        period_start_ms: start_ms,
        epsilon: options.epsilon,
        made_at_ms,
        body,
    })?;
    tracing::info!(
        period_start = %format_utc(start_ms),
        epsilon = options.epsilon,
        "transparency report made and kept"
    );
    Ok(kept)
}

/// The privacy budget spent so far: the sum of every kept report's ε, and how many there are.
pub fn budget_spent(books: &dyn Books) -> Result<(f64, usize), StoreError> {
    let reports = books.store().reports()?;
    Ok((
        reports.iter().map(|(_, epsilon)| epsilon).sum(),
        reports.len(),
    ))
}

/// The last complete period, from one pass over every account: each person's compute used at
/// each model (their agents' included), and granted (the stipend, and the operator's grants in
/// the period, from the operator log).
pub fn last_period(books: &dyn Books) -> Result<Period, TransparencyError> {
    let policy = books.policy();
    let period = policy.period_index(books.now_ms()) - 1;
    let start_ms = policy.period_start_ms(period);
    let end_ms = policy.period_start_ms(period + 1);
    let mut models: Vec<(AccountId, String)> = Vec::new();
    let mut people: Vec<AccountId> = Vec::new();
    // Spending by each person (and by each agent, for its person), per sink.
    let mut used: HashMap<AccountId, Vec<(AccountId, u64)>> = HashMap::new();
    crate::operator::for_each_view(books, |view| {
        let owner = match view.kind {
            AccountKind::Sink => {
                let model = view
                    .name
                    .strip_prefix(stipend_ledger::SINK_NAME_PREFIX)
                    .unwrap_or(&view.name);
                models.push((view.id, model.to_string()));
                return;
            }
            AccountKind::Person => {
                people.push(view.id);
                view.id
            }
            AccountKind::Agent => match agent_person(&view.name) {
                Some(person) => person,
                None => return,
            },
            // A closed account asked to be forgotten: it is counted no more.
            AccountKind::Pool | AccountKind::Issuer | AccountKind::Closed => return,
        };
        used.entry(owner).or_default().extend(
            view.last_period
                .iter()
                .map(|usage| (usage.sink, usage.charged_cu)),
        );
    })?;
    let granted = grants_in(books, start_ms, end_ms)?;
    let model_index: HashMap<AccountId, usize> = models
        .iter()
        .enumerate()
        .map(|(index, (sink, _))| (*sink, index))
        .collect();
    let people = people
        .into_iter()
        .map(|person| {
            let mut used_cu = vec![0u64; models.len()];
            for (sink, cu) in used.get(&person).into_iter().flatten() {
                if let Some(&index) = model_index.get(sink) {
                    used_cu[index] = used_cu[index].saturating_add(*cu);
                }
            }
            PersonPeriod {
                used_cu,
                granted_cu: policy
                    .amount_cu()
                    .saturating_add(granted.get(&person).copied().unwrap_or(0)),
            }
        })
        .collect();
    Ok(Period {
        start_ms,
        end_ms,
        models: models.into_iter().map(|(_, model)| model).collect(),
        people,
    })
}

/// The person an agent account works for, from its name (`agent:<person id>:<run>`).
fn agent_person(name: &str) -> Option<AccountId> {
    let rest = name.strip_prefix("agent:")?;
    let (person, _) = rest.split_once(':')?;
    person.parse().ok().map(AccountId)
}

/// The operator's grants to each account from `start_ms` to `end_ms`, from the operator log.
fn grants_in(
    books: &dyn Books,
    start_ms: i64,
    end_ms: i64,
) -> Result<HashMap<AccountId, u64>, StoreError> {
    let store = books.store();
    let mut granted: HashMap<AccountId, u64> = HashMap::new();
    let mut before = None;
    loop {
        let page = store.actions(before, PEOPLE_SCANNED_PAGE)?;
        let Some((last_seq, _)) = page.last() else {
            break;
        };
        before = Some(*last_seq);
        for (_, action) in &page {
            if action.at_ms >= start_ms
                && action.at_ms < end_ms
                && action.action == "grant"
                && let (Some(account), Some(amount_cu)) = (action.account, action.amount_cu)
            {
                let sum = granted.entry(account).or_default();
                *sum = sum.saturating_add(amount_cu);
            }
        }
        // Newest first: once past the period's start, nothing earlier counts.
        if page.len() < PEOPLE_SCANNED_PAGE
            || page.iter().all(|(_, action)| action.at_ms < start_ms)
        {
            break;
        }
    }
    Ok(granted)
}

/// `?period_start=` on the report's routes.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Asked {
    period_start: Option<String>,
}

/// A query string that is not `period_start=…` once.
fn bad_query() -> AdminError {
    AdminError::Invalid {
        message: "The query string is not `period_start=START` (RFC 3339, as reports show it)."
            .to_string(),
        param: Some("period_start"),
    }
}

/// A kept report, read back.
pub fn read_back(body: &str) -> Result<Published, StoreError> {
    serde_json::from_str(body)
        .map_err(|error| StoreError::Io(format!("a kept report does not read back: {error}")))
}

/// The kept report with the privacy budget spent so far beside it.
fn with_budget(books: &dyn Books, body: &str) -> Result<Value, TransparencyError> {
    let mut value: Value = serde_json::from_str(body)
        .map_err(|error| StoreError::Io(format!("a kept report does not read back: {error}")))?;
    let (spent, reports) = budget_spent(books)?;
    if let Value::Object(fields) = &mut value {
        fields.insert(
            "privacy_budget".to_string(),
            serde_json::json!({"epsilon_spent": spent, "reports": reports}),
        );
    }
    Ok(value)
}

/// `GET /v1/transparency`: public, no key.
pub(crate) async fn route(
    State(web): State<Arc<Web>>,
    asked: Result<Query<Asked>, QueryRejection>,
) -> Response {
    let Ok(Query(asked)) = asked else {
        return bad_query().into_response();
    };
    let result = tokio::task::spawn_blocking(move || {
        let books = web.books.as_ref();
        let body = report(books, &web.transparency, asked.period_start.as_deref())?;
        with_budget(books, &body)
    })
    .await;
    match result {
        Ok(Ok(value)) => Json(value).into_response(),
        Ok(Err(error)) => AdminError::from(error).into_response(),
        Err(_) => AdminError::Unavailable.into_response(),
    }
}

/// `GET /transparency`: the report as a page, with the Lorenz curve drawn.
pub(crate) async fn page_route(
    State(web): State<Arc<Web>>,
    asked: Result<Query<Asked>, QueryRejection>,
) -> Response {
    let Ok(Query(asked)) = asked else {
        return bad_query().into_response();
    };
    let result = tokio::task::spawn_blocking(move || {
        let books = web.books.as_ref();
        let body = report(books, &web.transparency, asked.period_start.as_deref())?;
        let published = read_back(&body)?;
        let kept = books.store().reports()?;
        Ok::<_, TransparencyError>((published, kept))
    })
    .await;
    match result {
        Ok(Ok((published, kept))) => report_page(&published, &kept).into_response(),
        Ok(Err(error)) => {
            let message = error.to_string();
            let status = AdminError::from(error).status();
            (
                status,
                page(
                    "Transparency",
                    None,
                    html! { section.card { h2 { "Transparency" } p.flash.refused #refused { (message) } } },
                ),
            )
                .into_response()
        }
        Err(_) => AdminError::Unavailable.into_response(),
    }
}

fn percent(estimate: &Estimate<f64>) -> String {
    format!(
        "{:.1} % ± {:.1}",
        estimate.value * 100.0,
        estimate.error95 * 100.0
    )
}

fn count(estimate: &Estimate<u64>) -> String {
    format!("{} ± {}", estimate.value, estimate.error95)
}

fn report_page(published: &Published, kept: &[(i64, f64)]) -> Markup {
    let report = &published.report;
    let lorenz: Vec<f64> = report.lorenz.iter().map(|point| point.value).collect();
    let lorenz_words = report
        .lorenz
        .iter()
        .enumerate()
        .map(|(index, point)| format!("the poorest {} % used {}", index * 10, percent(point)))
        .collect::<Vec<_>>()
        .join("; ");
    let spent: f64 = kept.iter().map(|(_, epsilon)| epsilon).sum();
    page(
        "Transparency",
        None,
        html! {
            section.card.wide {
                h2 { "How equally compute was shared" }
                p { "The period from " strong #period-start { (published.period_start) } " to " (published.period_end) "." }
                p.hint #method { (published.method) }
                p.hint { "The noise protects each person; the error bars say how much of the picture it hides. They shrink as the population grows: with a few dozen people most of it is hidden, with tens of thousands little." }
                p.hint { "Privacy budget spent by every report so far: ε = " span #budget-spent { (format!("{spent:.2}")) } " over " (kept.len()) " reports." }
            }
            section.card aria-labelledby="numbers-title" {
                h2 #numbers-title { "The numbers" }
                div.table-wrap {
                    table #numbers {
                        thead { tr { th { "What" } th.num { "Value" } th.num { "± (95 %)" } } }
                        tbody {
                            tr #row-people { td { "People with a stipend" } td.num data-value=(report.people_with_stipend.value) { (report.people_with_stipend.value) } td.num { (report.people_with_stipend.error95) } }
                            tr #row-active { td { "People who used compute" } td.num data-value=(report.people_active.value) { (report.people_active.value) } td.num { (report.people_active.error95) } }
                            tr #row-granted { td { "Compute granted (cu)" } td.num data-value=(report.granted_cu.value) { (report.granted_cu.value) } td.num { (report.granted_cu.error95) } }
                            tr #row-used { td { "Compute used (cu)" } td.num data-value=(report.used_cu.value) { (report.used_cu.value) } td.num { (report.used_cu.error95) } }
                            @for model in &report.models {
                                tr { td { "… at " (model.model) } td.num { (model.used_cu.value) } td.num { (model.used_cu.error95) } }
                            }
                            tr #row-gini { td { "Gini coefficient" } td.num data-value=(report.gini.value) { (format!("{:.3}", report.gini.value)) } td.num { (format!("{:.3}", report.gini.error95)) } }
                            tr #row-top10 { td { "Share used by the top 10 %" } td.num data-value=(report.top_10pct_share.value) { (percent(&report.top_10pct_share)) } td.num { } }
                            tr #row-top1 { td { "Share used by the top 1 %" } td.num data-value=(report.top_1pct_share.value) { (percent(&report.top_1pct_share)) } td.num { } }
                            tr #row-median { td { "Median person's use (cu)" } td.num data-value=(report.median_cu.value) { (report.median_cu.value) } td.num { (report.median_cu.error95) } }
                        }
                    }
                }
                p.hint { "Each person's use is clipped at " (report.clip_cu) " cu; " (count(&report.people_with_stipend)) " people." }
            }
            section.card aria-labelledby="lorenz-title" {
                h2 #lorenz-title { "Lorenz curve" }
                (chart::lorenz(
                    "lorenz-chart",
                    "Lorenz curve of compute used in the period",
                    &format!("The further the curve sags below the diagonal, the less equal the sharing: {lorenz_words}."),
                    &lorenz,
                ))
                div.table-wrap {
                    table #lorenz-table {
                        caption { "The same curve, as numbers" }
                        thead { tr { th { "The poorest" } th.num { "used" } } }
                        tbody {
                            @for (index, point) in report.lorenz.iter().enumerate() {
                                tr { td { (index * 10) " % of people" } td.num data-value=(point.value) { (percent(point)) } }
                            }
                        }
                    }
                }
            }
            @if kept.len() > 1 {
                section.card aria-labelledby="earlier-title" {
                    h2 #earlier-title { "Every report" }
                    ul #reports {
                        @for (start_ms, epsilon) in kept.iter().rev() {
                            li { a href={"/transparency?period_start=" (format_utc(*start_ms))} { (format_utc(*start_ms)) } " (ε = " (epsilon) ")" }
                        }
                    }
                }
            }
        },
    )
}
