//! `stipend serve`: runs the ledger (the single-node engine on the embedded store, or an escrow
//! node on a PostgreSQL database that several servers share), serves the OpenAI-compatible API
//! and the control socket until it is told to stop, then drains (bounded) and flushes.

use crate::limits::{
    CUT_GRACE, KEY_CAPS_WRITE_INTERVAL, SWEEP_INTERVAL, TRANSPARENCY_CHECK_INTERVAL,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use stipend_gateway::queue::FairQueue;
use stipend_gateway::{Backend, Gateway, GatewayOptions, KeyRing, Model, Upstream, UpstreamConfig};
use stipend_ledger::node::{Node, NodeOptions};
use stipend_ledger::units::{default_price_cu_per_token, format_duration};
use stipend_ledger::{
    AccountId, AccountKind, Books, Budget, Flops, Ledger, LedgerOptions, RunJournal, Store,
    StoreError, SystemClock,
};
use stipend_model::{EmbeddedModel, LoadOptions};
use stipend_store_postgres::{
    LeaseRequest, PostgresBooks, PostgresEscrow, PostgresJournal, PostgresStore,
};
use stipend_store_sqlite::SqliteStore;

use crate::config::{BackendConfig, Config};
use crate::control;

/// Raises this process's limit on open files from its soft value to its hard one, as Go's
/// runtime and nginx's `worker_rlimit_nofile` do. Each client connection, upstream connection
/// and store file takes a descriptor, and the usual soft limit (1024 under systemd) would cap
/// the server near a thousand open streams while the hard limit (often 524288) allows far more.
/// Failing to raise it is not fatal: the server runs with what it has, and says so.
fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return;
    }
    let soft = limit.current;
    limit.current = limit.maximum;
    match setrlimit(Resource::Nofile, limit) {
        Ok(()) => tracing::info!(from = ?soft, to = ?limit.maximum, "open files limit raised"),
        Err(error) => tracing::warn!(%error, limit = ?soft, "cannot raise the open files limit"),
    }
}

/// Creates the data directory if needed, readable by the operator's user only: it holds who
/// spent how much, which is nobody else's business.
pub fn ensure_data_dir(config: &Config) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !config.data_dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.data_dir)
            .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
        return Ok(());
    }
    // One made by hand, or long ago: its files are private whatever it is (the store makes
    // them 0600), but their names and sizes would be seen. Said loudly, not changed: it may be
    // a directory the operator shares on purpose.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&config.data_dir)
        .with_context(|| format!("cannot read data_dir {}", config.data_dir.display()))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        let warning = format!(
            "warning: data_dir {} is open to other users (mode {mode:o}); the store's files are private (0600), but `chmod 700 {}` keeps even their names to the operator",
            config.data_dir.display(),
            config.data_dir.display()
        );
        eprintln!("{warning}");
        tracing::warn!(data_dir = %config.data_dir.display(), mode = format!("{mode:o}"), "data_dir is open to other users");
    }
    Ok(())
}

/// Opens the embedded store for writing.
pub fn open_store(config: &Config) -> Result<Arc<dyn Store>, anyhow::Error> {
    Ok(open_sqlite(config)? as Arc<dyn Store>)
}

fn open_sqlite(config: &Config) -> Result<Arc<SqliteStore>, anyhow::Error> {
    ensure_data_dir(config)?;
    Ok(Arc::new(SqliteStore::open_with_cache(
        &config.store_path(),
        config.store_cache_bytes,
    )?))
}

/// Opens the embedded store for reading beside a running server, without claiming it.
pub fn open_store_read_only(config: &Config) -> Result<Box<dyn Store>, anyhow::Error> {
    let path = config.store_path();
    if !path.exists() {
        anyhow::bail!("no ledger at {} (nothing has run yet)", path.display());
    }
    Ok(Box::new(SqliteStore::open_read_only(&path)?))
}

