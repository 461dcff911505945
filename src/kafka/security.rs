//! How keyledger's Kafka clients authenticate and encrypt: SASL (SCRAM) and TLS from
//! configuration.
//!
//! Every client keyledger makes — producers, the command consumer, the projector, the
//! index follower, the admin client that checks topics — gets these settings, so one set of
//! credentials (one Kafka principal per deployment role, see docs/OPERATIONS.md for the
//! ACLs) covers the process. Secrets (the SASL password, a TLS key's password) come from
//! the environment only and are never printed: `Debug` redacts them, `--help` does not show
//! them, and they are not logged.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use rdkafka::ClientConfig;

use crate::domain::SecretString;

/// `security.protocol` of librdkafka.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Protocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Plaintext => "plaintext",
            Protocol::Ssl => "ssl",
            Protocol::SaslPlaintext => "sasl_plaintext",
            Protocol::SaslSsl => "sasl_ssl",
        }
    }

    fn uses_sasl(self) -> bool {
        matches!(self, Protocol::SaslPlaintext | Protocol::SaslSsl)
    }

    fn uses_tls(self) -> bool {
        matches!(self, Protocol::Ssl | Protocol::SaslSsl)
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "plaintext" => Ok(Protocol::Plaintext),
            "ssl" | "tls" => Ok(Protocol::Ssl),
            "sasl_plaintext" => Ok(Protocol::SaslPlaintext),
            "sasl_ssl" => Ok(Protocol::SaslSsl),
            other => Err(format!(
                "unknown Kafka security protocol '{other}' (plaintext, ssl, sasl_plaintext, sasl_ssl)"
            )),
        }
    }
}

/// A SASL mechanism keyledger supports: SCRAM (a salted challenge; the password never
/// crosses the wire) or PLAIN (only over TLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    ScramSha256,
    ScramSha512,
    Plain,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
            Mechanism::ScramSha512 => "SCRAM-SHA-512",
            Mechanism::Plain => "PLAIN",
        }
    }
}

impl FromStr for Mechanism {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_uppercase().as_str() {
            "SCRAM-SHA-256" => Ok(Mechanism::ScramSha256),
            "SCRAM-SHA-512" => Ok(Mechanism::ScramSha512),
            "PLAIN" => Ok(Mechanism::Plain),
            other => Err(format!(
                "unsupported SASL mechanism '{other}' (SCRAM-SHA-256, SCRAM-SHA-512, PLAIN)"
            )),
        }
    }
}

/// SASL credentials.
#[derive(Clone)]
pub struct Sasl {
    pub mechanism: Mechanism,
    pub username: String,
    pub password: SecretString,
}

impl fmt::Debug for Sasl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sasl")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field("password", &"[redacted]")
            .finish()
    }
}

/// TLS settings: the CA that signs the brokers' certificates, and optionally a client
/// certificate (mutual TLS).
#[derive(Clone, Default)]
pub struct Tls {
    pub ca_location: Option<PathBuf>,
    pub certificate_location: Option<PathBuf>,
    pub key_location: Option<PathBuf>,
    pub key_password: Option<SecretString>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("ca_location", &self.ca_location)
            .field("certificate_location", &self.certificate_location)
            .field("key_location", &self.key_location)
            .field(
                "key_password",
                &self.key_password.as_ref().map(|_| "[redacted]"),
            )
            .finish()
    }
}

/// The security settings of every Kafka client.
#[derive(Debug, Clone, Default)]
pub struct Security {
    pub protocol: Protocol,
    pub sasl: Option<Sasl>,
    pub tls: Tls,
}

