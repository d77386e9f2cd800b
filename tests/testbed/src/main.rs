//! `testbed up | env | down [--state-dir DIR]`: the bed for humans and the demo.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use mailroom_testbed::{Bed, BedState};

const USAGE: &str = "usage: testbed <up|env|down> [--state-dir DIR]

  up     start etcd, kube-apiserver and Dovecot in the background, print the
         environment (export lines) once everything is ready
  env    print the environment of the running bed
  down   stop the bed's processes and remove its state folder

The state folder defaults to the repository's .testbed/.";

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("testbed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Vec<String>) -> Result<()> {
    let (command, state_dir) = parse(&args)?;
    match command.as_str() {
        "up" => {
            eprintln!("[testbed] starting in {}", state_dir.display());
            let bed = Bed::up(&state_dir)?;
            if let Some(t) = bed.started_in() {
                eprintln!("[testbed] ready in {:.1} s", t.as_secs_f64());
            }
            print!("{}", bed.env_lines());
            Ok(())
        }
        "env" => {
            let state = BedState::read(&state_dir)?;
            print!("{}", state.env_lines());
            Ok(())
        }
        "down" => {
            Bed::down(&state_dir)?;
            eprintln!("[testbed] stopped; removed {}", state_dir.display());
            Ok(())
        }
        other => bail!("unknown command {other:?}\n{USAGE}"),
    }
}

fn parse(args: &[String]) -> Result<(String, PathBuf)> {
    let mut command = None;
    let mut state_dir = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--state-dir" => {
                let dir = it.next().context("--state-dir needs a folder")?;
                state_dir = Some(PathBuf::from(dir));
            }
            s if s.starts_with("--state-dir=") => {
                state_dir = Some(PathBuf::from(&s["--state-dir=".len()..]));
            }
            s if command.is_none() && !s.starts_with('-') => command = Some(s.to_string()),
            s => bail!("unexpected argument {s:?}\n{USAGE}"),
        }
    }
    let command = command.with_context(|| USAGE.to_string())?;
    Ok((command, state_dir.unwrap_or_else(default_state_dir)))
}

/// The repository's `.testbed/` (git-ignored), found from this crate's folder.
fn default_state_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let repo = manifest.parent().and_then(Path::parent).unwrap_or(manifest);
    repo.join(".testbed")
}
