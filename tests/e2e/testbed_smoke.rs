//! The test bed itself works: a real API server (CRDs, the status subresource, watches,
//! TokenRequest, RBAC) and a real Dovecot (IMAP and POP3 over implicit TLS and
//! STARTTLS/STLS, passwords, XOAUTH2 and OAUTHBEARER with JWTs signed by the bed's key).
//! Mail is spoken through a minimal raw client here, so these tests depend on nothing
//! of mailroom's own.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
    WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use mailroom_testbed::{Bed, Dovecot};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

const WIDGET_CRD: &str = "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.testbed.mailroom.dev
spec:
  group: testbed.mailroom.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer}
          status:
            type: object
            properties:
              phase: {type: string}
";

/// How long any single step may take before a test gives up.
const STEP: Duration = Duration::from_secs(30);

async fn admin_client(bed: &Bed) -> Client {
    let kubeconfig = Kubeconfig::read_from(bed.kubeconfig_path()).unwrap_or_else(|e| {
        panic!(
            "reading the bed's kubeconfig {}: {e}",
            bed.kubeconfig_path().display()
        )
    });
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("a client config from the bed's kubeconfig");
    Client::try_from(config).expect("a client for the bed's API server")
}

fn api_server_log(bed: &Bed) -> String {
    bed.state()
        .control_plane
        .apiserver_log
        .display()
        .to_string()
}

fn kubectl_apply(bed: &Bed, manifest: &str) {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = bed
        .kubectl()
        .args(["apply", "--server-side", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running kubectl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(manifest.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "expected kubectl apply to succeed; it said: {}\nAPI server log: {}",
        String::from_utf8_lossy(&out.stderr),
        api_server_log(bed)
    );
}

/// Polls `check` until it returns `Some`, or panics after `within` naming `what` and the
/// last thing seen.
async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(seen) if Instant::now() >= deadline => {
                panic!("expected {what} within {within:?}; last saw: {seen}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test]
async fn a_crd_object_round_trips_with_status_and_watch_events() {
    let bed = mailroom_testbed::shared();
    let ns = bed.namespace("smoke-crd");
    let client = admin_client(bed).await;

    kubectl_apply(bed, WIDGET_CRD);
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    eventually("the Widget CRD to be Established", STEP, || async {
        let crd = crds
            .get("widgets.testbed.mailroom.dev")
            .await
            .map_err(|e| e.to_string())?;
        let established = crd
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
        if established {
            Ok(())
        } else {
            Err(format!("{:?}", crd.status))
        }
    })
    .await;

    let gvk = GroupVersionKind::gvk("testbed.mailroom.dev", "v1", "Widget");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "widgets");
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource);
    // Discovery of a new CRD takes a moment; creating is the real test of it.
    let widget: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "testbed.mailroom.dev/v1",
        "kind": "Widget",
        "metadata": {"name": "w1"},
        "spec": {"size": 3},
    }))
    .unwrap();
    let created = eventually("creating a Widget to succeed", STEP, || async {
        widgets
            .create(&PostParams::default(), &widget)
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    let version = created
        .metadata
        .resource_version
        .clone()
        .expect("a resourceVersion");

    let read = widgets.get("w1").await.expect("reading the Widget back");
    assert_eq!(
        read.data["spec"]["size"],
        json!(3),
        "the Widget read back: {:?}",
        read.data
    );

    let mut events = widgets
        .watch(
            &WatchParams::default()
                .fields("metadata.name=w1")
                .timeout(30),
            &version,
        )
        .await
        .expect("starting a watch on Widgets")
        .boxed();

    let patched = widgets
        .patch_status(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Seen"}})),
        )
        .await
        .expect("writing the Widget's status subresource");
    assert_eq!(patched.data["status"]["phase"], json!("Seen"));
    // Through the main resource, status is ignored: that is what the subresource means.
    let ignored = widgets
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Lost"}})),
        )
        .await
        .expect("patching the Widget");
    assert_eq!(
        ignored.data["status"]["phase"],
        json!("Seen"),
        "status must only change via /status"
    );

    let deadline = Instant::now() + STEP;
    let mut seen = Vec::new();
    loop {
        let next = tokio::time::timeout_at(deadline.into(), events.try_next()).await;
        match next {
            Ok(Ok(Some(WatchEvent::Modified(w)))) if w.data["status"]["phase"] == json!("Seen") => {
                break;
            }
            Ok(Ok(Some(event))) => seen.push(format!("{event:?}")),
            other => panic!(
                "expected a Modified watch event with status.phase=Seen; saw {seen:?} then {other:?}\n\
                 API server log: {}",
                api_server_log(bed)
            ),
        }
    }
}

