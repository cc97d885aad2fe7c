//! Every limit of the agents crate: the defaults of [`AgentsOptions`](crate::AgentsOptions)
//! (which the config may change) and the bounds it may not.

use std::time::Duration;

/// The longest a tool call may take, by default (`[agents] tool_timeout`).
pub const TOOL_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);
/// The longest a toolset's server may take to start and list its tools.
pub const TOOLSET_START_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);
/// What the model sees of a tool's result, at most, by default (`tool_output_bytes_max`).
pub const TOOL_OUTPUT_BYTES_DEFAULT: usize = 16 * 1024;
/// A run's steps when it does not say (`[agents] max_steps`).
pub const MAX_STEPS_DEFAULT: u32 = 32;
/// The most steps a run may ask for.
pub const MAX_STEPS_MAX: u32 = 1_000;
/// `max_tokens` of each step's model call, by default (`step_max_tokens`).
pub const STEP_MAX_TOKENS_DEFAULT: u64 = 1_024;
/// Runs going at once per person, by default (`active_runs_per_person_max`).
pub const ACTIVE_RUNS_PER_PERSON_DEFAULT: usize = 100;
/// Runs kept per person, ended ones included, by default (`kept_runs_per_person_max`).
pub const KEPT_RUNS_PER_PERSON_DEFAULT: usize = 1_000;
/// The longest goal, and the longest steer.
pub const MESSAGE_BYTES_MAX: usize = 64 * 1024;
/// Events a follower of a run may fall behind by before it skips some.
pub const EVENTS_BUFFERED: usize = 256;
/// The most records the journal's writer commits in one transaction.
pub const JOURNAL_BATCH_MAX: usize = 1_024;
/// The longest an ended run waits for what its account holds to be let go before giving the
/// rest back: a model call's settle, or a lease on a shared database (given back once idle).
pub const END_WAIT_MAX: Duration = Duration::from_secs(120);

const _: () = assert!(MAX_STEPS_DEFAULT <= MAX_STEPS_MAX);
const _: () = assert!(ACTIVE_RUNS_PER_PERSON_DEFAULT <= KEPT_RUNS_PER_PERSON_DEFAULT);
