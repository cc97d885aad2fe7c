//! The operator's config file, checked in full before anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use stipend_ledger::StipendPolicy;
use stipend_ledger::limits::STIPEND_MAX_CU;
use stipend_ledger::units::{
    default_price_cu_per_token, format_duration, parse_amount_cu, parse_duration, parse_params,
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
    metrics_listen: Option<String>,
    max_tokens_default: Option<i64>,
    queue_depth_max_per_person: Option<i64>,
    queue_depth_max: Option<i64>,
    queue_wait_max: Option<String>,
    client_read_timeout: Option<String>,
    drain_timeout: Option<String>,
    store_cache_mb: Option<i64>,
    database_url: Option<String>,
    lease_ttl: Option<String>,
    workers: Option<i64>,
    transparency_epsilon: Option<f64>,
    transparency_clip_cu: Option<AmountText>,
    #[serde(default)]
    stipend: RawStipend,
    #[serde(default)]
    models: Vec<RawModel>,
    agents: Option<RawAgents>,
    #[serde(default)]
    toolsets: Vec<RawToolset>,
    web: Option<RawWeb>,
}

/// `[web]`: the pages' sessions.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWeb {
    session_ttl: Option<String>,
    sessions_max: Option<i64>,
}

/// `[agents]`: how runs go.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgents {
    default_policy: Option<String>,
    tool_timeout: Option<String>,
    tool_output_bytes_max: Option<i64>,
    max_steps: Option<i64>,
    step_max_tokens: Option<i64>,
    active_runs_per_person_max: Option<i64>,
    kept_runs_per_person_max: Option<i64>,
}

/// `[[toolsets]]`: an MCP server runs may use.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToolset {
    name: Option<String>,
    command: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    policy: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    shared: bool,
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
    price_cached_prompt_cu: Option<i64>,
    price_completion_cu: Option<i64>,
    prefix_cache: Option<String>,
    max_concurrency: Option<i64>,
    timeout: Option<String>,
    ca_file: Option<PathBuf>,
    path: Option<PathBuf>,
    slots: Option<i64>,
    context: Option<i64>,
    threads: Option<i64>,
}

/// Where clients reach the API when the config does not say.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:8080";
/// Completion tokens reserved when a request gives no `max_tokens`, when the config does not say.
pub const MAX_TOKENS_DEFAULT: u64 = 1_024;
/// In-flight requests per upstream model, when the config does not say.
pub const MAX_CONCURRENCY_DEFAULT: usize = 64;
/// The longest an upstream may take, when the config does not say.
pub const UPSTREAM_TIMEOUT_DEFAULT: &str = "60s";

/// Where the embedded default model is kept when there is no config file.
pub const MODELS_DIR_DEFAULT: &str = "models";
/// The embedded default model's name.
pub const EMBEDDED_DEFAULT_NAME: &str = "smollm2-135m";
/// Sequence slots of an embedded model, when the config does not say.
pub const SLOTS_DEFAULT: u32 = 8;
/// Tokens of context per slot of an embedded model, when the config does not say.
pub const CONTEXT_DEFAULT: u32 = 2_048;

/// The default `client_read_timeout`: nginx's `client_header_timeout`, and a minute for a body
/// of up to the 4 MiB limit on a slow uplink.
pub const CLIENT_READ_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);

/// The default `lease_ttl`: how long a node's lease lives without renewal.
pub const LEASE_TTL_DEFAULT: Duration = Duration::from_secs(30);

/// The default `drain_timeout`: how long calls in flight may take to finish after a shutdown
/// signal before they are cut off.
pub const DRAIN_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// One configured model.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The name clients ask for.
    pub name: String,
    /// Where it runs.
    pub backend: BackendConfig,
    /// cu per prompt token; `None`: from the GGUF's parameter count (embedded models only).
    pub price_prompt_cu: Option<u64>,
    /// cu per prompt token an embedded model reads from its prefix cache; `None`:
    /// [`CACHED_PROMPT_PRICE_DEFAULT_CU`]. Never more than the prompt price.
    pub price_cached_prompt_cu: Option<u64>,
    /// cu per completion token; `None` as for the prompt.
    pub price_completion_cu: Option<u64>,
}

/// The default price of a prompt token read from an embedded model's prefix cache: the FLOPs
/// computed for it in the call, which are none (its keys and values were computed by an earlier
/// call, and are only read). The attention that reads them is the work of the tokens computed,
/// which the 2 × parameters rule of the other prices leaves out for every token alike.
pub const CACHED_PROMPT_PRICE_DEFAULT_CU: u64 = 0;

