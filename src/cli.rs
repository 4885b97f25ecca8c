//! Command-line interface: `run` (default), `check` and `forward`, plus logging flags.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use switchyard::balance::Algorithm;
use switchyard::config::{self, Config};
use switchyard::log::LogFormat;

#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about = "L4 (TCP and UDP) load balancer")]
pub struct Cli {
    /// Config file (YAML).
    #[arg(short, long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log level or filter (error, warn, info, debug, trace; or a tracing filter).
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    /// Binary upgrade: take the listening sockets over from the process serving this
    /// upgrade socket (its `admin.upgrade_socket`); it drains once this one accepts.
    #[arg(long, global = true, value_name = "SOCKET")]
    pub takeover: Option<PathBuf>,
    /// Like --takeover when a process serves this upgrade socket; when none does (no such
    /// file, or nothing listens on it), start on freshly bound sockets. For service units
    /// whose instances take turns.
    #[arg(
        long,
        global = true,
        value_name = "SOCKET",
        conflicts_with = "takeover"
    )]
    pub takeover_if_running: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the balancer (the default when no command is given).
    Run,
    /// Validate the config and print a summary; exit 1 with the error if it is invalid.
    Check,
    /// Forward one listening address to one or more backends, without a config file.
    Forward {
        /// Address to listen on, e.g. 127.0.0.1:7000.
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// Backend addresses, comma-separated.
        #[arg(
            long,
            value_name = "ADDR[,ADDR...]",
            value_delimiter = ',',
            required = true
        )]
        to: Vec<String>,
        /// Balancing algorithm.
        #[arg(long, default_value = "round_robin", value_parser = Algorithm::NAMES)]
        balance: String,
    },
}

pub fn algorithm(name: &str) -> Algorithm {
    match name {
        "least_conn" => Algorithm::LeastConn,
        "maglev" => Algorithm::Maglev,
        "random_two" => Algorithm::RandomTwo,
        _ => Algorithm::RoundRobin,
    }
}

