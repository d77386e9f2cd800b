//! etcd and kube-apiserver started the way controller-runtime's envtest starts them:
//! loopback ports, a client-certificate admin, the RBAC authorizer and service-account
//! signing keys (so TokenRequest and `kubectl create token` work).

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use crate::certs::{self, Ca};
use crate::process::{self, Lifetime, Proc};
use crate::versions::Binaries;

const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// What a client needs to reach the API server; outlives the process that started it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ControlPlaneInfo {
    /// `https://127.0.0.1:<port>`
    pub server_url: String,
    /// An admin kubeconfig (client certificate, CN admin, O system:masters).
    pub kubeconfig: PathBuf,
    /// The CA that signed the API server's serving certificate.
    pub ca_file: PathBuf,
    /// The CA the API server trusts for client certificates.
    pub client_ca_file: PathBuf,
    /// The service-account issuer, also the default token audience.
    pub service_account_issuer: String,
    pub kubectl: PathBuf,
    /// kubectl's discovery cache, kept out of the user's home.
    pub kubectl_cache: PathBuf,
    pub etcd_log: PathBuf,
    pub apiserver_log: PathBuf,
}

impl ControlPlaneInfo {
    /// kubectl with the admin kubeconfig set.
    pub fn kubectl(&self) -> Command {
        let mut command = Command::new(&self.kubectl);
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.kubectl_cache);
        command
    }
}

/// The processes, and how to start each again; dropping it stops tied ones.
pub struct ControlPlane {
    pub info: ControlPlaneInfo,
    // Declared apiserver first so it stops before etcd when dropped. `None` while stopped.
    apiserver: Option<Proc>,
    etcd: Option<Proc>,
    apiserver_launch: Launch,
    etcd_launch: Launch,
    etcd_addr: SocketAddr,
}

/// A control-plane process as first started: the same program, flags (so the same ports,
/// certificates and etcd data folder), log and pid file serve every later start, so that
/// clients holding the kubeconfig never notice more than an outage.
struct Launch {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    pid_file: PathBuf,
    lifetime: Lifetime,
}

impl Launch {
    fn spawn(&self) -> Result<Proc> {
        let mut command = Command::new(&self.program);
        command.args(&self.args);
        // A tied process is spawned from the keeper thread with a parent-death signal, on
        // every start alike: a restarted one still dies with the test binary.
        Proc::spawn(
            self.name,
            command,
            &self.log,
            Some(&self.pid_file),
            self.lifetime,
            libc::SIGKILL,
        )
    }
}

/// Starts etcd and kube-apiserver, with files in `dir` and pid files in `pid_dir`.
/// Returns without waiting for the API server; see [`ControlPlane::wait_ready`].
pub(crate) fn start(
    dir: &Path,
    pid_dir: &Path,
    bins: &Binaries,
    lifetime: Lifetime,
) -> Result<ControlPlane> {
    fs::create_dir_all(dir)?;
    // The folder holds the admin key and the signing keys.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    let (etcd_launch, etcd_addr) = etcd_launch(dir, pid_dir, bins, lifetime)?;
    let mut etcd = etcd_launch.spawn()?;
    wait_listening(&mut etcd, etcd_addr, &etcd_launch.log)?;
    let etcd_url = format!("http://{etcd_addr}");
    let (info, apiserver_launch) = apiserver_launch(dir, pid_dir, bins, lifetime, &etcd_url)?;
    let apiserver = apiserver_launch.spawn()?;
    Ok(ControlPlane {
        info,
        apiserver: Some(apiserver),
        etcd: Some(etcd),
        apiserver_launch,
        etcd_launch,
        etcd_addr,
    })
}

fn etcd_launch(
    dir: &Path,
    pid_dir: &Path,
    bins: &Binaries,
    lifetime: Lifetime,
) -> Result<(Launch, SocketAddr)> {
    let client = process::free_port(LOOPBACK)?;
    let peer = process::free_port(LOOPBACK)?;
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let data = dir.join("etcd-data");
    fs::create_dir_all(&data)?;
    fs::set_permissions(&data, fs::Permissions::from_mode(0o700))?;
    let args = vec![
        "--name=mailroom".to_string(),
        format!("--data-dir={}", data.display()),
        format!("--listen-client-urls={client_url}"),
        format!("--advertise-client-urls={client_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster=mailroom={peer_url}"),
        // A throwaway store: durability is not worth the fsync time.
        "--unsafe-no-fsync".to_string(),
        "--log-level=warn".to_string(),
    ];
    let launch = Launch {
        name: "etcd",
        program: bins.etcd.clone(),
        args,
        log: dir.join("etcd.log"),
        pid_file: pid_dir.join("etcd.pid"),
        lifetime,
    };
    Ok((launch, SocketAddr::from((LOOPBACK, client))))
}

