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
                "  {:<16} {:<24} -> pool {} (udp, idle_timeout {}, responses {}, max_flows {}{})",
                l.name,
                l.bind.to_string(),
                l.pool,
                humantime::format_duration(u.idle_timeout),
                u.responses.map_or("-".to_string(), |n| n.to_string()),
                u.max_flows,
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
            "  {:<16} {:<24} -> pool {} (max_connections {}, idle_timeout {}{})",
            l.name,
            l.bind.to_string(),
            l.pool,
            l.max_connections,
            humantime::format_duration(l.idle_timeout),
            if l.reuse_port {
                format!(", reuse_port x{}", l.accept_tasks)
            } else {
                String::new()
            }
        );
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
        for b in &p.backends {
            let name = if b.name == b.address.to_string() {
                String::new()
            } else {
                format!(" ({})", b.name)
            };
            let _ = writeln!(out, "    {}{} weight {}", b.address, name, b.weight);
        }
    }
    for unused in config::unused_pools(config) {
        let _ = writeln!(out, "note: pool \"{unused}\" is not used by any listener");
    }
    out
}
