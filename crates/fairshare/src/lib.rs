//! Fair share when capacity is scarce: a virtual-token-counter (VTC) queue in front of one model.
//!
//! Budgets cap how much each person uses over a period; this decides who goes first *now*, when
//! every slot of a model is busy. Each payer (the person or pool that pays for a request) has a
//! counter: the service it has received, in cu, divided by its weight. When a slot frees, the
//! next request served is the oldest waiting request of the payer with the smallest counter
//! (Sheng et al., "Fairness in Serving Large Language Models", OSDI 2024). Within one payer,
//! first come first served.
//!
//! Idle time cannot be banked: the scheduler keeps a *floor*, the smallest counter among active
//! payers (those with a request waiting or running), which only rises; a payer that becomes
//! active again is lifted to at least the floor. So a person who was away does not come back
//! with a burst of priority over those who stayed, yet is served next if everyone else has had
//! more.
//!
//! Counters are charged as service is delivered: a request's prompt when it is admitted, then
//! whatever the caller reports (completion tokens as they stream), trued up to the exact cost
//! when it finishes.
//!
//! There is no I/O and no clock here: events in (`arrive`, `charge`, `finish`, `cancel`,
//! `expire` with the caller's time), decisions out (which tickets run), so every behaviour is
//! tested deterministically.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rustc_hash::FxHashMap;

/// Who pays for a request: a person or a pool (an agent's requests count under its owner).
pub type Payer = u64;

/// One request, from arrival until it finishes or leaves. Tickets are issued in arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(pub u64);

/// The most a payer's weight may be; weights are 1 to this (0 counts as 1).
pub const WEIGHT_MAX: u32 = 1_000;

/// Counter units per cu at weight 1: a weight divides a charge with this much precision.
const SCALE: u128 = 1_000_000;

/// A model's capacity and its queue's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests running at once (an upstream's `max_concurrency`, an embedded model's slots).
    pub capacity: usize,
    /// Requests one payer may have waiting.
    pub queue_depth_max_per_person: usize,
    /// Requests waiting in all.
    pub queue_depth_max: usize,
    /// The longest a request may wait, in the caller's time unit (ms).
    pub queue_wait_max_ms: u64,
}

/// Why a request was turned away. Nothing ran, so nothing is charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// Its payer already has `queue_depth_max_per_person` requests waiting.
    PersonQueueFull,
    /// `queue_depth_max` requests are waiting.
    QueueFull,
    /// It waited `queue_wait_max` without being served.
    WaitTooLong,
}

impl Rejection {
    /// A short name, for metrics and error codes.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::PersonQueueFull => "person_queue_full",
            Rejection::QueueFull => "queue_full",
            Rejection::WaitTooLong => "wait_too_long",
        }
    }
}

/// What happened to an arriving request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// A slot was free and nobody was waiting: it runs now.
    Admitted(Ticket),
    /// It waits; a later `finish` (or `cancel`/`expire` of others) admits it.
    Queued(Ticket),
    /// Turned away.
    Rejected(Rejection),
}

#[derive(Debug)]
struct PayerState {
    counter: u128,
    weight: u32,
    /// Waiting tickets, oldest first, with the prompt cost to charge on admission.
    waiting: VecDeque<(Ticket, u64)>,
    running: usize,
    /// The admission (a sequence number) that last gave this payer a slot; 0: never.
    last_served: u64,
}

impl PayerState {
    fn active(&self) -> bool {
        self.running > 0 || !self.waiting.is_empty()
    }

    fn charge(&mut self, cu: u64) {
        self.counter += u128::from(cu) * SCALE / u128::from(self.weight);
    }

    fn credit(&mut self, cu: u64) {
        self.counter = self
            .counter
            .saturating_sub(u128::from(cu) * SCALE / u128::from(self.weight));
    }
}

#[derive(Debug, Clone, Copy)]
struct Running {
    payer: Payer,
    charged_cu: u64,
}

/// The scheduler of one model. See the crate's documentation.
#[derive(Debug)]
pub struct Scheduler {
    limits: Limits,
    payers: FxHashMap<Payer, PayerState>,
    running: FxHashMap<Ticket, Running>,
    /// Payers with a request waiting, by (counter, when last admitted, oldest waiting ticket):
    /// between equal counters, the payer served least recently goes first.
    ready: BTreeSet<(u128, u64, Ticket, Payer)>,
    /// Active payers by counter, for the floor.
    active: BTreeSet<(u128, Payer)>,
    /// Waiting tickets in arrival order: payer and arrival time.
    waiting: BTreeMap<Ticket, (Payer, u64)>,
    floor: u128,
    next_ticket: u64,
    admissions: u64,
}

