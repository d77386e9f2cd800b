//! The `mailroom` command line (also `kubectl mailroom` when installed as
//! `kubectl-mailroom`): `controller`, `crd`, `check`, `retest` and `authorize`.

mod authorize;
mod check;
mod logging;
mod retest;
mod schema;

use clap::{Parser, Subcommand};

pub use logging::LogFormat;

#[derive(Parser, Debug)]
#[command(
    name = "mailroom",
    version,
    about = "Keeps testing POP3 and IMAP mailboxes declared as IncomingMailProvider resources",
    // A flag given again wins (`--log=debug` after the chart's `--log=info` in extraArgs),
    // as with kubectl, instead of an error that crash-loops the pod.
    args_override_self = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the controller (in a cluster, or against the current kubeconfig).
    Controller(ControllerArgs),
    /// Print the IncomingMailProvider CustomResourceDefinition as YAML.
    Crd,
    /// Test a provider now, with your own kube credentials, and print every step.
    Check(check::CheckArgs),
    /// Sign in for an OAuth2 provider (browser or --device) and store its tokens.
    Authorize(authorize::AuthorizeArgs),
    /// Ask the controller to test providers now, and wait for its verdicts.
    Retest(retest::RetestArgs),
}

#[derive(clap::Args, Debug)]
pub struct ControllerArgs {
    /// Watch only these namespaces (repeat, or comma-separate); all when absent.
    #[arg(
        long = "namespace",
        short = 'n',
        env = "MAILROOM_NAMESPACES",
        value_delimiter = ','
    )]
    pub namespaces: Vec<String>,
    /// The kubeconfig file to use, outside a cluster (default: the files $KUBECONFIG lists
    /// that exist, else ~/.kube/config, else the pod's in-cluster configuration).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
    /// Tests running at once, in total (each until its status is written).
    #[arg(long, env = "MAILROOM_CONCURRENCY", default_value_t = 32)]
    pub concurrency: usize,
    /// Tests running at once against one mail host.
    #[arg(long, env = "MAILROOM_PER_HOST_CONCURRENCY", default_value_t = 8)]
    pub per_host_concurrency: usize,
    /// Log format.
    #[arg(long, env = "MAILROOM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (tracing's EnvFilter syntax, e.g. info or mailroom=debug).
    #[arg(long, env = "MAILROOM_LOG", default_value = "info")]
    pub log: String,
    /// Address of /metrics, /healthz and /readyz: :PORT for every address (IPv6 and
    /// IPv4), IP:PORT for one (127.0.0.1:8080, [::1]:8080); "off" serves nothing; port 0
    /// picks one.
    #[arg(long, env = "MAILROOM_METRICS_ADDR", default_value = ":8080")]
    pub metrics_addr: String,
    /// Per-provider metric series (namespace and name as labels); off by default to keep
    /// the number of series small.
    #[arg(long, env = "MAILROOM_PER_PROVIDER_METRICS")]
    pub per_provider_metrics: bool,
    /// Let providers' OAuth2 token endpoints be this pod's own loopback (an identity
    /// provider in a sidecar). Off: the controller refuses them, since whoever may edit a
    /// provider could otherwise POST to a sidecar's admin port (a service mesh's proxy
    /// stops at `/quitquitquit`), which no NetworkPolicy guards.
    #[arg(long, env = "MAILROOM_ALLOW_OAUTH2_LOOPBACK")]
    pub allow_oauth2_loopback: bool,
    /// Test only while holding a Lease, so that of several replicas exactly one tests.
    #[arg(long, env = "MAILROOM_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// The Lease's name.
    #[arg(long, env = "MAILROOM_LEASE_NAME", default_value = "mailroom")]
    pub lease_name: String,
    /// The Lease's namespace; the pod's own (POD_NAMESPACE) or the kubeconfig's when absent.
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// How long the Lease holds without renewal (seconds, or 15s, 1m): a dead leader's
    /// Lease expires after it, then a standby takes it, syncs its caches and tests.
    #[arg(long, env = "MAILROOM_LEASE_DURATION", default_value = "15", value_parser = seconds)]
    pub lease_duration: u64,
    /// This replica's shard (0-based) when providers are split over several replicas.
    #[arg(long, env = "MAILROOM_SHARD_INDEX", default_value_t = 0)]
    pub shard_index: u32,
    /// How many shards the providers are split into, each tested by its own replica (and
    /// Lease); every provider belongs to exactly one, by a stable hash of namespace/name
    /// (of its token Secret's for an OAuth2 provider, so that one shard refreshes it).
    #[arg(long, env = "MAILROOM_SHARD_COUNT", default_value_t = 1)]
    pub shard_count: u32,
    /// The pod's terminationGracePeriodSeconds (seconds, or 30s, 1m): on SIGTERM, tests in
    /// flight get a third of it, storing kept OAuth2 tokens a sixth, releasing the Lease a
    /// third, so the process exits before the kubelet kills it.
    #[arg(long, env = "MAILROOM_TERMINATION_GRACE_PERIOD", default_value = "30", value_parser = seconds)]
    pub termination_grace_period: u64,
    /// How long one request to the API server may go unanswered (seconds, or 30s, 1m)
    /// before it is dropped and tried again on a new connection; watches are not bound by
    /// it. 0: for ever.
    #[arg(long, env = "MAILROOM_REQUEST_TIMEOUT", default_value = "60", value_parser = seconds)]
    pub request_timeout: u64,
}

