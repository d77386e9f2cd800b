//! A small OAuth2 authorization server for tests, in-process, on loopback: the token
//! endpoint of RFC 6749 (refresh_token, client_credentials and authorization_code grants
//! with PKCE, RFC 7636), issuing HS256 JWT access tokens signed with the bed's key so that
//! the bed's Dovecot accepts them. Refresh tokens rotate: each use returns a new one and
//! the old one stops working. Errors are answered the way Microsoft's v2.0 endpoint does:
//! `invalid_grant` (and `invalid_client`) with an `AADSTS…` code in `error_description`.
//!
//! Tests steer it: grant a user a refresh token (what a completed sign-in leaves), revoke,
//! take the server "down" (connections are dropped unanswered), script the next answers
//! (a refusal, a 429 with Retry-After), count token requests.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use crate::oauth::OAuthKey;

#[derive(Clone)]
struct Grant {
    user: String,
    client_id: String,
}

#[derive(Clone)]
struct Client {
    secret: Option<String>,
    /// The mailbox user an app-only (client credentials) token is issued for.
    app_user: Option<String>,
}

#[derive(Clone)]
struct Code {
    grant: Grant,
    redirect_uri: String,
    challenge: String,
}

struct Device {
    client_id: String,
    device_code: String,
    /// Set once the user signed in on "another device".
    user: Option<String>,
    denied: bool,
    polls: usize,
}

#[derive(Default)]
struct State {
    /// When each device-code poll came, in order.
    device_polls: Vec<std::time::Instant>,
    /// By user code.
    devices: HashMap<String, Device>,
    clients: HashMap<String, Client>,
    refresh: HashMap<String, Grant>,
    /// Refresh tokens that were rotated away or revoked, and why (an AADSTS text).
    dead: HashMap<String, &'static str>,
    codes: HashMap<String, Code>,
    access_ttl: Option<Duration>,
    /// Grants without a refresh token (a server asked for no offline access).
    no_refresh_tokens: bool,
    down: bool,
    /// Connections dropped unanswered while down.
    dropped: usize,
    token_requests: usize,
    /// Refresh tokens presented (to prove none was used twice).
    presented: Vec<String>,
    issued_access: HashSet<String>,
    /// Answers the token endpoint gives, in turn, instead of its own.
    scripted: VecDeque<Scripted>,
    /// The same for the device authorization endpoint.
    scripted_device: VecDeque<Scripted>,
}

/// An answer written in advance: status, extra headers, JSON body.
struct Scripted {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Scripted {
    fn new(status: u16, headers: &[(&str, &str)], body: Value) -> Scripted {
        Scripted {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body,
        }
    }
}

/// The running server; stops when dropped.
pub struct TokenServer {
    addr: SocketAddr,
    /// The host its URLs name.
    host: String,
    /// The PEM of the CA that signed its certificate, when it serves https.
    ca_pem: Option<String>,
    key: OAuthKey,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

const AADSTS_INVALID: &str = "AADSTS70000: The provided value for the input parameter 'refresh_token' or 'assertion' is not valid.";
const AADSTS_REVOKED: &str = "AADSTS50173: The provided grant has expired due to it being revoked, a fresh auth token is needed. The user might have changed or reset their password.";
const AADSTS_ROTATED: &str = "AADSTS70008: The provided authorization code or refresh token has expired. Send a new interactive authorization request for this user and resource.";

fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 24];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("randomness");
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

impl TokenServer {
    /// Starts the server on 127.0.0.1 with tokens signed by `key`.
    pub fn start(key: OAuthKey) -> TokenServer {
        TokenServer::start_at(key, "127.0.0.1".parse().unwrap(), "127.0.0.1")
    }

    /// Starts the server on `ip`, its URLs naming it `host` (a name that resolves to
    /// `ip`: a client decides by the name, e.g. whether to use a proxy).
    pub fn start_at(key: OAuthKey, ip: std::net::IpAddr, host: &str) -> TokenServer {
        TokenServer::launch(key, ip, host, None)
    }

