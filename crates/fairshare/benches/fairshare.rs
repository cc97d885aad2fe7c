//! The fair-share scheduler's cost and effect, each against a plain FIFO in the same run.
//!
//! 1. Decision cost: with 10 000 persons waiting, one request ends and the next is chosen (and a
//!    new request arrives, keeping the queue full): ns per cycle, VTC vs a FIFO queue.
//! 2. Fairness at 5× overload: a simulated model with 16 slots, 5 heavy persons sending many
//!    long requests and 95 light persons sending a few short ones, arriving at five times what
//!    the model can serve; FIFO vs VTC: the Gini coefficient of the compute each person was
//!    served, and the light persons' p50/p99 wait.
//!
//! `cargo bench -p stipend-fairshare --bench fairshare`. `STIPEND_BENCH_SECS` (default 2) per
//! decision-cost measurement.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rand::{RngExt, SeedableRng};
use rand_xorshift::XorShiftRng;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use stipend_fairshare::{Arrival, Limits, Scheduler, Ticket, gini};

const PERSONS_WAITING: u64 = 10_000;
const CAPACITY: usize = 64;

fn limits(capacity: usize) -> Limits {
    Limits {
        capacity,
        queue_depth_max_per_person: 1_000,
        queue_depth_max: 1_000_000,
        queue_wait_max_ms: u64::MAX,
    }
}

/// ns per (finish one, admit the next, one arrives), VTC.
fn vtc_cycle(secs: f64) -> f64 {
    let mut scheduler = Scheduler::new(limits(CAPACITY));
    let mut running: VecDeque<Ticket> = VecDeque::new();
    let mut rng = XorShiftRng::seed_from_u64(7);
    for payer in 0..PERSONS_WAITING {
        if let Arrival::Admitted(ticket) =
            scheduler.arrive(payer, 1, 10 + rng.random_range(0..100), 0)
        {
            running.push_back(ticket);
        }
    }
    assert_eq!(scheduler.waiting(), PERSONS_WAITING as usize - CAPACITY);
    let mut cycles = 0u64;
    let started = Instant::now();
    let deadline = Duration::from_secs_f64(secs);
    while started.elapsed() < deadline {
        for _ in 0..1_000 {
            let ticket = running.pop_front().unwrap();
            scheduler.charge(ticket, 20);
            running.extend(scheduler.finish(ticket, 50 + rng.random_range(0..200)));
            let payer = rng.random_range(0..PERSONS_WAITING);
            if let Arrival::Admitted(ticket) =
                scheduler.arrive(payer, 1, 10 + rng.random_range(0..100), 0)
            {
                running.push_back(ticket);
            }
        }
        cycles += 1_000;
    }
    started.elapsed().as_nanos() as f64 / cycles as f64
}

/// The same cycle with a plain FIFO: a queue of (payer, cost) and a running set.
fn fifo_cycle(secs: f64) -> f64 {
    let mut waiting: VecDeque<(u64, u64)> = VecDeque::new();
    let mut running: VecDeque<(u64, u64)> = VecDeque::new();
    let mut rng = XorShiftRng::seed_from_u64(7);
    for payer in 0..PERSONS_WAITING {
        let job = (payer, 10 + rng.random_range(0..100));
        if running.len() < CAPACITY {
            running.push_back(job);
        } else {
            waiting.push_back(job);
        }
    }
    let mut cycles = 0u64;
    let mut served = 0u64;
    let started = Instant::now();
    let deadline = Duration::from_secs_f64(secs);
    while started.elapsed() < deadline {
        for _ in 0..1_000 {
            let (_, cost) = running.pop_front().unwrap();
            served = served.wrapping_add(cost + 50 + rng.random_range(0..200));
            if let Some(next) = waiting.pop_front() {
                running.push_back(next);
            }
            let job = (
                rng.random_range(0..PERSONS_WAITING),
                10 + rng.random_range(0..100),
            );
            if running.len() < CAPACITY {
                running.push_back(job);
            } else {
                waiting.push_back(job);
            }
        }
        cycles += 1_000;
    }
    std::hint::black_box(served);
    started.elapsed().as_nanos() as f64 / cycles as f64
}

#[derive(Clone, Copy, PartialEq)]
enum Policy {
    Fifo,
    Vtc,
}

struct Request {
    person: usize,
    arrived: f64,
    prompt: u64,
    completion: u64,
}

struct Outcome {
    gini: f64,
    light_p50_s: f64,
    light_p99_s: f64,
    heavy_share: f64,
}

