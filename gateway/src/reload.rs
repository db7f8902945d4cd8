//! Reloading the configuration while the gateway runs (SIGHUP, `POST /reload`, `understudy ctl
//! reload`), so that a changed user list or a renewed certificate does not cost a restart, which
//! would drop every client. The auth file and the TLS certificate files are read again and serve
//! the logins and handshakes that follow; sessions already open keep what they have. Any other
//! setting that changed is named as needing a restart and left as it is.

use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::auth::ident::IdentMap;
use crate::auth::Secrets;
use crate::config::{BackendTls, Config};
use crate::gateway::Shared;

/// Produces the configuration as it would be read at startup now (the file again, then the
/// command-line flags over it).
pub type ConfigSource = Box<dyn Fn() -> Result<Config, String> + Send + Sync>;

/// Settings a reload takes into use; the files they name are read again even when the
/// setting itself is unchanged.
pub const RELOADABLE: [&str; 10] = [
    "auth.auth_file",
    "auth.ident_file",
    "auth.ident_map",
    "tls.cert",
    "tls.key",
    "tls.client_ca",
    "backend_tls.cert",
    "backend_tls.key",
    "backend_tls.root_cert",
    "log_level",
];

/// A value a reload replaces whole, and that its users copy out (an `Arc` or an `Option` of
/// one) when they start a login or a handshake.
#[derive(Debug, Default)]
pub struct Swappable<T: Clone>(RwLock<T>);

impl<T: Clone> Swappable<T> {
    /// Holds `value`.
    pub fn new(value: T) -> Self {
        Self(RwLock::new(value))
    }

    /// The value in force.
    pub fn get(&self) -> T {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `value` in force.
    pub fn set(&self, value: T) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = value;
    }
}

/// What a reload did.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Whether the files were read and taken into use (nothing is applied when any of them, or
    /// the configuration itself, is bad).
    pub applied: bool,
    /// The files read again.
    pub reread: Vec<String>,
    /// Settings whose new value takes effect only after a restart.
    pub needs_restart: Vec<String>,
    /// Why nothing was applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Reads the configuration again (from `shared`'s source, or the running one when there is
/// none, which still re-reads the files it names) and applies what can be applied.
pub fn reload(shared: &Shared) -> Outcome {
    crate::systemd::reloading();
    let outcome = match prepare(shared) {
        Ok((next, outcome)) => {
            next.apply(shared);
            outcome
        }
        Err(error) => Outcome {
            applied: false,
            reread: Vec::new(),
            needs_restart: Vec::new(),
            error: Some(error),
        },
    };
    if let Some(error) = &outcome.error {
        tracing::error!(%error, "configuration reload failed; nothing changed");
    } else {
        tracing::info!(reread = ?outcome.reread, "configuration reloaded");
        if !outcome.needs_restart.is_empty() {
            tracing::warn!(settings = ?outcome.needs_restart, "changed settings that take effect only after a restart");
        }
    }
    let result = if outcome.applied { "applied" } else { "failed" };
    metrics::counter!("understudy_config_reloads_total", "outcome" => result).increment(1);
    crate::systemd::ready(&match &outcome.error {
        Some(error) => format!("accepting connections; the last reload failed: {error}"),
        None => "accepting connections; configuration reloaded".to_owned(),
    });
    outcome
}

/// Reloads at each SIGHUP, as PostgreSQL and PgBouncer do.
pub fn on_hangup(shared: Arc<Shared>) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the configuration");
            reload(&shared);
        }
    });
    Ok(())
}

/// Everything a reload puts in force, read and checked before any of it is.
struct Next {
    auth_file: std::collections::HashMap<String, crate::auth::userlist::Secret>,
    ident: Option<Arc<IdentMap>>,
    client_tls: Option<Option<Arc<crate::tls::ServerTls>>>,
    backend_tls: Option<Arc<rustls::ClientConfig>>,
    log_level: String,
}

