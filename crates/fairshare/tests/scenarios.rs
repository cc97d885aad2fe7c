//! Data-driven scheduler scenarios: each file in `tests/scenarios` is a script of commands
//! (`> …`) each followed by the decisions it must produce, one per line, in order.
//!
//! Commands: `limits capacity=N person=N total=N wait=MS`, `at MS` (the clock),
//! `arrive PAYER [weight=W] [prompt=CU]`, `charge TICKET CU`, `finish TICKET CU`,
//! `cancel TICKET`, `expire`, `drain`, `position PAYER`, `counter PAYER`.
//! Decisions: `admit T P`, `queue T P`, `reject P REASON`, `expired T`, `cancelled T`,
//! `drained T`, `not-waiting T`, `position P N|none`, `counter P CU`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;

use stipend_fairshare::{Arrival, Limits, Scheduler, Ticket};

fn payer_id(names: &mut HashMap<String, u64>, name: &str) -> u64 {
    let next = names.len() as u64 + 1;
    *names.entry(name.to_string()).or_insert(next)
}

fn run(script: &str) -> Result<(), String> {
    let mut scheduler = Scheduler::new(Limits {
        capacity: 1,
        queue_depth_max_per_person: 100,
        queue_depth_max: 1_000,
        queue_wait_max_ms: 60_000,
    });
    let mut names: HashMap<String, u64> = HashMap::new();
    let mut owners: HashMap<u64, String> = HashMap::new();
    let mut now = 0u64;
    let mut expected: Vec<String> = Vec::new();
    let mut produced: Vec<String> = Vec::new();
    let mut command_line = String::new();
    let check = |command: &str, expected: &mut Vec<String>, produced: &mut Vec<String>| {
        if expected != produced {
            return Err(format!(
                "after `{command}`:\n  expected {expected:?}\n  produced {produced:?}"
            ));
        }
        expected.clear();
        produced.clear();
        Ok(())
    };
    for (number, line) in script.lines().enumerate() {
        let line = line.split('#').next().unwrap().trim();
        if line.is_empty() {
            continue;
        }
        let Some(command) = line.strip_prefix("> ") else {
            expected.push(line.to_string());
            continue;
        };
        check(&command_line, &mut expected, &mut produced)?;
        command_line = format!("line {}: {command}", number + 1);
        let words: Vec<&str> = command.split_whitespace().collect();
        let option = |key: &str, default: u64| {
            words
                .iter()
                .find_map(|word| word.strip_prefix(&format!("{key}=")))
                .map_or(default, |value| value.parse().unwrap())
        };
        let ticket = |index: usize| Ticket(words[index].parse().unwrap());
        let name_of = |owners: &HashMap<u64, String>, ticket: Ticket| {
            owners.get(&ticket.0).cloned().unwrap_or_default()
        };
        match words[0] {
            "limits" => {
                scheduler = Scheduler::new(Limits {
                    capacity: option("capacity", 1) as usize,
                    queue_depth_max_per_person: option("person", 100) as usize,
                    queue_depth_max: option("total", 1_000) as usize,
                    queue_wait_max_ms: option("wait", 60_000),
                });
            }
            "at" => now = words[1].parse().unwrap(),
            "arrive" => {
                let payer = payer_id(&mut names, words[1]);
                let arrival =
                    scheduler.arrive(payer, option("weight", 1) as u32, option("prompt", 0), now);
                match arrival {
                    Arrival::Admitted(t) => {
                        owners.insert(t.0, words[1].to_string());
                        produced.push(format!("admit {} {}", t.0, words[1]));
                    }
                    Arrival::Queued(t) => {
                        owners.insert(t.0, words[1].to_string());
                        produced.push(format!("queue {} {}", t.0, words[1]));
                    }
                    Arrival::Rejected(reason) => {
                        produced.push(format!("reject {} {}", words[1], reason.as_str()));
                    }
                }
            }
            "charge" => scheduler.charge(ticket(1), words[2].parse().unwrap()),
            "finish" => {
                for t in scheduler.finish(ticket(1), words[2].parse().unwrap()) {
                    produced.push(format!("admit {} {}", t.0, name_of(&owners, t)));
                }
            }
            "cancel" => {
                let t = ticket(1);
                produced.push(if scheduler.cancel(t) {
                    format!("cancelled {}", t.0)
                } else {
                    format!("not-waiting {}", t.0)
                });
            }
            "drain" => {
                for t in scheduler.drain() {
                    produced.push(format!("drained {}", t.0));
                }
            }
            "expire" => {
                for t in scheduler.expire(now) {
                    produced.push(format!("expired {}", t.0));
                }
            }
            "position" => {
                let payer = payer_id(&mut names, words[1]);
                produced.push(format!(
                    "position {} {}",
                    words[1],
                    scheduler
                        .position(payer)
                        .map_or("none".to_string(), |p| p.to_string())
                ));
            }
            "counter" => {
                let payer = payer_id(&mut names, words[1]);
                produced.push(format!(
                    "counter {} {}",
                    words[1],
                    scheduler.counter_cu(payer).unwrap_or(0.0)
                ));
            }
            other => return Err(format!("line {}: unknown command {other}", number + 1)),
        }
        scheduler
            .check()
            .map_err(|error| format!("line {}: {error}", number + 1))?;
    }
    check(&command_line, &mut expected, &mut produced)
}

#[test]
fn every_scenario_produces_its_decisions() {
    // At run time: a test binary reused from another checkout's build reads this checkout.
    let dir = std::path::PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("tests/scenarios");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "txt"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    let mut failures = Vec::new();
    for file in &files {
        let script = std::fs::read_to_string(file).unwrap();
        if let Err(error) = run(&script) {
            failures.push(format!("{}: {error}", file.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn a_wrong_expectation_fails() {
    // The runner itself: a script that expects the wrong decision must fail.
    assert!(run("> arrive a\nadmit 1 a").is_ok());
    assert!(run("> arrive a\nqueue 1 a").is_err());
    assert!(run("> arrive a\n> arrive b\nadmit 2 b").is_err());
}