    /// As [`TokenServer::start_at`], serving https with a certificate for `host` signed
    /// by a CA of its own ([`TokenServer::ca_pem`]).
    pub fn start_tls(key: OAuthKey, ip: std::net::IpAddr, host: &str) -> TokenServer {
        let ca = crate::certs::Ca::new("mailroom test token server CA").expect("a test CA");
        let pair = ca.server(host, &[host]).expect("a certificate");
        let (certs, private) = pem_pair(&pair.cert_pem, &pair.key_pem);
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, private)
        .expect("the token server's certificate");
        TokenServer::launch(key, ip, host, Some((Arc::new(config), ca.cert_pem())))
    }

    fn launch(
        key: OAuthKey,
        ip: std::net::IpAddr,
        host: &str,
        tls: Option<(Arc<rustls::ServerConfig>, String)>,
    ) -> TokenServer {
        let (tls, ca_pem) = tls.unzip();
        let listener = TcpListener::bind((ip, 0)).expect("binding the token server");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, k, halt) = (state.clone(), key.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if halt.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (s, k, tls) = (s.clone(), k.clone(), tls.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, tls, &s, &k);
                });
            }
        });
        TokenServer {
            addr,
            host: host.to_string(),
            ca_pem,
            key,
            state,
            stop,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.ca_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}:{}", self.host, self.addr.port())
    }

    /// The CA to trust for an https server.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn token_url(&self) -> String {
        format!("{}/token", self.url())
    }

    pub fn authorization_url(&self) -> String {
        format!("{}/authorize", self.url())
    }

    /// Registers a client; `app_user` is the mailbox its client-credentials tokens are for.
    pub fn register_client(&self, id: &str, secret: Option<&str>, app_user: Option<&str>) {
        self.state.lock().unwrap().clients.insert(
            id.into(),
            Client {
                secret: secret.map(str::to_string),
                app_user: app_user.map(str::to_string),
            },
        );
    }

    /// A refresh token for `user` and `client_id`, as a completed sign-in leaves it.
    pub fn grant(&self, user: &str, client_id: &str) -> String {
        let token = random_token("rt-");
        self.state.lock().unwrap().refresh.insert(
            token.clone(),
            Grant {
                user: user.into(),
                client_id: client_id.into(),
            },
        );
        token
    }

    /// Revokes every refresh token of `user`.
    pub fn revoke_user(&self, user: &str) {
        let mut st = self.state.lock().unwrap();
        let gone: Vec<String> = st
            .refresh
            .iter()
            .filter(|(_, g)| g.user == user)
            .map(|(t, _)| t.clone())
            .collect();
        for t in gone {
            st.refresh.remove(&t);
            st.dead.insert(t, AADSTS_REVOKED);
        }
    }

    /// The next token request is answered `status` with `headers` and the JSON `body`,
    /// whatever it asks (a refusal, a throttled or unavailable server); later ones as
    /// usual. Calls queue up. Counted as token requests.
    pub fn answer_next(&self, status: u16, headers: &[(&str, &str)], body: Value) {
        let answer = Scripted::new(status, headers, body);
        self.state.lock().unwrap().scripted.push_back(answer);
    }

    /// As [`Self::answer_next`], for the next device authorization request.
    pub fn answer_next_device(&self, status: u16, headers: &[(&str, &str)], body: Value) {
        let answer = Scripted::new(status, headers, body);
        self.state.lock().unwrap().scripted_device.push_back(answer);
    }

    /// The next token request is refused with `error` (HTTP 400, as Microsoft answers),
    /// e.g. `interaction_required` with an `AADSTS50076` description.
    pub fn refuse_next(&self, error_code: &str, description: &str) {
        let (status, body) = error(400, error_code, description);
        self.answer_next(status, &[], body);
    }

    /// When each device-code poll came, in order.
    pub fn device_polls(&self) -> Vec<std::time::Instant> {
        self.state.lock().unwrap().device_polls.clone()
    }

    /// Whether a refresh token would still be accepted.
    pub fn refresh_token_valid(&self, token: &str) -> bool {
        self.state.lock().unwrap().refresh.contains_key(token)
    }

    /// The valid refresh tokens of `user`.
    pub fn live_refresh_tokens(&self, user: &str) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .refresh
            .iter()
            .filter(|(_, g)| g.user == user)
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// Down: connections are accepted and dropped without an answer.
    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
    }

    /// The lifetime of access tokens issued from now on (default one hour).
    pub fn set_access_ttl(&self, ttl: Duration) {
        self.state.lock().unwrap().access_ttl = Some(ttl);
    }

    /// Whether sign-ins and refreshes grant a refresh token (default yes); without one,
    /// as many servers answer a request without the `offline_access` scope.
    pub fn set_refresh_tokens(&self, granted: bool) {
        self.state.lock().unwrap().no_refresh_tokens = !granted;
    }

    /// Every access token issued so far (to search outputs for them).
    pub fn issued_access_tokens(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .issued_access
            .iter()
            .cloned()
            .collect()
    }

    /// Connections dropped unanswered while the server was down.
    pub fn dropped_connections(&self) -> usize {
        self.state.lock().unwrap().dropped
    }

    /// Token requests answered so far.
    pub fn token_requests(&self) -> usize {
        self.state.lock().unwrap().token_requests
    }

    /// Refresh tokens presented more than once (each may be used once).
    pub fn reused_refresh_tokens(&self) -> Vec<String> {
        let st = self.state.lock().unwrap();
        let mut seen = HashSet::new();
        st.presented
            .iter()
            .filter(|t| !seen.insert(*t))
            .cloned()
            .collect()
    }

    /// Simulates the user entering `user_code` on the verification page and signing in.
    pub fn approve_device(&self, user_code: &str, user: &str) -> bool {
        match self.state.lock().unwrap().devices.get_mut(user_code) {
            Some(d) => {
                d.user = Some(user.into());
                true
            }
            None => false,
        }
    }

    /// Simulates the user declining the device sign-in.
    pub fn deny_device(&self, user_code: &str) {
        if let Some(d) = self.state.lock().unwrap().devices.get_mut(user_code) {
            d.denied = true;
        }
    }

    /// The RFC 7009 revocation endpoint: a refresh token posted there stops working.
    pub fn revocation_url(&self) -> String {
        format!("{}/revoke", self.url())
    }

    pub fn device_authorization_url(&self) -> String {
        format!("{}/devicecode", self.url())
    }

    /// The key tokens are signed with.
    pub fn key(&self) -> &OAuthKey {
        &self.key
    }

    /// Simulates the user's browser after sign-in: for an authorization URL this server
    /// issued, returns the redirect URL (`redirect_uri?code=...&state=...`) the browser
    /// would be sent to, for `user`.
    pub fn sign_in(&self, authorization_url: &str, user: &str) -> Result<String, String> {
        let query = authorization_url
            .split_once('?')
            .map(|(_, q)| q)
            .ok_or("no query in the authorization URL")?;
        let params = parse_form(query);
        let get = |k: &str| params.get(k).cloned().ok_or(format!("no {k} in the URL"));
        let client_id = get("client_id")?;
        let redirect_uri = get("redirect_uri")?;
        let state = get("state")?;
        if get("response_type")? != "code" {
            return Err("response_type must be code".into());
        }
        if get("code_challenge_method")? != "S256" {
            return Err("code_challenge_method must be S256".into());
        }
        let challenge = get("code_challenge")?;
        let mut st = self.state.lock().unwrap();
        if !st.clients.contains_key(&client_id) {
            return Err(format!("unknown client {client_id}"));
        }
        let code = random_token("code-");
        st.codes.insert(
            code.clone(),
            Code {
                grant: Grant {
                    user: user.into(),
                    client_id,
                },
                redirect_uri: redirect_uri.clone(),
                challenge,
            },
        );
        Ok(format!("{redirect_uri}?code={code}&state={state}"))
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn parse_form(text: &str) -> HashMap<String, String> {
    form_urlencoded::parse(text.as_bytes())
        .into_owned()
        .collect()
}

fn pem_pair(
    cert: &str,
    key: &str,
) -> (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("the certificate's PEM");
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("the key's PEM");
    (certs, key)
}

fn serve(
    conn: TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
    state: &Mutex<State>,
    key: &OAuthKey,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    {
        let mut st = state.lock().unwrap();
        if st.down {
            st.dropped += 1;
            drop(conn);
            return Ok(());
        }
    }
    let local = conn.local_addr()?;
    match tls {
        None => respond(&mut { conn }, local, state, key),
        Some(config) => {
            let session = rustls::ServerConnection::new(config).map_err(std::io::Error::other)?;
            let mut stream = rustls::StreamOwned::new(session, conn);
            respond(&mut stream, local, state, key)?;
            stream.conn.send_close_notify();
            stream.flush()
        }
    }
}

fn respond<S: Read + Write>(
    conn: &mut S,
    local: SocketAddr,
    state: &Mutex<State>,
    key: &OAuthKey,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(&mut *conn);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; length.min(64 * 1024)];
    reader.read_exact(&mut body)?;
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or_default();
    let mut headers = Vec::new();
    let (status, answer) = match (method, path.split('?').next().unwrap_or_default()) {
        ("POST", "/devicecode") if state.lock().unwrap().scripted_device.front().is_some() => {
            let answer = state.lock().unwrap().scripted_device.pop_front().unwrap();
            headers = answer.headers;
            (answer.status, answer.body)
        }
        ("POST", "/devicecode") => {
            let form = parse_form(&String::from_utf8_lossy(&body));
            let mut st = state.lock().unwrap();
            let client_id = form.get("client_id").cloned().unwrap_or_default();
            let secret = st.clients.get(&client_id).map(|c| c.secret.clone());
            if secret.is_none() {
                error(
                    400,
                    "unauthorized_client",
                    "AADSTS700016: Application not found.",
                )
            } else if let Some(Some(secret)) = secret
                && form.get("client_secret") != Some(&secret)
            {
                // A confidential client authenticates on this request too (RFC 8628 §3.1).
                error(
                    401,
                    "invalid_client",
                    "AADSTS7000218: The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
                )
            } else {
                let user_code: String = random_token("")
                    .chars()
                    .filter(char::is_ascii_alphabetic)
                    .take(8)
                    .collect::<String>()
                    .to_ascii_uppercase();
                let device_code = random_token("dc-");
                st.devices.insert(
                    user_code.clone(),
                    Device {
                        client_id,
                        device_code: device_code.clone(),
                        user: None,
                        denied: false,
                        polls: 0,
                    },
                );
                (
                    200,
                    json!({
                        "device_code": device_code,
                        "user_code": user_code,
                        "verification_uri": format!("http://{local}/device"),
                        "expires_in": 900,
                        "interval": 1,
                    }),
                )
            }
        }
        ("POST", "/revoke") => {
            let form = parse_form(&String::from_utf8_lossy(&body));
            let mut st = state.lock().unwrap();
            let client_id = form.get("client_id").cloned().unwrap_or_default();
            if !st.clients.contains_key(&client_id) {
                error(
                    401,
                    "invalid_client",
                    "AADSTS700016: Application not found.",
                )
            } else {
                // RFC 7009 §2.2: 200 whether or not the token was valid.
                let token = form.get("token").cloned().unwrap_or_default();
                if st.refresh.remove(&token).is_some() {
                    st.dead.insert(token, AADSTS_REVOKED);
                }
                (200, json!({}))
            }
        }
        ("POST", "/token") => {
            let form = parse_form(&String::from_utf8_lossy(&body));
            let mut st = state.lock().unwrap();
            match st.scripted.pop_front() {
                Some(answer) => {
                    st.token_requests += 1;
                    headers = answer.headers;
                    (answer.status, answer.body)
                }
                None => token(&mut st, key, &form),
            }
        }
        _ => (404, json!({"error": "not_found"})),
    };
    let text = answer.to_string();
    let reason = match status {
        200 => "OK",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "Bad Request",
    };
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    drop(reader);
    write!(
        conn,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\nCache-Control: no-store\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    )?;
    conn.flush()
}

