//! Accounts and the grants (lots) that make up a person's, pool's or agent's balance.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An account's number. Assigned by the ledger, never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AccountId(pub u64);

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What an account is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountKind {
    /// A person: receives the stipend every period.
    Person,
    /// A pool shared by several people: receives contributions, no stipend.
    Pool,
    /// An agent's sub-budget, carved from its person's balance.
    Agent,
    /// Where every grant comes from. Its balance is minus everything ever granted and not
    /// returned, so it is never positive.
    Issuer,
    /// Where spent compute goes, one per backend. Never negative.
    Sink,
}

impl AccountKind {
    /// The name used in storage, the CLI and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            AccountKind::Person => "person",
            AccountKind::Pool => "pool",
            AccountKind::Agent => "agent",
            AccountKind::Issuer => "issuer",
            AccountKind::Sink => "sink",
        }
    }

    /// Parses [`AccountKind::as_str`]'s output.
    pub fn parse(text: &str) -> Option<AccountKind> {
        Some(match text {
            "person" => AccountKind::Person,
            "pool" => AccountKind::Pool,
            "agent" => AccountKind::Agent,
            "issuer" => AccountKind::Issuer,
            "sink" => AccountKind::Sink,
            _ => return None,
        })
    }

    /// Whether the account's balance is made of grants (lots) and may never go below zero.
    /// The issuer and the sinks hold plain signed totals instead.
    pub fn holds_grants(self) -> bool {
        matches!(
            self,
            AccountKind::Person | AccountKind::Pool | AccountKind::Agent
        )
    }
}

impl fmt::Display for AccountKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a lot of compute came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LotSource {
    /// The periodic stipend. An account holds at most one stipend lot; at each period boundary
    /// its remainder is capped at the rollover limit.
    Stipend,
    /// An operator's grant.
    Grant,
    /// A gift or a pool contribution; it keeps the expiry of the compute it was made from, so
    /// that giving back and forth cannot dodge the rollover cap.
    Gift,
}

/// A lot: an amount of compute with an expiry and a source. A grant-holding account's balance
/// is the sum of its lots; spending burns the lot that expires soonest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lot {
    /// What is left of it, in cu; always positive while the lot exists.
    pub remaining_cu: u64,
    /// When it expires (ms since the UNIX epoch); `None` never expires.
    pub expires_at_ms: Option<i64>,
    /// Where it came from.
    pub source: LotSource,
}

impl Lot {
    /// The expiry as a sort key: lots that never expire sort last.
    pub fn expiry_key(&self) -> i64 {
        self.expires_at_ms.unwrap_or(i64::MAX)
    }
}

/// What an account spent at one sink (one model) in one period: counts, never content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// The sink (one per model).
    pub sink: AccountId,
    /// The stipend period.
    pub period: i64,
    /// Calls charged.
    pub requests: u64,
    /// Compute charged, in cu.
    pub charged_cu: u64,
}

/// The stored state of one account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRecord {
    /// The account's number.
    pub id: AccountId,
    /// Its unique name.
    pub name: String,
    /// What it is.
    pub kind: AccountKind,
    /// Its balance in cu: the sum of its lots for grant-holding accounts.
    pub balance_cu: i64,
    /// The lots that make up the balance, soonest expiry first.
    pub lots: Vec<Lot>,
    /// The last period whose stipend has been applied, for persons.
    pub stipend_period: Option<i64>,
    /// What it spent this period, per sink.
    #[serde(default)]
    pub usage: Vec<Usage>,
    /// When it was created (ms since the UNIX epoch).
    pub created_at_ms: i64,
}

/// The longest account name.
pub const ACCOUNT_NAME_LEN_MAX: usize = 128;

/// Checks that a name is usable: 1 to 128 characters of letters, digits, `-`, `_`, `.`, `@`
/// and `:`, so that it is safe to show and to pass on a command line.
pub fn validate_account_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("an account name must not be empty".to_string());
    }
    if name.len() > ACCOUNT_NAME_LEN_MAX {
        return Err(format!(
            "an account name is at most {ACCOUNT_NAME_LEN_MAX} bytes, this one is {}",
            name.len()
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | ':')))
    {
        return Err(format!(
            "an account name may hold letters, digits and - _ . @ : only, not {bad:?}"
        ));
    }
    Ok(())
}
