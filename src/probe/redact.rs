//! Keeps a login's secret out of what a test reports. A server may quote back what it was
//! sent ("-ERR bad password hunter2", "NO you sent \"alice\" \"hunter2\""), and the probe
//! quotes the server, into step details, logs, the failure message and so into status and
//! Events, which people who may not read Secrets see. So the server's words pass through
//! [`Redactor::apply`], which puts `[redacted]` in place of the password or token in each
//! form it went out in, where they are read (the meter's recent lines, POP3 replies, SASL
//! challenges): before they are quoted, escaped or cut, which would hide a secret from a
//! match and leave part of it, and never over mailroom's own words (a host named like the
//! password would tell it).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use secrecy::ExposeSecret;
use secrecy::zeroize::Zeroizing;

use super::Login;
use super::sasl::Exchange;

/// What stands in for a secret.
pub(crate) const REDACTED: &str = "[redacted]";

/// The forms of one login's secret that could come back in a server's words; shared by a
/// test's reader and sessions.
#[derive(Clone, Default)]
pub(crate) struct Redactor {
    forms: std::sync::Arc<Vec<Zeroizing<String>>>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} forms)", self.forms.len())
    }
}

/// A secret shorter than this is not looked for as it is (or quoted): it would cut
/// ordinary words out of a server's replies ("ready", "OK"), and where `[redacted]` then
/// stood would tell it. Its base64 forms are looked for whatever its length: they decode to
/// it, and they do not read as a server's words.
const SHORTEST: usize = 6;

impl Redactor {
    /// The forms of `login`'s secret as they go out to `endpoint` (`host:port`): as is,
    /// as an IMAP quoted string (both only from [`SHORTEST`] characters on), alone in
    /// base64 (SASL LOGIN), and as each SASL initial response in base64 (PLAIN, XOAUTH2,
    /// OAUTHBEARER).
    pub(crate) fn of(login: &Login, endpoint: &str) -> Redactor {
        let mut forms = Vec::new();
        let mut add = |form: String| {
            // An empty form (the base64 of an empty password) would match everywhere.
            if !form.is_empty() && !forms.iter().any(|f: &Zeroizing<String>| **f == form) {
                forms.push(Zeroizing::new(form));
            }
        };
        let (secret, exchanges) = match login {
            Login::None => return Redactor::default(),
            Login::Password {
                username, password, ..
            } => (
                password,
                vec![
                    Exchange::plain(username, password),
                    Exchange::login(username, password),
                ],
            ),
            Login::OAuth2 {
                username, token, ..
            } => (
                token,
                vec![
                    Exchange::xoauth2(username, token),
                    Exchange::oauthbearer(username, token, endpoint),
                ],
            ),
        };
        let raw = secret.expose_secret();
        if raw.chars().count() >= SHORTEST {
            add(raw.to_string());
            add(raw.replace('\\', "\\\\").replace('"', "\\\""));
        }
        add(STANDARD.encode(raw));
        for mut exchange in exchanges {
            if let Some(response) = exchange.initial_response() {
                add(super::sasl::encode(&response).to_string());
            }
        }
        // The longest first, so that a form holding another is replaced whole.
        forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
        Redactor {
            forms: std::sync::Arc::new(forms),
        }
    }

    /// The length in bytes of the longest form: how much past a cut a line must be kept
    /// for a secret that straddles it to be found whole.
    pub(crate) fn longest(&self) -> usize {
        self.forms.first().map_or(0, |f| f.len())
    }

    /// `text` with every form of the secret replaced by [`REDACTED`].
    pub(crate) fn apply(&self, text: String) -> String {
        if !self.forms.iter().any(|f| text.contains(f.as_str())) {
            return text;
        }
        let mut out = text;
        for form in self.forms.iter() {
            out = out.replace(form.as_str(), REDACTED);
        }
        out
    }

