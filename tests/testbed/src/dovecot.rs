//! A real Dovecot from a generated configuration: IMAP and POP3 with implicit TLS and
//! STARTTLS, passwd-file accounts and the oauth2 passdb validating JWTs locally.
//!
//! It listens on 127.0.0.2, not 127.0.0.1: Dovecot treats a connection whose client and
//! server addresses are equal as secured, so on 127.0.0.1 plaintext logins would pass
//! before STARTTLS. A client connecting to 127.0.0.2 comes from 127.0.0.1, so the server
//! behaves as a real one does (LOGINDISABLED until TLS).

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::certs::{self, Ca};
use crate::maildir;
use crate::oauth::OAuthKey;
use crate::process::{self, Lifetime, Proc};
use crate::unix_user::RunAs;

/// The loopback address every Dovecot of the bed listens on (see the module docs).
pub const MAIL_HOST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// Accounts every instance starts with.
pub const DEFAULT_ACCOUNTS: [(&str, &str); 2] =
    [("alice", "alice-secret-1"), ("bob", "bob-secret-2")];

/// An account whose POP3 session locks its maildrop, as RFC 1939 servers do: while one
/// session holds it, another's login is refused with `-ERR [IN-USE]`.
pub const LOCKING_ACCOUNT: (&str, &str) = ("carol", "carol-secret-3");

/// A login the instance's authentication always fails on its side (its password file
/// cannot be read): `-ERR [SYS/TEMP]` in POP3, `NO [UNAVAILABLE]` in IMAP, whatever the
/// password.
pub const UNAVAILABLE_USER: &str = "dave@unavailable.test";

/// Which certificate an instance serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CertKind {
    /// A leaf signed by the bed's test CA (trust the CA file).
    TestCa,
    /// A self-signed certificate marked CA:TRUE, as many on-premises servers have
    /// (trust the certificate itself).
    SelfSignedCa,
}

/// What kind of Dovecot to start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DovecotOptions {
    pub certificate: CertKind,
    /// `false` starts it with `ssl = no`: plain IMAP and POP3 only, no STARTTLS or STLS
    /// offered, plaintext logins allowed.
    pub tls: bool,
}

impl DovecotOptions {
    /// The main instance: test CA, implicit TLS and STARTTLS.
    pub const MAIN: DovecotOptions = DovecotOptions {
        certificate: CertKind::TestCa,
        tls: true,
    };
    /// An instance whose certificate is self-signed and CA:TRUE.
    pub const SELF_SIGNED: DovecotOptions = DovecotOptions {
        certificate: CertKind::SelfSignedCa,
        tls: true,
    };
    /// An instance without TLS at all.
    pub const PLAIN: DovecotOptions = DovecotOptions {
        certificate: CertKind::TestCa,
        tls: false,
    };

    /// The instance's name, used for its folder, pid file and environment variables.
    pub fn name(&self) -> &'static str {
        match (self.tls, self.certificate) {
            (false, _) => "plain",
            (true, CertKind::TestCa) => "main",
            (true, CertKind::SelfSignedCa) => "self-signed",
        }
    }
}

/// A login the instance accepts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub user: String,
    pub password: String,
    /// Dovecot settings for this account alone (passwd-file extra fields).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub settings: Vec<String>,
}

/// Everything about an instance that outlives the process that started it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DovecotInfo {
    pub name: String,
    pub options: DovecotOptions,
    pub host: String,
    pub imap: u16,
    pub pop3: u16,
    /// Implicit-TLS ports; `None` without TLS.
    pub imaps: Option<u16>,
    pub pop3s: Option<u16>,
    /// What a client must trust: the test CA, or the self-signed certificate itself.
    pub ca_file: Option<PathBuf>,
    /// The certificate the server presents.
    pub cert_file: Option<PathBuf>,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    /// Dovecot's own stdout and stderr (start-up failures before logging is set up).
    pub master_log: PathBuf,
    pub passwd_file: PathBuf,
    pub pid_file: PathBuf,
    pub accounts: Vec<Account>,
}

impl DovecotInfo {
    /// Where `user`'s mail lives (the config's home, `mail/%u`, and `~/Maildir`).
    fn maildir(&self, user: &str) -> PathBuf {
        self.dir.join("mail").join(user).join("Maildir")
    }
}

/// A running (or stopped) Dovecot instance.
pub struct Dovecot {
    info: Mutex<DovecotInfo>,
    binary: PathBuf,
    lifetime: Lifetime,
    run_as: RunAs,
    proc: Mutex<Option<Proc>>,
}

