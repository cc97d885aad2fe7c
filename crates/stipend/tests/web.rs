//! The web pages in a real browser: Debian's headless Chromium, driven through its chromedriver
//! (WebDriver) by fantoccini, against the real `stipend serve` on loopback with the fake
//! upstream behind it. A person signs in with a key and uses the page as they would; what the
//! page says is checked against what the API says.
//!
//! Screenshots of the pages are written to the test's temporary directory, or, with
//! `STIPEND_SCREENSHOTS=1` (`make screenshots`), to `docs/screenshots/`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Env, Server, budget, echo_call};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

/// Debian's Chromium and its driver (`scripts/setup.sh` installs them).
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A headless Chromium behind its own chromedriver, stopped on drop.
struct Browser {
    client: Option<Client>,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        assert!(
            std::path::Path::new(CHROMEDRIVER).exists(),
            "{CHROMEDRIVER} is missing: run `make test` (scripts/setup.sh installs chromium-driver)"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let profile = tempfile::tempdir().unwrap();
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".to_string(),
            json!({
                "binary": CHROMIUM,
                // As this machine runs it: no sandbox (tests may run as root), and nothing that
                // reaches for the network beyond loopback.
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(capabilities.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(client) => break client,
                Err(error) => {
                    assert!(
                        Instant::now() < deadline,
                        "chromedriver did not start: {error}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        client.set_window_size(1100, 1500).await.unwrap();
        Browser {
            client: Some(client),
            driver,
            _profile: profile,
        }
    }

    fn client(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    async fn close(mut self) {
        if let Some(client) = self.client.take() {
            let _ = client.close().await;
        }
    }

    /// The text of the element `css` selects.
    async fn text(&self, css: &str) -> String {
        self.client()
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|error| panic!("no {css} on the page: {error}"))
            .text()
            .await
            .unwrap()
    }

    /// An attribute of the element `css` selects.
    async fn attr(&self, css: &str, name: &str) -> String {
        self.client()
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|error| panic!("no {css} on the page: {error}"))
            .attr(name)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{css} has no {name}"))
    }

    /// Types `text` into the field `css` selects.
    async fn fill(&self, css: &str, text: &str) {
        let field = self.client().find(Locator::Css(css)).await.unwrap();
        field.clear().await.unwrap();
        field.send_keys(text).await.unwrap();
    }

    /// Clicks what `css` selects and waits for the page it leads to.
    async fn click(&self, css: &str) {
        let before = self.client().find(Locator::Css("html")).await.unwrap();
        self.client()
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|error| panic!("no {css} on the page: {error}"))
            .click()
            .await
            .unwrap();
        // The old page's root goes stale once the next page has replaced it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while before.tag_name().await.is_ok() {
            assert!(Instant::now() < deadline, "clicking {css} led nowhere");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn screenshot(&self, name: &str) {
        let png = self.client().screenshot().await.unwrap();
        let dir = if std::env::var_os("STIPEND_SCREENSHOTS").is_some() {
            stipend_testkit::repo_path("docs/screenshots")
        } else {
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("screenshots")
        };
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// 8B parameters: 16 cu a token.
const CONFIG_MODELS: &str = r#"
[[models]]
name = "echo"
backend = "openai"
base_url = "UPSTREAM"
params = "8B"
timeout = "5s"
"#;

async fn config() -> String {
    let upstream = stipend_testkit::spawn().await.unwrap();
    format!(
        "{}{}",
        common::CONFIG,
        CONFIG_MODELS.replace("UPSTREAM", &upstream)
    )
}

/// A page served on another origin (`localhost`, while Stipend is reached as `127.0.0.1`), whose
/// form gives alice's compute to bob as soon as it loads: what a cross-site request forgery
/// would try. Returns its URL.
async fn hostile_page(stipend: &str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let body = format!(
        "<!doctype html><html><body><form id=f method=post action=\"{stipend}/give\">\
         <input name=to value=bob><input name=amount value=\"5 TFLOP\">\
         <input name=id value=00000000000000000000000000000bad></form>\
         <script>document.getElementById('f').submit()</script></body></html>"
    );
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 8192];
                let _ = socket.read(&mut buffer).await;
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    format!("http://localhost:{port}/")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_signs_in_and_sees_spends_gives_and_manages_keys() {
    let env = Env::new(&config().await);
    let alice = env.person_with_key("alice");
    let bob = env.person_with_key("bob");
    let server = Server::start(&env);
    let api = server.base.clone();
    let site = api.trim_end_matches("/v1").to_string();
    let http = reqwest::Client::new();
    let browser = Browser::start().await;
    let page = browser.client();

    // A wrong key is refused, and nothing is signed in.
    page.goto(&format!("{site}/")).await.unwrap();
    browser.screenshot("sign-in").await;
    browser
        .fill("#key", "sk-stipend-0123456789abcdef-not-a-real-secret")
        .await;
    browser.click("#signin").await;
    assert!(
        browser
            .text("#signin-refused")
            .await
            .contains("not accepted"),
        "{}",
        page.source().await.unwrap()
    );
    assert!(page.find(Locator::Css("#available")).await.is_err());

    // Alice signs in with her key and sees the balance the API reports.
    browser.fill("#key", &alice).await;
    browser.click("#signin").await;
    assert_eq!(browser.text("#who").await, "alice");
    let before = budget(&http, &api, &alice).await;
    assert_eq!(
        browser.attr("#available", "data-cu").await,
        before["available_cu"].to_string()
    );
    assert_eq!(browser.text("#available").await, "10 PFLOP");
    assert!(
        browser
            .text("#next-stipend")
            .await
            .starts_with("10 PFLOP, in ")
    );
    assert_eq!(browser.text("tr[data-model=echo] .calls").await, "0");

    // The session cookie is locked down.
    let cookie = page.get_named_cookie("stipend_session").await.unwrap();
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(format!("{:?}", cookie.same_site()), "Some(Strict)");
    // With it, the page's download is the person's own export; without it, nothing.
    assert_eq!(browser.attr("#export", "href").await, "/export");
    let export: Value = http
        .get(format!("{site}/export"))
        .header("cookie", format!("stipend_session={}", cookie.value()))
        // What the browser sends for a link on the same site; another site's gets 403.
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(export["account"]["name"], "alice", "{export}");
    let anonymous = http
        .get(format!("{site}/export"))
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let cross_site = http
        .get(format!("{site}/export"))
        .header("cookie", format!("stipend_session={}", cookie.value()))
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(cross_site.status(), 403);

    // A call through the API shows in the chart and the table after a reload.
    let answer: Value = http
        .post(format!("{api}/chat/completions"))
        .bearer_auth(&alice)
        .json(&json!({"model": "echo", "max_tokens": 8,
                      "messages": [{"role": "user", "content": "hello from the page test"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        answer["usage"]["total_tokens"].as_u64().unwrap() > 0,
        "{answer}"
    );
    let spent = budget(&http, &api, &alice).await;
    let charged = spent["models"][0]["usage_this_period"]["charged_cu"]
        .as_u64()
        .unwrap();
    assert!(charged > 0);
    page.refresh().await.unwrap();
    assert_eq!(browser.text("tr[data-model=echo] .calls").await, "1");
    assert_eq!(
        browser
            .attr("tr[data-model=echo] .compute", "data-cu")
            .await,
        charged.to_string()
    );
    assert_eq!(
        browser
            .attr("#usage-chart g.bar[data-label=echo]", "data-value")
            .await,
        charged.to_string()
    );
    assert_eq!(
        browser.attr("#available", "data-cu").await,
        spent["available_cu"].to_string()
    );
    // And in the days: today's column and row hold the call.
    let today = spent["usage_by_day"][0]["day"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        spent["usage_by_day"].as_array().unwrap().len(),
        1,
        "{spent}"
    );
    assert_eq!(spent["usage_by_day"][0]["charged_cu"], charged);
    assert_eq!(
        browser
            .attr(
                &format!("#daily-chart g.column[data-label=\"{today}\"]"),
                "data-value"
            )
            .await,
        charged.to_string()
    );
    assert_eq!(
        browser
            .text(&format!("#daily-table tr[data-day=\"{today}\"] .calls"))
            .await,
        "1"
    );
    assert_eq!(
        page.find_all(Locator::Css("#daily-chart g.column"))
            .await
            .unwrap()
            .len(),
        31
    );
    browser.screenshot("person").await;

    // A new key, named, is shown once, works, can be renamed, and can be revoked.
    browser.fill("#key-name", "the script").await;
    browser.click("#create-key").await;
    let new_key = browser.text("#new-key").await;
    assert!(new_key.starts_with("sk-stipend-"), "{new_key}");
    assert_eq!(budget(&http, &api, &new_key).await["account"], "alice");
    let new_id = new_key.split('-').nth(2).unwrap().to_string();
    page.refresh().await.unwrap();
    assert!(
        page.find(Locator::Css("#new-key")).await.is_err(),
        "a new key is shown only once"
    );
    assert_eq!(
        page.find_all(Locator::Css("#keys-table tbody tr"))
            .await
            .unwrap()
            .len(),
        2
    );
    let row = format!("tr[data-key=\"{new_id}\"]");
    assert_eq!(
        page.find(Locator::Css(&format!("{row} input.rename")))
            .await
            .unwrap()
            .prop("value")
            .await
            .unwrap()
            .as_deref(),
        Some("the script")
    );
    browser.fill(&format!("{row} input.rename"), "laptop").await;
    browser.click(&format!("{row} button.rename-submit")).await;
    assert!(
        browser
            .text("#flash")
            .await
            .contains("now called \"laptop\"")
    );
    assert_eq!(
        page.find(Locator::Css(&format!("{row} input.rename")))
            .await
            .unwrap()
            .prop("value")
            .await
            .unwrap()
            .as_deref(),
        Some("laptop")
    );
    browser
        .click(&format!("tr[data-key=\"{new_id}\"] button.revoke"))
        .await;
    assert!(browser.text("#flash").await.contains("revoked"));
    let refused = http
        .get(format!("{api}/budget"))
        .bearer_auth(&new_key)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    // Still signed in: that was not the key this session was opened with.
    assert_eq!(browser.text("#who").await, "alice");

    // Alice gives bob 2 TFLOP; both budgets move by exactly that.
    let bob_before = budget(&http, &api, &bob).await["available_cu"]
        .as_u64()
        .unwrap();
    let alice_before = budget(&http, &api, &alice).await["available_cu"]
        .as_u64()
        .unwrap();
    browser.fill("#give-to", "bob").await;
    browser.fill("#give-amount", "2 TFLOP").await;
    browser.click("#give-submit").await;
    assert_eq!(browser.text("#flash").await, "Gave 2 TFLOP to bob.");
    assert_eq!(
        budget(&http, &api, &bob).await["available_cu"]
            .as_u64()
            .unwrap(),
        bob_before + 2_000
    );
    assert_eq!(
        budget(&http, &api, &alice).await["available_cu"]
            .as_u64()
            .unwrap(),
        alice_before - 2_000
    );
    // A gift to nobody, or of nothing sensible, is refused and moves nothing.
    browser.fill("#give-to", "nobody-by-this-name").await;
    browser.fill("#give-amount", "1 TFLOP").await;
    browser.click("#give-submit").await;
    assert!(browser.text("#flash").await.contains("Nobody is named"));
    browser.fill("#give-to", "bob").await;
    browser.fill("#give-amount", "lots").await;
    browser.click("#give-submit").await;
    assert!(browser.text("#flash").await.contains("is not an amount"));
    assert_eq!(
        budget(&http, &api, &alice).await["available_cu"]
            .as_u64()
            .unwrap(),
        alice_before - 2_000
    );

    // A form sent from another site is refused, and moves nothing.
    let hostile = hostile_page(&site).await;
    page.goto(&hostile).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while page.find(Locator::Css("#refusal")).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "{}",
            page.source().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        browser.text("#refusal").await.contains("another site"),
        "{}",
        browser.text("#refusal").await
    );
    assert_eq!(
        budget(&http, &api, &bob).await["available_cu"]
            .as_u64()
            .unwrap(),
        bob_before + 2_000
    );

    // At 360 px wide the page fits: nothing overflows sideways.
    page.goto(&format!("{site}/")).await.unwrap();
    page.set_window_size(360, 1400).await.unwrap();
    let overflow = page
        .execute(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(overflow, json!(0), "the page is wider than 360 px");
    browser.screenshot("person-phone").await;
    page.set_window_size(1100, 1500).await.unwrap();

    // Signing out ends the session: the page asks for a key again.
    browser.click("#signout").await;
    assert!(page.find(Locator::Css("#key")).await.is_ok());
    page.refresh().await.unwrap();
    assert!(page.find(Locator::Css("#available")).await.is_err());

    // Bob sees his own page: the gift, none of alice's keys or calls.
    browser.fill("#key", &bob).await;
    browser.click("#signin").await;
    assert_eq!(browser.text("#who").await, "bob");
    let source = page.source().await.unwrap();
    let alice_id = alice.split('-').nth(2).unwrap();
    assert!(!source.contains(alice_id), "bob's page shows alice's key");
    assert!(!source.contains(&new_id), "bob's page shows alice's key");
    assert_eq!(browser.text("tr[data-model=echo] .calls").await, "0");
    assert!(browser.text("#history").await.contains("gift"));
    assert_eq!(
        page.find_all(Locator::Css("#keys-table tbody tr"))
            .await
            .unwrap()
            .len(),
        1
    );

    // Revoking the key a session was opened with ends that session.
    let bob_id = bob.split('-').nth(2).unwrap();
    browser
        .click(&format!("tr[data-key=\"{bob_id}\"] button.revoke"))
        .await;
    assert!(browser.text("#signin-refused").await.contains("signed out"));
    page.goto(&format!("{site}/")).await.unwrap();
    assert!(page.find(Locator::Css("#available")).await.is_err());

    // Alice closes her account from her page: another name closes nothing; hers closes it,
    // signs her out, and her key opens nothing any more.
    browser.fill("#key", &alice).await;
    browser.click("#signin").await;
    assert_eq!(browser.text("#who").await, "alice");
    // Opening the section is no navigation: a plain click.
    let open_close = || async {
        page.find(Locator::Css("#close summary"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    };
    open_close().await;
    browser.fill("#close-confirm", "bob").await;
    browser.click("#close-submit").await;
    assert!(browser.text("#flash").await.contains("Nothing was closed"));
    assert_eq!(budget(&http, &api, &alice).await["account"], "alice");
    open_close().await;
    browser.fill("#close-confirm", "alice").await;
    browser.click("#close-submit").await;
    assert!(browser.text("#signin-refused").await.contains("closed"));
    let gone = http
        .get(format!("{api}/budget"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 401);

    browser.close().await;
    drop(server);
}

/// The Gini coefficient by its definition, Σᵢ Σⱼ |xᵢ − xⱼ| / (2 n² mean): computed here apart
/// from the server's closed form.
fn gini(used: &[u64]) -> f64 {
    let n = used.len() as f64;
    let total: f64 = used.iter().map(|&x| x as f64).sum();
    let mut sum = 0.0;
    for &a in used {
        for &b in used {
            sum += (a as f64 - b as f64).abs();
        }
    }
    sum / (2.0 * n * total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_sees_how_compute_is_shared_and_grants() {
    let env = Env::new(&config().await);
    // Ten people; the i-th makes i calls, so the spread is known and unequal.
    let keys: Vec<String> = (0..10)
        .map(|index| env.person_with_key(&format!("p{index}")))
        .collect();
    let operator = env.json(&["admin", "key", "create"])["key"]
        .as_str()
        .unwrap()
        .to_string();
    let server = Server::start(&env);
    let api = server.base.clone();
    let site = api.trim_end_matches("/v1").to_string();
    let http = reqwest::Client::new();
    for (index, key) in keys.iter().enumerate() {
        for _ in 0..index {
            let status = http
                .post(format!("{api}/chat/completions"))
                .bearer_auth(key)
                .json(&json!({"model": "echo", "max_tokens": 4,
                              "messages": [{"role": "user", "content": "count me"}]}))
                .send()
                .await
                .unwrap()
                .status();
            assert_eq!(status, 200);
        }
    }
    let mut used = Vec::new();
    for key in &keys {
        used.push(
            budget(&http, &api, key).await["models"][0]["usage_this_period"]["charged_cu"]
                .as_u64()
                .unwrap(),
        );
    }
    let expected = gini(&used);
    assert!(expected > 0.2, "{used:?}");
    // The operator key calls no model.
    let refused = http
        .post(format!("{api}/chat/completions"))
        .bearer_auth(&operator)
        .json(&json!({"model": "echo", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    let browser = Browser::start().await;
    let page = browser.client();
    // A person's key does not open the operator's page.
    page.goto(&format!("{site}/admin")).await.unwrap();
    browser.fill("#key", &keys[3]).await;
    browser.click("#signin").await;
    assert!(
        browser
            .text("#signin-refused")
            .await
            .contains("not an operator key")
    );
    // Nor does a person's session.
    page.goto(&format!("{site}/")).await.unwrap();
    browser.fill("#key", &keys[3]).await;
    browser.click("#signin").await;
    assert_eq!(browser.text("#who").await, "p3");
    page.goto(&format!("{site}/admin")).await.unwrap();
    assert!(
        browser
            .text("#signin-refused")
            .await
            .contains("for the operator")
    );

    // The operator's key does.
    browser.fill("#key", &operator).await;
    browser.click("#signin").await;
    let shown: f64 = browser.attr("#gini", "data-value").await.parse().unwrap();
    assert!((shown - expected).abs() < 1e-9, "{shown} != {expected}");
    assert_eq!(browser.text("#gini").await, format!("{expected:.3}"));
    assert!(
        browser
            .text("#people")
            .await
            .starts_with("10, of whom 9 used compute")
    );
    // The Lorenz curve's last point is everything; its middle is what the poorest half used.
    let mut sorted = used.clone();
    sorted.sort_unstable();
    let total: u64 = sorted.iter().sum();
    let half: f64 = sorted[..5].iter().sum::<u64>() as f64 / total as f64;
    let points = page
        .find_all(Locator::Css("#lorenz-table td.num"))
        .await
        .unwrap();
    assert_eq!(points.len(), 11);
    let middle: f64 = points[5]
        .attr("data-value")
        .await
        .unwrap()
        .unwrap()
        .parse()
        .unwrap();
    assert!((middle - half).abs() < 1e-9, "{middle} != {half}");
    assert!(
        page.find(Locator::Css("#lorenz-chart polyline.curve"))
            .await
            .is_ok()
    );
    // The top 10 % is the one person of ten who used most.
    let top10: f64 = browser.attr("#top10", "data-value").await.parse().unwrap();
    assert!((top10 - sorted[9] as f64 / total as f64).abs() < 1e-9);
    // The models as they are now: the echo model served what the people were charged.
    assert_eq!(
        browser.attr("tr[data-model=echo] .served", "data-cu").await,
        total.to_string()
    );
    // And per day: today's row holds everything the people were charged.
    let today = budget(&http, &api, &keys[9]).await["usage_by_day"][0]["day"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        browser
            .attr(
                &format!("#served-table tr[data-day=\"{today}\"] td.num"),
                "data-cu"
            )
            .await,
        total.to_string()
    );
    browser.screenshot("admin").await;

    // A grant from the page reaches the person, once.
    let before = budget(&http, &api, &keys[0]).await["available_cu"]
        .as_u64()
        .unwrap();
    browser.fill("#grant-to", "p0").await;
    browser.fill("#grant-amount", "3 TFLOP").await;
    browser.click("#grant-submit").await;
    assert_eq!(browser.text("#flash").await, "Granted 3 TFLOP to p0.");
    assert_eq!(
        budget(&http, &api, &keys[0]).await["available_cu"]
            .as_u64()
            .unwrap(),
        before + 3_000
    );
    // A new person, then found by name with their balance.
    browser.fill("#create-name", "newcomer").await;
    browser.click("#create-submit").await;
    assert_eq!(browser.text("#flash").await, "Created person newcomer.");
    browser.fill("#search", "newcomer").await;
    browser.click("#search-submit").await;
    assert_eq!(
        browser
            .attr("#found tr[data-account=newcomer] .balance", "data-cu")
            .await,
        "10000000"
    );
    // By the start of a name: p0 … p9 all begin with "p".
    browser.fill("#search", "p").await;
    browser.click("#search-submit").await;
    assert_eq!(
        page.find_all(Locator::Css("#found tbody tr"))
            .await
            .unwrap()
            .len(),
        10
    );
    browser.fill("#search", "nobody-here").await;
    browser.click("#search-submit").await;
    assert!(
        browser
            .text("#found")
            .await
            .contains("Nobody's name begins")
    );
    // The operator's session opens no person's page: `/` leads back to `/admin`.
    page.goto(&format!("{site}/")).await.unwrap();
    assert!(page.current_url().await.unwrap().path().ends_with("/admin"));
    browser.click("#signout").await;
    assert!(page.find(Locator::Css("#gini")).await.is_err());

    browser.close().await;
    drop(server);
}

/// The npm filesystem MCP server the agents' tests run (`make test` installs it).
fn files_server() -> PathBuf {
    let modules = std::env::var("STIPEND_MCP_NODE_MODULES")
        .unwrap_or_else(|_| "/var/tmp/stipend-target/mcp/node_modules".to_string());
    let path = PathBuf::from(modules).join(".bin/mcp-server-filesystem");
    assert!(
        path.exists(),
        "{} is missing: run `make test`",
        path.display()
    );
    path
}

/// Starts a run of the scripted model with the files toolset through the API; its id.
async fn start_run(http: &reqwest::Client, api: &str, key: &str, script: &str) -> String {
    let run: Value = http
        .post(format!("{api}/agents"))
        .bearer_auth(key)
        .json(
            &json!({"goal": script, "model": "script", "budget_cu": 200_000,
                      "toolsets": ["files"]}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    run["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{run}"))
        .to_string()
}

/// Waits for a run to reach `state`; the run.
async fn run_in(http: &reqwest::Client, api: &str, key: &str, id: &str, state: &str) -> Value {
    for _ in 0..400 {
        let run = common::get_json(http, api, &format!("agents/{id}"), key).await;
        if run["state"] == state {
            return run;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("run {id} never reached {state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_answers_what_their_agents_ask_on_the_page() {
    let upstream = stipend_testkit::spawn().await.unwrap();
    let config = format!(
        "{}[[models]]\nname = \"script\"\nbackend = \"openai\"\nbase_url = \"{upstream}\"\nparams = \"8B\"\n\
         [[toolsets]]\nname = \"files\"\ncommand = \"{}\"\nargs = [\"{{workdir}}\"]\n\
         policy = {{ default = \"ask\" }}\n",
        common::CONFIG,
        files_server().display()
    );
    let env = Env::new(&config);
    let ada = env.person_with_key("ada");
    let server = Server::start(&env);
    let api = server.base.clone();
    let site = api.trim_end_matches("/v1").to_string();
    let http = reqwest::Client::new();
    let browser = Browser::start().await;
    let page = browser.client();
    page.goto(&format!("{site}/")).await.unwrap();
    browser.fill("#key", &ada).await;
    browser.click("#signin").await;
    assert!(
        browser
            .text("#inbox-empty")
            .await
            .contains("Nothing is waiting")
    );

    // A run starts after the page was drawn; what it asks shows up without a reload.
    let write = r#"SCRIPT: [{"call":[{"name":"files__write_file","arguments":{"path":"note.txt","content":"as asked"}}]},{"say":"noted"}]"#;
    let id = start_run(&http, &api, &ada, write).await;
    let form = format!(
        "form.approval[action^=\"/approvals/appr_{}\"]",
        id.trim_start_matches("run_")
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while page.find(Locator::Css(&form)).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the approval never showed up live"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        browser.text(&format!("{form} .tool")).await,
        "files__write_file"
    );
    assert_eq!(
        browser.text(&format!("tr[data-run=\"{id}\"] .state")).await,
        "waiting for you"
    );
    browser.screenshot("agents").await;

    // Approved with the arguments edited: the file holds the edit.
    let textarea = format!("{form} textarea.arguments");
    browser
        .fill(
            &textarea,
            r#"{"path": "note.txt", "content": "as edited on the page"}"#,
        )
        .await;
    browser.click(&format!("{form} button.approve")).await;
    assert_eq!(browser.text("#flash").await, "Approved, as you edited it.");
    let done = run_in(&http, &api, &ada, &id, "done").await;
    let note = env
        .dir
        .path()
        .join("data/agents")
        .join(&id)
        .join("note.txt");
    assert_eq!(
        std::fs::read_to_string(note).unwrap(),
        "as edited on the page"
    );
    assert_eq!(done["steps"][1]["outcome"], "approved");

    // Denied with a reason: the tool does not run, and the model is told why.
    let second = start_run(&http, &api, &ada, write).await;
    run_in(&http, &api, &ada, &second, "waiting_for_approval").await;
    page.refresh().await.unwrap();
    let form = format!(
        "form.approval[action^=\"/approvals/appr_{}\"]",
        second.trim_start_matches("run_")
    );
    browser
        .fill(&format!("{form} input.reason"), "not today")
        .await;
    browser.click(&format!("{form} button.deny")).await;
    assert_eq!(
        browser.text("#flash").await,
        "Denied; the agent is told why."
    );
    let denied = run_in(&http, &api, &ada, &second, "done").await;
    assert_eq!(denied["steps"][1]["outcome"], "denied", "{denied}");
    assert!(
        !env.dir
            .path()
            .join("data/agents")
            .join(&second)
            .join("note.txt")
            .exists()
    );
    // A second answer to the same approval changes nothing.
    page.refresh().await.unwrap();
    assert!(page.find(Locator::Css(&form)).await.is_err());
    assert_eq!(
        browser
            .text(&format!("tr[data-run=\"{second}\"] .state"))
            .await,
        "done"
    );
    assert_eq!(
        browser
            .attr(&format!("tr[data-run=\"{id}\"] .spent"), "data-cu")
            .await,
        done["spent_cu"].to_string()
    );

    browser.close().await;
    drop(server);
}

/// The public transparency page, as anyone reads it: after a period of 4 s in which the i-th of
/// 30 people made i calls, the page shows the kept report, the same numbers as the JSON, the
/// Lorenz curve drawn, with no key and no sign-in, and fits a phone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anyone_reads_how_compute_was_shared_on_the_transparency_page() {
    const PERIOD_MS: i64 = 4_000;
    let upstream = stipend_testkit::spawn().await.unwrap();
    let config = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\ntransparency_clip_cu = 20000\n\
         [stipend]\namount = \"10 PFLOP\"\nperiod = \"4s\"\nrollover_max = \"0\"\n{}",
        CONFIG_MODELS.replace("UPSTREAM", &upstream)
    );
    let env = Env::new(&config);
    let keys: Vec<String> = (0..30)
        .map(|index| env.person_with_key(&format!("person{index}")))
        .collect();
    let server = Server::start(&env);
    let api = server.base.clone();
    let site = api.trim_end_matches("/v1").to_string();
    let http = reqwest::Client::new();
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    // The calls, inside one period.
    let start_ms = (now_ms() / PERIOD_MS + 1) * PERIOD_MS;
    tokio::time::sleep(Duration::from_millis((start_ms - now_ms()) as u64 + 50)).await;
    for (index, key) in keys.iter().enumerate() {
        for _ in 0..index {
            assert_eq!(echo_call(&http, &api, key).await, 200);
        }
    }
    assert!(
        now_ms() < start_ms + PERIOD_MS,
        "the calls took longer than a period"
    );
    let period_start = stipend_ledger::units::format_utc(start_ms);
    let report: Value = loop {
        let response = http
            .get(format!("{api}/transparency?period_start={period_start}"))
            .send()
            .await
            .unwrap();
        if response.status() == 200 {
            break response.json().await.unwrap();
        }
        assert!(now_ms() < start_ms + 3 * PERIOD_MS, "no report was made");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let browser = Browser::start().await;
    let page = browser.client();
    page.goto(&format!("{site}/transparency?period_start={period_start}"))
        .await
        .unwrap();
    assert_eq!(browser.text("#period-start").await, period_start);
    assert_eq!(
        browser.attr("#row-people td.num", "data-value").await,
        report["people_with_stipend"]["value"].to_string()
    );
    assert_eq!(
        browser.attr("#row-used td.num", "data-value").await,
        report["used_cu"]["value"].to_string()
    );
    let gini: f64 = browser
        .attr("#row-gini td.num", "data-value")
        .await
        .parse()
        .unwrap();
    assert_eq!(gini, report["gini"]["value"].as_f64().unwrap());
    // The curve: drawn, and as a table of 11 rows whose values are the JSON's.
    assert!(page.find(Locator::Css("#lorenz-chart")).await.is_ok());
    let rows = page
        .find_all(Locator::Css("#lorenz-table tbody td.num"))
        .await
        .unwrap();
    assert_eq!(rows.len(), 11);
    for (row, point) in rows.iter().zip(report["lorenz"].as_array().unwrap()) {
        let shown: f64 = row
            .attr("data-value")
            .await
            .unwrap()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(shown, point["value"].as_f64().unwrap());
    }
    assert!(browser.text("#method").await.contains("20000 cu"));
    browser.screenshot("transparency").await;
    page.set_window_size(360, 1400).await.unwrap();
    let overflow = page
        .execute(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(overflow, json!(0), "the page is wider than 360 px");
    browser.close().await;
    drop(server);
}
