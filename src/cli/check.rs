//! `mailroom check`: one test now, with the caller's kube credentials (or of a manifest
//! before it is applied), printing each step with its timing and the server's words.
//! Exit status 0 only if the provider would be Ready.

use std::io::{Read as _, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;

use crate::api::{IncomingMailProvider, Reason};
use crate::check::{self, Outcome};
use crate::controller::status::format_duration;
use crate::credentials::tokens::TokenSet;
use crate::credentials::{Fetched, ObjectKind, Reference, references};

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// The provider to test (omit with -f).
    pub name: Option<String>,
    /// Its namespace; the kubeconfig's namespace when absent.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    #[command(flatten)]
    pub kube: super::KubeArgs,
    /// Test the provider in a manifest instead (repeatable; a file, a directory of .yaml,
    /// .yml and .json files, or - for stdin). When the cluster can be reached, the API
    /// server first checks the provider against the CRD's rules (a dry-run create of the
    /// manifest alone, whether or not the provider exists).
    /// Secrets and ConfigMaps in the files are used first; the cluster supplies the rest
    /// when it can be reached. An OAuth2 token Secret from the files is used as it is,
    /// never refreshed.
    #[arg(long = "filename", short = 'f')]
    pub files: Vec<PathBuf>,
}

pub async fn run(args: CheckArgs) -> anyhow::Result<i32> {
    // A usage error is said as one, before any cluster is looked for.
    if args.files.is_empty() && args.name.is_none() {
        bail!("give a provider NAME, or -f FILE");
    }
    let client = args.kube.client().await;
    // With -f the cluster is optional, but not when named: a typo in --context must not
    // turn into SecretNotFound.
    if (args.kube.kubeconfig.is_some() || args.kube.context.is_some())
        && let Err(e) = &client
    {
        bail!("{}", super::error_text(e));
    }
    if args.files.is_empty() {
        let client = client
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{}", super::error_text(e)))?;
        let Some(name) = &args.name else {
            bail!("give a provider NAME, or -f FILE")
        };
        let ns = args
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string());
        let api: Api<IncomingMailProvider> = Api::namespaced(client.clone(), &ns);
        let p = read_provider(&api, client, &args.kube, &ns, name).await?;
        let fetched = Fetched {
            namespace: ns,
            ..Default::default()
        };
        return test_one(&args, &Ok(client.clone()), p, fetched, None).await;
    }
    let (providers, files) = from_files(&args)?;
    if let [(p, manifest)] = &providers[..] {
        return test_manifest(&args, &client, p, manifest, &files).await;
    }
    // Several (a directory, `kustomize build`): each tested as alone, then a summary; the
    // exit status is the worst of theirs.
    let mut worst = 0;
    let mut failed = Vec::new();
    let total = providers.len();
    for (i, (p, manifest)) in providers.iter().enumerate() {
        if i > 0 {
            println!();
        }
        let code = match test_manifest(&args, &client, p, manifest, &files).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {}", super::error_text(&e));
                2
            }
        };
        if code != 0 {
            failed.push(
                manifest["metadata"]["name"]
                    .as_str()
                    .unwrap_or("?")
                    .to_string(),
            );
        }
        worst = worst.max(code);
    }
    println!();
    println!(
        "{} of {total} IncomingMailProviders would be Ready{}",
        total - failed.len(),
        match failed.is_empty() {
            true => String::new(),
            false => format!("; not: {}", failed.join(", ")),
        }
    );
    Ok(worst)
}

/// One provider of the files: `provider` as mailroom reads it (or why it cannot), and
/// `manifest` as written.
async fn test_manifest(
    args: &CheckArgs,
    client: &anyhow::Result<kube::Client>,
    provider: &anyhow::Result<IncomingMailProvider>,
    manifest: &serde_json::Value,
    files: &Objects,
) -> anyhow::Result<i32> {
    match provider {
        Ok(p) => {
            let target = args.namespace.clone().unwrap_or_else(|| match client {
                Ok(c) => c.default_namespace().to_string(),
                Err(_) => "default".into(),
            });
            let fetched = place(p, files, args.namespace.as_deref(), &target)?;
            test_one(args, client, p.clone(), fetched, Some(manifest)).await
        }
        // What mailroom cannot read (`method: password`, a port in quotes), the API
        // server may refuse in its own words, all errors at once, as `kubectl apply`.
        Err(unreadable) => {
            let unreadable = anyhow::anyhow!("{unreadable:#}");
            unreadable_manifest(args, client, manifest, unreadable).await
        }
    }
}

