//! The `health_check`, `on_backend_down` and `fallback_pool` settings of a pool: file structs
//! as written and their validated form. Credentials are read here (from `password_env` or
//! `password_file`) so the runtime never sees a half-configured check, and they are held in
//! a [`Secret`] whose `Debug` never shows them. Probing itself lives in `crate::health`.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::file::ConfigDuration;
use super::{ConfigError, Ctx};

pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 2;
/// Upper bound for `rise` and `fall`.
pub const MAX_RISE_FALL: u32 = 100;
/// Largest datagram a `udp` check sends.
pub const MAX_UDP_PAYLOAD: usize = 1472;

/// `health_check.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckType {
    None,
    Tcp,
    Postgres,
    Mongodb,
    Udp,
    Dns,
}

/// What happens to open connections when their backend stops being eligible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBackendDown {
    /// Open connections continue; only new ones avoid the backend.
    #[default]
    Keep,
    /// Open connections are closed within one check interval.
    CloseConnections,
}

impl OnBackendDown {
    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            OnBackendDown::Keep => "keep",
            OnBackendDown::CloseConnections => "close_connections",
        }
    }
}

/// `health_check.initial_state`: the state of a backend before its first checks decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitialState {
    Up,
    Down,
}

/// Which Postgres servers a pool wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PostgresRole {
    Primary,
    Replica,
    Any,
}

/// Which MongoDB replica-set members a pool wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MongoRole {
    Primary,
    Secondary,
    Any,
}

/// TLS for the Postgres monitoring connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
}