impl std::fmt::Debug for Dovecot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dovecot")
            .field("info", &self.info())
            .finish()
    }
}

/// Where the bed's shared pieces are, for creating an instance.
pub(crate) struct Setup<'a> {
    pub dir: PathBuf,
    pub pid_file: PathBuf,
    pub binary: &'a Path,
    pub lifetime: Lifetime,
    pub test_ca: &'a Ca,
    pub test_ca_file: &'a Path,
    pub oauth: &'a OAuthKey,
}

impl Dovecot {
    /// Writes the instance's configuration, certificates, accounts and mailboxes into
    /// `setup.dir` and starts it.
    pub(crate) fn create(setup: Setup<'_>, options: DovecotOptions) -> Result<Dovecot> {
        let run_as = RunAs::for_dovecot()?;
        let dir = setup.dir;
        fs::create_dir_all(&dir)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
        let (ca_file, cert_file) = if options.tls {
            let names = ["localhost", "127.0.0.1", "127.0.0.2"];
            let pair = match options.certificate {
                CertKind::TestCa => setup.test_ca.server("mailroom test mail server", &names)?,
                CertKind::SelfSignedCa => {
                    certs::self_signed_ca_server("mailroom self-signed mail server", &names)?
                }
            };
            let tls = dir.join("tls");
            fs::create_dir_all(&tls)?;
            let cert = tls.join("server.crt");
            fs::write(&cert, &pair.cert_pem)?;
            write_private(&tls.join("server.key"), &pair.key_pem)?;
            let ca = match options.certificate {
                CertKind::TestCa => setup.test_ca_file.to_path_buf(),
                CertKind::SelfSignedCa => cert.clone(),
            };
            (Some(ca), Some(cert))
        } else {
            (None, None)
        };
        let port = || process::free_port(MAIL_HOST);
        let info = DovecotInfo {
            name: options.name().to_string(),
            options,
            host: MAIL_HOST.to_string(),
            imap: port()?,
            pop3: port()?,
            imaps: if options.tls { Some(port()?) } else { None },
            pop3s: if options.tls { Some(port()?) } else { None },
            ca_file,
            cert_file,
            config: dir.join("dovecot.conf"),
            log: dir.join("dovecot.log"),
            master_log: dir.join("master.log"),
            passwd_file: dir.join("passwd"),
            pid_file: setup.pid_file,
            accounts: DEFAULT_ACCOUNTS
                .iter()
                .map(|(u, p)| Account {
                    user: u.to_string(),
                    password: p.to_string(),
                    settings: Vec::new(),
                })
                .chain([Account {
                    user: LOCKING_ACCOUNT.0.to_string(),
                    password: LOCKING_ACCOUNT.1.to_string(),
                    settings: vec!["userdb_pop3_lock_session=yes".to_string()],
                }])
                .collect(),
            dir: dir.clone(),
        };
        for sub in ["run", "state", "mail"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        for account in &info.accounts {
            let maildir = info.maildir(&account.user);
            maildir::write(&maildir, &account.user, &maildir::seeds_for(&account.user))?;
        }
        fs::write(dir.join("passwd"), passwd_text(&info.accounts)?)?;
        fs::write(dir.join("oauth2.conf.ext"), oauth2_config(setup.oauth))?;
        fs::write(&info.config, config_text(&info, &run_as))?;
        run_as.own(&dir)?;
        run_as.own(&setup.oauth.key_dir)?;
        let dovecot = Dovecot {
            info: Mutex::new(info),
            binary: setup.binary.to_path_buf(),
            lifetime: setup.lifetime,
            run_as,
            proc: Mutex::new(None),
        };
        dovecot.start()?;
        Ok(dovecot)
    }

    /// A handle on an instance another process started (a running `testbed up`).
    pub(crate) fn attach(info: DovecotInfo, binary: &Path) -> Result<Dovecot> {
        Ok(Dovecot {
            info: Mutex::new(info),
            binary: binary.to_path_buf(),
            lifetime: Lifetime::Detached,
            run_as: RunAs::for_dovecot()?,
            proc: Mutex::new(None),
        })
    }

    /// A copy of what describes the instance (ports, files, accounts).
    pub fn info(&self) -> DovecotInfo {
        self.info.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn name(&self) -> String {
        self.info().name
    }

    /// The address to connect to: 127.0.0.2.
    pub fn host(&self) -> String {
        self.info().host
    }

    pub fn imap_port(&self) -> u16 {
        self.info().imap
    }

    pub fn pop3_port(&self) -> u16 {
        self.info().pop3
    }

    /// The IMAPS port; panics for an instance without TLS.
    pub fn imaps_port(&self) -> u16 {
        let info = self.info();
        info.imaps
            .unwrap_or_else(|| panic!("Dovecot {} has no TLS, so no IMAPS port", info.name))
    }

    /// The POP3S port; panics for an instance without TLS.
    pub fn pop3s_port(&self) -> u16 {
        let info = self.info();
        info.pop3s
            .unwrap_or_else(|| panic!("Dovecot {} has no TLS, so no POP3S port", info.name))
    }

    /// The PEM file a client must trust; panics for an instance without TLS.
    pub fn ca_file(&self) -> PathBuf {
        let info = self.info();
        info.ca_file
            .unwrap_or_else(|| panic!("Dovecot {} has no TLS, so no CA file", info.name))
    }

    /// The PEM of the certificate the server presents (for the self-signed instance,
    /// the certificate a user would pin); panics for an instance without TLS.
    pub fn cert_pem(&self) -> String {
        let info = self.info();
        let file = info
            .cert_file
            .unwrap_or_else(|| panic!("Dovecot {} has no TLS, so no certificate", info.name));
        fs::read_to_string(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()))
    }

    pub fn log_path(&self) -> PathBuf {
        self.info().log
    }

    /// The whole Dovecot log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn accounts(&self) -> Vec<Account> {
        self.info().accounts
    }