/// Whether a running server holds the embedded store.
pub fn store_is_held(config: &Config) -> bool {
    SqliteStore::is_locked(&config.store_path())
}

/// The books of the PostgreSQL database `database_url` names, which escrow nodes share: the
/// operator's commands run on it directly, from any machine, with or without servers running.
pub fn open_shared_books(
    config: &Config,
    url: &crate::config::DatabaseUrl,
) -> Result<(Arc<PostgresStore>, Arc<PostgresBooks>), anyhow::Error> {
    let store = Arc::new(PostgresStore::open_shared(url.url())?);
    let books = PostgresBooks::open(Arc::clone(&store), config.policy, Arc::new(SystemClock))?;
    Ok((store, Arc::new(books)))
}

/// Opens the ledger on the embedded store for writing.
pub fn open_ledger(config: &Config) -> Result<Ledger, anyhow::Error> {
    ledger_on(config, open_store(config)?)
}

fn ledger_on(config: &Config, store: Arc<dyn Store>) -> Result<Ledger, anyhow::Error> {
    Ledger::open(
        store,
        Arc::new(SystemClock),
        LedgerOptions::new(config.policy),
    )
    .context("cannot open the ledger")
}

/// The Python that runs pip when the default model must be fetched.
const PYTHON: &str = "python3";

/// Loads an embedded model, fetching the default one first if it is missing, and says so.
fn load_embedded(
    name: &str,
    path: &std::path::Path,
    options: LoadOptions,
) -> anyhow::Result<EmbeddedModel> {
    if !path.is_file() && crate::fetch::is_default_model(path) {
        crate::fetch::ensure_default_model(path, PYTHON)?;
    }
    let bytes = std::fs::metadata(path).map_or(0, |metadata| metadata.len());
    print!(
        "Loading model {name} from {} ({} MB)… ",
        path.display(),
        bytes / 1_000_000
    );
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let started = Instant::now();
    let model = EmbeddedModel::load(path, options)
        .with_context(|| format!("model {name}: cannot load {}", path.display()))?;
    println!("ready in {} ms", started.elapsed().as_millis());
    Ok(model)
}

/// The policy this server applies, in one line: the stipend, each model's prices, the
/// transparency report's ε and clipping bound.
fn policy_in_force(config: &Config, gateway: &Gateway) -> String {
    let policy = &config.policy;
    let models: Vec<String> = gateway
        .models
        .values()
        .map(|model| {
            format!(
                "{} {}/{} cu a token ({} cached)",
                model.name,
                model.price_prompt_cu,
                model.price_completion_cu,
                model.price_cached_prompt_cu
            )
        })
        .collect();
    format!(
        "stipend {} cu every {}, rollover up to {} cu; models: {}; transparency ε {} clipped at {} cu",
        policy.amount_cu(),
        stipend_ledger::units::format_duration(policy.period()),
        policy.rollover_max_cu(),
        if models.is_empty() {
            "none".to_string()
        } else {
            models.join(", ")
        },
        config.web.transparency.epsilon,
        config.web.transparency.clip_cu(policy),
    )
}

/// Writes the policy to the operator log when it differs from the last one logged (action
/// `policy`, actor `config`): an operator's change to the config is an operator action too.
fn log_policy_change(books: &dyn Books, policy: &str) {
    let store = books.store();
    let mut before = None;
    let last = loop {
        let page = match store.actions(before, 1_000) {
            Ok(page) => page,
            Err(error) => {
                tracing::warn!(%error, "cannot read the operator log");
                return;
            }
        };
        if let Some((_, action)) = page.iter().find(|(_, action)| action.action == "policy") {
            break action.object.clone();
        }
        match page.last() {
            Some((seq, _)) if page.len() == 1_000 => before = Some(*seq),
            _ => break None,
        }
    };
    if last.as_deref() == Some(policy) {
        return;
    }
    let entry = stipend_ledger::OperatorAction {
        at_ms: books.now_ms(),
        actor: "config".to_string(),
        action: "policy".to_string(),
        account: None,
        object: Some(policy.to_string()),
        amount_cu: Some(books.policy().amount_cu()),
    };
    match store.record_action(&entry) {
        Ok(()) => tracing::info!(policy, "policy in force logged"),
        Err(error) => tracing::warn!(%error, "cannot write the operator log"),
    }
}

