//! `mailroom check`: the same test, now, with the caller's credentials or from a manifest;
//! `mailroom retest`: a test now by the controller, and its verdict.

use std::process::Command;
use std::time::Duration;

use kube::ResourceExt;

use crate::support::{
    ALICE_AUTH, Env, MAILROOM, WRONG_AUTH, alice_env, provider, text, trust_bed_ca, with_input,
    wrong_password_secret,
};

#[tokio::test]
async fn check_prints_each_step_and_exits_zero_only_when_ready() {
    let env = Env::new("cli").await;
    trust_bed_ca(&env).await;
    let (user, password) = env.bed.dovecot().account("alice");
    env.secret("alice", &[("username", &user), ("password", &password)])
        .await;
    let port = env.bed.dovecot().imap_port();
    env.apply(&provider(
        "starttls", "IMAP", port, "StartTLS", ALICE_AUTH, "",
    ));

    let out = Command::new(MAILROOM)
        .args(["check", "starttls", "-n", &env.ns])
        .env("KUBECONFIG", env.bed.kubeconfig_path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "connect",
        "greeting",
        "STARTTLS",
        "TLS handshake",
        "authenticate",
        "mailbox",
        "Ready=True",
    ] {
        assert!(stdout.contains(step), "step {step} missing from:\n{stdout}");
    }
    // Each step with its time, and the total.
    let timed = regex::Regex::new(r"(?m)^\s+ok\s+\S.*?\s\d+ms(\s|$)").unwrap();
    assert!(
        timed.find_iter(&stdout).count() >= 6 && stdout.contains("total"),
        "each step should be printed with its time:\n{stdout}"
    );
    assert!(
        stdout.contains("Dovecot"),
        "the server's words should be printed:\n{stdout}"
    );

    // As a kubectl plugin: the same binary under the plugin's name.
    let (code, _, stderr) = env.kubectl_mailroom(&["check", "starttls", "-n", &env.ns]);
    assert_eq!(code, Some(0), "kubectl mailroom check: {stderr}");
    // Its help names the command as the user typed it.
    let (_, help, _) = env.kubectl_mailroom(&["check", "--help"]);
    assert!(help.contains("Usage: kubectl mailroom check"), "{help}");

    // A manifest tested before it is applied, with its Secret from a file too.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("provider.yaml");
    let secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: alice}}\nstringData: {{username: {user}, password: wrong-one}}\n---\n"
    );
    let ca = std::fs::read_to_string(env.bed.dovecot().ca_file()).unwrap();
    let cm = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: test-ca}}\ndata:\n  ca.crt: |\n{}\n---\n",
        ca.lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    std::fs::write(
        &file,
        format!(
            "{secret}{cm}{}",
            provider(
                "preflight",
                "POP3",
                env.bed.dovecot().pop3s_port(),
                "Implicit",
                ALICE_AUTH,
                ""
            )
        ),
    )
    .unwrap();
    let out = check_without_a_cluster(&file);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("AuthenticationFailed"), "{stdout}");

    // Without the Secret in the files, and no cluster to ask (a KUBECONFIG that names no
    // file): no verdict, rather than a SecretNotFound nobody looked for.
    let alone = dir.path().join("alone.yaml");
    let manifest = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&alone, manifest.replacen(&secret, "", 1)).unwrap();
    let out = check_without_a_cluster(&alone);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("Secret alice is not in the files, and the cluster could not be asked")
            && said.contains("/nonexistent")
            && !said.contains("SecretNotFound"),
        "{said}"
    );

    // No cluster, and a manifest the CRD's schema refuses (a typo, a port out of range):
    // refused naming the fields, before any test, with a note that its rules went unchecked.
    let typo = dir.path().join("typo.yaml");
    std::fs::write(
        &typo,
        manifest
            .replace(
                &format!("port: {}", env.bed.dovecot().pop3s_port()),
                "port: 70000",
            )
            .replace("interval: 5m", "interval: 5m, mailbx: Archive"),
    )
    .unwrap();
    let out = check_without_a_cluster(&typo);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("reason=InvalidSpec")
            && said.contains(".spec.check.mailbx: field not declared in schema")
            && said.contains("spec.server.port: Invalid value: 70000")
            && said.contains("not against its rules (x-kubernetes-validations)"),
        "{said}"
    );
    assert!(!said.contains("connect"), "tested anyway: {said}");
}