/// The command line; usage and help name the command as it was run, so a kubectl plugin
/// user reads `kubectl mailroom`, not the file name `kubectl-mailroom`.
fn parse() -> Cli {
    use clap::{CommandFactory as _, FromArgMatches as _};
    let invoked = std::env::args_os().next().and_then(|a| {
        std::path::Path::new(&a)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
    });
    let mut command = Cli::command();
    if invoked.as_deref() == Some("kubectl-mailroom") {
        command = command.bin_name("kubectl mailroom");
        let _ = crate::COMMAND_NAME.set("kubectl mailroom");
    }
    Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit())
}

/// Runs the command line; returns the process exit code.
pub async fn main() -> anyhow::Result<i32> {
    let cli = parse();
    match cli.command {
        Command::Crd => {
            print!("{}", crd_yaml());
            Ok(0)
        }
        Command::Controller(args) => {
            logging::init(args.log_format, &args.log)?;
            let (config, proxied) = KubeArgs {
                kubeconfig: args.kubeconfig.clone(),
                context: args.context.clone(),
                request_timeout: 0,
            }
            .config()
            .await?;
            let client =
                controller_client(without_env_proxy(config, proxied), args.request_timeout)?;
            let metrics_addr = match args.metrics_addr.as_str() {
                "" | "off" => None,
                addr => Some(
                    addr.parse::<crate::controller::ListenAddr>()
                        .map_err(|e| anyhow::anyhow!("--metrics-addr {e}"))?,
                ),
            };
            // Renewed at half its duration, and paused an eighth before it ends: a second
            // leaves nothing to renew in.
            if args.leader_election && args.lease_duration < 2 {
                anyhow::bail!(
                    "--lease-duration {}s: give at least 2s (15s unless set)",
                    args.lease_duration
                );
            }
            let shard = crate::controller::shard::Shard::new(args.shard_index, args.shard_count)
                .map_err(|e| anyhow::anyhow!(e))?;
            let lease = args
                .leader_election
                .then(|| crate::controller::LeaseSettings {
                    // Each shard elects its own replica.
                    name: if shard.count > 1 {
                        format!("{}-shard-{}", args.lease_name, shard.index)
                    } else {
                        args.lease_name.clone()
                    },
                    namespace: args
                        .lease_namespace
                        .clone()
                        .unwrap_or_else(|| client.default_namespace().to_string()),
                    identity: identity(),
                    duration: std::time::Duration::from_secs(args.lease_duration),
                });
            let settings = crate::controller::Settings {
                namespaces: args.namespaces,
                concurrency: args.concurrency,
                per_host: args.per_host_concurrency,
                metrics_addr,
                per_provider_metrics: args.per_provider_metrics,
                oauth2_loopback: args.allow_oauth2_loopback,
                lease,
                shard,
                stopping: crate::controller::Stopping::within(std::time::Duration::from_secs(
                    args.termination_grace_period,
                )),
            };
            crate::controller::run(client, settings).await?;
            Ok(0)
        }
        Command::Check(args) => check::run(args).await,
        Command::Authorize(args) => authorize::run(args).await,
        Command::Retest(args) => retest::run(args).await,
    }
}

