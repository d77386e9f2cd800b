//! Child processes that are never left behind.
//!
//! A `Tied` process dies with the process that started it: it gets a parent-death
//! signal, and is spawned from one long-lived keeper thread because the kernel sends that
//! signal when the spawning *thread* exits (libtest runs each test on a short-lived
//! thread). A `Detached` process lives in its own session for `testbed up`, and its pid
//! file lets `testbed down` stop it later. Every process leads its own process group, so
//! stopping it also stops whatever it forked (Dovecot's children).

use std::fs::{self, OpenOptions};
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Whether a process dies with this one or outlives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifetime {
    Tied,
    Detached,
}

/// A started child, stopped on `stop()` and, when tied, on drop.
pub struct Proc {
    name: String,
    pid: i32,
    start_time: u64,
    child: Option<Child>,
    lifetime: Lifetime,
}

impl Proc {
    /// Starts `command` with stdout and stderr appended to `log` and, if given, its pid
    /// written to `pid_file`. `death_signal` is what a tied process gets if this process
    /// dies without stopping it.
    pub fn spawn(
        name: &str,
        mut command: Command,
        log: &Path,
        pid_file: Option<&Path>,
        lifetime: Lifetime,
        death_signal: libc::c_int,
    ) -> Result<Proc> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = out.try_clone()?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let parent = std::process::id() as libc::pid_t;
        let tied = lifetime == Lifetime::Tied;
        // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
        // functions (setsid, prctl, getppid) without allocating.
        unsafe {
            command.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                if tied {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, death_signal as libc::c_ulong) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // The parent may have died before prctl took effect.
                    if libc::getppid() != parent {
                        return Err(io::Error::from_raw_os_error(libc::ESRCH));
                    }
                }
                Ok(())
            });
        }
        let program = command.get_program().to_string_lossy().into_owned();
        let child = match lifetime {
            Lifetime::Tied => spawn_on_keeper(command),
            Lifetime::Detached => command.spawn(),
        }
        .with_context(|| format!("starting {name} ({program})"))?;
        let pid = child.id() as i32;
        let start_time = stat(pid).map(|s| s.start_time).unwrap_or(0);
        if let Some(pid_file) = pid_file {
            fs::write(pid_file, format!("{pid} {start_time}\n"))
                .with_context(|| format!("writing {}", pid_file.display()))?;
        }
        Ok(Proc {
            name: name.to_string(),
            pid,
            start_time,
            child: Some(child),
            lifetime,
        })
    }

    /// Why the process is no longer running, or `None` while it runs.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(status))) => Some(format!("{} exited: {status}", self.name)),
            Some(Ok(None)) => None,
            Some(Err(e)) => Some(format!("{} cannot be waited for: {e}", self.name)),
            None if alive(self.pid, Some(self.start_time)) => None,
            None => Some(format!("{} is gone", self.name)),
        }
    }

    /// SIGTERM, then after `grace` SIGKILL to the whole group; returns once nothing of
    /// the group is left.
    pub fn stop(&mut self, grace: Duration) {
        let mut child = self.child.take();
        let (pid, start) = (self.pid, self.start_time);
        terminate(pid, grace, &mut || match child.as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => !alive(pid, Some(start)),
        });
        if let Some(mut c) = child {
            let _ = c.wait();
        }
    }

    /// Forgets a detached process so that dropping this handle leaves it running.
    pub fn release(mut self) {
        self.child = None;
        self.lifetime = Lifetime::Detached;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.lifetime == Lifetime::Tied && self.child.is_some() {
            self.stop(Duration::from_secs(3));
        }
    }
}

/// Stops the process recorded in `pid_file` (as written by `Proc::spawn`) and its group.
/// A pid that now belongs to another process is left alone.
pub fn stop_recorded(pid_file: &Path, grace: Duration) -> Result<()> {
    let text =
        fs::read_to_string(pid_file).with_context(|| format!("reading {}", pid_file.display()))?;
    let (pid, start) = parse_pid_file(&text)
        .with_context(|| format!("{} is not `PID STARTTIME`", pid_file.display()))?;
    if alive(pid, Some(start)) {
        terminate(pid, grace, &mut || !alive(pid, Some(start)));
    } else {
        // The leader is gone; children it left in its group may still run, unless the pid
        // now leads an unrelated group.
        let reused = stat(pid).is_some_and(|s| s.start_time != start && s.pgrp == pid);
        if !reused {
            kill_group_leftovers(pid);
        }
    }
    Ok(())
}

/// Records this process in `pid_file`, in the format `stop_recorded` reads.
pub fn record_self(pid_file: &Path) -> Result<()> {
    let pid = std::process::id() as i32;
    let start = stat(pid).map(|s| s.start_time).unwrap_or(0);
    fs::write(pid_file, format!("{pid} {start}\n"))
        .with_context(|| format!("writing {}", pid_file.display()))
}

/// Whether the process recorded in `pid_file` still runs.
pub fn recorded_alive(pid_file: &Path) -> bool {
    fs::read_to_string(pid_file)
        .ok()
        .and_then(|t| parse_pid_file(&t))
        .is_some_and(|(pid, start)| alive(pid, Some(start)))
}