/// `mailroom check -f` is a preflight: a manifest the API server would refuse (a CEL rule,
/// an unknown field) is refused in its words, before any test; one it would take is
/// tested, read from stdin and from a `kind: List` as `kubectl apply -f -` reads it; and
/// the dry run leaves nothing behind.
#[tokio::test]
async fn check_of_a_manifest_is_refused_as_the_api_server_would_refuse_it() {
    let env = alice_env("cli-preflight").await;
    let port = env.bed.dovecot().imaps_port();
    let good = provider("pre", "IMAP", port, "Implicit", ALICE_AUTH, "");
    let check = |manifest: &str| {
        let mut cmd = Command::new(MAILROOM);
        cmd.args(["check", "-n", &env.ns, "-f", "-"])
            .env("KUBECONFIG", env.bed.kubeconfig_path());
        let out = with_input(cmd, manifest);
        (out.status.code(), text(&out))
    };

    let (code, out) = check(&good.replace("interval: 5m", "interval: 10s"));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("InvalidSpec"), "{out}");
    assert!(
        out.contains("the API server refuses this manifest")
            && out.contains("interval must be at least 30s"),
        "{out}"
    );
    assert!(!out.contains("connect "), "a test ran:\n{out}");

    // Every field the schema does not declare, as `kubectl apply` names them.
    let (code, out) = check(
        &good
            .replace("  check:", "  chek: {interval: 1m}\n  check:")
            .replace("protocol: IMAP", "protocol: IMAP, prot: 1"),
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("unknown field \"spec.chek\"")
            && out.contains("unknown field \"spec.server.prot\""),
        "{out}"
    );

    // What mailroom cannot read itself (values in the wrong case, a port in quotes) is
    // still the API server's to refuse, in its words (each wrong value at once).
    let (code, out) = check(
        &good
            .replace("method: Password", "method: password")
            .replace("protocol: IMAP", "protocol: imap"),
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("InvalidSpec")
            && out.contains("spec.authentication.method: Unsupported value: \"password\"")
            && out.contains("spec.server.protocol: Unsupported value: \"imap\""),
        "{out}"
    );
    assert!(!out.contains("connect "), "a test ran:\n{out}");
    let (code, out) = check(&good.replace(&format!("port: {port}"), &format!("port: \"{port}\"")));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("InvalidSpec")
            && out.contains("spec.server.port in body must be of type integer"),
        "{out}"
    );

    // `kubectl get imp -o yaml` gives a List.
    let list = format!(
        "apiVersion: v1\nkind: List\nitems:\n{}",
        good.lines()
            .enumerate()
            .map(|(i, l)| if i == 0 {
                format!("- {l}\n")
            } else {
                format!("  {l}\n")
            })
            .collect::<String>()
    );
    let (code, out) = check(&list);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("Ready=True"), "{out}");
    // Where `kubectl apply -n NS -f` would put the files' objects: one that names another
    // namespace is refused, as kubectl refuses it; one that names none lands in NS, so it
    // is the provider's (here a wrong password, used instead of the cluster's Secret).
    let secret = |namespace: &str| {
        format!(
            "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: alice{namespace}}}\nstringData: {{username: alice, password: wrong-one}}\n"
        )
    };
    let (code, out) = check(&format!("{list}{}", secret(", namespace: elsewhere")));
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains(&format!(
            "Secret alice in the files names namespace elsewhere, not -n {ns}: kubectl apply -n {ns} would refuse it",
            ns = env.ns
        )),
        "{out}"
    );
    let (code, out) = check(&format!("{list}{}", secret("")));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("AuthenticationFailed"), "{out}");
    assert!(
        env.providers().get_opt("pre").await.unwrap().is_none(),
        "the dry run created the provider"
    );

    // What `kubectl get imp -o yaml` saved (a List, with what the API server set), after
    // which the object changed: the saved resourceVersion is stale.
    env.apply(&good.replace("name: pre", "name: saved"));
    let saved = env.kubectl(&["get", "imp", "-o", "yaml"]);
    env.kubectl(&["annotate", "imp/saved", "changed=later"]);
    let (code, out) = check(&String::from_utf8_lossy(&saved.stdout));
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("note:"), "{out}");
}

/// `mailroom retest`, run as a user would, with the bed's kubeconfig.
fn retest(env: &Env, args: &[&str]) -> (Option<i32>, String, String) {
    let mut args = args.to_vec();
    args.extend(["-n", &env.ns]);
    retest_anywhere(env, &args)
}

/// `mailroom retest ARGS` with no namespace of its own.
fn retest_anywhere(env: &Env, args: &[&str]) -> (Option<i32>, String, String) {
    env.mailroom(&[&["retest"], args].concat())
}