/// A setting that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecurityError {
    #[error("{0} needs SASL credentials (KEYLEDGER_KAFKA_SASL_USERNAME and KEYLEDGER_KAFKA_SASL_PASSWORD)")]
    MissingCredentials(&'static str),
    #[error("SASL credentials are set but the security protocol {0} does not use SASL (set KEYLEDGER_KAFKA_SECURITY_PROTOCOL to sasl_ssl or sasl_plaintext)")]
    UnusedCredentials(&'static str),
    #[error("the PLAIN mechanism sends the password as it is: use it only with sasl_ssl")]
    PlainWithoutTls,
    #[error("TLS files are set but the security protocol {0} does not use TLS")]
    UnusedTls(&'static str),
    #[error("a client certificate needs both KEYLEDGER_KAFKA_SSL_CERTIFICATE_LOCATION and KEYLEDGER_KAFKA_SSL_KEY_LOCATION")]
    HalfACertificate,
}

impl Security {
    /// Checks that the settings fit together (credentials with a SASL protocol, files with a
    /// TLS one, PLAIN only under TLS).
    pub fn validate(&self) -> Result<(), SecurityError> {
        let p = self.protocol;
        match (&self.sasl, p.uses_sasl()) {
            (None, true) => return Err(SecurityError::MissingCredentials(p.as_str())),
            (Some(_), false) => return Err(SecurityError::UnusedCredentials(p.as_str())),
            (Some(s), true) if s.mechanism == Mechanism::Plain && !p.uses_tls() => {
                return Err(SecurityError::PlainWithoutTls)
            }
            _ => {}
        }
        let t = &self.tls;
        let any_tls = t.ca_location.is_some()
            || t.certificate_location.is_some()
            || t.key_location.is_some()
            || t.key_password.is_some();
        if any_tls && !p.uses_tls() {
            return Err(SecurityError::UnusedTls(p.as_str()));
        }
        if t.certificate_location.is_some() != t.key_location.is_some() {
            return Err(SecurityError::HalfACertificate);
        }
        Ok(())
    }

    /// Sets these settings on a client configuration.
    pub fn apply(&self, c: &mut ClientConfig) {
        c.set("security.protocol", self.protocol.as_str());
        if let Some(s) = &self.sasl {
            c.set("sasl.mechanism", s.mechanism.as_str())
                .set("sasl.username", &s.username)
                .set("sasl.password", s.password.expose());
        }
        let t = &self.tls;
        let path = |p: &PathBuf| p.to_string_lossy().into_owned();
        if let Some(ca) = &t.ca_location {
            c.set("ssl.ca.location", path(ca));
        }
        if let Some(cert) = &t.certificate_location {
            c.set("ssl.certificate.location", path(cert));
        }
        if let Some(key) = &t.key_location {
            c.set("ssl.key.location", path(key));
        }
        if let Some(pw) = &t.key_password {
            c.set("ssl.key.password", pw.expose());
        }
    }
}

/// librdkafka settings that carry a secret: accepted in `KEYLEDGER_KAFKA_OPTIONS` but never
/// printed.
pub fn is_secret_setting(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password")
        || k.contains("secret")
        || k.ends_with(".pem")
        || k.contains("sasl.oauthbearer.config")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scram() -> Sasl {
        Sasl {
            mechanism: Mechanism::ScramSha512,
            username: "keyledger".into(),
            password: SecretString::new("hunter2-very-secret".into()),
        }
    }

    #[test]
    fn debug_never_shows_a_secret() {
        let s = Security {
            protocol: Protocol::SaslSsl,
            sasl: Some(scram()),
            tls: Tls {
                key_password: Some(SecretString::new("key-secret".into())),
                ..Tls::default()
            },
        };
        let printed = format!("{s:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains("key-secret"), "{printed}");
        assert!(printed.contains("keyledger"));
    }

    #[test]
    fn settings_must_fit_together() {
        let mut s = Security {
            protocol: Protocol::SaslPlaintext,
            ..Security::default()
        };
        assert!(matches!(
            s.validate(),
            Err(SecurityError::MissingCredentials(_))
        ));
        s.sasl = Some(scram());
        assert_eq!(s.validate(), Ok(()));
        s.sasl = Some(Sasl {
            mechanism: Mechanism::Plain,
            ..scram()
        });
        assert_eq!(s.validate(), Err(SecurityError::PlainWithoutTls));
        s.protocol = Protocol::Plaintext;
        assert!(matches!(
            s.validate(),
            Err(SecurityError::UnusedCredentials(_))
        ));
        let t = Security {
            protocol: Protocol::Ssl,
            tls: Tls {
                certificate_location: Some("c.pem".into()),
                ..Tls::default()
            },
            ..Security::default()
        };
        assert_eq!(t.validate(), Err(SecurityError::HalfACertificate));
        assert_eq!("SASL_SSL".parse(), Ok(Protocol::SaslSsl));
        assert!("kerberos".parse::<Protocol>().is_err());
    }
}
