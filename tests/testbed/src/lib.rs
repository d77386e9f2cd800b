//! mailroom's test bed: a real kube-apiserver with etcd, and real Dovecot servers, on
//! loopback, started from the binaries `tests/testbed/prepare` puts in its cache.
//!
//! In tests, call [`shared()`]: it starts one bed per test binary (libtest runs all tests
//! of a binary in one process) and stops it when the process exits, pass or fail. With
//! `MAILROOM_TESTBED_STATE` pointing at the folder of a running `testbed up`, it reuses
//! that bed instead of starting one.

mod bed;
mod certs;
mod control_plane;
mod dovecot;
mod http_proxy;
mod maildir;
mod oauth;
mod process;
mod state;
mod token_server;
mod unix_user;
mod versions;

use std::sync::{Once, OnceLock};

pub use bed::Bed;
pub use certs::{Ca, Pair};
pub use control_plane::ControlPlaneInfo;
pub use dovecot::{
    Account, CertKind, Dovecot, DovecotInfo, DovecotOptions, LOCKING_ACCOUNT, MAIL_HOST,
    UNAVAILABLE_USER,
};
pub use http_proxy::{HttpProxy, ProxyOptions};
pub use oauth::OAuthKey;
pub use state::BedState;
pub use token_server::TokenServer;
pub use versions::Binaries;

/// The environment variable naming the state folder of a running `testbed up` to reuse.
pub const STATE_ENV: &str = "MAILROOM_TESTBED_STATE";

static SHARED: OnceLock<Result<Bed, String>> = OnceLock::new();

/// The bed of this test binary, started on first use (or attached to the one named by
/// `MAILROOM_TESTBED_STATE`). Panics with the reason if it cannot start, in every test
/// that asks, so a missing preparation is never a silent skip.
pub fn shared() -> &'static Bed {
    let bed = SHARED.get_or_init(|| {
        let started = match std::env::var_os(STATE_ENV) {
            Some(dir) if !dir.is_empty() => Bed::attach(std::path::Path::new(&dir)),
            _ => Bed::start(),
        };
        match started {
            Ok(bed) => {
                register_exit_cleanup();
                if let Some(t) = bed.started_in() {
                    eprintln!(
                        "[testbed] ready in {:.1} s; files and logs in {}",
                        t.as_secs_f64(),
                        bed.state_dir().display()
                    );
                }
                Ok(bed)
            }
            Err(e) => Err(format!("{e:#}")),
        }
    });
    match bed {
        Ok(bed) => bed,
        Err(message) => panic!("{message}"),
    }
}

/// Stops the shared bed when the test binary exits (statics are never dropped; libtest
/// exits through `exit`, which runs atexit handlers, whether tests passed or failed).
fn register_exit_cleanup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        extern "C" fn stop_shared_bed() {
            if let Some(Ok(bed)) = SHARED.get() {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| bed.shutdown()));
            }
        }
        // SAFETY: registers a plain function without arguments; failure only means the
        // parent-death signals do the cleanup instead.
        unsafe {
            libc::atexit(stop_shared_bed);
        }
    });
}