/// Which cluster to talk to, with kubectl's flags: as `kubectl mailroom`, the user types
/// them as they would for kubectl.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct KubeArgs {
    /// The kubeconfig file to use (default: the files $KUBECONFIG lists that exist, else
    /// ~/.kube/config).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
    /// How long to wait for the API server, connecting or for an answer, before giving
    /// up (seconds, or 30s, 1m; 0: for ever), as kubectl's flag of the same name.
    #[arg(long, value_name = "DURATION", default_value = "30", value_parser = seconds)]
    pub request_timeout: u64,
}

impl KubeArgs {
    /// The caller's client: kube's usual search (kubeconfig, then in-cluster) unless a
    /// file or a context is named.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        use anyhow::Context as _;
        let (mut config, proxied) = self.config().await?;
        // The bound is on the connection (connecting, TLS, each wait for bytes once the
        // request is written), below the kubeconfig's credential plugin: a sign-in in a
        // browser that the plugin waits for is not cut short by it.
        if self.request_timeout > 0 {
            let _ = REQUEST_TIMEOUT.set(self.request_timeout);
            let bound = std::time::Duration::from_secs(self.request_timeout);
            config.connect_timeout = Some(config.connect_timeout.map_or(bound, |t| t.min(bound)));
            config.write_timeout = Some(config.write_timeout.map_or(bound, |t| t.min(bound)));
            config.read_timeout = Some(bound);
            config.reset_reader_on_write = true;
        }
        kube::Client::try_from(without_env_proxy(config, proxied)).with_context(|| match proxied {
            true => "connecting to the cluster (the kubeconfig gives it a proxy-url, which mailroom does not support: it reaches the API server directly)",
            false => "connecting to the cluster",
        })
    }

    /// The configuration the flags name (kube's usual search unless a file or a context
    /// is named), and whether the kubeconfig gives the cluster a `proxy-url`.
    pub async fn config(&self) -> anyhow::Result<(kube::Config, bool)> {
        use anyhow::Context as _;
        use kube::config::{Config, KubeConfigOptions, Kubeconfig};
        let options = KubeConfigOptions {
            context: self.context.clone(),
            ..Default::default()
        };
        // KUBECONFIG is read only when no file is named.
        let named = match &self.kubeconfig {
            Some(path) => Some(
                Kubeconfig::read_from(path)
                    .with_context(|| format!("reading --kubeconfig {}", path.display()))?,
            ),
            None => kubeconfig_files()?,
        };
        // Whether the kubeconfig names a proxy for the cluster (see without_env_proxy).
        let proxied;
        let config = match (named, &self.context) {
            (None, None) => {
                let inferred;
                (inferred, proxied) = infer_config()
                    .await
                    .context("loading the kubeconfig (or the in-cluster configuration)")?;
                inferred
            }
            (named, context) => {
                let file = match named {
                    Some(file) => file,
                    None => Kubeconfig::read().context("reading the kubeconfig")?,
                };
                proxied = names_proxy(&file, context.as_deref());
                if let Some(context) = context
                    && !file.contexts.iter().any(|c| &c.name == context)
                {
                    let known: Vec<&str> = file.contexts.iter().map(|c| c.name.as_str()).collect();
                    anyhow::bail!(
                        "--context {context:?} is not in the kubeconfig (its contexts: {})",
                        known.join(", ")
                    );
                }
                Config::from_custom_kubeconfig(file, &options)
                    .await
                    .map_err(|e| proxy_env_named(e, proxied))
                    .context("loading the kubeconfig")?
            }
        };
        let _ = CLUSTER.set(config.cluster_url.to_string());
        Ok((config, proxied))
    }
}

