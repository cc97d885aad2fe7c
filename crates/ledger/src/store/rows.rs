//! How every store writes an account's lots and usage: as JSON arrays of row types of their own,
//! not of the ledger's [`Lot`] and [`Usage`], so that a change to the ledger cannot change what
//! is on disk unseen. A test pins the format; the SQLite and PostgreSQL stores share it.

use serde::{Deserialize, Serialize};

use crate::account::{AccountId, Lot, LotSource, Usage};
use crate::store::StoreError;

/// A lot as a store's account row holds it, in a JSON array.
#[derive(Serialize, Deserialize)]
struct LotRow {
    remaining_cu: u64,
    expires_at_ms: Option<i64>,
    /// `stipend`, `grant` or `gift`.
    source: String,
}

impl LotRow {
    fn from_lot(lot: &Lot) -> LotRow {
        let source = match lot.source {
            LotSource::Stipend => "stipend",
            LotSource::Grant => "grant",
            LotSource::Gift => "gift",
        };
        LotRow {
            remaining_cu: lot.remaining_cu,
            expires_at_ms: lot.expires_at_ms,
            source: source.to_string(),
        }
    }

    fn into_lot(self) -> Result<Lot, String> {
        let source = match self.source.as_str() {
            "stipend" => LotSource::Stipend,
            "grant" => LotSource::Grant,
            "gift" => LotSource::Gift,
            other => return Err(format!("unknown lot source {other:?}")),
        };
        Ok(Lot {
            remaining_cu: self.remaining_cu,
            expires_at_ms: self.expires_at_ms,
            source,
        })
    }
}

/// One period's (and day's) spending at one sink as `accounts.usage` holds it, in a JSON array.
/// Rows written before days were counted have no `day`: they read as day -1.
#[derive(Serialize, Deserialize)]
struct UsageRow {
    sink: u64,
    period: i64,
    #[serde(default = "day_unknown")]
    day: i64,
    requests: u64,
    charged_cu: u64,
}

fn day_unknown() -> i64 {
    -1
}

impl UsageRow {
    fn from_usage(usage: &Usage) -> UsageRow {
        UsageRow {
            sink: usage.sink.0,
            period: usage.period,
            day: usage.day,
            requests: usage.requests,
            charged_cu: usage.charged_cu,
        }
    }

    fn into_usage(self) -> Usage {
        Usage {
            sink: AccountId(self.sink),
            period: self.period,
            day: self.day,
            requests: self.requests,
            charged_cu: self.charged_cu,
        }
    }
}

/// A usage list as a store writes it.
pub fn usage_json(usage: &[Usage]) -> Result<String, StoreError> {
    let rows: Vec<UsageRow> = usage.iter().map(UsageRow::from_usage).collect();
    serde_json::to_string(&rows).map_err(|error| StoreError::Corrupt(error.to_string()))
}

/// A lot list as a store writes it.
pub fn lots_json(lots: &[Lot]) -> Result<String, StoreError> {
    let rows: Vec<LotRow> = lots.iter().map(LotRow::from_lot).collect();
    serde_json::to_string(&rows).map_err(|error| StoreError::Corrupt(error.to_string()))
}

/// A lot list as a store wrote it.
pub fn lots_from_json(json: &str) -> Result<Vec<Lot>, String> {
    let rows: Vec<LotRow> = serde_json::from_str(json).map_err(|error| error.to_string())?;
    rows.into_iter().map(LotRow::into_lot).collect()
}

/// A usage list as a store wrote it.
pub fn usage_from_json(json: &str) -> Result<Vec<Usage>, String> {
    let rows: Vec<UsageRow> = serde_json::from_str(json).map_err(|error| error.to_string())?;
    Ok(rows.into_iter().map(UsageRow::into_usage).collect())
}

/// A model's access rule as a store writes it: its accounts' ids and its groups' names, each a
/// JSON array.
pub fn model_access_json(
    accounts: &[AccountId],
    groups: &[String],
) -> Result<(String, String), StoreError> {
    let ids: Vec<u64> = accounts.iter().map(|account| account.0).collect();
    let corrupt = |error: serde_json::Error| StoreError::Corrupt(error.to_string());
    Ok((
        serde_json::to_string(&ids).map_err(corrupt)?,
        serde_json::to_string(groups).map_err(corrupt)?,
    ))
}

/// A model's access rule as a store wrote it.
pub fn model_access_from_json(
    model: String,
    accounts: &str,
    groups: &str,
) -> Result<crate::store::ModelAccess, StoreError> {
    let corrupt =
        |error: serde_json::Error| StoreError::Corrupt(format!("model_access {model:?}: {error}"));
    let ids: Vec<u64> = serde_json::from_str(accounts).map_err(corrupt)?;
    let groups: Vec<String> = serde_json::from_str(groups).map_err(corrupt)?;
    Ok(crate::store::ModelAccess {
        accounts: ids.into_iter().map(AccountId).collect(),
        groups,
        model,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn lots_and_usage_keep_their_file_format() {
        // What a store written today holds; a change to the ledger's types must not change it.
        let lots = vec![
            Lot {
                remaining_cu: 7,
                expires_at_ms: Some(100),
                source: LotSource::Stipend,
            },
            Lot {
                remaining_cu: 1,
                expires_at_ms: None,
                source: LotSource::Gift,
            },
        ];
        let lots_on_disk = r#"[{"remaining_cu":7,"expires_at_ms":100,"source":"stipend"},{"remaining_cu":1,"expires_at_ms":null,"source":"gift"}]"#;
        assert_eq!(lots_json(&lots).unwrap(), lots_on_disk);
        assert_eq!(lots_from_json(lots_on_disk).unwrap(), lots);
        let mut usage = vec![Usage {
            sink: AccountId(3),
            period: 20_000,
            day: 20_000,
            requests: 2,
            charged_cu: 90,
        }];
        let usage_on_disk =
            r#"[{"sink":3,"period":20000,"day":20000,"requests":2,"charged_cu":90}]"#;
        assert_eq!(usage_json(&usage).unwrap(), usage_on_disk);
        assert_eq!(usage_from_json(usage_on_disk).unwrap(), usage);
        // A row written before days were counted reads as day -1.
        usage[0].day = -1;
        let before_days = r#"[{"sink":3,"period":20000,"requests":2,"charged_cu":90}]"#;
        assert_eq!(usage_from_json(before_days).unwrap(), usage);
        let error = lots_from_json(r#"[{"remaining_cu":1,"expires_at_ms":null,"source":"loan"}]"#)
            .unwrap_err();
        assert!(error.contains("unknown lot source \"loan\""), "{error}");
    }
}
