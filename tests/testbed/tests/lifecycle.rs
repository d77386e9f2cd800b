//! The bed's own lifecycle: Dovecot, etcd and kube-apiserver stop and start on the same
//! ports, a dropped bed leaves no process and no file behind (nor does a killed test
//! process, restarted parts included), and a detached bed (`testbed up`) can be attached
//! to and taken down; a fresh mailbox shows its messages to its very first sessions; and
//! the special accounts answer as the tests that use them expect.
//! Each test starts its own bed, so stopping things here disturbs no other test.

use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use mailroom_testbed::{Bed, LOCKING_ACCOUNT, MAIL_HOST, UNAVAILABLE_USER};

/// A connection to the bed's mail host, and the server's greeting.
fn connect(port: u16) -> std::io::Result<(BufReader<TcpStream>, String)> {
    let stream = TcpStream::connect_timeout(&(MAIL_HOST, port).into(), Duration::from_secs(5))?;
    // Dovecot waits some 10 s for a held POP3 lock before it answers.
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut conn = BufReader::new(stream);
    let mut line = String::new();
    conn.read_line(&mut line)?;
    Ok((conn, line))
}

fn greeting(port: u16) -> std::io::Result<String> {
    connect(port).map(|(_, line)| line)
}

/// The process groups the bed recorded (each recorded process leads one).
fn recorded_groups(pid_dir: &Path) -> HashSet<i32> {
    fs::read_dir(pid_dir)
        .expect("the bed's pid folder")
        .map(|e| {
            let text = fs::read_to_string(e.unwrap().path()).unwrap();
            text.split_whitespace().next().unwrap().parse().unwrap()
        })
        .collect()
}

/// Processes (zombies included) whose group is one of `groups`.
fn members(groups: &HashSet<i32>) -> Vec<String> {
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.parse::<i32>().ok()?;
            let stat = fs::read_to_string(format!("/proc/{name}/stat")).ok()?;
            let rest = &stat[stat.rfind(')')? + 2..];
            let pgrp: i32 = rest.split_whitespace().nth(2)?.parse().ok()?;
            groups.contains(&pgrp).then(|| stat.trim().to_string())
        })
        .collect()
}

#[test]
fn dovecot_restarts_on_its_ports_and_a_dropped_bed_leaves_nothing() {
    let bed = Bed::start().unwrap_or_else(|e| panic!("{e:#}"));
    let d = bed.dovecot();
    let port = d.imap_port();
    let hello = greeting(port).expect("a greeting from the running Dovecot");
    assert!(hello.starts_with("* OK"), "greeting {hello:?}");

    d.stop();
    assert!(!d.is_running(), "Dovecot should be stopped");
    assert!(
        greeting(port).is_err(),
        "expected port {port} to refuse connections after stop(); see {}",
        d.log_path().display()
    );
    d.start().unwrap_or_else(|e| panic!("{e:#}"));
    let hello = greeting(port).expect("a greeting after start()");
    assert!(
        hello.starts_with("* OK"),
        "greeting after restart {hello:?}"
    );

    let _ = bed.plaintext_dovecot();
    let groups = recorded_groups(&bed.state().pid_dir);
    assert_eq!(
        groups.len(),
        4,
        "etcd, kube-apiserver and two Dovecots: {groups:?}"
    );
    let dir = bed.state_dir();
    drop(bed);
    let left = members(&groups);
    assert!(
        left.is_empty(),
        "processes left after drop:\n{}",
        left.join("\n")
    );
    assert!(!dir.exists(), "{} should be removed", dir.display());
}

/// Takes a detached bed down even when the test fails half-way: its processes have no
/// parent-death signal, by design.
struct DownOnDrop<'a>(&'a Path);

impl Drop for DownOnDrop<'_> {
    fn drop(&mut self) {
        let _ = Bed::down(self.0);
    }
}

#[test]
fn a_detached_bed_can_be_attached_to_and_taken_down() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("bed");
    let _down = DownOnDrop(&dir);
    let up = Bed::up(&dir).unwrap_or_else(|e| panic!("{e:#}"));
    let groups = recorded_groups(&up.state().pid_dir);
    assert_eq!(
        groups.len(),
        5,
        "etcd, kube-apiserver and three Dovecots: {groups:?}"
    );
    drop(up);
    assert!(
        members(&groups).len() >= 5,
        "dropping the `up` handle must not stop the bed"
    );
    assert!(
        Bed::up(&dir).is_err(),
        "a second `up` on a running bed must refuse"
    );

    let bed = Bed::attach(&dir).unwrap_or_else(|e| panic!("{e:#}"));
    let out = bed
        .kubectl()
        .args(["get", "namespaces", "-o", "name"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("namespace/default"),
        "kubectl through the attached bed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        greeting(bed.self_signed_dovecot().imap_port())
            .unwrap()
            .starts_with("* OK")
    );
    let refused = bed
        .stop_apiserver()
        .expect_err("an attached bed must not stop a control plane it does not own");
    assert!(
        format!("{refused:#}").contains(mailroom_testbed::STATE_ENV),
        "the refusal should say how to get a bed of one's own: {refused:#}"
    );
    let env = bed.env_lines();
    assert!(env.contains("export KUBECONFIG="), "{env}");
    drop(bed);

    Bed::down(&dir).unwrap_or_else(|e| panic!("{e:#}"));
    let left = members(&groups);
    assert!(
        left.is_empty(),
        "processes left after down:\n{}",
        left.join("\n")
    );
    assert!(!dir.exists(), "{} should be removed", dir.display());
}

