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
