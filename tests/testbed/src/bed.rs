//! The whole bed: control plane, Dovecot instances, keys, and how they are started,
//! reused and stopped.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::certs::Ca;
use crate::control_plane::{self, ControlPlane, ControlPlaneInfo};
use crate::dovecot::{Dovecot, DovecotInfo, DovecotOptions, Setup};
use crate::oauth::OAuthKey;
use crate::process::{self, Lifetime};
use crate::state::BedState;
use crate::unix_user::RunAs;
use crate::versions::Binaries;

/// How long kube-apiserver may take to report ready (2 slow cores, cold caches).
const APISERVER_READY: Duration = Duration::from_secs(120);
/// How long etcd and kube-apiserver get to stop on SIGTERM before SIGKILL.
const CONTROL_PLANE_GRACE: Duration = Duration::from_secs(5);
const TEMP_PREFIX: &str = "mailroom-testbed-";
const OWNER_FILE: &str = "owner.pid";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Started by this process, stopped when it ends (tests).
    InProcess,
    /// Started by `testbed up`, left running for `testbed down`.
    Detached,
    /// Started by another process; this one only uses it.
    Attached,
}

/// A running test bed. Get the per-test-binary one with [`crate::shared`].
pub struct Bed {
    mode: Mode,
    bins: Binaries,
    control: ControlPlaneInfo,
    state: Mutex<BedState>,
    // Field order is drop order: mail servers, then the control plane, then the files.
    dovecot: Dovecot,
    self_signed: OnceLock<Dovecot>,
    plain: OnceLock<Dovecot>,
    control_plane: Mutex<Option<ControlPlane>>,
    test_ca: Option<Ca>,
    extra_lock: Mutex<()>,
    namespaces: AtomicU32,
    started_in: Option<Duration>,
    temp: Mutex<Option<TempDir>>,
}

impl std::fmt::Debug for Bed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bed")
            .field("mode", &self.mode)
            .field("state_dir", &self.state_dir())
            .field("server_url", &self.control.server_url)
            .finish()
    }
}

impl Bed {
    /// Starts a bed owned by this process in a fresh temporary folder; it stops when the
    /// `Bed` is dropped or [`Bed::shutdown`] runs, and with this process in any case.
    pub fn start() -> Result<Bed> {
        sweep_stale_temp_dirs();
        process::become_subreaper();
        let temp = tempfile::Builder::new().prefix(TEMP_PREFIX).tempdir()?;
        let dir = temp.path().to_path_buf();
        process::record_self(&dir.join(OWNER_FILE))?;
        launch(dir, Mode::InProcess, Some(temp))
    }

    /// Starts a bed whose processes outlive this one (`testbed up`), with its files in
    /// `state_dir`. Fails if a bed is already up there.
    pub fn up(state_dir: &Path) -> Result<Bed> {
        if bed_running(state_dir) {
            bail!(
                "a test bed is already up in {}; stop it with tests/testbed/testbed down",
                state_dir.display()
            );
        }
        // Fail on a missing binary before touching the folder.
        Binaries::locate()?;
        if state_dir.exists() {
            Bed::down(state_dir)?;
        }
        fs::create_dir_all(state_dir)?;
        let state_dir = state_dir.canonicalize()?;
        launch(state_dir, Mode::Detached, None)
    }