    /// `(user, password)` of an account; panics if there is no such account.
    pub fn account(&self, user: &str) -> (String, String) {
        (user.to_string(), self.password(user))
    }

    /// The password of `user`; panics if there is no such account.
    pub fn password(&self, user: &str) -> String {
        self.accounts()
            .into_iter()
            .find(|a| a.user == user)
            .map(|a| a.password)
            .unwrap_or_else(|| panic!("the bed has no account {user}"))
    }

    /// Sets the password of `user`, adding the account if it is new, and returns once
    /// Dovecot will see it at the next login (within about a second). A new account's
    /// Maildir is created empty on its first login.
    pub fn set_password(&self, user: &str, password: &str) -> Result<()> {
        let mut info = self.info.lock().unwrap_or_else(|e| e.into_inner());
        let mut accounts = info.accounts.clone();
        match accounts.iter_mut().find(|a| a.user == user) {
            Some(a) => a.password = password.to_string(),
            None => accounts.push(Account {
                user: user.to_string(),
                password: password.to_string(),
                settings: Vec::new(),
            }),
        }
        let text = passwd_text(&accounts)?;
        // Dovecot notices a new passwd-file by mtime (in whole seconds) and size, and
        // looks at most once per second: give the file a later mtime than the old one,
        // then let the second in which Dovecot may last have looked pass.
        let old_mtime = fs::metadata(&info.passwd_file)?.modified()?;
        let now = SystemTime::now();
        let mtime = now.max(old_mtime + Duration::from_secs(1));
        // Replace by rename so Dovecot never reads a half-written file.
        let tmp = info.passwd_file.with_extension("new");
        let file = fs::File::create(&tmp)?;
        (&file).write_all(text.as_bytes())?;
        file.set_modified(mtime)?;
        drop(file);
        self.run_as.own(&tmp)?;
        fs::rename(&tmp, &info.passwd_file)?;
        info.accounts = accounts;
        let second = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let written = second(now);
        process::poll(
            Duration::from_secs(2),
            Duration::from_millis(10),
            &mut || second(SystemTime::now()) > written,
        );
        Ok(())
    }

    /// Whether the master process runs.
    pub fn is_running(&self) -> bool {
        let mut proc = self.proc.lock().unwrap_or_else(|e| e.into_inner());
        match proc.as_mut() {
            Some(p) => p.exited().is_none(),
            None => process::recorded_alive(&self.info().pid_file),
        }
    }

    /// Stops the instance and all its processes; connections are cut. Ports stay
    /// reserved for `start`.
    pub fn stop(&self) {
        let mut proc = self.proc.lock().unwrap_or_else(|e| e.into_inner());
        match proc.take() {
            Some(mut p) => p.stop(Duration::from_secs(3)),
            None => {
                let pid_file = self.info().pid_file;
                if pid_file.exists() {
                    let _ = process::stop_recorded(&pid_file, Duration::from_secs(3));
                }
            }
        }
    }

