//! End-to-end tests on the test bed: a real kube-apiserver and a real Dovecot, with the
//! controller running as it does in production. One bed per run of this binary; each
//! test works in its own namespace.

mod api_relay;
mod chart;
mod cli;
mod failures;
mod lifecycle;
mod oauth2;
mod operations;
mod readiness;
mod secrecy;
mod support;
mod testbed_smoke;
mod validation;
