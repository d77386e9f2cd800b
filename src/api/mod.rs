//! The API: resource types, defaults and the vocabulary of reasons. Pure data, no I/O.

mod defaults;
pub mod oauth2;
mod provider;
mod reason;

pub use defaults::{Endpoint, parse_duration};
pub use provider::*;
pub use reason::Reason;

/// The annotation that asks the controller for a test now; its value is echoed in
/// `status.lastHandledCheckRequest`.
pub const CHECK_REQUESTED_AT: &str = "mailroom.dev/check-requested-at";