    /// Starts the instance (again) on the same ports and waits until every listener
    /// answers.
    pub fn start(&self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let info = self.info();
        // A master that died hard leaves its pid file, and Dovecot refuses to start if
        // that pid happens to run again.
        let _ = fs::remove_file(info.dir.join("run").join("master.pid"));
        let mut command = Command::new(&self.binary);
        command.arg("-F").arg("-c").arg(&info.config);
        if self.run_as.switch {
            // Switching from root also drops supplementary groups (std does setgroups).
            command.uid(self.run_as.uid).gid(self.run_as.gid);
        }
        let mut proc = Proc::spawn(
            &format!("dovecot {}", info.name),
            command,
            &info.master_log,
            Some(&info.pid_file),
            self.lifetime,
            // Dovecot's master stops its children on SIGTERM; on SIGKILL they linger.
            libc::SIGTERM,
        )?;
        if let Err(e) = wait_ready(&info, &mut proc).and_then(|()| self.index_inboxes(&info)) {
            proc.stop(Duration::from_secs(1));
            return Err(e);
        }
        let mut slot = self.proc.lock().unwrap_or_else(|e| e.into_inner());
        match self.lifetime {
            Lifetime::Tied => *slot = Some(proc),
            Lifetime::Detached => proc.release(),
        }
        Ok(())
    }
}

