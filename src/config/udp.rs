//! The listener's transport (`protocol: tcp | udp`) and the `udp:` section of a UDP listener:
//! flow idle timeout, expected responses per datagram, whether flows that got them hand
//! their upstream socket on, the flow cap and the syscall batch.
//! (`reuse_port` / `accept_tasks` apply to both: one socket and flow table per task.)
//! Keys that only make sense for the other protocol are rejected with a pointer to the right
//! one, so a config never carries settings that silently do nothing.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::file::ListenerSection;
use super::{ConfigError, Ctx};

pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_FLOWS: usize = 10_000;
/// Most flows one listener may track (each holds one upstream socket, so one file descriptor).
pub const MAX_MAX_FLOWS: usize = 1_000_000;
pub const DEFAULT_UDP_BATCH: usize = 32;
/// Largest batch for recvmmsg/sendmmsg (each slot is a 64 KiB buffer).
pub const MAX_UDP_BATCH: usize = 64;

/// A listener's transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// Validated flow settings of a UDP listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpConfig {
    /// A flow with no datagram either way for this long is forgotten.
    pub idle_timeout: Duration,
    /// Replies expected per client datagram; once every datagram has had them the flow ends
    /// (DNS: 1). None: flows end only when idle.
    pub responses: Option<u32>,
    /// Flows tracked at once (shared out among the listener's sockets with `reuse_port`);
    /// datagrams that would start another are dropped and counted.
    pub max_flows: usize,
    /// Datagrams moved per recvmmsg/sendmmsg call; 1 uses plain recvfrom/sendto.
    pub batch: usize,
    /// A flow that got its `responses` leaves its upstream socket, after a rest, to a later
    /// flow to the same backend (`udp::upstream` says what that guarantees); false: every
    /// flow closes its socket at its end.
    pub reuse_upstream_sockets: bool,
}

impl Default for UdpConfig {
    fn default() -> Self {
        UdpConfig {
            idle_timeout: DEFAULT_UDP_IDLE_TIMEOUT,
            responses: None,
            max_flows: DEFAULT_MAX_FLOWS,
            batch: DEFAULT_UDP_BATCH,
            reuse_upstream_sockets: true,
        }
    }
}

/// Checks the protocol-specific keys of listener `path`.
pub(super) fn validate(
    s: &ListenerSection,
    path: &str,
    ctx: &Ctx<'_>,
) -> Result<(Protocol, UdpConfig), ConfigError> {
    let protocol = s.protocol.unwrap_or_default();
    if protocol == Protocol::Tcp {
        if s.udp.is_some() {
            return Err(ctx.error(
                &format!("{path}.udp"),
                "a udp section applies only to a listener with protocol: udp",
            ));
        }
        return Ok((protocol, UdpConfig::default()));
    }
    let tcp_only = [
        (
            "max_connections",
            s.max_connections.is_some(),
            "use udp.max_flows",
        ),
        (
            "idle_timeout",
            s.idle_timeout.is_some(),
            "use udp.idle_timeout",
        ),
    ];
    if let Some((key, _, hint)) = tcp_only.iter().find(|(_, set, _)| *set) {
        return Err(ctx.error(
            &format!("{path}.{key}"),
            format!("{key} applies only to tcp listeners; {hint}"),
        ));
    }
    let Some(u) = &s.udp else {
        return Ok((protocol, UdpConfig::default()));
    };
    let idle_timeout = u.idle_timeout.map_or(DEFAULT_UDP_IDLE_TIMEOUT, |d| d.0);
    if idle_timeout < Duration::from_millis(1) {
        return Err(ctx.error(
            &format!("{path}.udp.idle_timeout"),
            "a flow needs some time to get its reply, expected at least 1ms",
        ));
    }
    if u.responses == Some(0) {
        return Err(ctx.error(
            &format!("{path}.udp.responses"),
            "0 would forget a flow before any reply, expected at least 1 (or leave it out to keep flows until idle)",
        ));
    }
    let max_flows = u.max_flows.unwrap_or(DEFAULT_MAX_FLOWS);
    if max_flows == 0 || max_flows > MAX_MAX_FLOWS {
        return Err(ctx.error(
            &format!("{path}.udp.max_flows"),
            format!("{max_flows} is out of range, expected 1 to {MAX_MAX_FLOWS}"),
        ));
    }
    let batch = u.batch.unwrap_or(DEFAULT_UDP_BATCH);
    if batch == 0 || batch > MAX_UDP_BATCH {
        return Err(ctx.error(
            &format!("{path}.udp.batch"),
            format!("{batch} is out of range, expected 1 to {MAX_UDP_BATCH}"),
        ));
    }
    if u.reuse_upstream_sockets.is_some() && u.responses.is_none() {
        return Err(ctx.error(
            &format!("{path}.udp.reuse_upstream_sockets"),
            "applies only with udp.responses: without it flows end only when idle, and close their socket",
        ));
    }
    Ok((
        protocol,
        UdpConfig {
            idle_timeout,
            responses: u.responses,
            max_flows,
            batch,
            reuse_upstream_sockets: u.reuse_upstream_sockets.unwrap_or(true),
        },
    ))
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, Protocol};
    use std::time::Duration;

    const UDP: &str = "\
listeners:
  - name: dns
    bind: 127.0.0.1:5353
    protocol: udp
    pool: dns
    udp:
      idle_timeout: 5s
      responses: 1
      max_flows: 100
  - name: dns-tcp
    bind: 127.0.0.1:5353
    pool: dns
pools:
  - name: dns
    balance: maglev
    hash_key: client_ip_port
    backends: [{address: 127.0.0.1:5301}, {address: 127.0.0.1:5302}]
