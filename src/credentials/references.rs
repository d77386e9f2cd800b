//! Which objects a provider depends on: the controller re-tests a provider when one of
//! them changes (a rewritten token Secret too), and the CLI fetches them before a test.

use crate::api::{AuthMethod, CaBundleKind, CaBundleRef, IncomingMailProviderSpec};

/// The kinds of object a provider may reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    Secret,
    ConfigMap,
}

impl std::fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ObjectKind::Secret => "Secret",
            ObjectKind::ConfigMap => "ConfigMap",
        })
    }
}

/// One referenced object, in the provider's own namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    pub kind: ObjectKind,
    pub name: String,
}

pub type References = Vec<Reference>;

/// The Secrets and ConfigMaps a spec names, sorted and without duplicates.
pub fn references(spec: &IncomingMailProviderSpec) -> References {
    let mut refs = Vec::new();
    if spec.authentication.method == AuthMethod::Password
        && let Some(s) = &spec.authentication.secret_ref
    {
        refs.push(Reference {
            kind: ObjectKind::Secret,
            name: s.name.clone(),
        });
    }
    if spec.authentication.method == AuthMethod::OAuth2
        && let Some(o) = &spec.authentication.oauth2
    {
        refs.push(Reference {
            kind: ObjectKind::Secret,
            name: o.token_secret_ref.name.clone(),
        });
        if let Some(c) = &o.client_secret_ref {
            refs.push(Reference {
                kind: ObjectKind::Secret,
                name: c.name.clone(),
            });
        }
        if let Some(ca) = &o.ca_bundle_ref {
            refs.push(bundle(ca));
        }
    }
    if let Some(ca) = &spec.tls.ca_bundle_ref {
        refs.push(bundle(ca));
    }
    refs.sort();
    refs.dedup();
    refs
}

/// The object a caBundleRef names.
pub fn bundle(ca: &CaBundleRef) -> Reference {
    Reference {
        kind: match ca.kind {
            CaBundleKind::ConfigMap => ObjectKind::ConfigMap,
            CaBundleKind::Secret => ObjectKind::Secret,
        },
        name: ca.name.clone(),
    }
}
