//! Configuration in two stages: the file as written ([`file`]), then a validated [`Config`]
//! the runtime uses as is. Every error names file, line, column and key path ([`error`]).
//! This module owns the defaults and every rule about what a valid config is; it knows
//! nothing of sockets or tasks.

mod error;
mod file;
pub mod health;
mod locate;
mod ops;
mod tls;
mod udp;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

pub use error::{ConfigError, ConfigLocation};
pub use file::ConfigDuration;
pub use health::{proxy_protocol_notes, CheckKind, HealthCheckConfig, OnBackendDown};
pub use ops::{AccessLogConfig, AccessLogFormat, AccessLogTarget, AdminConfig, AdminToken};
pub use tls::{AcceptProxy, ProxyProtocolMode, SniPattern, SniRoute, TlsPassthrough};
pub use udp::{Protocol, UdpConfig};

use crate::balance::{self, Algorithm};
use file::{BackendSection, ConfigFile, DefaultsSection, ListenerSection, PoolSection};
use locate::Locations;

pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
pub const DEFAULT_RETRIES: u32 = 2;
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
pub const DEFAULT_MAX_FAILS: u32 = 3;
pub const DEFAULT_FAIL_DURATION: Duration = Duration::from_secs(10);
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
pub const MAX_WEIGHT: u32 = 256;
pub const MAX_RETRIES: u32 = 16;

/// What a Maglev pool hashes to choose a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashKey {
    /// The client's IP address: every connection from one host goes to one backend.
    ClientIp,
    /// The client's IP address and port: spreads one host's connections.
    ClientIpPort,
    /// The TLS server name (SNI) of a passthrough listener; the client IP when none was sent.
    Sni,
}

impl HashKey {
    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            HashKey::ClientIp => "client_ip",
            HashKey::ClientIpPort => "client_ip_port",
            HashKey::Sni => "sni",
        }
    }
}

/// A validated configuration: every reference resolves and every value is in range.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was read from (for messages); `<embedded>` or `<command line>` otherwise.
    pub source: String,
    pub global: GlobalConfig,
    pub listeners: Vec<ListenerConfig>,
    pub pools: Vec<PoolConfig>,
    /// The admin HTTP server; None when the file has no `admin` section.
    pub admin: Option<AdminConfig>,
    /// One record per connection; None when the file has no `access_log` section.
    pub access_log: Option<AccessLogConfig>,
}

#[derive(Debug, Clone)]
pub struct GlobalConfig {
    /// Runtime worker threads; None: one per core.
    pub worker_threads: Option<usize>,
    /// How long open connections may finish after SIGTERM/SIGINT before they are closed.
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub pool: String,
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub reuse_port: bool,
    /// Accept tasks (each with its own SO_REUSEPORT socket); 1 without `reuse_port`.
    pub accept_tasks: usize,
    /// Route by the TLS ClientHello's server name (the pools then come from its routes).
    pub tls_passthrough: Option<TlsPassthrough>,
    /// PROXY protocol header sent to backends.
    pub proxy_protocol: ProxyProtocolMode,
    /// Peers trusted to send a PROXY header (and required to).
    pub accept_proxy_protocol: Option<AcceptProxy>,
    /// Source ACL (`allow`, `deny`); empty allows everyone.
    pub acl: crate::acl::Acl,
    /// `tcp` (the default) or `udp`.
    pub protocol: Protocol,
    /// Flow settings; used only when `protocol` is `udp` (defaults otherwise).
    pub udp: UdpConfig,
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub name: String,
    pub balance: Algorithm,
    /// What a Maglev pool hashes; `client_ip` for the other algorithms, which hash nothing.
    pub hash_key: HashKey,
    /// A `hash_key` written on a pool whose algorithm does not hash: accepted, unused, and
    /// reported by [`notes`].
    pub ignored_hash_key: Option<HashKey>,
    pub maglev_table_size: usize,
    pub connect_timeout: Duration,
    pub retries: u32,
    pub max_fails: u32,
    pub fail_duration: Duration,
    pub backends: Vec<BackendConfig>,
    /// Active health check; None: `type: none` or no `health_check` key.
    pub health_check: Option<HealthCheckConfig>,
    pub on_backend_down: OnBackendDown,
    /// Pool that serves this pool's connections while none of its backends is available.
    pub fallback_pool: Option<String>,
}