";

    fn err(text: &str) -> String {
        match Config::from_yaml(text, "config.yaml") {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn udp_listener_parses_and_shares_address_with_tcp() {
        let c = Config::from_yaml(UDP, "config.yaml").expect("valid");
        let l = &c.listeners[0];
        assert_eq!(l.protocol, Protocol::Udp);
        assert_eq!(l.udp.idle_timeout, Duration::from_secs(5));
        assert_eq!(l.udp.responses, Some(1));
        assert_eq!(l.udp.max_flows, 100);
        assert_eq!(l.udp.batch, super::DEFAULT_UDP_BATCH);
        assert!(l.udp.reuse_upstream_sockets, "on by default");
        assert_eq!(c.listeners[1].protocol, Protocol::Tcp);
    }

    #[test]
    fn reuse_upstream_sockets_can_be_turned_off_with_responses_only() {
        let off = UDP.replace(
            "responses: 1",
            "responses: 1\n      reuse_upstream_sockets: false",
        );
        let c = Config::from_yaml(&off, "config.yaml").expect("valid");
        assert!(!c.listeners[0].udp.reuse_upstream_sockets);
        for value in ["true", "false"] {
            let e = err(&UDP.replace("responses: 1", &format!("reuse_upstream_sockets: {value}")));
            assert_eq!(
                e,
                "config.yaml:8:31: listeners[0].udp.reuse_upstream_sockets: applies only with udp.responses: without it flows end only when idle, and close their socket",
                "{value}"
            );
        }
        let e = err(&UDP.replace(
            "responses: 1",
            "responses: 1\n      reuse_upstream_sockets: 0",
        ));
        assert!(
            e.starts_with("config.yaml:9:31: listeners[0].udp.reuse_upstream_sockets:"),
            "not a bool: {e}"
        );
    }

    #[test]
    fn udp_defaults_without_section() {
        let text = UDP.replace(
            "    udp:\n      idle_timeout: 5s\n      responses: 1\n      max_flows: 100\n",
            "",
        );
        let c = Config::from_yaml(&text, "config.yaml").expect("valid");
        assert_eq!(c.listeners[0].udp, super::UdpConfig::default());
    }

    #[test]
    fn two_udp_listeners_on_one_address_conflict() {
        let text = UDP.replace(
            "    bind: 127.0.0.1:5353\n    pool: dns\npools",
            "    bind: 127.0.0.1:5353\n    protocol: udp\n    pool: dns\npools",
        );
        assert_eq!(
            err(&text),
            "config.yaml:11:11: listeners[1].bind: 127.0.0.1:5353 is already used by listener \"dns\" (127.0.0.1:5353)"
        );
    }

    #[test]
    fn udp_section_on_tcp_listener() {
        let text = UDP.replace("    protocol: udp\n", "");
        let e = err(&text);
        assert!(
            e.starts_with("config.yaml:6:")
                && e.ends_with(": listeners[0].udp: a udp section applies only to a listener with protocol: udp"),
            "{e}"
        );
    }

    #[test]
    fn out_of_range_udp_values() {
        assert_eq!(
            err(&UDP.replace("max_flows: 100", "max_flows: 0")),
            "config.yaml:9:18: listeners[0].udp.max_flows: 0 is out of range, expected 1 to 1000000"
        );
        let e = err(&UDP.replace("responses: 1", "responses: 0"));
        assert!(
            e.starts_with("config.yaml:8:18: listeners[0].udp.responses: 0 would forget a flow"),
            "{e}"
        );
        let e = err(&UDP.replace("idle_timeout: 5s", "idle_timeout: 0s"));
        assert!(
            e.starts_with("config.yaml:7:21: listeners[0].udp.idle_timeout: a flow needs"),
            "{e}"
        );
        let e = err(&UDP.replace("max_flows: 100", "max_flows: 100\n      batch: 65"));
        assert_eq!(
            e,
            "config.yaml:10:14: listeners[0].udp.batch: 65 is out of range, expected 1 to 64"
        );
    }

    #[test]
    fn tcp_keys_on_udp_listener() {
        let e = err(&UDP.replace(
            "    protocol: udp\n",
            "    protocol: udp\n    max_connections: 5\n",
        ));
        assert_eq!(
            e,
            "config.yaml:5:22: listeners[0].max_connections: max_connections applies only to tcp listeners; use udp.max_flows"
        );
        let e = err(&UDP.replace(
            "    protocol: udp\n",
            "    protocol: udp\n    idle_timeout: 5s\n",
        ));
        assert!(
            e.contains("listeners[0].idle_timeout: idle_timeout applies only to tcp listeners; use udp.idle_timeout"),
            "{e}"
        );
        let text = UDP.replace(
            "    protocol: udp\n",
            "    protocol: udp\n    reuse_port: true\n    accept_tasks: 2\n",
        );
        let c = Config::from_yaml(&text, "config.yaml").expect("reuse_port is fine on udp");
        assert_eq!(c.listeners[0].accept_tasks, 2);
    }

    #[test]
    fn unknown_protocol_and_udp_key() {
        let e = err(&UDP.replace("protocol: udp", "protocol: sctp"));
        assert_eq!(
            e,
            "config.yaml:4:15: listeners[0].protocol: unknown value \"sctp\", expected tcp or udp"
        );
        let e = err(&UDP.replace("responses: 1", "replies: 1"));
        assert!(
            e.starts_with("config.yaml:8:7: listeners[0].udp.replies: unknown key \"replies\""),
            "{e}"
        );
    }
}
