//! What the fuzz targets share: a scripted server that replays the fuzzer's bytes in
//! uneven reads, an allocator that measures the peak memory of one run, and the checks on
//! a test's report.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io;
use std::pin::Pin;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use mailroom::api::{Protocol, SaslMechanism, TlsMode};
use mailroom::probe::fuzzing;
use mailroom::probe::{Login, Report, Step};
use secrecy::SecretString;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The password or token the client logs in with; no message may ever show it.
pub const SECRET: &str = "Fuzz-S3cret-9f2e";
pub const USERNAME: &str = "alice@example.com";

/// The most memory one test may hold at once beyond what was live before it. The byte
/// budget is 1 MiB; async-imap's buffer, a copy of a block while it parses, and our line
/// buffers fit several times over in this.
pub const MEMORY_BOUND: usize = 8 * fuzzing::MAX_TOTAL as usize;

/// Counts live heap bytes and their peak.
pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

fn grew(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the most heap it held at once beyond what was
/// live when it started.
pub fn measured<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed).saturating_sub(before))
}

/// One runtime for the whole fuzzing process (building one per input would dominate).
pub static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a tokio runtime")
});

/// A server that sends `data` in reads of varying size (from a small generator seeded by
/// the input, so a crash replays exactly), then closes, or with `forever` starts over
/// until the client stops reading. Whatever the client writes is accepted and dropped.
pub struct Script {
    data: Vec<u8>,
    pos: usize,
    forever: bool,
    rng: u64,
    reads: u32,
}

impl Script {
    pub fn new(data: Vec<u8>, forever: bool, seed: u8) -> Script {
        Script {
            data,
            pos: 0,
            forever,
            rng: 0x9e37_79b9_7f4a_7c15 ^ u64::from(seed),
            reads: 0,
        }
    }

    fn chunk(&mut self) -> usize {
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let r = self.rng >> 8;
        match self.rng & 3 {
            0 => 1,
            1 => (r % 16 + 1) as usize,
            2 => (r % 700 + 1) as usize,
            _ => 16 * 1024,
        }
    }
}

impl AsyncRead for Script {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Like a socket under tokio's cooperative budget, make the reader yield now and
        // then, so that the test's deadline is looked at.
        self.reads += 1;
        if self.reads.is_multiple_of(64) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if self.pos == self.data.len() {
            if !self.forever || self.data.is_empty() {
                return Poll::Ready(Ok(()));
            }
            self.pos = 0;
        }
        let n = self
            .chunk()
            .min(self.data.len() - self.pos)
            .min(buf.remaining());
        let start = self.pos;
        buf.put_slice(&self.data[start..start + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Script {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A session target's input: the first byte chooses how the client behaves, the rest is
/// what the server sends.
///
/// * bits 0–1: the login: 0 none, 1 a password, 2 an OAuth2 token (mechanism from what
///   the server offers), 3 an OAuth2 token by OAUTHBEARER;
/// * bit 2: TLS mode StartTLS (else None);
/// * bit 3: the server repeats its bytes until the client stops reading;
/// * the whole byte seeds the read sizes.
///
/// The seeds in `seeds/` start with `A` (a password login), `B` (an OAuth2 token), `C`
/// (an OAuth2 token by OAUTHBEARER), `E` (a password after STARTTLS) or `I` (a password,
/// and the server repeats itself).
pub fn session(protocol: Protocol, input: &[u8]) {
    let Some((&mode, server)) = input.split_first() else {
        return;
    };
    let login = match mode & 3 {
        0 => Login::None,
        1 => Login::Password {
            username: USERNAME.into(),
            password: SecretString::from(SECRET),
            allow_unencrypted: true,
        },
        n => Login::OAuth2 {
            username: USERNAME.into(),
            token: SecretString::from(SECRET),
            mechanism: if n == 2 {
                SaslMechanism::Auto
            } else {
                SaslMechanism::OAuthBearer
            },
            allow_unencrypted: true,
        },
    };
    let tls_mode = if mode & 4 != 0 {
        TlsMode::StartTls
    } else {
        TlsMode::None
    };
    let script = Script::new(server.to_vec(), mode & 8 != 0, mode);
    let (report, peak) = caught_panics_checked(|| {
        measured(|| RUNTIME.block_on(fuzzing::session(protocol, tls_mode, &login, script)))
    });
    assert!(
        peak <= MEMORY_BOUND,
        "one test held {peak} bytes at once, more than {MEMORY_BOUND}"
    );
    check_report(&report, !matches!(login, Login::None));
}

/// Runs `f` with a panic hook that lets a panic in async-imap's parser pass (imap-proto
/// panics on some replies a server may send, such as a response code followed by a
/// non-ASCII byte; the probe catches it and fails the step as ProtocolError, which
/// `check_report` checks) instead of aborting, as libFuzzer's hook does on any panic.
/// Every other panic goes to libFuzzer's hook: a defect of mailroom's, with its message.
fn caught_panics_checked<T>(f: impl FnOnce() -> T) -> T {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let libfuzzer = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_parser = info
                .location()
                .is_some_and(|l| l.file().contains("/imap-proto-"));
            if !in_parser {
                libfuzzer(info);
            }
        }))
    });
    f()
}

/// What every report must satisfy, whatever the server sent.
pub fn check_report(report: &Report, login_has_secret: bool) {
    // The outcome is a classified failure recorded at its step, or a pass.
    match &report.failure {
        Some(failure) => {
            assert!(!failure.message.is_empty(), "a failure without a message");
            assert!(
                report
                    .steps
                    .iter()
                    .any(|s| s.step == failure.step && !s.ok && s.detail == failure.message),
                "the failure {failure:?} is not among the steps {:?}",
                report.steps
            );
        }
        None => assert!(
            report.steps.iter().all(|s| s.ok || s.step == Step::Logout),
            "a pass with a failed step: {:?}",
            report.steps
        ),
    }
    // What a status, an Event or `mailroom check` shows carries no raw control characters.
    let raw = |text: &str| text.chars().any(char::is_control);
    let f = &report.findings;
    let shown = (report.failure.iter().map(|f| f.message.as_str()))
        .chain(report.steps.iter().map(|s| s.detail.as_str()))
        .chain(f.greeting.as_deref())
        .chain(f.capabilities.iter().map(String::as_str));
    for text in shown {
        assert!(!raw(text), "raw control characters in {text:?}");
    }
    // The login's secret is never shown from the login on, also when the server itself
    // sends it back. What the server said before (its greeting and capabilities) is shown
    // as it came: no credential had gone out for it to echo, and a `[redacted]` there
    // would tell the password (one that is a word of the greeting).
    let said_before = f
        .greeting
        .iter()
        .chain(&f.capabilities)
        .any(|t| t.contains(SECRET));
    if login_has_secret && !said_before {
        let after_login =
            |step: Step| matches!(step, Step::Authenticate | Step::Mailbox | Step::Logout);
        let shown = (report.failure.iter())
            .filter(|f| after_login(f.step))
            .map(|f| f.message.as_str())
            .chain(
                (report.steps.iter())
                    .filter(|s| after_login(s.step))
                    .map(|s| s.detail.as_str()),
            );
        for text in shown {
            assert!(!text.contains(SECRET), "the secret is shown: {report:?}");
        }
    }
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