/// The controller's client: each request bounded by `timeout_secs` (0: unbounded) up to
/// its answer's head. A connection to an API server that went away without closing it (a
/// node lost behind a load balancer) otherwise holds a status write or a Lease renewal
/// until the kernel gives up on it, many minutes later, or for ever on a peer that keeps
/// the socket open. A watch's head comes at once and its stream is not bounded by this;
/// kube's watcher restarts a silent one itself.
pub fn controller_client(config: kube::Config, timeout_secs: u64) -> anyhow::Result<kube::Client> {
    let builder = kube::client::ClientBuilder::try_from(config)?;
    Ok(match timeout_secs {
        0 => builder.build(),
        secs => builder
            .with_layer(&tower::timeout::TimeoutLayer::new(
                std::time::Duration::from_secs(secs),
            ))
            .build(),
    })
}

/// The API server is reached directly whatever `HTTPS_PROXY` says: that variable is for
/// the OAuth2 token requests (credentials::proxy). kube, built without proxy support,
/// takes it for the API server from a kubeconfig (not in a pod) and then refuses to
/// start; its NO_PROXY matching (5.0) looks at the proxy's URL, not the server's. A
/// kubeconfig's own `proxy-url` (`proxied`) is kept, and refused by kube as before.
fn without_env_proxy(mut config: kube::Config, proxied: bool) -> kube::Config {
    if !proxied {
        config.proxy_url = None;
    }
    config
}

