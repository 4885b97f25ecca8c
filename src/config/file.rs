//! The config file as written: serde structs that mirror the YAML one to one, with unknown
//! keys rejected. Nothing here is validated beyond types; `config::validate` turns a
//! [`ConfigFile`] into a [`super::Config`] that the runtime can use without further checks.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::balance::Algorithm;

use super::{HashKey, Protocol};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub global: GlobalSection,
    #[serde(default)]
    pub defaults: DefaultsSection,
    #[serde(default)]
    pub listeners: Vec<ListenerSection>,
    #[serde(default)]
    pub pools: Vec<PoolSection>,
    pub admin: Option<AdminSection>,
    pub access_log: Option<AccessLogSection>,
}

/// The admin HTTP server (metrics, status page, admin API).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    pub bind: Option<String>,
    /// Name of the environment variable that holds the admin token.
    pub token_env: Option<String>,
    /// Unix socket through which a new process takes over the listening sockets.
    pub upgrade_socket: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogSection {
    pub path: String,
    pub format: Option<super::AccessLogFormat>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalSection {
    pub worker_threads: Option<usize>,
    pub shutdown_grace: Option<ConfigDuration>,
}

/// Settings inherited by every listener and pool that does not set its own.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultsSection {
    pub connect_timeout: Option<ConfigDuration>,
    pub idle_timeout: Option<ConfigDuration>,
    pub retries: Option<u32>,
    pub max_connections: Option<usize>,
    pub max_fails: Option<u32>,
    pub fail_duration: Option<ConfigDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSection {
    pub name: String,
    pub bind: String,
    /// Required unless `tls_passthrough` chooses pools (checked in `config::tls`).
    pub pool: Option<String>,
    pub max_connections: Option<usize>,
    pub idle_timeout: Option<ConfigDuration>,
    pub reuse_port: Option<bool>,
    pub accept_tasks: Option<usize>,
    pub tls_passthrough: Option<super::tls::TlsPassthroughSection>,
    pub proxy_protocol: Option<super::tls::ProxyProtocolMode>,
    pub accept_proxy_protocol: Option<super::tls::AcceptProxySection>,
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
    pub protocol: Option<Protocol>,
    pub udp: Option<UdpSection>,
}

/// Settings of a `protocol: udp` listener.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UdpSection {
    pub idle_timeout: Option<ConfigDuration>,
    pub responses: Option<u32>,
    pub max_flows: Option<usize>,
    pub batch: Option<usize>,
    pub reuse_upstream_sockets: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSection {
    pub name: String,
    pub balance: Option<Algorithm>,
    pub hash_key: Option<HashKey>,
    pub maglev_table_size: Option<usize>,
    pub connect_timeout: Option<ConfigDuration>,
    pub retries: Option<u32>,
    pub max_fails: Option<u32>,
    pub fail_duration: Option<ConfigDuration>,
    #[serde(default)]
    pub backends: Vec<BackendSection>,
    pub health_check: Option<super::health::HealthCheckSection>,
    pub on_backend_down: Option<super::health::OnBackendDown>,
    pub fallback_pool: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSection {
    pub address: String,
    pub name: Option<String>,
    pub weight: Option<u32>,
}

/// A duration written as a string with a unit: `250ms`, `2s`, `1m30s`, `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(text.trim())
            .map(ConfigDuration)
            .map_err(|_| {
                serde::de::Error::custom(format!(
                    "invalid duration \"{text}\", expected a number with a unit such as 250ms, 2s or 1h"
                ))
            })
    }
}