#[tokio::test]
async fn a_service_account_token_is_held_to_rbac() {
    let bed = mailroom_testbed::shared();
    let ns = bed.namespace("smoke-rbac");
    let admin = admin_client(bed).await;

    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), &ns);
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "reader"}})).unwrap();
    accounts
        .create(&PostParams::default(), &sa)
        .await
        .expect("creating a ServiceAccount");
    let request = TokenRequest {
        spec: TokenRequestSpec {
            expiration_seconds: Some(600),
            ..Default::default()
        },
        ..Default::default()
    };
    let token = accounts
        .create_token_request("reader", &PostParams::default(), &request)
        .await
        .expect("a token from the TokenRequest API")
        .status
        .expect("a TokenRequest status")
        .token;

    let ca = std::fs::read(bed.kube_ca_file()).expect("the API server's CA");
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: bed\n  cluster:\n    server: {}\n    \
         certificate-authority-data: {}\nusers:\n- name: reader\n  user:\n    token: {token}\n\
         contexts:\n- name: reader\n  context: {{cluster: bed, user: reader, namespace: {ns}}}\n\
         current-context: reader\n",
        bed.server_url(),
        STANDARD.encode(ca)
    );
    let config = Config::from_custom_kubeconfig(
        Kubeconfig::from_yaml(&kubeconfig).expect("a kubeconfig for the token"),
        &KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let reader = Client::try_from(config).unwrap();
    let secrets: Api<Secret> = Api::namespaced(reader.clone(), &ns);
    let configmaps: Api<ConfigMap> = Api::namespaced(reader.clone(), &ns);

    assert_eq!(
        http_code(secrets.list(&ListParams::default()).await),
        403,
        "listing Secrets without a Role"
    );
    assert_eq!(
        http_code(configmaps.list(&ListParams::default()).await),
        403,
        "listing ConfigMaps before the Role"
    );

    kubectl_apply(
        bed,
        &format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: read-configmaps, namespace: {ns}}}\n\
             rules:\n- apiGroups: [\"\"]\n  resources: [configmaps]\n  verbs: [get, list]\n---\n\
             apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: reader, namespace: {ns}}}\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: read-configmaps}}\n\
             subjects:\n- {{kind: ServiceAccount, name: reader, namespace: {ns}}}\n"
        ),
    );
    eventually(
        "the Role to let the token list ConfigMaps",
        STEP,
        || async {
            match http_code(configmaps.list(&ListParams::default()).await) {
                200 => Ok(()),
                other => Err(format!("HTTP {other}")),
            }
        },
    )
    .await;
    assert_eq!(
        http_code(secrets.list(&ListParams::default()).await),
        403,
        "Secrets stay denied"
    );
}

/// The HTTP status of an API call: 200 or the error's code.
fn http_code<T>(result: Result<T, kube::Error>) -> u16 {
    match result {
        Ok(_) => 200,
        Err(kube::Error::Api(status)) => status.code,
        Err(e) => panic!("expected an answer from the API server, got {e}"),
    }
}

// ---- A minimal mail client: lines in, lines out, bounded and with deadlines. ----

