//! The assembly and the commands: the top of the house. `server` wires the rooms for
//! `flowhost serve`; `cli` is the command line; `backing` picks the job store, the blob store
//! and the outbox from the arguments; `simulate` starts the embedded ComfyUI double;
//! `check_plugin`, `new_plugin` and `models_command` are the other subcommands.
//!
//! Owns: construction and the order things start and stop in. Must never: hold a rule a
//! room below needs (a room never imports `app`), or answer a request itself.

pub mod backing;
pub mod check_plugin;
pub mod cli;
pub mod models_command;
pub mod new_plugin;
pub mod server;
pub mod simulate;
