//! mailroom: a Kubernetes controller that keeps testing POP3 and IMAP mailboxes and says,
//! in `.status`, whether each one works and, if not, why.
//!
//! Data flows one way: `api` (pure types) -> `credentials` and `probe` -> `controller`.
//! The `cli` module holds the subcommands of the `mailroom` binary.

pub mod api;
pub mod check;
pub mod cli;
pub mod controller;
pub mod credentials;
pub mod probe;

/// How a person typed this program: `mailroom`, or `kubectl mailroom` when it runs as the
/// kubectl plugin, so the commands a message suggests can be pasted as they are. Set once
/// by the command line; the controller leaves it, and status says `mailroom`.
pub fn command_name() -> &'static str {
    COMMAND_NAME.get().map_or("mailroom", |n| n)
}

static COMMAND_NAME: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
