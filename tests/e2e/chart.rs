//! The Helm chart (charts/mailroom): what `helm template` renders (security context, the
//! controller's RBAC rules exactly, the CRD and its keep annotation, namespaced installs),
//! what `helm install`, `upgrade` and `uninstall` do on the bed's API server, the
//! controller running with the chart's ServiceAccount token and nothing more, the user
//! roles, and the GitOps health checks of docs/gitops.md against real providers.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{
    ALICE_AUTH, Env, WRONG_AUTH, alice_env, provider, text, trust_bed_ca, with_input,
    wrong_password_secret,
};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/mailroom");

fn repo_file(path: &str) -> String {
    let full = format!("{REPO}/{path}");
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("reading {full}: {e}"))
}

/// helm from the bed's cache, with its own config/cache/data folders, and the bed's admin
/// kubeconfig when it talks to the API server.
struct Helm {
    bin: PathBuf,
    home: tempfile::TempDir,
    kubeconfig: Option<PathBuf>,
}

impl Helm {
    fn offline() -> Helm {
        let bins = mailroom_testbed::Binaries::locate().unwrap_or_else(|e| panic!("{e:#}"));
        Helm {
            bin: bins.helm,
            home: tempfile::tempdir().unwrap(),
            kubeconfig: None,
        }
    }

    fn on_bed(env: &Env) -> Helm {
        Helm {
            bin: env.bed.binaries().helm.clone(),
            home: tempfile::tempdir().unwrap(),
            kubeconfig: Some(env.bed.kubeconfig_path().to_path_buf()),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        let h = self.home.path();
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .env("HELM_CONFIG_HOME", h.join("config"))
            .env("HELM_CACHE_HOME", h.join("cache"))
            .env("HELM_DATA_HOME", h.join("data"))
            .env_remove("HELM_NAMESPACE")
            .env_remove("HELM_KUBECONTEXT");
        match &self.kubeconfig {
            Some(k) => cmd.env("KUBECONFIG", k),
            None => cmd.env("KUBECONFIG", h.join("no-cluster")),
        };
        cmd.output()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.bin.display()))
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "expected `helm {}` to succeed; it said:\n{}",
            args.join(" "),
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `helm template` of the chart; every document, parsed.
    fn render(&self, release: &str, ns: &str, values: &[&str]) -> Vec<Value> {
        let mut args = vec!["template", release, CHART, "-n", ns];
        args.extend_from_slice(values);
        parse_documents(&self.ok(&args))
    }
}

fn parse_documents(yaml: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| serde_yaml::Value::deserialize(doc).expect("helm renders valid YAML"))
        .filter(|v| !v.is_null())
        .map(|v| serde_json::to_value(v).unwrap())
        .collect()
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or_default()
}

fn namespace(doc: &Value) -> &str {
    doc["metadata"]["namespace"].as_str().unwrap_or_default()
}

/// (kind, namespace, name) of every document.
fn objects(docs: &[Value]) -> BTreeSet<(String, String, String)> {
    docs.iter()
        .map(|d| (kind(d).into(), namespace(d).into(), name(d).into()))
        .collect()
}

fn only<'a>(docs: &'a [Value], kind_: &str) -> &'a Value {
    let found: Vec<_> = docs.iter().filter(|d| kind(d) == kind_).collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind_}; rendered: {:?}",
        objects(docs)
    );
    found[0]
}

fn find<'a>(docs: &'a [Value], kind_: &str, name_: &str) -> &'a Value {
    docs.iter()
        .find(|d| kind(d) == kind_ && name(d) == name_)
        .unwrap_or_else(|| {
            panic!(
                "expected a {kind_} named {name_}; rendered: {:?}",
                objects(docs)
            )
        })
}

/// One permission: (API group, resource, verb, resource name or "*").
type Permission = (String, String, String, String);

/// The atomic permissions a list of RBAC rules grants.
fn permissions(rules: &Value) -> BTreeSet<Permission> {
    let list = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    let mut set = BTreeSet::new();
    for rule in rules.as_array().expect("rules") {
        let names = list(&rule["resourceNames"]);
        let names = if names.is_empty() {
            vec!["*".to_string()]
        } else {
            names
        };
        for g in list(&rule["apiGroups"]) {
            for r in list(&rule["resources"]) {
                for v in list(&rule["verbs"]) {
                    for n in &names {
                        set.insert((g.clone(), r.clone(), v.clone(), n.clone()));
                    }
                }
            }
        }
    }
    set
}

fn perms(list: &[(&str, &str, &[&str], &str)]) -> BTreeSet<Permission> {
    let mut set = BTreeSet::new();
    for (g, r, verbs, n) in list {
        for v in *verbs {
            set.insert((g.to_string(), r.to_string(), v.to_string(), n.to_string()));
        }
    }
    set
}

/// What the controller may do with providers, Events, Secrets and ConfigMaps (point 2 of
/// the chart's RBAC model, docs/security.md); Secrets update only for OAuth2 token
/// rotation, and never create.
fn controller_permissions(token_rotation: bool) -> BTreeSet<Permission> {
    let mut p = perms(&[
        (
            "mailroom.dev",
            "incomingmailproviders",
            &["get", "list", "watch"],
            "*",
        ),
        (
            "mailroom.dev",
            "incomingmailproviders/status",
            &["patch"],
            "*",
        ),
        ("events.k8s.io", "events", &["create", "patch"], "*"),
        ("", "configmaps", &["get", "list", "watch"], "*"),
        ("", "secrets", &["get", "list", "watch"], "*"),
    ]);
    if token_rotation {
        p.extend(perms(&[("", "secrets", &["update"], "*")]));
    }
    p
}

/// The Lease: create (a name cannot be granted before the object exists), and the rest
/// on the one Lease only.
fn lease_permissions(lease: &str) -> BTreeSet<Permission> {
    perms(&[
        ("coordination.k8s.io", "leases", &["create"], "*"),
        (
            "coordination.k8s.io",
            "leases",
            &["get", "update", "patch"],
            lease,
        ),
    ])
}

fn container(docs: &[Value]) -> &Value {
    let deployment = only(docs, "Deployment");
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(containers.len(), 1, "one container");
    &containers[0]
}

