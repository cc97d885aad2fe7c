//! The operator's config file, checked in full before anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;
use stipend_ledger::StipendPolicy;
use stipend_ledger::policy::STIPEND_MAX_CU;
use stipend_ledger::units::{
    default_price_cu_per_token, parse_amount_cu, parse_duration, parse_params,
};

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
    listen: Option<String>,
    max_tokens_default: Option<i64>,
    #[serde(default)]
    stipend: RawStipend,
    #[serde(default)]
    models: Vec<RawModel>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: Option<String>,
    backend: Option<String>,
    base_url: Option<String>,
    api_key_env: Option<String>,
    upstream_model: Option<String>,
    params: Option<AmountText>,
    price_prompt_cu: Option<i64>,
    price_completion_cu: Option<i64>,
    max_concurrency: Option<i64>,
    timeout: Option<String>,
}

/// Where clients reach the API when the config does not say.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:8080";
/// Completion tokens reserved when a request gives no `max_tokens`, when the config does not say.
pub const MAX_TOKENS_DEFAULT: u64 = 1_024;
/// In-flight requests per upstream model, when the config does not say.
pub const MAX_CONCURRENCY_DEFAULT: usize = 64;
/// The longest an upstream may take, when the config does not say.
pub const UPSTREAM_TIMEOUT_DEFAULT: &str = "60s";

/// One configured model.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The name clients ask for.
    pub name: String,
    /// The upstream's base URL, e.g. `http://127.0.0.1:9000/v1`.
    pub base_url: String,
    /// The upstream's API key, read from the environment at start-up.
    pub api_key: Option<String>,
    /// The name the upstream knows.
    pub upstream_model: String,
    /// cu per prompt token.
    pub price_prompt_cu: u64,
    /// cu per completion token.
    pub price_completion_cu: u64,
    /// At most this many requests in flight upstream.
    pub max_concurrency: usize,
    /// The longest the upstream may take to start answering, and between stream chunks.
    pub timeout: std::time::Duration,
}

fn model_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/'))
}