#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// Identity within the pool (metrics, logs, admin API): `name`, or the address as written.
    pub name: String,
    pub address: SocketAddr,
    pub weight: u32,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            location: ConfigLocation {
                file: file.clone(),
                position: None,
                path: String::new(),
            },
            message: format!("cannot read: {e}"),
        })?;
        Config::from_yaml(&text, &file)
    }

    /// Parses and validates YAML text; `source` names it in errors.
    pub fn from_yaml(text: &str, source: &str) -> Result<Config, ConfigError> {
        let locations = Locations::index(text);
        let ctx = Ctx {
            source,
            locations: &locations,
        };
        let file: ConfigFile = parse(text, &ctx)?;
        validate(file, &ctx)
    }

    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| p.name == name)
    }

    pub fn listener(&self, name: &str) -> Option<&ListenerConfig> {
        self.listeners.iter().find(|l| l.name == name)
    }
}

/// Source name and positions, to turn a key path into a located error.
struct Ctx<'a> {
    source: &'a str,
    locations: &'a Locations,
}

impl Ctx<'_> {
    fn error(&self, path: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            location: ConfigLocation {
                file: self.source.to_string(),
                position: self.locations.find(path),
                path: path.to_string(),
            },
            message: message.into(),
        }
    }
}

fn parse(text: &str, ctx: &Ctx<'_>) -> Result<ConfigFile, ConfigError> {
    if text.trim().is_empty() {
        return Err(ctx.error(
            "",
            "the file is empty, expected a mapping with listeners and pools",
        ));
    }
    let deserializer = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let inner = e.into_inner();
        let message = error::humanize_serde_message(&inner.to_string());
        // The value's own position is the most precise, except for an unknown key, where
        // serde_yaml points at the key itself.
        let position = match ctx.locations.exact(&path) {
            Some(pos) if !message.starts_with("unknown key") => Some(pos),
            _ => inner
                .location()
                .map(|l| (l.line(), l.column()))
                .or_else(|| ctx.locations.find(&path)),
        };
        ConfigError {
            location: ConfigLocation {
                file: ctx.source.to_string(),
                position,
                path,
            },
            message,
        }
    })
}

