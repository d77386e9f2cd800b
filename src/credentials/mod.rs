//! From the Secrets and ConfigMaps a provider references to what a test needs: the login
//! (a password, or an OAuth2 access token that [`tokens`] keeps fresh) and the extra trust
//! anchors. The decisions are pure functions of the objects; fetching
//! them is the caller's business (the controller reads a cache, the CLI the API server).

pub mod http;
pub mod proxy;
mod references;
pub mod tokens;

pub use references::{ObjectKind, Reference, References, bundle, references};

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use secrecy::SecretString;

use crate::api::{AuthMethod, CaBundleKind, CaBundleRef, IncomingMailProviderSpec, Reason};
use crate::probe::Login;

/// A referenced object was missing or incomplete. The message names the object and the
/// key, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("{kind} {name:?} ({field}) not found in namespace {namespace:?}")]
    NotFound {
        kind: ObjectKind,
        name: String,
        namespace: String,
        field: &'static str,
    },
    #[error("{kind} {name:?} ({field}) has no key {key:?}{present}")]
    KeyMissing {
        kind: ObjectKind,
        name: String,
        key: String,
        field: &'static str,
        present: String,
    },
    #[error("{kind} {name:?} key {key:?} ({field}) is not UTF-8 text")]
    NotText {
        kind: ObjectKind,
        name: String,
        key: String,
        field: &'static str,
    },
    /// OAuth2: no usable access token (AuthorizationRequired, AuthorizationRevoked,
    /// TokenRefreshFailed) or an OAuth2 spec that cannot work (InvalidSpec).
    #[error("{message}")]
    Token { reason: Reason, message: String },
}

impl CredentialError {
    pub fn reason(&self) -> Reason {
        match self {
            CredentialError::NotFound { .. } => Reason::SecretNotFound,
            CredentialError::KeyMissing { .. } | CredentialError::NotText { .. } => {
                Reason::SecretKeyMissing
            }
            CredentialError::Token { reason, .. } => *reason,
        }
    }
}

/// The referenced objects, fetched by the caller, keyed by name (same namespace).
/// `Debug` names the objects and shows none of their data.
#[derive(Default, Clone)]
pub struct Fetched {
    pub namespace: String,
    /// The provider's name, where known: messages that give a command name it.
    pub provider: String,
    pub secrets: BTreeMap<String, Secret>,
    pub config_maps: BTreeMap<String, ConfigMap>,
    /// OAuth2: why the token manager could not provide a usable access token, if it could
    /// not (the controller sets it; without it, the token Secret's cached token is used).
    pub token_problem: Option<(Reason, String)>,
    /// OAuth2: what the provider's status should warn of although a token is at hand
    /// (rotated tokens the token manager could not store).
    pub token_warning: Option<String>,
    /// OAuth2: the access token was granted for this test, not taken from the cache (the
    /// token manager sets it): a cached one the mail server refuses is refreshed once.
    pub token_granted: bool,
    /// OAuth2: the token Secret's name and the version whose tokens this test uses, when
    /// the token manager read or wrote the Secret for it. The schedule counts that version
    /// as tested: tokens kept since a failed write and stored by this test are a change
    /// for the other providers sharing the Secret, not for this one.
    pub token_source: Option<(String, String)>,
}

impl Fetched {
    /// The metadata of the referenced object, if it was fetched.
    pub fn meta(
        &self,
        r: &Reference,
    ) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta> {
        match r.kind {
            ObjectKind::Secret => self.secrets.get(&r.name).map(|s| &s.metadata),
            ObjectKind::ConfigMap => self.config_maps.get(&r.name).map(|c| &c.metadata),
        }
    }
}

impl std::fmt::Debug for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetched")
            .field("namespace", &self.namespace)
            .field("provider", &self.provider)
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .field("config_maps", &self.config_maps.keys().collect::<Vec<_>>())
            .field("token_problem", &self.token_problem)
            .field("token_warning", &self.token_warning)
            .field("token_granted", &self.token_granted)
            .field("token_source", &self.token_source)
            .finish()
    }
}

/// The login a test uses.
pub fn login(spec: &IncomingMailProviderSpec, objects: &Fetched) -> Result<Login, CredentialError> {
    let auth = &spec.authentication;
    match auth.method {
        AuthMethod::None => Ok(Login::None),
        AuthMethod::OAuth2 => tokens::login(spec, objects),
        AuthMethod::Password => {
            let Some(sref) = &auth.secret_ref else {
                // The CRD's CEL rule refuses this at apply time; a manifest checked with
                // `mailroom check -f` may still carry it.
                return Err(CredentialError::NotFound {
                    kind: ObjectKind::Secret,
                    name: String::new(),
                    namespace: objects.namespace.clone(),
                    field: "spec.authentication.secretRef",
                });
            };
            let field = "spec.authentication.secretRef";
            let secret =
                objects
                    .secrets
                    .get(&sref.name)
                    .ok_or_else(|| CredentialError::NotFound {
                        kind: ObjectKind::Secret,
                        name: sref.name.clone(),
                        namespace: objects.namespace.clone(),
                        field,
                    })?;
            let password = secret_text(secret, &sref.name, &sref.password_key, field)?;
            let username = match &auth.username {
                Some(u) => u.clone(),
                None => secret_text(secret, &sref.name, &sref.username_key, field)?,
            };
            Ok(Login::Password {
                username,
                password: SecretString::from(password),
                allow_unencrypted: auth.allow_unencrypted,
            })
        }
    }
}