/// Builds the gateway's models: a sink account each, and an upstream client or a loaded model.
fn build_gateway(
    config: &Config,
    books: &dyn Books,
    budget: Arc<dyn Budget>,
    keys: KeyRing,
) -> anyhow::Result<Gateway> {
    let mut models = BTreeMap::new();
    for model in &config.models {
        let sink = books
            .sink(&format!(
                "{}{}",
                stipend_ledger::SINK_NAME_PREFIX,
                model.name
            ))
            .with_context(|| format!("cannot open the sink of model {}", model.name))?;
        let (backend, capacity, params) = match &model.backend {
            BackendConfig::Upstream {
                base_url,
                api_key,
                upstream_model,
                max_concurrency,
                timeout,
                roots,
            } => {
                let upstream = Upstream::new(UpstreamConfig {
                    base_url: base_url.clone(),
                    api_key: api_key.clone(),
                    timeout: *timeout,
                    idle_connections: *max_concurrency,
                    roots: roots.clone(),
                })
                .map_err(anyhow::Error::msg)?;
                let backend = Backend::Upstream {
                    upstream,
                    model: upstream_model.clone(),
                };
                (backend, *max_concurrency, None)
            }
            BackendConfig::Embedded {
                path,
                slots,
                context,
                threads,
                prefix_cache,
            } => {
                let mut options = LoadOptions {
                    n_ctx: *context,
                    slots: *slots,
                    prefix_cache: *prefix_cache,
                    ..LoadOptions::default()
                };
                if let Some(threads) = threads {
                    options.n_threads = *threads as i32;
                }
                let engine = load_embedded(&model.name, path, options)?;
                let params = engine.info().params;
                let slots = engine.info().slots as usize;
                (Backend::Embedded(Arc::new(engine)), slots, Some(params))
            }
        };
        // Prices the config leaves out come from the GGUF's parameter count.
        let price = |explicit: Option<u64>| {
            explicit
                .or_else(|| params.map(default_price_cu_per_token))
                .with_context(|| format!("model {}: no price", model.name))
        };
        let price_prompt_cu = price(model.price_prompt_cu)?;
        // An upstream's cached tokens are charged as any prompt token (its caching is not
        // Stipend's to see), so its cached price is the prompt price.
        let price_cached_prompt_cu = match (&model.backend, model.price_cached_prompt_cu) {
            (BackendConfig::Upstream { .. }, _) => price_prompt_cu,
            (BackendConfig::Embedded { .. }, explicit) => {
                explicit.unwrap_or(crate::config::CACHED_PROMPT_PRICE_DEFAULT_CU)
            }
        };
        anyhow::ensure!(
            price_cached_prompt_cu <= price_prompt_cu,
            "models: {}: price_cached_prompt_cu ({price_cached_prompt_cu}) must be at most the prompt price ({price_prompt_cu})",
            model.name
        );
        models.insert(
            model.name.clone(),
            Arc::new(Model {
                name: model.name.clone(),
                price_prompt_cu,
                price_cached_prompt_cu,
                price_completion_cu: price(model.price_completion_cu)?,
                sink,
                backend,
                queue: Arc::new(FairQueue::new(capacity, config.queue)),
                max_concurrency: capacity,
                counters: Default::default(),
            }),
        );
    }
    let options = GatewayOptions {
        max_tokens_default: config.max_tokens_default,
        body_read_timeout: config.client_read_timeout,
        metrics_on_api: config.metrics_listen.is_none(),
        ..GatewayOptions::default()
    };
    Ok(Gateway {
        ledger: budget,
        access: stipend_gateway::Access::load(keys.store())
            .context("cannot read the models' access rules")?,
        caps: Arc::new(stipend_gateway::KeyCaps::new(keys.store())),
        keys,
        models,
        options,
        unrouted: Default::default(),
        calls: Default::default(),
    })
}