impl Scheduler {
    /// A scheduler with nothing running or waiting.
    pub fn new(limits: Limits) -> Scheduler {
        Scheduler {
            limits: Limits {
                capacity: limits.capacity.max(1),
                ..limits
            },
            payers: FxHashMap::default(),
            running: FxHashMap::default(),
            ready: BTreeSet::new(),
            active: BTreeSet::new(),
            waiting: BTreeMap::new(),
            floor: 0,
            next_ticket: 1,
            admissions: 0,
        }
    }

    /// Requests running.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Requests waiting.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Payers the scheduler remembers (active ones, and idle ones served above the floor).
    pub fn payers(&self) -> usize {
        self.payers.len()
    }

    /// A payer's counter, in cu (weighted), if it is remembered.
    pub fn counter_cu(&self, payer: Payer) -> Option<f64> {
        self.payers
            .get(&payer)
            .map(|state| state.counter as f64 / SCALE as f64)
    }

    /// Takes `payer` out of the ordered sets, before its state changes.
    fn unlink(&mut self, payer: Payer) {
        if let Some(state) = self.payers.get(&payer) {
            if let Some(&(first, _)) = state.waiting.front() {
                self.ready
                    .remove(&(state.counter, state.last_served, first, payer));
            }
            self.active.remove(&(state.counter, payer));
        }
    }

    /// Puts `payer` back into the ordered sets after its state changed; forgets it if it is idle
    /// and would be lifted to the floor anyway on its return.
    fn link(&mut self, payer: Payer) {
        let Some(state) = self.payers.get(&payer) else {
            return;
        };
        if let Some(&(first, _)) = state.waiting.front() {
            self.ready
                .insert((state.counter, state.last_served, first, payer));
        }
        if state.active() {
            self.active.insert((state.counter, payer));
        }
        if let Some(&(lowest, _)) = self.active.first() {
            self.floor = self.floor.max(lowest);
        }
        if !state.active() && state.counter <= self.floor {
            self.payers.remove(&payer);
        }
    }

    /// A request arrives from `payer` (with its weight, 1 to [`WEIGHT_MAX`]); `prompt_cu` is
    /// charged to the payer's counter when it is admitted. `now_ms` starts its wait.
    pub fn arrive(&mut self, payer: Payer, weight: u32, prompt_cu: u64, now_ms: u64) -> Arrival {
        let free = self.running.len() < self.limits.capacity && self.waiting.is_empty();
        if !free {
            let waiting_here = self.payers.get(&payer).map_or(0, |s| s.waiting.len());
            if waiting_here >= self.limits.queue_depth_max_per_person {
                return Arrival::Rejected(Rejection::PersonQueueFull);
            }
            if self.waiting.len() >= self.limits.queue_depth_max {
                return Arrival::Rejected(Rejection::QueueFull);
            }
        }
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        self.unlink(payer);
        let floor = self.floor;
        let state = self.payers.entry(payer).or_insert(PayerState {
            counter: 0,
            weight: 1,
            waiting: VecDeque::new(),
            running: 0,
            last_served: 0,
        });
        if !state.active() {
            // Back after being idle: no banked priority.
            state.counter = state.counter.max(floor);
            state.weight = weight.clamp(1, WEIGHT_MAX);
        }
        let arrival = if free {
            self.admissions += 1;
            state.last_served = self.admissions;
            state.running += 1;
            state.charge(prompt_cu);
            self.running.insert(
                ticket,
                Running {
                    payer,
                    charged_cu: prompt_cu,
                },
            );
            Arrival::Admitted(ticket)
        } else {
            state.waiting.push_back((ticket, prompt_cu));
            self.waiting.insert(ticket, (payer, now_ms));
            Arrival::Queued(ticket)
        };
        self.link(payer);
        arrival
    }

    /// Service delivered to a running request (completion tokens as they stream), in cu.
    pub fn charge(&mut self, ticket: Ticket, cu: u64) {
        let Some(running) = self.running.get_mut(&ticket) else {
            return;
        };
        running.charged_cu = running.charged_cu.saturating_add(cu);
        let payer = running.payer;
        self.unlink(payer);
        if let Some(state) = self.payers.get_mut(&payer) {
            state.charge(cu);
        }
        self.link(payer);
    }

    /// A running request ended having cost `total_cu` in all: its payer's counter is trued up to
    /// that, its slot frees, and the next requests are admitted. Returns the tickets admitted.
    pub fn finish(&mut self, ticket: Ticket, total_cu: u64) -> Vec<Ticket> {
        let Some(running) = self.running.remove(&ticket) else {
            return Vec::new();
        };
        let payer = running.payer;
        self.unlink(payer);
        if let Some(state) = self.payers.get_mut(&payer) {
            if total_cu >= running.charged_cu {
                state.charge(total_cu - running.charged_cu);
            } else {
                state.credit(running.charged_cu - total_cu);
            }
            state.running -= 1;
        }
        self.link(payer);
        self.fill()
    }

