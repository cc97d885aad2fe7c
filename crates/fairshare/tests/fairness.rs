//! Fairness over long runs, simulated step by step: backlogged persons with equal weights end up
//! with equal service (the VTC bound), the scheduler is work-conserving, and random event
//! sequences never break its invariants.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rand::{RngExt, SeedableRng};
use rand_xorshift::XorShiftRng;
use std::collections::HashMap;

use stipend_fairshare::{Arrival, Limits, Scheduler, Ticket, jain_index};

struct Job {
    payer: u64,
    prompt: u64,
    completion: u64,
    done: u64,
}

/// Runs `persons` backlogged persons (each always has `backlog` requests waiting) on `capacity`
/// slots for `steps` steps; each running request makes one completion token (1 cu) per step.
/// Returns the cu each person was served (prompts on admission, tokens as made) and the largest
/// request's cost.
fn backlogged(persons: u64, capacity: usize, steps: u64, seed: u64) -> (Vec<f64>, u64) {
    let mut rng = XorShiftRng::seed_from_u64(seed);
    let mut scheduler = Scheduler::new(Limits {
        capacity,
        queue_depth_max_per_person: 1_000,
        queue_depth_max: 100_000,
        queue_wait_max_ms: u64::MAX,
    });
    let mut jobs: HashMap<Ticket, Job> = HashMap::new();
    let mut waiting: HashMap<Ticket, Job> = HashMap::new();
    let mut served = vec![0u64; persons as usize];
    let mut largest = 0;
    let mut submit = |payer: u64,
                      scheduler: &mut Scheduler,
                      rng: &mut XorShiftRng,
                      jobs: &mut HashMap<Ticket, Job>,
                      waiting: &mut HashMap<Ticket, Job>,
                      served: &mut Vec<u64>| {
        // A mix of short and long requests.
        let long = rng.random_range(0..10) == 0;
        let job = Job {
            payer,
            prompt: 10 + rng.random_range(0..200),
            completion: 1 + rng.random_range(0..if long { 400 } else { 60 }),
            done: 0,
        };
        largest = largest.max(job.prompt + job.completion);
        match scheduler.arrive(payer, 1, job.prompt, 0) {
            Arrival::Admitted(ticket) => {
                served[payer as usize] += job.prompt;
                jobs.insert(ticket, job);
            }
            Arrival::Queued(ticket) => {
                waiting.insert(ticket, job);
            }
            Arrival::Rejected(reason) => panic!("{reason:?}"),
        }
    };
    for payer in 0..persons {
        for _ in 0..3 {
            submit(
                payer,
                &mut scheduler,
                &mut rng,
                &mut jobs,
                &mut waiting,
                &mut served,
            );
        }
    }
    for _ in 0..steps {
        let mut finished = Vec::new();
        for (ticket, job) in jobs.iter_mut() {
            job.done += 1;
            served[job.payer as usize] += 1;
            scheduler.charge(*ticket, 1);
            if job.done == job.completion {
                finished.push((*ticket, job.prompt + job.completion));
            }
        }
        for (ticket, total) in finished {
            let job = jobs.remove(&ticket).unwrap();
            for admitted in scheduler.finish(ticket, total) {
                let next = waiting.remove(&admitted).unwrap();
                served[next.payer as usize] += next.prompt;
                jobs.insert(admitted, next);
            }
            // Keep the person backlogged.
            submit(
                job.payer,
                &mut scheduler,
                &mut rng,
                &mut jobs,
                &mut waiting,
                &mut served,
            );
        }
        assert_eq!(jobs.len(), capacity, "a slot idled while requests waited");
        scheduler.check().unwrap();
    }
    (served.iter().map(|&cu| cu as f64).collect(), largest)
}

#[test]
fn backlogged_persons_get_equal_service_within_the_vtc_bound() {
    for (persons, capacity) in [(2, 1), (2, 4), (5, 1), (5, 4)] {
        for seed in 1..=3 {
            let (served, largest) = backlogged(persons, capacity, 20_000, seed);
            let max = served.iter().copied().fold(f64::MIN, f64::max);
            let min = served.iter().copied().fold(f64::MAX, f64::min);
            // VTC's bound is twice the most service that can be committed at once: one request
            // with one slot (2× the largest request), a batch's worth with several (Sheng et al.,
            // Theorem 4.4, with M the batch's capacity).
            let bound = 2 * capacity as u64 * largest;
            assert!(
                max - min <= bound as f64,
                "{persons} persons, capacity {capacity}, seed {seed}: served {served:?}, largest request {largest}"
            );
            let jain = jain_index(&served);
            assert!(jain >= 0.99, "Jain {jain} for {served:?}");
        }
    }
}

#[test]
fn random_events_keep_every_invariant() {
    for seed in 1..=20 {
        let mut rng = XorShiftRng::seed_from_u64(seed);
        let mut scheduler = Scheduler::new(Limits {
            capacity: 1 + rng.random_range(0..4) as usize,
            queue_depth_max_per_person: 1 + rng.random_range(0..5) as usize,
            queue_depth_max: 1 + rng.random_range(0..20) as usize,
            queue_wait_max_ms: 1 + rng.random_range(0..100),
        });
        let mut running: Vec<Ticket> = Vec::new();
        let mut queued: Vec<Ticket> = Vec::new();
        let mut now = 0;
        for _ in 0..5_000 {
            now += rng.random_range(0..5);
            match rng.random_range(0..6) {
                0 | 1 => match scheduler.arrive(
                    rng.random_range(0..8),
                    1 + rng.random_range(0..3) as u32,
                    rng.random_range(0..50),
                    now,
                ) {
                    Arrival::Admitted(ticket) => running.push(ticket),
                    Arrival::Queued(ticket) => queued.push(ticket),
                    Arrival::Rejected(_) => {}
                },
                2 if !running.is_empty() => {
                    let ticket = running[rng.random_range(0..running.len() as u64) as usize];
                    scheduler.charge(ticket, rng.random_range(0..20));
                }
                3 if !running.is_empty() => {
                    let ticket =
                        running.swap_remove(rng.random_range(0..running.len() as u64) as usize);
                    for admitted in scheduler.finish(ticket, rng.random_range(0..100)) {
                        queued.retain(|waiting| *waiting != admitted);
                        running.push(admitted);
                    }
                }
                4 if !queued.is_empty() => {
                    let ticket =
                        queued.swap_remove(rng.random_range(0..queued.len() as u64) as usize);
                    assert!(scheduler.cancel(ticket));
                }
                5 => {
                    for expired in scheduler.expire(now) {
                        assert!(queued.contains(&expired));
                        queued.retain(|waiting| *waiting != expired);
                    }
                }
                _ => {}
            }
            scheduler.check().unwrap();
            assert_eq!(scheduler.running(), running.len());
            assert_eq!(scheduler.waiting(), queued.len());
        }
        // Idle persons at or below the floor are forgotten: memory follows activity.
        while let Some(ticket) = running.pop() {
            for admitted in scheduler.finish(ticket, 0) {
                queued.retain(|waiting| *waiting != admitted);
                running.push(admitted);
            }
        }
        assert!(queued.is_empty());
        assert!(scheduler.payers() <= 8);
    }
}
