//! Signed-in sessions and the checks every form passes.
//!
//! A person signs in with one of their API keys. The server then hands the browser a session
//! token in a cookie (`HttpOnly`, `SameSite=Strict`, `Secure` behind TLS) and keeps only the
//! token's SHA-256, with the account and the id of the key it was opened with. The key itself is
//! never kept: each request checks that the key is still not revoked (revoking it ends the
//! session), and a session ends at its deadline or on sign-out.
//!
//! Sessions live in the server's memory, so a restart signs everyone out. A session store in the
//! database was the alternative; it would let several servers share sessions without sticky
//! routing, and is not needed while a person's page is served by the server their key is routed
//! to (docs/scale-out.md).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use axum::http::header::{COOKIE, HOST, ORIGIN};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use stipend_ledger::AccountId;

/// The session cookie's name.
pub const COOKIE_NAME: &str = "stipend_session";

/// Whose pages a session opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A person's (or a pool's) own page, opened with their key.
    Person,
    /// The operator's page, opened with an operator key.
    Operator,
}

/// What a session knows: whose it is and which key opened it; never the key.
#[derive(Debug, Clone)]
pub struct Session {
    /// The account it acts for (the issuer's, for the operator).
    pub account: AccountId,
    /// Whose pages it opens.
    pub role: Role,
    /// The public id of the key it was opened with.
    pub key_id: String,
    /// When it ends.
    pub expires_at: Instant,
    /// When it began (the oldest is ended first when the table is full).
    pub started_at: Instant,
    /// What the next page shows once: the outcome of the last form.
    pub flash: Option<Flash>,
}

/// The outcome of a form, shown once on the page it leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flash {
    /// It worked.
    Done(String),
    /// It was refused, and why.
    Refused(String),
    /// A key was created: shown this once and never again.
    NewKey(String),
}

/// The signed-in sessions, by their token's hash.
pub struct Sessions {
    table: Mutex<HashMap<[u8; 32], Session>>,
    ttl: Duration,
    max: usize,
}

impl Sessions {
    /// An empty table of sessions lasting `ttl`, at most `max` at once.
    pub fn new(ttl: Duration, max: usize) -> Sessions {
        Sessions {
            table: Mutex::new(HashMap::new()),
            ttl,
            max: max.max(1),
        }
    }

    /// How long a session lasts.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Opens a session; returns its token, for the cookie.
    pub fn open(
        &self,
        account: AccountId,
        key_id: String,
        role: Role,
    ) -> Result<String, getrandom::Error> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)?;
        let token: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
        let now = Instant::now();
        let mut table = self.table.lock();
        if table.len() >= self.max {
            table.retain(|_, session| session.expires_at > now);
        }
        if table.len() >= self.max
            && let Some(oldest) = table
                .iter()
                .min_by_key(|(_, session)| session.started_at)
                .map(|(hash, _)| *hash)
        {
            table.remove(&oldest);
        }
        table.insert(
            digest(&token),
            Session {
                account,
                role,
                key_id,
                expires_at: now + self.ttl,
                started_at: now,
                flash: None,
            },
        );
        Ok(token)
    }

    /// The live session a request's cookie names, with its flash taken (shown once).
    pub fn take(&self, headers: &HeaderMap) -> Option<Session> {
        let token = session_token(headers)?;
        let mut table = self.table.lock();
        let hash = digest(token);
        let session = table.get_mut(&hash)?;
        if session.expires_at <= Instant::now() {
            table.remove(&hash);
            return None;
        }
        let mut seen = session.clone();
        seen.flash = session.flash.take();
        Some(seen)
    }

    /// The live session a request's cookie names, leaving its flash for the next page (a part
    /// of the page redrawn by its script must not eat it).
    pub fn peek(&self, headers: &HeaderMap) -> Option<Session> {
        let token = session_token(headers)?;
        let table = self.table.lock();
        let session = table.get(&digest(token))?;
        if session.expires_at <= Instant::now() {
            return None;
        }
        let mut seen = session.clone();
        seen.flash = None;
        Some(seen)
    }

    /// Sets what the session's next page shows once.
    pub fn flash(&self, headers: &HeaderMap, flash: Flash) {
        if let Some(token) = session_token(headers)
            && let Some(session) = self.table.lock().get_mut(&digest(token))
        {
            session.flash = Some(flash);
        }
    }

    /// Ends the session a request's cookie names, if any.
    pub fn close(&self, headers: &HeaderMap) {
        if let Some(token) = session_token(headers) {
            self.table.lock().remove(&digest(token));
        }
    }

    /// How many sessions are held.
    pub fn len(&self) -> usize {
        self.table.lock().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The session token in a request's `Cookie` headers.
fn session_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value.trim())
        .filter(|value| !value.is_empty())
}