fn args(docs: &[Value]) -> Vec<String> {
    container(docs)["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------
// Without a cluster: the files and what helm renders.

#[test]
fn the_charts_crd_is_the_generated_crd() {
    assert_chart_crd_is_current();
}

/// The chart's copy of the CRD is byte for byte the generated one.
fn assert_chart_crd_is_current() {
    assert!(
        repo_file("charts/mailroom/files/incomingmailprovider.yaml")
            == repo_file("crds/incomingmailprovider.yaml"),
        "charts/mailroom/files/incomingmailprovider.yaml differs from crds/incomingmailprovider.yaml: \
         run `cp crds/incomingmailprovider.yaml charts/mailroom/files/`"
    );
}

#[test]
fn helm_lint_is_clean_with_default_and_full_values() {
    let helm = Helm::offline();
    for values in [
        vec![],
        vec![
            "--set-json",
            r#"watchNamespaces=["team-a","team-b"]"#,
            "--set",
            "replicas=2,networkPolicy.enabled=true,metrics.serviceMonitor.enabled=true,metrics.perProvider=true,metrics.prometheusRule.enabled=true",
            "--set-json",
            r#"networkPolicy.apiServer.cidrs=["10.0.0.1/32"]"#,
        ],
    ] {
        let mut args = vec!["lint", "--strict", CHART];
        args.extend_from_slice(&values);
        let out = helm.ok(&args);
        assert!(
            !out.contains("[WARNING]") && !out.contains("[ERROR]"),
            "helm lint {values:?}:\n{out}"
        );
    }
}

#[test]
fn the_values_schema_refuses_what_the_chart_cannot_use() {
    let helm = Helm::offline();
    for bad in [
        "logging.format=xml",
        "replicas=-1",
        "sharding.shards=0",
        "metrics.port=70000",
        "no.such.value=1",
        "dnsPolicy=ClusterLast",
        "strategy.type=Rolling",
        "metrics.serviceMonitor.namespace=Not_A_Namespace",
    ] {
        let out = helm.run(&["template", "r", CHART, "--set", bad]);
        assert!(
            !out.status.success() && text(&out).contains("schema"),
            "expected the schema to refuse --set {bad}; helm said:\n{}",
            text(&out)
        );
    }
    let out = helm.run(&[
        "template",
        "r",
        CHART,
        "--set-json",
        r#"watchNamespaces=["Not_A_Namespace"]"#,
    ]);
    assert!(!out.status.success(), "a namespace name that cannot exist");
    // A mount without a path, a host alias without names: the API server would refuse the
    // Deployment at install time.
    for (bad, needle) in [
        (r#"extraVolumeMounts=[{"name":"ca"}]"#, "mountPath"),
        (r#"hostAliases=[{"ip":"10.0.0.25"}]"#, "hostnames"),
        (r#"extraVolumes={"name":"ca"}"#, "extraVolumes"),
        // A CIDR where a NetworkPolicy peer belongs.
        (r#"networkPolicy.mailTo=["10.0.0.0/8"]"#, "mailTo"),
    ] {
        let out = helm.run(&["template", "r", CHART, "--set-json", bad]);
        assert!(
            !out.status.success() && text(&out).contains(needle),
            "expected the schema to refuse --set-json {bad} naming {needle}; helm said:\n{}",
            text(&out)
        );
    }
    assert_refused(
        &helm,
        "dnsPolicy=None",
        "dnsConfig.nameservers",
        "a pod with dnsPolicy None and no nameserver has no resolver",
    );
    // An egress rule without ports would open every port.
    let out = helm.run(&[
        "template",
        "r",
        CHART,
        "--set",
        "networkPolicy.enabled=true",
        "--set-json",
        "networkPolicy.apiServer.ports=[]",
    ]);
    assert!(
        !out.status.success() && text(&out).contains("apiServer/ports"),
        "an API server rule with no ports; helm said:\n{}",
        text(&out)
    );
    let docs = Helm::offline().render(
        "r",
        "ops",
        &[
            "--set",
            "networkPolicy.enabled=true",
            "--set-json",
            "networkPolicy.mailPorts=[]",
        ],
    );
    let egress = only(&docs, "NetworkPolicy")["spec"]["egress"].clone();
    for rule in egress.as_array().unwrap() {
        assert!(
            rule["ports"].as_array().is_some_and(|p| !p.is_empty()),
            "an egress rule open to every port: {egress}"
        );
    }
    // DNS where the cluster's resolver listens (OpenShift's on 5353), over UDP and TCP.
    let docs = Helm::offline().render(
        "r",
        "ops",
        &[
            "--set",
            "networkPolicy.enabled=true",
            "--set-json",
            "networkPolicy.dnsPorts=[53,5353]",
        ],
    );
    let egress = &only(&docs, "NetworkPolicy")["spec"]["egress"];
    let dns: Vec<(u64, &str)> = egress[0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["port"].as_u64().unwrap(), p["protocol"].as_str().unwrap()))
        .collect();
    assert_eq!(
        dns,
        [(53, "UDP"), (53, "TCP"), (5353, "UDP"), (5353, "TCP")],
        "{egress}"
    );
    let out = helm.run(&[
        "template",
        "r",
        CHART,
        "--set",
        "networkPolicy.enabled=true",
        "--set-json",
        "networkPolicy.dnsPorts=[]",
    ]);
    assert!(
        !out.status.success() && text(&out).contains("dnsPorts"),
        "a DNS rule with no ports; helm said:\n{}",
        text(&out)
    );
    let out = helm.run(&[
        "template",
        "r",
        CHART,
        "--set",
        "replicas=2,leaderElection.enabled=false",
    ]);
    assert!(
        !out.status.success() && text(&out).contains("leaderElection.enabled"),
        "two replicas without a Lease would test every provider twice; helm said:\n{}",
        text(&out)
    );
}

/// `helm template` with these values must fail, and say `needle` (the values to set).
fn assert_refused(helm: &Helm, values: &str, needle: &str, why: &str) {
    let out = helm.run(&["template", "r", CHART, "-n", "ops", "--set", values]);
    assert!(
        !out.status.success() && text(&out).contains(needle),
        "expected `helm template --set {values}` to fail naming {needle} ({why}); helm said:\n{}",
        text(&out)
    );
}

#[test]
fn a_service_account_the_chart_does_not_create_must_be_named_when_it_binds_rights() {
    let helm = Helm::offline();
    // Else the ClusterRoleBinding (Secrets, cluster-wide) goes to the namespace's
    // `default` ServiceAccount, which every other pod there runs as.
    for values in [
        "serviceAccount.create=false",
        "serviceAccount.create=false,watchNamespaces={team-a}",
    ] {
        assert_refused(
            &helm,
            values,
            "serviceAccount.name",
            "rights bound to the default ServiceAccount",
        );
    }
    // Named: the bindings and the pods use that account, and no ServiceAccount is rendered.
    let docs = helm.render(
        "mailroom",
        "ops",
        &[
            "--set",
            "serviceAccount.create=false,serviceAccount.name=mail-ctl",
        ],
    );
    assert!(!docs.iter().any(|d| kind(d) == "ServiceAccount"));
    let subject = json!([{"kind": "ServiceAccount", "name": "mail-ctl", "namespace": "ops"}]);
    assert_eq!(
        find(&docs, "ClusterRoleBinding", "mailroom-controller")["subjects"],
        subject
    );
    assert_eq!(
        find(&docs, "RoleBinding", "mailroom-leader-election")["subjects"],
        subject
    );
    assert_eq!(
        only(&docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"],
        "mail-ctl"
    );
    // No rights rendered: the account is the user's business, `default` included.
    let docs = helm.render(
        "mailroom",
        "ops",
        &["--set", "serviceAccount.create=false,rbac.create=false"],
    );
    assert!(
        !docs
            .iter()
            .any(|d| kind(d).ends_with("Binding") || kind(d) == "ServiceAccount"),
        "{:?}",
        objects(&docs)
    );
    assert_eq!(
        only(&docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"],
        "default"
    );
}

/// Labels and probes given in values add to the chart's, never replace its own: a
/// duplicate selector label made the pod template miss the Deployment's selector.
#[test]
fn values_cannot_override_the_charts_own_labels_or_probe_endpoints() {
    let docs = Helm::offline().render(
        "mailroom",
        "ops",
        &[
            "--set-json",
            r#"podLabels={"app.kubernetes.io/name":"x","team":"a"}"#,
            "--set-json",
            r#"commonLabels={"app.kubernetes.io/instance":"y","cost":"c"}"#,
            "--set-json",
            r#"probes.liveness.httpGet={"path":"/other","port":1}"#,
            "--set-json",
            r#"probes.readiness.exec={"command":["true"]}"#,
        ],
    );
    let deployment = only(&docs, "Deployment");
    let selector = &deployment["spec"]["selector"]["matchLabels"];
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (k, v) in selector.as_object().unwrap() {
        assert_eq!(&labels[k], v, "pod label {k} against the selector");
    }
    assert_eq!(labels["team"], "a");
    assert_eq!(labels["cost"], "c");
    let probe = &deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"];
    assert_eq!(probe["httpGet"]["path"], "/healthz", "{probe}");
    let probe = &deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"];
    assert!(probe.get("exec").is_none(), "two handlers: {probe}");
}

/// A label key in commonLabels and in an object's own labels is rendered once, the
/// object's value winning: twice is YAML that kustomize refuses (Flux's post-renderer,
/// Argo CD's helmCharts), and parsing it here fails on the duplicate key.
#[test]
fn a_label_in_common_labels_and_an_objects_own_is_rendered_once() {
    let docs = Helm::offline().render(
        "mailroom",
        "ops",
        &[
            "--set-json",
            r#"commonLabels={"team":"common","release":"common","cost":"c"}"#,
            "--set-json",
            r#"podLabels={"team":"pod","cost":""}"#,
            "--set-json",
            r#"metrics.serviceMonitor={"enabled":true,"labels":{"release":"kps"},"namespace":"monitoring"}"#,
            "--set-json",
            r#"metrics.prometheusRule={"enabled":true,"labels":{"release":"kps"}}"#,
        ],
    );
    let pod = &only(&docs, "Deployment")["spec"]["template"]["metadata"]["labels"];
    assert_eq!(pod["team"], "pod");
    assert_eq!(pod["release"], "common");
    // An empty value overrides too (a label may be empty).
    assert_eq!(pod["cost"], "");
    let sm = only(&docs, "ServiceMonitor");
    assert_eq!(sm["metadata"]["labels"]["release"], "kps");
    let rule = only(&docs, "PrometheusRule");
    assert_eq!(rule["metadata"]["labels"]["release"], "kps");
    assert_eq!(rule["metadata"]["labels"]["team"], "common");
    // The rules go where the ServiceMonitor went, unless told otherwise.
    assert_eq!(rule["metadata"]["namespace"], "monitoring");
    let docs = Helm::offline().render(
        "mailroom",
        "ops",
        &[
            "--set",
            "metrics.serviceMonitor.enabled=true,metrics.prometheusRule.enabled=true",
            "--set",
            "metrics.prometheusRule.namespace=rules",
        ],
    );
    assert_eq!(
        only(&docs, "PrometheusRule")["metadata"]["namespace"],
        "rules"
    );
    assert_eq!(
        only(&docs, "ServiceMonitor")["metadata"]["namespace"],
        "ops"
    );
}

/// The chart as a dependency behind the usual `condition: mailroom.enabled`: the parent
/// passes `enabled` in its values, which the schema allows.
#[test]
fn the_chart_takes_an_enabled_value_for_a_parent_charts_condition() {
    let docs = Helm::offline().render("mailroom", "ops", &["--set", "enabled=true"]);
    only(&docs, "Deployment");
}

#[test]
fn a_service_monitor_needs_the_metrics_service() {
    let helm = Helm::offline();
    assert_refused(
        &helm,
        "metrics.service.enabled=false,metrics.serviceMonitor.enabled=true",
        "metrics.service.enabled",
        "a ServiceMonitor without the Service scrapes nothing",
    );
    // Both: the ServiceMonitor selects the Service by its labels and port name.
    let docs = helm.render(
        "mailroom",
        "ops",
        &["--set", "metrics.serviceMonitor.enabled=true"],
    );
    let sm = only(&docs, "ServiceMonitor");
    let service = only(&docs, "Service");
    let selector = sm["spec"]["selector"]["matchLabels"].as_object().unwrap();
    for (k, v) in selector {
        assert_eq!(&service["metadata"]["labels"][k], v, "Service label {k}");
    }
    // Not by the label Argo CD's label tracking rewrites to the Application's name.
    assert!(
        !selector.contains_key("app.kubernetes.io/instance"),
        "{selector:?}"
    );
    assert_eq!(
        sm["spec"]["endpoints"][0]["port"],
        service["spec"]["ports"][0]["name"]
    );
    assert_eq!(
        sm["spec"]["namespaceSelector"]["matchNames"],
        json!(["ops"])
    );
    // Alerts select the ServiceMonitor's job: without it, or a job named, they would
    // watch series no one scrapes (the no-leader alert firing for ever).
    assert_refused(
        &helm,
        "metrics.prometheusRule.enabled=true",
        "metrics.prometheusRule.job",
        "alerts on a job no one scrapes",
    );
    let docs = helm.render(
        "mailroom",
        "ops",
        &[
            "--set",
            "metrics.prometheusRule.enabled=true,metrics.prometheusRule.job=mail",
        ],
    );
    let rules = serde_json::to_string(&only(&docs, "PrometheusRule")["spec"]).unwrap();
    assert!(rules.contains(r#"job=\"mail\""#), "{rules}");
    assert!(!rules.contains("mailroom-metrics"), "{rules}");
    // The longest release name helm takes: the Service's name is still a DNS label, and
    // the alerts select the job named after it.
    let long = "r".repeat(53);
    let docs = helm.render(
        &long,
        "ops",
        &[
            "--set",
            "metrics.serviceMonitor.enabled=true,metrics.prometheusRule.enabled=true",
        ],
    );
    let service = name(only(&docs, "Service")).to_string();
    assert!(
        service.len() <= 63 && service.ends_with("-metrics"),
        "{service}"
    );
    let rules = serde_json::to_string(&only(&docs, "PrometheusRule")["spec"]).unwrap();
    assert!(rules.contains(&format!(r#"job=\"{service}\""#)), "{rules}");
    // Without either: neither.
    let docs = helm.render(
        "mailroom",
        "ops",
        &["--set", "metrics.service.enabled=false"],
    );
    assert!(
        !docs
            .iter()
            .any(|d| kind(d) == "Service" || kind(d) == "ServiceMonitor")
    );
}

#[test]
fn three_shards_are_three_deployments_each_with_its_shard_its_pods_and_its_lease() {
    let helm = Helm::offline();
    let docs = helm.render(
        "mailroom",
        "ops",
        &["--set", "sharding.shards=3,replicas=2"],
    );
    let deployments: Vec<&Value> = docs.iter().filter(|d| kind(d) == "Deployment").collect();
    assert_eq!(deployments.len(), 3, "{:?}", objects(&docs));
    let mut leases = BTreeSet::new();
    for (i, d) in deployments.iter().enumerate() {
        assert_eq!(name(d), format!("mailroom-shard-{i}"));
        assert_eq!(
            d["spec"]["replicas"], 2,
            "replicas counts the pods of each shard"
        );
        let args: Vec<&str> = d["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(
            args.contains(&format!("--shard-index={i}").as_str()),
            "{args:?}"
        );
        assert!(args.contains(&"--shard-count=3"), "{args:?}");
        assert!(args.contains(&"--lease-name=mailroom"), "{args:?}");
        // Every shard may test providers of one host: the release's 8 split in three.
        assert!(args.contains(&"--per-host-concurrency=2"), "{args:?}");
        // Each Deployment selects its own pods only, and its pods carry that label.
        let selector = &d["spec"]["selector"]["matchLabels"];
        assert_eq!(selector["mailroom.dev/shard"], i.to_string());
        let labels = &d["spec"]["template"]["metadata"]["labels"];
        for (k, v) in selector.as_object().unwrap() {
            assert_eq!(&labels[k], v, "pod label {k}");
        }
        let pdb = find(&docs, "PodDisruptionBudget", &format!("mailroom-shard-{i}"));
        assert_eq!(pdb["spec"]["selector"]["matchLabels"], *selector);
        // The Lease the controller takes for this shard (see `mailroom controller`).
        leases.insert(format!("mailroom-shard-{i}"));
    }
    // The controller's Role names exactly those Leases.
    let role = find(&docs, "Role", "mailroom-leader-election");
    let named: BTreeSet<String> = permissions(&role["rules"])
        .into_iter()
        .filter(|(_, _, verb, name)| verb == "patch" && name != "*")
        .map(|(_, _, _, name)| name)
        .collect();
    assert_eq!(named, leases);
    // One shard (the default) renders the plain Deployment, as before.
    let docs = helm.render("mailroom", "ops", &[]);
    assert_eq!(name(only(&docs, "Deployment")), "mailroom");
    assert!(!args(&docs).iter().any(|a| a.starts_with("--shard")));
    let out = helm.run(&[
        "template",
        "r",
        CHART,
        "--set",
        "sharding.shards=2,leaderElection.enabled=false",
    ]);
    assert!(
        !out.status.success() && text(&out).contains("leaderElection.enabled"),
        "shards without Leases; helm said:\n{}",
        text(&out)
    );
}

#[test]
fn every_value_is_documented_in_the_charts_readme() {
    let values: serde_yaml::Value = serde_yaml::from_str(&repo_file("charts/mailroom/values.yaml"))
        .expect("values.yaml parses");
    let readme = repo_file("charts/mailroom/README.md");
    // Kubernetes-shaped values are documented as a whole.
    const WHOLE: [&str; 5] = [
        "resources",
        "podSecurityContext",
        "securityContext",
        "probes.liveness",
        "probes.readiness",
    ];
    fn leaves(prefix: &str, v: &serde_yaml::Value, out: &mut Vec<String>) {
        match v {
            serde_yaml::Value::Mapping(m) if !m.is_empty() && !WHOLE.contains(&prefix) => {
                for (k, v) in m {
                    let k = k.as_str().unwrap();
                    let path = if prefix.is_empty() {
                        k.to_string()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    leaves(&path, v, out);
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }
    let mut paths = Vec::new();
    leaves("", &values, &mut paths);
    let missing: Vec<_> = paths
        .iter()
        .filter(|p| !readme.contains(&format!("`{p}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "charts/mailroom/README.md does not document {missing:?}"
    );
}

#[test]
fn the_default_deployment_is_locked_down() {
    let docs = Helm::offline().render("mailroom", "mailroom-system", &[]);
    let deployment = only(&docs, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(deployment["spec"]["replicas"], 1);
    assert_eq!(pod["serviceAccountName"], "mailroom");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = container(&docs);
    assert_eq!(c["image"], "ghcr.io/mailroom-dev/mailroom:0.1.0");
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{sc}");
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{sc}");
    assert_eq!(sc["runAsNonRoot"], true, "{sc}");
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{sc}");
    assert!(sc["capabilities"].get("add").is_none(), "{sc}");
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{sc}");
    for kind_ in ["requests", "limits"] {
        for r in ["cpu", "memory"] {
            assert!(
                c["resources"][kind_][r].is_string(),
                "resources.{kind_}.{r} missing: {}",
                c["resources"]
            );
        }
    }
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "metrics");
    assert_eq!(c["ports"][0]["name"], "metrics");
    assert_eq!(c["ports"][0]["containerPort"], 8080);
    let env: BTreeMap<&str, &str> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap(),
                e["valueFrom"]["fieldRef"]["fieldPath"]
                    .as_str()
                    .unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(env.get("POD_NAME"), Some(&"metadata.name"), "{env:?}");
    assert_eq!(
        env.get("POD_NAMESPACE"),
        Some(&"metadata.namespace"),
        "{env:?}"
    );
    let a = args(&docs);
    assert_eq!(a[0], "controller", "{a:?}");
    for expected in [
        "--log-format=json",
        "--log=info",
        "--metrics-addr=:8080",
        "--leader-election=true",
        "--lease-name=mailroom",
        "--termination-grace-period=30",
    ] {
        assert!(a.iter().any(|x| x == expected), "{expected} not in {a:?}");
    }
    assert!(
        !a.iter().any(|x| x == "--allow-oauth2-loopback"),
        "token requests to the pod itself are refused by default: {a:?}"
    );
    assert_eq!(
        pod["terminationGracePeriodSeconds"], 30,
        "the controller is told the grace period the kubelet gives it"
    );
    // Unset, left out: Kubernetes' defaults apply (ClusterFirst DNS, a rolling update), and
    // one replica gets no anti-affinity.
    assert!(deployment["spec"].get("strategy").is_none(), "{deployment}");
    for absent in [
        "dnsPolicy",
        "dnsConfig",
        "hostAliases",
        "volumes",
        "affinity",
        "topologySpreadConstraints",
    ] {
        assert!(pod.get(absent).is_none(), "{absent} by default: {pod}");
    }
    assert!(c.get("volumeMounts").is_none(), "{c}");
    // The binary takes every argument the chart gives it (clap checks each before --help).
    let out = Command::new(MAILROOM)
        .args(&a)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{a:?}: {}", text(&out));
    assert!(
        !a.iter().any(|x| x.starts_with("--namespace")),
        "every namespace by default: {a:?}"
    );

    let service = only(&docs, "Service");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "metrics");
    for absent in [
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
        "PrometheusRule",
    ] {
        assert!(
            !docs.iter().any(|d| kind(d) == absent),
            "{absent} is opt-in (or needs replicas > 1)"
        );
    }
}

#[test]
fn the_controller_gets_exactly_its_rules_cluster_wide_and_the_lease_in_its_namespace() {
    let docs = Helm::offline().render("mailroom", "mailroom-system", &[]);
    let role = find(&docs, "ClusterRole", "mailroom-controller");
    assert_eq!(permissions(&role["rules"]), controller_permissions(true));
    let binding = find(&docs, "ClusterRoleBinding", "mailroom-controller");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "mailroom", "namespace": "mailroom-system"}])
    );
    assert_eq!(binding["roleRef"]["name"], "mailroom-controller");

    let lease = find(&docs, "Role", "mailroom-leader-election");
    assert_eq!(namespace(lease), "mailroom-system");
    assert_eq!(permissions(&lease["rules"]), lease_permissions("mailroom"));
    let roles: Vec<_> = docs.iter().filter(|d| kind(d) == "Role").collect();
    assert_eq!(
        roles.len(),
        1,
        "only the Lease's Role: {:?}",
        objects(&docs)
    );

    // Without OAuth2 token rotation, Secrets are read-only.
    let docs = Helm::offline().render(
        "mailroom",
        "mailroom-system",
        &["--set", "oauth2.tokenRotation=false"],
    );
    let role = find(&docs, "ClusterRole", "mailroom-controller");
    assert_eq!(permissions(&role["rules"]), controller_permissions(false));

    // Without leader election, no Lease rights at all.
    let docs = Helm::offline().render(
        "mailroom",
        "mailroom-system",
        &["--set", "leaderElection.enabled=false"],
    );
    assert!(
        !docs.iter().any(|d| kind(d) == "Role"),
        "{:?}",
        objects(&docs)
    );
    assert!(args(&docs).contains(&"--leader-election=false".to_string()));
    // Nor a rollout's two pods testing side by side: the new one starts after the old.
    let deployment = find(&docs, "Deployment", "mailroom");
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");
    let docs = Helm::offline().render(
        "mailroom",
        "mailroom-system",
        &[
            "--set",
            "leaderElection.enabled=false",
            "--set-json",
            r#"strategy={"type":"RollingUpdate","rollingUpdate":{"maxSurge":0}}"#,
        ],
    );
    let deployment = find(&docs, "Deployment", "mailroom");
    assert_eq!(
        deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"], 0,
        "the strategy the values name"
    );
    // With a Lease, Kubernetes' default: the new pod waits for the Lease.
    let docs = Helm::offline().render("mailroom", "mailroom-system", &[]);
    let deployment = find(&docs, "Deployment", "mailroom");
    assert!(deployment["spec"].get("strategy").is_none(), "{deployment}");
}

#[test]
fn watch_namespaces_installs_roles_in_those_namespaces_only() {
    let docs = Helm::offline().render(
        "mailroom",
        "mailroom-system",
        &["--set-json", r#"watchNamespaces=["team-a","team-b"]"#],
    );
    assert!(
        !docs.iter().any(|d| kind(d) == "ClusterRoleBinding"
            || name(d) == "mailroom-controller" && kind(d) == "ClusterRole"),
        "no cluster-wide rights for a namespaced install: {:?}",
        objects(&docs)
    );
    let mut where_: BTreeMap<String, BTreeSet<Permission>> = BTreeMap::new();
    for role in docs.iter().filter(|d| kind(d) == "Role") {
        where_
            .entry(namespace(role).to_string())
            .or_default()
            .extend(permissions(&role["rules"]));
    }
    let mut expected = BTreeMap::new();
    expected.insert("team-a".to_string(), controller_permissions(true));
    expected.insert("team-b".to_string(), controller_permissions(true));
    expected.insert("mailroom-system".to_string(), lease_permissions("mailroom"));
    assert_eq!(where_, expected);
    for binding in docs.iter().filter(|d| kind(d) == "RoleBinding") {
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": "mailroom", "namespace": "mailroom-system"}])
        );
        assert_eq!(binding["roleRef"]["kind"], "Role");
    }
    let bound: BTreeSet<_> = docs
        .iter()
        .filter(|d| kind(d) == "RoleBinding")
        .map(|d| namespace(d).to_string())
        .collect();
    assert_eq!(
        bound,
        ["mailroom-system", "team-a", "team-b"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    assert!(
        args(&docs).contains(&"--namespace=team-a,team-b".to_string()),
        "{:?}",
        args(&docs)
    );
}

#[test]
fn user_roles_are_aggregated_into_view_edit_and_admin_unless_switched_off() {
    let docs = Helm::offline().render("mailroom", "mailroom-system", &[]);
    let view = find(&docs, "ClusterRole", "mailroom-view");
    let edit = find(&docs, "ClusterRole", "mailroom-edit");
    let read = perms(&[
        (
            "mailroom.dev",
            "incomingmailproviders",
            &["get", "list", "watch"],
            "*",
        ),
        (
            "mailroom.dev",
            "incomingmailproviders/status",
            &["get", "list", "watch"],
            "*",
        ),
    ]);
    assert_eq!(permissions(&view["rules"]), read);
    let mut write = read.clone();
    write.extend(perms(&[(
        "mailroom.dev",
        "incomingmailproviders",
        &["create", "update", "patch", "delete", "deletecollection"],
        "*",
    )]));
    assert_eq!(permissions(&edit["rules"]), write);
    let label = |role: &Value, to: &str| {
        role["metadata"]["labels"][format!("rbac.authorization.k8s.io/aggregate-to-{to}")].clone()
    };
    for to in ["view", "edit", "admin"] {
        assert_eq!(label(view, to), "true", "mailroom-view aggregate-to-{to}");
    }
    for to in ["edit", "admin"] {
        assert_eq!(label(edit, to), "true", "mailroom-edit aggregate-to-{to}");
    }
    assert_eq!(
        label(edit, "view"),
        Value::Null,
        "edit rights never reach view"
    );

    let docs = Helm::offline().render(
        "mailroom",
        "mailroom-system",
        &["--set", "rbac.aggregateToDefaultRoles=false"],
    );
    for role in ["mailroom-view", "mailroom-edit"] {
        let labels = &find(&docs, "ClusterRole", role)["metadata"]["labels"];
        assert!(
            !labels
                .as_object()
                .unwrap()
                .keys()
                .any(|k| k.contains("aggregate-to")),
            "{role}: {labels}"
        );
    }
    let docs = Helm::offline().render(
        "mailroom",
        "mailroom-system",
        &["--set", "rbac.userRoles=false"],
    );
    assert!(
        !docs
            .iter()
            .any(|d| name(d).ends_with("-view") || name(d).ends_with("-edit"))
    );
}

#[test]
fn the_crd_is_the_generated_one_and_kept_on_uninstall() {
    let docs = Helm::offline().render("mailroom", "mailroom-system", &[]);
    let crd = only(&docs, "CustomResourceDefinition");
    assert_eq!(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
        "{}",
        crd["metadata"]
    );
    // Argo CD renders the chart with `helm template` and ignores helm's policy: neither an
    // auto-prune (crds.enabled=false, the CRD gone from the manifests) nor deleting the
    // Application may delete the CRD and with it every provider (docs/gitops.md).
    assert_eq!(
        crd["metadata"]["annotations"]["argocd.argoproj.io/sync-options"],
        "Prune=false,Delete=false",
        "{}",
        crd["metadata"]
    );
    let gitops = repo_file("docs/gitops.md");
    assert!(
        gitops.contains("argocd.argoproj.io/sync-options: Prune=false,Delete=false"),
        "docs/gitops.md must show the CRD's Argo CD sync options"
    );
    let generated: Value =
        serde_yaml::from_str(&repo_file("crds/incomingmailprovider.yaml")).unwrap();
    // helm's toYaml writes 65535.0 as 65535: the same number to the API server.
    fn numbers_as_f64(v: &Value) -> Value {
        match v {
            Value::Number(n) => json!(n.as_f64().unwrap()),
            Value::Array(a) => Value::Array(a.iter().map(numbers_as_f64).collect()),
            Value::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, v)| (k.clone(), numbers_as_f64(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
    assert!(
        numbers_as_f64(&crd["spec"]) == numbers_as_f64(&generated["spec"]),
        "the chart's CRD spec differs from crds/incomingmailprovider.yaml"
    );
    assert_eq!(crd["metadata"]["name"], generated["metadata"]["name"]);

    let docs = Helm::offline().render("mailroom", "s", &["--set", "crds.keep=false"]);
    assert!(only(&docs, "CustomResourceDefinition")["metadata"]["annotations"].is_null());
    let docs = Helm::offline().render("mailroom", "s", &["--set", "crds.enabled=false"]);
    assert!(!docs.iter().any(|d| kind(d) == "CustomResourceDefinition"));
}

#[test]
fn replicas_network_policy_and_service_monitor() {
    let helm = Helm::offline();
    let docs = helm.render("mailroom", "s", &["--set", "replicas=2"]);
    let pdb = only(&docs, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        only(&docs, "Deployment")["spec"]["selector"]["matchLabels"]
    );
    // The PDB protects nothing if both replicas sit on the node being drained: the pods
    // prefer (not require: one node still runs both) nodes apart from each other.
    let spread = |selector: &Value| {
        json!({"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100,
            "podAffinityTerm": {
                "topologyKey": "kubernetes.io/hostname",
                "labelSelector": {"matchLabels": selector},
            },
        }]}})
    };
    let deployment = only(&docs, "Deployment");
    let selector = &deployment["spec"]["selector"]["matchLabels"];
    assert_eq!(
        deployment["spec"]["template"]["spec"]["affinity"],
        spread(selector),
        "the default anti-affinity, on the pods the PDB selects"
    );
    // Sharded: each shard's pods apart from each other (the PDB is per shard).
    let docs = helm.render("mailroom", "s", &["--set", "replicas=2,sharding.shards=2"]);
    for i in 0..2 {
        let d = find(&docs, "Deployment", &format!("mailroom-shard-{i}"));
        let selector = &d["spec"]["selector"]["matchLabels"];
        assert_eq!(selector["mailroom.dev/shard"], i.to_string());
        assert_eq!(d["spec"]["template"]["spec"]["affinity"], spread(selector));
    }
    // Two replicas and one value of the user's.
    let two_with = |value: &str, json: &Value| {
        helm.render(
            "mailroom",
            "s",
            &[
                "--set",
                "replicas=2",
                "--set-json",
                &format!("{value}={json}"),
            ],
        )
    };
    // The user's affinity replaces it entirely (nothing merged in) ...
    let own = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "mail", "operator": "In", "values": ["yes"]}
        ]}]
    }}});
    let docs = two_with("affinity", &own);
    assert_eq!(
        only(&docs, "Deployment")["spec"]["template"]["spec"]["affinity"],
        own
    );
    // ... and spread constraints of the user's leave it out.
    let constraints = json!([{
        "maxSkew": 1,
        "topologyKey": "topology.kubernetes.io/zone",
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "mailroom"}},
    }]);
    let docs = two_with("topologySpreadConstraints", &constraints);
    let pod = &only(&docs, "Deployment")["spec"]["template"]["spec"];
    assert_eq!(pod["topologySpreadConstraints"], constraints);
    assert!(pod.get("affinity").is_none(), "{pod}");

    let docs = helm.render(
        "mailroom",
        "s",
        &["--set", "replicas=2,podDisruptionBudget.enabled=false"],
    );
    assert!(!docs.iter().any(|d| kind(d) == "PodDisruptionBudget"));

    let docs = helm.render(
        "mailroom",
        "s",
        &[
            "--set",
            "networkPolicy.enabled=true,metrics.serviceMonitor.enabled=true",
            "--set-json",
            "networkPolicy.extraEgressPorts=[8993]",
        ],
    );
    let np = only(&docs, "NetworkPolicy");
    assert_eq!(np["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    let mut ports = BTreeSet::new();
    for rule in np["spec"]["egress"].as_array().unwrap() {
        for p in rule["ports"].as_array().unwrap() {
            ports.insert((
                p["protocol"].as_str().unwrap().to_string(),
                p["port"].as_u64().unwrap(),
            ));
        }
        assert!(
            rule.get("to").is_none(),
            "no cidrs given: any address: {rule}"
        );
    }
    let expected: BTreeSet<_> = [
        ("UDP", 53),
        ("TCP", 53),
        ("TCP", 443),
        ("TCP", 6443),
        ("TCP", 143),
        ("TCP", 993),
        ("TCP", 110),
        ("TCP", 995),
        ("TCP", 8993),
    ]
    .iter()
    .map(|(p, n)| (p.to_string(), *n))
    .collect();
    assert_eq!(ports, expected);
    assert_eq!(
        np["spec"]["ingress"],
        json!([{"ports": [{"port": "metrics", "protocol": "TCP"}]}])
    );
    let sm = only(&docs, "ServiceMonitor");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    // Else Prometheus renames the per-provider series' namespace to exported_namespace,
    // and the alerts would name the controller's namespace instead of the provider's.
    assert_eq!(sm["spec"]["endpoints"][0]["honorLabels"], true);
    assert_eq!(namespace(sm), "s");
    for absent in ["relabelings", "metricRelabelings"] {
        assert!(
            sm["spec"]["endpoints"][0].get(absent).is_none(),
            "{absent} by default: {sm}"
        );
    }
    // In the namespace Prometheus watches, still scraping the release namespace's Service,
    // with the user's relabelings on its endpoint.
    let relabelings = json!([{
        "sourceLabels": ["__meta_kubernetes_pod_node_name"],
        "targetLabel": "node",
    }]);
    let metric_relabelings = json!([{
        "action": "drop",
        "sourceLabels": ["__name__"],
        "regex": "process_.*",
    }]);
    let docs = helm.render(
        "mailroom",
        "s",
        &[
            "--set",
            "metrics.serviceMonitor.enabled=true,metrics.serviceMonitor.namespace=monitoring",
            "--set-json",
            &format!("metrics.serviceMonitor.relabelings={relabelings}"),
            "--set-json",
            &format!("metrics.serviceMonitor.metricRelabelings={metric_relabelings}"),
        ],
    );
    let sm = only(&docs, "ServiceMonitor");
    assert_eq!(namespace(sm), "monitoring");
    assert_eq!(sm["spec"]["namespaceSelector"]["matchNames"], json!(["s"]));
    assert_eq!(namespace(only(&docs, "Service")), "s");
    let endpoint = &sm["spec"]["endpoints"][0];
    assert_eq!(endpoint["relabelings"], relabelings, "{endpoint}");
    assert_eq!(
        endpoint["metricRelabelings"], metric_relabelings,
        "{endpoint}"
    );
    assert_eq!(endpoint["honorLabels"], true, "{endpoint}");
}

/// Pod and Deployment settings an operator brings (a CA file on the read-only root
/// filesystem, split-horizon DNS, a rollout strategy), as `--set-json` arguments.
const POD_VALUES: [&str; 12] = [
    "--set-json",
    r#"extraVolumes=[{"name":"corp-ca","configMap":{"name":"corp-ca"}}]"#,
    "--set-json",
    r#"extraVolumeMounts=[{"name":"corp-ca","mountPath":"/etc/mailroom/ca","readOnly":true}]"#,
    "--set-json",
    r#"extraEnv=[{"name":"SSL_CERT_FILE","value":"/etc/mailroom/ca/ca.crt"}]"#,
    "--set-json",
    r#"dnsConfig={"nameservers":["10.0.0.53"],"searches":["corp.example"],"options":[{"name":"ndots","value":"2"}]}"#,
    "--set-json",
    r#"hostAliases=[{"ip":"10.0.0.25","hostnames":["imap.corp.example"]}]"#,
    "--set-json",
    r#"strategy={"type":"RollingUpdate","rollingUpdate":{"maxSurge":0,"maxUnavailable":1}}"#,
];

#[test]
fn extra_volumes_dns_and_strategy_render_where_kubernetes_reads_them() {
    let mut values = POD_VALUES.to_vec();
    values.extend_from_slice(&["--set", "dnsPolicy=None"]);
    let docs = Helm::offline().render("mailroom", "ops", &values);
    let deployment = only(&docs, "Deployment");
    assert_eq!(
        deployment["spec"]["strategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}})
    );
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(
        pod["volumes"],
        json!([{"name": "corp-ca", "configMap": {"name": "corp-ca"}}])
    );
    assert_eq!(pod["dnsPolicy"], "None");
    assert_eq!(
        pod["dnsConfig"],
        json!({
            "nameservers": ["10.0.0.53"],
            "searches": ["corp.example"],
            "options": [{"name": "ndots", "value": "2"}],
        })
    );
    assert_eq!(
        pod["hostAliases"],
        json!([{"ip": "10.0.0.25", "hostnames": ["imap.corp.example"]}])
    );
    let c = container(&docs);
    assert_eq!(
        c["volumeMounts"],
        json!([{"name": "corp-ca", "mountPath": "/etc/mailroom/ca", "readOnly": true}])
    );
    // The mount adds to the locked-down container, which stays read-only.
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert!(
        c["env"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "SSL_CERT_FILE", "value": "/etc/mailroom/ca/ca.crt"})),
        "{}",
        c["env"]
    );
    // Every shard's pods get them.
    let mut values = POD_VALUES.to_vec();
    values.extend_from_slice(&["--set", "sharding.shards=2"]);
    let docs = Helm::offline().render("mailroom", "ops", &values);
    for d in docs.iter().filter(|d| kind(d) == "Deployment") {
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(pod["volumes"][0]["name"], "corp-ca", "{}", name(d));
        assert_eq!(
            pod["containers"][0]["volumeMounts"][0]["name"],
            "corp-ca",
            "{}",
            name(d)
        );
        assert_eq!(pod["hostAliases"][0]["ip"], "10.0.0.25", "{}", name(d));
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], 0);
        assert!(pod.get("dnsPolicy").is_none(), "unset, left out: {pod}");
    }
}

/// The chart's alerts, evaluated by Prometheus's own rule engine (`promtool test rules`)
/// over made-up series: which fire, after how long, with which labels and words. The
/// rules also pass `promtool check rules` (its lint included).
#[test]
fn the_alerts_fire_when_a_mailbox_stays_down_or_no_replica_tests() {
    use mailroom::api::Reason;
    let helm = Helm::offline();
    let bins = mailroom_testbed::Binaries::locate().unwrap_or_else(|e| panic!("{e:#}"));
    let dir = tempfile::tempdir().unwrap();
    // Release mailroom in namespace mail: the ServiceMonitor's job is mailroom-metrics.
    let job = "job=\"mailroom-metrics\"";
    let write_rules_of = |file: &str, ns: &str, values: &str| {
        let docs = helm.render("mailroom", ns, &["--set", values]);
        let rule = only(&docs, "PrometheusRule");
        let text = serde_json::to_string_pretty(&rule["spec"]).unwrap();
        std::fs::write(dir.path().join(file), text).unwrap();
    };
    let write_rules = |file: &str, values: &str| write_rules_of(file, "mail", values);
    // A series as one replica's scrape has it: its pod and instance besides the job, and
    // the namespace of its pod unless the series names one of its own (honorLabels).
    let series_of = |ns: &str, name: &str, pod: &str, labels: &str, values: &str| {
        let mut labels = if labels.is_empty() {
            String::new()
        } else {
            format!(",{labels}")
        };
        if !labels.contains("namespace=") {
            labels.push_str(&format!(",namespace=\"{ns}\""));
        }
        json!({
            "series": format!("{name}{{{job},pod=\"{pod}\",instance=\"{pod}:8080\"{labels}}}"),
            "values": values,
        })
    };
    let series = |name: &str, pod: &str, labels: &str, values: &str| {
        series_of("mail", name, pod, labels, values)
    };
    let ready_on = |pod: &str, ns: &str, name: &str, reason: &str, values: &str| {
        series(
            "mailroom_provider_ready",
            pod,
            &format!("namespace=\"{ns}\",name=\"{name}\",reason=\"{reason}\""),
            values,
        )
    };
    let ready =
        |ns: &str, name: &str, reason: &str, values: &str| ready_on("a", ns, name, reason, values);
    let leader = |pod: &str, values: &str| series("mailroom_leader", pod, "", values);
    let providers = |pod: &str, ready: &str, values: &str| {
        series(
            "mailroom_providers",
            pod,
            &format!("ready=\"{ready}\""),
            values,
        )
    };
    let overdue = |pod: &str, values: &str| series("mailroom_providers_overdue", pod, "", values);
    let unlisted = |pod: &str, kind: &str, values: &str| {
        series(
            "mailroom_namespaces_unlisted",
            pod,
            &format!("kind=\"{kind}\""),
            values,
        )
    };
    let tests = |pod: &str, values: &str| {
        series(
            "mailroom_tests_total",
            pod,
            "protocol=\"IMAP\",reason=\"Connected\"",
            values,
        )
    };
    let not_ready = |ns: &str, name: &str| {
        json!({
            "exp_labels": {"severity": "warning", "namespace": ns, "name": name, "job": "mailroom-metrics"},
            "exp_annotations": {
                "summary": format!("Mailbox {ns}/{name} has not been Ready for 15m"),
                "description": format!("Its status says why: kubectl -n {ns} describe imp {name}"),
            },
        })
    };
    // The release's namespace and job on every alert that is not a mailbox's: two
    // releases' alerts are two, and an AlertmanagerConfig in the release's namespace
    // routes them.
    let release_labels = |labels: Value| {
        let mut labels = labels;
        labels["namespace"] = json!("mail");
        labels["job"] = json!("mailroom-metrics");
        labels
    };
    let no_leader = |summary: &str| {
        json!({
            "exp_labels": release_labels(json!({"severity": "warning", "cause": "NoLeader"})),
            "exp_annotations": {
                "summary": summary,
                "description": "Statuses are going stale: kubectl -n mail get pods \
                    -l app.kubernetes.io/instance=mailroom; the controller's log says why it \
                    does not hold its lease",
            },
        })
    };
    let overdue_alert = |pod: &str, providers: u32| {
        json!({
            "exp_labels": release_labels(json!({"severity": "warning", "cause": "Overdue", "instance": format!("{pod}:8080")})),
            "exp_annotations": {
                "summary": format!("mailroom mail/mailroom: {providers} providers tested by the \
                    replica {pod}:8080 are overdue for a test"),
                "description": "Their statuses are going stale while it holds the lease: its \
                    log says why (forbidden: a missing RBAC rule; writing status: the API \
                    server refuses it): kubectl -n mail logs -l app.kubernetes.io/instance=mailroom",
            },
        })
    };
    let unlisted_alert = |kind: &str, namespaces: u32| {
        json!({
            "exp_labels": release_labels(json!({"severity": "warning", "cause": "Unlisted", "kind": kind})),
            "exp_annotations": {
                "summary": format!("mailroom mail/mailroom cannot list the {kind}s of \
                    {namespaces} of its watched namespaces (a watch of all namespaces counts \
                    as one)"),
                "description": "Their providers go untested: its ServiceAccount needs get, \
                    list and watch on them there (the chart's Role and RoleBinding in each \
                    namespace of watchNamespaces, or its ClusterRole and ClusterRoleBinding). \
                    The log names the namespaces (watch failed ... forbidden): kubectl -n mail \
                    logs -l app.kubernetes.io/instance=mailroom",
            },
        })
    };
    let alert = |at: &str, name: &str, expected: Value| json!({"eval_time": at, "alertname": name, "exp_alerts": expected});

    // Per provider (one shard).
    write_rules(
        "per-provider.json",
        "metrics.prometheusRule.enabled=true,metrics.serviceMonitor.enabled=true,metrics.perProvider=true",
    );
    // Every reason for 20 minutes, as the gauge reports it (1 for Ready True, else 0):
    // only those whose Ready is False alert (Checking and Suspended are Unknown).
    let mut every_reason = Vec::new();
    let mut failing = Vec::new();
    for reason in Reason::ALL {
        let status = reason.ready_status();
        let value = if status == "True" { "1x20" } else { "0x20" };
        every_reason.push(ready("reasons", reason.as_str(), reason.as_str(), value));
        if status == "False" {
            failing.push(not_ready("reasons", reason.as_str()));
        }
    }
    every_reason.push(leader("a", "1x20"));
    every_reason.push(tests("a", "0+5x20"));
    let per_provider = json!({
        "rule_files": ["per-provider.json"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    // Failing all along: alerts after 15 minutes, not before.
                    ready("team-a", "inbox", "AuthenticationFailed", "0x20"),
                    // The same name in another namespace is another mailbox.
                    ready("team-b", "inbox", "Timeout", "0x20"),
                    // Failing all along for changing reasons: one alert, on time.
                    ready("team-a", "moving", "Timeout", "0x8 stale"),
                    ready("team-a", "moving", "ConnectionRefused", "_x8 0x12"),
                    // Failed for ten minutes, then Ready: no alert.
                    ready("team-a", "flaky", "Timeout", "0x9 stale"),
                    ready("team-a", "flaky", "Connected", "_x9 1x11"),
                    // Suspended (Unknown, reported 0): never.
                    ready("team-a", "paused", "Suspended", "0x20"),
                    // Its first test waiting for a slot all along (Unknown): not failing.
                    ready("team-a", "queued", "Checking", "0x20"),
                    ready("team-a", "fine", "Connected", "1x20"),
                    // Another release's series are not ours.
                    json!({
                        "series": "mailroom_provider_ready{job=\"other-metrics\",namespace=\"x\",name=\"y\",reason=\"Timeout\"}",
                        "values": "0x20",
                    }),
                    // One replica tests, the other stands by.
                    leader("a", "1x20"),
                    leader("b", "0x20"),
                    providers("a", "False", "3x20"),
                    providers("a", "True", "2x20"),
                    tests("a", "0+6x20"),
                ],
                "alert_rule_test": [
                    alert("14m", "MailroomMailboxNotReady", json!([])),
                    alert("16m", "MailroomMailboxNotReady", json!([
                        not_ready("team-a", "inbox"),
                        not_ready("team-b", "inbox"),
                        not_ready("team-a", "moving"),
                    ])),
                    alert("16m", "MailroomNotTesting", json!([])),
                ],
            },
            {
                "interval": "1m",
                "input_series": every_reason,
                "alert_rule_test": [
                    alert("16m", "MailroomMailboxNotReady", Value::Array(failing)),
                ],
            },
            {
                // The leader lost its lease at 5m and nobody took over; then nothing
                // was scraped at all.
                "interval": "1m",
                "input_series": [leader("a", "1x4 0x10 stale")],
                "alert_rule_test": [
                    alert("14m", "MailroomNotTesting", json!([])),
                    alert("16m", "MailroomNotTesting", json!([no_leader(
                        "No replica of mailroom mail/mailroom has been testing for 10m",
                    )])),
                    alert("30m", "MailroomNotTesting", json!([no_leader(
                        "No replica of mailroom mail/mailroom has been testing for 10m",
                    )])),
                ],
            },
            {
                // Leases held, and whether their providers are tested on schedule.
                "interval": "1m",
                "input_series": [
                    // Took the lease at 0; from 3m on 4 of its providers are overdue (its
                    // caches never synced, say): alerts 10 minutes later, not before.
                    leader("stuck", "1x45"),
                    overdue("stuck", "0x2 4x43"),
                    // Stands by: reports nothing overdue.
                    leader("standby", "0x45"),
                    overdue("standby", "0x45"),
                    // Took over at 5m with 3 providers overdue after an outage, tested
                    // within 2 minutes: no alert.
                    leader("new", "0x4 1x41"),
                    overdue("new", "0x4 3x2 0x39"),
                    // Tested on schedule for 20 minutes, then 2 providers left overdue.
                    leader("stopped", "1x45"),
                    overdue("stopped", "0x20 2x25"),
                ],
                "alert_rule_test": [
                    alert("12m", "MailroomNotTesting", json!([])),
                    alert("14m", "MailroomNotTesting", json!([overdue_alert("stuck", 4)])),
                    alert("30m", "MailroomNotTesting", json!([overdue_alert("stuck", 4)])),
                    alert("32m", "MailroomNotTesting", json!([
                        overdue_alert("stuck", 4),
                        overdue_alert("stopped", 2),
                    ])),
                ],
            },
            {
                // A leader that from 2m on may not list the providers of one of its
                // namespaces (its RoleBinding gone): they drop out of every other series.
                // At its start nothing was listed yet, for a moment: no alert.
                "interval": "1m",
                "input_series": [
                    leader("a", "1x30"),
                    unlisted("a", "IncomingMailProvider", "0x1 1x29"),
                    unlisted("a", "Secret", "2 0x29"),
                    unlisted("a", "ConfigMap", "0x30"),
                    leader("standby", "0x30"),
                    unlisted("standby", "IncomingMailProvider", "0x30"),
                ],
                "alert_rule_test": [
                    alert("11m", "MailroomNotTesting", json!([])),
                    alert("13m", "MailroomNotTesting", json!([
                        unlisted_alert("IncomingMailProvider", 1),
                    ])),
                ],
            },
            {
                // The lease changes hands at 8m (a rollout): the old leader's series end
                // at 7m (stale from 8m), the new leader's begin at 9m. A mailbox failing all along still
                // alerts after 15 minutes.
                "interval": "1m",
                "input_series": [
                    ready_on("a", "team-a", "inbox", "Timeout", "0x7 stale"),
                    ready_on("b", "team-a", "inbox", "Timeout", "_x9 0x11"),
                    leader("a", "1x7 stale"),
                    leader("b", "_x9 1x11"),
                ],
                "alert_rule_test": [
                    alert("16m", "MailroomMailboxNotReady", json!([not_ready("team-a", "inbox")])),
                ],
            },
        ],
    });

    // Counts only (the default), and three shards of which one has no leader.
    write_rules(
        "counts.json",
        "metrics.prometheusRule.enabled=true,metrics.serviceMonitor.enabled=true,sharding.shards=3",
    );
    let fleet_alert = |now: u32| {
        json!([{
            "exp_labels": release_labels(json!({"severity": "warning"})),
            "exp_annotations": {
                "summary": format!("Mailboxes have been failing without a break for 15m; {now} are not Ready now"),
                "description": "Which, and why: kubectl get imp -A (not necessarily the same \
                    mailboxes all along; metrics.perProvider names each one that failed \
                    throughout in an alert of its own)",
            },
        }])
    };
    let counts = json!({
        "rule_files": ["counts.json"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    providers("a", "False", "2x20"),
                    providers("b", "False", "0x20"),
                    providers("b", "Unknown", "3x20"),
                    providers("a", "True", "9x20"),
                    providers("b", "True", "4x20"),
                    leader("a", "1x20"),
                    leader("b", "1x20"),
                    leader("c", "0x20"),
                    tests("a", "0+11x20"),
                    tests("b", "0+4x20"),
                ],
                "alert_rule_test": [
                    alert("14m", "MailroomMailboxesNotReady", json!([])),
                    alert("16m", "MailroomMailboxesNotReady", fleet_alert(2)),
                    alert("9m", "MailroomNotTesting", json!([])),
                    alert("11m", "MailroomNotTesting", json!([no_leader(
                        "Only 2 of the 3 shards of mailroom mail/mailroom have had a replica \
                         testing for 10m",
                    )])),
                ],
            },
            {
                // A fleet-level alert: one provider failing for 8 minutes, then another
                // (on the other shard) from then on, with no moment of none failing, fires
                // as if one had failed throughout (documented; metrics.perProvider tells
                // them apart).
                "interval": "1m",
                "input_series": [
                    providers("a", "False", "1x8 0x12"),
                    providers("b", "False", "0x7 1x13"),
                    leader("a", "1x20"),
                    leader("b", "1x20"),
                    leader("c", "1x20"),
                    tests("a", "0+1x20"),
                    tests("b", "0+1x20"),
                ],
                "alert_rule_test": [
                    alert("16m", "MailroomMailboxesNotReady", fleet_alert(1)),
                ],
            },
            {
                // The lease of one shard changes hands at 8m (no series from either
                // replica then): the wait goes on; the failures end at 18m, and the alert
                // within 3 minutes.
                "interval": "1m",
                "input_series": [
                    providers("a", "False", "2x7 stale"),
                    providers("b", "False", "_x9 2x8 0x5"),
                    leader("a", "1x7 stale"),
                    leader("b", "_x9 1x13"),
                    leader("c", "1x22"),
                    leader("d", "1x22"),
                ],
                "alert_rule_test": [
                    alert("16m", "MailroomMailboxesNotReady", fleet_alert(2)),
                    alert("21m", "MailroomMailboxesNotReady", json!([])),
                ],
            },
        ],
    });

    // Two releases of the same name, in namespaces mail and other: their ServiceMonitors'
    // jobs have the same name. Each release's alerts are its own, and say whose they are.
    let one_shard = "metrics.prometheusRule.enabled=true,metrics.serviceMonitor.enabled=true";
    write_rules_of("mail.json", "mail", one_shard);
    write_rules_of("other.json", "other", one_shard);
    let two_releases = json!({
        "rule_files": ["mail.json", "other.json"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                // mail's leader lost its lease at 5m; other's tests all along.
                leader("a", "1x4 0x15"),
                series_of("other", "mailroom_leader", "b", "", "1x20"),
                // other has 2 mailboxes failing; mail none.
                providers("a", "False", "0x20"),
                series_of("other", "mailroom_providers", "b", "ready=\"False\"", "2x20"),
            ],
            "alert_rule_test": [
                alert("16m", "MailroomNotTesting", json!([no_leader(
                    "No replica of mailroom mail/mailroom has been testing for 10m",
                )])),
                alert("16m", "MailroomMailboxesNotReady", json!([{
                    "exp_labels": {"severity": "warning", "namespace": "other", "job": "mailroom-metrics"},
                    "exp_annotations": {
                        "summary": "Mailboxes have been failing without a break for 15m; 2 are not Ready now",
                        "description": "Which, and why: kubectl get imp -A (not necessarily the \
                            same mailboxes all along; metrics.perProvider names each one that \
                            failed throughout in an alert of its own)",
                    },
                }])),
            ],
        }],
    });

    let mut files = Vec::new();
    for (file, test) in [
        ("per-provider.test.json", per_provider),
        ("counts.test.json", counts),
        ("two-releases.test.json", two_releases),
    ] {
        std::fs::write(
            dir.path().join(file),
            serde_json::to_string_pretty(&test).unwrap(),
        )
        .unwrap();
        files.push(file);
    }
    let promtool = |args: &[&str]| {
        let out = Command::new(&bins.promtool)
            .current_dir(dir.path())
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", bins.promtool.display()));
        assert!(
            out.status.success(),
            "promtool {} on the chart's alerts:\n{}",
            args.join(" "),
            text(&out)
        );
    };
    promtool(&[
        "check",
        "rules",
        "per-provider.json",
        "counts.json",
        "mail.json",
        "other.json",
    ]);
    let mut args = vec!["test", "rules"];
    args.extend(files);
    promtool(&args);
}