impl Next {
    fn apply(self, shared: &Shared) {
        if let Err(e) = crate::telemetry::set_log_level(&self.log_level) {
            // Checked by `validate` already.
            tracing::warn!(error = %e, "log_level not applied");
        }
        shared.secrets.replace_file(self.auth_file);
        shared.ident.set(self.ident);
        if let Some(tls) = self.client_tls {
            shared.client_tls.set(tls);
        }
        let encrypted = self.backend_tls.is_some();
        shared.connector.tls.set(self.backend_tls);
        // Spares opened with the TLS settings just replaced would serve the next logins.
        if let Some(spares) = shared.connector.spares.as_ref().filter(|_| encrypted) {
            spares.replace_all();
        }
    }
}

fn prepare(shared: &Shared) -> Result<(Next, Outcome), String> {
    let running = &shared.config;
    let new = match &shared.config_source {
        Some(source) => source()?,
        None => running.clone(),
    };
    new.validate().map_err(|e| e.to_string())?;
    let mut reread = Vec::new();
    let mut needs_restart = changed_settings(running, &new)?;

    let auth_file = Secrets::read_file(new.auth.auth_file.as_deref())?;
    if let Some(path) = &new.auth.auth_file {
        reread.push(path.display().to_string());
    }
    let ident = IdentMap::load(&new.auth)?;
    if let Some(path) = &new.auth.ident_file {
        reread.push(path.display().to_string());
    }
    // `tls.required` stays as started, and cannot be left without a certificate.
    let client_tls = if new.tls.cert.is_none() && running.tls.required {
        needs_restart.push("tls.cert".to_owned());
        None
    } else {
        let tls = crate::tls::server_config(&new.tls).map_err(|e| e.to_string())?;
        reread.extend(
            [&new.tls.cert, &new.tls.key, &new.tls.client_ca]
                .into_iter()
                .flatten()
                .map(|p| p.display().to_string()),
        );
        Some(tls)
    };
    // The sslmode stays as started; the CA file it checks against, and the gateway's own
    // certificate and key, are read again.
    let backend = BackendTls {
        sslmode: running.backend_tls.sslmode,
        ..new.backend_tls.clone()
    };
    let backend_tls = crate::tls::backend_config(&backend).map_err(|e| e.to_string())?;
    if backend_tls.is_some() {
        reread.extend(
            [&backend.root_cert, &backend.cert, &backend.key]
                .into_iter()
                .flatten()
                .map(|p| p.display().to_string()),
        );
    }
    needs_restart.sort();
    needs_restart.dedup();
    Ok((
        Next {
            auth_file,
            ident,
            client_tls,
            backend_tls,
            log_level: new.log_level.clone(),
        },
        Outcome {
            applied: true,
            reread,
            needs_restart,
            error: None,
        },
    ))
}

/// The settings (dotted names, as in the configuration file) that differ between `running`
/// and `new`, except those a reload applies.
fn changed_settings(running: &Config, new: &Config) -> Result<Vec<String>, String> {
    let as_json = |c: &Config| serde_json::to_value(c).map_err(|e| e.to_string());
    let mut changed = Vec::new();
    differences("", &as_json(running)?, &as_json(new)?, &mut changed);
    changed.retain(|name| !RELOADABLE.contains(&name.as_str()));
    Ok(changed)
}

fn differences(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value::Object;
    match (a, b) {
        (Object(a), Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            let null = serde_json::Value::Null;
            for key in keys {
                let name = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                differences(
                    &name,
                    a.get(key).unwrap_or(&null),
                    b.get(key).unwrap_or(&null),
                    out,
                );
            }
        }
        (a, b) if a != b => out.push(prefix.to_owned()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_changed_settings_except_reloadable_ones() {
        let running = Config::default();
        let mut new = Config {
            listen: "127.0.0.1:7000".parse().unwrap(),
            ..Config::default()
        };
        new.failover.probe_timeout_ms += 1;
        new.auth.auth_file = Some("/etc/understudy/userlist.txt".into());
        new.tls.cert = Some("/etc/understudy/cert.pem".into());
        assert_eq!(
            changed_settings(&running, &new).unwrap(),
            ["failover.probe_timeout_ms", "listen"]
        );
        assert!(changed_settings(&running, &running.clone())
            .unwrap()
            .is_empty());
    }
}
