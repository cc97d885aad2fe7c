//! The fair-share queue at saturation against a plain FIFO of the same capacity (tokio's
//! semaphore, which hands out permits first come first served), in the same run: 256 clients,
//! as many persons, keep a model of 8 slots saturated; each request holds its slot for a
//! simulated service time. Requests per second both ways, and the loss.
//!
//! `cargo bench -p stipend-gateway --bench queue`. `STIPEND_BENCH_SECS` (default 3) per run;
//! `STIPEND_BENCH_SERVICE_US` (default 1000) the service time.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use stipend_gateway::queue::{FairQueue, QueueOptions};

const CLIENTS: u64 = 256;
const CAPACITY: usize = 8;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

async fn saturate(fair: bool, secs: u64, service: Duration) -> f64 {
    let queue = Arc::new(FairQueue::new(
        CAPACITY,
        QueueOptions {
            queue_depth_max_per_person: 1_000,
            queue_depth_max: 100_000,
            queue_wait_max: Duration::from_secs(600),
        },
    ));
    let semaphore = Arc::new(tokio::sync::Semaphore::new(CAPACITY));
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|person| {
            let (queue, semaphore, done, stop) = (
                Arc::clone(&queue),
                Arc::clone(&semaphore),
                Arc::clone(&done),
                Arc::clone(&stop),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if fair {
                        let place = queue.enter(person, 50).await.unwrap();
                        tokio::time::sleep(service).await;
                        place.charge(10);
                        place.finish(100);
                    } else {
                        let permit = semaphore.acquire().await.unwrap();
                        tokio::time::sleep(service).await;
                        drop(permit);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Warm up, then count.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = done.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let completed = done.load(Ordering::Relaxed) - before;
    let rate = completed as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    rate
}

fn main() {
    let secs = env_or("STIPEND_BENCH_SECS", 3);
    let service = Duration::from_micros(env_or("STIPEND_BENCH_SERVICE_US", 1_000));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    // Alternate, twice each, so drift on a shared machine hits both alike.
    for _ in 0..2 {
        let fifo = runtime.block_on(saturate(false, secs, service));
        let fair = runtime.block_on(saturate(true, secs, service));
        rows.push((fifo, fair));
    }
    println!(
        "saturation: {CLIENTS} clients/persons, {CAPACITY} slots, service {service:?} per request"
    );
    println!("| run | FIFO (semaphore) req/s | fair share req/s | fair / FIFO |");
    println!("| --- | --- | --- | --- |");
    for (index, (fifo, fair)) in rows.iter().enumerate() {
        println!(
            "| {} | {fifo:.0} | {fair:.0} | {:.3} |",
            index + 1,
            fair / fifo
        );
    }
}