/// Where a configured model runs.
#[derive(Debug, Clone)]
pub enum BackendConfig {
    /// An OpenAI-compatible server.
    Upstream {
        /// The base URL, e.g. `http://127.0.0.1:9000/v1`.
        base_url: String,
        /// The API key, read from the environment at start-up.
        api_key: Option<String>,
        /// The name the upstream knows.
        upstream_model: String,
        /// At most this many requests in flight upstream.
        max_concurrency: usize,
        /// The longest the upstream may take to start answering, and between stream chunks.
        timeout: std::time::Duration,
        /// What TLS trusts for an `https://` upstream: the platform's store, plus `ca_file`'s
        /// certificates if set.
        roots: stipend_gateway::upstream::Roots,
    },
    /// A GGUF run in this process.
    Embedded {
        /// The file.
        path: PathBuf,
        /// Generations decoded together.
        slots: u32,
        /// Tokens of context per slot.
        context: u32,
        /// CPU threads (`None`: all cores).
        threads: Option<u32>,
        /// Whose cached prompt prefixes a call may reuse (`prefix_cache`: "person", "shared" or
        /// "off").
        prefix_cache: stipend_model::PrefixCache,
    },
}

impl ModelConfig {
    /// The embedded default: SmolLM2-135M-Instruct from `models_dir`.
    pub fn embedded_default(models_dir: &Path) -> ModelConfig {
        ModelConfig {
            name: EMBEDDED_DEFAULT_NAME.to_string(),
            backend: BackendConfig::Embedded {
                path: models_dir.join(crate::fetch::DEFAULT_MODEL_FILE),
                slots: SLOTS_DEFAULT,
                context: CONTEXT_DEFAULT,
                threads: None,
                prefix_cache: stipend_model::PrefixCache::PerOwner,
            },
            price_prompt_cu: None,
            price_cached_prompt_cu: None,
            price_completion_cu: None,
        }
    }
}

fn model_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/'))
}

/// Refuses a field that belongs to the other backend.
fn only(
    key: &dyn Fn(&str) -> String,
    field: &str,
    present: bool,
    backend: &str,
) -> anyhow::Result<()> {
    if present {
        bail!("{}: only for backend = \"{backend}\"", key(field));
    }
    Ok(())
}

/// An embedded model's part of `[[models]]`: its GGUF, slots, context and threads.
fn check_embedded(
    raw: &RawModel,
    base: &Path,
    key: &dyn Fn(&str) -> String,
) -> anyhow::Result<BackendConfig> {
    for (field, present) in [
        ("base_url", raw.base_url.is_some()),
        ("api_key_env", raw.api_key_env.is_some()),
        ("upstream_model", raw.upstream_model.is_some()),
        ("max_concurrency", raw.max_concurrency.is_some()),
        ("timeout", raw.timeout.is_some()),
        ("ca_file", raw.ca_file.is_some()),
    ] {
        only(key, field, present, "openai")?;
    }
    let prefix_cache = match raw.prefix_cache.as_deref() {
        None => stipend_model::PrefixCache::default(),
        Some(name) => stipend_model::PrefixCache::from_name(name).with_context(|| {
            let modes: Vec<String> = stipend_model::PrefixCache::ALL
                .iter()
                .map(|mode| format!("{:?}", mode.name()))
                .collect();
            format!(
                "{}: unknown mode {name:?} (use {})",
                key("prefix_cache"),
                modes.join(", ")
            )
        })?,
    };
    // A relative path is the config file's; `join` keeps an absolute one as it is.
    let path = base.join(
        raw.path
            .as_ref()
            .with_context(|| format!("{} is missing (the GGUF file)", key("path")))?,
    );
    let bounded =
        |field: &str, value: Option<i64>, default: u32, range: std::ops::RangeInclusive<i64>| {
            match value {
                None => Ok(default),
                Some(n) if range.contains(&n) => Ok(n as u32),
                Some(n) => Err(anyhow::anyhow!(
                    "{}: must be from {} to {}, got {n}",
                    key(field),
                    range.start(),
                    range.end()
                )),
            }
        };
    Ok(BackendConfig::Embedded {
        path,
        slots: bounded(
            "slots",
            raw.slots,
            SLOTS_DEFAULT,
            1..=i64::from(stipend_model::SLOTS_MAX),
        )?,
        context: bounded("context", raw.context, CONTEXT_DEFAULT, 64..=131_072)?,
        threads: match raw.threads {
            None => None,
            Some(n) => Some(bounded("threads", Some(n), 0, 1..=1_024)?),
        },
        prefix_cache,
    })
}

