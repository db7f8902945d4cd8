//! Client authentication and backend login.
//!
//! By default the login exchange is relayed between client and primary, so PostgreSQL decides who
//! gets in; the gateway keeps what it needs to log in again on another server (a cleartext
//! password, an md5 hash, a SCRAM ClientKey recovered with the role's verifier). With
//! `client_auth` set, the gateway checks the client itself against an auth file or auth_query.

pub mod ident;
pub mod login;
pub mod relay;
pub mod userlist;
pub mod verify;

use std::collections::HashMap;
use std::sync::Arc;

use understudy_protocol::scram::ClientKey;
use zeroize::Zeroizing;

use crate::config::{Auth, DEFAULT_AUTH_QUERY};
use crate::reload::Swappable;
use crate::sessions::Movability;
use crate::topology::{error_text, Topology};
pub use userlist::Secret;

/// What the gateway holds to log in as a role without its client.
#[derive(Clone)]
pub enum Credential {
    /// The server asked for no password.
    NotNeeded,
    /// A cleartext password.
    Password(Zeroizing<String>),
    /// The md5 hash PostgreSQL stores (`md5…`), enough to answer an md5 challenge.
    Md5(Zeroizing<String>),
    /// A SCRAM ClientKey, enough to log in to any server sharing the verifier.
    Scram {
        /// The key recovered from the client's proof.
        client_key: ClientKey,
        /// The server's key, to check the server's signature.
        server_key: Option<[u8; 32]>,
    },
    /// Nothing usable, and why.
    Missing(&'static str),
}

impl Credential {
    /// Whether a session holding this could be logged in again elsewhere.
    pub fn movability(&self) -> Movability {
        match self {
            Credential::Missing(why) => Movability::No((*why).to_owned()),
            _ => Movability::Yes,
        }
    }

    /// What a stored secret lets the gateway do on its own.
    pub fn from_secret(secret: &Secret) -> Self {
        match secret {
            Secret::Plain(p) => Credential::Password(p.clone()),
            Secret::Md5(h) => Credential::Md5(h.clone()),
            // A verifier checks a client but cannot log in; the ClientKey comes from the client.
            Secret::Scram(_) => Credential::Missing("only a SCRAM verifier is known for this role"),
        }
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credential::NotNeeded => "NotNeeded",
            Credential::Password(_) => "Password(..)",
            Credential::Md5(_) => "Md5(..)",
            Credential::Scram { .. } => "Scram(..)",
            Credential::Missing(why) => why,
        })
    }
}

/// Where role secrets come from: the auth file, then auth_query on the primary.
pub struct Secrets {
    /// The auth file's entries, replaced whole by a reload.
    file: Swappable<Arc<HashMap<String, Secret>>>,
    query: Option<String>,
    topology: Arc<Topology>,
    timeout: std::time::Duration,
}

impl Secrets {
    /// Reads the auth file, if any.
    pub fn load(
        auth: &Auth,
        topology: Arc<Topology>,
        timeout: std::time::Duration,
    ) -> Result<Self, String> {
        let file = Self::read_file(auth.auth_file.as_deref())?;
        Ok(Self {
            file: Swappable::new(Arc::new(file)),
            query: auth.auth_query.clone(),
            topology,
            timeout,
        })
    }

    /// The entries of the auth file at `path` (none without one).
    pub fn read_file(path: Option<&std::path::Path>) -> Result<HashMap<String, Secret>, String> {
        let mut file = HashMap::new();
        if let Some(path) = path {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read auth_file {}: {e}", path.display()))?;
            let entries = userlist::parse_userlist(&text)
                .map_err(|e| format!("auth_file {}: {e}", path.display()))?;
            for entry in entries {
                file.insert(entry.user, entry.secret);
            }
        }
        Ok(file)
    }

    /// Puts a re-read auth file's entries in force for the logins that follow.
    pub fn replace_file(&self, file: HashMap<String, Secret>) {
        self.file.set(Arc::new(file));
    }

    /// Whether any source is configured.
    pub fn configured(&self) -> bool {
        !self.file.get().is_empty() || self.query.is_some()
    }

    /// Whether every role's secret is looked up (`auth_query`), not only an auth file's.
    pub fn knows_every_role(&self) -> bool {
        self.query.is_some()
    }

    /// The secret for `user`, if a source knows it.
    pub async fn lookup(&self, user: &str) -> Result<Option<Secret>, String> {
        if let Some(s) = self.file.get().get(user) {
            return Ok(Some(s.clone()));
        }
        let Some(query) = &self.query else {
            return Ok(None);
        };
        let query = if query.is_empty() {
            DEFAULT_AUTH_QUERY
        } else {
            query
        };
        let primary = self
            .topology
            .primary(self.timeout)
            .await
            .ok_or("no primary to run auth_query on")?;
        let work = async {
            let rows = self
                .topology
                .query_backend(&primary, query, &[&user])
                .await
                .map_err(|e| e.text)?;
            let secret: Option<String> = match rows.first() {
                Some(row) => row.try_get(1).map_err(|e| error_text(&e))?,
                None => None,
            };
            match secret {
                Some(s) => Secret::classify(Zeroizing::new(s))
                    .map(Some)
                    .map_err(|e| e.to_string()),
                None => Ok(None),
            }
        };
        crate::clock::timeout(self.timeout, work)
            .await
            .map_err(|_| "auth_query timed out".to_owned())?
    }
}
