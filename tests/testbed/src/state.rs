//! The bed described as data: `state.json` in the state folder (so a test process can
//! reuse a running `testbed up`) and the same facts as shell `export` lines.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::control_plane::ControlPlaneInfo;
use crate::dovecot::DovecotInfo;
use crate::oauth::OAuthKey;

pub const STATE_FILE: &str = "state.json";

/// Everything needed to use a running bed from another process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BedState {
    pub state_dir: PathBuf,
    pub pid_dir: PathBuf,
    pub control_plane: ControlPlaneInfo,
    /// By instance name: `main`, `self-signed`, `plain`.
    pub dovecots: BTreeMap<String, DovecotInfo>,
    pub oauth: OAuthKey,
}

impl BedState {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(STATE_FILE)
    }

    pub fn write(&self) -> Result<()> {
        let path = Self::path(&self.state_dir);
        let tmp = path.with_extension("json.new");
        fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }

    pub fn read(state_dir: &Path) -> Result<BedState> {
        let path = Self::path(state_dir);
        let bytes = fs::read(&path).with_context(|| {
            format!(
                "reading {}; is a bed up there (tests/testbed/testbed up)?",
                path.display()
            )
        })?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
    }

    /// `export NAME='value'` lines for a shell.
    pub fn env_lines(&self) -> String {
        let mut out = String::new();
        for (name, value) in self.env() {
            let _ = writeln!(out, "export {name}={}", shell_quote(&value));
        }
        out
    }

    /// The environment a human, the demo or a test script uses, in a stable order.
    pub fn env(&self) -> Vec<(String, String)> {
        let cp = &self.control_plane;
        let path = |p: &Path| p.display().to_string();
        let mut env = vec![
            ("MAILROOM_TESTBED_STATE".into(), path(&self.state_dir)),
            ("KUBECONFIG".into(), path(&cp.kubeconfig)),
            ("MAILROOM_KUBECTL".into(), path(&cp.kubectl)),
            ("MAILROOM_KUBE_SERVER".into(), cp.server_url.clone()),
        ];
        for (name, d) in &self.dovecots {
            // main → MAILROOM_IMAP_PORT; self-signed → MAILROOM_SELF_SIGNED_IMAP_PORT.
            let prefix = match name.as_str() {
                "main" => "MAILROOM_".to_string(),
                other => format!("MAILROOM_{}_", other.to_uppercase().replace('-', "_")),
            };
            let mut var =
                |suffix: &str, value: String| env.push((format!("{prefix}{suffix}"), value));
            var("MAIL_HOST", d.host.clone());
            var("IMAP_PORT", d.imap.to_string());
            var("POP3_PORT", d.pop3.to_string());
            if let Some(p) = d.imaps {
                var("IMAPS_PORT", p.to_string());
            }
            if let Some(p) = d.pop3s {
                var("POP3S_PORT", p.to_string());
            }
            if let Some(ca) = &d.ca_file {
                var("CA_FILE", path(ca));
            }
            var("DOVECOT_LOG", path(&d.log));
            let accounts: Vec<String> = d
                .accounts
                .iter()
                .map(|a| format!("{}:{}", a.user, a.password))
                .collect();
            var("ACCOUNTS", accounts.join(" "));
        }
        let o = &self.oauth;
        env.extend([
            ("MAILROOM_OAUTH2_KEY_FILE".into(), path(&o.key_file())),
            ("MAILROOM_OAUTH2_ALG".into(), o.alg.clone()),
            ("MAILROOM_OAUTH2_ISSUER".into(), o.issuer.clone()),
            ("MAILROOM_OAUTH2_AUDIENCE".into(), o.audience.clone()),
            (
                "MAILROOM_OAUTH2_USERNAME_CLAIM".into(),
                o.username_claim.clone(),
            ),
        ]);
        env
    }
}

fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_for_the_shell() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