/// The account made for trying Stipend out when it runs with no config file.
pub const DEMO_ACCOUNT: &str = "demo";

/// With no config file: makes the demo person and a key the first time, returning the key (it
/// is shown once; only its hash is kept).
fn demo_account(books: &dyn Books, keys: &KeyRing) -> anyhow::Result<Option<String>> {
    if books.account_id(DEMO_ACCOUNT).is_ok() {
        return Ok(None);
    }
    let account = match books.create_account(DEMO_ACCOUNT, AccountKind::Person) {
        Ok(account) => account,
        // Another server on the same database made it first.
        Err(stipend_ledger::LedgerError::AccountExists { .. }) => return Ok(None),
        Err(error) => return Err(error).context("cannot create the demo account"),
    };
    let key = keys
        .create(account, books.now_ms())
        .context("cannot create the demo key")?;
    Ok(Some(key.key))
}

/// The ledger a server runs on: the single-node engine on the embedded store, or, on a
/// PostgreSQL database several servers share, an escrow node (for calls) and the database's
/// books (for the operator's commands).
struct Engine {
    books: Arc<dyn Books>,
    /// The issuer's account, whose keys are operator keys.
    issuer: AccountId,
    budget: Arc<dyn Budget>,
    store: Arc<dyn Store>,
    local: Option<Arc<Ledger>>,
    node: Option<Arc<Node>>,
    /// Where agent runs are journaled: the embedded store, or the shared database under this
    /// server's name.
    journal: Option<Arc<dyn RunJournal>>,
    /// Held while the server runs: one server per `data_dir` (its control socket is there).
    _claim: Option<std::fs::File>,
}

/// Claims `data_dir` for this server alone: its control socket lives there.
fn claim_data_dir(config: &Config) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = config.data_dir.join("server.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another stipend server is already using {} (its control socket is there); give \
             each server on this machine a data_dir of its own",
            config.data_dir.display()
        ),
        Err(std::fs::TryLockError::Error(error)) => {
            Err(error).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// A node's name in the database's `leases`, for the operator's eyes: host and process.
fn node_name(config: &Config) -> String {
    format!("{}:{}:{}", host_name(), std::process::id(), config.listen)
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "node".to_string())
}

/// Whose agent runs' journals are this server's on a shared database: the same name after a
/// restart (its host and its `data_dir`, which is its own on the machine).
fn journal_owner(config: &Config) -> String {
    let data_dir =
        std::fs::canonicalize(&config.data_dir).unwrap_or_else(|_| config.data_dir.clone());
    format!("{}:{}", host_name(), data_dir.display())
}