/// An upstream model's part of `[[models]]`: where it is, its key, how many calls at once, its
/// timeout and the CAs that vouch for it.
fn check_upstream(
    raw: &RawModel,
    name: &str,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    key: &dyn Fn(&str) -> String,
) -> anyhow::Result<BackendConfig> {
    for (field, present) in [
        ("path", raw.path.is_some()),
        ("slots", raw.slots.is_some()),
        ("context", raw.context.is_some()),
        ("threads", raw.threads.is_some()),
        ("prefix_cache", raw.prefix_cache.is_some()),
        (
            "price_cached_prompt_cu",
            raw.price_cached_prompt_cu.is_some(),
        ),
    ] {
        only(key, field, present, "embedded")?;
    }
    let base_url = raw
        .base_url
        .clone()
        .with_context(|| format!("{} is missing", key("base_url")))?;
    if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
        bail!(
            "{}: {base_url:?} must start with http:// or https://",
            key("base_url")
        );
    }
    let api_key = match &raw.api_key_env {
        None => None,
        Some(variable) => Some(
            env(variable)
                .filter(|value| !value.is_empty())
                .with_context(|| {
                    format!(
                        "{}: the environment variable {variable} is not set",
                        key("api_key_env")
                    )
                })?,
        ),
    };
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
    let roots = match &raw.ca_file {
        None => stipend_gateway::upstream::Roots::Platform,
        Some(path) => {
            // A relative path is the config file's; `join` keeps an absolute one as it is.
            stipend_gateway::upstream::Roots::platform_and_pem_file(&base.join(path))
                .map_err(|error| anyhow::anyhow!("{}: {error}", key("ca_file")))?
        }
    };
    Ok(BackendConfig::Upstream {
        base_url,
        api_key,
        upstream_model: raw
            .upstream_model
            .clone()
            .unwrap_or_else(|| name.to_string()),
        max_concurrency,
        timeout,
        roots,
    })
}