/// What a `role: primary` pool does when more than one backend reports itself primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnMultiplePrimaries {
    /// Only the primary on the highest timeline is used; a tie refuses all of them.
    #[default]
    NewestTimeline,
    /// All of them are refused until exactly one remains.
    Reject,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSection {
    #[serde(rename = "type")]
    pub kind: CheckType,
    pub interval: Option<ConfigDuration>,
    pub timeout: Option<ConfigDuration>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    pub initial_state: Option<InitialState>,
    /// Accepted only to explain where it belongs (under `postgres:` or `mongodb:`).
    pub role: Option<serde_yaml::Value>,
    pub postgres: Option<PostgresSection>,
    pub mongodb: Option<MongoSection>,
    pub udp: Option<UdpSection>,
    pub dns: Option<DnsSection>,
    /// PROXY protocol LOCAL header sent first (none | v1 | v2).
    pub proxy_protocol: Option<super::tls::ProxyProtocolMode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSection {
    pub user: Option<String>,
    pub password_env: Option<String>,
    pub password_file: Option<String>,
    pub database: Option<String>,
    pub role: Option<PostgresRole>,
    pub max_replication_lag: Option<ConfigDuration>,
    pub sslmode: Option<SslMode>,
    pub on_multiple_primaries: Option<OnMultiplePrimaries>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MongoSection {
    pub role: Option<MongoRole>,
    pub replica_set: Option<String>,
    pub tls: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UdpSection {
    pub send_hex: String,
    pub expect_hex_prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSection {
    pub name: String,
    pub qtype: Option<String>,
}

/// A password: compared and cloned like a string, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A validated active health check.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheckConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// A backend starts up instead of waiting for `rise` passes.
    pub initial_up: bool,
    pub kind: CheckKind,
    /// PROXY protocol LOCAL header sent as a check connection's first bytes (tcp, postgres,
    /// mongodb), for backends that require one.
    pub proxy_protocol: Option<crate::proxy_protocol::Version>,
    /// `proxy_protocol` was written (`none` included): the choice is deliberate.
    pub proxy_protocol_explicit: bool,
}

impl HealthCheckConfig {
    /// The bytes a check connection sends first: a PROXY LOCAL header (v1 has no LOCAL, so
    /// `PROXY UNKNOWN\r\n`), or nothing.
    pub fn proxy_header(&self) -> Option<Vec<u8>> {
        self.proxy_protocol
            .map(|v| crate::proxy_protocol::encode(v, &crate::proxy_protocol::Header::Local))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum CheckKind {
    Tcp,
    Postgres(PostgresCheck),
    Mongodb(MongoCheck),
    Udp(UdpCheck),
    Dns(DnsCheck),
}

impl CheckKind {
    /// The config spelling (also the `check` metric label).
    pub fn name(&self) -> &'static str {
        match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Postgres(_) => "postgres",
            CheckKind::Mongodb(_) => "mongodb",
            CheckKind::Udp(_) => "udp",
            CheckKind::Dns(_) => "dns",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PostgresCheck {
    pub user: String,
    pub password: Option<Secret>,
    pub database: String,
    pub role: PostgresRole,
    pub max_replication_lag: Option<Duration>,
    pub sslmode: SslMode,
    pub on_multiple_primaries: OnMultiplePrimaries,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MongoCheck {
    pub role: MongoRole,
    pub replica_set: Option<String>,
    /// Speak TLS (for `net.tls.mode: requireTLS` members); the certificate is not verified.
    pub tls: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpCheck {
    pub send: Vec<u8>,
    pub expect_prefix: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsCheck {
    /// The query name, without a trailing dot.
    pub name: String,
    pub qtype: u16,
}

/// DNS query types a `dns` check may ask for.
pub const DNS_QTYPES: [(&str, u16); 9] = [
    ("A", 1),
    ("NS", 2),
    ("CNAME", 5),
    ("SOA", 6),
    ("PTR", 12),
    ("MX", 15),
    ("TXT", 16),
    ("AAAA", 28),
    ("SRV", 33),
];

/// Validates `health_check` (`path` is its key path); None for `type: none`.
pub(super) fn validate(
    s: HealthCheckSection,
    path: &str,
    ctx: &Ctx<'_>,
) -> Result<Option<HealthCheckConfig>, ConfigError> {
    let name = |kind: CheckType| match kind {
        CheckType::None => "none",
        CheckType::Tcp => "tcp",
        CheckType::Postgres => "postgres",
        CheckType::Mongodb => "mongodb",
        CheckType::Udp => "udp",
        CheckType::Dns => "dns",
    };
    let this = name(s.kind);
    if s.role.is_some() {
        let hint = match s.kind {
            CheckType::Postgres => "write it under postgres: (role: primary | replica | any)",
            CheckType::Mongodb => "write it under mongodb: (role: primary | secondary | any)",
            _ => "roles exist only for type: postgres and type: mongodb",
        };
        return Err(ctx.error(
            &format!("{path}.role"),
            format!("role is not a setting of a {this} check; {hint}"),
        ));
    }
    // Settings for another check type are a mistake, not something to ignore.
    for (key, present, kind) in [
        ("postgres", s.postgres.is_some(), CheckType::Postgres),
        ("mongodb", s.mongodb.is_some(), CheckType::Mongodb),
        ("udp", s.udp.is_some(), CheckType::Udp),
        ("dns", s.dns.is_some(), CheckType::Dns),
    ] {
        if present && s.kind != kind {
            return Err(ctx.error(
                &format!("{path}.{key}"),
                format!("{key} settings apply only to type: {key}, and this check is type: {this}"),
            ));
        }
    }
    let interval = s.interval.map_or(DEFAULT_CHECK_INTERVAL, |d| d.0);
    let timeout = s
        .timeout
        .map_or(DEFAULT_CHECK_TIMEOUT.min(interval), |d| d.0);
    if interval.is_zero() {
        return Err(ctx.error(
            &format!("{path}.interval"),
            "0 is not usable, expected a positive duration such as 1s",
        ));
    }
    if timeout.is_zero() || timeout > interval {
        return Err(ctx.error(
            &format!("{path}.timeout"),
            format!(
                "{} is out of range, expected a positive duration no longer than interval ({})",
                humantime::format_duration(timeout),
                humantime::format_duration(interval)
            ),
        ));
    }
    let count = |value: Option<u32>, key: &str, default: u32| match value {
        None => Ok(default),
        Some(n) if n == 0 || n > MAX_RISE_FALL => Err(ctx.error(
            &format!("{path}.{key}"),
            format!("{n} is out of range, expected 1 to {MAX_RISE_FALL}"),
        )),
        Some(n) => Ok(n),
    };
    let rise = count(s.rise, "rise", DEFAULT_RISE)?;
    let fall = count(s.fall, "fall", DEFAULT_FALL)?;
    let missing = |key: &str, what: &str| {
        ctx.error(
            path,
            format!("a {this} check needs {key}: settings ({what})"),
        )
    };
    let proxy_protocol = s.proxy_protocol.and_then(|m| m.version());
    if proxy_protocol.is_some() && matches!(s.kind, CheckType::Udp | CheckType::Dns) {
        return Err(ctx.error(
            &format!("{path}.proxy_protocol"),
            format!("a {this} check sends datagrams, and a PROXY header is sent only on TCP connections (tcp, postgres, mongodb checks); remove it"),
        ));
    }
    let kind = match s.kind {
        CheckType::None => {
            for (key, present) in [
                ("interval", s.interval.is_some()),
                ("timeout", s.timeout.is_some()),
                ("rise", s.rise.is_some()),
                ("fall", s.fall.is_some()),
                ("initial_state", s.initial_state.is_some()),
                ("proxy_protocol", s.proxy_protocol.is_some()),
            ] {
                if present {
                    return Err(ctx.error(
                        &format!("{path}.{key}"),
                        format!(
                            "{key} has no effect with type: none; remove it or choose a check type"
                        ),
                    ));
                }
            }
            return Ok(None);
        }
        CheckType::Tcp => CheckKind::Tcp,
        CheckType::Postgres => {
            let pg = s
                .postgres
                .ok_or_else(|| missing("postgres", "at least user"))?;
            CheckKind::Postgres(validate_postgres(pg, &format!("{path}.postgres"), ctx)?)
        }
        CheckType::Mongodb => {
            let m = s.mongodb.unwrap_or(MongoSection {
                role: None,
                replica_set: None,
                tls: None,
            });
            if let Some(rs) = &m.replica_set {
                if rs.trim().is_empty() {
                    return Err(ctx.error(
                        &format!("{path}.mongodb.replica_set"),
                        "empty replica set name, expected the set's name or no replica_set key",
                    ));
                }
            }
            CheckKind::Mongodb(MongoCheck {
                role: m.role.unwrap_or(MongoRole::Any),
                replica_set: m.replica_set,
                tls: m.tls.unwrap_or(false),
            })
        }
        CheckType::Udp => {
            let u = s
                .udp
                .ok_or_else(|| missing("udp", "send_hex and expect_hex_prefix"))?;
            let send = parse_hex(&u.send_hex, &format!("{path}.udp.send_hex"), ctx)?;
            if send.is_empty() || send.len() > MAX_UDP_PAYLOAD {
                return Err(ctx.error(
                    &format!("{path}.udp.send_hex"),
                    format!("{} bytes, expected 1 to {MAX_UDP_PAYLOAD}", send.len()),
                ));
            }
            let expect_prefix = match &u.expect_hex_prefix {
                Some(h) => parse_hex(h, &format!("{path}.udp.expect_hex_prefix"), ctx)?,
                None => Vec::new(),
            };
            CheckKind::Udp(UdpCheck {
                send,
                expect_prefix,
            })
        }
        CheckType::Dns => {
            let d = s.dns.ok_or_else(|| missing("dns", "at least name"))?;
            CheckKind::Dns(validate_dns(d, &format!("{path}.dns"), ctx)?)
        }
    };
    Ok(Some(HealthCheckConfig {
        interval,
        timeout,
        rise,
        fall,
        initial_up: s.initial_state == Some(InitialState::Up),
        kind,
        proxy_protocol,
        proxy_protocol_explicit: s.proxy_protocol.is_some(),
    }))
}

/// Pools whose backends get PROXY headers from a listener (`proxy_protocol: v1 | v2`; its
/// pool, TLS routes and default pool, and those pools' fallback pools) while their tcp, postgres
/// or mongodb check sends none and does not say `proxy_protocol: none` either. Such a
/// backend usually requires the header: a postgres or mongodb check then fails, and a tcp
/// check passes while the backend logs a broken header at every check. Not an error (some
/// backends accept connections with and without a header); reported by `check` and logged
/// at start and reload.
pub fn proxy_protocol_notes(config: &super::Config) -> Vec<String> {
    let mut notes = Vec::new();
    for (i, pool) in config.pools.iter().enumerate() {
        let Some(check) = &pool.health_check else {
            continue;
        };
        if check.proxy_protocol_explicit
            || !matches!(
                check.kind,
                CheckKind::Tcp | CheckKind::Postgres(_) | CheckKind::Mongodb(_)
            )
        {
            continue;
        }
        let sender = config.listeners.iter().find_map(|l| {
            let version = l.proxy_protocol.version()?;
            let mut direct = std::iter::once(l.pool.as_str()).chain(super::tls::route_pools(l));
            direct
                .any(|start| reaches(config, start, &pool.name))
                .then_some((l.name.as_str(), version))
        });
        if let Some((listener, version)) = sender {
            let v = match version {
                crate::proxy_protocol::Version::V1 => "v1",
                crate::proxy_protocol::Version::V2 => "v2",
            };
            notes.push(format!(
                "pools[{i}].health_check: listener \"{listener}\" sends PROXY {v} headers to pool \"{}\", and its {} check sends none; set proxy_protocol: {v} if the backends require the header, or proxy_protocol: none if they accept connections without it",
                pool.name,
                check.kind.name()
            ));
        }
    }
    notes
}

/// Whether connections for pool `start` can end up in pool `target`: `start` itself, or
/// its `fallback_pool`. One hop, as on the data path, which does not follow a fallback
/// pool's own `fallback_pool` (so chains, even loops, are harmless and not validated).
fn reaches(config: &super::Config, start: &str, target: &str) -> bool {
    start == target || config.pool(start).and_then(|p| p.fallback_pool.as_deref()) == Some(target)
}

fn validate_postgres(
    s: PostgresSection,
    path: &str,
    ctx: &Ctx<'_>,
) -> Result<PostgresCheck, ConfigError> {
    let user = match s.user {
        Some(u) if !u.trim().is_empty() => u,
        _ => {
            return Err(ctx.error(
                path,
                "missing user, expected the monitoring role to log in as (user: monitor)",
            ))
        }
    };
    let password = match (s.password_env, s.password_file) {
        (Some(_), Some(_)) => {
            return Err(ctx.error(
                &format!("{path}.password_file"),
                "give password_env or password_file, not both",
            ))
        }
        (Some(var), None) => match std::env::var(&var) {
            Ok(p) => Some(Secret::new(p)),
            Err(_) => {
                return Err(ctx.error(
                    &format!("{path}.password_env"),
                    format!("environment variable {var} is not set (or not UTF-8), expected it to hold the password"),
                ))
            }
        },
        (None, Some(file)) => match std::fs::read_to_string(&file) {
            Ok(text) => Some(Secret::new(text.trim_end_matches(['\n', '\r']).to_string())),
            Err(e) => {
                return Err(ctx.error(
                    &format!("{path}.password_file"),
                    format!("cannot read {file}: {e}"),
                ))
            }
        },
        (None, None) => None,
    };
    let role = s.role.unwrap_or(PostgresRole::Any);
    if s.max_replication_lag.is_some() && role == PostgresRole::Primary {
        return Err(ctx.error(
            &format!("{path}.max_replication_lag"),
            "max_replication_lag applies to replicas, and this pool wants role: primary",
        ));
    }
    if s.on_multiple_primaries.is_some() && role != PostgresRole::Primary {
        return Err(ctx.error(
            &format!("{path}.on_multiple_primaries"),
            "on_multiple_primaries applies only to role: primary",
        ));
    }
    Ok(PostgresCheck {
        user,
        password,
        database: s.database.unwrap_or_else(|| "postgres".to_string()),
        role,
        max_replication_lag: s.max_replication_lag.map(|d| d.0),
        sslmode: s.sslmode.unwrap_or(SslMode::Prefer),
        on_multiple_primaries: s.on_multiple_primaries.unwrap_or_default(),
    })
}

fn validate_dns(s: DnsSection, path: &str, ctx: &Ctx<'_>) -> Result<DnsCheck, ConfigError> {
    let name = s.name.trim().trim_end_matches('.').to_string();
    let labels_ok = !name.is_empty()
        && name.len() <= 253
        && name
            .split('.')
            .all(|l| !l.is_empty() && l.len() <= 63 && l.is_ascii());
    if !labels_ok {
        return Err(ctx.error(
            &format!("{path}.name"),
            format!("invalid DNS name \"{}\", expected ASCII labels of 1 to 63 characters such as example.com", s.name),
        ));
    }
    let qtype = match &s.qtype {
        None => 1,
        Some(t) => DNS_QTYPES
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(t.trim()))
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                let names: Vec<&str> = DNS_QTYPES.iter().map(|(n, _)| *n).collect();
                ctx.error(
                    &format!("{path}.qtype"),
                    format!(
                        "unknown value \"{t}\", expected one of {}",
                        names.join(", ")
                    ),
                )
            })?,
    };
    Ok(DnsCheck { name, qtype })
}

fn parse_hex(text: &str, path: &str, ctx: &Ctx<'_>) -> Result<Vec<u8>, ConfigError> {
    let digits: Vec<u8> = text
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b':')
        .collect();
    let bad = || {
        ctx.error(
            path,
            format!("invalid hex \"{text}\", expected pairs of hex digits such as \"0001ff\""),
        )
    };
    if digits.len() % 2 != 0 {
        return Err(bad());
    }
    digits
        .chunks(2)
        .map(|pair| {
            let hi = (pair[0] as char).to_digit(16);
            let lo = (pair[1] as char).to_digit(16);
            match (hi, lo) {
                (Some(h), Some(l)) => Ok((h * 16 + l) as u8),
                _ => Err(bad()),
            }
        })
        .collect()
}

#[cfg(test)]
#[path = "health_tests.rs"]
mod tests;
