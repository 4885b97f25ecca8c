//! Listener settings for what happens before a backend is chosen: TLS passthrough by SNI
//! (`tls_passthrough`, Postgres included), the PROXY protocol in and out
//! (`accept_proxy_protocol`, `proxy_protocol`) and the source ACL (`allow`, `deny`). The file
//! sections as written and their validation live here, next to each other; `config::validate`
//! calls in. The runtime side is `route`.

use std::collections::HashSet;
use std::time::Duration;

use serde::Deserialize;

use super::file::{ConfigDuration, ListenerSection};
use super::{ConfigError, Ctx, HashKey, ListenerConfig, PoolConfig};
use crate::acl::{Acl, Cidr};
use crate::proxy_protocol;
use crate::tls::sni::normalize_host;

pub const DEFAULT_CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// `tls_passthrough:` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPassthroughSection {
    pub client_hello_timeout: Option<ConfigDuration>,
    #[serde(default)]
    pub routes: Vec<SniRouteSection>,
    pub default_pool: Option<String>,
    pub postgres: Option<bool>,
    pub require_tls: Option<bool>,
}

/// One entry of `tls_passthrough.routes` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniRouteSection {
    pub sni: Vec<String>,
    #[serde(default)]
    pub alpn: Vec<String>,
    pub pool: String,
}

/// `accept_proxy_protocol:` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptProxySection {
    pub from: Vec<String>,
    pub timeout: Option<ConfigDuration>,
}

/// `proxy_protocol:` the header sent to backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocolMode {
    #[default]
    None,
    V1,
    V2,
}

impl ProxyProtocolMode {
    pub fn version(self) -> Option<proxy_protocol::Version> {
        match self {
            ProxyProtocolMode::None => None,
            ProxyProtocolMode::V1 => Some(proxy_protocol::Version::V1),
            ProxyProtocolMode::V2 => Some(proxy_protocol::Version::V2),
        }
    }
}

/// A validated `tls_passthrough`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPassthrough {
    /// Time a client has, from accept, to send its whole ClientHello (SSLRequest included).
    pub client_hello_timeout: Duration,
    pub routes: Vec<SniRoute>,
    /// Where connections without SNI, or whose SNI matches no route, go; None: closed.
    pub default_pool: Option<String>,
    /// Postgres TLS: answer SSLRequest, accept direct TLS, send SSLRequest to the backend.
    pub postgres: bool,
    /// With `postgres`: refuse plaintext clients with an ErrorResponse.
    pub require_tls: bool,
}

/// A validated route: SNI patterns (and optionally ALPN protocols) to a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniRoute {
    pub sni: Vec<SniPattern>,
    /// When not empty, the client must offer one of these by ALPN.
    pub alpn: Vec<Vec<u8>>,
    pub pool: String,
}

/// A server name to match: exact, or `*.` and a suffix (one whole leading label).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SniPattern {
    Exact(String),
    /// The part after `*.`: `*.example.com` holds `example.com`.
    Wildcard(String),
}

/// A validated `accept_proxy_protocol`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptProxy {
    /// Peers that must send a PROXY header (and are trusted to).
    pub from: Vec<Cidr>,
    /// Time a trusted peer has to send the whole header.
    pub timeout: Duration,
}

/// The parts of a listener validated here.
pub(super) struct ListenerExtras {
    pub pool: String,
    pub tls_passthrough: Option<TlsPassthrough>,
    pub proxy_protocol: ProxyProtocolMode,
    pub accept_proxy_protocol: Option<AcceptProxy>,
    pub acl: Acl,
}

