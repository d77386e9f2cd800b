//! The CRD's OpenAPI schema applied to a manifest here, for `check -f` without a cluster
//! (a pull request's pipeline): what `kubectl apply` would be refused for by the schema
//! alone, in the API server's words, so that a typo (`mailbx:`) or a port of 70000 fails
//! the preflight instead of the apply. The CRD's CEL rules (`x-kubernetes-validations`)
//! need the API server, and are not checked here; the caller says so.

use serde_json::Value;

use crate::api::IncomingMailProvider;

/// What the schema refuses in `manifest` (an IncomingMailProvider as written), each naming
/// its field; empty if nothing. `status` is not looked at: an apply does not send it.
pub fn refusals(manifest: &Value) -> Vec<String> {
    use kube::CustomResourceExt as _;
    use kube::Resource as _;
    let mut found = Vec::new();
    let api_version = IncomingMailProvider::api_version(&());
    match manifest.get("apiVersion").and_then(Value::as_str) {
        Some(v) if v == api_version => {}
        v => found.push(format!(
            "apiVersion: Unsupported value: {}: the CRD serves {api_version}",
            v.map_or("none".into(), |v| format!("{v:?}"))
        )),
    }
    let crd = serde_json::to_value(IncomingMailProvider::crd()).expect("the CRD serializes");
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    // The API server reads apiVersion, kind and metadata itself; the schema is the rest.
    let mut object = manifest.clone();
    if let Some(map) = object.as_object_mut() {
        for own in ["apiVersion", "kind", "metadata", "status"] {
            map.remove(own);
        }
    }
    walk(schema, &object, "", &mut found);
    found
}

/// `value` at `path` (`spec.server.port`) against `schema`, adding what is refused.
fn walk(schema: &Value, value: &Value, path: &str, found: &mut Vec<String>) {
    let at = if path.is_empty() { "<root>" } else { path };
    // A null is taken for an absent field: the API server drops it where the schema does
    // not allow it, and defaults the field.
    if value.is_null() {
        return;
    }
    let want = schema["type"].as_str().unwrap_or_default();
    let is = match value {
        Value::Bool(_) => "boolean",
        // 993.0, as a YAML reader may give 993: JSON has one number type.
        Value::Number(n)
            if n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0) =>
        {
            "integer"
        }
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
        Value::Null => unreachable!("null is handled above"),
    };
    let fits = want.is_empty() || want == is || (want == "number" && is == "integer");
    if !fits {
        found.push(format!(
            "{at}: Invalid value: \"{is}\": {at} in body must be of type {want}: {}",
            short(value)
        ));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        let names: Vec<String> = allowed.iter().map(|a| a.to_string()).collect();
        found.push(format!(
            "{at}: Unsupported value: {}: supported values: {}",
            short(value),
            names.join(", ")
        ));
    }
    match value {
        Value::Object(fields) => {
            let properties = schema["properties"].as_object();
            let open = schema["x-kubernetes-preserve-unknown-fields"].as_bool() == Some(true)
                || schema.get("additionalProperties").is_some();
            for required in schema["required"].as_array().into_iter().flatten() {
                let name = required.as_str().unwrap_or_default();
                if fields.get(name).is_none_or(Value::is_null) {
                    found.push(format!("{}: Required value", join(path, name)));
                }
            }
            for (name, field) in fields {
                let field_path = join(path, name);
                match properties.and_then(|p| p.get(name)) {
                    Some(field_schema) => walk(field_schema, field, &field_path, found),
                    None if open => {
                        if let Some(items) = schema["additionalProperties"].as_object() {
                            walk(&Value::Object(items.clone()), field, &field_path, found);
                        }
                    }
                    // An object with no properties declared takes any.
                    None if properties.is_none() => {}
                    None => found.push(format!(".{field_path}: field not declared in schema")),
                }
            }
        }
        Value::Array(items) => {
            if let Some(max) = schema["maxItems"].as_u64()
                && items.len() as u64 > max
            {
                found.push(format!(
                    "{at}: Too many: {}: must have at most {max} items",
                    items.len()
                ));
            }
            for (i, item) in items.iter().enumerate() {
                walk(&schema["items"], item, &format!("{path}[{i}]"), found);
            }
        }
        Value::String(text) => {
            let length = text.chars().count() as u64;
            if let Some(max) = schema["maxLength"].as_u64()
                && length > max
            {
                found.push(format!("{at}: Too long: may not be more than {max} bytes"));
            }
            if let Some(min) = schema["minLength"].as_u64()
                && length < min
            {
                found.push(format!(
                    "{at}: Invalid value: {}: {at} in body should be at least {min} chars long",
                    short(value)
                ));
            }
            if let Some(pattern) = schema["pattern"].as_str()
                && regex::Regex::new(pattern).is_ok_and(|re| !re.is_match(text))
            {
                found.push(format!(
                    "{at}: Invalid value: {}: {at} in body should match '{pattern}'",
                    short(value)
                ));
            }
        }
        Value::Number(n) => {
            let n = n.as_f64().unwrap_or_default();
            if let Some(max) = schema["maximum"].as_f64()
                && n > max
            {
                found.push(format!(
                    "{at}: Invalid value: {}: {at} in body should be less than or equal to {max}",
                    short(value)
                ));
            }
            if let Some(min) = schema["minimum"].as_f64()
                && n < min
            {
                found.push(format!(
                    "{at}: Invalid value: {}: {at} in body should be greater than or equal to {min}",
                    short(value)
                ));
            }
        }
        _ => {}
    }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