fn validate(file: ConfigFile, ctx: &Ctx<'_>) -> Result<Config, ConfigError> {
    let defaults = &file.defaults;
    let global = GlobalConfig {
        worker_threads: match file.global.worker_threads {
            Some(n) if n == 0 || n > 1024 => {
                return Err(ctx.error(
                    "global.worker_threads",
                    format!("{n} is out of range, expected 1 to 1024"),
                ))
            }
            n => n,
        },
        shutdown_grace: dur(file.global.shutdown_grace, None, DEFAULT_SHUTDOWN_GRACE),
    };
    if let Some(n) = defaults.retries {
        check_retries(n, "defaults.retries", ctx)?;
    }

    let mut pools = Vec::with_capacity(file.pools.len());
    let mut pool_names = HashSet::new();
    for (i, section) in file.pools.into_iter().enumerate() {
        let path = format!("pools[{i}]");
        if !pool_names.insert(section.name.clone()) {
            return Err(ctx.error(
                &format!("{path}.name"),
                format!("duplicate pool name \"{}\"", section.name),
            ));
        }
        pools.push(validate_pool(section, defaults, &path, ctx)?);
    }
    check_fallback_pools(&pools, ctx)?;

    if file.listeners.is_empty() {
        return Err(ctx.error("listeners", "no listeners, expected at least one"));
    }
    let mut listeners: Vec<ListenerConfig> = Vec::with_capacity(file.listeners.len());
    let mut listener_names = HashSet::new();
    for (i, section) in file.listeners.into_iter().enumerate() {
        let path = format!("listeners[{i}]");
        if !listener_names.insert(section.name.clone()) {
            return Err(ctx.error(
                &format!("{path}.name"),
                format!("duplicate listener name \"{}\"", section.name),
            ));
        }
        let listener = validate_listener(section, defaults, &path, ctx)?;
        tls::check_route_pools(&listener, &pool_names, &path, ctx)?;
        if !pool_names.contains(&listener.pool) {
            let known: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
            return Err(ctx.error(
                &format!("{path}.pool"),
                format!(
                    "no pool named \"{}\", expected one of: {}",
                    listener.pool,
                    if known.is_empty() {
                        "(no pools defined)".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        if let Some(other) = listeners
            .iter()
            .find(|l| l.protocol == listener.protocol && binds_conflict(l.bind, listener.bind))
        {
            return Err(ctx.error(
                &format!("{path}.bind"),
                format!(
                    "{} is already used by listener \"{}\" ({})",
                    listener.bind, other.name, other.bind
                ),
            ));
        }
        listeners.push(listener);
    }
    tls::check_sni_hash_pools(&listeners, &pools, ctx)?;

    Ok(Config {
        source: ctx.source.to_string(),
        global,
        listeners,
        pools,
        admin: ops::validate_admin(file.admin, ctx)?,
        access_log: ops::validate_access_log(file.access_log, ctx)?,
    })
}

fn validate_listener(
    mut s: ListenerSection,
    defaults: &DefaultsSection,
    path: &str,
    ctx: &Ctx<'_>,
) -> Result<ListenerConfig, ConfigError> {
    let bind = parse_addr(&s.bind, &format!("{path}.bind"), ctx)?;
    let (protocol, udp) = udp::validate(&s, path, ctx)?;
    let extras = tls::validate_listener(&mut s, path, ctx)?;
    if protocol == Protocol::Udp {
        let tcp_only = [
            ("tls_passthrough", extras.tls_passthrough.is_some()),
            (
                "proxy_protocol",
                extras.proxy_protocol != ProxyProtocolMode::None,
            ),
            (
                "accept_proxy_protocol",
                extras.accept_proxy_protocol.is_some(),
            ),
            ("allow", !s.allow.is_empty()),
            ("deny", !s.deny.is_empty()),
        ];
        if let Some((key, _)) = tcp_only.iter().find(|(_, set)| *set) {
            return Err(ctx.error(
                &format!("{path}.{key}"),
                format!("{key} applies to tcp listeners only (this one has protocol: udp)"),
            ));
        }
    }
    let max_connections = s
        .max_connections
        .or(defaults.max_connections)
        .unwrap_or(DEFAULT_MAX_CONNECTIONS);
    if max_connections == 0 {
        return Err(ctx.error(
            &format!("{path}.max_connections"),
            "0 admits nothing, expected at least 1",
        ));
    }
    let reuse_port = s.reuse_port.unwrap_or(false);
    let accept_tasks = match (reuse_port, s.accept_tasks) {
        (false, Some(_)) => {
            return Err(ctx.error(
                &format!("{path}.accept_tasks"),
                "accept_tasks needs reuse_port: true (each accept task binds its own socket)",
            ))
        }
        (true, Some(n)) if n == 0 || n > 256 => {
            return Err(ctx.error(
                &format!("{path}.accept_tasks"),
                format!("{n} is out of range, expected 1 to 256"),
            ))
        }
        (true, Some(n)) => n,
        (true, None) => std::thread::available_parallelism().map_or(1, |n| n.get()),
        (false, None) => 1,
    };
    Ok(ListenerConfig {
        name: s.name,
        bind,
        pool: extras.pool,
        max_connections,
        idle_timeout: dur(s.idle_timeout, defaults.idle_timeout, DEFAULT_IDLE_TIMEOUT),
        reuse_port,
        accept_tasks,
        tls_passthrough: extras.tls_passthrough,
        proxy_protocol: extras.proxy_protocol,
        accept_proxy_protocol: extras.accept_proxy_protocol,
        acl: extras.acl,
        protocol,
        udp,
    })
}

fn validate_pool(
    s: PoolSection,
    defaults: &DefaultsSection,
    path: &str,
    ctx: &Ctx<'_>,
) -> Result<PoolConfig, ConfigError> {
    let balance = s.balance.unwrap_or(Algorithm::RoundRobin);
    let (hash_key, ignored_hash_key) = match (balance, s.hash_key) {
        (Algorithm::Maglev, key) => (key.unwrap_or(HashKey::ClientIp), None),
        (_, key) => (HashKey::ClientIp, key),
    };
    if s.backends.is_empty() {
        return Err(ctx.error(
            &format!("{path}.backends"),
            "no backends, expected at least one",
        ));
    }
    let mut backends = Vec::with_capacity(s.backends.len());
    for (i, b) in s.backends.into_iter().enumerate() {
        let bpath = format!("{path}.backends[{i}]");
        let backend = validate_backend(b, &bpath, ctx)?;
        if backends
            .iter()
            .any(|o: &BackendConfig| o.name == backend.name)
        {
            return Err(ctx.error(
                &format!("{bpath}.name"),
                format!(
                    "duplicate backend \"{}\" in this pool; give each a distinct name",
                    backend.name
                ),
            ));
        }
        backends.push(backend);
    }
    if backends.iter().all(|b| b.weight == 0) {
        return Err(ctx.error(
            &format!("{path}.backends"),
            "every backend has weight 0, so nothing can be chosen; expected at least one weight above 0",
        ));
    }
    let maglev_table_size = s
        .maglev_table_size
        .unwrap_or(balance::DEFAULT_MAGLEV_TABLE_SIZE);
    let min_table = (backends.len() * 100).max(101);
    if !balance::is_prime(maglev_table_size) || maglev_table_size < min_table {
        return Err(ctx.error(
            &format!("{path}.maglev_table_size"),
            format!("{maglev_table_size} is not usable, expected a prime of at least {min_table} (100 per backend), such as 65537"),
        ));
    }
    let retries = s.retries.or(defaults.retries).unwrap_or(DEFAULT_RETRIES);
    check_retries(retries, &format!("{path}.retries"), ctx)?;
    let health_check = match s.health_check {
        Some(h) => health::validate(h, &format!("{path}.health_check"), ctx)?,
        None => None,
    };
    Ok(PoolConfig {
        health_check,
        on_backend_down: s.on_backend_down.unwrap_or_default(),
        fallback_pool: s.fallback_pool,
        name: s.name,
        balance,
        hash_key,
        ignored_hash_key,
        maglev_table_size,
        connect_timeout: dur(
            s.connect_timeout,
            defaults.connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
        ),
        retries,
        max_fails: s
            .max_fails
            .or(defaults.max_fails)
            .unwrap_or(DEFAULT_MAX_FAILS),
        fail_duration: dur(
            s.fail_duration,
            defaults.fail_duration,
            DEFAULT_FAIL_DURATION,
        ),
        backends,
    })
}

fn validate_backend(
    b: BackendSection,
    path: &str,
    ctx: &Ctx<'_>,
) -> Result<BackendConfig, ConfigError> {
    let address = parse_addr(&b.address, &format!("{path}.address"), ctx)?;
    let weight = b.weight.unwrap_or(1);
    if weight > MAX_WEIGHT {
        return Err(ctx.error(
            &format!("{path}.weight"),
            format!("{weight} is out of range, expected 0 to {MAX_WEIGHT}"),
        ));
    }
    Ok(BackendConfig {
        name: b.name.unwrap_or_else(|| b.address.trim().to_string()),
        address,
        weight,
    })
}

/// A `fallback_pool` names another pool of this config.
fn check_fallback_pools(pools: &[PoolConfig], ctx: &Ctx<'_>) -> Result<(), ConfigError> {
    for (i, pool) in pools.iter().enumerate() {
        let Some(fallback) = &pool.fallback_pool else {
            continue;
        };
        let path = format!("pools[{i}].fallback_pool");
        if *fallback == pool.name {
            return Err(ctx.error(
                &path,
                format!("pool \"{fallback}\" cannot be its own fallback, expected another pool"),
            ));
        }
        if !pools.iter().any(|p| p.name == *fallback) {
            let known: Vec<&str> = pools
                .iter()
                .filter(|p| p.name != pool.name)
                .map(|p| p.name.as_str())
                .collect();
            return Err(ctx.error(
                &path,
                format!(
                    "no pool named \"{fallback}\", expected one of: {}",
                    if known.is_empty() {
                        "(no other pools defined)".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
    }
    Ok(())
}

fn check_retries(n: u32, path: &str, ctx: &Ctx<'_>) -> Result<(), ConfigError> {
    if n > MAX_RETRIES {
        return Err(ctx.error(
            path,
            format!("{n} is out of range, expected 0 to {MAX_RETRIES}"),
        ));
    }
    Ok(())
}

fn parse_addr(text: &str, path: &str, ctx: &Ctx<'_>) -> Result<SocketAddr, ConfigError> {
    text.trim().parse().map_err(|_| {
        ctx.error(
            path,
            format!(
                "invalid address \"{text}\", expected IP:port such as 127.0.0.1:5432 or [::1]:5432"
            ),
        )
    })
}

fn dur(
    own: Option<ConfigDuration>,
    default: Option<ConfigDuration>,
    fallback: Duration,
) -> Duration {
    own.or(default).map_or(fallback, |d| d.0)
}

/// Two listeners cannot share a port when their addresses overlap: equal, or one is the
/// wildcard of the same family.
fn binds_conflict(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip()
            || (a.is_ipv4() == b.is_ipv4() && (a.ip().is_unspecified() || b.ip().is_unspecified())))
}

/// Builds a one-listener config for `switchyard forward`.
pub fn forward_config(
    listen: &str,
    to: &[String],
    balance: Algorithm,
) -> Result<Config, ConfigError> {
    let mut yaml = format!(
        "listeners:\n  - name: forward\n    bind: \"{listen}\"\n    pool: forward\npools:\n  - name: forward\n    balance: {}\n    backends:\n",
        balance.name()
    );
    for addr in to {
        yaml.push_str(&format!("      - address: \"{}\"\n", addr.trim()));
    }
    Config::from_yaml(&yaml, "<command line>")
}

/// What is worth telling about a valid config: `check` prints these as notes, startup and
/// reload log them as warnings.
pub fn notes(config: &Config) -> Vec<String> {
    let mut notes: Vec<String> = config
        .pools
        .iter()
        .enumerate()
        .filter_map(|(i, pool)| {
            let key = pool.ignored_hash_key?;
            Some(format!(
                "pools[{i}].hash_key: hash_key: {} has no effect with balance: {} and is ignored; only maglev pools hash",
                key.name(),
                pool.balance.name()
            ))
        })
        .collect();
    notes.extend(proxy_protocol_notes(config));
    notes
}

/// Names of pools no listener uses (reported by `check`, not an error).
pub fn unused_pools(config: &Config) -> Vec<&str> {
    let used: HashMap<&str, ()> = config
        .listeners
        .iter()
        .flat_map(|l| std::iter::once(l.pool.as_str()).chain(tls::route_pools(l)))
        .map(|p| (p, ()))
        .collect();
    config
        .pools
        .iter()
        .filter(|p| !used.contains_key(p.name.as_str()))
        .map(|p| p.name.as_str())
        .collect()
}

#[cfg(test)]
mod tests;
