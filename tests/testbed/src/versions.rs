//! Where the bed's binaries live, read from `versions.sh` so that `prepare` and the bed
//! share one source of versions and cache paths.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

const VERSIONS_SH: &str = include_str!("../versions.sh");

/// The binaries the bed runs, and the cache folder `prepare` builds them into.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub cache_root: PathBuf,
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kubectl: PathBuf,
    /// For the chart's tests (helm lint, template, install into the bed).
    pub helm: PathBuf,
    /// For the chart's alert rules (`promtool test rules`).
    pub promtool: PathBuf,
    pub dovecot: PathBuf,
    pub k8s_version: String,
}

impl Binaries {
    /// Locates every binary and fails with the "not prepared" message if one is missing.
    pub fn locate() -> Result<Binaries> {
        let vars = parse(VERSIONS_SH, &|name| std::env::var(name).ok());
        let get = |key: &str| -> Result<String> {
            match vars.get(key) {
                Some(v) => Ok(v.clone()),
                None => bail!("tests/testbed/versions.sh does not define {key}"),
            }
        };
        let cache_root = PathBuf::from(get("CACHE_ROOT")?);
        let bins = Binaries {
            etcd: PathBuf::from(get("ETCD_BIN")?),
            kube_apiserver: PathBuf::from(get("KUBE_APISERVER_BIN")?),
            kubectl: PathBuf::from(get("KUBECTL_BIN")?),
            helm: PathBuf::from(get("HELM_BIN")?),
            promtool: PathBuf::from(get("PROMTOOL_BIN")?),
            dovecot: find_dovecot(),
            k8s_version: get("K8S_VERSION")?,
            cache_root,
        };
        for path in [
            &bins.etcd,
            &bins.kube_apiserver,
            &bins.kubectl,
            &bins.helm,
            &bins.promtool,
            &bins.dovecot,
        ] {
            if !is_executable(path) {
                bail!("{}", not_prepared(path, &bins.cache_root));
            }
        }
        Ok(bins)
    }
}

/// The one message every missing piece of the bed ends in.
pub fn not_prepared(missing: &Path, cache: &Path) -> String {
    format!(
        "the test bed is not prepared: {} is missing; run tests/testbed/prepare (installs Dovecot \
         and tinyproxy with apt-get and builds etcd, kube-apiserver, kubectl, helm and promtool with Go into {})",
        missing.display(),
        cache.display()
    )
}

/// Dovecot comes from Debian's package, in /usr/sbin, which a non-root PATH may lack.
fn find_dovecot() -> PathBuf {
    find_debian_binary("dovecot", Path::new("/usr/sbin/dovecot"))
}

/// A binary of a Debian package: on PATH, else where the package puts it.
pub fn find_debian_binary(name: &str, installed: &Path) -> PathBuf {
    let from_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p));
    from_path.unwrap_or_else(|| installed.to_path_buf())
}

/// Whether `path` is an executable file.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Parses the `KEY=VALUE` lines of a shell file, expanding `$VAR`, `${VAR}` and
/// `${VAR:-default}` from earlier lines first and then from `env`.
pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> HashMap<String, String> {
    let mut vars: HashMap<String, String> = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let value = value.trim_matches('"');
        let lookup = |name: &str| vars.get(name).cloned().or_else(|| env(name));
        let expanded = expand(value, &lookup);
        vars.insert(key.to_string(), expanded);
    }
    vars
}

fn expand(value: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        rest = &rest[pos + 1..];
        if let Some(braced) = rest.strip_prefix('{') {
            let Some(end) = matching_brace(braced) else {
                out.push('$');
                continue;
            };
            let inner = &braced[..end];
            rest = &braced[end + 1..];
            match inner.split_once(":-") {
                Some((name, default)) => match lookup(name).filter(|v| !v.is_empty()) {
                    Some(v) => out.push_str(&v),
                    None => out.push_str(&expand(default, lookup)),
                },
                None => out.push_str(&lookup(inner).unwrap_or_default()),
            }
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            if end == 0 {
                out.push('$');
                continue;
            }
            out.push_str(&lookup(&rest[..end]).unwrap_or_default());
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    out
}

/// The index of the `}` closing a `${`, allowing nested `${...}` in defaults.
fn matching_brace(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return Some(i),
            '}' => depth -= 1,
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn expands_cache_root_from_home_by_default() {
        let vars = parse(VERSIONS_SH, &env_of(&[("HOME", "/home/u")]));
        assert_eq!(vars["CACHE_ROOT"], "/home/u/.cache/mailroom-testbed");
        assert!(
            vars["KUBECTL_BIN"].starts_with("/home/u/.cache/mailroom-testbed/k8s-v1."),
            "{}",
            vars["KUBECTL_BIN"]
        );
        assert!(vars["ETCD_BIN"].ends_with("/etcd"));
        assert!(
            vars["HELM_BIN"].starts_with("/home/u/.cache/mailroom-testbed/helm-v3."),
            "{}",
            vars["HELM_BIN"]
        );
        assert!(
            vars["PROMTOOL_BIN"].starts_with("/home/u/.cache/mailroom-testbed/prometheus-v0."),
            "{}",
            vars["PROMTOOL_BIN"]
        );
    }

    #[test]
    fn honours_mailroom_testbed_cache() {
        let vars = parse(
            VERSIONS_SH,
            &env_of(&[("HOME", "/home/u"), ("MAILROOM_TESTBED_CACHE", "/c")]),
        );
        assert_eq!(vars["CACHE_ROOT"], "/c");
        assert!(vars["KUBE_APISERVER_BIN"].starts_with("/c/k8s-v1."));
    }

    #[test]
    fn expands_braces_and_leaves_lone_dollars() {
        let vars = parse(
            "A=x\nB=${A}y$A-$\nC=\"${UNSET:-${A}z}\"\n# D=1\n",
            &env_of(&[]),
        );
        assert_eq!(vars["B"], "xyx-$");
        assert_eq!(vars["C"], "xz");
        assert!(!vars.contains_key("D"));
    }

    #[test]
    fn message_names_path_and_cache() {
        let msg = not_prepared(Path::new("/c/etcd"), Path::new("/c"));
        assert_eq!(
            msg,
            "the test bed is not prepared: /c/etcd is missing; run tests/testbed/prepare (installs \
             Dovecot and tinyproxy with apt-get and builds etcd, kube-apiserver, kubectl, helm and promtool with Go \
             into /c)"
        );
    }
}