/// `error`, naming the variable when it is kube's refusal of an `HTTPS_PROXY` it cannot
/// parse (the kubeconfig names no `proxy-url`: not `proxied`): kube reads the variable
/// while loading a kubeconfig (not in a pod), and said only "failed to parse proxy url",
/// which sent people looking for a proxy in their kubeconfig. The value is not quoted: it
/// may hold the proxy's password.
fn proxy_env_named(
    error: impl std::error::Error + Send + Sync + 'static,
    proxied: bool,
) -> anyhow::Error {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    let mut from_proxy_url = false;
    while let Some(e) = cause {
        from_proxy_url |= matches!(
            e.downcast_ref::<kube::config::KubeconfigError>(),
            Some(kube::config::KubeconfigError::ParseProxyUrl(_))
        );
        cause = e.source();
    }
    let env = ["HTTPS_PROXY", "https_proxy"]
        .into_iter()
        .find(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
    match (from_proxy_url && !proxied, env) {
        (true, Some(var)) => anyhow::Error::new(error).context(format!(
            "{var} is not a URL (kube reads it while loading a kubeconfig, though mailroom sends only OAuth2 token requests through it): write it as http://[user:password@]host:port, with reserved characters of the password percent-encoded"
        )),
        _ => anyhow::Error::new(error),
    }
}

/// kube's usual configuration (the kubeconfig, else in-cluster), and whether the
/// kubeconfig gives the cluster a `proxy-url` (see [`without_env_proxy`]).
async fn infer_config() -> anyhow::Result<(kube::Config, bool)> {
    let proxied = kube::config::Kubeconfig::read()
        .ok()
        .is_some_and(|file| names_proxy(&file, None));
    let config = kube::Config::infer()
        .await
        .map_err(|e| proxy_env_named(e, proxied))?;
    Ok((config, proxied))
}

/// Whether the kubeconfig's context (`context`, else its current one) gives its cluster
/// a `proxy-url`.
fn names_proxy(file: &kube::config::Kubeconfig, context: Option<&str>) -> bool {
    let Some(context) = context.or(file.current_context.as_deref()) else {
        return false;
    };
    let Some(cluster) = file
        .contexts
        .iter()
        .find(|c| c.name == context)
        .and_then(|c| c.context.as_ref())
    else {
        return false;
    };
    file.clusters
        .iter()
        .find(|c| c.name == cluster.cluster)
        .and_then(|c| c.cluster.as_ref())
        .is_some_and(|c| c.proxy_url.is_some())
}

/// The files `KUBECONFIG` lists, merged as kubectl merges them, skipping those that do not
/// exist as kubectl does (kube alone refuses the whole list); `None` without the variable,
/// or with it empty.
fn kubeconfig_files() -> anyhow::Result<Option<kube::config::Kubeconfig>> {
    use anyhow::Context as _;
    use kube::config::Kubeconfig;
    // Empty (`KUBECONFIG=${KUBECONFIG:-}` in a CI template) is unset, as for kubectl.
    let Some(list) = std::env::var_os("KUBECONFIG").filter(|l| !l.is_empty()) else {
        return Ok(None);
    };
    let paths: Vec<_> = std::env::split_paths(&list)
        .filter(|p| !p.as_os_str().is_empty() && p.exists())
        .collect();
    if paths.is_empty() {
        anyhow::bail!(
            "none of the files KUBECONFIG lists exists: {}",
            list.to_string_lossy()
        );
    }
    let mut merged = Kubeconfig::default();
    for path in &paths {
        let file = Kubeconfig::read_from(path)
            .with_context(|| format!("reading {} (from KUBECONFIG)", path.display()))?;
        merged = merged
            .merge(file)
            .context("merging the files KUBECONFIG lists")?;
    }
    Ok(Some(merged))
}

/// A `--timeout`: seconds, or a duration as the provider's own fields take it (`90`,
/// `90s`, `2m`, `1h30m`); a fraction of a second counts as a whole one.
pub fn seconds(text: &str) -> Result<u64, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().map_err(|_| format!("{text:?}: too long"));
    }
    crate::api::parse_duration(text)
        .map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
        .map_err(|_| format!("{text:?}: give seconds or a duration such as 90s, 2m or 1h30m"))
}

/// A `--timeout` the command waits for (see [`seconds`]): at least a second, for 0 would
/// give up before asking anything.
pub fn wait_seconds(text: &str) -> Result<u64, String> {
    match seconds(text)? {
        0 => Err(format!(
            "{text:?}: at least 1s (the command waits for an answer)"
        )),
        secs => Ok(secs),
    }
}

/// The API server the command talks to, for an error that never reached it.
static CLUSTER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
/// The command's `--request-timeout`, for an error that is its expiry.
static REQUEST_TIMEOUT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// An error's text without the source excerpt a YAML parser appends (` --> <input>:7:8`
/// and the numbered lines around it): in a kubeconfig those lines are its tokens and keys,
/// which belong in no terminal or CI log. The line and column stay in the first line.
fn without_excerpt(text: &str) -> String {
    let excerpt = |line: &str| {
        let t = line.trim_start();
        t.starts_with("-->")
            || t.trim_start_matches(|c: char| c.is_ascii_digit())
                .trim_start()
                .starts_with('|')
    };
    match text.lines().position(excerpt) {
        Some(at) => text
            .lines()
            .take(at)
            .collect::<Vec<_>>()
            .join("\n")
            .trim_end()
            .to_string(),
        None => text.to_string(),
    }
}