/// As `kubectl mailroom`, the commands take kubectl's --kubeconfig and --context.
#[tokio::test]
async fn the_commands_take_kubectls_kubeconfig_and_context_flags() {
    let env = alice_env("cli-context").await;
    env.apply_alice_imaps("imaps");
    // A kubeconfig whose current context points nowhere, beside the bed's context.
    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(env.bed.kubeconfig_path()).unwrap()).unwrap();
    let bed_context = config["current-context"].as_str().unwrap().to_string();
    let user = config["contexts"][0]["context"]["user"].clone();
    let nowhere = |yaml: &str| serde_yaml::from_str::<serde_yaml::Value>(yaml).unwrap();
    config["clusters"].as_sequence_mut().unwrap().push(nowhere(
        "{name: nowhere, cluster: {server: 'https://127.0.0.1:1'}}",
    ));
    let mut context = nowhere("{name: nowhere, context: {cluster: nowhere}}");
    context["context"]["user"] = user;
    config["contexts"].as_sequence_mut().unwrap().push(context);
    config["current-context"] = "nowhere".into();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kubeconfig");
    std::fs::write(&file, serde_yaml::to_string(&config).unwrap()).unwrap();

    let run = |args: &[&str]| {
        let out = Command::new(MAILROOM)
            .args(args)
            .args(["-n", &env.ns, "--kubeconfig", file.to_str().unwrap()])
            .env_remove("KUBECONFIG")
            .env("HOME", dir.path())
            .output()
            .unwrap();
        (out.status.code(), text(&out))
    };
    let (code, text) = run(&["check", "imaps", "--context", &bed_context]);
    assert_eq!(code, Some(0), "check with --context:\n{text}");
    let (code, text) = run(&["check", "imaps"]);
    assert_ne!(
        code,
        Some(0),
        "the file's current context points nowhere:\n{text}"
    );
    assert!(
        text.contains("no answer from the API server at https://127.0.0.1:1"),
        "{text}"
    );
    let (code, text) = run(&[
        "retest",
        "imaps",
        "--context",
        "no-such-context",
        "--timeout",
        "2",
    ]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("no-such-context"), "{text}");
    // `check` with KUBECONFIG set to `value` (and HOME the test's folder): it must work.
    let check_with = |value: &str, what: &str| {
        let out = Command::new(MAILROOM)
            .args(["check", "imaps", "-n", &env.ns, "--context", &bed_context])
            .env("KUBECONFIG", value)
            .env("HOME", dir.path())
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "KUBECONFIG {what}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // A list with a file that does not exist: skipped, as kubectl does.
    check_with(
        &format!("{}:/nonexistent/kubeconfig", file.display()),
        "with a missing file",
    );
    // Empty (`${KUBECONFIG:-}` in a CI template): unset, so ~/.kube/config.
    std::fs::create_dir_all(dir.path().join(".kube")).unwrap();
    std::fs::copy(&file, dir.path().join(".kube/config")).unwrap();
    check_with("", "empty");
    // With -f the cluster is optional, but a named context that does not exist is an error.
    let manifest = dir.path().join("provider.yaml");
    std::fs::write(
        &manifest,
        provider("from-file", "IMAP", 993, "Implicit", ALICE_AUTH, ""),
    )
    .unwrap();
    let (code, text) = run(&[
        "check",
        "-f",
        manifest.to_str().unwrap(),
        "--context",
        "no-such-context",
    ]);
    assert_ne!(code, Some(0), "{text}");
    assert!(
        text.contains("no-such-context") && !text.contains("SecretNotFound"),
        "{text}"
    );
    // The controller, run by hand outside a cluster, takes them too: the file's current
    // context points nowhere, so only --context finds the cluster it tests for.
    let controller = env.controller_with_env(
        &[
            "--kubeconfig",
            file.to_str().unwrap(),
            "--context",
            &bed_context,
        ],
        &[("KUBECONFIG", "/nonexistent")],
    );
    env.wait_reason("imaps", "Connected", Duration::from_secs(60))
        .await;
    drop(controller);
}