// ---------------------------------------------------------------------------------------
// On the bed.

/// The release of one test: named after its namespace, so that its cluster-scoped
/// objects (ClusterRoles) never meet another test's.
fn release(env: &Env) -> String {
    env.ns.clone()
}

fn fullname(release: &str) -> String {
    if release.contains("mailroom") {
        release.to_string()
    } else {
        format!("{release}-mailroom")
    }
}

fn install(helm: &Helm, release: &str, ns: &str, values: &[&str]) -> String {
    let mut a = vec!["install", release, CHART, "-n", ns];
    a.extend_from_slice(values);
    helm.ok(&a)
}

/// Every object of the release's manifest, as (kind, namespace, name).
fn manifest(helm: &Helm, release: &str, ns: &str) -> Vec<Value> {
    parse_documents(&helm.ok(&["get", "manifest", release, "-n", ns]))
}

fn exists(env: &Env, kind_: &str, ns: &str, name_: &str) -> bool {
    let mut args = vec!["get", kind_, name_, "--ignore-not-found", "-o", "name"];
    if !ns.is_empty() {
        args.extend_from_slice(&["-n", ns]);
    }
    let out = env.bed.kubectl().args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "kubectl get {kind_} {name_}: {}",
        text(&out)
    );
    !out.stdout.is_empty()
}