fn parse_pid_file(text: &str) -> Option<(i32, u64)> {
    let mut it = text.split_whitespace();
    let pid = it.next()?.parse().ok()?;
    let start = it.next()?.parse().ok()?;
    Some((pid, start))
}

fn terminate(pid: i32, grace: Duration, gone: &mut dyn FnMut() -> bool) {
    if pid <= 1 {
        return;
    }
    // SAFETY: plain kill(2) on a pid we started; pid > 1 so never a broadcast.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    if !poll(grace, Duration::from_millis(20), &mut *gone) {
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        unsafe { libc::kill(pid, libc::SIGKILL) };
        poll(Duration::from_secs(5), Duration::from_millis(20), gone);
    }
    kill_group_leftovers(pid);
}

/// SIGKILLs what is left of the process group `pgid` and waits until it is gone,
/// zombies included: those that are this process's children (see `become_subreaper`)
/// are reaped here, others are left to init for a moment, so that `ps` shows nothing.
fn kill_group_leftovers(pgid: i32) {
    if pgid <= 1 {
        return;
    }
    if !group_members(pgid, false).is_empty() {
        // SAFETY: negative pid addresses the group this bed created with setsid.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
    poll(
        Duration::from_secs(3),
        Duration::from_millis(20),
        &mut || {
            let members = group_members(pgid, true);
            for &pid in &members {
                // SAFETY: reaps only members of the bed's own group; ECHILD for the others.
                unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
            }
            members.is_empty() || group_members(pgid, true).is_empty()
        },
    );
}

/// Makes this process adopt orphaned descendants (Dovecot's children when their master
/// exits first) instead of init, so that `kill_group_leftovers` can reap them at once.
pub fn become_subreaper() {
    // SAFETY: prctl with a flag value; failure only leaves reaping to init.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong) };
}

/// Calls `done` every `interval` until it says yes or `limit` passes.
pub fn poll(limit: Duration, interval: Duration, done: &mut dyn FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(interval);
    }
}

struct Stat {
    state: char,
    pgrp: i32,
    start_time: u64,
}

fn stat(pid: i32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces; fields follow the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// Running (not a zombie) and, if given, started at `start_time`.
fn alive(pid: i32, start_time: Option<u64>) -> bool {
    stat(pid).is_some_and(|s| {
        !matches!(s.state, 'Z' | 'X') && start_time.is_none_or(|t| t == s.start_time)
    })
}

/// The processes in group `pgid`, with or without zombies.
fn group_members(pgid: i32, with_zombies: bool) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            stat(pid)
                .is_some_and(|s| s.pgrp == pgid && (with_zombies || !matches!(s.state, 'Z' | 'X')))
        })
        .collect()
}

struct SpawnRequest {
    command: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

/// Spawns on the keeper thread, which lives as long as this process, so that the
/// parent-death signal fires when the process ends and not when a test's thread does.
fn spawn_on_keeper(command: Command) -> io::Result<Child> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("testbed-keeper".into())
            .spawn(move || {
                for mut request in rx {
                    let _ = request.reply.send(request.command.spawn());
                }
            })
            .expect("starting the test bed's keeper thread");
        Mutex::new(tx)
    });
    let (reply, answer) = mpsc::channel();
    keeper
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(SpawnRequest { command, reply })
        .map_err(|_| io::Error::other("the test bed's keeper thread is gone"))?;
    answer
        .recv()
        .map_err(|_| io::Error::other("the test bed's keeper thread is gone"))?
}

/// A port on `ip` that nothing listens on now and that this process has not handed out
/// before (the same race every envtest-like harness accepts). Taken below the kernel's
/// ephemeral range (`ip_local_port_range`), where no outgoing connection gets its source
/// port: a server restarted on its port (Dovecot, etcd, kube-apiserver) found it held by
/// some client's connection now and then ("Address already in use"), which a port the
/// kernel handed out for `bind(0)` is exposed to.
pub fn free_port(ip: Ipv4Addr) -> Result<u16> {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let (low, high) = (10_000, ephemeral_low().max(10_001));
    let random = ring::rand::SystemRandom::new();
    for _ in 0..500 {
        let mut bytes = [0u8; 2];
        ring::rand::SecureRandom::fill(&random, &mut bytes)
            .map_err(|_| anyhow::anyhow!("no randomness for a port"))?;
        let port = low + u16::from_le_bytes(bytes) % (high - low);
        if !given.contains(&port) && TcpListener::bind((ip, port)).is_ok() {
            given.push(port);
            return Ok(port);
        }
    }
    bail!("no free port found on {ip} between {low} and {high}")
}

/// The first port of the kernel's ephemeral range (32768 unless configured).
fn ephemeral_low() -> u16 {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// The last `lines` lines of a log file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("({} cannot be read: {e})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_lie_below_the_ephemeral_range_and_differ() {
        let ports: Vec<u16> = (0..20)
            .map(|_| free_port(Ipv4Addr::LOCALHOST).unwrap())
            .collect();
        for port in &ports {
            assert!((10_000..ephemeral_low()).contains(port), "{port}");
        }
        let mut unique = ports.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "{ports:?}");
    }
}