#[tokio::test]
async fn retest_has_the_controller_test_now_and_prints_its_verdicts() {
    let env = alice_env("retest").await;
    wrong_password_secret(&env).await;
    let port = env.bed.dovecot().imaps_port();
    // An interval of an hour: any test after the first is one that was asked for.
    let good = provider("good", "IMAP", port, "Implicit", ALICE_AUTH, "")
        .replace("interval: 5m", "interval: 1h");
    let bad = provider("bad", "IMAP", port, "Implicit", WRONG_AUTH, "")
        .replace("interval: 5m", "interval: 1h");
    let sus = provider(
        "sus",
        "IMAP",
        port,
        "Implicit",
        ALICE_AUTH,
        "  suspend: true\n",
    );
    env.apply(&format!("{good}---\n{bad}---\n{sus}"));
    let controller = env.controller();
    env.wait_reason("good", "Connected", Duration::from_secs(60))
        .await;
    env.wait_reason("bad", "AuthenticationFailed", Duration::from_secs(60))
        .await;
    env.wait_reason("sus", "Suspended", Duration::from_secs(60))
        .await;
    // Created suspended, never tested: `kubectl get imp` still shows its PORT.
    let out = env.kubectl(&[
        "get",
        "imp",
        "sus",
        "-o",
        "jsonpath={.status.endpoint.port}",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), port.to_string());
    let before = controller.tests();

    // One provider: the controller tests it once more, and its verdict is printed.
    let (code, out, err) = retest(&env, &["good"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("good: Ready=True Connected: "), "{out}");
    assert_eq!(controller.tests(), before + 1, "{}", controller.logs());
    let p = env.providers().get("good").await.unwrap();
    let asked = p.annotations()[mailroom::api::CHECK_REQUESTED_AT].clone();
    assert_eq!(
        p.status.unwrap().last_handled_check_request.as_deref(),
        Some(asked.as_str()),
        "the status echoes the request that was waited for"
    );

    // A failing one makes the exit status 1 and quotes the server.
    let (code, out, err) = retest(&env, &["good", "bad"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("good: Ready=True Connected"), "{out}");
    assert!(
        out.contains("bad: Ready=False AuthenticationFailed: ") && out.contains("NO"),
        "{out}"
    );

    // --all: a suspended provider is named and not waited for.
    let (code, out, err) = retest(&env, &["--all", "--timeout", "1m"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("sus: suspended"), "{out}");
    assert_eq!(out.lines().count(), 3, "{out}");

    // A name that does not exist: an error naming it, and nothing asked of the others.
    let asked = env.providers().get("good").await.unwrap().annotations()
        [mailroom::api::CHECK_REQUESTED_AT]
        .clone();
    let (code, out, err) = retest(&env, &["good", "nosuch"]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        err.contains(&format!("{}/nosuch not found", env.ns)),
        "{err}"
    );
    let p = env.providers().get("good").await.unwrap();
    assert_eq!(
        p.annotations()[mailroom::api::CHECK_REQUESTED_AT],
        asked,
        "good was asked for a test though the command failed"
    );

    // No controller: the wait ends at --timeout with exit status 2 and says what to check.
    drop(controller);
    let (code, out, err) = retest(&env, &["good", "--timeout", "2"]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        out.contains("good: no result within 2s; is the controller running"),
        "{out}"
    );
}

#[tokio::test]
async fn retest_by_label_asks_only_the_matching_providers_in_one_or_every_namespace() {
    let (a, b) = (alice_env("retest-a").await, alice_env("retest-b").await);
    // A label value no other test's provider carries: the bed is shared.
    let team = format!("team={}", a.ns);
    let hourly = |env: &Env, name: &str| {
        provider(
            name,
            "IMAP",
            env.bed.dovecot().imaps_port(),
            "Implicit",
            ALICE_AUTH,
            "",
        )
        .replace("interval: 5m", "interval: 1h")
    };
    for env in [&a, &b] {
        let labelled = hourly(env, "billing").replace(
            "  name: billing\n",
            &format!("  name: billing\n  labels: {{team: {}}}\n", a.ns),
        );
        env.apply(&format!("{labelled}---\n{}", hourly(env, "other")));
    }
    let controller = a.controller_with(&["--namespace", &b.ns]);
    for env in [&a, &b] {
        for name in ["billing", "other"] {
            env.wait_reason(name, "Connected", Duration::from_secs(60))
                .await;
        }
    }
    let before = controller.tests();
    let asked = |env: &Env, name: &str| {
        let providers = env.providers();
        let name = name.to_string();
        async move {
            let p = providers.get(&name).await.unwrap();
            p.annotations()
                .get(mailroom::api::CHECK_REQUESTED_AT)
                .cloned()
        }
    };

    // Every namespace: the two labelled providers, named with their namespaces.
    let (code, out, err) = retest_anywhere(&a, &["-A", "-l", &team]);
    assert_eq!(code, Some(0), "{out}{err}");
    for env in [&a, &b] {
        assert!(
            out.contains(&format!("{}/billing: Ready=True Connected: ", env.ns)),
            "{out}"
        );
        assert!(asked(env, "billing").await.is_some());
        assert_eq!(
            asked(env, "other").await,
            None,
            "an unlabelled provider was asked"
        );
    }
    assert_eq!(out.lines().count(), 2, "{out}");
    assert_eq!(controller.tests(), before + 2, "{}", controller.logs());

    // One namespace: its labelled provider only, by its name alone.
    let in_b = asked(&b, "billing").await;
    let (code, out, err) = retest(&a, &["-l", &team]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("billing: Ready=True Connected: "), "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert_eq!(
        asked(&b, "billing").await,
        in_b,
        "another namespace was asked"
    );
    assert_eq!(controller.tests(), before + 3, "{}", controller.logs());

    // A selector nothing matches is an error that says where it looked.
    let (code, out, err) = retest_anywhere(&a, &["-A", "-l", &format!("{team}-none")]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        err.contains("no IncomingMailProvider in any namespace with labels matching"),
        "{err}"
    );

    // Someone who may list providers everywhere but ask for tests in b only: a's is
    // refused and said so (exit 2), b's is still waited for and printed.
    let user = format!("carol-{}", a.ns);
    let rbac = format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {{name: {user}-read}}\nrules: [{{apiGroups: [mailroom.dev], resources: [incomingmailproviders], verbs: [get, list, watch]}}]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: {user}-read}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {user}-read}}\nsubjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: {user}}}]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: {user}-ask, namespace: {b}}}\nrules: [{{apiGroups: [mailroom.dev], resources: [incomingmailproviders], verbs: [patch]}}]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: {user}-ask, namespace: {b}}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: {user}-ask}}\nsubjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: {user}}}]\n",
        b = b.ns
    );
    let mut cmd = a.bed.kubectl();
    cmd.args(["apply", "-f", "-"]);
    let applied = with_input(cmd, &rbac);
    assert!(applied.status.success(), "{applied:?}");
    // The API server's authorizer learns of new bindings from its own watch, a moment
    // after they are stored.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let can = |args: &[&str]| {
            let out = a.kubectl(&[&["auth", "can-i", "--as", user.as_str()], args].concat());
            String::from_utf8_lossy(&out.stdout).trim() == "yes"
        };
        if can(&["list", "incomingmailproviders.mailroom.dev", "-A"])
            && can(&["patch", "incomingmailproviders.mailroom.dev", "-n", &b.ns])
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the bindings took no effect"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = std::fs::read_to_string(a.bed.kubeconfig_path()).unwrap();
    let mut config: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    for entry in config["users"].as_sequence_mut().unwrap() {
        entry["user"]["as"] = serde_yaml::Value::from(user.as_str());
    }
    let kubeconfig = a.dir.path().join("carol.kubeconfig");
    std::fs::write(&kubeconfig, serde_yaml::to_string(&config).unwrap()).unwrap();
    let out = Command::new(MAILROOM)
        .args(["retest", "-A", "-l", &team, "--timeout", "60"])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!("{}/billing: not asked: ", a.ns)) && stderr.contains("forbidden"),
        "{stderr}"
    );
    assert!(
        stdout.contains(&format!("{}/billing: Ready=True Connected: ", b.ns)),
        "{stdout}{stderr}"
    );
}