    /// A waiting request left (its client went away). Returns whether it was waiting; a ticket
    /// already admitted must be ended with [`Scheduler::finish`] instead.
    pub fn cancel(&mut self, ticket: Ticket) -> bool {
        let Some((payer, _)) = self.waiting.remove(&ticket) else {
            return false;
        };
        self.unlink(payer);
        if let Some(state) = self.payers.get_mut(&payer) {
            state.waiting.retain(|(waiting, _)| *waiting != ticket);
        }
        self.link(payer);
        true
    }

    /// Turns away every request that has waited `queue_wait_max` by `now_ms`, oldest first.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Ticket> {
        let mut expired = Vec::new();
        while let Some((&ticket, &(_, arrived_ms))) = self.waiting.first_key_value() {
            if now_ms.saturating_sub(arrived_ms) < self.limits.queue_wait_max_ms {
                break;
            }
            self.cancel(ticket);
            expired.push(ticket);
        }
        expired
    }

    /// Every waiting request leaves the queue (the server is stopping); returns them, oldest
    /// first. Running requests are untouched.
    pub fn drain(&mut self) -> Vec<Ticket> {
        let tickets: Vec<Ticket> = self.waiting.keys().copied().collect();
        for ticket in &tickets {
            self.cancel(*ticket);
        }
        tickets
    }

    /// Where `payer`'s oldest waiting request stands: 1 is served next.
    pub fn position(&self, payer: Payer) -> Option<usize> {
        let state = self.payers.get(&payer)?;
        let &(first, _) = state.waiting.front()?;
        let key = (state.counter, state.last_served, first, payer);
        Some(self.ready.range(..key).count() + 1)
    }

    /// Admits waiting requests while slots are free: the oldest request of the payer with the
    /// smallest counter first, its prompt charged at once.
    fn fill(&mut self) -> Vec<Ticket> {
        let mut admitted = Vec::new();
        while self.running.len() < self.limits.capacity {
            let Some(&(_, _, ticket, payer)) = self.ready.first() else {
                break;
            };
            self.unlink(payer);
            let Some(state) = self.payers.get_mut(&payer) else {
                break;
            };
            let Some((_, prompt_cu)) = state.waiting.pop_front() else {
                break;
            };
            self.admissions += 1;
            state.last_served = self.admissions;
            state.running += 1;
            state.charge(prompt_cu);
            self.waiting.remove(&ticket);
            self.running.insert(
                ticket,
                Running {
                    payer,
                    charged_cu: prompt_cu,
                },
            );
            self.link(payer);
            admitted.push(ticket);
        }
        admitted
    }

    /// Checks the scheduler's own invariants; for tests.
    pub fn check(&self) -> Result<(), String> {
        if self.running.len() > self.limits.capacity {
            return Err(format!("{} running over capacity", self.running.len()));
        }
        if !self.waiting.is_empty() && self.running.len() < self.limits.capacity {
            return Err("a slot is free while requests wait".to_string());
        }
        let waiting: usize = self.payers.values().map(|s| s.waiting.len()).sum();
        if waiting != self.waiting.len() {
            return Err(format!(
                "{waiting} waiting by payer, {} in all",
                self.waiting.len()
            ));
        }
        let running: usize = self.payers.values().map(|s| s.running).sum();
        if running != self.running.len() {
            return Err(format!(
                "{running} running by payer, {} in all",
                self.running.len()
            ));
        }
        let ready = self
            .payers
            .values()
            .filter(|s| !s.waiting.is_empty())
            .count();
        if ready != self.ready.len() {
            return Err(format!(
                "{ready} payers waiting, {} ready",
                self.ready.len()
            ));
        }
        let active = self.payers.values().filter(|s| s.active()).count();
        if active != self.active.len() {
            return Err(format!(
                "{active} payers active, {} indexed",
                self.active.len()
            ));
        }
        Ok(())
    }
}

/// Jain's fairness index of some amounts: 1 when all are equal, 1/n when one has everything.
pub fn jain_index(amounts: &[f64]) -> f64 {
    let sum: f64 = amounts.iter().sum();
    let squares: f64 = amounts.iter().map(|x| x * x).sum();
    if squares == 0.0 {
        return 1.0;
    }
    sum * sum / (amounts.len() as f64 * squares)
}

/// The Gini coefficient of some amounts: 0 when all are equal, towards 1 when one has all.
pub fn gini(amounts: &[f64]) -> f64 {
    let n = amounts.len();
    let sum: f64 = amounts.iter().sum();
    if n == 0 || sum == 0.0 {
        return 0.0;
    }
    let mut sorted = amounts.to_vec();
    sorted.sort_by(f64::total_cmp);
    let weighted: f64 = sorted
        .iter()
        .enumerate()
        .map(|(i, x)| (2.0 * (i as f64 + 1.0) - n as f64 - 1.0) * x)
        .sum();
    weighted / (n as f64 * sum)
}