/// Tests `provider` with the objects `fetched` holds (the files' ones, for a manifest)
/// and what the cluster adds, printing each step; 0 if it would be Ready.
async fn test_one(
    args: &CheckArgs,
    client: &anyhow::Result<kube::Client>,
    provider: IncomingMailProvider,
    mut fetched: Fetched,
    manifest: Option<&serde_json::Value>,
) -> anyhow::Result<i32> {
    // Whether the OAuth2 token Secret came from the files (after those placed in another
    // namespace are set aside, before the cluster adds any).
    let token_in_files = !args.files.is_empty()
        && token_secret(&provider).is_some_and(|name| fetched.secrets.contains_key(name));
    // A manifest is what `kubectl apply` would send: the API server says first whether it
    // would take it (schema, CEL rules, unknown fields), which the test cannot.
    if let Some(manifest) = &manifest
        && let Some(refusal) = refusal(client, &args.kube, &fetched.namespace, manifest).await
    {
        let label = format!("{}/{}", fetched.namespace, provider.name_any());
        let outcome = Outcome::before_connecting(&provider.spec, Reason::InvalidSpec, refusal);
        print_outcome(&mut std::io::stdout().lock(), &label, &outcome)?;
        return Ok(1);
    }
    for r in references(&provider.spec) {
        if fetched.meta(&r).is_some() {
            continue;
        }
        let client = match &client {
            Ok(client) => client,
            // Not SecretNotFound: nobody could look (a KUBECONFIG that names no file, say).
            Err(e) => bail!(
                "{} {} is not in the files, and the cluster could not be asked for it: {}",
                r.kind,
                r.name,
                super::error_text(e)
            ),
        };
        fetch_from_cluster(client, &r, &mut fetched).await?;
    }

    // OAuth2: the same fresh access token the controller would use (refreshing it, and
    // writing a rotated refresh token back, exactly as the controller does); but a token
    // Secret from the files is only used, never refreshed: the refresh would read and
    // write the cluster's copy, and the new tokens could be stored nowhere while a
    // rotating endpoint retires the file's refresh token.
    let mut tokens = None;
    let fetched = match &client {
        _ if token_in_files => Fetched {
            provider: provider.name_any(),
            token_problem: expired_file_token(&provider, &fetched),
            ..fetched
        },
        Ok(client) => match crate::credentials::tokens::TokenManager::new(client.clone()) {
            Ok(manager) => {
                // A person's test, from their machine: its loopback is theirs to use.
                let manager = manager.allowing_loopback();
                let fetched = manager.prepare_once(&provider, fetched).await;
                tokens = Some(manager);
                fetched
            }
            Err(_) => fetched,
        },
        Err(_) => Fetched {
            provider: provider.name_any(),
            ..fetched
        },
    };
    let label = format!("{}/{}", fetched.namespace, provider.name_any());
    let outcome = check::run(&provider.spec, &fetched).await;
    // A rotated refresh token that could not be stored would be lost with this process.
    let unstored = match &tokens {
        Some(manager) => manager.store_kept(Duration::from_secs(10)).await,
        None => Vec::new(),
    };
    let mut out = std::io::stdout().lock();
    print_outcome(&mut out, &label, &outcome)?;
    // The network is this machine's, not the controller's: a name only the cluster's DNS
    // knows, or a port only its pods may reach, fails here and works there.
    if matches!(
        outcome.reason,
        Reason::DnsResolutionFailed
            | Reason::ConnectionRefused
            | Reason::ConnectionTimedOut
            | Reason::NetworkUnreachable
            | Reason::Timeout
    ) {
        writeln!(
            out,
            "Note: this test ran from this machine, whose DNS and network may differ from the controller's; `{} retest {} -n {}` has the controller test it{}.",
            crate::command_name(),
            provider.name_any(),
            fetched.namespace,
            if manifest.is_some() {
                " once it is applied"
            } else {
                ""
            }
        )?;
    }
    for line in &unstored {
        eprintln!("error: {line}");
    }
    Ok(if outcome.is_ready() && unstored.is_empty() {
        0
    } else {
        1
    })
}

/// Reads the object `r` names into `fetched` (in its namespace) from the cluster, as the
/// caller; nothing when it does not exist (the test then says which is missing).
pub(super) async fn fetch_from_cluster(
    client: &kube::Client,
    r: &Reference,
    fetched: &mut Fetched,
) -> anyhow::Result<()> {
    let ns = &fetched.namespace;
    let reading = || format!("reading {} {ns}/{}", r.kind, r.name);
    match r.kind {
        ObjectKind::Secret => {
            let api = Api::<Secret>::namespaced(client.clone(), ns);
            if let Some(s) = api.get_opt(&r.name).await.with_context(reading)? {
                fetched.secrets.insert(r.name.clone(), s);
            }
        }
        ObjectKind::ConfigMap => {
            let api = Api::<ConfigMap>::namespaced(client.clone(), ns);
            if let Some(c) = api.get_opt(&r.name).await.with_context(reading)? {
                fetched.config_maps.insert(r.name.clone(), c);
            }
        }
    }
    Ok(())
}