/// Waits until etcd accepts connections on its client port.
fn wait_listening(etcd: &mut Proc, addr: SocketAddr, log: &Path) -> Result<()> {
    let mut exited = None;
    let up = process::poll(
        Duration::from_secs(30),
        Duration::from_millis(25),
        &mut || {
            exited = etcd.exited();
            exited.is_some()
                || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        },
    );
    if let Some(why) = exited.or_else(|| (!up).then(|| "not listening after 30 s".to_string())) {
        bail!(
            "etcd did not start ({why}).\n--- {} ---\n{}",
            log.display(),
            process::tail(log, 30)
        );
    }
    Ok(())
}

fn apiserver_launch(
    dir: &Path,
    pid_dir: &Path,
    bins: &Binaries,
    lifetime: Lifetime,
    etcd_url: &str,
) -> Result<(ControlPlaneInfo, Launch)> {
    let port = process::free_port(LOOPBACK)?;
    let server_url = format!("https://127.0.0.1:{port}");
    let certs_dir = dir.join("pki");
    fs::create_dir_all(&certs_dir)?;

    let serving_ca = Ca::new("mailroom test bed serving CA")?;
    let client_ca = Ca::new("mailroom test bed client CA")?;
    let serving = serving_ca.server("kube-apiserver", &["127.0.0.1", "localhost"])?;
    let admin = client_ca.client("admin", &["system:masters"])?;
    let sa_key = certs::signing_key()?;

    let file = |name: &str, text: &str| -> Result<PathBuf> {
        let path = certs_dir.join(name);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        Ok(path)
    };
    let ca_file = file("ca.crt", &serving_ca.cert_pem())?;
    let client_ca_file = file("client-ca.crt", &client_ca.cert_pem())?;
    let tls_cert = file("apiserver.crt", &serving.cert_pem)?;
    let tls_key = file("apiserver.key", &serving.key_pem)?;
    let sa_private = file("sa.key", &sa_key.private_pem)?;
    let sa_public = file("sa.pub", &sa_key.public_pem)?;
    let issuer = server_url.clone();

    let args = vec![
        format!("--etcd-servers={etcd_url}"),
        "--advertise-address=127.0.0.1".to_string(),
        "--bind-address=127.0.0.1".to_string(),
        format!("--secure-port={port}"),
        format!("--cert-dir={}", certs_dir.display()),
        format!("--tls-cert-file={}", tls_cert.display()),
        format!("--tls-private-key-file={}", tls_key.display()),
        format!("--client-ca-file={}", client_ca_file.display()),
        "--authorization-mode=RBAC".to_string(),
        format!("--service-account-issuer={issuer}"),
        format!("--service-account-key-file={}", sa_public.display()),
        format!(
            "--service-account-signing-key-file={}",
            sa_private.display()
        ),
        "--service-cluster-ip-range=10.0.0.0/24".to_string(),
        "--allow-privileged=true".to_string(),
        // No controller manager creates default ServiceAccounts, so the admission
        // plugin that requires them would refuse every Pod.
        "--disable-admission-plugins=ServiceAccount".to_string(),
    ];
    let log = dir.join("kube-apiserver.log");
    let launch = Launch {
        name: "kube-apiserver",
        program: bins.kube_apiserver.clone(),
        args,
        log: log.clone(),
        pid_file: pid_dir.join("kube-apiserver.pid"),
        lifetime,
    };

    let kubeconfig = dir.join("kubeconfig");
    fs::write(
        &kubeconfig,
        kubeconfig_text(&server_url, &serving_ca.cert_pem(), &admin),
    )?;
    fs::set_permissions(&kubeconfig, fs::Permissions::from_mode(0o600))?;
    let kubectl_cache = dir.join("kubectl-cache");
    fs::create_dir_all(&kubectl_cache)?;
    let info = ControlPlaneInfo {
        server_url,
        kubeconfig,
        ca_file,
        client_ca_file,
        service_account_issuer: issuer,
        kubectl: bins.kubectl.clone(),
        kubectl_cache,
        etcd_log: dir.join("etcd.log"),
        apiserver_log: log,
    };
    Ok((info, launch))
}

