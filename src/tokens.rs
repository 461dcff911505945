//! Scoped API tokens: who may call what.
//!
//! A token is a random secret handed to one caller; keyledger keeps only its BLAKE3 hash,
//! with a name (recorded as the actor of every command the token issues) and a role:
//!
//! | role | may call |
//! | --- | --- |
//! | `admin` | everything |
//! | `issuer` | the key commands (generate, contacts, rotate, revoke, legacy-key) and every read |
//! | `reader` | the listing, a key's history, the reminders ahead |
//! | `verifier` | `POST /v1/verify` |
//! | `reporter` | `POST /v1/leaks` |
//!
//! The tokens file (`KEYLEDGER_TOKENS_FILE`, TOML, `[[token]] name, role, blake3`) is read at
//! start, again on SIGHUP and whenever it changes; `KEYLEDGER_API_TOKEN` is an admin token
//! named `admin`. A presented token is hashed once and compared with every known hash in
//! constant time, so neither a match nor its position shows in the response time.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Issuer,
    Reader,
    Verifier,
    Reporter,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Issuer => "issuer",
            Role::Reader => "reader",
            Role::Verifier => "verifier",
            Role::Reporter => "reporter",
        }
    }
}

/// Who called: a token's name and role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// One known token (its hash only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub role: Role,
    pub hash: blake3::Hash,
}