/// One connection, plain or TLS, with everything said kept for failure messages.
struct Conn<S> {
    io: BufReader<S>,
    transcript: Vec<String>,
    log: String,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(io: S, log: &Path) -> Self {
        Conn {
            io: BufReader::new(io),
            transcript: Vec::new(),
            log: log.display().to_string(),
        }
    }

    async fn line(&mut self) -> String {
        let mut buf = Vec::new();
        let read =
            tokio::time::timeout(STEP, (&mut self.io).take(8192).read_until(b'\n', &mut buf)).await;
        let line = String::from_utf8_lossy(&buf).trim_end().to_string();
        match read {
            Ok(Ok(n)) if n > 0 => {
                self.transcript.push(format!("S: {line}"));
                line
            }
            other => self.fail(&format!("a line from the server, got {other:?}")),
        }
    }

    async fn send(&mut self, text: &str, shown: &str) {
        self.transcript.push(format!("C: {shown}"));
        let write = async {
            self.io
                .get_mut()
                .write_all(format!("{text}\r\n").as_bytes())
                .await?;
            self.io.get_mut().flush().await
        };
        if let Err(e) = tokio::time::timeout(STEP, write)
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
        {
            self.fail(&format!("to send {shown:?}, failed: {e}"));
        }
    }

    /// Sends an IMAP command and returns the untagged lines and the tagged reply.
    async fn imap(&mut self, tag: &str, command: &str) -> (Vec<String>, String) {
        self.imap_shown(tag, command, command).await
    }

    async fn imap_shown(&mut self, tag: &str, command: &str, shown: &str) -> (Vec<String>, String) {
        self.send(&format!("{tag} {command}"), &format!("{tag} {shown}"))
            .await;
        let mut untagged = Vec::new();
        loop {
            let line = self.line().await;
            if line.starts_with(&format!("{tag} ")) || line.starts_with("+ ") || line == "+" {
                return (untagged, line);
            }
            untagged.push(line);
        }
    }

    /// Sends a POP3 command and returns the status line.
    async fn pop3(&mut self, command: &str, shown: &str) -> String {
        self.send(command, shown).await;
        self.line().await
    }

    fn expect(&self, what: &str, ok: bool) {
        if !ok {
            self.fail(what);
        }
    }

    fn fail(&self, expected: &str) -> ! {
        panic!(
            "expected {expected}\nconversation:\n  {}\nDovecot log: {}",
            self.transcript.join("\n  "),
            self.log
        )
    }
}