/// `retest --timeout` bounds the whole command: an API server that accepts connections and
/// never answers (a load balancer in front of a stuck one) ends it with exit status 2
/// within the timeout, as a CI job relies on.
#[tokio::test]
async fn retest_ends_within_its_timeout_when_the_api_server_never_answers() {
    let dir = tempfile::tempdir().unwrap();
    let file = silent_api_server(&dir, "https");
    let started = std::time::Instant::now();
    let out = Command::new(MAILROOM)
        .args(["retest", "inbox", "--timeout", "3", "--kubeconfig"])
        .arg(&file)
        .output()
        .unwrap();
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(took < Duration::from_secs(6), "took {took:?}: {text}");
    assert!(text.contains("within --timeout 3s"), "{text}");
}

/// `check NAME` and `authorize` give up on an API server that never answers after
/// `--request-timeout`, as kubectl's flag of that name does: whether it never finishes the
/// TLS handshake or never answers a request.
#[tokio::test]
async fn check_and_authorize_end_after_the_request_timeout_when_the_api_server_never_answers() {
    let dir = tempfile::tempdir().unwrap();
    for scheme in ["https", "http"] {
        let file = silent_api_server(&dir, scheme);
        for command in ["check", "authorize"] {
            let started = std::time::Instant::now();
            let out = Command::new(MAILROOM)
                .args([command, "inbox", "--request-timeout", "2s", "--kubeconfig"])
                .arg(&file)
                .output()
                .unwrap();
            let took = started.elapsed();
            let text = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{command}, {scheme}: {text}");
            assert!(
                took < Duration::from_secs(5),
                "{command}, {scheme}: took {took:?}: {text}"
            );
            assert!(
                text.contains("no answer from the API server")
                    && text.contains("within --request-timeout 2s"),
                "{command}, {scheme}: {text}"
            );
        }
    }
}

/// A kubeconfig in `dir` whose API server accepts connections and holds them, saying
/// nothing (a load balancer in front of a stuck one), over `scheme`.
fn silent_api_server(dir: &tempfile::TempDir, scheme: &str) -> std::path::PathBuf {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            held.push(conn);
        }
    });
    let file = dir.path().join(format!("{scheme}.kubeconfig"));
    std::fs::write(
        &file,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: stuck\n\
             clusters: [{{name: stuck, cluster: {{server: '{scheme}://127.0.0.1:{port}', insecure-skip-tls-verify: true}}}}]\n\
             users: [{{name: u, user: {{token: t}}}}]\n\
             contexts: [{{name: stuck, context: {{cluster: stuck, user: u, namespace: ops}}}}]\n"
        ),
    )
    .unwrap();
    file
}

/// The API server is reached directly, whatever HTTPS_PROXY says (it is for the OAuth2
/// token requests); a kubeconfig that gives the cluster a proxy-url is refused, saying so,
/// even when it names the same proxy as HTTPS_PROXY.
#[tokio::test]
async fn the_api_server_is_reached_directly_and_a_kubeconfig_proxy_url_is_refused() {
    let env = Env::new("cli-proxy-url").await;
    let proxy = "http://127.0.0.1:9";
    let run = |kubeconfig: &std::path::Path| {
        let out = Command::new(MAILROOM)
            .args([
                "check",
                "nothing-here",
                "-n",
                &env.ns,
                "--request-timeout",
                "5s",
            ])
            .env("KUBECONFIG", kubeconfig)
            .env("HTTPS_PROXY", proxy)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, err) = run(env.bed.kubeconfig_path());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not found"), "the API server answered: {err}");

    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(env.bed.kubeconfig_path()).unwrap()).unwrap();
    config["clusters"][0]["cluster"]["proxy-url"] = proxy.into();
    let proxied = env.dir.path().join("proxied.kubeconfig");
    std::fs::write(&proxied, serde_yaml::to_string(&config).unwrap()).unwrap();
    let (code, err) = run(&proxied);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("proxy-url, which mailroom does not support"),
        "{err}"
    );
}

/// An HTTPS_PROXY that is not a URL (a password with a space not percent-encoded): kube
/// refuses it while loading the kubeconfig; the error names the variable, not a proxy of
/// the kubeconfig, and never quotes the password.
#[tokio::test]
async fn an_https_proxy_that_is_not_a_url_is_named_and_its_password_not_shown() {
    let env = Env::new("cli-bad-proxy").await;
    let password = "pass word-7Kq";
    for args in [
        vec!["check", "nothing-here", "-n", env.ns.as_str()],
        vec!["controller"],
    ] {
        let out = Command::new(MAILROOM)
            .args(&args)
            .env("KUBECONFIG", env.bed.kubeconfig_path())
            .env(
                "HTTPS_PROXY",
                format!("http://user:{password}@proxy.test:3128"),
            )
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("HTTPS_PROXY is not a URL") && err.contains("percent-encoded"),
            "{args:?}: {err}"
        );
        assert!(
            !err.contains("word-7Kq"),
            "{args:?}: the password shown: {err}"
        );
    }
}