fn open_engine(config: &Config) -> anyhow::Result<Engine> {
    let Some(url) = &config.database_url else {
        let opened = open_sqlite(config).and_then(|sqlite| {
            let ledger = ledger_on(config, Arc::clone(&sqlite) as Arc<dyn Store>)?;
            Ok((sqlite, ledger))
        });
        let (sqlite, ledger) = match opened {
            Ok((sqlite, ledger)) => (sqlite, Arc::new(ledger)),
            Err(error)
                if matches!(
                    error.downcast_ref::<StoreError>(),
                    Some(StoreError::Locked { .. })
                ) =>
            {
                anyhow::bail!(
                    "another stipend server is already using {} (the store is in use by another \
                     process); stop it first",
                    config.data_dir.display()
                )
            }
            Err(error) => return Err(error),
        };
        return Ok(Engine {
            issuer: ledger.issuer(),
            books: Arc::clone(&ledger) as Arc<dyn Books>,
            budget: Arc::clone(&ledger) as Arc<dyn Budget>,
            store: ledger.store(),
            local: Some(ledger),
            node: None,
            journal: Some(sqlite as Arc<dyn RunJournal>),
            _claim: None,
        });
    };
    ensure_data_dir(config)?;
    let claim = claim_data_dir(config)?;
    let (store, books) = open_shared_books(config, url)?;
    let escrow = PostgresEscrow::new(
        Arc::clone(&store),
        LeaseRequest {
            policy: config.policy,
            issuer: books.issuer(),
            node: node_name(config),
            ttl: config.lease_ttl,
        },
    );
    let node = Arc::new(Node::open(
        Arc::new(escrow),
        Arc::new(SystemClock),
        NodeOptions::new(config.policy, books.issuer(), config.lease_ttl),
    )?);
    Ok(Engine {
        issuer: books.issuer(),
        books: books as Arc<dyn Books>,
        budget: Arc::clone(&node) as Arc<dyn Budget>,
        journal: Some(Arc::new(PostgresJournal::new(
            Arc::clone(&store),
            journal_owner(config),
        )) as Arc<dyn RunJournal>),
        store: store as Arc<dyn Store>,
        local: None,
        node: Some(node),
        _claim: Some(claim),
    })
}

