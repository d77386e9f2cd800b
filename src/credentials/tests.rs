use super::*;
use k8s_openapi::ByteString;
use secrecy::ExposeSecret;

fn spec(yaml: &str) -> IncomingMailProviderSpec {
    serde_yaml::from_str(yaml).unwrap()
}

fn secret(pairs: &[(&str, &str)]) -> Secret {
    Secret {
        data: Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    }
}

fn fetched(name: &str, s: Secret) -> Fetched {
    Fetched {
        namespace: "ops".into(),
        secrets: [(name.to_string(), s)].into(),
        ..Default::default()
    }
}

const PASSWORD: &str = "
server: {host: mail.example.com, protocol: IMAP}
authentication: {method: Password, secretRef: {name: alice-mail}}
";

#[test]
fn password_login_reads_both_keys_and_trims_the_newline() {
    let objects = fetched(
        "alice-mail",
        secret(&[("username", "alice"), ("password", "s3cret\n")]),
    );
    match login(&spec(PASSWORD), &objects).unwrap() {
        Login::Password {
            username,
            password,
            allow_unencrypted,
        } => {
            assert_eq!(username, "alice");
            assert_eq!(password.expose_secret(), "s3cret");
            assert!(!allow_unencrypted);
        }
        other => panic!("expected a password login, got {other:?}"),
    }
}

#[test]
fn missing_secret_names_it_and_its_namespace() {
    let err = login(
        &spec(PASSWORD),
        &Fetched {
            namespace: "ops".into(),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(err.reason(), Reason::SecretNotFound);
    assert_eq!(
        err.to_string(),
        "Secret \"alice-mail\" (spec.authentication.secretRef) not found in namespace \"ops\""
    );
}

#[test]
fn missing_key_lists_the_keys_present_but_no_values() {
    let objects = fetched(
        "alice-mail",
        secret(&[("username", "alice"), ("pasword", "typo-value")]),
    );
    let err = login(&spec(PASSWORD), &objects).unwrap_err();
    assert_eq!(err.reason(), Reason::SecretKeyMissing);
    let msg = err.to_string();
    assert!(msg.contains("has no key \"password\""), "{msg}");
    assert!(msg.contains("pasword"), "{msg}");
    assert!(!msg.contains("typo-value"), "{msg}");
}

#[test]
fn username_in_spec_wins_over_the_secret() {
    let s = spec(
        "
server: {host: mail.example.com, protocol: POP3}
authentication: {method: Password, username: bob, secretRef: {name: m, passwordKey: pw}}
",
    );
    let objects = fetched("m", secret(&[("pw", "x")]));
    match login(&s, &objects).unwrap() {
        Login::Password { username, .. } => assert_eq!(username, "bob"),
        other => panic!("expected a password login, got {other:?}"),
    }
}

#[test]
fn ca_bundle_from_config_map() {
    let s = spec(
        "
server: {host: mail.example.com, protocol: IMAP}
tls: {caBundleRef: {kind: ConfigMap, name: corp-ca}}
authentication: {method: None}
",
    );
    let mut objects = Fetched {
        namespace: "ops".into(),
        ..Default::default()
    };
    assert_eq!(
        ca_bundle(&s, &objects).unwrap_err().reason(),
        Reason::SecretNotFound
    );
    objects.config_maps.insert(
        "corp-ca".into(),
        ConfigMap {
            data: Some([("ca.crt".to_string(), "PEM".to_string())].into()),
            ..Default::default()
        },
    );
    assert_eq!(ca_bundle(&s, &objects).unwrap(), Some(b"PEM".to_vec()));
    assert_eq!(
        references(&s),
        vec![Reference {
            kind: ObjectKind::ConfigMap,
            name: "corp-ca".into()
        }]
    );
}

#[test]
fn oauth2_ca_bundle_is_referenced_and_read_with_its_field_named() {
    let s = spec(
        "
server: {host: mail.example.com, protocol: IMAP}
authentication:
  method: OAuth2
  oauth2:
    provider: Generic
    clientId: c
    tokenURL: https://id.example.com/token
    tokenSecretRef: {name: t}
    caBundleRef: {kind: Secret, name: id-ca, key: root.pem}
",
    );
    let mut objects = Fetched {
        namespace: "ops".into(),
        ..Default::default()
    };
    let missing = oauth2_ca_bundle(&s, &objects).unwrap_err();
    assert_eq!(missing.reason(), Reason::SecretNotFound);
    assert!(
        missing
            .to_string()
            .contains("spec.authentication.oauth2.caBundleRef"),
        "{missing}"
    );
    assert_eq!(
        ca_bundle(&s, &objects).unwrap(),
        None,
        "not the mail server's"
    );
    objects.secrets.insert(
        "id-ca".into(),
        Secret {
            data: Some([("root.pem".to_string(), ByteString(b"PEM".to_vec()))].into()),
            ..Default::default()
        },
    );
    assert_eq!(
        oauth2_ca_bundle(&s, &objects).unwrap(),
        Some(b"PEM".to_vec())
    );
    assert!(references(&s).contains(&Reference {
        kind: ObjectKind::Secret,
        name: "id-ca".into()
    }));
}