/// `--lease-duration` takes a duration like the controller's other time flags (every
/// e2e controller runs with `6s`); one too short to renew in is refused by name.
#[tokio::test]
async fn a_lease_too_short_to_renew_is_refused_by_name() {
    let env = Env::new("cli-lease").await;
    let (code, _, err) = env.mailroom(&["controller", "--lease-duration", "1s"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--lease-duration 1s: give at least 2s"),
        "{err}"
    );
}

/// `mailroom check -f DIR` (as `kustomize build | mailroom check -f -`, a GitOps
/// preflight) tests every provider of the files, each as if alone, and sums up: exit 0
/// only if all would be Ready; a NAME picks one.
#[tokio::test]
async fn check_of_several_manifests_tests_each_and_sums_up() {
    let env = alice_env("cli-several").await;
    wrong_password_secret(&env).await;
    let port = env.bed.dovecot().imaps_port();
    let dir = env.dir.path().join("providers");
    std::fs::create_dir(&dir).unwrap();
    let good = provider("good", "IMAP", port, "Implicit", ALICE_AUTH, "");
    let bad = provider(
        "bad",
        "IMAP",
        port,
        "Implicit",
        crate::support::WRONG_AUTH,
        "",
    );
    std::fs::write(dir.join("a.yaml"), good).unwrap();
    std::fs::write(dir.join("b.yaml"), bad).unwrap();
    let check = |name: Option<&str>| {
        let out = Command::new(MAILROOM)
            .args(["check", "-n", &env.ns, "-f"])
            .arg(&dir)
            .args(name)
            .env("KUBECONFIG", env.bed.kubeconfig_path())
            .output()
            .unwrap();
        (out.status.code(), text(&out))
    };
    let (code, out) = check(None);
    assert_eq!(code, Some(1), "{out}");
    let ns = &env.ns;
    assert!(
        out.contains(&format!("Testing {ns}/good"))
            && out.contains(&format!("Testing {ns}/bad"))
            && out.contains("Ready=True reason=Connected")
            && out.contains("Ready=False reason=AuthenticationFailed")
            && out.contains("1 of 2 IncomingMailProviders would be Ready; not: bad"),
        "{out}"
    );
    let (code, out) = check(Some("good"));
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("/bad"), "{out}");

    // Two teams' files side by side, each with a Secret `creds` in its own namespace:
    // each provider uses its own team's.
    let other = format!("{}-b", env.ns);
    let made = env.kubectl(&["create", "namespace", &other]);
    assert!(made.status.success(), "{made:?}");
    let (user, password) = env.bed.dovecot().account("alice");
    let object =
        |value: serde_json::Value| format!("---\n{}", serde_yaml::to_string(&value).unwrap());
    let secret = |ns: &str, password: &str| {
        object(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "creds", "namespace": ns},
            "stringData": {"username": user, "password": password},
        }))
    };
    let team = |name: &str, ns: &str| {
        provider(
            name,
            "IMAP",
            port,
            "Implicit",
            "{method: Password, secretRef: {name: creds}}",
            "",
        )
        .replacen("metadata:\n", &format!("metadata:\n  namespace: {ns}\n"), 1)
    };
    let ca = object(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "test-ca", "namespace": other},
        "data": {"ca.crt": std::fs::read_to_string(env.bed.dovecot().ca_file()).unwrap()},
    }));
    let teams = env.dir.path().join("teams");
    std::fs::create_dir(&teams).unwrap();
    let a = format!("{}{}", team("team-a", &env.ns), secret(&env.ns, &password));
    let b = format!(
        "{}{}{ca}",
        team("team-b", &other),
        secret(&other, "not-alices")
    );
    std::fs::write(teams.join("a.yaml"), a).unwrap();
    std::fs::write(teams.join("b.yaml"), b).unwrap();
    let out = Command::new(MAILROOM)
        .args(["check", "-f"])
        .arg(&teams)
        .env("KUBECONFIG", env.bed.kubeconfig_path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}{err}");
    let verdict = |label: &str| {
        let at = text
            .find(&format!("Testing {label}:"))
            .unwrap_or_else(|| panic!("{label} untested:\n{text}{err}"));
        text[at..]
            .lines()
            .find(|l| l.starts_with("Ready="))
            .unwrap()
            .to_string()
    };
    assert!(
        verdict(&format!("{}/team-a", env.ns)).starts_with("Ready=True reason=Connected"),
        "{text}{err}"
    );
    assert!(
        verdict(&format!("{other}/team-b")).starts_with("Ready=False reason=AuthenticationFailed"),
        "{text}{err}"
    );
    env.kubectl(&["delete", "namespace", &other, "--wait=false"]);
}