/// The error as the command prints it: when the API server could not be reached at all,
/// which one, as kubectl says.
pub fn error_text(e: &anyhow::Error) -> String {
    let unreachable = e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<kube::Error>(),
            Some(kube::Error::Service(_) | kube::Error::HyperError(_))
        )
    });
    // Each cause once: kube's errors repeat their source in their own text. The API
    // server's refusal is its one-line message, as kubectl prints it, not kube's dump of
    // the whole Status object.
    let mut text = String::new();
    for cause in e.chain() {
        let part = match cause.downcast_ref::<kube::Error>() {
            // An empty message (a proxy's empty answer): the code and reason instead.
            Some(kube::Error::Api(status)) if status.message.trim().is_empty() => {
                format!("HTTP {} {}", status.code, status.reason)
            }
            Some(kube::Error::Api(status)) => status.message.clone(),
            _ if cause.downcast_ref::<Box<kube::core::Status>>().is_some()
                || cause.downcast_ref::<kube::core::Status>().is_some() =>
            {
                continue;
            }
            _ => without_excerpt(&cause.to_string()),
        };
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    let timed_out = e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
    });
    let within = match REQUEST_TIMEOUT.get() {
        Some(secs) if timed_out => format!(" within --request-timeout {secs}s"),
        _ => String::new(),
    };
    match CLUSTER.get() {
        Some(cluster) if unreachable => format!(
            "{text}\n(no answer from the API server at {cluster}{within}: check KUBECONFIG, --kubeconfig or --context)"
        ),
        _ => text,
    }
}

/// The caller's cluster (their kubeconfig) and the namespace to work in: `namespace`, else
/// the kubeconfig's.
async fn connect(
    kube: &KubeArgs,
    namespace: Option<&str>,
) -> anyhow::Result<(kube::Client, String)> {
    let client = kube.client().await?;
    let ns = namespace.map_or_else(|| client.default_namespace().to_string(), str::to_string);
    Ok((client, ns))
}

/// Who holds the Lease: the pod's name in a cluster, else host and process.
fn identity() -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    })
}

/// The CRD exactly as `crds/incomingmailprovider.yaml` holds it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let mut crd =
        serde_json::to_value(crate::api::IncomingMailProvider::crd()).expect("the CRD serializes");
    for_kubectl_explain(&mut crd);
    format!(
        "# Generated by `mailroom crd`; do not edit.\n{}",
        serde_yaml::to_string(&crd).expect("the CRD serializes")
    )
}