/// `kubectl` through the bed's kubeconfig with a short request timeout: (ok, output).
fn kubectl(bed: &Bed, args: &[&str]) -> (bool, String) {
    let out = bed
        .kubectl()
        .arg("--request-timeout=5s")
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_control_plane_restarts_on_its_ports_with_its_data_and_certificates() {
    let bed = Bed::start().unwrap_or_else(|e| panic!("{e:#}"));
    let ns = bed.namespace("kept");
    let pids = bed.state().pid_dir;
    let pid_of = |name: &str| fs::read_to_string(pids.join(format!("{name}.pid"))).unwrap();
    let (etcd_before, apiserver_before) = (pid_of("etcd"), pid_of("kube-apiserver"));

    bed.stop_etcd().unwrap_or_else(|e| panic!("{e:#}"));
    let (created, said) = kubectl(&bed, &["create", "namespace", "written-without-etcd"]);
    assert!(
        !created,
        "expected a write to fail while etcd is stopped; kubectl said: {said}"
    );
    bed.start_etcd().unwrap_or_else(|e| panic!("{e:#}"));
    assert_ne!(
        pid_of("etcd"),
        etcd_before,
        "the pid file should name the new etcd"
    );
    let (found, said) = kubectl(&bed, &["get", "namespace", &ns]);
    assert!(found, "the namespace made before etcd restarted: {said}");

    bed.stop_apiserver().unwrap_or_else(|e| panic!("{e:#}"));
    let (answered, said) = kubectl(&bed, &["get", "namespaces"]);
    assert!(
        !answered,
        "expected no answer while kube-apiserver is stopped: {said}"
    );
    bed.start_apiserver().unwrap_or_else(|e| panic!("{e:#}"));
    assert_ne!(pid_of("kube-apiserver"), apiserver_before);
    // The same kubeconfig (server URL, CA, client certificate) works, and the data is there.
    let (found, said) = kubectl(&bed, &["get", "namespace", &ns]);
    assert!(found, "the namespace made before both restarts: {said}");
    let (created, said) = kubectl(&bed, &["create", "namespace", "written-after-restarts"]);
    assert!(created, "a write after both restarts: {said}");

    let groups = recorded_groups(&pids);
    drop(bed);
    let left = members(&groups);
    assert!(
        left.is_empty(),
        "processes left after drop:\n{}",
        left.join("\n")
    );
}

const CHILD_ENV: &str = "MAILROOM_TESTBED_LIFECYCLE_CHILD";

/// Run in a child process by the test below: restarts both control-plane parts, says
/// where its pid files are, and dies by SIGKILL (no atexit handler, no drop).
#[test]
fn restarted_control_plane_processes_die_with_the_test_process() {
    if std::env::var_os(CHILD_ENV).is_some() {
        let bed = Bed::start().unwrap_or_else(|e| panic!("{e:#}"));
        bed.stop_etcd().unwrap_or_else(|e| panic!("{e:#}"));
        bed.start_etcd().unwrap_or_else(|e| panic!("{e:#}"));
        bed.stop_apiserver().unwrap_or_else(|e| panic!("{e:#}"));
        bed.start_apiserver().unwrap_or_else(|e| panic!("{e:#}"));
        println!("PIDS {}", bed.state().pid_dir.display());
        std::io::Write::flush(&mut std::io::stdout()).unwrap();
        // SAFETY: kill(2) on this very process.
        unsafe { libc::kill(std::process::id() as i32, libc::SIGKILL) };
        unreachable!("SIGKILL");
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "restarted_control_plane_processes_die_with_the_test_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let pid_dir = stdout
        .lines()
        // libtest prints the test's name on the same line.
        .find_map(|l| Some(l.split_once("PIDS ")?.1.trim()))
        .unwrap_or_else(|| {
            panic!(
                "the child never restarted its control plane ({}):\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let pid_dir = Path::new(pid_dir);
    let state_dir = pid_dir.parent().unwrap().to_path_buf();
    let _down = DownOnDrop(&state_dir);
    let groups = recorded_groups(pid_dir);
    assert_eq!(
        groups.len(),
        3,
        "etcd, kube-apiserver and Dovecot: {groups:?}"
    );
    // The parent-death signal is delivered at once; give the kernel and Dovecot's master a
    // moment to finish. The orphans' new parent may be this process (another test's bed
    // made it a subreaper): reap them so that only the living count.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let reap = || {
        for line in members(&groups) {
            let pid: i32 = line.split_whitespace().next().unwrap().parse().unwrap();
            // SAFETY: waitpid on a pid of the bed's groups; ECHILD if it is not ours.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        }
        members(&groups)
    };
    let mut left = reap();
    while !left.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        left = reap();
    }
    assert!(
        left.is_empty(),
        "processes of the killed test process left running:\n{}",
        left.join("\n")
    );
}

/// Sends one command line and reads lines until one that `done` accepts; returns it.
fn ask(conn: &mut BufReader<TcpStream>, line: &str, done: impl Fn(&str) -> bool) -> String {
    use std::io::Write;
    conn.get_mut()
        .write_all(format!("{line}\r\n").as_bytes())
        .unwrap();
    let mut seen = String::new();
    loop {
        let mut reply = String::new();
        let n = conn.read_line(&mut reply).unwrap();
        assert!(n > 0, "the server closed after {line:?}; it said:\n{seen}");
        seen.push_str(&reply);
        if done(&reply) {
            return seen;
        }
    }
}

#[test]
fn the_first_sessions_of_a_fresh_mailbox_all_see_its_messages() {
    // A fresh bed, so a fresh Maildir; the plaintext Dovecot, so no TLS client is needed.
    let bed = Bed::start().unwrap_or_else(|e| panic!("{e:#}"));
    let d = bed.plaintext_dovecot();
    let (user, password) = d.account("alice");
    let (imap, pop3) = (d.imap_port(), d.pop3_port());
    // IMAP and POP3 sessions of one account at once, as a demo's providers are: without
    // the bed indexing each INBOX first, IMAP STATUS answered 0 in 2 runs of 3.
    let sessions: Vec<_> = (0..8)
        .map(|i| {
            let (user, password) = (user.clone(), password.clone());
            std::thread::spawn(move || {
                if i % 2 == 0 {
                    let (mut c, _) = connect(imap).expect("connecting to the plaintext Dovecot");
                    ask(&mut c, &format!("a LOGIN {user} {password}"), |l| {
                        l.starts_with("a ")
                    });
                    let said = ask(&mut c, "b STATUS INBOX (MESSAGES)", |l| l.starts_with("b "));
                    ask(&mut c, "c LOGOUT", |l| l.starts_with("c "));
                    ("IMAP STATUS", said.contains("(MESSAGES 3)"), said)
                } else {
                    let (mut c, _) = connect(pop3).expect("connecting to the plaintext Dovecot");
                    ask(&mut c, &format!("USER {user}"), |_| true);
                    ask(&mut c, &format!("PASS {password}"), |_| true);
                    let said = ask(&mut c, "STAT", |_| true);
                    ask(&mut c, "QUIT", |_| true);
                    ("POP3 STAT", said.starts_with("+OK 3 "), said)
                }
            })
        })
        .collect();
    for s in sessions {
        let (what, counted_three, said) = s.join().unwrap();
        assert!(
            counted_three,
            "{what} should count alice's 3 messages; it said:\n{said}"
        );
    }
}

#[test]
fn the_locking_account_keeps_a_second_pop3_session_out_and_the_unavailable_user_fails_on_the_servers_side()
 {
    let bed = Bed::start().unwrap_or_else(|e| panic!("{e:#}"));
    let d = bed.plaintext_dovecot();
    let (user, password) = LOCKING_ACCOUNT;
    let pop3 = || connect(d.pop3_port()).unwrap().0;
    let login = |conn: &mut BufReader<TcpStream>, user: &str, password: &str| {
        ask(conn, &format!("USER {user}"), |_| true);
        ask(conn, &format!("PASS {password}"), |_| true)
    };

    let mut first = pop3();
    let said = login(&mut first, user, password);
    assert!(said.starts_with("+OK"), "{said}");
    let said = login(&mut pop3(), user, password);
    assert!(said.starts_with("-ERR [IN-USE]"), "{said}");
    // Once the first is gone, a session gets in.
    ask(&mut first, "QUIT", |_| true);
    let said = login(&mut pop3(), user, password);
    assert!(said.starts_with("+OK"), "{said}");

    let said = login(&mut pop3(), UNAVAILABLE_USER, "anything");
    assert!(said.starts_with("-ERR [SYS/TEMP]"), "{said}");
    let (mut imap, _) = connect(d.imap_port()).unwrap();
    let said = ask(
        &mut imap,
        &format!("a LOGIN {UNAVAILABLE_USER} anything"),
        |l| l.starts_with("a "),
    );
    assert!(said.contains("a NO [UNAVAILABLE]"), "{said}");
    // Everyone else logs in as before.
    let (alice, alice_password) = d.account("alice");
    let said = ask(
        &mut imap,
        &format!("b LOGIN {alice} {alice_password}"),
        |l| l.starts_with("b "),
    );
    assert!(said.contains("b OK"), "{said}");
}