fn check_model(
    index: usize,
    raw: RawModel,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<ModelConfig> {
    let key = |field: &str| format!("models[{index}].{field}");
    let name = raw
        .name
        .clone()
        .with_context(|| format!("{} is missing", key("name")))?;
    if !model_name_ok(&name) {
        bail!(
            "{}: {name:?} must be 1 to 128 of letters, digits and - _ . : /",
            key("name")
        );
    }
    let embedded = match raw.backend.as_deref() {
        Some("openai") => false,
        Some("embedded") => true,
        Some(other) => bail!(
            "{}: unknown backend {other:?} (use \"openai\" or \"embedded\")",
            key("backend")
        ),
        None => bail!(
            "{} is missing (use \"openai\" or \"embedded\")",
            key("backend")
        ),
    };
    let backend = if embedded {
        check_embedded(&raw, base, &key)?
    } else {
        check_upstream(&raw, &name, base, env, &key)?
    };
    let from_params = match &raw.params {
        None => None,
        Some(AmountText::Cu(count)) => Some(default_price_cu_per_token(*count)),
        Some(AmountText::Text(text)) => Some(default_price_cu_per_token(
            parse_params(text).with_context(|| key("params"))?,
        )),
    };
    let price = |field: &str, explicit: Option<i64>| -> anyhow::Result<Option<u64>> {
        match (explicit, from_params) {
            (Some(cu), _) if cu >= 1 && cu as u64 <= STIPEND_MAX_CU => Ok(Some(cu as u64)),
            (Some(cu), _) => bail!(
                "{}: must be from 1 to {STIPEND_MAX_CU} cu, got {cu}",
                key(field)
            ),
            (None, Some(cu)) => Ok(Some(cu)),
            // An embedded model's parameter count is read from its GGUF.
            (None, None) if embedded => Ok(None),
            (None, None) => bail!(
                "{}: give the model's `params` (active parameters, e.g. \"8B\") or explicit prices",
                key(field)
            ),
        }
    };
    let price_prompt_cu = price("price_prompt_cu", raw.price_prompt_cu)?;
    let price_completion_cu = price("price_completion_cu", raw.price_completion_cu)?;
    // A cached token may be free; never dearer than a computed one, so that a call's worst
    // case, priced as if nothing were cached, still bounds what it is charged.
    let price_cached_prompt_cu = match raw.price_cached_prompt_cu {
        None => None,
        Some(cu) if cu < 0 || cu as u64 > STIPEND_MAX_CU => bail!(
            "{}: must be from 0 to {STIPEND_MAX_CU} cu, got {cu}",
            key("price_cached_prompt_cu")
        ),
        Some(cu) => match price_prompt_cu {
            Some(prompt) if cu as u64 > prompt => bail!(
                "{}: must be at most price_prompt_cu ({prompt}), got {cu}",
                key("price_cached_prompt_cu")
            ),
            _ => Some(cu as u64),
        },
    };
    Ok(ModelConfig {
        name,
        backend,
        price_prompt_cu,
        price_cached_prompt_cu,
        price_completion_cu,
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
    /// Where `/metrics` is served, if apart from the API (then the API does not serve it).
    pub metrics_listen: Option<SocketAddr>,
    /// Completion tokens reserved when a request gives no `max_tokens`.
    pub max_tokens_default: u64,
    /// The fair-share queue's bounds, for every model.
    pub queue: stipend_gateway::queue::QueueOptions,
    /// The longest a client may take to send a request's head (also: how long a kept-alive
    /// connection may sit idle), and, once that came, its body.
    pub client_read_timeout: Duration,
    /// How long calls in flight may take to finish after a shutdown signal; then they are cut
    /// off, charged for what they delivered, and told so (`cut_short`).
    pub drain_timeout: Duration,
    /// The embedded store's page cache, in bytes.
    pub store_cache_bytes: u64,
    /// The PostgreSQL database that holds the ledger instead of the embedded store, if one is
    /// configured (`database_url`, or `STIPEND_DATABASE_URL`).
    pub database_url: Option<DatabaseUrl>,
    /// How long a node's lease on a person's balance lives without renewal (with
    /// `database_url`): a killed node's leases come back after this.
    pub lease_ttl: Duration,
    /// Threads serving HTTP (`None`: half the cores, at least one).
    pub workers: Option<usize>,
    /// The models.
    pub models: Vec<ModelConfig>,
    /// Agent runs: their limits and the toolsets they may use (their working directories are
    /// under `data_dir/agents`).
    pub agents: stipend_agents::AgentsOptions,
    /// The web pages' sessions.
    pub web: stipend_web::WebOptions,
}

/// A PostgreSQL URL, which may hold a password: shown only as the database and host it names.
#[derive(Clone)]
pub struct DatabaseUrl {
    url: String,
    description: String,
}

impl DatabaseUrl {
    /// The URL itself, to connect with.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.description)
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DatabaseUrl({})", self.description)
    }
}

/// The environment variable that gives `database_url` when the config file does not.
pub const DATABASE_URL_ENV: &str = "STIPEND_DATABASE_URL";

impl Config {
    /// The embedded store's file.
    pub fn store_path(&self) -> PathBuf {
        self.data_dir.join("ledger.db")
    }

    /// The control socket a running server listens on.
    pub fn socket_path(&self) -> PathBuf {
        self.data_dir.join("control").join("stipend.sock")
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
                    // No config file: the defaults, with the embedded default model, so that
                    // `stipend serve` works out of the box.
                    let mut config = Config::parse("", None)?;
                    config
                        .models
                        .push(ModelConfig::embedded_default(Path::new(MODELS_DIR_DEFAULT)));
                    Ok(config)
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
        let metrics_listen = match raw.metrics_listen.as_deref() {
            None => None,
            Some(text) => Some(text.parse::<SocketAddr>().with_context(|| {
                format!(
                    "config {name}: metrics_listen: {text:?} is not an address like 127.0.0.1:9464"
                )
            })?),
        };
        let max_tokens_default = match raw.max_tokens_default {
            None => MAX_TOKENS_DEFAULT,
            Some(n) if (1..=131_072).contains(&n) => n as u64,
            Some(n) => bail!("config {name}: max_tokens_default must be from 1 to 131072, got {n}"),
        };
        let defaults = stipend_gateway::queue::QueueOptions::default();
        let depth = |key: &str, value: Option<i64>, default: usize| -> anyhow::Result<usize> {
            match value {
                None => Ok(default),
                Some(n) if (1..=1_000_000).contains(&n) => Ok(n as usize),
                Some(n) => bail!("config {name}: {key} must be from 1 to 1000000, got {n}"),
            }
        };
        let queue_wait_max = duration_key(
            &name,
            "queue_wait_max",
            raw.queue_wait_max.as_deref(),
            defaults.queue_wait_max,
            (
                Duration::from_millis(10),
                stipend_gateway::UPSTREAM_TIMEOUT_MAX,
            ),
            "from 10ms to 10m",
        )?;
        let queue = stipend_gateway::queue::QueueOptions {
            queue_depth_max_per_person: depth(
                "queue_depth_max_per_person",
                raw.queue_depth_max_per_person,
                defaults.queue_depth_max_per_person,
            )?,
            queue_depth_max: depth(
                "queue_depth_max",
                raw.queue_depth_max,
                defaults.queue_depth_max,
            )?,
            queue_wait_max,
        };
        let client_read_timeout = duration_key(
            &name,
            "client_read_timeout",
            raw.client_read_timeout.as_deref(),
            CLIENT_READ_TIMEOUT_DEFAULT,
            (Duration::from_secs(1), Duration::from_secs(600)),
            "from 1s to 10m",
        )?;
        let drain_timeout = duration_key(
            &name,
            "drain_timeout",
            raw.drain_timeout.as_deref(),
            DRAIN_TIMEOUT_DEFAULT,
            (Duration::ZERO, Duration::from_secs(3_600)),
            "from 0s to 1h",
        )?;
        let store_cache_bytes = match raw.store_cache_mb {
            None => stipend_store_sqlite::CACHE_BYTES_DEFAULT,
            Some(mb) if (1..=4_096).contains(&mb) => mb as u64 * 1024 * 1024,
            Some(mb) => bail!("config {name}: store_cache_mb must be from 1 to 4096, got {mb}"),
        };
        let from_env = || env(DATABASE_URL_ENV).filter(|url| !url.is_empty());
        let database_url = match raw.database_url.or_else(from_env) {
            None => None,
            Some(url) => Some(DatabaseUrl {
                description: stipend_store_postgres::check_url(&url)
                    .map_err(|error| anyhow::anyhow!("config {name}: {error}"))?,
                url,
            }),
        };
        let lease_ttl = duration_key(
            &name,
            "lease_ttl",
            raw.lease_ttl.as_deref(),
            LEASE_TTL_DEFAULT,
            (Duration::from_secs(2), Duration::from_secs(600)),
            "from 2s to 10m",
        )?;
        let workers = match raw.workers {
            None => None,
            Some(n) if (1..=1_024).contains(&n) => Some(n as usize),
            Some(n) => bail!("config {name}: workers must be from 1 to 1024, got {n}"),
        };
        let mut models = Vec::with_capacity(raw.models.len());
        for (index, raw_model) in raw.models.into_iter().enumerate() {
            let model = check_model(index, raw_model, &base, env)
                .with_context(|| format!("config {name}"))?;
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
        let agents = check_agents(
            raw.agents.unwrap_or_default(),
            raw.toolsets,
            data_dir.join("agents"),
        )
        .with_context(|| format!("config {name}"))?;
        let mut web =
            check_web(raw.web.unwrap_or_default()).with_context(|| format!("config {name}"))?;
        web.transparency = check_transparency(raw.transparency_epsilon, raw.transparency_clip_cu)
            .with_context(|| format!("config {name}"))?;
        Ok(Config {
            source: source.map(Path::to_path_buf),
            data_dir,
            policy,
            listen,
            metrics_listen,
            max_tokens_default,
            queue,
            client_read_timeout,
            drain_timeout,
            store_cache_bytes,
            database_url,
            lease_ttl,
            workers,
            models,
            agents,
            web,
        })
    }
}

/// Checks `transparency_epsilon` and `transparency_clip_cu`.
fn check_transparency(
    epsilon: Option<f64>,
    clip: Option<AmountText>,
) -> anyhow::Result<stipend_web::transparency::TransparencyOptions> {
    let mut options = stipend_web::transparency::TransparencyOptions::default();
    if let Some(epsilon) = epsilon {
        stipend_report::transparency::check_epsilon(epsilon).context("transparency_epsilon")?;
        if epsilon > 100.0 {
            bail!(
                "transparency_epsilon must be at most 100 (beyond it the noise hides nobody), got {epsilon}"
            );
        }
        options.epsilon = epsilon;
    }
    if let Some(clip) = clip {
        let clip_cu = clip.parse("transparency_clip_cu")?;
        if clip_cu == 0 {
            bail!("transparency_clip_cu must be at least 1 cu");
        }
        options.clip_cu = Some(clip_cu);
    }
    Ok(options)
}

/// Checks `[web]`.
fn check_web(raw: RawWeb) -> anyhow::Result<stipend_web::WebOptions> {
    use stipend_web::limits::SESSION_TTL_MAX;
    let mut options = stipend_web::WebOptions::default();
    if let Some(text) = raw.session_ttl {
        let ttl = parse_duration(&text).context("web.session_ttl")?;
        if ttl < Duration::from_secs(60) || ttl > SESSION_TTL_MAX {
            bail!(
                "web.session_ttl must be from 1min to {}, got {text}",
                format_duration(SESSION_TTL_MAX)
            );
        }
        options.session_ttl = ttl;
    }
    if let Some(max) = raw.sessions_max {
        if !(1..=10_000_000).contains(&max) {
            bail!("web.sessions_max must be from 1 to 10000000, got {max}");
        }
        options.sessions_max = max as usize;
    }
    Ok(options)
}

/// Checks `[agents]` and `[[toolsets]]`.
fn check_agents(
    raw: RawAgents,
    toolsets: Vec<RawToolset>,
    workdir_root: PathBuf,
) -> anyhow::Result<stipend_agents::AgentsOptions> {
    use stipend_agents::{Policy, ToolsetConfig};
    let mut options = stipend_agents::AgentsOptions::new(workdir_root);
    let policy = |key: &str, text: &str| {
        Policy::parse(text).ok_or_else(|| {
            anyhow::anyhow!("{key} must be \"auto\", \"ask\" or \"deny\", got {text:?}")
        })
    };
    if let Some(text) = raw.default_policy {
        options.default_policy = policy("agents.default_policy", &text)?;
    }
    if let Some(text) = raw.tool_timeout {
        let timeout = parse_duration(&text).context("agents.tool_timeout")?;
        if timeout < Duration::from_secs(1) || timeout > Duration::from_secs(3_600) {
            bail!("agents.tool_timeout must be from 1s to 1h, got {text}");
        }
        options.tool_timeout = timeout;
    }
    let bounded = |key: &str, value: Option<i64>, default: u64, low: i64, high: i64| match value {
        None => Ok(default),
        Some(n) if (low..=high).contains(&n) => Ok(n as u64),
        Some(n) => bail!("{key} must be from {low} to {high}, got {n}"),
    };
    options.tool_output_bytes_max = bounded(
        "agents.tool_output_bytes_max",
        raw.tool_output_bytes_max,
        options.tool_output_bytes_max as u64,
        256,
        1 << 20,
    )? as usize;
    options.max_steps_default = bounded(
        "agents.max_steps",
        raw.max_steps,
        u64::from(options.max_steps_default),
        1,
        i64::from(options.max_steps_max),
    )? as u32;
    options.step_max_tokens = bounded(
        "agents.step_max_tokens",
        raw.step_max_tokens,
        options.step_max_tokens,
        16,
        1 << 20,
    )?;
    options.active_runs_per_person_max = bounded(
        "agents.active_runs_per_person_max",
        raw.active_runs_per_person_max,
        options.active_runs_per_person_max as u64,
        1,
        100_000,
    )? as usize;
    options.kept_runs_per_person_max = bounded(
        "agents.kept_runs_per_person_max",
        raw.kept_runs_per_person_max,
        options.kept_runs_per_person_max as u64,
        1,
        1_000_000,
    )? as usize;
    for (index, raw) in toolsets.into_iter().enumerate() {
        let at = format!("toolsets[{index}]");
        let name = raw
            .name
            .filter(|name| !name.is_empty())
            .ok_or_else(|| anyhow::anyhow!("{at}.name is missing"))?;
        if name.len() > 32
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            bail!("{at}.name must be 1 to 32 of a-z, 0-9 and -, got {name:?}");
        }
        if options.toolsets.iter().any(|other| other.name == name) {
            bail!("{at}.name: {name:?} is used twice");
        }
        let command = raw
            .command
            .filter(|command| !command.is_empty())
            .ok_or_else(|| anyhow::anyhow!("{at}.command is missing"))?;
        let mut default = None;
        let mut overrides = std::collections::BTreeMap::new();
        for (tool, text) in raw.policy {
            let parsed = policy(&format!("{at}.policy.{tool}"), &text)?;
            if tool == "default" {
                default = Some(parsed);
            } else {
                overrides.insert(tool, parsed);
            }
        }
        if raw.shared && raw.args.iter().any(|arg| arg.contains("{workdir}")) {
            bail!(
                "{at}: a shared toolset serves every run, so its args cannot name a run's {{workdir}}"
            );
        }
        options.toolsets.push(ToolsetConfig {
            name,
            command,
            args: raw.args,
            default,
            overrides,
            shared: raw.shared,
        });
    }
    Ok(options)
}

/// A duration key of the config file: its default if absent, else parsed and checked to lie in
/// `range` (said as `range_text` when it does not).
fn duration_key(
    name: &str,
    key: &str,
    text: Option<&str>,
    default: Duration,
    range: (Duration, Duration),
    range_text: &str,
) -> anyhow::Result<Duration> {
    let Some(text) = text else {
        return Ok(default);
    };
    let duration = parse_duration(text)
        .context(key.to_string())
        .with_context(|| format!("config {name}"))?;
    if duration < range.0 || duration > range.1 {
        bail!("config {name}: {key} must be {range_text}, got {text}");
    }
    Ok(duration)
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
    fn a_database_url_comes_from_the_file_or_the_environment_and_its_password_stays_hidden() {
        let url = "postgres://stipend:s3cret@db.internal:5432/ledger";
        let from_env = |name: &str| (name == DATABASE_URL_ENV).then(|| url.to_string());
        let config = Config::parse_with_env("", None, &from_env).unwrap();
        let database = config.database_url.as_ref().unwrap();
        assert_eq!(database.url(), url);
        assert_eq!(database.to_string(), "database ledger on db.internal");
        assert!(!format!("{config:?}").contains("s3cret"));
        // The file wins over the environment; an empty variable is no URL.
        let text = "database_url = \"postgres://stipend@127.0.0.1/other\"";
        let config = Config::parse_with_env(text, None, &from_env).unwrap();
        assert_eq!(
            config.database_url.unwrap().url(),
            "postgres://stipend@127.0.0.1/other"
        );
        let empty = |_: &str| Some(String::new());
        assert!(
            Config::parse_with_env("", None, &empty)
                .unwrap()
                .database_url
                .is_none()
        );
        let error =
            Config::parse_with_env("database_url = \"sqlite://x\"", None, &|_| None).unwrap_err();
        assert!(
            format!("{error:#}").contains("must be a postgres:// URL"),
            "{error:#}"
        );
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
        assert_eq!(
            (first.price_prompt_cu, first.price_completion_cu),
            (Some(16), Some(16))
        );
        let BackendConfig::Upstream {
            upstream_model,
            api_key,
            max_concurrency,
            timeout,
            ..
        } = &first.backend
        else {
            panic!("{first:?}")
        };
        assert_eq!(upstream_model, "llama-3.1-8b");
        assert_eq!(api_key.as_deref(), Some("secret"));
        assert_eq!(*max_concurrency, 8);
        assert_eq!(timeout.as_secs(), 30);
        let second = &config.models[1];
        assert_eq!(
            (second.price_prompt_cu, second.price_completion_cu),
            (Some(2), Some(3))
        );
        let BackendConfig::Upstream {
            upstream_model,
            max_concurrency,
            ..
        } = &second.backend
        else {
            panic!("{second:?}")
        };
        assert_eq!(upstream_model, "cheap");
        assert_eq!(*max_concurrency, MAX_CONCURRENCY_DEFAULT);
        let defaults = Config::parse("", None).unwrap();
        assert_eq!(defaults.client_read_timeout, CLIENT_READ_TIMEOUT_DEFAULT);
        assert_eq!(defaults.drain_timeout, DRAIN_TIMEOUT_DEFAULT);
        assert_eq!(defaults.store_cache_bytes, 16 * 1024 * 1024);
        assert_eq!(
            Config::parse("store_cache_mb = 64", None)
                .unwrap()
                .store_cache_bytes,
            64 * 1024 * 1024
        );
        assert_eq!(
            Config::parse("drain_timeout = \"0s\"", None)
                .unwrap()
                .drain_timeout,
            Duration::ZERO
        );
        assert_eq!(
            Config::parse("client_read_timeout = \"2m\"", None)
                .unwrap()
                .client_read_timeout,
            Duration::from_secs(120)
        );
        assert_eq!(
            defaults.queue,
            stipend_gateway::queue::QueueOptions::default()
        );
        let queue = Config::parse(
            "queue_depth_max_per_person = 3\nqueue_depth_max = 30\nqueue_wait_max = \"5s\"",
            None,
        )
        .unwrap()
        .queue;
        assert_eq!(
            (
                queue.queue_depth_max_per_person,
                queue.queue_depth_max,
                queue.queue_wait_max.as_secs()
            ),
            (3, 30, 5)
        );
        assert_eq!(defaults.listen.to_string(), LISTEN_DEFAULT);
        assert!(defaults.models.is_empty());
    }

    #[test]
    fn an_embedded_model_next_to_upstream_ones() {
        let text = r#"
            [[models]]
            name = "local"
            backend = "embedded"
            path = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
            slots = 4
            context = 1024
            threads = 2
            [[models]]
            name = "tiny"
            backend = "embedded"
            path = "/srv/tiny.gguf"
            price_completion_cu = 5
            prefix_cache = "shared"
            price_cached_prompt_cu = 1
            [[models]]
            name = "big"
            backend = "openai"
            base_url = "http://127.0.0.1:9000/v1"
            params = "70B"
        "#;
        let config = Config::parse(text, Some(Path::new("/etc/stipend/stipend.toml"))).unwrap();
        let local = &config.models[0];
        // Prices come from the GGUF when the config gives none.
        assert_eq!(
            (local.price_prompt_cu, local.price_completion_cu),
            (None, None)
        );
        let BackendConfig::Embedded {
            path,
            slots,
            context,
            threads,
            prefix_cache,
        } = &local.backend
        else {
            panic!("{local:?}")
        };
        assert_eq!(
            path,
            Path::new("/etc/stipend/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        );
        assert_eq!((*slots, *context, *threads), (4, 1024, Some(2)));
        // Private by default, and free by default: nothing is computed for a cached token.
        assert_eq!(*prefix_cache, stipend_model::PrefixCache::PerOwner);
        assert_eq!(local.price_cached_prompt_cu, None);
        let tiny = &config.models[1];
        assert_eq!(
            (tiny.price_prompt_cu, tiny.price_completion_cu),
            (None, Some(5))
        );
        let BackendConfig::Embedded {
            path,
            slots,
            context,
            threads,
            prefix_cache,
        } = &tiny.backend
        else {
            panic!("{tiny:?}")
        };
        assert_eq!(*prefix_cache, stipend_model::PrefixCache::Shared);
        assert_eq!(tiny.price_cached_prompt_cu, Some(1));
        assert_eq!(path, Path::new("/srv/tiny.gguf"));
        assert_eq!(
            (*slots, *context, *threads),
            (SLOTS_DEFAULT, CONTEXT_DEFAULT, None)
        );
        assert_eq!(config.models[2].price_prompt_cu, Some(140));
        // The default the server uses with no config file.
        let default = ModelConfig::embedded_default(Path::new("models"));
        assert_eq!(default.name, EMBEDDED_DEFAULT_NAME);
    }

    #[test]
    fn an_upstream_ca_file_is_read_relative_to_the_config_file() {
        let config_path = stipend_testkit::repo_path("crates/gateway/tests/data/stipend.toml");
        let text = "[[models]]\nname = \"m\"\nbackend = \"openai\"\nbase_url = \"https://localhost:8443/v1\"\nparams = \"1B\"\nca_file = \"ca.pem\"";
        let config = Config::parse(text, Some(&config_path)).unwrap();
        let BackendConfig::Upstream { roots, .. } = &config.models[0].backend else {
            panic!("an upstream model");
        };
        assert!(
            matches!(roots, stipend_gateway::upstream::Roots::PlatformAnd(certificates) if certificates.len() == 1)
        );
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
            (
                model("price_prompt_cu = 9223372036854775807"),
                "price_prompt_cu: must be from 1 to",
            ),
            (model("slots = 4"), "models[0].slots: only for backend = \"embedded\""),
            (
                model("prefix_cache = \"off\""),
                "models[0].prefix_cache: only for backend = \"embedded\"",
            ),
            (
                model("price_cached_prompt_cu = 0"),
                "models[0].price_cached_prompt_cu: only for backend = \"embedded\"",
            ),
            (
                "[[models]]\nname = \"m\"\nbackend = \"embedded\"\npath = \"m.gguf\"\nprefix_cache = \"everyone\""
                    .to_string(),
                "models[0].prefix_cache: unknown mode \"everyone\"",
            ),
            (
                "[[models]]\nname = \"m\"\nbackend = \"embedded\"\npath = \"m.gguf\"\nprice_cached_prompt_cu = -1"
                    .to_string(),
                "models[0].price_cached_prompt_cu: must be from 0 to",
            ),
            (
                "[[models]]\nname = \"m\"\nbackend = \"embedded\"\npath = \"m.gguf\"\nprice_prompt_cu = 2\nprice_cached_prompt_cu = 3"
                    .to_string(),
                "models[0].price_cached_prompt_cu: must be at most price_prompt_cu (2), got 3",
            ),
            (
                model("ca_file = \"/nonexistent/ca.pem\""),
                "models[0].ca_file: cannot read /nonexistent/ca.pem",
            ),
            (
                "[[models]]\nname = \"m\"\nbackend = \"embedded\"\npath = \"m.gguf\"\nca_file = \"ca.pem\""
                    .to_string(),
                "models[0].ca_file: only for backend = \"openai\"",
            ),
            (
                "[[models]]\nname = \"m\"\nbackend = \"embedded\"".to_string(),
                "models[0].path is missing",
            ),
            (
                "[[models]]\nname = \"m\"\nbackend = \"embedded\"\npath = \"m.gguf\"\nslots = 0"
                    .to_string(),
                "models[0].slots: must be from 1 to 64",
            ),
            (
                "[[models]]\nname = \"m\"\nbackend = \"embedded\"\npath = \"m.gguf\"\ncontext = 10"
                    .to_string(),
                "models[0].context",
            ),
            (
                "[[models]]\nname = \"m\"\nbackend = \"embedded\"\npath = \"m.gguf\"\nbase_url = \"http://x\""
                    .to_string(),
                "models[0].base_url: only for backend = \"openai\"",
            ),
            (format!("{}\n{}", model(""), model("")), "used twice"),
            ("listen = \"localhost\"".to_string(), "listen"),
            ("metrics_listen = \"9464\"".to_string(), "metrics_listen"),
            ("max_tokens_default = 0".to_string(), "max_tokens_default"),
            ("queue_depth_max = 0".to_string(), "queue_depth_max must be"),
            ("workers = 0".to_string(), "workers must be"),
            ("store_cache_mb = 0".to_string(), "store_cache_mb must be"),
            (
                "queue_depth_max_per_person = -1".to_string(),
                "queue_depth_max_per_person must be",
            ),
            ("queue_wait_max = \"1h\"".to_string(), "queue_wait_max must be"),
            ("queue_wait_max = \"soon\"".to_string(), "queue_wait_max"),
            (
                "client_read_timeout = \"500ms\"".to_string(),
                "client_read_timeout must be",
            ),
            (
                "client_read_timeout = \"11m\"".to_string(),
                "client_read_timeout must be",
            ),
            (
                "drain_timeout = \"2h\"".to_string(),
                "drain_timeout must be",
            ),
            ("client_read_timeout = 5".to_string(), "client_read_timeout"),
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