fn check_model(
    index: usize,
    raw: RawModel,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<ModelConfig> {
    let key = |field: &str| format!("models[{index}].{field}");
    let name = raw
        .name
        .with_context(|| format!("{} is missing", key("name")))?;
    if !model_name_ok(&name) {
        bail!(
            "{}: {name:?} must be 1 to 128 of letters, digits and - _ . : /",
            key("name")
        );
    }
    match raw.backend.as_deref() {
        Some("openai") => {}
        Some("embedded") => bail!(
            "{}: \"embedded\" is not in this build yet; use \"openai\" with an OpenAI-compatible server",
            key("backend")
        ),
        Some(other) => bail!(
            "{}: unknown backend {other:?} (use \"openai\")",
            key("backend")
        ),
        None => bail!("{} is missing (use \"openai\")", key("backend")),
    }
    let base_url = raw
        .base_url
        .with_context(|| format!("{} is missing", key("base_url")))?;
    if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
        bail!(
            "{}: {base_url:?} must start with http:// or https://",
            key("base_url")
        );
    }
    let api_key = match raw.api_key_env {
        None => None,
        Some(variable) => Some(
            env(&variable)
                .filter(|value| !value.is_empty())
                .with_context(|| {
                    format!(
                        "{}: the environment variable {variable} is not set",
                        key("api_key_env")
                    )
                })?,
        ),
    };
    let from_params = match &raw.params {
        None => None,
        Some(AmountText::Cu(count)) => Some(default_price_cu_per_token(*count)),
        Some(AmountText::Text(text)) => Some(default_price_cu_per_token(
            parse_params(text).with_context(|| key("params"))?,
        )),
    };
    let price = |field: &str, explicit: Option<i64>| -> anyhow::Result<u64> {
        match (explicit, from_params) {
            (Some(cu), _) if cu >= 1 && cu as u64 <= STIPEND_MAX_CU => Ok(cu as u64),
            (Some(cu), _) => bail!("{}: must be at least 1 cu, got {cu}", key(field)),
            (None, Some(cu)) => Ok(cu),
            (None, None) => bail!(
                "{}: give the model's `params` (active parameters, e.g. \"8B\") or explicit prices",
                key(field)
            ),
        }
    };
    let price_prompt_cu = price("price_prompt_cu", raw.price_prompt_cu)?;
    let price_completion_cu = price("price_completion_cu", raw.price_completion_cu)?;
    let max_concurrency = match raw.max_concurrency {
        None => MAX_CONCURRENCY_DEFAULT,
        Some(n) if (1..=100_000).contains(&n) => n as usize,
        Some(n) => bail!(
            "{}: must be from 1 to 100000, got {n}",
            key("max_concurrency")
        ),
    };
    let timeout_text = raw.timeout.as_deref().unwrap_or(UPSTREAM_TIMEOUT_DEFAULT);
    let timeout = parse_duration(timeout_text).with_context(|| key("timeout"))?;
    if timeout < std::time::Duration::from_secs(1)
        || timeout > stipend_gateway::UPSTREAM_TIMEOUT_MAX
    {
        bail!(
            "{}: must be from 1s to 10m, got {timeout_text}",
            key("timeout")
        );
    }
    Ok(ModelConfig {
        upstream_model: raw.upstream_model.unwrap_or_else(|| name.clone()),
        name,
        base_url,
        api_key,
        price_prompt_cu,
        price_completion_cu,
        max_concurrency,
        timeout,
    })
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
    /// Where the HTTP API listens.
    pub listen: SocketAddr,
    /// Completion tokens reserved when a request gives no `max_tokens`.
    pub max_tokens_default: u64,
    /// The models.
    pub models: Vec<ModelConfig>,
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
        Config::parse_with_env(text, source, &|name| std::env::var(name).ok())
    }

    /// [`Config::parse`], reading environment variables through `env`.
    pub fn parse_with_env(
        text: &str,
        source: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Config> {
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
            // Beside the config file when there is one, like any relative path in it.
            None => base.join("data"),
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
        let listen_text = raw.listen.as_deref().unwrap_or(LISTEN_DEFAULT);
        let listen: SocketAddr = listen_text.parse().with_context(|| {
            format!("config {name}: listen: {listen_text:?} is not an address like 127.0.0.1:8080")
        })?;
        let max_tokens_default = match raw.max_tokens_default {
            None => MAX_TOKENS_DEFAULT,
            Some(n) if (1..=131_072).contains(&n) => n as u64,
            Some(n) => bail!("config {name}: max_tokens_default must be from 1 to 131072, got {n}"),
        };
        let mut models = Vec::with_capacity(raw.models.len());
        for (index, raw_model) in raw.models.into_iter().enumerate() {
            let model =
                check_model(index, raw_model, env).with_context(|| format!("config {name}"))?;
            if models
                .iter()
                .any(|other: &ModelConfig| other.name == model.name)
            {
                bail!(
                    "config {name}: models[{index}].name: {:?} is used twice",
                    model.name
                );
            }
            models.push(model);
        }
        Ok(Config {
            source: source.map(Path::to_path_buf),
            data_dir,
            policy,
            listen,
            max_tokens_default,
            models,
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
    fn models_and_the_gateway_keys() {
        let text = r#"
            listen = "127.0.0.1:9999"
            max_tokens_default = 256
            [[models]]
            name = "local-upstream"
            backend = "openai"
            base_url = "http://127.0.0.1:9000/v1"
            api_key_env = "UPSTREAM_API_KEY"
            upstream_model = "llama-3.1-8b"
            params = "8B"
            max_concurrency = 8
            timeout = "30s"
            [[models]]
            name = "cheap"
            backend = "openai"
            base_url = "https://example.org/v1"
            price_prompt_cu = 2
            price_completion_cu = 3
        "#;
        let env = |name: &str| (name == "UPSTREAM_API_KEY").then(|| "secret".to_string());
        let config = Config::parse_with_env(text, None, &env).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:9999");
        assert_eq!(config.max_tokens_default, 256);
        let first = &config.models[0];
        assert_eq!(first.upstream_model, "llama-3.1-8b");
        assert_eq!((first.price_prompt_cu, first.price_completion_cu), (16, 16));
        assert_eq!(first.api_key.as_deref(), Some("secret"));
        assert_eq!(first.max_concurrency, 8);
        assert_eq!(first.timeout.as_secs(), 30);
        let second = &config.models[1];
        assert_eq!(second.upstream_model, "cheap");
        assert_eq!((second.price_prompt_cu, second.price_completion_cu), (2, 3));
        assert_eq!(second.max_concurrency, MAX_CONCURRENCY_DEFAULT);
        let defaults = Config::parse("", None).unwrap();
        assert_eq!(defaults.listen.to_string(), LISTEN_DEFAULT);
        assert!(defaults.models.is_empty());
    }

    #[test]
    fn bad_models_name_the_key() {
        let model = |extra: &str| {
            format!(
                "[[models]]\nname = \"m\"\nbackend = \"openai\"\nbase_url = \"http://x/v1\"\nparams = \"1B\"\n{extra}"
            )
        };
        for (text, expected) in [
            (
                "[[models]]\nbackend = \"openai\"".to_string(),
                "models[0].name is missing",
            ),
            ("[[models]]\nname = \"a b\"".to_string(), "models[0].name"),
            (
                "[[models]]\nname = \"m\"\nbackend = \"vllm\"".to_string(),
                "unknown backend",
            ),
            (
                "[[models]]\nname = \"m\"\nbackend = \"openai\"".to_string(),
                "models[0].base_url is missing",
            ),
            (
                "[[models]]\nname = \"m\"\nbackend = \"openai\"\nbase_url = \"ftp://x\""
                    .to_string(),
                "http://",
            ),
            (
                "[[models]]\nname = \"m\"\nbackend = \"openai\"\nbase_url = \"http://x\""
                    .to_string(),
                "params",
            ),
            (
                model("api_key_env = \"NOPE_NOT_SET\""),
                "NOPE_NOT_SET is not set",
            ),
            (model("max_concurrency = 0"), "models[0].max_concurrency"),
            (model("timeout = \"2h\""), "models[0].timeout"),
            (model("price_prompt_cu = 0"), "models[0].price_prompt_cu"),
            (format!("{}\n{}", model(""), model("")), "used twice"),
            ("listen = \"localhost\"".to_string(), "listen"),
            ("max_tokens_default = 0".to_string(), "max_tokens_default"),
        ] {
            let message = error(&text);
            assert!(message.contains(expected), "{text:?}: {message}");
        }
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