/// Whether the page was reached over TLS (by a proxy in front that says so): then the cookie is
/// `Secure`. A client that claims it falsely only keeps its own cookie off plain HTTP.
pub fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.eq_ignore_ascii_case("https"))
}

/// The `Set-Cookie` value that hands a browser its session.
pub fn cookie(token: &str, ttl: Duration, secure: bool) -> String {
    format!(
        "{COOKIE_NAME}={token}; Path=/; Max-Age={}; HttpOnly; SameSite=Strict{}",
        ttl.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that makes a browser forget its session.
pub fn cookie_cleared(secure: bool) -> String {
    format!(
        "{COOKIE_NAME}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    )
}

/// Why a form was refused before it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CrossSite {
    /// The browser says the form came from another site.
    #[error(
        "this form was sent from another site ({0}); Stipend's forms are sent from its own pages"
    )]
    Fetched(&'static str),
    /// The form's origin is not this server.
    #[error("this form was sent from another origin; Stipend's forms are sent from its own pages")]
    Origin,
    /// Nothing says where the form came from.
    #[error(
        "this form says nothing of where it came from (no Origin or Sec-Fetch-Site header); \
         send it from Stipend's own page in a current browser"
    )]
    Unknown,
}

/// Checks that a form comes from this server's own pages: `Sec-Fetch-Site` where the browser
/// sends it (every current one does), else `Origin` against `Host`. A request with neither is
/// refused: a form can always be sent from the page itself, and a script that is not a browser
/// has the JSON API. With `SameSite=Strict` on the cookie this is the second of two locks.
pub fn same_origin(headers: &HeaderMap) -> Result<(), CrossSite> {
    if let Some(site) = headers.get("sec-fetch-site") {
        return match site.as_bytes() {
            b"same-origin" | b"none" => Ok(()),
            b"same-site" => Err(CrossSite::Fetched("same-site")),
            b"cross-site" => Err(CrossSite::Fetched("cross-site")),
            _ => Err(CrossSite::Fetched("unknown")),
        };
    }
    let origin = headers.get(ORIGIN).and_then(|value| value.to_str().ok());
    let host = headers.get(HOST).and_then(|value| value.to_str().ok());
    match (origin, host) {
        (Some(origin), Some(host)) => {
            let origin_host = origin
                .strip_prefix("https://")
                .or_else(|| origin.strip_prefix("http://"));
            if origin_host.is_some_and(|origin_host| origin_host.eq_ignore_ascii_case(host)) {
                Ok(())
            } else {
                Err(CrossSite::Origin)
            }
        }
        (Some(_), None) => Err(CrossSite::Origin),
        (None, _) => Err(CrossSite::Unknown),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn forms_from_elsewhere_are_refused() {
        let ok = [
            vec![("sec-fetch-site", "same-origin")],
            vec![("sec-fetch-site", "none")],
            vec![
                ("origin", "http://127.0.0.1:8080"),
                ("host", "127.0.0.1:8080"),
            ],
            vec![
                ("origin", "https://Stipend.example"),
                ("host", "stipend.example"),
            ],
        ];
        for case in ok {
            assert_eq!(same_origin(&headers(&case)), Ok(()), "{case:?}");
        }
        let refused = [
            vec![
                ("sec-fetch-site", "cross-site"),
                ("origin", "http://a:1"),
                ("host", "a:1"),
            ],
            vec![("sec-fetch-site", "same-site")],
            vec![
                ("origin", "http://evil.example"),
                ("host", "127.0.0.1:8080"),
            ],
            vec![("origin", "null"), ("host", "127.0.0.1:8080")],
            vec![
                ("origin", "http://127.0.0.1:8081"),
                ("host", "127.0.0.1:8080"),
            ],
            vec![("host", "127.0.0.1:8080")],
            vec![],
        ];
        for case in refused {
            assert!(same_origin(&headers(&case)).is_err(), "{case:?}");
        }
    }

    #[test]
    fn a_session_is_found_by_its_cookie_alone_and_ends() {
        let sessions = Sessions::new(Duration::from_secs(60), 2);
        let token = sessions
            .open(AccountId(7), "k1".into(), Role::Person)
            .unwrap();
        let with = headers(&[("cookie", &format!("a=b; {COOKIE_NAME}={token}; c=d"))]);
        assert_eq!(sessions.take(&with).unwrap().account, AccountId(7));
        // Another token, or none, finds nothing.
        let wrong = headers(&[("cookie", &format!("{COOKIE_NAME}=00{token}"))]);
        assert!(sessions.take(&wrong).is_none());
        assert!(sessions.take(&headers(&[])).is_none());
        // A flash is shown once.
        sessions.flash(&with, Flash::Done("given".into()));
        assert_eq!(
            sessions.take(&with).unwrap().flash,
            Some(Flash::Done("given".into()))
        );
        assert_eq!(sessions.take(&with).unwrap().flash, None);
        // A peek leaves a flash where it is.
        sessions.flash(&with, Flash::Done("again".into()));
        assert_eq!(sessions.peek(&with).unwrap().flash, None);
        assert_eq!(
            sessions.take(&with).unwrap().flash,
            Some(Flash::Done("again".into()))
        );
        sessions.close(&with);
        assert!(sessions.take(&with).is_none());
    }

    #[test]
    fn a_full_table_ends_the_oldest_session() {
        let sessions = Sessions::new(Duration::from_secs(60), 2);
        let first = sessions
            .open(AccountId(1), "k1".into(), Role::Person)
            .unwrap();
        let second = sessions
            .open(AccountId(2), "k2".into(), Role::Person)
            .unwrap();
        let third = sessions
            .open(AccountId(3), "k3".into(), Role::Person)
            .unwrap();
        assert_eq!(sessions.len(), 2);
        let cookie = |token: &str| headers(&[("cookie", &format!("{COOKIE_NAME}={token}"))]);
        assert!(sessions.take(&cookie(&first)).is_none());
        assert!(sessions.take(&cookie(&second)).is_some());
        assert!(sessions.take(&cookie(&third)).is_some());
    }

    #[test]
    fn an_expired_session_is_gone() {
        let sessions = Sessions::new(Duration::ZERO, 2);
        let token = sessions
            .open(AccountId(1), "k1".into(), Role::Person)
            .unwrap();
        let cookie = headers(&[("cookie", &format!("{COOKIE_NAME}={token}"))]);
        assert!(sessions.take(&cookie).is_none());
        assert!(sessions.is_empty());
    }

    #[test]
    fn the_cookie_is_locked_down() {
        let set = cookie("abc", Duration::from_secs(60), true);
        for part in [
            "HttpOnly",
            "SameSite=Strict",
            "Secure",
            "Path=/",
            "Max-Age=60",
        ] {
            assert!(set.contains(part), "{set}");
        }
        assert!(!cookie("abc", Duration::from_secs(60), false).contains("Secure"));
    }
}