    /// Uses the bed a `testbed up` left running in `state_dir`.
    pub fn attach(state_dir: &Path) -> Result<Bed> {
        let state = BedState::read(state_dir)?;
        if !bed_running(state_dir) {
            bail!(
                "the test bed in {} is not running (its processes are gone); run \
                 tests/testbed/testbed down and tests/testbed/testbed up again",
                state_dir.display()
            );
        }
        let bins = Binaries::locate()?;
        let instance = |name: &str| -> Result<Option<Dovecot>> {
            state
                .dovecots
                .get(name)
                .map(|info| Dovecot::attach(info.clone(), &bins.dovecot))
                .transpose()
        };
        let dovecot = instance("main")?
            .with_context(|| format!("{} has no main Dovecot", state_dir.display()))?;
        let self_signed = OnceLock::new();
        if let Some(d) = instance("self-signed")? {
            let _ = self_signed.set(d);
        }
        let plain = OnceLock::new();
        if let Some(d) = instance("plain")? {
            let _ = plain.set(d);
        }
        Ok(Bed {
            mode: Mode::Attached,
            control: state.control_plane.clone(),
            state: Mutex::new(state),
            bins,
            dovecot,
            self_signed,
            plain,
            control_plane: Mutex::new(None),
            test_ca: None,
            extra_lock: Mutex::new(()),
            namespaces: AtomicU32::new(0),
            started_in: None,
            temp: Mutex::new(None),
        })
    }

    /// Stops every process recorded in `state_dir` (SIGTERM, then SIGKILL after a few
    /// seconds) and removes the folder.
    pub fn down(state_dir: &Path) -> Result<()> {
        let pids = state_dir.join("pids");
        let looks_like_bed = pids.is_dir() || BedState::path(state_dir).exists();
        if !looks_like_bed {
            if state_dir.exists() && fs::read_dir(state_dir)?.next().is_some() {
                bail!(
                    "{} does not look like a test bed's state folder; not touching it",
                    state_dir.display()
                );
            }
            let _ = fs::remove_dir(state_dir);
            return Ok(());
        }
        stop_recorded_processes(&pids);
        fs::remove_dir_all(state_dir)
            .with_context(|| format!("removing {}", state_dir.display()))?;
        Ok(())
    }