/// Runs the server until SIGINT or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let started = Instant::now();
    raise_open_files_limit();
    let engine = open_engine(&config)?;
    let keys = KeyRing::new(Arc::clone(&engine.store), engine.issuer);
    let demo_key = if config.source.is_none() {
        Some(demo_account(engine.books.as_ref(), &keys)?)
    } else {
        None
    };
    let gateway = {
        let (config, books, budget, keys) = (
            config.clone(),
            Arc::clone(&engine.books),
            Arc::clone(&engine.budget),
            keys.clone(),
        );
        // Loading a model is blocking work (and may fetch it first).
        tokio::task::spawn_blocking(move || build_gateway(&config, books.as_ref(), budget, keys))
            .await
            .context("the model loading task failed")??
    };
    let gateway = Arc::new(gateway);
    {
        let policy = policy_in_force(&config, &gateway);
        let books = Arc::clone(&engine.books);
        tokio::task::spawn_blocking(move || log_policy_change(books.as_ref(), &policy))
            .await
            .context("the policy check failed")?;
    }
    let http = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (listen)", config.listen))?;
    let address = http.local_addr()?;
    let socket = config.socket_path();
    let listener = control::bind(&socket)?;
    // On a shared database, keys are created and revoked by other servers and the CLI too.
    let follower = engine.node.is_some().then(|| {
        let keys = keys.clone();
        tokio::spawn(async move {
            let mut since = None;
            let mut interval = tokio::time::interval(stipend_gateway::limits::KEYS_FOLLOW_INTERVAL);
            loop {
                interval.tick().await;
                let ring = keys.clone();
                match tokio::task::spawn_blocking(move || ring.follow(since)).await {
                    Ok(Ok(next)) => since = Some(next),
                    Ok(Err(error)) => tracing::warn!(%error, "cannot follow the keys' changes"),
                    Err(_) => {}
                }
            }
        })
    });
    // The models' access rules, changed by the CLI (through the control socket) or, on a shared
    // database, by other servers: read again when their version moves.
    let access_follower = {
        let gateway = Arc::clone(&gateway);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(stipend_gateway::limits::KEYS_FOLLOW_INTERVAL);
            loop {
                interval.tick().await;
                let shared = Arc::clone(&gateway);
                if let Ok(Err(error)) =
                    tokio::task::spawn_blocking(move || shared.access.follow()).await
                {
                    tracing::warn!(%error, "cannot follow the access rules' changes");
                }
            }
        })
    };
    // The single-node engine voids timed-out reservations on a timer; a node's reservations
    // end with their calls and its leases by its own writer.
    let sweeper = engine.local.clone().map(|ledger| {
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(SWEEP_INTERVAL);
            loop {
                interval.tick().await;
                if let Err(error) = ledger.sweep() {
                    tracing::error!(%error, "reservation sweep failed");
                }
            }
        })
    });
    // What capped keys spent, written down once a second (and learnt from other servers).
    let caps_writer = {
        let caps = Arc::clone(&gateway.caps);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(KEY_CAPS_WRITE_INTERVAL);
            loop {
                interval.tick().await;
                let caps = Arc::clone(&caps);
                if let Ok(Err(error)) = tokio::task::spawn_blocking(move || caps.write()).await {
                    tracing::warn!(%error, "cannot write what capped keys spent");
                }
            }
        })
    };
    // Each period that ends while the server runs gets its transparency report at once, while
    // everyone's counts of it are whole; a period that ended while no server ran gets it when
    // first asked for.
    let reporter = {
        let books = Arc::clone(&engine.books);
        let options = config.web.transparency;
        tokio::spawn(async move {
            // The last period this server knows to have its report: the one before it started
            // is not its to make, and one made is not looked for again.
            let mut reported = books.policy().period_index(books.now_ms()) - 1;
            let mut interval = tokio::time::interval(TRANSPARENCY_CHECK_INTERVAL);
            loop {
                interval.tick().await;
                let last = books.policy().period_index(books.now_ms()) - 1;
                if last <= reported {
                    continue;
                }
                let books = Arc::clone(&books);
                let made = tokio::task::spawn_blocking(move || {
                    stipend_web::transparency::report(books.as_ref(), &options, None)
                })
                .await;
                match made {
                    Ok(Ok(_)) => reported = last,
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "cannot make the transparency report")
                    }
                    Err(_) => {}
                }
            }
        })
    };
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    // `/metrics` on a listener of its own, if so configured; stopped with the API.
    let metrics_address = match config.metrics_listen {
        None => None,
        Some(listen) => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen} (metrics_listen)"))?;
            let address = listener.local_addr()?;
            let mut stop = stop_rx.clone();
            tokio::spawn(stipend_gateway::server::serve(
                listener,
                stipend_gateway::metrics_router(Arc::clone(&gateway)),
                config.client_read_timeout,
                async move {
                    let _ = stop.wait_for(|stop| *stop).await;
                },
            ));
            Some(address)
        }
    };
    // Agent runs: their model calls go through this gateway; their caps move with the books.
    let agents = match &engine.journal {
        Some(journal) => stipend_agents::Agents::with_journal(
            Arc::clone(&gateway),
            Arc::clone(&engine.books),
            config.agents.clone(),
            Arc::clone(journal),
        )
        .context("cannot start the agents' journal")?,
        None => stipend_agents::Agents::new(
            Arc::clone(&gateway),
            Arc::clone(&engine.books),
            config.agents.clone(),
        ),
    };
    // Journaled runs go on where they were.
    let resumed = agents
        .resume()
        .await
        .context("cannot read the agents' journal")?;
    if resumed > 0 {
        println!("Resumed {resumed} agent runs where they were.");
    }
    // The CLI's commands, on this server's books, keys and agents.
    let control_task = tokio::spawn(control::serve(
        listener,
        Arc::clone(&engine.books),
        keys.clone(),
        Some(Arc::clone(&agents)),
    ));
    let mut http_task = tokio::spawn({
        let web = stipend_web::Web::new(
            Arc::clone(&gateway),
            Arc::clone(&engine.books),
            Some(Arc::clone(&agents)),
            config.web.clone(),
        );
        let router = stipend_gateway::router(Arc::clone(&gateway))
            .merge(stipend_agents::routes::router(agents))
            .merge(stipend_web::router(web));
        stipend_gateway::server::serve(http, router, config.client_read_timeout, async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        })
    });
    tracing::info!(
        %address,
        data_dir = %config.data_dir.display(),
        ready_ms = started.elapsed().as_millis() as u64,
        "stipend serving"
    );
    print_summary(
        &config,
        &gateway,
        address,
        metrics_address,
        started,
        demo_key,
    );
    shutdown_signal().await;
    println!(
        "Stopping: no new requests; waiting up to {}s for those in flight.",
        config.drain_timeout.as_secs()
    );
    let _ = stop_tx.send(true);
    // Requests waiting for a slot are refused now (nothing charged) rather than held for the
    // whole drain; those running finish.
    for model in gateway.models.values() {
        model.queue.close();
    }
    // Drained: every connection has ended and every call has settled (a call whose client left
    // runs on to its end without a connection).
    let drained = tokio::time::timeout(config.drain_timeout, async {
        if let Err(error) = (&mut http_task).await {
            tracing::error!(%error, "the HTTP task failed");
        }
        gateway.calls.idle().await;
    })
    .await
    .is_ok();
    if !drained {
        tracing::warn!(
            calls = gateway.calls.open(),
            "calls still in flight after the drain timeout; cutting them off"
        );
        // Each stops its backend, is charged for what it delivered, and tells its client it was
        // cut short; then its connection ends.
        gateway.calls.cut();
        let cut = tokio::time::timeout(CUT_GRACE, async {
            gateway.calls.idle().await;
            if !http_task.is_finished() {
                let _ = (&mut http_task).await;
            }
        })
        .await;
        if cut.is_err() {
            http_task.abort();
        }
    }
    control_task.abort();
    let _ = control_task.await;
    if let Some(follower) = follower {
        follower.abort();
        let _ = follower.await;
    }
    if let Some(sweeper) = sweeper {
        sweeper.abort();
        let _ = sweeper.await;
    }
    if let Err(error) = std::fs::remove_file(&socket) {
        tracing::warn!(%error, "cannot remove the control socket");
    }
    caps_writer.abort();
    let _ = caps_writer.await;
    reporter.abort();
    let _ = reporter.await;
    access_follower.abort();
    let _ = access_follower.await;
    // Every call has settled: what capped keys spent is written down in full.
    let caps = Arc::clone(&gateway.caps);
    if let Ok(Err(error)) = tokio::task::spawn_blocking(move || caps.write()).await {
        tracing::warn!(%error, "cannot write what capped keys spent");
    }
    drop(gateway);
    let Engine { local, node, .. } = engine;
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        if let Some(ledger) = local {
            ledger.flush()?;
        }
        // Every settle committed, every lease given back.
        if let Some(node) = node {
            node.close();
        }
        Ok(())
    })
    .await
    .context("the flush task failed")??;
    println!("Stipend stopped; the ledger is flushed.");
    Ok(())
}

