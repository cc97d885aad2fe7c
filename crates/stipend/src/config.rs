//! The operator's config file, checked in full before anything starts.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;
use stipend_ledger::StipendPolicy;
use stipend_ledger::units::{parse_amount_cu, parse_duration};

/// The file name looked for in the working directory when no `--config` is given.
pub const CONFIG_FILE_DEFAULT: &str = "stipend.toml";

/// The default stipend: 10 PFLOP per person per day, and one day's worth may roll over.
pub const STIPEND_AMOUNT_DEFAULT: &str = "10 PFLOP";
/// The default period.
pub const STIPEND_PERIOD_DEFAULT: &str = "1d";

/// An amount as written in the file: an integer (cu) or a string with a unit.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum AmountText {
    Cu(u64),
    Text(String),
}

impl AmountText {
    fn parse(&self, key: &str) -> anyhow::Result<u64> {
        match self {
            AmountText::Cu(cu) => Ok(*cu),
            AmountText::Text(text) => parse_amount_cu(text).with_context(|| key.to_string()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    data_dir: Option<PathBuf>,
    #[serde(default)]
    stipend: RawStipend,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStipend {
    amount: Option<AmountText>,
    period: Option<String>,
    rollover_max: Option<AmountText>,
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the file came from, if anywhere.
    pub source: Option<PathBuf>,
    /// The data directory (the embedded store lives here).
    pub data_dir: PathBuf,
    /// The stipend policy.
    pub policy: StipendPolicy,
}

impl Config {
    /// The embedded store's file.
    pub fn store_path(&self) -> PathBuf {
        self.data_dir.join("ledger.db")
    }

    /// The control socket a running server listens on.
    pub fn socket_path(&self) -> PathBuf {
        self.data_dir.join("stipend.sock")
    }

    /// Loads the config: from `explicit` if given (it must exist), else `stipend.toml` in the
    /// working directory if present, else the defaults.
    pub fn load(explicit: Option<&Path>) -> anyhow::Result<Config> {
        match explicit {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                Config::parse(&text, Some(path))
            }
            None => {
                let path = Path::new(CONFIG_FILE_DEFAULT);
                if path.exists() {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read config file {}", path.display()))?;
                    Config::parse(&text, Some(path))
                } else {
                    Config::parse("", None)
                }
            }
        }
    }

    /// Parses and checks a config file's text. Relative paths in a file are relative to the
    /// file's directory, so a config means the same thing from wherever it is used.
    pub fn parse(text: &str, source: Option<&Path>) -> anyhow::Result<Config> {
        let name = source.map_or_else(|| "the defaults".to_string(), |p| p.display().to_string());
        let raw: RawConfig =
            toml::from_str(text).with_context(|| format!("config file {name} is not valid"))?;
        let base = source
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let data_dir = match raw.data_dir {
            Some(dir) if dir.as_os_str().is_empty() => bail!("{name}: data_dir must not be empty"),
            Some(dir) if dir.is_relative() => base.join(dir),
            Some(dir) => dir,
            None => PathBuf::from("data"),
        };
        let amount_cu = match &raw.stipend.amount {
            Some(amount) => amount.parse("stipend.amount"),
            None => parse_amount_cu(STIPEND_AMOUNT_DEFAULT).context("stipend.amount"),
        }
        .with_context(|| format!("config {name}"))?;
        let period_text = raw
            .stipend
            .period
            .as_deref()
            .unwrap_or(STIPEND_PERIOD_DEFAULT);
        let period = parse_duration(period_text)
            .context("stipend.period")
            .with_context(|| format!("config {name}"))?;
        let rollover_max_cu = match &raw.stipend.rollover_max {
            Some(amount) => amount
                .parse("stipend.rollover_max")
                .with_context(|| format!("config {name}"))?,
            // One period's worth, by default.
            None => amount_cu,
        };
        let policy = StipendPolicy::new(amount_cu, period, rollover_max_cu)
            .with_context(|| format!("config {name}"))?;
        Ok(Config {
            source: source.map(Path::to_path_buf),
            data_dir,
            policy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> String {
        format!(
            "{:#}",
            Config::parse(text, Some(Path::new("/etc/stipend.toml"))).unwrap_err()
        )
    }

    #[test]
    fn defaults_and_a_full_file() {
        let config = Config::parse("", None).unwrap();
        assert_eq!(config.policy.amount_cu(), 10_000_000);
        assert_eq!(config.policy.rollover_max_cu(), 10_000_000);
        assert_eq!(config.policy.period().as_secs(), 86_400);
        assert_eq!(config.data_dir, PathBuf::from("data"));

        let config = Config::parse(
            r#"
            data_dir = "./state"
            [stipend]
            amount = "3.5 TFLOP"
            period = "1h"
            rollover_max = 1000
            "#,
            Some(Path::new("/etc/stipend/stipend.toml")),
        )
        .unwrap();
        assert_eq!(config.policy.amount_cu(), 3_500);
        assert_eq!(config.policy.rollover_max_cu(), 1_000);
        assert_eq!(config.policy.period().as_secs(), 3_600);
        assert_eq!(config.data_dir, PathBuf::from("/etc/stipend/./state"));
        assert_eq!(
            config.store_path(),
            PathBuf::from("/etc/stipend/./state/ledger.db")
        );
    }

    #[test]
    fn bad_files_name_the_key_and_the_problem() {
        let message = error("[stipend]\namount = \"ten\"");
        assert!(
            message.contains("stipend.amount") && message.contains("not a number"),
            "{message}"
        );
        let message = error("[stipend]\namount = \"1.5 GFLOP\"");
        assert!(message.contains("whole number"), "{message}");
        let message = error("[stipend]\nperiod = \"1w\"");
        assert!(
            message.contains("stipend.period") && message.contains("unknown unit"),
            "{message}"
        );
        let message = error("[stipend]\namount = 0");
        assert!(message.contains("stipend.amount must be"), "{message}");
        let message = error("[stipend]\nperiod = \"500ms\"");
        assert!(message.contains("stipend.period must be"), "{message}");
        let message = error("[stipend]\nrollover_max = \"-1\"");
        assert!(
            message.contains("stipend.rollover_max") && message.contains("negative"),
            "{message}"
        );
        let message = error("colour = \"blue\"");
        assert!(message.contains("colour"), "{message}");
        let message = error("[stipend\n");
        assert!(
            message.contains("/etc/stipend.toml is not valid"),
            "{message}"
        );
        let message = error("data_dir = \"\"");
        assert!(message.contains("data_dir must not be empty"), "{message}");
    }
}