impl Dovecot {
    /// Has Dovecot index each seeded INBOX before any session: two first sessions
    /// arriving together (an IMAP and a POP3 provider of one account, applied at once)
    /// were seen to race building a fresh Maildir's index, IMAP STATUS answering 0
    /// messages while POP3 STAT counted the 3 seeded (2 runs in 3, with Python's imaplib
    /// and poplib as well). Once indexed (a uidlist exists), a restart has nothing to do.
    fn index_inboxes(&self, info: &DovecotInfo) -> Result<()> {
        for account in &info.accounts {
            let maildir = info.maildir(&account.user);
            // An empty mailbox has nothing to race over.
            if maildir::seeds_for(&account.user).is_empty()
                || !maildir.exists()
                || maildir.join("dovecot-uidlist").exists()
            {
                continue;
            }
            let mut command = Command::new("doveadm");
            command.arg("-c").arg(&info.config).args([
                "mailbox",
                "status",
                "-u",
                &account.user,
                "messages",
                "INBOX",
            ]);
            if self.run_as.switch {
                command.uid(self.run_as.uid).gid(self.run_as.gid);
            }
            let out = command.output().map_err(|e| {
                anyhow::anyhow!("running doveadm (Debian's dovecot-core; tests/testbed/prepare installs it): {e}")
            })?;
            if !out.status.success() {
                bail!(
                    "doveadm mailbox status -u {} INBOX on Dovecot {}: {}",
                    account.user,
                    info.name,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Ok(())
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        if let Some(mut p) = self
            .proc
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            p.stop(Duration::from_secs(3));
        }
    }
}

/// Waits until the plain listeners greet (which needs the auth process) and the TLS
/// listeners accept.
fn wait_ready(info: &DovecotInfo, proc: &mut Proc) -> Result<()> {
    let host: Ipv4Addr = info.host.parse()?;
    let mut pending: Vec<(u16, Option<&str>)> =
        vec![(info.imap, Some("* OK")), (info.pop3, Some("+OK"))];
    pending.extend(info.imaps.map(|p| (p, None)));
    pending.extend(info.pop3s.map(|p| (p, None)));
    let mut last_error = String::new();
    let mut exited = None;
    let ready = process::poll(
        Duration::from_secs(30),
        Duration::from_millis(50),
        &mut || {
            if let Some(why) = proc.exited() {
                exited = Some(why);
                return true;
            }
            pending.retain(|(port, greeting)| match probe(host, *port, *greeting) {
                Ok(()) => false,
                Err(e) => {
                    last_error = format!("port {port}: {e}");
                    true
                }
            });
            pending.is_empty()
        },
    );
    if let Some(why) = exited {
        bail!(
            "Dovecot {} did not start ({why}).\n--- {} ---\n{}\n--- {} ---\n{}",
            info.name,
            info.master_log.display(),
            process::tail(&info.master_log, 20),
            info.log.display(),
            process::tail(&info.log, 20)
        );
    }
    if !ready {
        bail!(
            "Dovecot {} was not ready within 30 s (last: {last_error}).\n--- {} ---\n{}",
            info.name,
            info.log.display(),
            process::tail(&info.log, 20)
        );
    }
    Ok(())
}

fn probe(host: Ipv4Addr, port: u16, greeting: Option<&str>) -> Result<()> {
    let addr = SocketAddr::from((host, port));
    let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    let Some(expected) = greeting else {
        return Ok(());
    };
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if line.starts_with(expected) {
        Ok(())
    } else {
        bail!("greeting {line:?}, expected {expected:?}")
    }
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// The passwd-file: `user:{PLAIN}password` plus Dovecot's empty columns.
fn passwd_text(accounts: &[Account]) -> Result<String> {
    let mut text = String::new();
    for a in accounts {
        let bad = |s: &str| s.is_empty() || s.contains([':', '\n', '\r']);
        if bad(&a.user) || a.password.contains([':', '\n', '\r']) {
            bail!(
                "account {:?}: user and password must not contain ':' or line breaks",
                a.user
            );
        }
        writeln!(
            text,
            "{}:{{PLAIN}}{}::::::{}",
            a.user,
            a.password,
            a.settings.join(" ")
        )?;
    }
    Ok(text)
}

fn oauth2_config(key: &OAuthKey) -> String {
    format!(
        "# Local validation of JWT access tokens with the bed's key.\n\
         introspection_mode = local\n\
         local_validation_key_dict = fs:posix:prefix={}/\n\
         username_attribute = {}\n\
         issuers = {}\n\
         client_id = {}\n",
        key.key_dir.display(),
        key.username_claim,
        key.issuer,
        key.audience
    )
}

/// The whole `dovecot.conf` of an instance.
fn config_text(info: &DovecotInfo, run_as: &RunAs) -> String {
    let dir = info.dir.display();
    let mut c = String::new();
    let _ = write!(
        c,
        "# Written by mailroom's test bed for the instance {name}.\n\
         instance_name = mailroom-{name}\n\
         base_dir = {dir}/run\n\
         state_dir = {dir}/state\n\
         listen = {host}\n\
         protocols = imap pop3\n\
         \n\
         # Everything runs as one unprivileged user.\n\
         default_internal_user = {user}\n\
         default_internal_group = {group}\n\
         default_login_user = {user}\n\
         mail_uid = {user}\n\
         mail_gid = {group}\n\
         first_valid_uid = {uid}\n\
         first_valid_gid = {gid}\n\
         mail_location = maildir:~/Maildir\n\
         \n\
         log_path = {dir}/dovecot.log\n\
         info_log_path = {dir}/dovecot.log\n\
         debug_log_path = {dir}/dovecot.log\n\
         auth_verbose = yes\n\
         auth_failure_delay = 0\n\
         auth_mechanisms = plain login xoauth2 oauthbearer\n",
        name = info.name,
        host = info.host,
        user = run_as.user,
        group = run_as.group,
        uid = run_as.uid,
        gid = run_as.gid,
    );
    match (&info.cert_file, info.options.tls) {
        (Some(cert), true) => {
            let _ = write!(
                c,
                "\n# Plaintext logins only after STARTTLS/STLS or on implicit TLS.\n\
                 disable_plaintext_auth = yes\n\
                 ssl = yes\n\
                 ssl_cert = <{cert}\n\
                 ssl_key = <{dir}/tls/server.key\n\
                 ssl_min_protocol = TLSv1.2\n",
                cert = cert.display()
            );
        }
        _ => {
            c.push_str(
                "\n# No TLS at all: no STARTTLS/STLS offered, plaintext logins allowed.\n\
                 disable_plaintext_auth = no\n\
                 ssl = no\n",
            );
        }
    }
    let _ = write!(
        c,
        "\n# Passwords for PLAIN and LOGIN, JWT access tokens for XOAUTH2 and OAUTHBEARER.\n\
         # The first fails on its side for *@unavailable.test: its file lies under a file.\n\
         passdb {{\n  driver = passwd-file\n  args = scheme=PLAIN username_format=%u {dir}/passwd/unavailable\n  \
         username_filter = *@unavailable.test\n  mechanisms = plain login\n}}\n\
         passdb {{\n  driver = passwd-file\n  args = scheme=PLAIN username_format=%u {dir}/passwd\n  \
         mechanisms = plain login\n}}\n\
         passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  \
         args = {dir}/oauth2.conf.ext\n}}\n\
         userdb {{\n  driver = static\n  args = home={dir}/mail/%u allow_all_users=yes\n}}\n\
         \n\
         # No chroot without root. Without the penalty socket, failed logins from 127.0.0.1\n\
         # are not slowed down by up to 15 s each, which tests of wrong passwords would hit.\n\
         service anvil {{\n  chroot =\n  unix_listener anvil-auth-penalty {{\n    mode = 0\n  }}\n}}\n",
    );
    // Port 0 switches off the listeners Dovecot has by default (143, 993, 110, 995).
    let _ = write!(
        c,
        "# Login processes in Dovecot's high-performance mode (one process serves many\n\
         # connections, a new TLS context is not built per login), and limits that let a\n\
         # fleet of providers share one account: benchmarks measure mailroom, not forks.\n\
         default_client_limit = 4000\n\
         protocol imap {{\n  mail_max_userip_connections = 1000\n}}\n\
         protocol pop3 {{\n  mail_max_userip_connections = 1000\n}}\n\
         service imap-login {{\n  chroot =\n  service_count = 0\n  process_min_avail = 2\n  \
         inet_listener imap {{\n    port = {imap}\n  }}\n  \
         inet_listener imaps {{\n    port = {imaps}\n    ssl = yes\n  }}\n}}\n\
         service pop3-login {{\n  chroot =\n  service_count = 0\n  process_min_avail = 2\n  \
         inet_listener pop3 {{\n    port = {pop3}\n  }}\n  \
         inet_listener pop3s {{\n    port = {pop3s}\n    ssl = yes\n  }}\n}}\n",
        imap = info.imap,
        imaps = info.imaps.unwrap_or(0),
        pop3 = info.pop3,
        pop3s = info.pop3s.unwrap_or(0),
    );
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(options: DovecotOptions) -> DovecotInfo {
        DovecotInfo {
            name: options.name().into(),
            options,
            host: MAIL_HOST.to_string(),
            imap: 1143,
            pop3: 1110,
            imaps: options.tls.then_some(1993),
            pop3s: options.tls.then_some(1995),
            ca_file: None,
            cert_file: options.tls.then(|| PathBuf::from("/d/tls/server.crt")),
            dir: "/d".into(),
            config: "/d/dovecot.conf".into(),
            log: "/d/dovecot.log".into(),
            master_log: "/d/master.log".into(),
            passwd_file: "/d/passwd".into(),
            pid_file: "/p".into(),
            accounts: vec![],
        }
    }

    fn run_as() -> RunAs {
        RunAs {
            user: "dovecot".into(),
            group: "dovecot".into(),
            uid: 102,
            gid: 105,
            switch: true,
        }
    }

    #[test]
    fn main_config_requires_tls_for_plaintext_and_keeps_passdbs_apart() {
        let c = config_text(&info(DovecotOptions::MAIN), &run_as());
        for line in [
            "listen = 127.0.0.2",
            "disable_plaintext_auth = yes",
            "ssl = yes",
            "ssl_min_protocol = TLSv1.2",
            "auth_failure_delay = 0",
            "auth_verbose = yes",
            "mechanisms = plain login",
            "mechanisms = xoauth2 oauthbearer",
            "default_internal_user = dovecot",
            "default_login_user = dovecot",
            "default_internal_group = dovecot",
            "first_valid_uid = 102",
            "log_path = /d/dovecot.log",
            "port = 1993",
        ] {
            assert!(
                c.lines().any(|l| l.trim() == line),
                "missing {line:?} in\n{c}"
            );
        }
        assert!(!c.contains("login_trusted_networks"));
    }

    #[test]
    fn plain_config_has_no_tls_listeners() {
        let c = config_text(&info(DovecotOptions::PLAIN), &run_as());
        assert!(c.lines().any(|l| l == "ssl = no"), "{c}");
        assert!(!c.contains("ssl_cert"));
        assert_eq!(c.matches("port = 0").count(), 2, "{c}");
    }

    #[test]
    fn passwd_rejects_colons() {
        let a = |u: &str, p: &str| Account {
            user: u.into(),
            password: p.into(),
            settings: Vec::new(),
        };
        assert_eq!(
            passwd_text(&[a("alice", "pw")]).unwrap(),
            "alice:{PLAIN}pw::::::\n"
        );
        assert!(passwd_text(&[a("alice", "p:w")]).is_err());
    }
}
