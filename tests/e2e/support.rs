//! What every end-to-end test needs: its own namespace on the shared test bed, the CRD,
//! a controller process run as in production, and waits that poll with a deadline and
//! say what they saw when they give up.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use mailroom::api::IncomingMailProvider;
use mailroom_testbed::Bed;

pub const MAILROOM: &str = env!("CARGO_BIN_EXE_mailroom");

/// One test's slice of the bed.
pub struct Env {
    pub bed: &'static Bed,
    pub ns: String,
    pub client: Client,
    pub dir: tempfile::TempDir,
}

static CRD: OnceLock<()> = OnceLock::new();

impl Env {
    pub async fn new(prefix: &str) -> Env {
        let bed = mailroom_testbed::shared();
        CRD.get_or_init(|| install_crd(bed));
        let ns = bed.namespace(prefix);
        let client = client_for(bed.kubeconfig_path()).await;
        Env {
            bed,
            ns,
            client,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn providers(&self) -> Api<IncomingMailProvider> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// `kubectl` as the bed's admin, in this test's namespace.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        let mut cmd = self.bed.kubectl();
        cmd.arg("-n").arg(&self.ns).args(args);
        cmd.output().expect("running kubectl")
    }

    /// `mailroom ARGS`, run as a user would, with the bed's kubeconfig: its exit code,
    /// stdout and stderr.
    pub fn mailroom(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let out = Command::new(MAILROOM)
            .args(args)
            .env("KUBECONFIG", self.bed.kubeconfig_path())
            .output()
            .expect("running mailroom");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `kubectl mailroom ARGS`: the binary found by kubectl as its plugin `kubectl-mailroom`.
    pub fn kubectl_mailroom(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let plugin_dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(MAILROOM, plugin_dir.path().join("kubectl-mailroom")).unwrap();
        let path = format!(
            "{}:{}",
            plugin_dir.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = Command::new(self.bed.kubectl_path())
            .arg("mailroom")
            .args(args)
            .env("KUBECONFIG", self.bed.kubeconfig_path())
            .env("PATH", path)
            .output()
            .expect("running kubectl mailroom");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `kubectl apply` of a manifest; the output, whether it succeeded or not.
    pub fn try_apply(&self, yaml: &str) -> Output {
        let mut cmd = self.bed.kubectl();
        cmd.args(["-n", &self.ns, "apply", "-f", "-"]);
        with_input(cmd, yaml)
    }

    pub fn apply(&self, yaml: &str) {
        let out = self.try_apply(yaml);
        assert!(
            out.status.success(),
            "kubectl apply failed:\n{}\nmanifest:\n{yaml}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Creates or replaces an Opaque Secret with string data.
    pub async fn secret(&self, name: &str, pairs: &[(&str, &str)]) {
        self.put_secret(name, pairs, serde_json::json!({})).await
    }

    /// Creates or replaces the data of OAuth2 token Secret `name`, labelled as
    /// `mailroom authorize` labels the Secrets it creates (the controller writes refreshed
    /// tokens only into those).
    pub async fn token_secret(&self, name: &str, pairs: &[(&str, &str)]) {
        let labels = serde_json::json!({ (mailroom::credentials::tokens::TOKEN_LABEL): "true" });
        self.put_secret(name, pairs, labels).await
    }

    async fn put_secret(&self, name: &str, pairs: &[(&str, &str)], labels: serde_json::Value) {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": labels},
            "stringData": pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::BTreeMap<_, _>>(),
        }))
        .unwrap();
        match api.get_opt(name).await.unwrap() {
            Some(_) => {
                let patch = kube::api::Patch::Merge(serde_json::json!({
                    "metadata": {"labels": secret.metadata.labels},
                    "data": null,
                    "stringData": secret.string_data,
                }));
                api.patch(name, &kube::api::PatchParams::default(), &patch)
                    .await
                    .unwrap();
            }
            None => {
                api.create(&PostParams::default(), &secret).await.unwrap();
            }
        }
    }

    /// Applies provider `name`: alice's mailbox on the bed's IMAPS port, logging in with
    /// Secret `alice` (see [`alice_env`]).
    pub fn apply_alice_imaps(&self, name: &str) {
        let port = self.bed.dovecot().imaps_port();
        self.apply(&provider(name, "IMAP", port, "Implicit", ALICE_AUTH, ""));
    }

    /// Secret `secret` holding alice's login, and provider `name` on the bed's IMAPS port
    /// logging in with it: a Secret of its own, to change or delete apart from the others.
    pub async fn apply_alice_imaps_with(&self, name: &str, secret: &str) {
        let (user, password) = self.bed.dovecot().account("alice");
        self.secret(secret, &[("username", &user), ("password", &password)])
            .await;
        let port = self.bed.dovecot().imaps_port();
        let auth = format!("{{method: Password, secretRef: {{name: {secret}}}}}");
        self.apply(&provider(name, "IMAP", port, "Implicit", &auth, ""));
    }

    /// Starts `mailroom controller` for this namespace, as it runs in production (leader
    /// election on, with this test's own Lease; metrics on a free port).
    pub fn controller(&self) -> Controller {
        self.controller_with(&[])
    }

    /// The same, with extra arguments.
    pub fn controller_with(&self, extra: &[&str]) -> Controller {
        self.controller_with_env(extra, &[])
    }

    /// The same, with extra arguments and environment variables.
    pub fn controller_with_env(&self, extra: &[&str], vars: &[(&str, &str)]) -> Controller {
        static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = self.dir.path().join(format!("controller-{n}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(MAILROOM)
            .args(["controller", "--namespace", &self.ns])
            .args(if extra.contains(&"--log") {
                &[][..]
            } else {
                &["--log", "info,mailroom=debug"][..]
            })
            .args([
                "--metrics-addr",
                "127.0.0.1:0",
                "--lease-namespace",
                &self.ns,
                "--lease-duration",
                "6s",
            ])
            .args(extra)
            .env("KUBECONFIG", self.bed.kubeconfig_path())
            // The bed's identity providers listen on this host's loopback, which the
            // controller refuses by default (a test may set it to false again).
            .env("MAILROOM_ALLOW_OAUTH2_LOOPBACK", "true")
            .envs(vars.iter().copied())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("starting mailroom controller");
        Controller { child, log }
    }

    /// Polls the provider until `done` holds; panics after `within` with what it saw.
    pub async fn wait(
        &self,
        name: &str,
        what: &str,
        within: Duration,
        done: impl Fn(&IncomingMailProvider) -> bool,
    ) -> IncomingMailProvider {
        let deadline = Instant::now() + within;
        let mut last = None;
        loop {
            if let Some(p) = self.providers().get_opt(name).await.unwrap() {
                if done(&p) {
                    return p;
                }
                last = Some(p);
            }
            if Instant::now() > deadline {
                let status = last
                    .and_then(|p| p.status)
                    .map(|s| serde_yaml::to_string(&s).unwrap())
                    .unwrap_or_else(|| "(no status)".into());
                panic!(
                    "{}/{name}: expected {what} within {within:?}; status was:\n{status}\ncontroller logs: {}",
                    self.ns,
                    self.dir.path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Asks the controller for a test of `name`: the check-requested-at annotation set to
    /// `request`, as `kubectl annotate` sets it.
    pub fn request_test(&self, name: &str, request: &str) {
        let out = self.kubectl(&[
            "annotate",
            &format!("imp/{name}"),
            &format!("mailroom.dev/check-requested-at={request}"),
            "--overwrite",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// [`Self::request_test`], and waits until the controller handled the request.
    pub async fn retest(&self, name: &str, request: &str) -> IncomingMailProvider {
        self.request_test(name, request);
        self.wait(
            name,
            &format!("lastHandledCheckRequest={request}"),
            Duration::from_secs(60),
            |p| answered(p, request),
        )
        .await
    }

    /// Waits until Ready has this reason, and returns the provider.
    pub async fn wait_reason(
        &self,
        name: &str,
        reason: &str,
        within: Duration,
    ) -> IncomingMailProvider {
        self.wait(name, &format!("Ready reason {reason}"), within, |p| {
            ready(p).is_some_and(|c| c.reason == reason)
        })
        .await
    }
}

/// Whether the provider's status answers the check request `request`.
pub fn answered(p: &IncomingMailProvider, request: &str) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.last_handled_check_request.as_deref())
        == Some(request)
}

/// The Ready condition of a provider.
pub fn ready(
    p: &IncomingMailProvider,
) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    condition(p, "Ready")
}

pub fn condition<'a>(
    p: &'a IncomingMailProvider,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    p.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// A running controller; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Controller {
    pub child: Child,
    pub log: PathBuf,
}

impl Controller {
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address it serves /metrics, /healthz and /readyz on, from its log.
    pub async fn http_addr(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let logs = self.logs();
            // Text logs (`address=...`) or JSON ones (`"address":"..."`).
            if let Some(rest) = logs.split("address=").nth(1) {
                return rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
            }
            if let Some(rest) = logs.split("\"address\":\"").nth(1) {
                return rest.split('"').next().unwrap_or_default().to_string();
            }
            assert!(
                Instant::now() < deadline,
                "the controller never said where it serves metrics:\n{logs}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// GET `path` from its HTTP endpoint: (status code, body).
    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(&self.http_addr().await, path)
    }

    /// Its /metrics once every one of `series` is in it, or as it is when `within` has
    /// passed (the caller asserts, naming what is missing).
    pub async fn metrics_with(&self, series: &[&str], within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let (code, metrics) = self.get("/metrics").await;
            assert_eq!(code, 200, "/metrics: {metrics}");
            if series.iter().all(|s| metrics.contains(s)) || Instant::now() > deadline {
                return metrics;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Counts the tests it logged.
    pub fn tests(&self) -> usize {
        self.logs().matches(" tested").count()
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit status.
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        unsafe { libc_kill(self.child.id() as i32, 15) };
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            unsafe { libc_kill(self.child.id() as i32, 15) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if self.child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A plain HTTP/1.0 GET: (status code, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut conn =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

async fn client_for(kubeconfig: &std::path::Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("reading the bed's kubeconfig");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// Applies crds/ once per test binary and waits until the API server serves it.
fn install_crd(bed: &Bed) {
    let crd = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/incomingmailprovider.yaml"
    );
    let out = bed
        .kubectl()
        .args(["apply", "--server-side", "-f", crd])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "applying the CRD: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = bed
        .kubectl()
        .args([
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/incomingmailproviders.mailroom.dev",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "waiting for the CRD: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A provider manifest for a server of the bed (on MAIL_HOST); `extra` is YAML appended under `spec:` (indented two spaces).
pub fn provider(
    name: &str,
    protocol: &str,
    port: u16,
    mode: &str,
    auth: &str,
    extra: &str,
) -> String {
    let host = mailroom_testbed::MAIL_HOST;
    format!(
        "apiVersion: mailroom.dev/v1alpha1
kind: IncomingMailProvider
metadata:
  name: {name}
spec:
  server: {{host: {host}, port: {port}, protocol: {protocol}}}
  tls: {{mode: {mode}, caBundleRef: {{kind: ConfigMap, name: test-ca}}}}
  authentication: {auth}
  check: {{interval: 5m, timeout: 10s}}
{extra}"
    )
}

/// A namespace that trusts the bed's CA and holds Secret `alice` with alice's login to
/// the main Dovecot: what most tests start from.
pub async fn alice_env(prefix: &str) -> Env {
    let env = Env::new(prefix).await;
    trust_bed_ca(&env).await;
    let (user, password) = env.bed.dovecot().account("alice");
    env.secret("alice", &[("username", &user), ("password", &password)])
        .await;
    env
}

/// The ConfigMap holding the bed's CA, which most providers trust.
pub async fn trust_bed_ca(env: &Env) {
    let pem = std::fs::read_to_string(env.bed.dovecot().ca_file()).unwrap();
    let cm: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "test-ca"},
        "data": {"ca.crt": pem},
    }))
    .unwrap();
    Api::namespaced(env.client.clone(), &env.ns)
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
}

pub const ALICE_AUTH: &str = "{method: Password, secretRef: {name: alice}}";

/// A login that Dovecot refuses: alice's name with another password (Secret `wrong`).
pub const WRONG_AUTH: &str = "{method: Password, secretRef: {name: wrong}}";

/// Creates the Secret `wrong` that [`WRONG_AUTH`] names.
pub async fn wrong_password_secret(env: &Env) {
    let (user, _) = env.bed.dovecot().account("alice");
    env.secret(
        "wrong",
        &[("username", &user), ("password", "not-the-password")],
    )
    .await;
}

/// A command's stdout then stderr, as one text for a message or a search.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd` with `input` on its standard input (`kubectl apply -f -` and the like) and
/// returns its output.
pub fn with_input(mut cmd: Command, input: &str) -> Output {
    use std::io::Write;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("running the command");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// What a secret must never reach: the controller's `logs`, the providers' status and the
/// namespace's Events, each with its name.
pub async fn outputs(env: &Env, logs: String) -> Vec<(&'static str, String)> {
    let status = env.kubectl(&["get", "imp", "-o", "yaml"]);
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(env.client.clone(), &env.ns);
    let events = serde_json::to_string(
        &events
            .list(&kube::api::ListParams::default())
            .await
            .unwrap()
            .items,
    )
    .unwrap();
    vec![
        ("controller logs", logs),
        (
            "status",
            String::from_utf8_lossy(&status.stdout).to_string(),
        ),
        ("events", events),
    ]
}

/// Asserts that none of `values` (a password, tokens, a client secret) appears in the
/// [`outputs`].
pub async fn assert_nowhere(env: &Env, logs: &str, values: &[&str]) {
    for (place, text) in outputs(env, logs.to_string()).await {
        for value in values {
            assert!(value.len() > 8, "too short to search for: {values:?}");
            assert!(!text.contains(value), "a secret value in the {place}");
        }
    }
}