/// The Secrets and ConfigMaps of the files, each as written (two of one name may live in
/// two namespaces).
#[derive(Default)]
struct Objects {
    secrets: Vec<Secret>,
    config_maps: Vec<ConfigMap>,
}

/// What `provider` finds of the files' objects where `kubectl apply -f` would put them
/// (their own namespace, else `-n`, else the context's: `target`): those in its namespace
/// (the last of a name, as applying the files leaves it). Refuses, as kubectl does, an
/// object that names a namespace other than `-n`.
fn place(
    provider: &IncomingMailProvider,
    files: &Objects,
    given: Option<&str>,
    target: &str,
) -> anyhow::Result<Fetched> {
    // Where each would land, the provider first (refused as kubectl would, before any
    // note about the others).
    let lands = |kind: &str, name: String, written: Option<String>| {
        landing(kind, &name, written.as_deref(), given, target).map(|lands| (lands, name))
    };
    let (ns, _) = lands(
        "IncomingMailProvider",
        provider.name_any(),
        provider.namespace(),
    )?;
    let secrets = (files.secrets.iter())
        .map(|s| Ok((lands("Secret", s.name_any(), s.namespace())?, s)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let config_maps = (files.config_maps.iter())
        .map(|c| Ok((lands("ConfigMap", c.name_any(), c.namespace())?, c)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut fetched = Fetched {
        namespace: ns.clone(),
        ..Default::default()
    };
    let refs = references(&provider.spec);
    // A provider uses only what lives in its own namespace; one of the files that it names
    // but that would be applied in another is said so.
    let ours = |kind: ObjectKind, (lands, name): &(String, String)| {
        if *lands != ns && refs.iter().any(|r| r.kind == kind && r.name == *name) {
            eprintln!(
                "note: {kind} {name} from the files would be applied in namespace {lands}, not the provider's {ns}: not used"
            );
        }
        *lands == ns
    };
    for (landed, s) in secrets {
        if ours(ObjectKind::Secret, &landed) {
            fetched.secrets.insert(landed.1, s.clone());
        }
    }
    for (landed, c) in config_maps {
        if ours(ObjectKind::ConfigMap, &landed) {
            fetched.config_maps.insert(landed.1, c.clone());
        }
    }
    Ok(fetched)
}

/// Where `kubectl apply -n GIVEN -f` puts an object of the files that names namespace
/// `written` (or none): there, else `-n`, else the context's (`target`, which is `-n`
/// when given); an object naming another namespace than `-n` is refused, as kubectl does.
fn landing(
    kind: &str,
    name: &str,
    written: Option<&str>,
    given: Option<&str>,
    target: &str,
) -> anyhow::Result<String> {
    match (written, given) {
        (Some(written), Some(given)) if written != given => bail!(
            "{kind} {name} in the files names namespace {written}, not -n {given}: kubectl apply -n {given} would refuse it"
        ),
        (written, _) => Ok(written.unwrap_or(target).to_string()),
    }
}

/// The OAuth2 token Secret a provider names, if it logs in with OAuth2.
fn token_secret(provider: &IncomingMailProvider) -> Option<&str> {
    crate::credentials::tokens::oauth2_of(provider).map(|o| o.token_secret_ref.name.as_str())
}

/// Why the token Secret from the files cannot be used as it is, if it cannot.
fn expired_file_token(
    provider: &IncomingMailProvider,
    fetched: &Fetched,
) -> Option<(Reason, String)> {
    let name = token_secret(provider)?;
    let tokens = TokenSet::from_secret(fetched.secrets.get(name)?);
    if tokens.access_valid(Timestamp::now()) {
        return None;
    }
    Some((
        Reason::AuthorizationRequired,
        format!(
            "the access token of Secret {name:?} in the files has expired or is missing, and `{cmd} check -f` does not refresh tokens from files; apply them and run `{cmd} check {}`, or leave the token Secret out of the files to use the cluster's",
            provider.name_any(),
            cmd = crate::command_name()
        ),
    ))
}

/// Why `manifest` would not be applied, if it would not: in the API server's words, or,
/// where it cannot be asked (no cluster, no right to create providers there), by the CRD's
/// schema checked here, with a note that its CEL rules were not.
async fn refusal(
    client: &anyhow::Result<kube::Client>,
    kube: &super::KubeArgs,
    namespace: &str,
    manifest: &serde_json::Value,
) -> Option<String> {
    if let Ok(client) = client {
        match refused_by_api_server(client, kube, namespace, manifest).await {
            ApiServer::Refused(words) => return Some(words),
            ApiServer::Took => return None,
            ApiServer::NotAsked => {}
        }
    } else {
        eprintln!("note: no cluster to check the manifest with");
    }
    eprintln!(
        "note: the manifest was checked against the CRD's schema here, not against its rules (x-kubernetes-validations); `kubectl apply --dry-run=server -f` checks both, once a cluster is reachable"
    );
    let found = super::schema::refusals(manifest);
    (!found.is_empty()).then(|| {
        format!(
            "the CRD's schema refuses this manifest (checked here, without the API server): {}",
            found.join("; ")
        )
    })
}

/// What the API server says of a manifest.
enum ApiServer {
    Refused(String),
    Took,
    /// It could not be asked (a note says why).
    NotAsked,
}

/// Whether the API server refuses the provider as `manifest` has it, alone: a dry-run
/// create, unknown fields refused (all of them named) as `kubectl apply` refuses them; its
/// words if it does. The API server validates a create (schema, CEL rules, admission)
/// before it looks whether the name is taken, so `AlreadyExists` means it took the
/// manifest. A server-side apply would validate the cluster's copy merged with the
/// manifest instead, keeping what other managers own (kubectl, Argo CD, Flux): a
/// `secretRef` that a provider moved to OAuth2 no longer has was kept and refused, and a
/// required field the manifest lacks was supplied. When it cannot be asked (no right to
/// create providers there, no CRD), a note says so.
async fn refused_by_api_server(
    client: &kube::Client,
    kube: &super::KubeArgs,
    namespace: &str,
    manifest: &serde_json::Value,
) -> ApiServer {
    use kube::Resource as _;
    // What a person writes: a manifest saved from the cluster (`kubectl get -o yaml`)
    // also carries what the API server sets, which a create must not send.
    let mut object = manifest.clone();
    if let Some(map) = object.as_object_mut() {
        map.remove("status");
    }
    if let Some(metadata) = object["metadata"].as_object_mut() {
        metadata.retain(|k, _| matches!(k.as_str(), "name" | "labels" | "annotations"));
        metadata.insert("namespace".into(), serde_json::Value::from(namespace));
    }
    let url = format!(
        "{}?dryRun=All&fieldValidation=Strict&fieldManager=mailroom-check",
        IncomingMailProvider::url_path(&(), Some(namespace))
    );
    let request = hyper::Request::post(url)
        .header("Content-Type", "application/json")
        .body(serde_json::to_vec(&object).expect("a JSON value serializes"))
        .expect("a request of a valid URL");
    match client.request_text(request).await {
        Ok(_) => ApiServer::Took,
        Err(kube::Error::Api(status)) if status.is_already_exists() => ApiServer::Took,
        // Invalid (422: schema, CEL rules), or undecodable (400: a field the schema does
        // not declare, with every such field named).
        Err(kube::Error::Api(status)) if matches!(status.code, 400 | 422) => ApiServer::Refused(
            format!("the API server refuses this manifest: {}", status.message),
        ),
        Err(e) => {
            let unserved = match &e {
                kube::Error::Api(status) if status.code == 404 => unserved(client, kube).await,
                _ => None,
            };
            eprintln!(
                "note: the manifest was not checked against the CRD's rules: {}",
                unserved.unwrap_or_else(|| super::error_text(&anyhow::Error::new(e)))
            );
            ApiServer::NotAsked
        }
    }
}

/// IncomingMailProvider `ns/name` as `api` reads it. A 404 says either that it is not
/// there or, when the cluster does not serve IncomingMailProviders at all (a kubeconfig's
/// context of another cluster: the API server answers a plain `404 page not found`), that,
/// naming the cluster and the ways out.
pub(super) async fn read_provider(
    api: &Api<IncomingMailProvider>,
    client: &kube::Client,
    kube: &super::KubeArgs,
    ns: &str,
    name: &str,
) -> anyhow::Result<IncomingMailProvider> {
    let reading = || format!("reading IncomingMailProvider {ns}/{name}");
    match api.get_opt(name).await {
        Ok(Some(p)) => return Ok(p),
        Ok(None) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(e) => return Err(anyhow::Error::new(e).context(reading())),
    }
    match unserved(client, kube).await {
        Some(unserved) => bail!("IncomingMailProvider {ns}/{name} cannot be read: {unserved}"),
        None => bail!("IncomingMailProvider {ns}/{name} not found"),
    }
}

/// Why the cluster has no IncomingMailProviders, if it does not serve them (their CRD is
/// not installed there): which cluster, and what to do. None when it serves them, or when
/// its discovery could not tell.
pub(super) async fn unserved(client: &kube::Client, kube: &super::KubeArgs) -> Option<String> {
    use kube::Resource as _;
    let answer = client
        .list_api_group_resources(&IncomingMailProvider::api_version(&()))
        .await;
    match serves(&answer) {
        Some(false) => Some(not_served(
            super::CLUSTER.get().map(String::as_str),
            context_name(kube).as_deref(),
        )),
        _ => None,
    }
}

/// Whether the API server serves IncomingMailProviders, from its discovery answer for their
/// group and version: a 404 (`404 page not found`, as for any path it does not serve) or a
/// list without them says no; None when the answer says neither (a refusal, no answer).
fn serves(
    answer: &Result<k8s_openapi::apimachinery::pkg::apis::meta::v1::APIResourceList, kube::Error>,
) -> Option<bool> {
    use kube::Resource as _;
    match answer {
        Ok(list) => Some(
            list.resources
                .iter()
                .any(|r| r.name == IncomingMailProvider::plural(&())),
        ),
        Err(kube::Error::Api(status)) if status.code == 404 => Some(false),
        Err(_) => None,
    }
}

/// The words for a cluster that does not serve IncomingMailProviders: the API server at
/// `cluster`, through kubeconfig context `context`, and the two ways out.
fn not_served(cluster: Option<&str>, context: Option<&str>) -> String {
    use kube::Resource as _;
    let place = match (context, cluster) {
        (Some(context), Some(cluster)) => format!("the cluster of context {context:?} ({cluster})"),
        (Some(context), None) => format!("the cluster of context {context:?}"),
        (None, Some(cluster)) => format!("the cluster at {cluster}"),
        (None, None) => "the cluster".to_string(),
    };
    format!(
        "{place} does not serve IncomingMailProviders ({}): their CRD is not installed there. If this is not the cluster meant, name another with --context (or --kubeconfig); if it is, install the CRD (`kubectl apply -f crds/` from mailroom's repository, or `{} crd | kubectl apply -f -`)",
        IncomingMailProvider::api_version(&()),
        crate::command_name()
    )
}

/// The kubeconfig context the command talks through: `--context`, else the current
/// context of the kubeconfig it read (none in a pod, with no kubeconfig).
fn context_name(kube: &super::KubeArgs) -> Option<String> {
    if let Some(context) = &kube.context {
        return Some(context.clone());
    }
    let file = match &kube.kubeconfig {
        Some(path) => kube::config::Kubeconfig::read_from(path).ok()?,
        None => match super::kubeconfig_files() {
            Ok(Some(file)) => file,
            _ => kube::config::Kubeconfig::read().ok()?,
        },
    };
    file.current_context
}

/// A provider of the files that mailroom cannot read (`unreadable`): the API server's
/// refusal of it as `InvalidSpec` (exit 1), or, where it would take it or cannot be
/// asked, mailroom's own error naming the field (exit 2).
async fn unreadable_manifest(
    args: &CheckArgs,
    client: &anyhow::Result<kube::Client>,
    manifest: &serde_json::Value,
    unreadable: anyhow::Error,
) -> anyhow::Result<i32> {
    let name = manifest["metadata"]["name"].as_str().unwrap_or_default();
    if name.is_empty() {
        return Err(unreadable);
    }
    let written = manifest["metadata"]["namespace"].as_str();
    let namespace = match client {
        Ok(client) => {
            let target = args
                .namespace
                .clone()
                .unwrap_or_else(|| client.default_namespace().to_string());
            landing(
                "IncomingMailProvider",
                name,
                written,
                args.namespace.as_deref(),
                &target,
            )?
        }
        Err(_) => (args.namespace.as_deref().or(written))
            .unwrap_or("default")
            .to_string(),
    };
    let Some(refusal) = refusal(client, &args.kube, &namespace, manifest).await else {
        return Err(unreadable);
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "Testing {namespace}/{name}: not tested")?;
    print_verdict(&mut out, Reason::InvalidSpec, &refusal)?;
    Ok(1)
}

/// The documents of one -f argument: a file, every .yaml, .yml and .json file of a
/// directory (in name order), or stdin for `-`, as `kubectl apply -f` reads them.
fn documents(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading stdin")?;
        return Ok(vec![("stdin".into(), text)]);
    }
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && p.extension()
                        .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
            })
            .collect();
        files.sort();
        return files.iter().map(|f| read_file(f)).collect();
    }
    Ok(vec![read_file(path)?])
}