/// `check -f` of files that keep their Secret encrypted with SOPS (as docs/gitops.md
/// suggests): the ciphertext is not sent as a login, the cluster's copy is used, and a note
/// says so. A kubeconfig that cannot be parsed is named without its lines (its tokens).
#[tokio::test]
async fn check_of_manifests_uses_the_clusters_copy_of_a_sops_encrypted_secret() {
    let env = alice_env("check-sops").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mailbox.yaml");
    let sops = "apiVersion: v1\nkind: Secret\nmetadata: {name: alice}\nstringData:\n  username: ENC[AES256_GCM,data:Zm9v,iv:YmFy,tag:YmF6,type:str]\n  password: ENC[AES256_GCM,data:cXV4,iv:YmFy,tag:YmF6,type:str]\nsops:\n  age:\n    - recipient: age1qqqq\n  lastmodified: \"2026-11-30T00:00:00Z\"\n  version: 3.9.0\n---\n";
    let port = env.bed.dovecot().imaps_port();
    std::fs::write(
        &file,
        format!(
            "{sops}{}",
            provider("sealed", "IMAP", port, "Implicit", ALICE_AUTH, "")
        ),
    )
    .unwrap();
    let (code, out, err) = env.mailroom(&["check", "-n", &env.ns, "-f", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("Ready=True"), "{out}{err}");
    assert!(
        err.contains("encrypted with SOPS, not used; the cluster's Secret of that name is"),
        "{err}"
    );

    let broken = dir.path().join("broken.kubeconfig");
    std::fs::write(
        &broken,
        "apiVersion: v1\nkind: Config\nusers:\n- name: u\n  user:\n    token: Pl4nted-Kubeconfig-Token\n    x: [\n",
    )
    .unwrap();
    let out = Command::new(MAILROOM)
        .args(["retest", "x", "--kubeconfig", broken.to_str().unwrap()])
        .output()
        .unwrap();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("line 7 column"), "{said}");
    assert!(!said.contains("Pl4nted-Kubeconfig-Token"), "{said}");
}

/// `mailroom check -f file` with no cluster to ask (a KUBECONFIG that names no file).
fn check_without_a_cluster(file: &std::path::Path) -> std::process::Output {
    Command::new(MAILROOM)
        .args(["check", "-f"])
        .arg(file)
        .env("KUBECONFIG", "/nonexistent")
        .output()
        .unwrap()
}

/// `check -f` of a provider that exists checks the manifest alone, as the API server checks
/// `kubectl apply` of it, not the cluster's copy merged with it (which keeps the fields
/// other managers own): a Password provider applied with kubectl and moved to OAuth2 (its
/// `secretRef` dropped, which a rule allows only with Password) is tested, not refused; a
/// manifest that lacks a required field is refused naming it, though the cluster's copy
/// has it.
#[tokio::test]
async fn check_of_a_manifest_of_an_existing_provider_checks_the_manifest_alone() {
    let env = alice_env("cli-alone").await;
    let port = env.bed.dovecot().imaps_port();
    let password = provider("moved", "IMAP", port, "Implicit", ALICE_AUTH, "");
    env.apply(&password);
    let check = |manifest: &str| {
        let mut cmd = Command::new(MAILROOM);
        cmd.args(["check", "-n", &env.ns, "-f", "-"])
            .env("KUBECONFIG", env.bed.kubeconfig_path());
        let out = with_input(cmd, manifest);
        (out.status.code(), text(&out))
    };
    let server_dry_run = |manifest: &str| {
        let mut cmd = env.bed.kubectl();
        cmd.args(["-n", &env.ns, "apply", "--dry-run=server", "-f", "-"]);
        with_input(cmd, manifest)
    };

    let oauth2 = password.replace(
        ALICE_AUTH,
        "{method: OAuth2, username: alice, oauth2: {provider: Generic, clientId: c, tokenURL: 'https://127.0.0.1:1/token', tokenSecretRef: {name: alice-token}}}",
    );
    let applied = server_dry_run(&oauth2);
    assert!(
        applied.status.success(),
        "kubectl apply would take the move to OAuth2: {}",
        text(&applied)
    );
    let (code, out) = check(&oauth2);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("Testing {}/moved: IMAP", env.ns))
            && !out.contains("InvalidSpec")
            && !out.contains("secretRef is used only"),
        "the move to OAuth2 should be tested, not refused:\n{out}"
    );
    assert!(
        out.contains("reason=AuthorizationRequired")
            && out.contains("\"alice-token\" does not exist"),
        "{out}"
    );

    let hostless = password.replace(&format!("host: {}, ", mailroom_testbed::MAIL_HOST), "");
    assert!(!hostless.contains("host:"), "{hostless}");
    let (code, out) = check(&hostless);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("reason=InvalidSpec")
            && out.contains("the API server refuses this manifest")
            && out.contains("spec.server.host: Required value"),
        "the missing host should be refused by the API server, naming it:\n{out}"
    );
    assert!(!out.contains("connect "), "a test ran:\n{out}");

    // Neither dry run changed the provider.
    let stored = env.providers().get("moved").await.unwrap();
    assert_eq!(
        stored.spec.server.host,
        mailroom_testbed::MAIL_HOST.to_string()
    );
    assert!(
        stored.spec.authentication.secret_ref.is_some(),
        "{:?}",
        stored.spec.authentication
    );
}

