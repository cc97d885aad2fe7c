//! The ledger benchmark: reserve decisions in memory, durable settles with group commit on
//! SQLite, their latencies, memory per loaded account, and start-up time, each beside a baseline
//! measured in the same run (this machine is shared, so ratios mean more than absolutes).
//!
//! Run: `cargo bench -p stipend-ledger --bench ledger`
//! Knobs: `STIPEND_BENCH_SECS` (per measurement, default 3), `STIPEND_BENCH_ACCOUNTS` (for the
//! memory run, default 1 000 000), `STIPEND_BENCH_DIR` (where the store goes; default the system
//! temp dir, which must be a real disk for the fsync figures to mean anything).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use stipend_ledger::{
    AccountId, AccountKind, AccountRecord, Batch, Clock, Ledger, LedgerError, LedgerOptions,
    StipendPolicy, Store, SystemClock,
};
use stipend_store_sqlite::SqliteStore;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kb| kb * 1024)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn policy() -> StipendPolicy {
    StipendPolicy::new(1 << 45, Duration::from_secs(86_400), 1 << 45).unwrap()
}

fn open(path: &Path) -> (Ledger, Arc<SqliteStore>) {
    let store = Arc::new(SqliteStore::open(path).unwrap());
    let dyn_store: Arc<dyn Store> = store.clone();
    let ledger = Ledger::open(
        dyn_store,
        Arc::new(SystemClock),
        LedgerOptions::new(policy()),
    )
    .unwrap();
    (ledger, store)
}

struct Run {
    ops: u64,
    elapsed: Duration,
    latencies_ns: Vec<u64>,
}

impl Run {
    fn per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs `work` on `threads` threads for `secs`; each call is one op, timed.
fn timed<F>(threads: usize, secs: f64, work: F) -> Run
where
    F: Fn(usize, u64) + Sync,
{
    let stop = AtomicBool::new(false);
    let ops = AtomicU64::new(0);
    let barrier = Barrier::new(threads + 1);
    let latencies = Mutex::new(Vec::new());
    let mut elapsed = Duration::ZERO;
    std::thread::scope(|scope| {
        for thread in 0..threads {
            let (stop, ops, barrier, latencies, work) = (&stop, &ops, &barrier, &latencies, &work);
            scope.spawn(move || {
                let mut mine = Vec::with_capacity(1 << 16);
                let mut count = 0u64;
                barrier.wait();
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    work(thread, count);
                    // Sample one in 16 latencies to keep memory flat on fast paths.
                    if count.is_multiple_of(16) {
                        mine.push(start.elapsed().as_nanos() as u64);
                    }
                    count += 1;
                }
                ops.fetch_add(count, Ordering::Relaxed);
                latencies.lock().extend(mine);
            });
        }
        barrier.wait();
        let start = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
        elapsed = start.elapsed();
    });
    let mut latencies_ns = latencies.into_inner();
    latencies_ns.sort_unstable();
    Run {
        ops: ops.into_inner(),
        elapsed,
        latencies_ns,
    }
}

fn fmt_rate(rate: f64) -> String {
    if rate >= 1e6 {
        format!("{:.2} M/s", rate / 1e6)
    } else {
        format!("{:.1} k/s", rate / 1e3)
    }
}

fn fmt_ns(ns: u64) -> String {
    if ns >= 1_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else if ns >= 1_000 {
        format!("{:.2} µs", ns as f64 / 1e3)
    } else {
        format!("{ns} ns")
    }
}

fn row(what: &str, stipend: &Run, baseline_name: &str, baseline: &Run) {
    println!(
        "| {what} | {} | p50 {} / p99 {} | {baseline_name}: {} | {:.2}× |",
        fmt_rate(stipend.per_sec()),
        fmt_ns(percentile(&stipend.latencies_ns, 0.5)),
        fmt_ns(percentile(&stipend.latencies_ns, 0.99)),
        fmt_rate(baseline.per_sec()),
        stipend.per_sec() / baseline.per_sec(),
    );
}

fn table_header() {
    println!("| what | Stipend | latency | baseline (same run) | ratio |");
    println!("| --- | --- | --- | --- | --- |");
}