fn print_summary(
    config: &Config,
    gateway: &Gateway,
    address: std::net::SocketAddr,
    metrics_address: Option<std::net::SocketAddr>,
    started: Instant,
    demo_key: Option<Option<String>>,
) {
    let policy = gateway.ledger.policy();
    let cli = cli_invocation(config);
    let mut models = String::new();
    for model in gateway.models.values() {
        let capacity = match &model.backend {
            Backend::Embedded(engine) => format!(
                "embedded, {:.1}M parameters, {} slots of {} tokens, prefix cache {}",
                engine.info().params as f64 / 1e6,
                engine.info().slots,
                engine.info().n_ctx,
                match engine.info().prefix_cache {
                    stipend_model::PrefixCache::PerOwner => "per person",
                    stipend_model::PrefixCache::Shared => "shared by everyone",
                    stipend_model::PrefixCache::Off => "off",
                }
            ),
            Backend::Upstream { .. } => {
                format!("upstream, {} in flight at most", model.max_concurrency)
            }
        };
        let cached = match &model.backend {
            Backend::Embedded(_) => format!(" ({} cu if cached)", model.price_cached_prompt_cu),
            Backend::Upstream { .. } => String::new(),
        };
        models.push_str(&format!(
            "  {:<20} {} cu/prompt token{cached}, {} cu/completion token; {capacity}\n",
            model.name, model.price_prompt_cu, model.price_completion_cu
        ));
    }
    if models.is_empty() {
        models.push_str("  (none configured: add [[models]] to the config file)\n");
    }
    let example_model = gateway
        .models
        .keys()
        .next()
        .cloned()
        .unwrap_or_else(|| "MODEL".to_string());
    let key = match &demo_key {
        Some(Some(key)) => {
            format!(
                "A person to try it with: account `{DEMO_ACCOUNT}`, with this key (shown once; only its hash is kept):\n  \
                 export KEY={key}\n\n\
                 More people and keys (from another terminal, in this directory):\n  \
                 {cli} account create alice\n  \
                 {cli} key create alice\n"
            )
        }
        Some(None) => format!(
            "The person to try it with is `{DEMO_ACCOUNT}`; its key was shown when it was made. Make another\n\
             (from another terminal, in this directory) and set KEY to it:\n  \
             {cli} key create {DEMO_ACCOUNT}\n"
        ),
        None => format!(
            "Give someone a budget and a key (from another terminal, in this directory):\n  \
             {cli} account create alice\n  \
             {cli} key create alice\n"
        ),
    };
    let metrics = match metrics_address {
        Some(metrics) => format!("http://{metrics}/metrics (metrics_listen)"),
        None => format!("http://{address}/metrics"),
    };
    let ledger = match &config.database_url {
        Some(url) => format!("PostgreSQL: {url}"),
        None => config.store_path().display().to_string(),
    };
    println!(
        "Stipend is running on http://{address}/v1\n  \
         ledger    {ledger}\n  \
         metrics   {metrics}\n  \
         stipend   {} per person every {}, up to {} carried over\n  \
         ready in  {} ms\n\
         models\n{models}\n\
         {key}\n\
         Then call it with any OpenAI client:\n  \
         curl http://{address}/v1/chat/completions -H \"Authorization: Bearer $KEY\" \\\n    \
         -H 'Content-Type: application/json' \\\n    \
         -d '{{\"model\": \"{example_model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"What is the capital of France? Answer in one sentence.\"}}], \"temperature\": 0}}'\n\n  \
         # Python, with the official client (pip install openai):\n  \
         python3 -c 'from openai import OpenAI; import os; print(OpenAI(base_url=\"http://{address}/v1\", api_key=os.environ[\"KEY\"]).chat.completions.create(model=\"{example_model}\", messages=[{{\"role\": \"user\", \"content\": \"Name three colours.\"}}], temperature=0).choices[0].message.content)'\n\n\
         Your budget:\n  \
         curl http://{address}/v1/budget -H \"Authorization: Bearer $KEY\"\n  \
         or in a browser: http://{address}/ (sign in with the key)\n\n\
         How equally compute is shared, for anyone (a report each period, with privacy noise):\n  \
         http://{address}/transparency\n\n\
         Press Ctrl-C to stop.",
        Flops(policy.amount_cu() as i64),
        format_duration(policy.period()),
        Flops(policy.rollover_max_cu() as i64),
        started.elapsed().as_millis(),
    );
}

/// How to call this same binary with this same config from a shell in the current directory.
fn cli_invocation(config: &Config) -> String {
    let exe = std::env::current_exe().unwrap_or_else(|_| "stipend".into());
    let cwd = std::env::current_dir().unwrap_or_default();
    let exe = exe
        .strip_prefix(&cwd)
        .map(|relative| relative.display().to_string())
        .unwrap_or_else(|_| exe.display().to_string());
    match &config.source {
        Some(path) => format!("{exe} --config {}", path.display()),
        None => exe,
    }
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGTERM");
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