fn read_file(path: &Path) -> anyhow::Result<(String, String)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok((path.display().to_string(), text))
}

/// A provider of the files: as mailroom reads it (or why it cannot), and as written.
type Written = (anyhow::Result<IncomingMailProvider>, serde_json::Value);

/// The providers of the files, each as mailroom reads it (or why it cannot) and as
/// written, for the API server to check (only the one named, when a NAME is given); and
/// the Secrets and ConfigMaps of the files.
fn from_files(args: &CheckArgs) -> anyhow::Result<(Vec<Written>, Objects)> {
    let mut providers = Vec::new();
    let mut fetched = Objects::default();
    for path in &args.files {
        for (source, text) in documents(path)? {
            for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
                let mut value = serde_yaml::Value::deserialize_from(doc)
                    .with_context(|| format!("{source}: document {} is not YAML", i + 1))?;
                // `<<: *defaults`, as kubectl's YAML reader expands it.
                expand_merge_keys(&mut value)
                    .map_err(|e| anyhow::anyhow!("{source}: document {}: {e}", i + 1))?;
                // A list (`kubectl get -o yaml`) holds its objects in `items`.
                let objects = match value.get("items").and_then(|i| i.as_sequence()) {
                    Some(items) if kind_of(&value).ends_with("List") => items.clone(),
                    _ => vec![value],
                };
                for value in objects {
                    if value.is_null() {
                        continue;
                    }
                    let kind = kind_of(&value);
                    let at = || format!("{source}: document {} ({kind})", i + 1);
                    match kind.as_str() {
                        "IncomingMailProvider" => {
                            let raw: serde_json::Value =
                                serde_yaml::from_value(value.clone()).with_context(at)?;
                            let p = read_object::<IncomingMailProvider>(value, false, at);
                            providers.push((p, raw));
                        }
                        // Encrypted with SOPS (as docs/gitops.md keeps them in Git):
                        // its values are ciphertext, not a login to send; the cluster's
                        // copy is used, as for a Secret not in the files.
                        "Secret" | "ConfigMap" if value.get("sops").is_some() => {
                            eprintln!(
                                "note: {}: encrypted with SOPS, not used; the cluster's {kind} of that name is",
                                at()
                            );
                        }
                        "Secret" => {
                            let s: Secret = read_object(unwrapped_data(value), true, at)?;
                            fetched.secrets.push(crate::credentials::as_stored(s));
                        }
                        "ConfigMap" => {
                            let c: ConfigMap = read_object(value, false, at)?;
                            fetched.config_maps.push(c);
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    if providers.is_empty() {
        bail!("no IncomingMailProvider in the files given with -f");
    }
    if let Some(name) = &args.name {
        providers.retain(|(_, raw)| raw["metadata"]["name"].as_str() == Some(name));
        if providers.is_empty() {
            bail!("no IncomingMailProvider named {name} in the files");
        }
    }
    Ok((providers, fetched))
}

/// `value` with its YAML merge keys expanded (`<<: *defaults`, or `<<: [*a, *b]`), as
/// kubectl reads them: a mapping's own keys win, then each merged mapping's, the first of
/// a list first; a merged mapping that merges others is expanded first, so chains of
/// anchors are too. serde_yaml leaves `<<` as a key, which the schema does not declare.
fn expand_merge_keys(value: &mut serde_yaml::Value) -> Result<(), String> {
    use serde_yaml::Value;
    match value {
        Value::Mapping(map) => {
            for v in map.values_mut() {
                expand_merge_keys(v)?;
            }
            let Some(merged) = map.remove("<<") else {
                return Ok(());
            };
            let merged = match merged {
                Value::Sequence(items) => items,
                one => vec![one],
            };
            for item in merged {
                let Value::Mapping(item) = item else {
                    return Err(
                        "a merge key (<<) takes a mapping or a list of mappings (an anchor's alias, *name)"
                            .into(),
                    );
                };
                for (k, v) in item {
                    map.entry(k).or_insert(v);
                }
            }
        }
        Value::Sequence(items) => {
            for v in items {
                expand_merge_keys(v)?;
            }
        }
        Value::Tagged(tagged) => expand_merge_keys(&mut tagged.value)?,
        _ => {}
    }
    Ok(())
}

/// One object of a file, its error naming the field (`spec.server.port: invalid type`).
/// A Secret's error never quotes the value it could not read: an unquoted number given as
/// a password would otherwise be printed, into a CI log.
fn read_object<T: serde::de::DeserializeOwned>(
    value: serde_yaml::Value,
    secret: bool,
    at: impl Fn() -> String,
) -> anyhow::Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if secret {
            anyhow::anyhow!(
                "{}: {path}: not a value a Secret can hold (stringData takes strings: quote numbers; data takes base64)",
                at()
            )
        } else {
            anyhow::anyhow!("{}: {path}: {}", at(), e.into_inner())
        }
    })
}

/// A Secret manifest with line breaks taken out of its `data` values: base64 wrapped at 76
/// columns (`base64 file` prints it so), which the API server decodes as one.
fn unwrapped_data(mut value: serde_yaml::Value) -> serde_yaml::Value {
    if let Some(data) = value.get_mut("data").and_then(|d| d.as_mapping_mut()) {
        for (_, v) in data.iter_mut() {
            if let Some(text) = v.as_str()
                && text.contains(['\r', '\n'])
            {
                *v = text.replace(['\r', '\n'], "").into();
            }
        }
    }
    value
}

fn kind_of(value: &serde_yaml::Value) -> String {
    value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default()
        .to_string()
}

trait DeserializeFrom: Sized {
    fn deserialize_from(d: serde_yaml::Deserializer) -> Result<Self, serde_yaml::Error>;
}
impl DeserializeFrom for serde_yaml::Value {
    fn deserialize_from(d: serde_yaml::Deserializer) -> Result<Self, serde_yaml::Error> {
        serde::Deserialize::deserialize(d)
    }
}

/// The step table and the verdict, as people read them.
pub fn print_outcome(out: &mut impl Write, label: &str, outcome: &Outcome) -> std::io::Result<()> {
    let e = &outcome.endpoint;
    writeln!(
        out,
        "Testing {label}: {} {e} (TLS {})",
        e.protocol.as_str(),
        e.tls_mode.as_str()
    )?;
    if let Some(report) = &outcome.report {
        for s in &report.steps {
            let mark = if s.ok { "ok " } else { "ERR" };
            writeln!(
                out,
                "  {mark} {:<14} {:>7}  {}",
                s.step.as_str(),
                format_duration(s.duration),
                s.detail
            )?;
        }
        writeln!(out, "  total {}", format_duration(report.duration))?;
    }
    print_verdict(out, outcome.reason, &outcome.message)
}

/// The last lines of a test's output: Ready, its reason and message, and what to do.
fn print_verdict(out: &mut impl Write, reason: Reason, message: &str) -> std::io::Result<()> {
    writeln!(
        out,
        "Ready={} reason={reason} message: {message}",
        reason.ready_status()
    )?;
    if reason != Reason::Connected {
        writeln!(out, "What to do: {}", reason.hint())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> serde_yaml::Value {
        serde_yaml::from_str(text).unwrap()
    }

    #[test]
    fn a_field_that_cannot_be_read_is_named_by_its_path() {
        let value = yaml(
            "metadata: {name: x}\nspec:\n  server: {host: h, protocol: IMAP, port: abc}\n  authentication: {method: None}",
        );
        let e = read_object::<IncomingMailProvider>(value, false, || "p.yaml: document 1".into())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("p.yaml: document 1: spec.server.port: invalid type"),
            "{e}"
        );
    }

    #[test]
    fn a_secret_value_that_cannot_be_read_is_never_quoted() {
        for text in [
            "metadata: {name: s}\nstringData: {password: 84736251}",
            "metadata: {name: s}\ndata: {password: 84736251}",
        ] {
            let e = read_object::<Secret>(yaml(text), true, || "s.yaml: document 1".into())
                .unwrap_err()
                .to_string();
            assert!(!e.contains("84736251"), "{e}");
            assert!(
                e.contains(".password: not a value a Secret can hold"),
                "{e}"
            );
        }
    }

    /// As the API server stores it: base64 wrapped over lines is one value, and a key in
    /// both `data` and `stringData` takes the string.
    #[test]
    fn a_secret_of_a_file_reads_as_the_api_server_stores_it() {
        let text = "metadata: {name: s}\ndata:\n  ca.crt: |\n    aHVudGVy\n    Mi1zZWNyZXQ=\n  password: d3Jvbmc=\nstringData: {password: right-one}";
        let s: Secret = read_object(unwrapped_data(yaml(text)), true, || "s".into()).unwrap();
        let data = crate::credentials::as_stored(s).data.unwrap();
        assert_eq!(data["ca.crt"].0, b"hunter2-secret");
        assert_eq!(data["password"].0, b"right-one");
    }

    /// `<<: *anchor` as kubectl expands it: the mapping's own keys win, then the merged
    /// ones in order, chains of anchors included, in every document and list item.
    #[test]
    fn yaml_merge_keys_are_expanded_as_kubectl_expands_them() {
        let mut value = yaml(
            "base: &base {interval: 5m, timeout: 10s}
longer: &longer {<<: *base, interval: 1h}
items:
- check: {<<: *longer, mailbox: Archive}
- check:
    <<: [{timeout: 20s}, *base]
    mailbox: INBOX
    timeout: 5s
- check: {<<: [{timeout: 20s}, *base]}",
        );
        expand_merge_keys(&mut value).unwrap();
        assert_eq!(
            value["items"],
            yaml(
                "- check: {interval: 1h, timeout: 10s, mailbox: Archive}
- check: {interval: 5m, timeout: 5s, mailbox: INBOX}
- check: {interval: 5m, timeout: 20s}"
            )
        );
        assert_eq!(value["longer"], yaml("{interval: 1h, timeout: 10s}"));
        let mut scalar = yaml("check: {<<: 5m}");
        assert!(
            expand_merge_keys(&mut scalar)
                .unwrap_err()
                .contains("a merge key (<<) takes a mapping")
        );
    }

    /// A merge key in a file is read as kubectl reads it, not as a field `<<`.
    #[test]
    fn a_provider_of_a_file_with_merge_keys_reads_as_kubectl_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.yaml");
        std::fs::write(
            &file,
            "apiVersion: mailroom.dev/v1alpha1
kind: IncomingMailProvider
metadata: {name: merged}
spec:
  server: {host: imap.example.com, port: 993, protocol: IMAP}
  authentication: {method: Password, secretRef: {name: s}}
  check:
    <<: &defaults {interval: 1h, timeout: 20s}
    mailbox: Archive
",
        )
        .unwrap();
        let args = CheckArgs {
            name: None,
            namespace: None,
            kube: Default::default(),
            files: vec![file],
        };
        let (providers, _) = from_files(&args).unwrap();
        let [(Ok(p), raw)] = &providers[..] else {
            panic!("not one readable provider")
        };
        assert_eq!(raw["spec"]["check"]["interval"], "1h");
        assert!(raw["spec"]["check"].get("<<").is_none(), "{raw}");
        assert_eq!(p.spec.check.timeout, "20s");
        assert_eq!(p.spec.check.mailbox, "Archive");
        assert!(super::super::schema::refusals(raw).is_empty());
    }

    fn api_error(code: u16, message: &str) -> kube::Error {
        kube::Error::Api(Box::new(
            kube::core::Status::failure(message, "").with_code(code),
        ))
    }

    /// A cluster without the CRD answers the discovery of its group with a plain 404
    /// (`404 page not found`, as the bed's API server does), where a provider that is not
    /// there is a NotFound of the API server's own.
    #[test]
    fn a_cluster_serves_providers_only_when_its_discovery_lists_them() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{APIResource, APIResourceList};
        let list = |names: &[&str]| APIResourceList {
            group_version: "mailroom.dev/v1alpha1".into(),
            resources: names
                .iter()
                .map(|n| APIResource {
                    name: n.to_string(),
                    ..Default::default()
                })
                .collect(),
        };
        assert_eq!(
            serves(&Ok(list(&[
                "incomingmailproviders",
                "incomingmailproviders/status"
            ]))),
            Some(true)
        );
        assert_eq!(serves(&Ok(list(&["othermailthings"]))), Some(false));
        assert_eq!(
            serves(&Err(api_error(404, "404 page not found"))),
            Some(false)
        );
        // Neither: no verdict, and the provider is only said not found.
        assert_eq!(serves(&Err(api_error(403, "forbidden"))), None);
        assert_eq!(serves(&Err(api_error(503, "unavailable"))), None);
    }

    #[test]
    fn a_cluster_without_the_crd_is_named_with_the_ways_out() {
        let said = not_served(Some("https://10.0.0.1:6443"), Some("prod"));
        assert!(
            said.starts_with(
                "the cluster of context \"prod\" (https://10.0.0.1:6443) does not serve IncomingMailProviders (mailroom.dev/v1alpha1): their CRD is not installed there."
            ) && said.contains("--context")
                && said.contains("kubectl apply -f crds/"),
            "{said}"
        );
        assert!(
            not_served(Some("https://10.0.0.1:6443"), None)
                .starts_with("the cluster at https://10.0.0.1:6443 does not serve")
        );
    }
}