/// A value as a refusal quotes it: JSON, cut short.
fn short(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 64 {
        format!("{}…", text.chars().take(64).collect::<String>())
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(spec: &str) -> Value {
        let yaml = format!(
            "apiVersion: mailroom.dev/v1alpha1\nkind: IncomingMailProvider\nmetadata: {{name: p, labels: {{a: b}}}}\nspec: {spec}"
        );
        serde_yaml::from_str(&yaml).unwrap()
    }

    #[test]
    fn a_valid_manifest_is_not_refused() {
        let m = manifest(
            "{server: {host: imap.example.com, port: 993, protocol: IMAP}, tls: {mode: Implicit}, authentication: {method: Password, secretRef: {name: s}}, check: {interval: 5m, mailbox: INBOX}}",
        );
        assert_eq!(refusals(&m), Vec::<String>::new());
    }

    #[test]
    fn what_the_schema_refuses_is_named_by_its_field() {
        let m = manifest(
            "{server: {host: h, port: 70000, protocol: SMTP}, tls: {mode: Implicit, allowUnencrpyted: true}, authentication: {method: None}, chek: {}}",
        );
        let found = refusals(&m);
        let has = |text: &str| found.iter().any(|f| f.contains(text));
        assert!(
            has(
                "spec.server.port: Invalid value: 70000: spec.server.port in body should be less than or equal to 65535"
            ),
            "{found:?}"
        );
        assert!(
            has("spec.server.protocol: Unsupported value: \"SMTP\""),
            "{found:?}"
        );
        assert!(
            has(".spec.tls.allowUnencrpyted: field not declared in schema"),
            "{found:?}"
        );
        assert!(has(".spec.chek: field not declared in schema"), "{found:?}");
        assert_eq!(found.len(), 4, "{found:?}");
    }

    #[test]
    fn a_missing_field_a_wrong_type_and_another_version_are_refused() {
        let mut m =
            manifest("{server: {port: '993', protocol: IMAP}, authentication: {method: None}}");
        m["apiVersion"] = "mailroom.dev/v1beta9".into();
        let found = refusals(&m);
        let has = |text: &str| found.iter().any(|f| f.contains(text));
        assert!(has("spec.server.host: Required value"), "{found:?}");
        assert!(
            has(
                "spec.server.port: Invalid value: \"string\": spec.server.port in body must be of type integer"
            ),
            "{found:?}"
        );
        assert!(
            has("apiVersion: Unsupported value: \"mailroom.dev/v1beta9\""),
            "{found:?}"
        );
    }

    #[test]
    fn a_null_field_or_a_whole_number_as_a_float_is_taken_as_the_api_server_takes_it() {
        let mut m = manifest(
            "{server: {host: h, protocol: IMAP}, authentication: {method: None}, check: null}",
        );
        m["spec"]["server"]["port"] = serde_json::json!(993.0);
        assert_eq!(refusals(&m), Vec::<String>::new());
        m["spec"]["server"]["host"] = Value::Null;
        assert_eq!(refusals(&m), ["spec.server.host: Required value"]);
    }

    #[test]
    fn a_status_saved_with_the_manifest_is_not_looked_at() {
        let mut m = manifest("{server: {host: h, protocol: IMAP}, authentication: {method: None}}");
        m["status"] = serde_json::json!({"anything": 1});
        assert_eq!(refusals(&m), Vec::<String>::new());
    }
}
