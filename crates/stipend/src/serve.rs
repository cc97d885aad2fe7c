//! `stipend serve`: owns the store, runs the ledger, and answers the control socket until it is
//! told to stop, then drains and flushes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use stipend_ledger::units::format_duration;
use stipend_ledger::{Flops, Ledger, LedgerOptions, Store, StoreError, SystemClock};
use stipend_store_sqlite::SqliteStore;

use crate::config::Config;
use crate::control;

/// How often timed-out reservations are voided.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

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
    }
    Ok(())
}

/// Opens the ledger on the embedded store for writing.
pub fn open_ledger(config: &Config) -> Result<Ledger, anyhow::Error> {
    ensure_data_dir(config)?;
    let store = SqliteStore::open(&config.store_path())?;
    let store: Arc<dyn Store> = Arc::new(store);
    Ledger::open(
        store,
        Arc::new(SystemClock),
        LedgerOptions::new(config.policy),
    )
    .context("cannot open the ledger")
}

/// Runs the server until SIGINT or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let started = Instant::now();
    let ledger = match open_ledger(&config) {
        Ok(ledger) => Arc::new(ledger),
        Err(error)
            if matches!(
                error.downcast_ref::<StoreError>(),
                Some(StoreError::Locked { .. })
            ) =>
        {
            anyhow::bail!(
                "another stipend server is already using {}; stop it first",
                config.data_dir.display()
            )
        }
        Err(error) => return Err(error),
    };
    let socket = config.socket_path();
    let listener = control::bind(&socket)?;
    let control_task = tokio::spawn(control::serve(listener, Arc::clone(&ledger)));
    let sweeper = {
        let ledger = Arc::clone(&ledger);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(SWEEP_INTERVAL);
            loop {
                interval.tick().await;
                if let Err(error) = ledger.sweep() {
                    tracing::error!(%error, "reservation sweep failed");
                }
            }
        })
    };
    let policy = ledger.policy();
    let cli = cli_invocation(&config);
    tracing::info!(
        data_dir = %config.data_dir.display(),
        ready_ms = started.elapsed().as_millis() as u64,
        "stipend serving"
    );
    println!(
        "Stipend is running.\n  \
         data      {}\n  \
         stipend   {} per person every {}, up to {} carried over\n  \
         ready in  {} ms\n\n\
         The ledger is live. From another terminal, in this directory:\n  \
         {cli} account create alice\n  \
         {cli} account show alice\n  \
         {cli} grant alice \"1 PFLOP\"\n  \
         {cli} ledger verify\n\n\
         The OpenAI-compatible HTTP API is not part of this build yet.\n\
         Press Ctrl-C to stop.",
        config.data_dir.display(),
        Flops(policy.amount_cu() as i64),
        format_duration(policy.period()),
        Flops(policy.rollover_max_cu() as i64),
        started.elapsed().as_millis(),
    );
    shutdown_signal().await;
    tracing::info!("shutting down: closing the control socket and flushing the ledger");
    control_task.abort();
    sweeper.abort();
    let _ = control_task.await;
    let _ = sweeper.await;
    if let Err(error) = std::fs::remove_file(&socket) {
        tracing::warn!(%error, "cannot remove the control socket");
    }
    let flush = Arc::clone(&ledger);
    tokio::task::spawn_blocking(move || flush.flush())
        .await
        .context("the flush task failed")??;
    drop(ledger);
    println!("Stipend stopped; the ledger is flushed.");
    Ok(())
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