// `person` is an id here (a payer), not only an index.
#[allow(clippy::needless_range_loop)]
/// A discrete-time simulation: 16 slots, each generating 100 tokens/s per request (prompts are
/// read at 1000 tokens/s), for `seconds` of arrivals at 5× what the slots can serve.
fn overload(policy: Policy, seconds: f64, seed: u64) -> Outcome {
    const SLOTS: usize = 16;
    const HEAVY: usize = 5;
    const PERSONS: usize = 100;
    let dt = 0.01;
    let mut rng = XorShiftRng::seed_from_u64(seed);
    // Capacity: 16 slots × 100 tokens/s = 1 600 completion tokens/s. Heavy persons send long
    // requests (about 520 tokens on average with the tail) often; light ones short (about 65)
    // requests now and then. Offered: heavy 5 × 3 × 520 ≈ 7 800, light 95 × 0.05 × 65 ≈ 310
    // tokens/s: about 5× capacity, almost all of it heavy.
    let heavy_rate = 3.0; // requests/s per heavy person
    let light_rate = 0.05; // requests/s per light person
    let mut scheduler = Scheduler::new(limits(SLOTS));
    let mut fifo: VecDeque<Request> = VecDeque::new();
    let mut vtc_waiting: std::collections::HashMap<Ticket, Request> = Default::default();
    // Running: (ticket or none, request, tokens left, prompt left)
    let mut running: Vec<(Option<Ticket>, Request, f64, f64)> = Vec::new();
    let mut served = vec![0f64; PERSONS];
    let mut light_waits: Vec<f64> = Vec::new();
    let mut now = 0.0;
    while now < seconds {
        // Arrivals (Poisson per person per step).
        for person in 0..PERSONS {
            let heavy = person < HEAVY;
            let rate = if heavy { heavy_rate } else { light_rate };
            if rng.random::<f64>() < rate * dt {
                // Heavy-tailed lengths: mostly around the mean, sometimes 4×.
                let scale = if rng.random_range(0..10) == 0 { 4 } else { 1 };
                let completion = if heavy {
                    300 + rng.random_range(0..200)
                } else {
                    30 + rng.random_range(0..40)
                } * scale;
                let request = Request {
                    person,
                    arrived: now,
                    prompt: 50 + rng.random_range(0..100),
                    completion,
                };
                match policy {
                    Policy::Fifo => fifo.push_back(request),
                    Policy::Vtc => {
                        match scheduler.arrive(person as u64, 1, request.prompt, (now * 1e3) as u64)
                        {
                            Arrival::Admitted(ticket) => {
                                if !heavy {
                                    light_waits.push(0.0);
                                }
                                served[person] += request.prompt as f64;
                                let (prompt, completion) =
                                    (request.prompt as f64, request.completion as f64);
                                running.push((Some(ticket), request, completion, prompt));
                            }
                            Arrival::Queued(ticket) => {
                                vtc_waiting.insert(ticket, request);
                            }
                            Arrival::Rejected(_) => {}
                        }
                    }
                }
            }
        }
        // FIFO admission.
        if policy == Policy::Fifo {
            while running.len() < SLOTS {
                let Some(request) = fifo.pop_front() else {
                    break;
                };
                if request.person >= HEAVY {
                    light_waits.push(now - request.arrived);
                }
                served[request.person] += request.prompt as f64;
                let (prompt, completion) = (request.prompt as f64, request.completion as f64);
                running.push((None, request, completion, prompt));
            }
        }
        // Service: each running request reads its prompt, then makes 100 tokens/s.
        let mut finished = Vec::new();
        for (index, (ticket, request, left, prompt_left)) in running.iter_mut().enumerate() {
            if *prompt_left > 0.0 {
                *prompt_left -= 1_000.0 * dt;
                continue;
            }
            let made = (100.0 * dt).min(*left);
            *left -= made;
            served[request.person] += made;
            if let Some(ticket) = ticket {
                scheduler.charge(*ticket, made as u64);
            }
            if *left <= 0.0 {
                finished.push(index);
            }
        }
        for index in finished.into_iter().rev() {
            let (ticket, request, _, _) = running.swap_remove(index);
            if let Some(ticket) = ticket {
                for admitted in scheduler.finish(ticket, request.prompt + request.completion) {
                    let next = vtc_waiting.remove(&admitted).unwrap();
                    if next.person >= HEAVY {
                        light_waits.push(now - next.arrived);
                    }
                    served[next.person] += next.prompt as f64;
                    let (prompt, completion) = (next.prompt as f64, next.completion as f64);
                    running.push((Some(admitted), next, completion, prompt));
                }
            }
        }
        now += dt;
    }
    light_waits.sort_by(f64::total_cmp);
    let quantile = |q: f64| light_waits[((light_waits.len() - 1) as f64 * q) as usize];
    let total: f64 = served.iter().sum();
    Outcome {
        gini: gini(&served),
        light_p50_s: quantile(0.5),
        light_p99_s: quantile(0.99),
        heavy_share: served[..HEAVY].iter().sum::<f64>() / total,
    }
}

fn main() {
    let secs: f64 = std::env::var("STIPEND_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let vtc = vtc_cycle(secs);
    let fifo = fifo_cycle(secs);
    println!(
        "decision cost, {PERSONS_WAITING} persons waiting, {CAPACITY} slots: VTC {vtc:.0} ns, FIFO {fifo:.0} ns per cycle (finish + choose next + one arrival); {:.1}× FIFO",
        vtc / fifo
    );
    println!("fairness at 5× overload (16 slots, 5 heavy + 95 light persons, 120 s simulated):");
    println!(
        "| policy | Gini of served compute | light persons' wait p50 | p99 | heavy persons' share |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for (name, policy) in [("FIFO", Policy::Fifo), ("fair share (VTC)", Policy::Vtc)] {
        let outcome = overload(policy, 120.0, 42);
        println!(
            "| {name} | {:.3} | {:.2} s | {:.2} s | {:.1}% |",
            outcome.gini,
            outcome.light_p50_s,
            outcome.light_p99_s,
            outcome.heavy_share * 100.0
        );
    }
}