fn connector(ca_file: &Path) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file)
        .unwrap_or_else(|e| panic!("reading {}: {e}", ca_file.display()))
    {
        roots
            .add(cert.expect("a PEM certificate"))
            .expect("a usable CA certificate");
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

async fn tcp(d: &Dovecot, port: u16) -> TcpStream {
    let addr = format!("{}:{port}", d.host());
    match tokio::time::timeout(STEP, TcpStream::connect(&addr)).await {
        Ok(Ok(s)) => s,
        other => panic!(
            "expected to connect to {addr}, got {other:?}; Dovecot log: {}",
            d.log_path().display()
        ),
    }
}

async fn tls<S: AsyncRead + AsyncWrite + Unpin>(
    d: &Dovecot,
    io: S,
) -> tokio_rustls::client::TlsStream<S> {
    let name = ServerName::try_from(d.host()).expect("the bed's host as a TLS name");
    match tokio::time::timeout(STEP, connector(&d.ca_file()).connect(name, io)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => panic!(
            "expected a TLS handshake trusting {}, got {e}; Dovecot log: {}",
            d.ca_file().display(),
            d.log_path().display()
        ),
        Err(_) => panic!(
            "expected a TLS handshake trusting {} within {STEP:?}; Dovecot log: {}",
            d.ca_file().display(),
            d.log_path().display()
        ),
    }
}

async fn imaps(d: &Dovecot) -> Conn<tokio_rustls::client::TlsStream<TcpStream>> {
    let stream = tls(d, tcp(d, d.imaps_port()).await).await;
    let mut conn = Conn::new(stream, &d.log_path());
    let greeting = conn.line().await;
    conn.expect("an IMAP greeting `* OK`", greeting.starts_with("* OK"));
    conn
}

async fn pop3s(d: &Dovecot) -> Conn<tokio_rustls::client::TlsStream<TcpStream>> {
    let stream = tls(d, tcp(d, d.pop3s_port()).await).await;
    let mut conn = Conn::new(stream, &d.log_path());
    let greeting = conn.line().await;
    conn.expect("a POP3 greeting `+OK`", greeting.starts_with("+OK"));
    conn
}

#[tokio::test]
async fn imaps_logs_in_with_the_password_and_refuses_a_wrong_one() {
    let bed = mailroom_testbed::shared();
    let d = bed.dovecot();
    let (user, password) = d.account("alice");

    let mut conn = imaps(d).await;
    let (_, done) = conn
        .imap_shown("a", &format!("LOGIN {user} {password}"), "LOGIN alice ***")
        .await;
    conn.expect("LOGIN to succeed", done.starts_with("a OK"));
    let (untagged, done) = conn.imap("b", "SELECT INBOX").await;
    conn.expect("SELECT INBOX to succeed", done.starts_with("b OK"));
    conn.expect(
        "alice's INBOX to hold 3 messages",
        untagged.iter().any(|l| l == "* 3 EXISTS"),
    );
    let (untagged, _) = conn.imap("c", "STATUS Archive (MESSAGES)").await;
    conn.expect(
        "an Archive folder with 1 message",
        untagged.iter().any(|l| l.contains("MESSAGES 1")),
    );
    conn.imap("d", "LOGOUT").await;

    let mut conn = imaps(d).await;
    let (_, done) = conn
        .imap("a", &format!("LOGIN {user} wrong-{password}"))
        .await;
    conn.expect(
        "a wrong password to be refused with NO [AUTHENTICATIONFAILED]",
        done.starts_with("a NO [AUTHENTICATIONFAILED]"),
    );
}

#[tokio::test]
async fn imap_allows_login_only_after_starttls() {
    let bed = mailroom_testbed::shared();
    let d = bed.dovecot();
    let (user, password) = d.account("bob");

    let mut conn = Conn::new(tcp(d, d.imap_port()).await, &d.log_path());
    let greeting = conn.line().await;
    conn.expect(
        "the plain IMAP greeting to offer STARTTLS and disable LOGIN",
        greeting.starts_with("* OK")
            && greeting.contains("STARTTLS")
            && greeting.contains("LOGINDISABLED"),
    );
    // A made-up password: this one travels in clear text on purpose.
    let (_, done) = conn.imap("a", "LOGIN bob not-the-password").await;
    conn.expect(
        "LOGIN before TLS to be refused",
        done.starts_with("a NO [PRIVACYREQUIRED]"),
    );
    let (_, done) = conn.imap("b", "STARTTLS").await;
    conn.expect("STARTTLS to be accepted", done.starts_with("b OK"));

    let plain = conn.io.into_inner();
    let mut conn = Conn {
        io: BufReader::new(tls(d, plain).await),
        transcript: conn.transcript,
        log: conn.log,
    };
    let (caps, _) = conn.imap("c", "CAPABILITY").await;
    conn.expect(
        "AUTH=PLAIN and no LOGINDISABLED after STARTTLS",
        caps.iter()
            .any(|l| l.contains("AUTH=PLAIN") && !l.contains("LOGINDISABLED")),
    );
    let (_, done) = conn
        .imap_shown("d", &format!("LOGIN {user} {password}"), "LOGIN bob ***")
        .await;
    conn.expect("LOGIN after STARTTLS to succeed", done.starts_with("d OK"));
    let (_, done) = conn.imap("e", "LOGOUT").await;
    conn.expect("LOGOUT to succeed", done.starts_with("e OK"));
}

#[tokio::test]
async fn pop3s_logs_in_and_refuses_a_wrong_password() {
    let bed = mailroom_testbed::shared();
    let d = bed.dovecot();
    let (user, password) = d.account("alice");

    let mut conn = pop3s(d).await;
    let reply = conn.pop3(&format!("USER {user}"), "USER alice").await;
    conn.expect("USER to be accepted", reply.starts_with("+OK"));
    let reply = conn.pop3(&format!("PASS {password}"), "PASS ***").await;
    conn.expect("PASS to succeed", reply.starts_with("+OK"));
    let reply = conn.pop3("STAT", "STAT").await;
    conn.expect(
        "STAT to count alice's 3 INBOX messages",
        reply.starts_with("+OK 3 "),
    );
    conn.pop3("QUIT", "QUIT").await;

    let mut conn = pop3s(d).await;
    conn.pop3(&format!("USER {user}"), "USER alice").await;
    let reply = conn
        .pop3("PASS wrong-password", "PASS wrong-password")
        .await;
    conn.expect(
        "a wrong password to be refused with -ERR",
        reply.starts_with("-ERR"),
    );
}

#[tokio::test]
async fn pop3_allows_login_only_after_stls() {
    let bed = mailroom_testbed::shared();
    let d = bed.dovecot();
    let (user, password) = d.account("bob");

    let mut conn = Conn::new(tcp(d, d.pop3_port()).await, &d.log_path());
    let greeting = conn.line().await;
    conn.expect("a POP3 greeting", greeting.starts_with("+OK"));
    conn.send("CAPA", "CAPA").await;
    let mut caps = Vec::new();
    loop {
        let line = conn.line().await;
        if line == "." {
            break;
        }
        caps.push(line);
    }
    conn.expect("CAPA to offer STLS", caps.iter().any(|c| c == "STLS"));
    let reply = conn.pop3("USER bob", "USER bob").await;
    conn.expect("USER before TLS to be refused", reply.starts_with("-ERR"));
    let reply = conn.pop3("STLS", "STLS").await;
    conn.expect("STLS to be accepted", reply.starts_with("+OK"));

    let plain = conn.io.into_inner();
    let mut conn = Conn {
        io: BufReader::new(tls(d, plain).await),
        transcript: conn.transcript,
        log: conn.log,
    };
    let reply = conn.pop3(&format!("USER {user}"), "USER bob").await;
    conn.expect("USER after STLS to be accepted", reply.starts_with("+OK"));
    let reply = conn.pop3(&format!("PASS {password}"), "PASS ***").await;
    conn.expect("PASS after STLS to succeed", reply.starts_with("+OK"));
    let reply = conn.pop3("STAT", "STAT").await;
    conn.expect("STAT to count bob's 1 message", reply.starts_with("+OK 1 "));
}

#[tokio::test]
async fn xoauth2_and_oauthbearer_accept_the_beds_tokens_and_refuse_forged_ones() {
    let bed = mailroom_testbed::shared();
    let d = bed.dovecot();
    let key = bed.oauth();
    let ttl = Duration::from_secs(300);

    let xoauth2 =
        |token: &str| STANDARD.encode(format!("user=alice\x01auth=Bearer {token}\x01\x01"));
    let mut conn = imaps(d).await;
    let (_, done) = conn
        .imap_shown(
            "a",
            &format!(
                "AUTHENTICATE XOAUTH2 {}",
                xoauth2(&key.access_token("alice", ttl))
            ),
            "AUTHENTICATE XOAUTH2 <valid token>",
        )
        .await;
    conn.expect(
        "XOAUTH2 with a token signed by the bed's key to succeed",
        done.starts_with("a OK"),
    );

    let mut conn = imaps(d).await;
    let (_, reply) = conn
        .imap_shown(
            "a",
            &format!(
                "AUTHENTICATE XOAUTH2 {}",
                xoauth2(&key.forged_token("alice", ttl))
            ),
            "AUTHENTICATE XOAUTH2 <forged token>",
        )
        .await;
    conn.expect(
        "an XOAUTH2 error challenge for a forged token",
        reply.starts_with("+ "),
    );
    let challenge = STANDARD
        .decode(reply.trim_start_matches("+ "))
        .unwrap_or_default();
    conn.expect(
        "the challenge to be a JSON status 401",
        String::from_utf8_lossy(&challenge).contains("\"401\""),
    );
    conn.send("", "(empty answer to the challenge)").await;
    let done = conn.line().await;
    conn.expect(
        "the forged token to be refused with NO",
        done.starts_with("a NO"),
    );
    let log = d.log();
    assert!(
        log.contains("Incorrect JWT signature"),
        "expected Dovecot to log the forged token's bad signature; see {}",
        d.log_path().display()
    );

    let bearer = STANDARD.encode(format!(
        "n,a=alice,\x01auth=Bearer {}\x01\x01",
        key.access_token("alice", ttl)
    ));
    let mut conn = imaps(d).await;
    let (_, done) = conn
        .imap_shown(
            "a",
            &format!("AUTHENTICATE OAUTHBEARER {bearer}"),
            "AUTHENTICATE OAUTHBEARER <valid token>",
        )
        .await;
    conn.expect(
        "OAUTHBEARER with the bed's token to succeed",
        done.starts_with("a OK"),
    );
}

#[tokio::test]
async fn a_new_password_takes_effect_at_the_next_login() {
    let bed = mailroom_testbed::shared();
    let d = bed.dovecot();
    let user = format!("carol{}", std::process::id());
    bed.set_password(&user, "first-secret");
    let mut conn = imaps(d).await;
    let (_, done) = conn.imap("a", &format!("LOGIN {user} first-secret")).await;
    conn.expect("the new account to log in", done.starts_with("a OK"));

    bed.set_password(&user, "second-secret");
    let mut conn = imaps(d).await;
    let (_, done) = conn.imap("a", &format!("LOGIN {user} first-secret")).await;
    conn.expect("the old password to be refused", done.starts_with("a NO"));
    let (_, done) = conn.imap("b", &format!("LOGIN {user} second-secret")).await;
    conn.expect("the new password to log in", done.starts_with("b OK"));
}

#[tokio::test]
async fn the_plaintext_instance_offers_no_starttls_and_the_self_signed_one_is_pinnable() {
    let bed = mailroom_testbed::shared();
    let plain = bed.plaintext_dovecot();
    let mut conn = Conn::new(tcp(plain, plain.imap_port()).await, &plain.log_path());
    let greeting = conn.line().await;
    conn.expect(
        "an IMAP greeting without STARTTLS",
        greeting.starts_with("* OK") && !greeting.contains("STARTTLS"),
    );
    let mut conn = Conn::new(tcp(plain, plain.pop3_port()).await, &plain.log_path());
    conn.line().await;
    conn.send("CAPA", "CAPA").await;
    let mut caps = Vec::new();
    loop {
        let line = conn.line().await;
        if line == "." {
            break;
        }
        caps.push(line);
    }
    conn.expect("CAPA without STLS", !caps.iter().any(|c| c == "STLS"));

    let selfsigned = bed.self_signed_dovecot();
    assert_eq!(
        selfsigned.ca_file(),
        selfsigned.info().cert_file.unwrap(),
        "the pinned file is the certificate itself"
    );
    assert!(
        selfsigned
            .cert_pem()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    // Trusting the main bed CA must not be enough for it.
    let stream = tcp(selfsigned, selfsigned.imaps_port()).await;
    let name = ServerName::try_from(selfsigned.host()).unwrap();
    let refused = connector(&bed.mail_ca_file()).connect(name, stream).await;
    assert!(
        refused.is_err(),
        "expected the self-signed certificate to fail against the bed's CA"
    );
}