/// The tokens file as written.
#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    #[serde(default)]
    token: Vec<FileEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileEntry {
    name: String,
    role: Role,
    blake3: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("cannot read the tokens file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the tokens file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the tokens file {path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("a token named '{0}' exists already")]
    Exists(String),
    #[error("no token named '{0}'")]
    NotFound(String),
    #[error("a token name is 1 to 64 letters, digits, '-', '_' or '.'; '{0}' is not")]
    BadName(String),
}

/// The known tokens at one moment.
#[derive(Debug, Clone, Default)]
pub struct Book {
    entries: Vec<Entry>,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Book {
    /// The API token as an admin named `admin`, and the tokens of `file`.
    pub fn new(api_token: Option<&str>, file: Option<&Path>) -> Result<Self, TokensError> {
        let mut entries = Vec::new();
        if let Some(token) = api_token {
            entries.push(Entry {
                name: "admin".into(),
                role: Role::Admin,
                hash: blake3::hash(token.as_bytes()),
            });
        }
        if let Some(path) = file {
            entries.extend(read_file(path)?);
        }
        Ok(Self { entries })
    }

    /// Who presented `token`, if anyone: the token is hashed once and compared with every
    /// known hash in constant time (no early exit).
    pub fn caller(&self, token: &str) -> Option<Caller> {
        let presented = blake3::hash(token.as_bytes());
        let mut found: Option<&Entry> = None;
        for e in &self.entries {
            // blake3::Hash's equality is constant-time.
            let same = e.hash == presented;
            found = if same { Some(e) } else { found };
        }
        found.map(|e| Caller {
            name: e.name.clone(),
            role: e.role,
        })
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }
}

/// Reads and checks a tokens file.
pub fn read_file(path: &Path) -> Result<Vec<Entry>, TokensError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(TokensError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    let invalid = |reason: String| TokensError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let file: File = toml::from_str(&text).map_err(|e| invalid(e.message().to_owned()))?;
    let mut entries = Vec::with_capacity(file.token.len());
    for t in file.token {
        if !valid_name(&t.name) {
            return Err(invalid(format!("'{}' is not a valid token name", t.name)));
        }
        if entries.iter().any(|e: &Entry| e.name == t.name) {
            return Err(invalid(format!("the name '{}' appears twice", t.name)));
        }
        let hash = blake3::Hash::from_hex(&t.blake3)
            .map_err(|_| invalid(format!("token '{}': blake3 must be 64 hex digits", t.name)))?;
        entries.push(Entry {
            name: t.name,
            role: t.role,
            hash,
        });
    }
    Ok(entries)
}

fn write_file(path: &Path, entries: &[Entry]) -> Result<(), TokensError> {
    let file = File {
        token: entries
            .iter()
            .map(|e| FileEntry {
                name: e.name.clone(),
                role: e.role,
                blake3: e.hash.to_hex().to_string(),
            })
            .collect(),
    };
    let text = format!(
        "# keyledger's API tokens: BLAKE3 hashes only (keyledger tokens add|list|revoke).\n{}",
        toml::to_string(&file).unwrap_or_default()
    );
    let err = |source| TokensError::Write {
        path: path.to_owned(),
        source,
    };
    // Written next to the file and renamed over it: a reader never sees half a file.
    let tmp = path.with_extension("tmp");
    crate::config::write_private(&tmp, &text).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Adds a token named `name` with `role` to the file; returns the token (shown once).
pub fn add(path: &Path, name: &str, role: Role) -> Result<String, TokensError> {
    if !valid_name(name) {
        return Err(TokensError::BadName(name.to_owned()));
    }
    let mut entries = read_file(path)?;
    if entries.iter().any(|e| e.name == name) {
        return Err(TokensError::Exists(name.to_owned()));
    }
    let mut raw = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let token = format!("kl_{}", URL_SAFE_NO_PAD.encode(raw));
    entries.push(Entry {
        name: name.to_owned(),
        role,
        hash: blake3::hash(token.as_bytes()),
    });
    write_file(path, &entries)?;
    Ok(token)
}

/// Removes the token named `name` from the file.
pub fn revoke(path: &Path, name: &str) -> Result<(), TokensError> {
    let mut entries = read_file(path)?;
    let before = entries.len();
    entries.retain(|e| e.name != name);
    if entries.len() == before {
        return Err(TokensError::NotFound(name.to_owned()));
    }
    write_file(path, &entries)
}

/// The live set of tokens, replaced whole when the file changes.
#[derive(Clone)]
pub struct Tokens {
    book: Arc<RwLock<Arc<Book>>>,
    api_token: Option<Arc<str>>,
    file: Option<PathBuf>,
}

impl Tokens {
    pub fn new(api_token: Option<&str>, file: Option<PathBuf>) -> Result<Self, TokensError> {
        let book = Book::new(api_token, file.as_deref())?;
        Ok(Self {
            book: Arc::new(RwLock::new(Arc::new(book))),
            api_token: api_token.map(Arc::from),
            file,
        })
    }

    /// Who presented `token`.
    pub fn caller(&self, token: &str) -> Option<Caller> {
        let book = self.book.read().unwrap_or_else(|p| p.into_inner()).clone();
        book.caller(token)
    }

    /// Reads the file again; a file that does not read keeps the tokens as they were.
    pub fn reload(&self) {
        match Book::new(self.api_token.as_deref(), self.file.as_deref()) {
            Ok(book) => {
                let count = book.entries().len();
                *self.book.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(book);
                tracing::info!(tokens = count, "tokens reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "tokens file not reloaded; the previous tokens stay")
            }
        }
    }

    /// Reloads on SIGHUP and when the file's modification time or size changes (looked at
    /// every second), until `stop`.
    pub async fn watch(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let Some(path) = self.file.clone() else {
            return;
        };
        let stamp = |p: &Path| -> Option<(SystemTime, u64)> {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        };
        let mut seen = stamp(&path);
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let hangup = async {
                match hup.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let hangup = std::future::pending::<()>();
            tokio::select! {
                _ = stop.changed() => return,
                _ = hangup => self.reload(),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    let now = stamp(&path);
                    if now != seen {
                        seen = now;
                        self.reload();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_found_by_hash_with_their_role() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens.toml");
        let sending = add(&path, "sending-api", Role::Verifier).expect("added");
        let web = add(&path, "web-backend", Role::Issuer).expect("added");
        assert!(matches!(
            add(&path, "web-backend", Role::Reader),
            Err(TokensError::Exists(_))
        ));
        let text = std::fs::read_to_string(&path).expect("file");
        assert!(
            !text.contains(&sending) && !text.contains(&web),
            "hashes only"
        );
        let book = Book::new(Some("the-admin-token-0123456789"), Some(&path)).expect("reads");
        assert_eq!(
            book.caller(&sending),
            Some(Caller {
                name: "sending-api".into(),
                role: Role::Verifier
            })
        );
        assert_eq!(book.caller(&web).map(|c| c.role), Some(Role::Issuer));
        assert_eq!(
            book.caller("the-admin-token-0123456789").map(|c| c.name),
            Some("admin".into())
        );
        assert_eq!(book.caller("nobody"), None);
        revoke(&path, "sending-api").expect("revoked");
        let book = Book::new(None, Some(&path)).expect("reads");
        assert_eq!(book.caller(&sending), None);
        assert!(matches!(
            revoke(&path, "sending-api"),
            Err(TokensError::NotFound(_))
        ));
    }

    #[test]
    fn a_bad_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens.toml");
        std::fs::write(
            &path,
            "[[token]]\nname = \"x\"\nrole = \"root\"\nblake3 = \"00\"\n",
        )
        .expect("write");
        assert!(matches!(read_file(&path), Err(TokensError::Invalid { .. })));
        std::fs::write(
            &path,
            "[[token]]\nname = \"x\"\nrole = \"reader\"\nblake3 = \"00\"\n",
        )
        .expect("write");
        let e = read_file(&path).expect_err("short hash");
        assert!(e.to_string().contains("64 hex"), "{e}");
    }
}
