//! The bed's own lifecycle: Dovecot stops and starts on the same ports, a dropped bed
//! leaves no process and no file behind, and a detached bed (`testbed up`) can be
//! attached to and taken down. Each test starts its own bed, so stopping things here
//! disturbs no other test.

use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use mailroom_testbed::{Bed, MAIL_HOST};

fn greeting(port: u16) -> std::io::Result<String> {
    let stream = TcpStream::connect_timeout(&(MAIL_HOST, port).into(), Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line)
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
