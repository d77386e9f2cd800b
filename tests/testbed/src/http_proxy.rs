//! A real HTTP proxy, tinyproxy from Debian, for the tests of mailroom's token requests
//! through `HTTPS_PROXY`/`HTTP_PROXY`: it tunnels `CONNECT` to the ports it is given and
//! forwards absolute-form requests, optionally only with Basic credentials, and logs every
//! request line, so a test can tell which requests went through it.
//!
//! Each test starts its own, on a free loopback port, with its files in a folder of the
//! bed's; it stops when dropped, with the test process in any case (tied), and with the
//! bed (its pid file is among the bed's).

use std::fs;
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};

use crate::Bed;
use crate::process::{self, Lifetime, Proc};
use crate::versions;

/// How long tinyproxy may take to listen.
const READY: Duration = Duration::from_secs(20);

/// What the proxy lets through.
#[derive(Clone, Debug, Default)]
pub struct ProxyOptions {
    /// Ports `CONNECT` may tunnel to (tinyproxy refuses the others with 403).
    pub connect_ports: Vec<u16>,
    /// Basic credentials every request must carry (407 without them); tinyproxy takes
    /// only letters, digits, `-`, `.` and `_` in them.
    pub basic_auth: Option<(String, String)>,
}

/// A running tinyproxy; stops when dropped.
pub struct HttpProxy {
    proc: Proc,
    port: u16,
    log: PathBuf,
    pid_file: PathBuf,
}

impl HttpProxy {
    /// Starts one in a new folder below `state_dir`, its pid file in the bed's `pids`.
    pub fn start(state_dir: &Path, options: &ProxyOptions) -> Result<HttpProxy> {
        static COUNT: AtomicU32 = AtomicU32::new(0);
        let binary = versions::find_debian_binary("tinyproxy", Path::new("/usr/bin/tinyproxy"));
        if !versions::is_executable(&binary) {
            let cache = versions::Binaries::locate()
                .map(|b| b.cache_root)
                .unwrap_or_default();
            bail!("{}", versions::not_prepared(&binary, &cache));
        }
        // Unique across the test processes sharing one bed.
        let name = format!(
            "tinyproxy-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = state_dir.join(&name);
        fs::create_dir_all(&dir)?;
        let port = process::free_port(Ipv4Addr::LOCALHOST)?;
        let (config, log) = (dir.join("tinyproxy.conf"), dir.join("tinyproxy.log"));
        fs::write(&config, config_text(port, &log, options))?;
        let pid_file = state_dir.join("pids").join(format!("{name}.pid"));
        let mut command = Command::new(&binary);
        command.args(["-d", "-c"]).arg(&config);
        let proc = Proc::spawn(
            &name,
            command,
            &dir.join("stdout.log"),
            Some(&pid_file),
            Lifetime::Tied,
            libc::SIGTERM,
        )?;
        let mut proxy = HttpProxy {
            proc,
            port,
            log,
            pid_file,
        };
        let mut exited = None;
        process::poll(READY, Duration::from_millis(50), &mut || {
            exited = proxy.proc.exited();
            exited.is_some() || TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok()
        });
        if exited.is_some() || TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            let why = exited.unwrap_or_else(|| format!("not listening after {READY:?}"));
            bail!(
                "tinyproxy on 127.0.0.1:{port}: {why}; its output:\n{}\nits log:\n{}",
                process::tail(&dir.join("stdout.log"), 10),
                process::tail(&proxy.log, 20)
            );
        }
        Ok(proxy)
    }

    /// `http://127.0.0.1:<port>`, what `HTTPS_PROXY` is set to.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The request lines it received, in order: `CONNECT host:port HTTP/1.1`,
    /// `POST http://host:port/path HTTP/1.1`.
    pub fn requests(&self) -> Vec<String> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once("]: Request (file descriptor "))
            .filter_map(|(_, rest)| rest.split_once("): ").map(|(_, r)| r.to_string()))
            .collect()
    }

    /// Its log, for failure messages.
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for HttpProxy {
    fn drop(&mut self) {
        self.proc.stop(Duration::from_secs(3));
        let _ = fs::remove_file(&self.pid_file);
    }
}

fn config_text(port: u16, log: &Path, options: &ProxyOptions) -> String {
    let mut text = format!(
        "Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 50\nAllow 127.0.0.1\n\
         LogFile \"{}\"\nLogLevel Info\nDisableViaHeader Yes\n",
        log.display()
    );
    for p in &options.connect_ports {
        text.push_str(&format!("ConnectPort {p}\n"));
    }
    if options.connect_ports.is_empty() {
        // Without any ConnectPort line tinyproxy tunnels to every port.
        text.push_str("ConnectPort 443\n");
    }
    if let Some((user, password)) = &options.basic_auth {
        text.push_str(&format!("BasicAuth {user} {password}\n"));
    }
    text
}

impl Bed {
    /// Starts a tinyproxy of this test's own (see [`HttpProxy`]).
    pub fn http_proxy(&self, options: &ProxyOptions) -> HttpProxy {
        HttpProxy::start(&self.state_dir(), options)
            .unwrap_or_else(|e| panic!("starting tinyproxy for the test: {e:#}"))
    }
}
