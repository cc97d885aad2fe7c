//! The `stipend` binary's parts: the config file, the operator's commands, the control socket
//! and the server. `main.rs` only parses arguments and calls into here.

pub mod agent;
pub mod commands;
pub mod config;
pub mod control;
pub mod fetch;
pub mod limits;
pub mod serve;