fn reserve_bench(dir: &Path, secs: f64) {
    table_header();
    let (ledger, _store) = open(&dir.join("reserve.db"));
    let sink = ledger.sink("sink:bench").unwrap();
    let mut accounts = Vec::new();
    for index in 0..100_000 {
        let created = ledger
            .create_account(&format!("p{index}"), AccountKind::Person)
            .unwrap();
        accounts.push(*created.peek());
    }
    ledger.flush().unwrap();
    let hot = accounts[0];
    // Warm the cache: every account loaded, its stipend applied.
    for account in &accounts {
        ledger.view(*account).unwrap();
    }
    ledger.flush().unwrap();

    // The floor: the same decision with nothing around it, a mutex over a map of balances.
    let balances: Mutex<HashMap<u64, (i64, u64)>> =
        Mutex::new(accounts.iter().map(|a| (a.0, (1i64 << 45, 0u64))).collect());
    let floor = |account: u64, amount: u64| {
        let mut map = balances.lock();
        let entry = map.get_mut(&account).unwrap();
        if (entry.0 as u64).saturating_sub(entry.1) >= amount {
            entry.1 += amount;
            entry.1 -= amount;
        }
    };

    for threads in [1usize, 2] {
        let stipend = timed(threads, secs, |_, _| {
            let reservation = ledger
                .reserve(hot, sink, 100, Duration::from_secs(60))
                .unwrap();
            ledger.void(reservation.id()).unwrap();
        });
        let baseline = timed(threads, secs, |_, _| floor(hot.0, 100));
        row(
            &format!("reserve+void, one hot account, {threads} thread(s)"),
            &stipend,
            "mutex+map floor",
            &baseline,
        );
    }
    let n = accounts.len() as u64;
    let stipend = timed(2, secs, |thread, count| {
        let account = accounts[((count * 7919 + thread as u64 * 104_729) % n) as usize];
        let reservation = ledger
            .reserve(account, sink, 100, Duration::from_secs(60))
            .unwrap();
        ledger.void(reservation.id()).unwrap();
    });
    let baseline = timed(2, secs, |thread, count| {
        floor(
            accounts[((count * 7919 + thread as u64 * 104_729) % n) as usize].0,
            100,
        )
    });
    row(
        "reserve+void, 100k accounts, 2 threads",
        &stipend,
        "mutex+map floor",
        &baseline,
    );
    // A refused reserve is a decision too, and the one a flood of over-budget calls makes.
    let broke = ledger
        .create_account("broke", AccountKind::Pool)
        .unwrap()
        .wait()
        .unwrap();
    let stipend = timed(2, secs, |_, _| {
        let refused = ledger.reserve(broke, sink, 100, Duration::from_secs(60));
        assert!(matches!(
            refused,
            Err(LedgerError::InsufficientBalance { .. })
        ));
    });
    let baseline = timed(2, secs, |_, _| floor(hot.0, u64::MAX));
    row(
        "refused reserve, 2 threads",
        &stipend,
        "mutex+map floor",
        &baseline,
    );
}

/// The floor for durable writes: raw SQLite, same schema, same batch sizes, one thread.
fn sqlite_floor(dir: &Path, secs: f64, batch: usize) -> Run {
    let path = dir.join(format!("floor-{batch}.db"));
    let connection = rusqlite::Connection::open(&path).unwrap();
    connection
        .execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
             CREATE TABLE transfers (seq INTEGER PRIMARY KEY, id BLOB NOT NULL UNIQUE, kind TEXT NOT NULL,
               debit_account INTEGER NOT NULL, credit_account INTEGER NOT NULL,
               amount_cu INTEGER NOT NULL, created_at_ms INTEGER NOT NULL);
             CREATE INDEX transfers_by_debit ON transfers (debit_account, seq);
             CREATE INDEX transfers_by_credit ON transfers (credit_account, seq);
             CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance_cu INTEGER NOT NULL);
             INSERT INTO accounts VALUES (1, 0), (2, 0);",
        )
        .unwrap();
    let connection = Mutex::new(connection);
    let counter = AtomicU64::new(0);
    let run = timed(1, secs, |_, _| {
        let mut connection = connection.lock();
        let transaction = connection.transaction().unwrap();
        {
            let mut insert = transaction
                .prepare_cached("INSERT INTO transfers (id, kind, debit_account, credit_account, amount_cu, created_at_ms) VALUES (?1, 'spend', 1, 2, 5, 0)")
                .unwrap();
            for _ in 0..batch {
                let id = counter.fetch_add(1, Ordering::Relaxed) as u128;
                insert.execute([id.to_be_bytes().as_slice()]).unwrap();
            }
            transaction
                .execute(
                    "UPDATE accounts SET balance_cu = balance_cu + 5 WHERE id IN (1, 2)",
                    [],
                )
                .unwrap();
        }
        transaction.commit().unwrap();
    });
    Run {
        ops: run.ops * batch as u64,
        elapsed: run.elapsed,
        latencies_ns: run.latencies_ns,
    }
}