    /// The same for bytes (a SASL challenge, decoded), read as UTF-8 where they are.
    pub(crate) fn apply_bytes(&self, bytes: &[u8]) -> Vec<u8> {
        if self.forms.is_empty() {
            return bytes.to_vec();
        }
        self.apply(String::from_utf8_lossy(bytes).into_owned())
            .into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use secrecy::SecretString;

    use super::*;
    use crate::api::SaslMechanism;

    /// Alice's password login to an IMAPS server.
    fn password(password: &str) -> Redactor {
        let login = Login::Password {
            username: "alice".into(),
            password: SecretString::from(password),
            allow_unencrypted: false,
        };
        Redactor::of(&login, "mail.example.com:993")
    }

    #[test]
    fn a_password_echoed_in_any_form_it_went_out_in_is_redacted() {
        let r = password(r#"hunter"2\x"#);
        let plain = STANDARD.encode("\0alice\0hunter\"2\\x");
        for (said, shown) in [
            (
                r#"-ERR [AUTH] bad password hunter"2\x"#.to_string(),
                "-ERR [AUTH] bad password [redacted]",
            ),
            (
                r#"NO you sent "alice" "hunter\"2\\x""#.to_string(),
                r#"NO you sent "alice" "[redacted]""#,
            ),
            (
                format!("-ERR cannot decode {plain}"),
                "-ERR cannot decode [redacted]",
            ),
            (
                format!("NO bad LOGIN response {}", STANDARD.encode(r#"hunter"2\x"#)),
                "NO bad LOGIN response [redacted]",
            ),
        ] {
            assert_eq!(r.apply(said), shown);
        }
        assert_eq!(
            r.apply("NO [AUTHENTICATIONFAILED] Authentication failed.".into()),
            "NO [AUTHENTICATIONFAILED] Authentication failed."
        );
    }

    #[test]
    fn a_token_echoed_raw_or_in_its_sasl_response_is_redacted() {
        let token = SecretString::from("ya29.a0AfH6SMBx-token");
        for mechanism in [SaslMechanism::XOAuth2, SaslMechanism::OAuthBearer] {
            let login = Login::OAuth2 {
                username: "alice@example.com".into(),
                token: token.clone(),
                mechanism,
                allow_unencrypted: false,
            };
            let r = Redactor::of(&login, "imap.example.com:993");
            let xoauth2 = STANDARD
                .encode("user=alice@example.com\x01auth=Bearer ya29.a0AfH6SMBx-token\x01\x01");
            let bearer = STANDARD.encode(
                "n,a=alice@example.com,\x01host=imap.example.com\x01port=993\x01auth=Bearer ya29.a0AfH6SMBx-token\x01\x01",
            );
            assert_eq!(
                r.apply(format!(
                    "NO token ya29.a0AfH6SMBx-token expired; got {xoauth2} and {bearer}"
                )),
                "NO token [redacted] expired; got [redacted] and [redacted]"
            );
        }
    }

    /// A short password is not looked for as it is, but each base64 form it went out in
    /// is: a server quoting `AUTH PLAIN`'s blob quotes the password.
    #[test]
    fn a_short_secret_echoed_in_base64_is_redacted() {
        let r = password("Pa55!");
        // SASL PLAIN: "\0alice\0Pa55!".
        assert_eq!(
            r.apply("-ERR cannot decode AGFsaWNlAFBhNTUh".into()),
            "-ERR cannot decode [redacted]"
        );
        // SASL LOGIN, the password alone: "Pa55!".
        assert_eq!(
            r.apply("NO bad LOGIN response UGE1NSE=".into()),
            "NO bad LOGIN response [redacted]"
        );
        // Not as it is: it would cut words.
        assert_eq!(r.apply("-ERR Pa55! no".into()), "-ERR Pa55! no");

        let token = SecretString::from("t0k");
        for (mechanism, blob) in [
            (
                SaslMechanism::XOAuth2,
                STANDARD.encode("user=alice@example.com\x01auth=Bearer t0k\x01\x01"),
            ),
            (
                SaslMechanism::OAuthBearer,
                STANDARD.encode(
                    "n,a=alice@example.com,\x01host=imap.example.com\x01port=993\x01auth=Bearer t0k\x01\x01",
                ),
            ),
        ] {
            let login = Login::OAuth2 {
                username: "alice@example.com".into(),
                token: token.clone(),
                mechanism,
                allow_unencrypted: false,
            };
            let r = Redactor::of(&login, "imap.example.com:993");
            assert_eq!(
                r.apply(format!("NO cannot decode {blob}")),
                "NO cannot decode [redacted]",
                "{mechanism:?}"
            );
            assert_eq!(r.apply("NO t0k expired".into()), "NO t0k expired");
        }
    }

    /// The base64 of an empty password is empty, and an empty form would put
    /// `[redacted]` between every two characters.
    #[test]
    fn an_empty_password_is_found_nowhere() {
        let r = password("");
        assert_eq!(r.apply("+OK ready".into()), "+OK ready");
    }

    #[test]
    fn a_very_short_password_cuts_no_words() {
        let r = password("ready");
        assert_eq!(r.apply("+OK Dovecot ready.".into()), "+OK Dovecot ready.");
        assert_eq!(Redactor::of(&Login::None, "h:1").apply("OK".into()), "OK");
    }
}