impl ControlPlane {
    /// Polls `/readyz` with kubectl until it answers `ok`.
    pub fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let started = Instant::now();
        let mut last = String::new();
        let mut exited = None;
        let ready = process::poll(limit, Duration::from_millis(250), &mut || {
            let gone = |p: &mut Option<Proc>, name: &str| match p {
                Some(p) => p.exited(),
                None => Some(format!("{name} is stopped")),
            };
            if let Some(why) =
                gone(&mut self.apiserver, "kube-apiserver").or_else(|| gone(&mut self.etcd, "etcd"))
            {
                exited = Some(why);
                return true;
            }
            match self
                .info
                .kubectl()
                .args(["get", "--raw", "/readyz", "--request-timeout=5s"])
                .output()
            {
                Ok(out) if out.status.success() => true,
                Ok(out) => {
                    last = String::from_utf8_lossy(&out.stderr).trim().to_string();
                    false
                }
                Err(e) => {
                    last = format!("running {}: {e}", self.info.kubectl.display());
                    false
                }
            }
        });
        let log = &self.info.apiserver_log;
        if let Some(why) = exited {
            bail!(
                "the control plane stopped while starting ({why}).\n--- {} ---\n{}\n--- {} ---\n{}",
                log.display(),
                process::tail(log, 30),
                self.info.etcd_log.display(),
                process::tail(&self.info.etcd_log, 10)
            );
        }
        if !ready {
            bail!(
                "kube-apiserver was not ready after {:.0?} (last kubectl get --raw /readyz: \
                 {last}).\n--- {} ---\n{}",
                started.elapsed(),
                log.display(),
                process::tail(log, 30)
            );
        }
        Ok(())
    }

    /// Stops kube-apiserver (SIGTERM, as a kubelet does; SIGKILL after `grace`). Its port,
    /// certificates and flags are kept for [`ControlPlane::start_apiserver`].
    pub fn stop_apiserver(&mut self, grace: Duration) {
        if let Some(mut p) = self.apiserver.take() {
            p.stop(grace);
        }
    }

    /// Starts kube-apiserver again as it first ran, and waits until `/readyz` says ok
    /// (which needs etcd). Does nothing to a running one but wait.
    pub fn start_apiserver(&mut self, limit: Duration) -> Result<()> {
        if self.apiserver.is_none() {
            self.apiserver = Some(self.apiserver_launch.spawn()?);
        }
        self.wait_ready(limit)
    }

    /// Stops etcd (SIGTERM; SIGKILL after `grace`). The API server keeps running and
    /// fails what needs storage; the data folder is kept for [`ControlPlane::start_etcd`].
    pub fn stop_etcd(&mut self, grace: Duration) {
        if let Some(mut p) = self.etcd.take() {
            p.stop(grace);
        }
    }

    /// Starts etcd again on its ports with its data, and waits until it listens and, when
    /// the API server runs, until that says ready again.
    pub fn start_etcd(&mut self, limit: Duration) -> Result<()> {
        if self.etcd.is_none() {
            let mut etcd = self.etcd_launch.spawn()?;
            let listening = wait_listening(&mut etcd, self.etcd_addr, &self.etcd_launch.log);
            self.etcd = Some(etcd);
            listening?;
        }
        if self.apiserver.is_some() {
            self.wait_ready(limit)?;
        }
        Ok(())
    }

    /// Stops both, the API server first.
    pub fn stop(&mut self, grace: Duration) {
        self.stop_apiserver(grace);
        self.stop_etcd(grace);
    }

    /// Leaves detached processes running when this handle is dropped (`testbed up`).
    pub fn release(self) {
        for p in [self.apiserver, self.etcd].into_iter().flatten() {
            p.release();
        }
    }
}

fn kubeconfig_text(server: &str, ca_pem: &str, admin: &certs::Pair) -> String {
    let b64 = |s: &str| STANDARD.encode(s.as_bytes());
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: mailroom-testbed\n  \
           cluster:\n    \
             server: {server}\n    \
             certificate-authority-data: {ca}\n\
         users:\n\
         - name: admin\n  \
           user:\n    \
             client-certificate-data: {cert}\n    \
             client-key-data: {key}\n\
         contexts:\n\
         - name: mailroom-testbed\n  \
           context:\n    \
             cluster: mailroom-testbed\n    \
             user: admin\n    \
             namespace: default\n\
         current-context: mailroom-testbed\n",
        ca = b64(ca_pem),
        cert = b64(&admin.cert_pem),
        key = b64(&admin.key_pem),
    )
}
