//! The public transparency report on the real binary: made by the server as a period ends, kept,
//! and published the same at `GET /v1/transparency` (no key), with `?period_start=`, on the
//! `/transparency` page, by `stipend report`, and after a restart; its numbers near what the test
//! knows each person used; bad periods refused in the OpenAI shape.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Env, Server, budget, echo_call};
use serde_json::Value;

/// The period: short, so that one ends while the test runs.
const PERIOD_MS: i64 = 5_000;
/// Each person's use is clipped here: above what any of them uses.
const CLIP_CU: u64 = 200_000;

async fn config() -> String {
    let upstream = stipend_testkit::spawn().await.unwrap();
    format!(
        r#"listen = "127.0.0.1:0"
data_dir = "data"
# A large ε, so that the numbers land near the truth and the test can say so.
transparency_epsilon = 100
transparency_clip_cu = {CLIP_CU}
[stipend]
amount = "10 PFLOP"
period = "5s"
rollover_max = "0"
[[models]]
name = "echo"
backend = "openai"
base_url = "{upstream}"
params = "8B"
timeout = "5s"
"#
    )
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The Gini coefficient by its definition: the mean absolute difference over twice the mean.
fn gini(values: &[u64]) -> f64 {
    let n = values.len() as f64;
    let total: f64 = values.iter().map(|&v| v as f64).sum();
    if total == 0.0 {
        return 0.0;
    }
    let differences: f64 = values
        .iter()
        .flat_map(|&a| values.iter().map(move |&b| (a as f64 - b as f64).abs()))
        .sum();
    differences / (2.0 * n * total)
}

/// `value` is within four error bars of `truth` (a miss has a chance of 0.05⁴ for each number),
/// give or take `slack`: a count's bar may be 0 when its noise is 0 in over 95 % of draws, and
/// then the noise is ±1 or ±2 (under 4 % and 0.002 % of draws at this ε).
fn near(estimate: &Value, truth: f64, slack: f64) {
    let value = estimate["value"].as_f64().unwrap();
    let error95 = estimate["error95"].as_f64().unwrap();
    assert!(
        (value - truth).abs() <= 4.0 * error95 + slack + 1e-9,
        "{estimate} is far from {truth}"
    );
}

async fn get(http: &reqwest::Client, url: &str) -> (u16, Value) {
    let response = http.get(url).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_period_report_is_made_once_and_published_everywhere_the_same() {
    let env = Env::new(&config().await);
    let keys: Vec<String> = (0..12)
        .map(|index| env.person_with_key(&format!("person{index}")))
        .collect();
    let server = Server::start(&env);
    let http = reqwest::Client::new();
    let root = server.base.trim_end_matches("/v1").to_string();

    // Begin at the start of a period, so that every call lands in it.
    let period_start_ms = (now_ms() / PERIOD_MS + 1) * PERIOD_MS;
    tokio::time::sleep(Duration::from_millis(
        (period_start_ms - now_ms()) as u64 + 50,
    ))
    .await;
    // The i-th person makes i calls; the first none.
    for (index, key) in keys.iter().enumerate() {
        for _ in 0..index {
            assert_eq!(echo_call(&http, &server.base, key).await, 200);
        }
    }
    let mut used = Vec::new();
    for key in &keys {
        let budget = budget(&http, &server.base, key).await;
        used.push(
            budget["models"][0]["usage_this_period"]["charged_cu"]
                .as_u64()
                .unwrap(),
        );
    }
    assert!(
        now_ms() < period_start_ms + PERIOD_MS,
        "the calls took longer than a period; the test cannot tell which period they fell in"
    );
    assert!(used.iter().all(|&cu| cu < CLIP_CU));
    let used_total: u64 = used.iter().sum();

    // The public JSON, with no key, once the period has ended and the server made its report.
    let url = format!("{}/transparency", server.base);
    tokio::time::sleep(Duration::from_millis(
        (period_start_ms + PERIOD_MS - now_ms()).max(0) as u64,
    ))
    .await;
    let started = std::time::Instant::now();
    let (first, report) = loop {
        let (status, report) = get(&http, &url).await;
        if status == 200
            && report["period_start"] == stipend_ledger::units::format_utc(period_start_ms).as_str()
        {
            break (status, report);
        }
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "no report for the period: {status} {report}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(first, 200);
    assert_eq!(report["object"], "transparency_report");
    assert_eq!(report["epsilon"], 100.0);
    assert_eq!(report["clip_cu"], CLIP_CU);
    assert_eq!(
        report["period_end"],
        stipend_ledger::units::format_utc(period_start_ms + PERIOD_MS)
    );
    near(&report["people_with_stipend"], 12.0, 2.0);
    near(&report["people_active"], 11.0, 2.0);
    near(&report["used_cu"], used_total as f64, 2.0);
    near(&report["models"][0]["used_cu"], used_total as f64, 2.0);
    assert_eq!(report["models"][0]["model"], "echo");
    // Everyone was granted the whole stipend, clipped.
    near(&report["granted_cu"], (12 * CLIP_CU) as f64, 2.0);
    near(&report["gini"], gini(&used), 0.0);
    let lorenz = report["lorenz"].as_array().unwrap();
    assert_eq!(lorenz.len(), 11);
    assert_eq!(lorenz[0]["value"], 0.0);
    assert_eq!(lorenz[10]["value"], 1.0);
    let mut sorted = used.clone();
    sorted.sort_unstable();
    // The poorest half: the six lightest users, exactly (12 people).
    let half: u64 = sorted[..6].iter().sum();
    near(&lorenz[5], half as f64 / used_total as f64, 0.0);
    near(&report["median_cu"], sorted[5] as f64, 2.0);
    for key in ["top_1pct_share", "top_10pct_share"] {
        assert!(report[key]["value"].as_f64().unwrap() <= 1.0, "{report}");
    }
    let spent = &report["privacy_budget"];
    assert!(spent["reports"].as_u64().unwrap() >= 1, "{report}");
    assert_eq!(
        spent["epsilon_spent"].as_f64().unwrap(),
        100.0 * spent["reports"].as_f64().unwrap()
    );
    let shares: f64 = report["budget"]
        .as_array()
        .unwrap()
        .iter()
        .map(|share| share["epsilon"].as_f64().unwrap())
        .sum();
    assert!((shares - 100.0).abs() < 1e-9, "{report}");

    // Asked again, for that period by its start: the same numbers, no new noise.
    let by_start = |report: &Value| {
        let mut report = report.clone();
        report.as_object_mut().unwrap().remove("privacy_budget");
        report
    };
    let asked = format!(
        "{url}?period_start={}",
        stipend_ledger::units::format_utc(period_start_ms)
    );
    let (status, again) = get(&http, &asked).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(by_start(&again), by_start(&report));

    // A period not ended, a time that is no period's start, and nonsense: refused.
    let (status, refused) = get(
        &http,
        &format!(
            "{url}?period_start={}",
            stipend_ledger::units::format_utc((now_ms() / PERIOD_MS + 1) * PERIOD_MS)
        ),
    )
    .await;
    assert_eq!(status, 404, "{refused}");
    assert_eq!(refused["error"]["code"], "not_found");
    let (status, refused) = get(
        &http,
        &format!(
            "{url}?period_start={}",
            stipend_ledger::units::format_utc(period_start_ms + 1_000)
        ),
    )
    .await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["param"], "period_start");
    let (status, refused) = get(&http, &format!("{url}?period_start=yesterday")).await;
    assert_eq!(status, 400, "{refused}");
    // A query string that does not parse: the same shape.
    let (status, refused) = get(&http, &format!("{url}?period_start=a&period_start=b")).await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["param"], "period_start");
    // Long before the server ran: no report was made, and none is made now.
    let (status, refused) = get(&http, &format!("{url}?period_start=2020-01-01T00:00:00Z")).await;
    assert_eq!(status, 404, "{refused}");

    // The page: the same numbers, with the curve drawn, for anyone.
    let page = http
        .get(format!(
            "{root}/transparency?period_start={}",
            stipend_ledger::units::format_utc(period_start_ms)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("lorenz-chart"), "{html}");
    assert!(
        html.contains(&format!(
            "data-value=\"{}\"",
            report["people_with_stipend"]["value"]
        )),
        "{html}"
    );
    assert!(html.contains(&format!("{:.3}", report["gini"]["value"].as_f64().unwrap())));

    // The CLI, through the running server: the same report.
    let start = stipend_ledger::units::format_utc(period_start_ms);
    let cli = env.json(&["report", "--period", &start]);
    assert_eq!(cli["result"], "report");
    assert_eq!(cli["published"]["gini"], report["gini"]);
    assert_eq!(cli["published"]["lorenz"], report["lorenz"]);
    let text = env.run(&["report", "--period", &start]);
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains("gini") && text.contains(&start), "{text}");

    // After a restart, still the same.
    drop(server);
    let server = Server::start(&env);
    let (status, after) = get(
        &http,
        &format!("{}/transparency?period_start={start}", server.base),
    )
    .await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(by_start(&after), by_start(&report));
}
