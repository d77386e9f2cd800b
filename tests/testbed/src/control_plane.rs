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

/// The running processes; dropping it stops tied ones.
pub struct ControlPlane {
    pub info: ControlPlaneInfo,
    // Declared apiserver first so it stops before etcd when dropped.
    pub apiserver: Proc,
    pub etcd: Proc,
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
    let etcd = start_etcd(dir, pid_dir, bins, lifetime)?;
    let (info, apiserver) = start_apiserver(dir, pid_dir, bins, lifetime, &etcd.1)?;
    Ok(ControlPlane {
        info,
        apiserver,
        etcd: etcd.0,
    })
}

fn start_etcd(
    dir: &Path,
    pid_dir: &Path,
    bins: &Binaries,
    lifetime: Lifetime,
) -> Result<(Proc, String)> {
    let client = process::free_port(LOOPBACK)?;
    let peer = process::free_port(LOOPBACK)?;
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let data = dir.join("etcd-data");
    fs::create_dir_all(&data)?;
    fs::set_permissions(&data, fs::Permissions::from_mode(0o700))?;
    let mut command = Command::new(&bins.etcd);
    command
        .arg("--name=mailroom")
        .arg(format!("--data-dir={}", data.display()))
        .arg(format!("--listen-client-urls={client_url}"))
        .arg(format!("--advertise-client-urls={client_url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=mailroom={peer_url}"))
        // A throwaway store: durability is not worth the fsync time.
        .arg("--unsafe-no-fsync")
        .arg("--log-level=warn");
    let log = dir.join("etcd.log");
    let mut etcd = Proc::spawn(
        "etcd",
        command,
        &log,
        Some(&pid_dir.join("etcd.pid")),
        lifetime,
        libc::SIGKILL,
    )?;
    let addr = SocketAddr::from((LOOPBACK, client));
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
            process::tail(&log, 30)
        );
    }
    Ok((etcd, client_url))
}

fn start_apiserver(
    dir: &Path,
    pid_dir: &Path,
    bins: &Binaries,
    lifetime: Lifetime,
    etcd_url: &str,
) -> Result<(ControlPlaneInfo, Proc)> {
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

    let mut command = Command::new(&bins.kube_apiserver);
    command
        .arg(format!("--etcd-servers={etcd_url}"))
        .arg("--advertise-address=127.0.0.1")
        .arg("--bind-address=127.0.0.1")
        .arg(format!("--secure-port={port}"))
        .arg(format!("--cert-dir={}", certs_dir.display()))
        .arg(format!("--tls-cert-file={}", tls_cert.display()))
        .arg(format!("--tls-private-key-file={}", tls_key.display()))
        .arg(format!("--client-ca-file={}", client_ca_file.display()))
        .arg("--authorization-mode=RBAC")
        .arg(format!("--service-account-issuer={issuer}"))
        .arg(format!(
            "--service-account-key-file={}",
            sa_public.display()
        ))
        .arg(format!(
            "--service-account-signing-key-file={}",
            sa_private.display()
        ))
        .arg("--service-cluster-ip-range=10.0.0.0/24")
        .arg("--allow-privileged=true")
        // No controller manager creates default ServiceAccounts, so the admission
        // plugin that requires them would refuse every Pod.
        .arg("--disable-admission-plugins=ServiceAccount");
    let log = dir.join("kube-apiserver.log");
    let apiserver = Proc::spawn(
        "kube-apiserver",
        command,
        &log,
        Some(&pid_dir.join("kube-apiserver.pid")),
        lifetime,
        libc::SIGKILL,
    )?;

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
    Ok((info, apiserver))
}

impl ControlPlane {
    /// Polls `/readyz` with kubectl until it answers `ok`.
    pub fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let started = Instant::now();
        let mut last = String::new();
        let mut exited = None;
        let ready = process::poll(limit, Duration::from_millis(250), &mut || {
            if let Some(why) = self.apiserver.exited().or_else(|| self.etcd.exited()) {
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