/// The PEM bytes of `tls.caBundleRef`, if the spec has one.
pub fn ca_bundle(
    spec: &IncomingMailProviderSpec,
    objects: &Fetched,
) -> Result<Option<Vec<u8>>, CredentialError> {
    bundle_bytes(
        spec.tls.ca_bundle_ref.as_ref(),
        "spec.tls.caBundleRef",
        objects,
    )
}

/// The PEM bytes of `authentication.oauth2.caBundleRef`, if the spec has one.
pub fn oauth2_ca_bundle(
    spec: &IncomingMailProviderSpec,
    objects: &Fetched,
) -> Result<Option<Vec<u8>>, CredentialError> {
    let bundle = spec.authentication.oauth2.as_ref();
    bundle_bytes(
        bundle.and_then(|o| o.ca_bundle_ref.as_ref()),
        "spec.authentication.oauth2.caBundleRef",
        objects,
    )
}

/// The PEM bytes that `bundle` (the spec's `field`) names, from `objects`.
fn bundle_bytes(
    bundle: Option<&CaBundleRef>,
    field: &'static str,
    objects: &Fetched,
) -> Result<Option<Vec<u8>>, CredentialError> {
    let Some(CaBundleRef { kind, name, key }) = bundle else {
        return Ok(None);
    };
    let not_found = |kind| CredentialError::NotFound {
        kind,
        name: name.clone(),
        namespace: objects.namespace.clone(),
        field,
    };
    match kind {
        CaBundleKind::Secret => {
            let secret = objects
                .secrets
                .get(name)
                .ok_or_else(|| not_found(ObjectKind::Secret))?;
            secret_bytes(secret, name, key, field).map(Some)
        }
        CaBundleKind::ConfigMap => {
            let cm = objects
                .config_maps
                .get(name)
                .ok_or_else(|| not_found(ObjectKind::ConfigMap))?;
            let text = cm
                .data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|s| s.as_bytes().to_vec());
            let binary = || {
                cm.binary_data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .map(|b| b.0.clone())
            };
            text.or_else(binary)
                .map(Some)
                .ok_or_else(|| CredentialError::KeyMissing {
                    kind: ObjectKind::ConfigMap,
                    name: name.clone(),
                    key: key.clone(),
                    field,
                    present: present_keys(
                        cm.data
                            .iter()
                            .flat_map(|d| d.keys())
                            .chain(cm.binary_data.iter().flat_map(|d| d.keys())),
                    ),
                })
        }
    }
}

fn secret_bytes(
    secret: &Secret,
    name: &str,
    key: &str,
    field: &'static str,
) -> Result<Vec<u8>, CredentialError> {
    let from_data = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone());
    let from_string = || {
        secret
            .string_data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|s| s.as_bytes().to_vec())
    };
    from_data
        .or_else(from_string)
        .ok_or_else(|| CredentialError::KeyMissing {
            kind: ObjectKind::Secret,
            name: name.to_string(),
            key: key.to_string(),
            field,
            present: present_keys(
                secret
                    .data
                    .iter()
                    .flat_map(|d| d.keys())
                    .chain(secret.string_data.iter().flat_map(|d| d.keys())),
            ),
        })
}

/// A Secret as the API server stores it: `stringData` written over `data` (a Secret of a
/// file, or one about to be written back).
pub fn as_stored(mut secret: Secret) -> Secret {
    if let Some(strings) = secret.string_data.take() {
        let data = secret.data.get_or_insert_with(BTreeMap::new);
        for (key, text) in strings {
            data.insert(key, k8s_openapi::ByteString(text.into_bytes()));
        }
    }
    secret
}

pub(crate) fn secret_text(
    secret: &Secret,
    name: &str,
    key: &str,
    field: &'static str,
) -> Result<String, CredentialError> {
    let bytes = secret_bytes(secret, name, key, field)?;
    let text = String::from_utf8(bytes).map_err(|_| CredentialError::NotText {
        kind: ObjectKind::Secret,
        name: name.to_string(),
        key: key.to_string(),
        field,
    })?;
    // A trailing newline is nearly always an accident of `echo` or a file; servers reject it.
    Ok(text.trim_end_matches(['\r', '\n']).to_string())
}

/// "; it has keys a, b" — key names only, which are not secret and help fix a typo.
fn present_keys<'a>(keys: impl Iterator<Item = &'a String>) -> String {
    let keys: Vec<&str> = keys.map(String::as_str).collect();
    if keys.is_empty() {
        "; it has no keys".into()
    } else {
        format!("; it has keys {}", keys.join(", "))
    }
}

#[cfg(test)]
mod tests;