/// `check -f` reads YAML merge keys (`<<: *anchor`) as kubectl does: providers of a list
/// that share their settings through anchors are checked and tested as `kubectl apply`
/// would apply them, not refused for a field `<<`.
#[tokio::test]
async fn check_of_manifests_expands_yaml_merge_keys() {
    let env = alice_env("cli-merge").await;
    let port = env.bed.dovecot().imaps_port();
    let host = mailroom_testbed::MAIL_HOST;
    let list = format!(
        "apiVersion: v1
kind: List
items:
- apiVersion: mailroom.dev/v1alpha1
  kind: IncomingMailProvider
  metadata: {{name: first}}
  spec: &spec
    server: {{host: {host}, port: {port}, protocol: IMAP}}
    tls: {{mode: Implicit, caBundleRef: {{kind: ConfigMap, name: test-ca}}}}
    authentication: {ALICE_AUTH}
    check: &check {{interval: 5m, timeout: 10s}}
- apiVersion: mailroom.dev/v1alpha1
  kind: IncomingMailProvider
  metadata: {{name: second}}
  spec:
    <<: *spec
    check:
      <<: *check
      interval: 10m
"
    );
    let mut cmd = env.bed.kubectl();
    cmd.args(["-n", &env.ns, "apply", "--dry-run=server", "-f", "-"]);
    let applied = with_input(cmd, &list);
    assert!(applied.status.success(), "{}", text(&applied));

    let mut cmd = Command::new(MAILROOM);
    cmd.args(["check", "-n", &env.ns, "-f", "-"])
        .env("KUBECONFIG", env.bed.kubeconfig_path());
    let out = with_input(cmd, &list);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains(&format!("Testing {}/second: IMAP", env.ns))
            && said.contains("2 of 2 IncomingMailProviders would be Ready")
            && !said.contains("<<"),
        "{said}"
    );
}

/// `check NAME` and `retest` against a cluster that does not serve IncomingMailProviders
/// (a kubeconfig's context of another cluster, where the CRD is not installed) say so,
/// naming the context and the API server, and the ways out; not that the provider is not
/// there. The bed's API server is every test's, so the CRD stays: the cluster is one that
/// answers every path as kube-apiserver answers one it does not serve (a plain-text
/// `404 page not found`, as the bed answers for a group without a CRD).
#[tokio::test]
async fn check_and_retest_say_when_the_cluster_does_not_serve_providers() {
    let dir = tempfile::tempdir().unwrap();
    let (file, server) = api_server_without_the_crd(&dir);
    let run = |args: &[&str]| {
        let out = Command::new(MAILROOM)
            .args(args)
            .args(["--request-timeout", "10s", "--kubeconfig"])
            .arg(&file)
            .output()
            .unwrap();
        (out.status.code(), text(&out))
    };
    let unserved = format!(
        "the cluster of context \"elsewhere\" ({server}/) does not serve IncomingMailProviders (mailroom.dev/v1alpha1): their CRD is not installed there"
    );
    for (args, first) in [
        (
            &["check", "inbox", "-n", "ops"][..],
            "IncomingMailProvider ops/inbox cannot be read: ",
        ),
        (
            &["retest", "inbox", "-n", "ops", "--timeout", "20"][..],
            "IncomingMailProvider ops/inbox cannot be read: ",
        ),
        (
            &["retest", "--all", "-n", "ops", "--timeout", "20"][..],
            "listing the IncomingMailProviders of namespace ops: ",
        ),
    ] {
        let (code, said) = run(args);
        assert_eq!(code, Some(2), "{args:?}: {said}");
        assert!(
            said.contains(&format!("{first}{unserved}"))
                && said.contains("--context")
                && said.contains("kubectl apply -f crds/")
                && !said.contains("not found"),
            "{args:?}: expected {first}{unserved}, saw:\n{said}"
        );
    }
    // A manifest is checked here instead, and the note says why the API server was not.
    let manifest = dir.path().join("provider.yaml");
    std::fs::write(
        &manifest,
        provider("inbox", "IMAP", 993, "Implicit", ALICE_AUTH, ""),
    )
    .unwrap();
    let (_, said) = run(&["check", "-n", "ops", "-f", manifest.to_str().unwrap()]);
    assert!(
        said.contains(&format!(
            "note: the manifest was not checked against the CRD's rules: {unserved}"
        )),
        "{said}"
    );
}

/// A kubeconfig in `dir` (its current context `elsewhere`) whose API server, plain HTTP,
/// answers every request as kube-apiserver answers a path it does not serve; and that
/// server's URL.
fn api_server_without_the_crd(dir: &tempfile::TempDir) -> (std::path::PathBuf, String) {
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let answer = |conn: std::net::TcpStream| -> std::io::Result<()> {
        let mut reader = BufReader::new(conn.try_clone()?);
        let mut conn = conn;
        loop {
            // The request line and headers, then the body it announces.
            let mut length = 0;
            let mut line = String::new();
            loop {
                line.clear();
                if reader.read_line(&mut line)? == 0 {
                    return Ok(());
                }
                if line == "\r\n" {
                    break;
                }
                if let Some((name, value)) = line.split_once(':')
                    && name.eq_ignore_ascii_case("content-length")
                {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
            reader.read_exact(&mut vec![0; length])?;
            conn.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\nX-Content-Type-Options: nosniff\r\nContent-Length: 19\r\n\r\n404 page not found\n",
            )?;
        }
    };
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || answer(conn));
        }
    });
    let file = dir.path().join("elsewhere.kubeconfig");
    std::fs::write(
        &file,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: elsewhere\n\
             clusters: [{{name: other, cluster: {{server: '{server}'}}}}]\n\
             users: [{{name: u, user: {{token: t}}}}]\n\
             contexts: [{{name: elsewhere, context: {{cluster: other, user: u, namespace: ops}}}}]\n"
        ),
    )
    .unwrap();
    (file, server)
}