/// Field descriptions as `kubectl explain` prints them best: the doc comments' line
/// breaks joined (kubectl wraps text itself, and kept breaks made ragged lines), and a
/// field's default said in words (the schema's `default`, which explain does not show).
fn for_kubectl_explain(schema: &mut serde_json::Value) {
    match schema {
        serde_json::Value::Object(map) => {
            let default = map.get("default").and_then(|d| match d {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Number(n) => Some(n.to_string()),
                serde_json::Value::Bool(b) => Some(b.to_string()),
                _ => None,
            });
            if let Some(serde_json::Value::String(text)) = map.get_mut("description") {
                let mut joined = text
                    .split("\n\n")
                    .map(|paragraph| paragraph.split('\n').collect::<Vec<_>>().join(" "))
                    .collect::<Vec<_>>()
                    .join("\n\n");
                if let Some(default) = default
                    && !joined.to_lowercase().contains("default")
                {
                    joined.push_str(&format!(" Default: {default}."));
                }
                *text = joined;
            }
            for value in map.values_mut() {
                for_kubectl_explain(value);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(for_kubectl_explain),
        _ => {}
    }
}

/// The README's table of reasons, generated from the one enum that status uses.
pub fn reasons_table() -> String {
    let mut t = String::from("| reason | Ready | what to do |\n|---|---|---|\n");
    for r in crate::api::Reason::ALL {
        t.push_str(&format!(
            "| `{}` | {} | {} |\n",
            r.as_str(),
            r.ready_status(),
            r.hint()
        ));
    }
    t
}

#[cfg(test)]
mod excerpt_tests {
    #[test]
    fn a_yaml_error_loses_its_excerpt_and_keeps_where() {
        let text = "failed to parse kubeconfig YAML: error: line 7 column 8: unclosed bracket '['\n --> <input>:7:8\n  |\n5 |   user:\n6 |     token: sha256~SECRET\n7 |     x: [\n  |        ^ unclosed bracket '['";
        assert_eq!(
            super::without_excerpt(text),
            "failed to parse kubeconfig YAML: error: line 7 column 8: unclosed bracket '['"
        );
        let plain = "forbidden: User \"u\" cannot get secrets\nsecond line | kept";
        assert_eq!(super::without_excerpt(plain), plain);
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    #[test]
    fn an_api_servers_refusal_is_its_message_not_the_status_object() {
        let status = kube::core::Status {
            code: 403,
            message: r#"secrets "alice" is forbidden: User "vera" cannot get resource "secrets""#
                .into(),
            reason: "Forbidden".into(),
            ..Default::default()
        };
        let e = anyhow::Error::new(kube::Error::Api(Box::new(status)))
            .context("reading Secret ops/alice");
        assert_eq!(
            super::error_text(&e),
            r#"reading Secret ops/alice: secrets "alice" is forbidden: User "vera" cannot get resource "secrets""#
        );
    }

    #[test]
    fn an_empty_refusal_says_its_code() {
        let status = kube::core::Status {
            code: 502,
            reason: "Bad Gateway".into(),
            ..Default::default()
        };
        let e = anyhow::Error::new(kube::Error::Api(Box::new(status)))
            .context("reading IncomingMailProvider ops/x");
        assert_eq!(
            super::error_text(&e),
            "reading IncomingMailProvider ops/x: HTTP 502 Bad Gateway"
        );
    }

    #[test]
    fn timeouts_take_seconds_or_a_duration() {
        for (text, seconds) in [
            ("90", 90),
            ("90s", 90),
            ("2m", 120),
            ("1h", 3600),
            ("1m30s", 90),
            ("1.5m", 90),
            ("500ms", 1),
        ] {
            assert_eq!(super::seconds(text), Ok(seconds), "{text}");
        }
        for bad in ["", "m", "2 minutes", "2d", "-1", "1h 30m"] {
            assert!(super::seconds(bad).is_err(), "{bad}");
        }
        // What a command waits for: 0 would give up before asking.
        assert_eq!(super::wait_seconds("2m"), Ok(120));
        for zero in ["0", "0s"] {
            assert!(
                super::wait_seconds(zero)
                    .unwrap_err()
                    .contains("at least 1s")
            );
        }
        assert!(super::Cli::try_parse_from(["mailroom", "retest", "x", "--timeout", "0"]).is_err());
    }

    #[test]
    fn a_flag_given_again_wins_and_lists_still_add_up() {
        let cli = super::Cli::try_parse_from([
            "mailroom",
            "controller",
            "--log=info",
            "--metrics-addr=:8080",
            "--namespace=a",
            "--log=debug",
            "--metrics-addr=off",
            "-n",
            "b,c",
        ])
        .unwrap();
        let super::Command::Controller(args) = cli.command else {
            panic!("not the controller: {:?}", cli.command)
        };
        assert_eq!(args.log, "debug");
        assert_eq!(args.metrics_addr, "off");
        assert_eq!(args.namespaces, ["a", "b", "c"]);
    }

    fn repo_file(path: &str) -> String {
        let full = format!("{}/{path}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("reading {full}: {e}"))
    }

    #[test]
    fn the_crd_file_is_what_mailroom_crd_prints() {
        assert!(
            repo_file("crds/incomingmailprovider.yaml") == super::crd_yaml(),
            "crds/incomingmailprovider.yaml is stale: run `cargo run -q -- crd > crds/incomingmailprovider.yaml`"
        );
    }

    #[test]
    fn the_readme_documents_every_reason() {
        let readme = repo_file("README.md");
        let block = format!(
            "<!-- reasons:start -->\n{}<!-- reasons:end -->",
            super::reasons_table()
        );
        assert!(
            readme.contains(&block),
            "README.md's reason table differs from Reason::ALL; replace the block between the reasons markers with:\n{block}"
        );
    }
}