fn error(status: u16, error: &str, description: &str) -> (u16, Value) {
    (
        status,
        json!({"error": error, "error_description": format!("{description}\r\nTrace ID: 00000000-0000-0000-0000-000000000000\r\nTimestamp: 2026-11-29 10:00:00Z"), "error_codes": [70000]}),
    )
}

fn token(st: &mut State, key: &OAuthKey, form: &HashMap<String, String>) -> (u16, Value) {
    st.token_requests += 1;
    let get = |k: &str| form.get(k).map(String::as_str).unwrap_or_default();
    let client_id = get("client_id");
    let Some(client) = st.clients.get(client_id).cloned() else {
        return error(
            400,
            "unauthorized_client",
            &format!(
                "AADSTS700016: Application with identifier '{client_id}' was not found in the directory."
            ),
        );
    };
    if let Some(secret) = &client.secret
        && form.contains_key("client_secret")
        && get("client_secret") != secret
    {
        return error(
            401,
            "invalid_client",
            "AADSTS7000215: Invalid client secret provided.",
        );
    }
    let grant = match get("grant_type") {
        "refresh_token" => {
            let presented = get("refresh_token").to_string();
            st.presented.push(presented.clone());
            match st.refresh.remove(&presented) {
                Some(g) if g.client_id == client_id => g,
                Some(g) => {
                    st.refresh.insert(presented, g);
                    return error(400, "invalid_grant", AADSTS_INVALID);
                }
                None => {
                    let why = st.dead.get(&presented).copied().unwrap_or(AADSTS_INVALID);
                    return error(400, "invalid_grant", why);
                }
            }
        }
        "client_credentials" => {
            if client.secret.is_none() || !form.contains_key("client_secret") {
                return error(
                    401,
                    "invalid_client",
                    "AADSTS7000218: The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
                );
            }
            let Some(user) = client.app_user.clone() else {
                return error(
                    400,
                    "unauthorized_client",
                    "AADSTS700016: the application has no app-only access.",
                );
            };
            let access =
                key.access_token(&user, st.access_ttl.unwrap_or(Duration::from_secs(3600)));
            st.issued_access.insert(access.clone());
            return (
                200,
                json!({"token_type": "Bearer", "expires_in": st.access_ttl.unwrap_or(Duration::from_secs(3600)).as_secs(), "access_token": access}),
            );
        }
        "urn:ietf:params:oauth:grant-type:device_code" => {
            let presented = get("device_code");
            st.device_polls.push(std::time::Instant::now());
            let Some((code, device)) = st
                .devices
                .iter_mut()
                .find(|(_, d)| d.device_code == presented && d.client_id == client_id)
            else {
                return error(
                    400,
                    "expired_token",
                    "AADSTS70019: Verification code expired.",
                );
            };
            device.polls += 1;
            if device.denied {
                return error(
                    400,
                    "access_denied",
                    "AADSTS70016: The user declined the sign-in.",
                );
            }
            // The second poll is told to slow down, as a busy server would.
            if device.polls == 2 {
                return error(400, "slow_down", "AADSTS70016: Poll less often.");
            }
            let Some(user) = device.user.clone() else {
                return error(
                    400,
                    "authorization_pending",
                    "AADSTS70016: OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
                );
            };
            let code = code.clone();
            st.devices.remove(&code);
            Grant {
                user,
                client_id: client_id.to_string(),
            }
        }
        "authorization_code" => {
            let Some(code) = st.codes.remove(get("code")) else {
                return error(
                    400,
                    "invalid_grant",
                    "AADSTS70008: The provided authorization code or refresh token has expired.",
                );
            };
            if code.redirect_uri != get("redirect_uri") {
                return error(
                    400,
                    "invalid_grant",
                    "AADSTS50011: The redirect URI specified in the request does not match.",
                );
            }
            let digest =
                ring::digest::digest(&ring::digest::SHA256, get("code_verifier").as_bytes());
            if URL_SAFE_NO_PAD.encode(digest.as_ref()) != code.challenge {
                return error(
                    400,
                    "invalid_grant",
                    "AADSTS501481: The Code_Verifier does not match the code_challenge supplied in the authorization request.",
                );
            }
            code.grant
        }
        other => {
            return error(
                400,
                "unsupported_grant_type",
                &format!("AADSTS70003: The app requested an unsupported grant type '{other}'."),
            );
        }
    };
    if let Some(old) = form.get("refresh_token") {
        st.dead.insert(old.clone(), AADSTS_ROTATED);
    }
    let ttl = st.access_ttl.unwrap_or(Duration::from_secs(3600));
    let access = key.access_token(&grant.user, ttl);
    st.issued_access.insert(access.clone());
    let mut answer = json!({
        "token_type": "Bearer",
        "scope": "https://outlook.office.com/IMAP.AccessAsUser.All",
        "expires_in": ttl.as_secs(),
        "access_token": access,
    });
    if !st.no_refresh_tokens {
        let refresh = random_token("rt-");
        st.refresh.insert(refresh.clone(), grant.clone());
        answer["refresh_token"] = json!(refresh);
    }
    (200, answer)
}
