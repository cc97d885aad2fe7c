//! Accounts and the grants (lots) that make up a person's, pool's or agent's balance.

use std::fmt;

use crate::limits::ACCOUNT_NAME_LEN_MAX;

/// An account's number. Assigned by the ledger, never reused.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct AccountId(pub u64);

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What an account is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// A person's or pool's account after it was closed: renamed to an anonymous id, its balance
    /// back with the issuer, holding nothing and receiving nothing ever again. Its transfers stay,
    /// so that double entry still holds.
    Closed,
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
            AccountKind::Closed => "closed",
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
            "closed" => AccountKind::Closed,
            _ => return None,
        })
    }

    /// Whether the account's balance is made of grants (lots) and may never go below zero: a
    /// person's, a pool's, an agent's sub-budget. Only these reserve compute, and give it to each
    /// other (a run's cap moves from its person to its agent account, and back when it ends).
    /// The issuer and the sinks hold plain signed totals instead.
    pub fn holds_grants(self) -> bool {
        matches!(
            self,
            AccountKind::Person | AccountKind::Pool | AccountKind::Agent
        )
    }
}

serde_by_name!(AccountKind, "an account kind");

impl LotSource {
    /// The name used in storage, the CLI and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            LotSource::Stipend => "stipend",
            LotSource::Grant => "grant",
            LotSource::Gift => "gift",
        }
    }

    /// Parses [`LotSource::as_str`]'s output.
    pub fn parse(text: &str) -> Option<LotSource> {
        Some(match text {
            "stipend" => LotSource::Stipend,
            "grant" => LotSource::Grant,
            "gift" => LotSource::Gift,
            _ => return None,
        })
    }
}

serde_by_name!(LotSource, "a lot source");

impl fmt::Display for AccountKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a lot of compute came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// What an account spent at one sink (one model) in one period, on one UTC day: counts, never
/// content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// The sink (one per model).
    pub sink: AccountId,
    /// The stipend period.
    pub period: i64,
    /// The UTC day (days since the UNIX epoch); `-1` for counts kept before days were counted.
    pub day: i64,
    /// Calls charged.
    pub requests: u64,
    /// Compute charged, in cu.
    pub charged_cu: u64,
}

/// An account's spending in `period`, one count per sink (summed over the period's days; `day`
/// is the last day counted).
pub fn usage_in_period(usage: &[Usage], period: i64) -> Vec<Usage> {
    let mut summed: Vec<Usage> = Vec::new();
    for entry in usage.iter().filter(|entry| entry.period == period) {
        match summed.iter_mut().find(|sum| sum.sink == entry.sink) {
            Some(sum) => {
                sum.requests += entry.requests;
                sum.charged_cu += entry.charged_cu;
                sum.day = sum.day.max(entry.day);
            }
            None => summed.push(*entry),
        }
    }
    summed
}

/// An account's spending per sink and UTC day, oldest first, from `first_day` on (one count per
/// sink and day, summed over periods shorter than a day).
pub fn usage_by_day(usage: &[Usage], first_day: i64) -> Vec<Usage> {
    let mut days: Vec<Usage> = Vec::new();
    for entry in usage.iter().filter(|entry| entry.day >= first_day.max(0)) {
        match days
            .iter_mut()
            .find(|day| day.sink == entry.sink && day.day == entry.day)
        {
            Some(day) => {
                day.requests += entry.requests;
                day.charged_cu += entry.charged_cu;
                day.period = day.period.max(entry.period);
            }
            None => days.push(*entry),
        }
    }
    days.sort_by_key(|entry| (entry.day, entry.sink));
    days
}

/// The stored state of one account.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// What it spent, per sink, period and day: the current period's and the last
    /// [`USAGE_DAYS_KEPT`](crate::limits::USAGE_DAYS_KEPT) days'.
    pub usage: Vec<Usage>,
    /// When it was created (ms since the UNIX epoch).
    pub created_at_ms: i64,
}

/// The prefix of sink names: only the ledger makes accounts named so, one per model.
pub const SINK_NAME_PREFIX: &str = "sink:";

/// The punctuation a name may hold besides letters, digits and the marks that letters take.
const NAME_PUNCTUATION: [char; 6] = ['-', '_', '.', '@', ':', '/'];

/// An account name in its one stored form, with the key that finds names confusable with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountName {
    /// The name in Unicode NFKC: `ａｌｉｃｅ` (fullwidth) is `alice`, `ﬁ` is `fi`.
    pub name: String,
    /// Its confusable skeleton ([`account_name_skeleton`]).
    pub skeleton: String,
}