/// Validates the listener keys owned by this module and chooses the listener's main pool:
/// `pool`, or for TLS passthrough the default pool (else the first route's).
pub(super) fn validate_listener(
    s: &mut ListenerSection,
    path: &str,
    ctx: &Ctx<'_>,
) -> Result<ListenerExtras, ConfigError> {
    let tls_passthrough = match s.tls_passthrough.take() {
        Some(t) => Some(validate_tls(t, &format!("{path}.tls_passthrough"), ctx)?),
        None => None,
    };
    let pool = match (&tls_passthrough, s.pool.take()) {
        (Some(_), Some(_)) => {
            return Err(ctx.error(
                &format!("{path}.pool"),
                "a tls_passthrough listener chooses pools by SNI; name the fallback in tls_passthrough.default_pool instead",
            ))
        }
        (None, None) => {
            return Err(ctx.error(
                path,
                "missing key \"pool\", expected the pool this listener forwards to",
            ))
        }
        (None, Some(pool)) => pool,
        (Some(t), None) => t
            .default_pool
            .clone()
            .or_else(|| t.routes.first().map(|r| r.pool.clone()))
            .unwrap_or_default(),
    };
    let accept_proxy_protocol = match s.accept_proxy_protocol.take() {
        None => None,
        Some(a) => {
            let apath = format!("{path}.accept_proxy_protocol");
            if a.from.is_empty() {
                return Err(ctx.error(
                    &format!("{apath}.from"),
                    "no trusted peers, expected CIDR blocks of the balancers that send PROXY headers, such as [10.0.0.0/8]",
                ));
            }
            let timeout = positive(
                a.timeout,
                DEFAULT_PROXY_HEADER_TIMEOUT,
                &format!("{apath}.timeout"),
                ctx,
            )?;
            Some(AcceptProxy {
                from: cidrs(&a.from, &format!("{apath}.from"), ctx)?,
                timeout,
            })
        }
    };
    let acl = Acl {
        allow: cidrs(&s.allow, &format!("{path}.allow"), ctx)?,
        deny: cidrs(&s.deny, &format!("{path}.deny"), ctx)?,
    };
    Ok(ListenerExtras {
        pool,
        tls_passthrough,
        proxy_protocol: s.proxy_protocol.unwrap_or_default(),
        accept_proxy_protocol,
        acl,
    })
}

fn validate_tls(
    t: TlsPassthroughSection,
    path: &str,
    ctx: &Ctx<'_>,
) -> Result<TlsPassthrough, ConfigError> {
    let postgres = t.postgres.unwrap_or(false);
    let require_tls = t.require_tls.unwrap_or(false);
    if require_tls && !postgres {
        return Err(ctx.error(
            &format!("{path}.require_tls"),
            "require_tls applies to postgres: true (a plain TLS listener closes non-TLS clients anyway)",
        ));
    }
    if t.routes.is_empty() && t.default_pool.is_none() {
        return Err(ctx.error(
            path,
            "no routes and no default_pool, so every connection would be closed; expected routes or default_pool",
        ));
    }
    let client_hello_timeout = positive(
        t.client_hello_timeout,
        DEFAULT_CLIENT_HELLO_TIMEOUT,
        &format!("{path}.client_hello_timeout"),
        ctx,
    )?;
    let mut routes = Vec::with_capacity(t.routes.len());
    let mut seen: HashSet<(SniPattern, Vec<Vec<u8>>)> = HashSet::new();
    for (i, r) in t.routes.into_iter().enumerate() {
        let rpath = format!("{path}.routes[{i}]");
        if r.sni.is_empty() {
            return Err(ctx.error(
                &format!("{rpath}.sni"),
                "no server names, expected a list such as [db.example.com, \"*.example.com\"]",
            ));
        }
        let mut alpn: Vec<Vec<u8>> = Vec::with_capacity(r.alpn.len());
        for (j, a) in r.alpn.iter().enumerate() {
            if a.is_empty() || a.len() > 255 {
                return Err(ctx.error(
                    &format!("{rpath}.alpn[{j}]"),
                    format!("invalid ALPN protocol \"{a}\", expected 1 to 255 bytes such as h2 or postgresql"),
                ));
            }
            alpn.push(a.as_bytes().to_vec());
        }
        alpn.sort();
        alpn.dedup();
        let mut sni = Vec::with_capacity(r.sni.len());
        for (j, name) in r.sni.iter().enumerate() {
            let npath = format!("{rpath}.sni[{j}]");
            let pattern = sni_pattern(name).map_err(|m| ctx.error(&npath, m))?;
            if !seen.insert((pattern.clone(), alpn.clone())) {
                return Err(ctx.error(
                    &npath,
                    format!("\"{name}\" is already routed by an earlier entry{}; each name goes to one pool", if alpn.is_empty() { String::new() } else { " with the same alpn".to_string() }),
                ));
            }
            sni.push(pattern);
        }
        routes.push(SniRoute {
            sni,
            alpn,
            pool: r.pool,
        });
    }
    Ok(TlsPassthrough {
        client_hello_timeout,
        routes,
        default_pool: t.default_pool,
        postgres,
        require_tls,
    })
}