fn assert_all_exist(env: &Env, docs: &[Value], ns: &str) {
    for d in docs {
        let scoped = if namespace(d).is_empty() && !cluster_scoped(kind(d)) {
            ns
        } else {
            namespace(d)
        };
        assert!(
            exists(env, &kind_resource(d), scoped, name(d)),
            "{} {}/{} of the release is missing",
            kind(d),
            scoped,
            name(d)
        );
    }
}

fn cluster_scoped(kind_: &str) -> bool {
    matches!(
        kind_,
        "ClusterRole" | "ClusterRoleBinding" | "CustomResourceDefinition"
    )
}

/// `kind.group` for kubectl, unambiguous.
fn kind_resource(doc: &Value) -> String {
    let api = doc["apiVersion"].as_str().unwrap();
    match api.split_once('/') {
        Some((group, _)) => format!("{}.{group}", kind(doc).to_lowercase()),
        None => kind(doc).to_lowercase(),
    }
}

#[tokio::test]
async fn helm_install_upgrade_and_uninstall_on_the_bed() {
    let env = Env::new("chart-install").await;
    let helm = Helm::on_bed(&env);
    let rel = release(&env);
    let full = fullname(&rel);
    // crds.enabled=false: the bed's CRD is shared by every test (the CRD's own test below).
    install(
        &helm,
        &rel,
        &env.ns,
        &[
            "--set",
            "crds.enabled=false,replicas=2,networkPolicy.enabled=true",
        ],
    );
    let docs = manifest(&helm, &rel, &env.ns);
    let kinds: BTreeSet<&str> = docs.iter().map(kind).collect();
    for k in [
        "ServiceAccount",
        "Deployment",
        "Service",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "PodDisruptionBudget",
        "NetworkPolicy",
    ] {
        assert!(kinds.contains(k), "{k} not in the release: {kinds:?}");
    }
    assert_all_exist(&env, &docs, &env.ns);
    assert!(exists(&env, "clusterrole", "", &format!("{full}-view")));
    assert!(exists(&env, "clusterrole", "", &format!("{full}-edit")));

    // A provider of a user, which outlives the release.
    trust_bed_ca(&env).await;
    env.apply(&provider(
        "kept",
        "IMAP",
        env.bed.dovecot().imaps_port(),
        "Implicit",
        "{method: None}",
        "",
    ));

    // Upgrade: one replica (the PDB goes), this namespace only (Roles instead of the
    // ClusterRole), text logs.
    helm.ok(&[
        "upgrade",
        &rel,
        CHART,
        "-n",
        &env.ns,
        "--set",
        "crds.enabled=false,replicas=1,networkPolicy.enabled=true,logging.format=text",
        "--set-json",
        &format!(r#"watchNamespaces=["{}"]"#, env.ns),
    ]);
    let out = env.kubectl(&["get", "deployment", &full, "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let deployment: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(deployment["spec"]["replicas"], 1);
    let live_args = &deployment["spec"]["template"]["spec"]["containers"][0]["args"];
    assert!(
        live_args
            .as_array()
            .unwrap()
            .contains(&json!("--log-format=text"))
            && live_args
                .as_array()
                .unwrap()
                .contains(&json!(format!("--namespace={}", env.ns))),
        "{live_args}"
    );
    assert!(
        !exists(&env, "poddisruptionbudget", &env.ns, &full),
        "PDB with one replica"
    );
    assert!(!exists(
        &env,
        "clusterrole",
        "",
        &format!("{full}-controller")
    ));
    assert!(!exists(
        &env,
        "clusterrolebinding",
        "",
        &format!("{full}-controller")
    ));
    assert!(exists(&env, "role", &env.ns, &format!("{full}-controller")));
    let docs = manifest(&helm, &rel, &env.ns);
    assert_all_exist(&env, &docs, &env.ns);

    helm.ok(&["uninstall", &rel, "-n", &env.ns]);
    for d in &docs {
        let ns = if cluster_scoped(kind(d)) { "" } else { &env.ns };
        assert!(
            !exists(&env, &kind_resource(d), ns, name(d)),
            "{} {} outlived helm uninstall",
            kind(d),
            name(d)
        );
    }
    assert!(exists(
        &env,
        "customresourcedefinition",
        "",
        "incomingmailproviders.mailroom.dev"
    ));
    assert!(
        exists(&env, "incomingmailprovider", &env.ns, "kept"),
        "a user's provider was deleted"
    );
}

#[tokio::test]
async fn the_charts_crd_is_adopted_and_kept_by_uninstall() {
    // This test writes the chart's CRD over the one every test of the run uses: never a
    // stale copy.
    assert_chart_crd_is_current();
    let env = Env::new("chart-crd").await;
    let helm = Helm::on_bed(&env);
    let rel = release(&env);
    trust_bed_ca(&env).await;
    env.apply(&provider(
        "survivor",
        "IMAP",
        env.bed.dovecot().imaps_port(),
        "Implicit",
        "{method: None}",
        "",
    ));

    // The CRD exists already (applied from crds/ like `kubectl apply -f crds/`): helm
    // refuses to take it over silently...
    let values = ["--set", "rbac.userRoles=false"];
    let mut a = vec!["install", rel.as_str(), CHART, "-n", env.ns.as_str()];
    a.extend_from_slice(&values);
    let out = helm.run(&a);
    assert!(
        !out.status.success() && text(&out).contains("incomingmailproviders.mailroom.dev"),
        "expected helm to refuse the existing CRD; it said:\n{}",
        text(&out)
    );
    // ...and adopts it when told to. The chart's CRD has the same spec (see
    // the_crd_is_the_generated_one_and_kept_on_uninstall), so other tests see no change.
    a.push("--take-ownership");
    let out = helm.run(&a);
    assert!(
        out.status.success(),
        "helm install --take-ownership: {}",
        text(&out)
    );
    let out = env
        .bed
        .kubectl()
        .args([
            "get",
            "crd",
            "incomingmailproviders.mailroom.dev",
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    let crd: Value = serde_json::from_slice(&out.stdout).unwrap();
    let annotations = &crd["metadata"]["annotations"];
    assert_eq!(
        annotations["helm.sh/resource-policy"], "keep",
        "{annotations}"
    );
    assert_eq!(
        annotations["meta.helm.sh/release-name"],
        json!(rel),
        "{annotations}"
    );

    helm.ok(&["uninstall", &rel, "-n", &env.ns]);
    assert!(exists(
        &env,
        "customresourcedefinition",
        "",
        "incomingmailproviders.mailroom.dev"
    ));
    let out = env
        .bed
        .kubectl()
        .args([
            "wait",
            "--for=condition=Established",
            "--timeout=10s",
            "crd/incomingmailproviders.mailroom.dev",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(exists(&env, "incomingmailprovider", &env.ns, "survivor"));
    assert!(
        !exists(&env, "deployment", &env.ns, &fullname(&rel)),
        "the rest is gone"
    );
}

#[tokio::test]
async fn people_get_providers_through_the_view_and_edit_roles() {
    let env = Env::new("chart-users").await;
    let helm = Helm::on_bed(&env);
    let rel = release(&env);
    let full = fullname(&rel);
    install(
        &helm,
        &rel,
        &env.ns,
        &["--set", "crds.enabled=false,leaderElection.enabled=false"],
    );
    trust_bed_ca(&env).await;
    env.secret(
        "alice",
        &[("username", "alice"), ("password", "not-for-viewers")],
    )
    .await;
    env.apply(&provider(
        "shared",
        "IMAP",
        env.bed.dovecot().imaps_port(),
        "Implicit",
        "{method: None}",
        "",
    ));
    env.apply(&provider(
        "other",
        "IMAP",
        env.bed.dovecot().imaps_port(),
        "Implicit",
        "{method: None}",
        "",
    ));

    let bind = |user: &str, role: &str, kind_: &str| {
        let out = env.kubectl(&[
            "create",
            "rolebinding",
            &format!("{user}-{role}"),
            &format!("--{}={role}", kind_.to_lowercase()),
            &format!("--user={user}"),
        ]);
        assert!(out.status.success(), "{}", text(&out));
    };
    bind("vera", &format!("{full}-view"), "ClusterRole");
    bind("ed", &format!("{full}-edit"), "ClusterRole");
    let can = |user: &str, verb: &str, what: &str| {
        let out = env.kubectl(&["auth", "can-i", "--as", user, verb, what]);
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    // The API server's authorizer learns of the bindings from its own watch, a moment
    // after they are stored.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(can("vera", "get", "incomingmailproviders.mailroom.dev")
        && can("ed", "create", "incomingmailproviders.mailroom.dev"))
    {
        assert!(Instant::now() < deadline, "the bindings took no effect");
        std::thread::sleep(Duration::from_millis(200));
    }
    for verb in ["get", "list", "watch"] {
        assert!(
            can("vera", verb, "incomingmailproviders.mailroom.dev"),
            "vera {verb}"
        );
        assert!(
            can("ed", verb, "incomingmailproviders.mailroom.dev"),
            "ed {verb}"
        );
    }
    for verb in ["create", "update", "patch", "delete"] {
        assert!(
            !can("vera", verb, "incomingmailproviders.mailroom.dev"),
            "vera {verb}"
        );
        assert!(
            can("ed", verb, "incomingmailproviders.mailroom.dev"),
            "ed {verb}"
        );
    }
    for user in ["vera", "ed"] {
        assert!(!can(user, "get", "secrets"), "{user} reads Secrets");
        let out = env.kubectl(&[
            "auth",
            "can-i",
            "--as",
            user,
            "patch",
            "incomingmailproviders.mailroom.dev",
            "--subresource=status",
        ]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "no",
            "{user} writes status"
        );
    }

    // For real, not only by review.
    let out = env.kubectl(&["--as", "vera", "get", "imp", "shared", "-o", "name"]);
    assert!(out.status.success(), "vera get: {}", text(&out));
    let out = env.kubectl(&["--as", "vera", "get", "secret", "alice"]);
    assert!(
        text(&out).contains("forbidden"),
        "vera get secret: {}",
        text(&out)
    );
    let manifest = provider("by-vera", "IMAP", 993, "Implicit", "{method: None}", "");
    let create = |user: &str, yaml: &str| {
        let mut cmd = env.bed.kubectl();
        cmd.args(["-n", &env.ns, "--as", user, "create", "-f", "-"]);
        with_input(cmd, yaml)
    };
    let out = create("vera", &manifest);
    assert!(
        !out.status.success() && text(&out).contains("forbidden"),
        "vera create: {}",
        text(&out)
    );
    let out = create(
        "ed",
        &provider("by-ed", "IMAP", 993, "Implicit", "{method: None}", ""),
    );
    assert!(out.status.success(), "ed create: {}", text(&out));
    let out = env.kubectl(&[
        "--as",
        "ed",
        "annotate",
        "imp/by-ed",
        "mailroom.dev/check-requested-at=2026-01-01T00:00:00Z",
        "--overwrite",
    ]);
    assert!(out.status.success(), "ed asks for a test: {}", text(&out));

    // Per-provider access (docs/security.md): a Role with resourceNames.
    let role = "apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: shared-provider-owner}
rules:
- apiGroups: [mailroom.dev]
  resources: [incomingmailproviders]
  resourceNames: [shared]
  verbs: [get, update, patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: olga-shared}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: shared-provider-owner}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: olga}]
";
    env.apply(role);
    // The API server's authorizer learns of a new RoleBinding from its own watch, a moment
    // after it is stored.
    let deadline = Instant::now() + Duration::from_secs(10);
    let out = loop {
        let out = env.kubectl(&[
            "--as",
            "olga",
            "annotate",
            "imp/shared",
            "mailroom.dev/check-requested-at=now",
            "--overwrite",
        ]);
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(out.status.success(), "olga on her provider: {}", text(&out));
    let out = env.kubectl(&["--as", "olga", "get", "imp", "other"]);
    assert!(
        text(&out).contains("forbidden"),
        "olga on another provider: {}",
        text(&out)
    );
}

// ---------------------------------------------------------------------------------------
// GitOps: the Argo CD health check and the kubectl wait recipe of docs/gitops.md.

const LUA_HARNESS: &str = r#"
-- Argo CD's contract: the object as the global `obj`; the script returns {status, message}.
local cjson = require("cjson")
obj = cjson.decode(io.read("a"))
local hs = dofile(arg[1])
io.write(hs.status, "\n", hs.message or "", "\n")
"#;

/// The Argo CD health of the provider as the API server returns it now.
fn argocd_health(env: &Env, name_: &str) -> (String, String) {
    let out = env.kubectl(&["get", "imp", name_, "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let harness = env.dir.path().join("argocd-harness.lua");
    std::fs::write(&harness, LUA_HARNESS).unwrap();
    let mut child = Command::new("lua5.4")
        .arg(&harness)
        .arg(format!("{REPO}/docs/argocd-health.lua"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running lua5.4 (tests/testbed/prepare installs it)");
    child.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    let result = child.wait_with_output().unwrap();
    assert!(
        result.status.success(),
        "the health check failed to run: {}",
        text(&result)
    );
    let stdout = String::from_utf8_lossy(&result.stdout).to_string();
    let mut lines = stdout.lines();
    (
        lines.next().unwrap_or_default().to_string(),
        lines.next().unwrap_or_default().to_string(),
    )
}

/// Flux's verdict on provider `name` now, by the `healthCheckExprs` of
/// docs/flux-kustomization.yaml, evaluated by the API server's own CEL (cel-go, as in
/// Flux): a ValidatingAdmissionPolicy refuses a server-side dry run of the provider
/// marked `flux-health-probe`, saying what each expression gives. Flux binds the
/// object's fields (`status`, `metadata`) where a policy binds `object`.
async fn flux_health(env: &Env, name_: &str) -> BTreeMap<String, bool> {
    let policy = format!("flux-health-{}", env.ns);
    let exists = env.kubectl(&["get", "validatingadmissionpolicy", &policy]);
    if !exists.status.success() {
        let docs = parse_documents(&repo_file("docs/flux-kustomization.yaml"));
        let ks = docs.iter().find(|d| kind(d) == "Kustomization").unwrap();
        let check = ks["spec"]["healthCheckExprs"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["kind"] == "IncomingMailProvider"))
            .expect("a health check for IncomingMailProvider");
        let roots = regex::Regex::new(r"(^|[^.\w])(status|metadata|spec)\b").unwrap();
        let said: Vec<String> = ["current", "failed", "inProgress"]
            .iter()
            .map(|key| {
                let expr = check[*key].as_str().expect("the expression");
                let expr = roots.replace_all(expr, "${1}object.${2}");
                format!("'{key}=' + string({expr})")
            })
            .collect();
        let manifest = json!([
            {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
             "metadata": {"name": policy},
             "spec": {"failurePolicy": "Fail",
                "matchConstraints": {"resourceRules": [{"apiGroups": ["mailroom.dev"], "apiVersions": ["*"],
                    "operations": ["UPDATE"], "resources": ["incomingmailproviders"]}]},
                "matchConditions": [{"name": "probe", "expression":
                    "has(object.metadata.annotations) && 'flux-health-probe' in object.metadata.annotations"}],
                "validations": [{"expression": "false", "messageExpression": said.join(" + ',' + ")}]}},
            {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
             "metadata": {"name": policy},
             "spec": {"policyName": policy, "validationActions": ["Deny"],
                "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": env.ns}}}}},
        ]);
        for doc in manifest.as_array().unwrap() {
            env.apply(&serde_json::to_string(doc).unwrap());
        }
    }
    // Until the policy takes effect, the dry run is let through.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = env.kubectl(&[
            "annotate",
            "--dry-run=server",
            "--overwrite",
            &format!("imp/{name_}"),
            "flux-health-probe=1",
        ]);
        let said = String::from_utf8_lossy(&out.stderr).to_string();
        if let Some(at) = said.find("current=") {
            return said[at..]
                .trim()
                .split(',')
                .map(|pair| {
                    let (key, value) = pair.split_once('=').unwrap();
                    (key.to_string(), value == "true")
                })
                .collect();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the probe policy never answered: {said}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Flux's three verdicts, as `flux_health` returns them.
fn flux(current: bool, failed: bool, in_progress: bool) -> BTreeMap<String, bool> {
    [
        ("current", current),
        ("failed", failed),
        ("inProgress", in_progress),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

#[test]
fn the_gitops_guide_shows_the_health_check_that_is_tested() {
    let guide = repo_file("docs/gitops.md");
    let lua = repo_file("docs/argocd-health.lua");
    let indented: String = lua
        .lines()
        .map(|l| {
            if l.is_empty() {
                "\n".to_string()
            } else {
                format!("    {l}\n")
            }
        })
        .collect();
    assert!(
        guide.contains(&lua) || guide.contains(&indented),
        "docs/gitops.md must show docs/argocd-health.lua as it is (indented by 4 in the argocd-cm example)"
    );
    let flux: Vec<Value> = parse_documents(&repo_file("docs/flux-kustomization.yaml"));
    let ks = flux
        .iter()
        .find(|d| kind(d) == "Kustomization")
        .expect("a Flux Kustomization in docs/flux-kustomization.yaml");
    assert_eq!(ks["spec"]["wait"], true, "{ks}");
    assert!(guide.contains("kubectl wait --for=condition=Ready"));
}

#[tokio::test]
async fn the_argocd_and_flux_health_checks_read_real_providers() {
    let env = alice_env("argocd").await;
    wrong_password_secret(&env).await;
    let port = env.bed.dovecot().imaps_port();
    env.apply(&provider("good", "IMAP", port, "Implicit", ALICE_AUTH, ""));
    env.apply(&provider("bad", "IMAP", port, "Implicit", WRONG_AUTH, ""));
    env.apply(&provider(
        "paused",
        "IMAP",
        port,
        "Implicit",
        ALICE_AUTH,
        "  suspend: true\n",
    ));
    // A fault that may pass by itself: a port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind((mailroom_testbed::MAIL_HOST, 0)).unwrap();
        l.local_addr().unwrap().port()
    };
    env.apply(&provider(
        "closed", "IMAP", closed, "Implicit", ALICE_AUTH, "",
    ));

    // Before any test: no status.
    assert_eq!(argocd_health(&env, "good").0, "Progressing");

    let mut controller = env.controller();
    env.wait_reason("good", "Connected", Duration::from_secs(60))
        .await;
    env.wait_reason("bad", "AuthenticationFailed", Duration::from_secs(60))
        .await;
    env.wait_reason("paused", "Suspended", Duration::from_secs(60))
        .await;
    env.wait_reason("closed", "ConnectionRefused", Duration::from_secs(60))
        .await;
    // The kubectl wait recipe of docs/gitops.md.
    let out = env.kubectl(&["wait", "--for=condition=Ready", "imp/good", "--timeout=30s"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = env.kubectl(&[
        "wait",
        "--for=condition=Ready=False",
        "imp/bad",
        "--timeout=30s",
    ]);
    assert!(out.status.success(), "{}", text(&out));

    // Flux's health checks of docs/flux-kustomization.yaml on the same objects.
    assert_eq!(flux_health(&env, "good").await, flux(true, false, false));
    assert_eq!(flux_health(&env, "bad").await, flux(false, true, false));
    assert_eq!(flux_health(&env, "paused").await, flux(true, false, false));
    // One refused connection is no verdict yet: in progress (none of the three holds).
    assert_eq!(flux_health(&env, "closed").await, flux(false, false, false));

    let (status, message) = argocd_health(&env, "good");
    assert_eq!(status, "Healthy", "{message}");
    assert!(message.starts_with("Connected"), "{message}");
    let (status, message) = argocd_health(&env, "bad");
    assert_eq!(status, "Degraded", "{message}");
    assert!(message.starts_with("AuthenticationFailed: "), "{message}");
    // Paused on purpose: in its desired state, so a later sync wave is not held.
    let (status, message) = argocd_health(&env, "paused");
    assert_eq!(status, "Healthy", "{message}");
    assert!(message.starts_with("Suspended: "), "{message}");
    let (status, message) = argocd_health(&env, "closed");
    assert_eq!(status, "Progressing", "{message}");
    assert!(message.starts_with("ConnectionRefused: "), "{message}");

    // A spec the controller has not tested yet: Progressing, whatever Ready says.
    controller.terminate(Duration::from_secs(10));
    let out = env.kubectl(&[
        "patch",
        "imp",
        "good",
        "--type=merge",
        "-p",
        r#"{"spec":{"check":{"interval":"10m"}}}"#,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let (status, message) = argocd_health(&env, "good");
    assert_eq!(status, "Progressing", "{message}");
    assert!(flux_health(&env, "good").await["inProgress"]);
    // Ready Unknown (a first test still running): Progressing.
    let out = env.kubectl(&["get", "imp", "bad", "-o", "jsonpath={.metadata.generation}"]);
    let generation: i64 = String::from_utf8_lossy(&out.stdout).parse().unwrap();
    let status_patch = json!({"status": {"observedGeneration": generation, "conditions": [{
        "type": "Ready", "status": "Unknown", "reason": "Checking", "message": "first test running",
        "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": generation,
    }]}});
    let out = env.kubectl(&[
        "patch",
        "imp",
        "bad",
        "--subresource=status",
        "--type=merge",
        "-p",
        &status_patch.to_string(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let (status, message) = argocd_health(&env, "bad");
    assert_eq!(status, "Progressing", "{message}");
    // The refused connection, three tests in a row: now a verdict.
    let out = env.kubectl(&[
        "patch",
        "imp",
        "closed",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"consecutiveFailures":3}}"#,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(flux_health(&env, "closed").await, flux(false, true, false));
    let (status, message) = argocd_health(&env, "closed");
    assert_eq!(status, "Degraded", "{message}");
}

#[test]
fn the_default_image_is_what_the_dockerfile_builds() {
    let chart: serde_yaml::Value =
        serde_yaml::from_str(&repo_file("charts/mailroom/Chart.yaml")).unwrap();
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "Chart.yaml appVersion (the default image tag) and Cargo.toml's version move together"
    );
    let dockerfile = repo_file("Dockerfile");
    assert!(dockerfile.contains("cargo build --release --locked --bin mailroom"));
    assert!(dockerfile.contains("\nUSER 65532:65532\n"), "{dockerfile}");
    assert!(dockerfile.contains("\nENTRYPOINT [\"/mailroom\"]\n"));
    let docs = Helm::offline().render("mailroom", "s", &[]);
    let pod = &only(&docs, "Deployment")["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(pod["securityContext"]["runAsGroup"], 65532);
}

// ---------------------------------------------------------------------------------------
// The controller itself, run as the chart's ServiceAccount (a TokenRequest token), with
// the arguments and environment the chart's Deployment gives it.

use std::path::Path;
use std::time::Instant;

use crate::support::{Controller, MAILROOM};

fn kubectl_in(env: &Env, ns: &str, args: &[&str]) -> Output {
    let mut cmd = env.bed.kubectl();
    cmd.arg("-n").arg(ns).args(args);
    cmd.output().expect("running kubectl")
}

fn apply_in(env: &Env, ns: &str, yaml: &str) {
    let mut cmd = env.bed.kubectl();
    cmd.args(["-n", ns, "apply", "-f", "-"]);
    let out = with_input(cmd, yaml);
    assert!(
        out.status.success(),
        "kubectl apply -n {ns} failed:\n{}\nmanifest:\n{yaml}",
        text(&out)
    );
}

/// The bed's CA and alice's Secret (right or wrong password) in `ns`.
fn mail_basics(env: &Env, ns: &str, password: Option<&str>) {
    let (user, right) = env.bed.dovecot().account("alice");
    let password = password.unwrap_or(&right);
    let ca = std::fs::read_to_string(env.bed.dovecot().ca_file()).unwrap();
    let cm = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "test-ca"},
        "data": {"ca.crt": ca},
    });
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "alice"},
        "stringData": {"username": user, "password": password},
    });
    apply_in(env, ns, &serde_json::to_string(&cm).unwrap());
    apply_in(env, ns, &serde_json::to_string(&secret).unwrap());
}

/// A kubeconfig holding only a TokenRequest token of `sa` in `ns` (never the admin's
/// client certificate).
fn token_kubeconfig(env: &Env, ns: &str, sa: &str, file: &str) -> PathBuf {
    let out = kubectl_in(env, ns, &["create", "token", sa, "--duration=1h"]);
    assert!(
        out.status.success(),
        "kubectl create token {sa}: {}",
        text(&out)
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "bed", "cluster": {
            "server": env.bed.server_url(),
            "certificate-authority": env.bed.kube_ca_file(),
        }}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": sa, "context": {"cluster": "bed", "user": sa, "namespace": ns}}],
        "current-context": sa,
    });
    let path = env.dir.path().join(file);
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    path
}

fn kubectl_as(env: &Env, kubeconfig: &Path, args: &[&str]) -> Output {
    Command::new(env.bed.kubectl_path())
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .unwrap()
}

/// `kubectl auth can-i --list -n ns` as the kubeconfig's user, as permissions:
/// (resource as kubectl prints it, e.g. `leases.coordination.k8s.io`, verb, name or "*").
fn can_i_list(env: &Env, kubeconfig: &Path, ns: &str) -> BTreeSet<(String, String, String)> {
    let out = kubectl_as(env, kubeconfig, &["auth", "can-i", "--list", "-n", ns]);
    assert!(
        out.status.success(),
        "kubectl auth can-i --list: {}",
        text(&out)
    );
    let mut set = BTreeSet::new();
    for line in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
        let groups: Vec<&str> = line
            .split('[')
            .skip(1)
            .map(|g| g.split(']').next().unwrap())
            .collect();
        let resource = line.split_whitespace().next().unwrap_or_default();
        if resource.starts_with('[') || groups.len() != 3 {
            // A non-resource URL: every authenticated user has the same ones.
            set.insert((
                format!("url:{}", groups.first().unwrap_or(&"")),
                groups.get(2).unwrap_or(&"").to_string(),
                "*".into(),
            ));
            continue;
        }
        let names: Vec<&str> = groups[1].split_whitespace().collect();
        let names = if names.is_empty() { vec!["*"] } else { names };
        for verb in groups[2].split_whitespace() {
            for n in &names {
                set.insert((resource.to_string(), verb.to_string(), n.to_string()));
            }
        }
    }
    set
}

/// Permissions in kubectl's spelling.
fn as_listed(p: &BTreeSet<Permission>) -> BTreeSet<(String, String, String)> {
    p.iter()
        .map(|(g, r, v, n)| {
            let resource = match (g.as_str(), r.split_once('/')) {
                ("", _) => r.clone(),
                (g, Some((r, sub))) => format!("{r}.{g}/{sub}"),
                (g, None) => format!("{r}.{g}"),
            };
            (resource, v.clone(), n.clone())
        })
        .collect()
}

/// What an account may do beyond what every authenticated account may (measured with a
/// fresh ServiceAccount bound to nothing, in the same namespace).
fn granted(
    env: &Env,
    kubeconfig: &Path,
    ns: &str,
    baseline: &Path,
) -> BTreeSet<(String, String, String)> {
    let all = can_i_list(env, kubeconfig, ns);
    let base = can_i_list(env, baseline, ns);
    all.difference(&base).cloned().collect()
}

fn baseline_account(env: &Env, ns: &str) -> PathBuf {
    let out = kubectl_in(env, ns, &["create", "serviceaccount", "nobody"]);
    assert!(out.status.success(), "{}", text(&out));
    token_kubeconfig(env, ns, "nobody", &format!("nobody-{ns}.kubeconfig"))
}

/// Runs `mailroom controller` as the chart's Deployment would: its args (metrics on a
/// free loopback port instead of 0.0.0.0:8080, plus `extra`), POD_NAME and POD_NAMESPACE,
/// and the kubeconfig given (a ServiceAccount token).
fn controller_as(
    env: &Env,
    kubeconfig: &Path,
    chart_args: &[String],
    extra: &[String],
    pod_ns: &str,
) -> Controller {
    let mut args: Vec<String> = chart_args
        .iter()
        .map(|a| {
            if a.starts_with("--metrics-addr=") {
                "--metrics-addr=127.0.0.1:0".to_string()
            } else if a.starts_with("--log=") {
                "--log=info,mailroom=debug".to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    args.extend_from_slice(extra);
    let log = env.dir.path().join(format!(
        "controller-as-sa-{}.log",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(MAILROOM)
        .args(&args)
        .env("KUBECONFIG", kubeconfig)
        .env("POD_NAME", format!("{pod_ns}-controller-0"))
        .env("POD_NAMESPACE", pod_ns)
        .env_remove("MAILROOM_NAMESPACES")
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("starting mailroom controller");
    Controller { child, log }
}

/// Waits until the provider's Ready reason is `reason` and returns its Ready condition; on
/// timeout, says what it saw and what the controller logged.
async fn wait_ready_reason(
    env: &Env,
    ns: &str,
    name_: &str,
    reason: &str,
    controller: &Controller,
) -> Value {
    wait_ready_reason_within(env, ns, name_, reason, controller, Duration::from_secs(90)).await
}

async fn wait_ready_reason_within(
    env: &Env,
    ns: &str,
    name_: &str,
    reason: &str,
    controller: &Controller,
    within: Duration,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let out = kubectl_in(env, ns, &["get", "imp", name_, "-o", "json"]);
        let p = serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null);
        let ready = p["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Ready"));
        if let Some(ready) = ready.filter(|c| c["reason"] == reason) {
            return ready.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{ns}/{name_}: expected Ready reason {reason} within {within:?}; status was:\n{}\ncontroller log ({}):\n{}",
            serde_json::to_string_pretty(&p["status"]).unwrap(),
            controller.log.display(),
            controller.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The container args the chart renders for these values.
fn chart_args(helm: &Helm, release: &str, ns: &str, values: &[&str]) -> Vec<String> {
    args(&helm.render(release, ns, values))
}

#[tokio::test]
async fn the_controller_works_with_the_charts_service_account_and_nothing_more() {
    let env = Env::new("chart-sa").await;
    let helm = Helm::on_bed(&env);
    let rel = release(&env);
    let full = fullname(&rel);
    // The bed's token server, below, is on this host's loopback.
    let values = [
        "--set",
        "crds.enabled=false,rbac.userRoles=false,oauth2.allowLoopback=true",
    ];
    install(&helm, &rel, &env.ns, &values);

    let kubeconfig = token_kubeconfig(&env, &env.ns, &full, "controller.kubeconfig");
    let baseline = baseline_account(&env, &env.ns);
    let mut expected = as_listed(&controller_permissions(true));
    expected.extend(as_listed(&lease_permissions(&full)));
    assert_eq!(
        granted(&env, &kubeconfig, &env.ns, &baseline),
        expected,
        "kubectl auth can-i --list -n {} as the chart's ServiceAccount, beyond what every account may",
        env.ns
    );
    // Elsewhere: the same cluster-wide rules, no Lease.
    let other = env.bed.namespace("chart-sa-other");
    let base_other = baseline_account(&env, &other);
    assert_eq!(
        granted(&env, &kubeconfig, &other, &base_other),
        as_listed(&controller_permissions(true))
    );

    mail_basics(&env, &env.ns, None);
    env.apply_alice_imaps("as-sa");
    let chart = chart_args(&helm, &rel, &env.ns, &values);
    // The chart watches every namespace; on the shared bed this one only.
    let controller = controller_as(
        &env,
        &kubeconfig,
        &chart,
        &[format!("--namespace={}", env.ns)],
        &env.ns,
    );
    wait_ready_reason(&env, &env.ns, "as-sa", "Connected", &controller).await;
    // A first failure is recorded as an Event (a first success is not): a POP3 server
    // where IMAP is expected.
    env.apply(&provider(
        "as-sa-wrong",
        "IMAP",
        env.bed.dovecot().pop3s_port(),
        "Implicit",
        ALICE_AUTH,
        "",
    ));
    wait_ready_reason(&env, &env.ns, "as-sa-wrong", "ProtocolError", &controller).await;

    // OAuth2: an expired access token is refreshed and the rotated refresh token written
    // back, with the chart's rights (update, never create).
    let server = mailroom_testbed::TokenServer::start(env.bed.oauth());
    server.register_client("mailroom-chart", None, None);
    let first = server.grant("alice", "mailroom-chart");
    env.token_secret(
        "alice-token",
        &[
            ("refresh_token", &first),
            ("access_token", "expired"),
            ("expires_at", "2020-01-01T00:00:00Z"),
        ],
    )
    .await;
    env.apply(&provider(
        "as-sa-oauth2",
        "IMAP",
        env.bed.dovecot().imaps_port(),
        "Implicit",
        &format!(
            "{{method: OAuth2, username: alice, oauth2: {{provider: Generic, clientId: mailroom-chart, tokenURL: '{}', tokenSecretRef: {{name: alice-token}}}}}}",
            server.token_url()
        ),
        "",
    ));
    wait_ready_reason(&env, &env.ns, "as-sa-oauth2", "Connected", &controller).await;
    let stored = kubectl_in(
        &env,
        &env.ns,
        &[
            "get",
            "secret",
            "alice-token",
            "-o",
            "jsonpath={.data.refresh_token}",
        ],
    );
    use base64::Engine as _;
    let stored = base64::engine::general_purpose::STANDARD
        .decode(String::from_utf8_lossy(&stored.stdout).trim())
        .unwrap();
    let stored = String::from_utf8(stored).unwrap();
    assert_ne!(stored, first, "the rotated refresh token was not stored");
    assert!(server.refresh_token_valid(&stored));

    // The release's own Lease, named after it.
    let lease = env.kubectl(&[
        "get",
        "lease",
        &full,
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&lease.stdout),
        format!("{}-controller-0", env.ns),
        "the Lease holder: {}",
        text(&lease)
    );
    let events = env.kubectl(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=as-sa-wrong",
        "-o",
        "name",
    ]);
    assert!(
        !events.stdout.is_empty(),
        "no Event written as the ServiceAccount: {}",
        text(&events)
    );
    let logs = controller.logs();
    assert!(
        !logs.to_lowercase().contains("forbidden"),
        "the controller was refused something:\n{logs}"
    );
}

#[tokio::test]
async fn watch_namespaces_confines_the_controller_to_them() {
    let env = Env::new("chart-scoped").await;
    let helm = Helm::on_bed(&env);
    let rel = release(&env);
    let full = fullname(&rel);
    let team_a = env.bed.namespace("team-a");
    let team_b = env.bed.namespace("team-b");
    let values_json = format!(r#"watchNamespaces=["{team_a}"]"#);
    let values = [
        "--set",
        "crds.enabled=false,rbac.userRoles=false",
        "--set-json",
        values_json.as_str(),
    ];
    install(&helm, &rel, &env.ns, &values);
    let kubeconfig = token_kubeconfig(&env, &env.ns, &full, "controller.kubeconfig");
    mail_basics(&env, &team_a, None);
    mail_basics(&env, &team_b, None);

    let can = |verb: &str, what: &str, ns: &str| {
        let out = kubectl_as(&env, &kubeconfig, &["auth", "can-i", verb, what, "-n", ns]);
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    assert!(can("get", "secrets", &team_a));
    assert!(can("list", "incomingmailproviders.mailroom.dev", &team_a));
    assert!(!can("get", "secrets", &team_b));
    assert!(!can("list", "incomingmailproviders.mailroom.dev", &team_b));
    assert!(
        !can("get", "secrets", &env.ns),
        "not even in its own namespace"
    );
    let out = kubectl_as(
        &env,
        &kubeconfig,
        &["get", "secret", "alice", "-n", &team_b],
    );
    assert!(
        !out.status.success() && text(&out).contains("forbidden"),
        "reading a Secret of {team_b}: {}",
        text(&out)
    );
    let out = kubectl_as(&env, &kubeconfig, &["get", "imp", "-A"]);
    assert!(
        !out.status.success(),
        "listing providers cluster-wide: {}",
        text(&out)
    );
    let baseline = baseline_account(&env, &team_b);
    assert_eq!(
        granted(&env, &kubeconfig, &team_b, &baseline),
        BTreeSet::new()
    );

    let port = env.bed.dovecot().imaps_port();
    apply_in(
        &env,
        &team_b,
        &provider("elsewhere", "IMAP", port, "Implicit", ALICE_AUTH, ""),
    );
    apply_in(
        &env,
        &team_a,
        &provider("mine", "IMAP", port, "Implicit", ALICE_AUTH, ""),
    );
    let chart = chart_args(&helm, &rel, &env.ns, &values);
    assert!(
        chart.contains(&format!("--namespace={team_a}")),
        "{chart:?}"
    );
    let controller = controller_as(&env, &kubeconfig, &chart, &[], &env.ns);

    wait_ready_reason(&env, &team_a, "mine", "Connected", &controller).await;
    // A test of the same server has just finished in team-a; team-b's provider is untouched.
    let out = kubectl_in(&env, &team_b, &["get", "imp", "elsewhere", "-o", "json"]);
    let p: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        p.get("status")
            .is_none_or(|s| s.is_null() || s == &json!({})),
        "{team_b}/elsewhere was touched: {}",
        p["status"]
    );
    let logs = controller.logs();
    assert!(
        !logs.to_lowercase().contains("forbidden"),
        "the controller tried beyond its namespaces:\n{logs}"
    );
}

/// A release of the chart watching two namespaces of their own, team-a and team-b, each
/// trusting the bed's CA and holding alice's login; the controller's arguments as the
/// chart renders them, and a kubeconfig with its account's token.
struct TwoTeams {
    full: String,
    team_a: String,
    team_b: String,
    chart: Vec<String>,
    kubeconfig: std::path::PathBuf,
}

async fn two_teams(env: &Env) -> TwoTeams {
    let helm = Helm::on_bed(env);
    let rel = release(env);
    let full = fullname(&rel);
    let team_a = env.bed.namespace("team-a");
    let team_b = env.bed.namespace("team-b");
    let values_json = format!(r#"watchNamespaces=["{team_a}","{team_b}"]"#);
    let values = [
        "--set",
        "crds.enabled=false,rbac.userRoles=false",
        "--set-json",
        values_json.as_str(),
    ];
    install(&helm, &rel, &env.ns, &values);
    let kubeconfig = token_kubeconfig(env, &env.ns, &full, "controller.kubeconfig");
    mail_basics(env, &team_a, None);
    mail_basics(env, &team_b, None);
    let chart = chart_args(&helm, &rel, &env.ns, &values);
    TwoTeams {
        full,
        team_a,
        team_b,
        chart,
        kubeconfig,
    }
}

/// One watched namespace whose Secrets the controller may not list (its Role edited, or
/// its RoleBinding gone with it) stops no other: the other namespace is tested at once,
/// and the failing watch backs off (it retried twice a second, for ever).
#[tokio::test]
async fn a_namespace_whose_secrets_are_forbidden_stops_no_other() {
    let env = Env::new("chart-forbidden").await;
    let TwoTeams {
        full,
        team_a,
        team_b,
        chart,
        kubeconfig,
    } = two_teams(&env).await;
    // team-b's Role without its Secrets rule.
    let original = controller_role(&env, &team_b, &full);
    let replace_role = |role: &Value| replace(&env, &team_b, role);
    replace_role(&without_secrets(&original));
    let out = kubectl_as(
        &env,
        &kubeconfig,
        &["auth", "can-i", "list", "secrets", "-n", &team_b],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "no");

    let port = env.bed.dovecot().imaps_port();
    for ns in [&team_a, &team_b] {
        apply_in(
            &env,
            ns,
            &provider("mine", "IMAP", port, "Implicit", ALICE_AUTH, ""),
        );
    }
    // team-b's provider without a login references only a ConfigMap, which may be read.
    apply_in(
        &env,
        &team_b,
        &provider("anon", "IMAP", port, "Implicit", "{method: None}", ""),
    );
    let started = Instant::now();
    let mut controller = controller_as(&env, &kubeconfig, &chart, &[], &env.ns);
    wait_ready_reason(&env, &team_a, "mine", "Connected", &controller).await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{team_a} waited for {team_b}: {:?}",
        started.elapsed()
    );
    // team-b's provider is waiting for its Secrets (15 s of refusals before it says so): a
    // stop does not wait for it (the grace period would run out before the Lease is
    // released).
    let asked = Instant::now();
    let status = controller.terminate(Duration::from_secs(40));
    let took = asked.elapsed();
    assert!(
        status.is_some_and(|s| s.success()) && took < Duration::from_secs(5),
        "exit {status:?} {took:?} after SIGTERM:\n{}",
        controller.logs()
    );
    assert!(
        controller.logs().contains("released the lease"),
        "{}",
        controller.logs()
    );

    // Again, until team-b's provider says why it is not tested.
    let started = Instant::now();
    let controller = controller_as(&env, &kubeconfig, &chart, &[], &env.ns);
    wait_ready_reason(&env, &team_b, "anon", "Connected", &controller).await;
    let ready = wait_ready_reason(&env, &team_b, "mine", "AccessDenied", &controller).await;
    let message = ready["message"].as_str().unwrap();
    assert_eq!(ready["status"], "False", "{ready}");
    for needed in [
        format!("may not read secrets in namespace {team_b}"),
        "forbidden".to_string(),
        "get, list and watch".to_string(),
    ] {
        assert!(message.contains(&needed), "{needed:?} not in {message:?}");
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "AccessDenied after {took:?}:\n{}",
        controller.logs()
    );
    let events = kubectl_in(&env, &team_b, &["get", "events", "-o", "json"]);
    assert!(
        text(&events).contains("AccessDenied"),
        "a Warning Event says it: {}",
        text(&events)
    );
    // A test asked for meanwhile (`mailroom retest`) is answered: the request echoed with
    // the same AccessDenied, not left for the retest to time out on.
    let out = kubectl_in(
        &env,
        &team_b,
        &[
            "annotate",
            "imp",
            "mine",
            "mailroom.dev/check-requested-at=while-denied",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let asked = Instant::now();
    loop {
        let out = kubectl_in(
            &env,
            &team_b,
            &[
                "get",
                "imp",
                "mine",
                "-o",
                "jsonpath={.status.lastHandledCheckRequest}",
            ],
        );
        if String::from_utf8_lossy(&out.stdout) == "while-denied" {
            break;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(15),
            "the request was not echoed while access is denied:\n{}",
            controller.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(started.elapsed())).await;
    let logs = controller.logs();
    let retries = logs
        .lines()
        .filter(|l| l.contains("watch failed") && l.contains("Secrets"))
        .count();
    // 0.5 s doubling to 5 s, with jitter: about 7 attempts in 20 s.
    assert!(
        (1..=12).contains(&retries),
        "{retries} failed attempts of the Secrets watch in 20 s:\n{logs}"
    );
    // The metric names what it cannot list, and nothing else.
    assert_unlisted(&controller, &[0, 1, 0], "team-b's Secrets refused").await;

    // The Role given back its Secrets rule: tested at once, Ready.
    replace_role(&original);
    let restored = Instant::now();
    wait_ready_reason(&env, &team_b, "mine", "Connected", &controller).await;
    assert!(
        restored.elapsed() < Duration::from_secs(20),
        "Connected {:?} after the Role was restored:\n{}",
        restored.elapsed(),
        controller.logs()
    );

    // Listed and watched, but not to be read (`get` taken away): a changed Secret cannot be
    // fetched, and the provider says so.
    let mut no_get = original.clone();
    for rule in no_get["rules"].as_array_mut().unwrap() {
        if rule["resources"].to_string().contains("secrets") {
            rule["verbs"] = json!(["list", "watch"]);
        }
    }
    replace_role(&no_get);
    let out = kubectl_in(&env, &team_b, &["label", "secret", "alice", "rotated=1"]);
    assert!(out.status.success(), "{}", text(&out));
    let ready = wait_ready_reason(&env, &team_b, "mine", "AccessDenied", &controller).await;
    let message = ready["message"].to_string();
    assert!(
        message.contains("may not read a Secret or ConfigMap")
            && message.contains("cannot get resource")
            && message.contains(&format!("on secrets in namespace {team_b} through a Role")),
        "{message}"
    );
}

/// A namespace whose Secrets the controller may no longer list after it has listed them (its
/// Role edited while the controller runs): once the Secrets' watch is made again (within a
/// minute) and refused, the provider there says `AccessDenied`. The rule given back, the
/// provider is tested again and the namespace is no longer counted unlisted, though
/// nothing in it changed: the watch, resumed from where it was, yields nothing (the
/// refusal used to stand until something changed there, the provider `AccessDenied` all
/// that while).
#[tokio::test]
async fn secrets_refused_after_listing_then_allowed_again_are_used_again() {
    let env = Env::new("chart-rerefused").await;
    let TwoTeams {
        full,
        team_b,
        chart,
        kubeconfig,
        ..
    } = two_teams(&env).await;
    let port = env.bed.dovecot().imaps_port();
    // Tested every 30 s: what the cache says is read again that often.
    apply_in(
        &env,
        &team_b,
        &provider("mine", "IMAP", port, "Implicit", ALICE_AUTH, "")
            .replace("interval: 5m", "interval: 30s"),
    );
    let controller = controller_as(&env, &kubeconfig, &chart, &[], &env.ns);
    wait_ready_reason(&env, &team_b, "mine", "Connected", &controller).await;

    let original = controller_role(&env, &team_b, &full);
    replace(&env, &team_b, &without_secrets(&original));
    // The watch made again after its minute, 15 s of refusals, then the next test.
    wait_ready_reason_within(
        &env,
        &team_b,
        "mine",
        "AccessDenied",
        &controller,
        Duration::from_secs(150),
    )
    .await;
    assert_unlisted(&controller, &[0, 1, 0], "team-b's Secrets refused").await;

    replace(&env, &team_b, &original);
    let restored = Instant::now();
    wait_ready_reason(&env, &team_b, "mine", "Connected", &controller).await;
    // The refusal lapses 30 s after the last one; the provider asks again every 15 s.
    assert!(
        restored.elapsed() < Duration::from_secs(60),
        "Connected {:?} after the Role was restored:\n{}",
        restored.elapsed(),
        controller.logs()
    );
    assert_unlisted(&controller, &[0, 0, 0], "team-b's Secrets allowed again").await;
}

/// The chart's Role for the controller in `ns`, ready to be put back with [`replace`].
fn controller_role(env: &Env, ns: &str, full: &str) -> Value {
    let role = format!("{full}-controller");
    let out = kubectl_in(env, ns, &["get", "role", &role, "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let mut role: Value = serde_json::from_slice(&out.stdout).unwrap();
    role["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    role
}

/// `role` without its rule for Secrets.
fn without_secrets(role: &Value) -> Value {
    let mut role = role.clone();
    let rules: Vec<Value> = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|rule| !rule["resources"].to_string().contains("secrets"))
        .cloned()
        .collect();
    role["rules"] = Value::Array(rules);
    role
}

/// `kubectl replace` of `object` in `ns`.
fn replace(env: &Env, ns: &str, object: &Value) {
    let mut cmd = env.bed.kubectl();
    cmd.args(["-n", ns, "replace", "-f", "-"]);
    let out = with_input(cmd, &object.to_string());
    assert!(out.status.success(), "{}", text(&out));
}

/// `mailroom_namespaces_unlisted` of `[IncomingMailProvider, Secret, ConfigMap]`, within
/// 45 s: it is taken every 30 s.
async fn assert_unlisted(controller: &Controller, counts: &[u32; 3], why: &str) {
    let expected: Vec<String> = ["IncomingMailProvider", "Secret", "ConfigMap"]
        .iter()
        .zip(counts)
        .map(|(kind, n)| format!("mailroom_namespaces_unlisted{{kind=\"{kind}\"}} {n}\n"))
        .collect();
    let wanted: Vec<&str> = expected.iter().map(String::as_str).collect();
    let metrics = controller
        .metrics_with(&wanted, Duration::from_secs(45))
        .await;
    for series in wanted {
        assert!(
            metrics.contains(series),
            "{why}: expected {series:?} in /metrics:\n{metrics}\ncontroller log ({}):\n{}",
            controller.log.display(),
            controller.logs()
        );
    }
}

/// A watched namespace whose RoleBinding is gone (its providers, Secrets and ConfigMaps
/// all refused) holds up neither the other namespace nor the pod's readiness for long:
/// `/readyz` turns ready after a minute with an error naming the namespace (a rollout of
/// a pod that stayed unready would never finish), and the RoleBinding given back, its
/// provider is tested. Meanwhile `mailroom_namespaces_unlisted` counts it (its providers
/// are in no other series), until it is listed. A replica that can list no provider
/// anywhere stays unready.
#[tokio::test]
async fn a_namespace_whose_role_binding_is_gone_holds_up_readiness_a_minute_at_most() {
    let env = Env::new("chart-unbound").await;
    let TwoTeams {
        full,
        team_a,
        team_b,
        chart,
        kubeconfig,
    } = two_teams(&env).await;
    let binding = format!("{full}-controller");
    let out = kubectl_in(
        &env,
        &team_b,
        &["get", "rolebinding", &binding, "-o", "json"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let mut saved: Value = serde_json::from_slice(&out.stdout).unwrap();
    let meta = saved["metadata"].as_object_mut().unwrap();
    for generated in [
        "resourceVersion",
        "uid",
        "creationTimestamp",
        "managedFields",
    ] {
        meta.remove(generated);
    }
    let out = kubectl_in(&env, &team_b, &["delete", "rolebinding", &binding]);
    assert!(out.status.success(), "{}", text(&out));
    let port = env.bed.dovecot().imaps_port();
    for ns in [&team_a, &team_b] {
        apply_in(
            &env,
            ns,
            &provider("mine", "IMAP", port, "Implicit", ALICE_AUTH, ""),
        );
    }

    let started = Instant::now();
    let controller = controller_as(&env, &kubeconfig, &chart, &[], &env.ns);
    wait_ready_reason(&env, &team_a, "mine", "Connected", &controller).await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{team_a} waited for {team_b}: {:?}",
        started.elapsed()
    );
    let (code, body) = controller.get("/readyz").await;
    assert_eq!(
        code, 503,
        "ready before {team_b} listed or a minute passed: {body}"
    );
    loop {
        let (code, _) = controller.get("/readyz").await;
        if code == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "/readyz still {code} after {:?}:\n{}",
            started.elapsed(),
            controller.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(55), "ready after {took:?}");
    let logs = controller.logs();
    let said = logs
        .lines()
        .find(|l| l.contains("could not be listed for a minute"))
        .unwrap_or_else(|| panic!("no error says which namespace:\n{logs}"));
    assert!(said.contains(&team_b) && !said.contains(&team_a), "{said}");
    assert_unlisted(&controller, &[1, 1, 1], "team-b's RoleBinding gone").await;

    // The RoleBinding given back: its provider is tested, and nothing is unlisted.
    let mut cmd = env.bed.kubectl();
    cmd.args(["-n", &team_b, "create", "-f", "-"]);
    let out = with_input(cmd, &saved.to_string());
    assert!(out.status.success(), "{}", text(&out));
    wait_ready_reason(&env, &team_b, "mine", "Connected", &controller).await;
    assert_unlisted(&controller, &[0, 0, 0], "team-b's RoleBinding given back").await;

    // Both RoleBindings gone: a replica that can list no provider anywhere tests nothing
    // and stays unready past the minute, so a rollout of it stops.
    let mut controller = controller;
    assert!(controller.terminate(Duration::from_secs(30)).is_some());
    for ns in [&team_a, &team_b] {
        let out = kubectl_in(&env, ns, &["delete", "rolebinding", &binding]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let started = Instant::now();
    let controller = controller_as(&env, &kubeconfig, &chart, &[], &env.ns);
    let _ = controller.http_addr().await;
    tokio::time::sleep(Duration::from_secs(75).saturating_sub(started.elapsed())).await;
    let (code, body) = controller.get("/readyz").await;
    assert_eq!(code, 503, "ready though it can list no provider: {body}");
    assert_unlisted(&controller, &[2, 2, 2], "both RoleBindings gone").await;
    assert!(
        controller
            .logs()
            .contains("could not be listed for a minute"),
        "{}",
        controller.logs()
    );
}

/// Whether `pattern` (one .dockerignore line, already without `!`) matches `path` the way
/// Docker's pattern matcher does: `/`-separated, `**` any number of folders (none too),
/// `*` and `?` within one name; a folder that matches leaves out everything in it.
fn dockerignore_matches(pattern: &str, path: &str) -> bool {
    fn name(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => name(&p[1..], s) || (!s.is_empty() && name(p, &s[1..])),
            (Some(b'?'), Some(_)) => name(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => name(&p[1..], &s[1..]),
            _ => false,
        }
    }
    fn names(p: &[&str], s: &[&str]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(&"**"), _) => names(&p[1..], s) || (!s.is_empty() && names(p, &s[1..])),
            (Some(a), Some(b)) => name(a.as_bytes(), b.as_bytes()) && names(&p[1..], &s[1..]),
            _ => false,
        }
    }
    let pattern: Vec<&str> = pattern
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let path: Vec<&str> = path.split('/').collect();
    // The path itself or any folder above it.
    (1..=path.len()).any(|n| names(&pattern, &path[..n]))
}

/// Whether the Docker build context leaves `path` out, by the .dockerignore given.
fn docker_leaves_out(dockerignore: &str, path: &str) -> bool {
    let mut out = false;
    for line in dockerignore.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.strip_prefix('!') {
            Some(p) if dockerignore_matches(p, path) => out = false,
            None if dockerignore_matches(line, path) => out = true,
            _ => {}
        }
    }
    out
}

#[test]
fn the_docker_build_context_leaves_out_what_git_ignores() {
    let dockerignore = repo_file(".dockerignore");
    // Every build output, fuzzing output and the bed's state (etcd's data, the API
    // server's keys) that git ignores, at the depths git ignores it.
    let mut never = Vec::new();
    for (dir, file) in [("", ".gitignore"), ("fuzz/", "fuzz/.gitignore")] {
        for line in repo_file(file).lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
                continue;
            }
            let anchored = line.trim_end_matches('/').contains('/');
            let p = line.trim_start_matches('/').trim_end_matches('/');
            never.push(format!("{dir}{p}/some/file"));
            if !anchored {
                never.push(format!("{dir}some/folder/{p}/some/file"));
            }
        }
    }
    never.extend(
        [
            "target/release/mailroom",
            "tests/testbed/target/debug/mailroom-testbed",
            "fuzz/target/x86_64-unknown-linux-gnu/release/imap_response",
            "fuzz/corpus/imap_response/0a1b2c",
            "fuzz/artifacts/pop3_response/crash-0a1b2c",
            ".testbed/control-plane/kubeconfig",
            ".testbed/etcd/member/snap/db",
        ]
        .map(String::from),
    );
    let sent: Vec<&String> = never
        .iter()
        .filter(|p| !docker_leaves_out(&dockerignore, p))
        .collect();
    assert!(
        sent.is_empty(),
        ".dockerignore sends these into the image's build context: {sent:?}"
    );
    // What `cargo build --release --locked --bin mailroom` reads stays in.
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "src/main.rs",
        "src/api/provider.rs",
        "tests/testbed/Cargo.toml",
        "tests/testbed/src/lib.rs",
        "tests/e2e/main.rs",
        "benches/probe.rs",
    ] {
        assert!(
            std::path::Path::new(&format!("{REPO}/{needed}")).exists(),
            "{needed} moved: update this test"
        );
        assert!(
            !docker_leaves_out(&dockerignore, needed),
            ".dockerignore leaves out {needed}, which the image's cargo build reads"
        );
    }
}

/// The second release's values as the chart's README gives them.
fn second_release_values() -> String {
    let readme = repo_file("charts/mailroom/README.md");
    let block = readme
        .split("<!-- second-release:start -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- second-release:end -->").next())
        .expect("charts/mailroom/README.md has a <!-- second-release:start/end --> block");
    block
        .lines()
        .filter(|l| !l.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `kubectl apply --server-side --dry-run=server` of rendered documents.
/// Asserts that the API server takes `docs` (`what`), by a server-side dry run.
fn assert_server_takes(env: &Env, docs: &[Value], what: &str) {
    let out = dry_run_apply(env, docs);
    assert!(
        out.status.success(),
        "kubectl apply --server-side --dry-run=server of {what}:\n{}",
        text(&out)
    );
}

/// Asserts that the API server refuses `docs`, saying `needle` (`why` it should).
fn assert_server_refuses(env: &Env, docs: &[Value], needle: &str, why: &str) {
    let out = dry_run_apply(env, docs);
    assert!(
        !out.status.success() && text(&out).contains(needle),
        "expected the API server to refuse {why}; it said:\n{}",
        text(&out)
    );
}

fn dry_run_apply(env: &Env, docs: &[Value]) -> Output {
    let yaml: String = docs
        .iter()
        .map(|d| format!("---\n{}", serde_json::to_string(d).unwrap()))
        .collect();
    let mut cmd = env.bed.kubectl();
    cmd.args([
        "apply",
        "--server-side",
        "--dry-run=server",
        "--field-manager=mailroom-chart-test",
        "-f",
        "-",
    ]);
    with_input(cmd, &yaml)
}

#[tokio::test]
async fn a_second_release_as_the_readme_gives_it_collides_with_nothing_of_the_first() {
    let env = Env::new("chart-two").await;
    let helm = Helm::on_bed(&env);
    let team_a = env.bed.namespace("chart-two-a");
    let team_b = env.bed.namespace("chart-two-b");
    let values = dir_file(&env, "values-team-b.yaml", &second_release_values());
    // Both in the release namespace of the test, each watching its team's namespace.
    let first_ns = format!(r#"watchNamespaces=["{team_a}"]"#);
    let first = helm.render(
        &format!("{}-a", env.ns),
        &env.ns,
        &["--set-json", first_ns.as_str()],
    );
    let second_ns = format!(r#"watchNamespaces=["{team_b}"]"#);
    let second = helm.render(
        &format!("{}-b", env.ns),
        &env.ns,
        &["-f", values.as_str(), "--set-json", second_ns.as_str()],
    );
    let (a, b) = (objects(&first), objects(&second));
    let shared: Vec<_> = a.intersection(&b).collect();
    assert!(
        shared.is_empty(),
        "objects of both releases (helm refuses the second): {shared:?}"
    );
    assert!(
        b.iter().all(|(k, _, _)| !cluster_scoped(k)),
        "the second release has cluster-scoped objects: {b:?}"
    );
    assert!(
        a.iter().any(|(k, _, _)| k == "CustomResourceDefinition"),
        "the first release installs the CRD: {a:?}"
    );
    let lease = |docs: &[Value]| {
        args(docs)
            .into_iter()
            .find(|a| a.starts_with("--lease-name="))
            .unwrap()
    };
    assert_ne!(
        lease(&first),
        lease(&second),
        "one Lease for two releases in one namespace"
    );
    // Without the README's values the CRD is the first release's too.
    let naive = helm.render(
        &format!("{}-b", env.ns),
        &env.ns,
        &["--set-json", second_ns.as_str()],
    );
    assert!(
        objects(&naive)
            .intersection(&a)
            .any(|(k, _, _)| k == "CustomResourceDefinition"),
        "the collision this guards against"
    );
    // Its Lease is its own even then: a release's is named after it.
    assert_ne!(lease(&first), lease(&naive), "one Lease for two releases");
    // What the API server says of both (a dry run: the bed's CRD is every test's).
    for (which, docs) in [("first", &first), ("second", &second)] {
        assert_server_takes(&env, docs, &format!("the {which} release"));
    }
}

/// The API server validates what the chart renders from the pod values (volume mounts
/// name a volume, dnsPolicy None comes with a nameserver, a strategy it accepts, the
/// default anti-affinity of two replicas); a dry run, nothing is created.
#[tokio::test]
async fn the_api_server_takes_the_deployment_with_the_pod_values() {
    let env = Env::new("chart-pod-values").await;
    let helm = Helm::offline();
    let mut values = POD_VALUES.to_vec();
    values.extend_from_slice(&["--set", "dnsPolicy=None,replicas=2,sharding.shards=2"]);
    let docs: Vec<Value> = helm
        .render("mailroom", &env.ns, &values)
        .into_iter()
        .filter(|d| kind(d) == "Deployment")
        .collect();
    assert_eq!(docs.len(), 2, "{:?}", objects(&docs));
    assert!(
        docs.iter()
            .all(|d| d["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"].is_object()),
        "the default anti-affinity is part of what is checked"
    );
    assert_server_takes(&env, &docs, "the Deployments");
    // The check is real: a mount of a volume the pod lacks is refused.
    let docs: Vec<Value> = helm
        .render("mailroom", &env.ns, &POD_VALUES[2..4])
        .into_iter()
        .filter(|d| kind(d) == "Deployment")
        .collect();
    assert_server_refuses(&env, &docs, "volumeMounts", "a mount of no volume");
}

/// `networkPolicy.mailTo` keeps the mail ports to the networks given (a provider's editor
/// chooses the host, so an operator keeps tests off the cluster's own network), while
/// the extra ports (a token endpoint on the internet) stay open to any address; the API
/// server takes the NetworkPolicy (a dry run) and refuses a malformed peer.
#[tokio::test]
async fn mail_to_limits_where_the_mail_ports_reach() {
    let env = Env::new("chart-mail-to").await;
    let helm = Helm::offline();
    let outside = json!([{"ipBlock": {
        "cidr": "0.0.0.0/0",
        "except": ["10.0.0.0/8", "169.254.0.0/16"],
    }}]);
    let render = |mail_to: &Value| {
        helm.render(
            "mailroom",
            &env.ns,
            &[
                "--set",
                "networkPolicy.enabled=true",
                "--set-json",
                "networkPolicy.extraEgressPorts=[443]",
                "--set-json",
                &format!("networkPolicy.mailTo={mail_to}"),
            ],
        )
    };
    let docs = render(&outside);
    let np = only(&docs, "NetworkPolicy");
    let rule_with = |port: u64| {
        np["spec"]["egress"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| {
                r["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["port"] == port)
            })
            .unwrap_or_else(|| panic!("no rule for port {port}: {np}"))
            .clone()
    };
    for port in [143, 993, 110, 995] {
        assert_eq!(rule_with(port)["to"], outside, "port {port}");
    }
    assert!(
        rule_with(443).get("to").is_none(),
        "443 to any address: {np}"
    );
    assert!(
        rule_with(53).get("to").is_none(),
        "DNS to any address: {np}"
    );
    assert_server_takes(&env, std::slice::from_ref(np), "the NetworkPolicy");
    // The check is real: an exception outside its block is refused by name.
    let docs = render(&json!([{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["192.168.0.0/16"]}}]));
    assert_server_refuses(
        &env,
        std::slice::from_ref(only(&docs, "NetworkPolicy")),
        "except",
        "an exception outside the block",
    );
}

fn dir_file(env: &Env, name_: &str, contents: &str) -> String {
    let path = env.dir.path().join(name_);
    std::fs::write(&path, contents).unwrap();
    path.to_string_lossy().into_owned()
}