/// Normalizes a name and checks that it is usable: after Unicode NFKC normalization, 1 to 128
/// bytes of letters, digits, the marks letters carry, and `- _ . @ : /`, drawn from one script
/// (Latin may mix with Chinese, Japanese or Korean, as those are written), with no character
/// that Unicode's identifier profile (UTS #39) restricts: invisible, obsolete or look-alike
/// symbols. So a name is safe to show, to pass on a command line, and to read aloud.
pub fn normalize_account_name(name: &str) -> Result<AccountName, String> {
    use unicode_normalization::UnicodeNormalization;
    use unicode_security::{GeneralSecurityProfile, RestrictionLevel, RestrictionLevelDetection};

    if name.is_empty() {
        return Err("an account name must not be empty".to_string());
    }
    // Normalizing can grow a text many times over (one ligature becomes several letters), so the
    // length is checked on the input first and the output after.
    if name.len() > ACCOUNT_NAME_LEN_MAX * 4 {
        return Err(format!(
            "an account name is at most {ACCOUNT_NAME_LEN_MAX} bytes, this one is {}",
            name.len()
        ));
    }
    let normalized: String = name.nfkc().collect();
    if normalized.len() > ACCOUNT_NAME_LEN_MAX {
        return Err(format!(
            "an account name is at most {ACCOUNT_NAME_LEN_MAX} bytes, this one is {}",
            normalized.len()
        ));
    }
    // The identifier profile also allows a few joiners and apostrophes that letters do not
    // need in a name; only letters, digits and marks are taken from it.
    if let Some(bad) = normalized.chars().find(|&c| {
        !(NAME_PUNCTUATION.contains(&c)
            || (GeneralSecurityProfile::identifier_allowed(c)
                && (c.is_alphanumeric() || unicode_normalization::char::is_combining_mark(c))))
    }) {
        return Err(format!(
            "an account name may hold letters, digits and - _ . @ : / only, not {bad:?}"
        ));
    }
    let letters: String = normalized
        .chars()
        .filter(|c| !NAME_PUNCTUATION.contains(c))
        .collect();
    if !letters
        .as_str()
        .check_restriction_level(RestrictionLevel::HighlyRestrictive)
    {
        return Err(format!(
            "an account name is written in one script, not mixed like {normalized:?} \
             (Latin may go with Chinese, Japanese or Korean)"
        ));
    }
    let skeleton = account_name_skeleton(&normalized);
    Ok(AccountName {
        name: normalized,
        skeleton,
    })
}

/// Which [`account_name_skeleton`] a stored skeleton was made by: this rule's own version and
/// the Unicode tables' version. A store whose skeletons were made by another recomputes them.
pub const ACCOUNT_NAME_SKELETON_VERSION: i64 = {
    let rule = 1;
    let (major, minor, micro) = unicode_security::UNICODE_VERSION;
    (rule << 24) | ((major as i64) << 16) | ((minor as i64) << 8) | micro as i64
};

/// The key under which names that look alike meet: Unicode's confusable skeleton (UTS #39) of
/// the lowercased name, lowercased again. `alice`, `Alice`, `ALICE` and `аlice` (its first letter
/// Cyrillic) share one, as do `bob1` and `bobl`, `rn` and `m`.
pub fn account_name_skeleton(name: &str) -> String {
    let lowered = name.to_lowercase();
    unicode_security::skeleton(&lowered)
        .flat_map(char::to_lowercase)
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn normalized(name: &str) -> Result<String, String> {
        normalize_account_name(name).map(|name| name.name)
    }

    #[test]
    fn names_are_stored_in_nfkc() {
        assert_eq!(normalized("ａｌｉｃｅ").unwrap(), "alice");
        assert_eq!(normalized("ﬁona").unwrap(), "fiona");
        // A decomposed é becomes the one character.
        assert_eq!(normalized("rene\u{301}").unwrap(), "ren\u{e9}");
        assert_eq!(
            normalized("team/ml:gpu@lab.org_1-2").unwrap(),
            "team/ml:gpu@lab.org_1-2"
        );
    }

    #[test]
    fn names_in_one_script_of_any_language_are_usable() {
        for name in [
            "алиса",
            "नमस्ते",
            "محمد",
            "李小龍",
            "ひらがなカタカナ漢字",
            "Müller",
            "김민준",
        ] {
            assert_eq!(normalized(name).unwrap(), name, "{name}");
        }
        // Latin mixes with the scripts written beside it.
        assert!(normalized("lab-東京").is_ok());
    }

    #[test]
    fn mixed_scripts_invisible_and_symbol_characters_are_refused() {
        // A Cyrillic а among Latin letters.
        let error = normalized("\u{430}lice").unwrap_err();
        assert!(error.contains("one script"), "{error}");
        // Greek omicron in Latin.
        assert!(normalized("b\u{3bf}b").is_err());
        for bad in [
            "al\u{200d}ice",
            "al\u{200b}ice",
            "o'brien",
            "a b",
            "a\tb",
            "rm -rf",
            "💸",
            "a\u{2010}b",
        ] {
            assert!(normalized(bad).is_err(), "{bad:?}");
        }
        assert!(normalized("").is_err());
        assert!(normalized(&"a".repeat(ACCOUNT_NAME_LEN_MAX)).is_ok());
        assert!(normalized(&"a".repeat(ACCOUNT_NAME_LEN_MAX + 1)).is_err());
        // A name that normalizes past the limit: each ﬃ is three letters.
        let error = normalized(&"ﬃ".repeat(50)).unwrap_err();
        assert!(error.contains("at most 128 bytes"), "{error}");
    }

    #[test]
    fn look_alike_names_share_a_skeleton_and_others_do_not() {
        let skeleton = account_name_skeleton;
        for (a, b) in [
            ("alice", "Alice"),
            ("alice", "ALICE"),
            ("alice", "\u{430}lice"),
            ("ace", "\u{430}\u{441}\u{435}"), // all Cyrillic
            ("bob1", "bobl"),
            ("modern", "rnodern"),
            ("paypal", "PAYPAL"),
            ("b0b", "bob"),
        ] {
            assert_eq!(skeleton(a), skeleton(b), "{a:?} and {b:?}");
        }
        for (a, b) in [
            ("alice", "alicia"),
            ("bob", "rob"),
            ("user1", "user2"),
            ("ann", "anne"),
        ] {
            assert_ne!(skeleton(a), skeleton(b), "{a:?} and {b:?}");
        }
    }
}