    /// Stops what this process started and removes a temporary state folder. Attached
    /// and detached beds are left running.
    pub fn shutdown(&self) {
        if self.mode != Mode::InProcess {
            return;
        }
        std::thread::scope(|scope| {
            for d in [
                self.self_signed.get(),
                self.plain.get(),
                Some(&self.dovecot),
            ]
            .into_iter()
            .flatten()
            {
                scope.spawn(|| d.stop());
            }
        });
        if let Some(mut cp) = self
            .control_plane
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            cp.stop(Duration::from_secs(5));
        }
        // Anything else recorded (nothing, normally) goes too before its files do.
        stop_recorded_processes(&self.state_dir().join("pids"));
        drop(self.temp.lock().unwrap_or_else(|e| e.into_inner()).take());
    }

    /// The folder holding the bed's files, logs and `state.json`.
    pub fn state_dir(&self) -> PathBuf {
        self.state().state_dir
    }

    /// A copy of the bed's description (what `state.json` holds).
    pub fn state(&self) -> BedState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Seconds from start to ready, for a bed this process started.
    pub fn started_in(&self) -> Option<Duration> {
        self.started_in
    }

    /// The admin kubeconfig (client certificate in the system:masters group).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.control.kubeconfig
    }

    /// `https://127.0.0.1:<port>`
    pub fn server_url(&self) -> &str {
        &self.control.server_url
    }

    /// The API server's serving CA.
    pub fn kube_ca_file(&self) -> &Path {
        &self.control.ca_file
    }

    /// The service-account issuer (the default audience of TokenRequest tokens).
    pub fn service_account_issuer(&self) -> &str {
        &self.control.service_account_issuer
    }

    /// The kubectl built into the cache (matches the API server's version).
    pub fn kubectl_path(&self) -> &Path {
        &self.control.kubectl
    }

    /// kubectl as the admin (`--kubeconfig` set).
    pub fn kubectl(&self) -> Command {
        self.control.kubectl()
    }

    /// The binaries the bed runs.
    pub fn binaries(&self) -> &Binaries {
        &self.bins
    }

    /// The main Dovecot: test CA, IMAP/POP3 with STARTTLS/STLS and implicit TLS.
    pub fn dovecot(&self) -> &Dovecot {
        &self.dovecot
    }

    /// The test CA that signed the main Dovecot's certificate.
    pub fn mail_ca_file(&self) -> PathBuf {
        self.dovecot.ca_file()
    }

    pub fn mail_ca_pem(&self) -> String {
        let file = self.mail_ca_file();
        fs::read_to_string(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()))
    }

    /// Sets a password on the main Dovecot (adding the account if new).
    pub fn set_password(&self, user: &str, password: &str) {
        self.dovecot
            .set_password(user, password)
            .unwrap_or_else(|e| panic!("setting the password of {user}: {e:#}"));
    }

    /// The key and claims Dovecot's oauth2 passdb accepts.
    pub fn oauth(&self) -> OAuthKey {
        self.state().oauth
    }

    /// The Dovecot whose certificate is self-signed and CA:TRUE (started on first use).
    pub fn self_signed_dovecot(&self) -> &Dovecot {
        self.extra_dovecot(DovecotOptions::SELF_SIGNED)
    }

    /// The Dovecot with `ssl = no`: no STARTTLS/STLS offered (started on first use).
    pub fn plaintext_dovecot(&self) -> &Dovecot {
        self.extra_dovecot(DovecotOptions::PLAIN)
    }

    /// Another Dovecot (self-signed certificate, or no TLS), started on first use and
    /// shared afterwards. `DovecotOptions::MAIN` returns the main one.
    pub fn extra_dovecot(&self, options: DovecotOptions) -> &Dovecot {
        let slot = match options.name() {
            "main" => return &self.dovecot,
            "self-signed" => &self.self_signed,
            _ => &self.plain,
        };
        if let Some(d) = slot.get() {
            return d;
        }
        let _one_at_a_time = self.extra_lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = slot.get() {
            return d;
        }
        let dovecot = self.create_dovecot(options).unwrap_or_else(|e| {
            panic!(
                "starting the {} Dovecot of the test bed: {e:#}",
                options.name()
            )
        });
        let info = dovecot.info();
        let _ = slot.set(dovecot);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.dovecots.insert(info.name.clone(), info);
        if let Err(e) = state.write() {
            eprintln!("[testbed] could not update state.json: {e:#}");
        }
        slot.get().expect("just set")
    }

    fn create_dovecot(&self, options: DovecotOptions) -> Result<Dovecot> {
        let Some(ca) = &self.test_ca else {
            bail!(
                "the bed in {} was started without the {} Dovecot and this process cannot \
                 add one; restart it with tests/testbed/testbed down && tests/testbed/testbed up",
                self.state_dir().display(),
                options.name()
            );
        };
        let state = self.state();
        create_dovecot(
            &state.state_dir,
            &self.bins,
            lifetime_of(self.mode),
            ca,
            &self.dovecot.ca_file(),
            &state.oauth,
            options,
        )
    }

    /// Stops kube-apiserver, as a restart by its kubelet would (SIGTERM, SIGKILL after
    /// 5 s): clients see connections refused until [`Bed::start_apiserver`]. Only a bed
    /// this process started can do this (see [`Bed::start`]).
    pub fn stop_apiserver(&self) -> Result<()> {
        self.with_control_plane("stop kube-apiserver", |cp| {
            cp.stop_apiserver(CONTROL_PLANE_GRACE);
            Ok(())
        })
    }

    /// Starts kube-apiserver again on the same port with the same certificates and flags
    /// (the kubeconfig keeps working), and returns once `/readyz` says ok.
    pub fn start_apiserver(&self) -> Result<()> {
        self.with_control_plane("start kube-apiserver", |cp| {
            cp.start_apiserver(APISERVER_READY)
        })
    }

    /// Stops etcd; the API server keeps running and fails every request that needs
    /// storage (its watch cache may still answer some reads) until [`Bed::start_etcd`].
    pub fn stop_etcd(&self) -> Result<()> {
        self.with_control_plane("stop etcd", |cp| {
            cp.stop_etcd(CONTROL_PLANE_GRACE);
            Ok(())
        })
    }

    /// Starts etcd again on the same ports with the same data, and returns once the API
    /// server (if running) says ready again.
    pub fn start_etcd(&self) -> Result<()> {
        self.with_control_plane("start etcd", |cp| cp.start_etcd(APISERVER_READY))
    }

    fn with_control_plane(
        &self,
        what: &str,
        act: impl FnOnce(&mut ControlPlane) -> Result<()>,
    ) -> Result<()> {
        let mut slot = self.control_plane.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_mut() {
            Some(cp) => act(cp),
            None => bail!(
                "cannot {what}: the control plane of the bed in {} belongs to another process \
                 (`testbed up`, reused through {}); tests that restart it need a bed of their \
                 own, so run them with {} unset",
                self.state_dir().display(),
                crate::STATE_ENV,
                crate::STATE_ENV
            ),
        }
    }

    /// Creates a namespace with a fresh name starting with `prefix`, for one test.
    pub fn namespace(&self, prefix: &str) -> String {
        let n = self.namespaces.fetch_add(1, Ordering::Relaxed);
        let mut base: String = prefix
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        base.truncate(40);
        let base = base.trim_matches('-');
        let base = if base.is_empty() { "test" } else { base };
        let name = format!("{base}-{n}-{}", random_suffix());
        let out = self
            .kubectl()
            .args(["create", "namespace", &name])
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.kubectl_path().display()));
        assert!(
            out.status.success(),
            "expected `kubectl create namespace {name}` to succeed; it said: {}\nAPI server log: {}",
            String::from_utf8_lossy(&out.stderr).trim(),
            self.control.apiserver_log.display()
        );
        name
    }

    /// Every log file of the bed, for failure messages.
    pub fn log_paths(&self) -> Vec<PathBuf> {
        let state = self.state();
        let mut logs = vec![
            state.control_plane.apiserver_log.clone(),
            state.control_plane.etcd_log.clone(),
        ];
        logs.extend(state.dovecots.values().map(|d| d.log.clone()));
        logs
    }

    /// The shell `export` lines describing this bed.
    pub fn env_lines(&self) -> String {
        self.state().env_lines()
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn lifetime_of(mode: Mode) -> Lifetime {
    match mode {
        Mode::InProcess => Lifetime::Tied,
        Mode::Detached | Mode::Attached => Lifetime::Detached,
    }
}

fn launch(state_dir: PathBuf, mode: Mode, temp: Option<TempDir>) -> Result<Bed> {
    let started = Instant::now();
    let bins = Binaries::locate()?;
    RunAs::for_dovecot()?;
    let result = launch_in(&state_dir, mode, &bins, temp, started);
    if result.is_err() {
        stop_recorded_processes(&state_dir.join("pids"));
    }
    result
}

fn launch_in(
    state_dir: &Path,
    mode: Mode,
    bins: &Binaries,
    temp: Option<TempDir>,
    started: Instant,
) -> Result<Bed> {
    let lifetime = lifetime_of(mode);
    // Dovecot runs as another user and must reach its folders below this one.
    fs::set_permissions(state_dir, fs::Permissions::from_mode(0o755))?;
    let pid_dir = state_dir.join("pids");
    fs::create_dir_all(&pid_dir)?;

    let mut control_plane =
        control_plane::start(&state_dir.join("control-plane"), &pid_dir, bins, lifetime)?;

    // Dovecot starts while the API server boots.
    let test_ca = Ca::new("mailroom test bed mail CA")?;
    let ca_file = state_dir.join("mail-ca.crt");
    fs::write(&ca_file, test_ca.cert_pem())?;
    let oauth = OAuthKey::generate(&state_dir.join("oauth2-keys"))?;
    let make = |options| {
        create_dovecot(
            state_dir, bins, lifetime, &test_ca, &ca_file, &oauth, options,
        )
    };
    let dovecot = make(DovecotOptions::MAIN)?;
    let (self_signed, plain) = (OnceLock::new(), OnceLock::new());
    if mode == Mode::Detached {
        // Nobody can add instances to a detached bed later, so it has them all.
        let _ = self_signed.set(make(DovecotOptions::SELF_SIGNED)?);
        let _ = plain.set(make(DovecotOptions::PLAIN)?);
    }

    control_plane.wait_ready(APISERVER_READY)?;

    let mut dovecots = std::collections::BTreeMap::new();
    for d in [Some(&dovecot), self_signed.get(), plain.get()]
        .into_iter()
        .flatten()
    {
        let info: DovecotInfo = d.info();
        dovecots.insert(info.name.clone(), info);
    }
    let state = BedState {
        state_dir: state_dir.to_path_buf(),
        pid_dir,
        control_plane: control_plane.info.clone(),
        dovecots,
        oauth,
    };
    state.write()?;
    let control = control_plane.info.clone();
    let control_plane = match mode {
        Mode::InProcess => Some(control_plane),
        _ => {
            control_plane.release();
            None
        }
    };
    Ok(Bed {
        mode,
        bins: bins.clone(),
        control,
        state: Mutex::new(state),
        dovecot,
        self_signed,
        plain,
        control_plane: Mutex::new(control_plane),
        test_ca: Some(test_ca),
        extra_lock: Mutex::new(()),
        namespaces: AtomicU32::new(0),
        started_in: Some(started.elapsed()),
        temp: Mutex::new(temp),
    })
}

fn create_dovecot(
    state_dir: &Path,
    bins: &Binaries,
    lifetime: Lifetime,
    test_ca: &Ca,
    test_ca_file: &Path,
    oauth: &OAuthKey,
    options: DovecotOptions,
) -> Result<Dovecot> {
    let name = options.name();
    Dovecot::create(
        Setup {
            dir: state_dir.join(format!("dovecot-{name}")),
            pid_file: state_dir.join("pids").join(format!("dovecot-{name}.pid")),
            binary: &bins.dovecot,
            lifetime,
            test_ca,
            test_ca_file,
            oauth,
        },
        options,
    )
}

/// Whether any process recorded in the bed's pid folder still runs.
fn bed_running(state_dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(state_dir.join("pids")) else {
        return false;
    };
    entries
        .flatten()
        .any(|e| process::recorded_alive(&e.path()))
}

/// Stops the mail servers (together), then the API server, then etcd.
fn stop_recorded_processes(pid_dir: &Path) {
    let Ok(entries) = fs::read_dir(pid_dir) else {
        return;
    };
    let files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    let stage_of = |p: &PathBuf| match p.file_stem().and_then(|s| s.to_str()) {
        Some("kube-apiserver") => 1,
        Some("etcd") => 2,
        _ => 0,
    };
    for stage in 0..3 {
        std::thread::scope(|scope| {
            for file in files.iter().filter(|p| stage_of(p) == stage) {
                scope.spawn(move || {
                    if let Err(e) = process::stop_recorded(file, Duration::from_secs(5)) {
                        eprintln!("[testbed] {e:#}");
                    }
                });
            }
        });
    }
}

/// Removes temporary beds whose owning test process died without cleaning up (killed
/// by a timeout, say), stopping anything of theirs still running.
fn sweep_stale_temp_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_bed = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(TEMP_PREFIX));
        let owner = path.join(OWNER_FILE);
        if is_bed && owner.exists() && !process::recorded_alive(&owner) {
            stop_recorded_processes(&path.join("pids"));
            let _ = fs::remove_dir_all(&path);
        }
    }
}

fn random_suffix() -> String {
    let mut bytes = [0u8; 3];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