/// What `check` prints for a valid config.
pub fn summary(config: &Config) -> String {
    let mut out = String::new();
    let backends: usize = config.pools.iter().map(|p| p.backends.len()).sum();
    let _ = writeln!(
        out,
        "{}: configuration is valid ({} listeners, {} pools, {} backends)",
        config.source,
        config.listeners.len(),
        config.pools.len(),
        backends
    );
    let _ = writeln!(out, "listeners:");
    for l in &config.listeners {
        if l.protocol == config::Protocol::Udp {
            let u = &l.udp;
            let _ = writeln!(
                out,
                "  {:<16} {:<24} -> pool {} (udp, idle_timeout {}, responses {}, max_flows {}{}{})",
                l.name,
                l.bind.to_string(),
                l.pool,
                humantime::format_duration(u.idle_timeout),
                u.responses.map_or("-".to_string(), |n| n.to_string()),
                u.max_flows,
                if u.responses.is_some() {
                    format!(", reuse_upstream_sockets {}", u.reuse_upstream_sockets)
                } else {
                    String::new()
                },
                if l.reuse_port {
                    format!(", reuse_port x{}", l.accept_tasks)
                } else {
                    String::new()
                }
            );
            continue;
        }
        let _ = writeln!(
            out,
            "  {:<16} {:<24} -> {} (max_connections {}, idle_timeout {}{})",
            l.name,
            l.bind.to_string(),
            if l.tls_passthrough.is_some() {
                "pools by SNI".to_string()
            } else {
                format!("pool {}", l.pool)
            },
            l.max_connections,
            humantime::format_duration(l.idle_timeout),
            if l.reuse_port {
                format!(", reuse_port x{}", l.accept_tasks)
            } else {
                String::new()
            }
        );
        summarize_routing(&mut out, l);
    }
    let _ = writeln!(out, "pools:");
    for p in &config.pools {
        let _ = writeln!(
            out,
            "  {:<16} {} (connect_timeout {}, retries {}, max_fails {} for {})",
            p.name,
            p.balance.name(),
            humantime::format_duration(p.connect_timeout),
            p.retries,
            p.max_fails,
            humantime::format_duration(p.fail_duration)
        );
        if let Some(h) = &p.health_check {
            let _ = writeln!(
                out,
                "    health: {} every {} (timeout {}, rise {}, fall {}{}), on_backend_down {}",
                h.kind.name(),
                humantime::format_duration(h.interval),
                humantime::format_duration(h.timeout),
                h.rise,
                h.fall,
                match h.proxy_protocol {
                    Some(switchyard::proxy_protocol::Version::V1) => ", PROXY v1 UNKNOWN header",
                    Some(switchyard::proxy_protocol::Version::V2) => ", PROXY v2 LOCAL header",
                    None => "",
                },
                p.on_backend_down.name()
            );
        }
        if let Some(f) = &p.fallback_pool {
            let _ = writeln!(out, "    fallback_pool: {f}");
        }
        for b in &p.backends {
            let name = if b.name == b.address.to_string() {
                String::new()
            } else {
                format!(" ({})", b.name)
            };
            let _ = writeln!(out, "    {}{} weight {}", b.address, name, b.weight);
        }
    }
    if let Some(a) = &config.admin {
        let _ = writeln!(
            out,
            "admin: http://{} ({})",
            a.bind,
            match &a.token_env {
                Some(var) => format!("token from ${var}"),
                None => "no token".to_string(),
            }
        );
    }
    if let Some(a) = &config.access_log {
        let target = match &a.target {
            config::AccessLogTarget::Stdout => "stdout".to_string(),
            config::AccessLogTarget::File(p) => p.display().to_string(),
        };
        let _ = writeln!(out, "access log: {target} ({:?})", a.format);
    }
    for unused in config::unused_pools(config) {
        let _ = writeln!(out, "note: pool \"{unused}\" is not used by any listener");
    }
    for note in config::notes(config) {
        let _ = writeln!(out, "note: {note}");
    }
    out
}

/// The TLS routes, PROXY protocol and ACL of a listener, one line each.
fn summarize_routing(out: &mut String, l: &config::ListenerConfig) {
    if let Some(t) = &l.tls_passthrough {
        for r in &t.routes {
            let names: Vec<String> = r
                .sni
                .iter()
                .map(|p| match p {
                    config::SniPattern::Exact(n) => n.clone(),
                    config::SniPattern::Wildcard(n) => format!("*.{n}"),
                })
                .collect();
            let alpn = if r.alpn.is_empty() {
                String::new()
            } else {
                let list: Vec<String> = r
                    .alpn
                    .iter()
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                format!(" alpn {}", list.join(","))
            };
            let _ = writeln!(out, "    sni {}{alpn} -> pool {}", names.join(","), r.pool);
        }
        let _ = writeln!(
            out,
            "    tls passthrough: default pool {}, client_hello_timeout {}{}",
            t.default_pool.as_deref().unwrap_or("none (close)"),
            humantime::format_duration(t.client_hello_timeout),
            match (t.postgres, t.require_tls) {
                (true, true) => ", postgres, TLS required",
                (true, false) => ", postgres",
                _ => "",
            }
        );
    }
    if let Some(v) = l.proxy_protocol.version() {
        let v = if v == switchyard::proxy_protocol::Version::V1 {
            "v1"
        } else {
            "v2"
        };
        let _ = writeln!(out, "    proxy_protocol {v} to backends");
    }
    if let Some(a) = &l.accept_proxy_protocol {
        let from: Vec<String> = a.from.iter().map(|c| c.to_string()).collect();
        let _ = writeln!(out, "    accepts PROXY headers from {}", from.join(", "));
    }
    if !l.acl.is_empty() {
        let list = |v: &[switchyard::acl::Cidr]| {
            v.iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "    allow [{}] deny [{}]",
            list(&l.acl.allow),
            list(&l.acl.deny)
        );
    }
}