/// Parses a route's server name: a host name, or `*.` followed by one (the wildcard is one
/// whole leading label). Case and a trailing dot do not matter.
pub fn sni_pattern(text: &str) -> Result<SniPattern, String> {
    let trimmed = text.trim();
    let (wildcard, host) = match trimmed.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, trimmed),
    };
    if host.contains('*') || (!wildcard && trimmed.contains('*')) {
        return Err(format!(
            "invalid wildcard \"{text}\", expected \"*.\" as one whole leading label, such as \"*.example.com\""
        ));
    }
    let name = normalize_host(host).ok_or_else(|| {
        format!("invalid server name \"{text}\", expected a DNS name such as db.example.com or \"*.example.com\"")
    })?;
    Ok(if wildcard {
        SniPattern::Wildcard(name)
    } else {
        SniPattern::Exact(name)
    })
}

fn cidrs(list: &[String], path: &str, ctx: &Ctx<'_>) -> Result<Vec<Cidr>, ConfigError> {
    list.iter()
        .enumerate()
        .map(|(i, text)| {
            text.parse::<Cidr>()
                .map_err(|e| ctx.error(&format!("{path}[{i}]"), e.to_string()))
        })
        .collect()
}

fn positive(
    value: Option<ConfigDuration>,
    default: Duration,
    path: &str,
    ctx: &Ctx<'_>,
) -> Result<Duration, ConfigError> {
    let d = value.map_or(default, |d| d.0);
    if d.is_zero() {
        return Err(ctx.error(
            path,
            "0 would close every connection, expected a positive duration such as 5s",
        ));
    }
    Ok(d)
}

/// Checks the pool names a TLS listener refers to, with errors at the key that names them.
pub(super) fn check_route_pools(
    listener: &ListenerConfig,
    pool_names: &HashSet<String>,
    path: &str,
    ctx: &Ctx<'_>,
) -> Result<(), ConfigError> {
    let Some(t) = &listener.tls_passthrough else {
        return Ok(());
    };
    let unknown = |key: String, name: &str| {
        let mut known: Vec<&str> = pool_names.iter().map(String::as_str).collect();
        known.sort_unstable();
        ctx.error(
            &key,
            format!(
                "no pool named \"{name}\", expected one of: {}",
                if known.is_empty() {
                    "(no pools defined)".to_string()
                } else {
                    known.join(", ")
                }
            ),
        )
    };
    if let Some(name) = &t.default_pool {
        if !pool_names.contains(name) {
            return Err(unknown(
                format!("{path}.tls_passthrough.default_pool"),
                name,
            ));
        }
    }
    for (i, r) in t.routes.iter().enumerate() {
        if !pool_names.contains(&r.pool) {
            return Err(unknown(
                format!("{path}.tls_passthrough.routes[{i}].pool"),
                &r.pool,
            ));
        }
    }
    Ok(())
}

/// `hash_key: sni` needs a server name: its pool may only be reached through TLS routes.
pub(super) fn check_sni_hash_pools(
    listeners: &[ListenerConfig],
    pools: &[PoolConfig],
    ctx: &Ctx<'_>,
) -> Result<(), ConfigError> {
    for (i, pool) in pools.iter().enumerate() {
        if pool.hash_key != HashKey::Sni {
            continue;
        }
        if let Some(l) = listeners
            .iter()
            .find(|l| l.tls_passthrough.is_none() && l.pool == pool.name)
        {
            return Err(ctx.error(
                &format!("pools[{i}].hash_key"),
                format!(
                    "hash_key: sni needs a server name, but listener \"{}\" forwards to this pool without tls_passthrough; expected client_ip or client_ip_port",
                    l.name
                ),
            ));
        }
    }
    Ok(())
}

/// Pools that TLS routes refer to (for the unused-pool report).
pub(super) fn route_pools(listener: &ListenerConfig) -> impl Iterator<Item = &str> {
    listener.tls_passthrough.iter().flat_map(|t| {
        t.routes
            .iter()
            .map(|r| r.pool.as_str())
            .chain(t.default_pool.as_deref())
    })
}

#[cfg(test)]
mod tests;