fn settle_bench(dir: &Path, secs: f64) {
    table_header();
    let threads: usize = env_or("STIPEND_BENCH_SETTLE_THREADS", 256);
    let (ledger, _store) = open(&dir.join("settle.db"));
    let sink = ledger.sink("sink:bench").unwrap();
    let mut accounts = Vec::new();
    for index in 0..100_000 {
        accounts.push(
            *ledger
                .create_account(&format!("p{index}"), AccountKind::Person)
                .unwrap()
                .peek(),
        );
    }
    ledger.flush().unwrap();
    for account in &accounts {
        ledger.view(*account).unwrap();
    }
    ledger.flush().unwrap();
    let hot = accounts[0];
    let n = accounts.len() as u64;
    let writer_line = |ledger: &Ledger, before: stipend_ledger::WriterStats, run: &Run| {
        let after = ledger.writer_stats();
        let commits = after.commits - before.commits;
        let busy = (after.commit_us_total - before.commit_us_total) as f64 / 1e6;
        eprintln!(
            "  writer: {commits} commits ({} checkpoints), {:.0} changes per commit, {:.0}% of the time inside commit, {:.2} ms per commit",
            after.checkpoints - before.checkpoints,
            (after.mutations - before.mutations) as f64 / commits.max(1) as f64,
            100.0 * busy / run.elapsed.as_secs_f64(),
            1e3 * busy / commits.max(1) as f64,
        );
        after
    };
    let before = ledger.writer_stats();
    let hot_run = timed(threads, secs, |_, _| {
        let reservation = ledger
            .reserve(hot, sink, 100, Duration::from_secs(60))
            .unwrap();
        ledger.settle(reservation.id(), 40).unwrap().wait().unwrap();
    });
    let before = writer_line(&ledger, before, &hot_run);
    let spread_run = timed(threads, secs, |thread, count| {
        let account = accounts[((count * 7919 + thread as u64 * 104_729) % n) as usize];
        let reservation = ledger
            .reserve(account, sink, 100, Duration::from_secs(60))
            .unwrap();
        ledger.settle(reservation.id(), 40).unwrap().wait().unwrap();
    });
    writer_line(&ledger, before, &spread_run);
    // Baselines: raw SQLite with one commit per settle, and with commits as wide as ours.
    let per_commit = sqlite_floor(dir, secs, 1);
    let mean_batch = (hot_run.per_sec() / per_commit.per_sec()).max(1.0) as usize;
    let batched = sqlite_floor(dir, secs, mean_batch.max(threads / 2));
    row(
        &format!("durable settle, one hot account, {threads} threads"),
        &hot_run,
        "raw SQLite, 1 commit per row",
        &per_commit,
    );
    row(
        &format!("durable settle, 100k accounts, {threads} threads"),
        &spread_run,
        &format!(
            "raw SQLite, {} rows per commit",
            mean_batch.max(threads / 2)
        ),
        &batched,
    );
    drop(ledger);
}

fn memory_bench(dir: &Path) {
    let n: u64 = env_or("STIPEND_BENCH_ACCOUNTS", 1_000_000);
    let path = dir.join("memory.db");
    {
        // Write the accounts straight into the store, already granted for this period and
        // empty, so loading them changes nothing and the measurement is of memory alone.
        let store = SqliteStore::open(&path).unwrap();
        let policy = policy();
        let now = SystemClock.now_ms();
        let period = policy.period_index(now);
        let mut id = 2u64; // 1 is the issuer, created by the ledger below
        while id <= n + 1 {
            let created: Vec<AccountRecord> = (id..(id + 50_000).min(n + 2))
                .map(|id| AccountRecord {
                    id: AccountId(id),
                    name: format!("p{id}"),
                    kind: AccountKind::Person,
                    balance_cu: 0,
                    lots: Vec::new(),
                    stipend_period: Some(period),
                    usage: Vec::new(),
                    created_at_ms: now,
                })
                .collect();
            id += created.len() as u64;
            store
                .commit(&Batch {
                    created,
                    ..Batch::default()
                })
                .unwrap();
        }
        // The issuer goes last so the ledger finds it by name.
        store
            .commit(&Batch {
                created: vec![AccountRecord {
                    id: AccountId(n + 2),
                    name: "issuer".to_string(),
                    kind: AccountKind::Issuer,
                    balance_cu: 0,
                    lots: Vec::new(),
                    stipend_period: None,
                    usage: Vec::new(),
                    created_at_ms: now,
                }],
                ..Batch::default()
            })
            .unwrap();
    }
    let rss_before_open = rss_bytes();
    let start = Instant::now();
    let (ledger, _store) = open(&path);
    let ready = start.elapsed();
    let rss_open = rss_bytes();
    let load_start = Instant::now();
    for id in 2..=n + 1 {
        ledger.view(AccountId(id)).unwrap();
    }
    let load = load_start.elapsed();
    let rss_loaded = rss_bytes();
    assert_eq!(ledger.accounts_loaded() as u64, n + 1);
    println!(
        "| {n} accounts | open to ready {} | RSS {:.1} MB after open, {:.1} MB with all loaded | {:.0} bytes per loaded account | cold load {:.1} k accounts/s |",
        fmt_ns(ready.as_nanos() as u64),
        rss_open as f64 / 1e6,
        rss_loaded as f64 / 1e6,
        (rss_loaded.saturating_sub(rss_before_open.max(rss_open))) as f64 / n as f64,
        n as f64 / load.as_secs_f64() / 1e3,
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing else. Either way run.
    let secs: f64 = env_or("STIPEND_BENCH_SECS", 3.0);
    let base: PathBuf = std::env::var_os("STIPEND_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(base).unwrap();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| {
            line.strip_prefix("model name")
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    println!(
        "ledger benchmark: {} cores ({cpu}), store in {}, {secs}s per measurement\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        dir.path().display()
    );
    let only = std::env::var("STIPEND_BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "memory" {
        // First, while the process is fresh, so that the RSS figures are its own.
        memory_bench(dir.path());
        println!();
    }
    if only.is_empty() || only == "reserve" {
        reserve_bench(dir.path(), secs);
    }
    if only.is_empty() || only == "settle" {
        settle_bench(dir.path(), secs);
    }
}
