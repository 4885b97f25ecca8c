//! The operations sections of the config: `admin` (the HTTP server for metrics, status and
//! the admin API, its token, the upgrade socket) and `access_log`. Validation here enforces
//! the safety rule that an admin server reachable from other hosts needs a token.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::file::{AccessLogSection, AdminSection};
use super::{parse_addr, ConfigError, Ctx};

pub const DEFAULT_ADMIN_BIND: &str = "127.0.0.1:9901";
/// Shortest admin token accepted (a guessable token is worse than none: it looks safe).
pub const MIN_TOKEN_LEN: usize = 16;

/// A validated `admin` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub bind: SocketAddr,
    /// The environment variable the token came from (for messages).
    pub token_env: Option<String>,
    /// When set, mutating calls need `Authorization: Bearer <token>`.
    pub token: Option<AdminToken>,
    /// Where a new process asks this one for its listening sockets (binary upgrade).
    pub upgrade_socket: Option<PathBuf>,
}

/// The admin API secret. Its `Debug` never shows it; comparison takes the same time
/// whatever the content.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    pub fn new(token: impl Into<String>) -> AdminToken {
        AdminToken(token.into())
    }

    /// Whether `presented` is the token, in time independent of where they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        if expected.len() != presented.len() {
            return false;
        }
        let diff = expected
            .iter()
            .zip(presented)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(***)")
    }
}

/// Access log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogFormat {
    Json,
    Text,
}

/// Where access log records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Stdout,
    File(PathBuf),
}

/// A validated `access_log` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogConfig {
    pub target: AccessLogTarget,
    pub format: AccessLogFormat,
}

pub(super) fn validate_admin(
    section: Option<AdminSection>,
    ctx: &Ctx<'_>,
) -> Result<Option<AdminConfig>, ConfigError> {
    let Some(s) = section else {
        return Ok(None);
    };
    let bind = match &s.bind {
        Some(text) => parse_addr(text, "admin.bind", ctx)?,
        None => parse_addr(DEFAULT_ADMIN_BIND, "admin.bind", ctx)?,
    };
    let token = match &s.token_env {
        None => None,
        Some(var) => {
            let var = var.trim();
            if var.is_empty() {
                return Err(ctx.error(
                    "admin.token_env",
                    "empty, expected the name of an environment variable",
                ));
            }
            match std::env::var(var) {
                Ok(value) if value.trim().len() >= MIN_TOKEN_LEN => {
                    Some(AdminToken::new(value.trim()))
                }
                Ok(_) => {
                    return Err(ctx.error(
                        "admin.token_env",
                        format!(
                            "the token in ${var} is too short, expected at least {MIN_TOKEN_LEN} characters"
                        ),
                    ))
                }
                Err(_) => {
                    return Err(ctx.error(
                        "admin.token_env",
                        format!("environment variable ${var} is not set, expected it to hold the admin token"),
                    ))
                }
            }
        }
    };
    if token.is_none() && !bind.ip().is_loopback() {
        return Err(ctx.error(
            "admin.bind",
            format!(
                "{bind} is reachable from other hosts but no token is set; bind to a loopback address or set token_env"
            ),
        ));
    }
    let upgrade_socket = match s.upgrade_socket.as_deref().map(str::trim) {
        None => None,
        Some("") => {
            return Err(ctx.error(
                "admin.upgrade_socket",
                "empty, expected a path for a unix socket",
            ))
        }
        Some(path) => Some(PathBuf::from(path)),
    };
    Ok(Some(AdminConfig {
        bind,
        token_env: s.token_env.map(|v| v.trim().to_string()),
        token,
        upgrade_socket,
    }))
}

pub(super) fn validate_access_log(
    section: Option<AccessLogSection>,
    ctx: &Ctx<'_>,
) -> Result<Option<AccessLogConfig>, ConfigError> {
    let Some(s) = section else {
        return Ok(None);
    };
    let target = match s.path.trim() {
        "" => {
            return Err(ctx.error(
                "access_log.path",
                "empty, expected a file path or \"-\" for stdout",
            ))
        }
        "-" => AccessLogTarget::Stdout,
        path => AccessLogTarget::File(PathBuf::from(path)),
    };
    Ok(Some(AccessLogConfig {
        target,
        format: s.format.unwrap_or(AccessLogFormat::Json),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const BASE: &str = "listeners:\n  - { name: l, bind: 127.0.0.1:7000, pool: p }\npools:\n  - name: p\n    backends: [{ address: 127.0.0.1:8000 }]\n";

    fn parse(extra: &str) -> Result<Config, String> {
        Config::from_yaml(&format!("{extra}{BASE}"), "config.yaml").map_err(|e| e.to_string())
    }

    fn err(extra: &str) -> String {
        match parse(extra) {
            Ok(_) => panic!("expected an error for:\n{extra}"),
            Err(e) => e,
        }
    }

    #[test]
    fn admin_defaults_to_loopback_and_is_off_when_absent() {
        let c = parse("").expect("valid");
        assert!(c.admin.is_none());
        assert!(c.access_log.is_none());
        let c = parse("admin: {}\n").expect("valid");
        let a = c.admin.expect("admin");
        assert_eq!(a.bind, DEFAULT_ADMIN_BIND.parse().expect("addr"));
        assert!(a.token.is_none());
        let c = parse("admin:\n  bind: \"[::1]:9901\"\n").expect("ipv6 loopback");
        assert!(c.admin.expect("admin").bind.ip().is_loopback());
    }

    #[test]
    fn non_loopback_admin_without_token_is_refused() {
        assert_eq!(
            err("admin:\n  bind: 0.0.0.0:9901\n"),
            "config.yaml:2:9: admin.bind: 0.0.0.0:9901 is reachable from other hosts but no token is set; bind to a loopback address or set token_env"
        );
    }

    #[test]
    fn token_env_must_name_a_set_variable_with_a_long_token() {
        assert_eq!(
            err("admin:\n  token_env: SWITCHYARD_TEST_UNSET_VARIABLE\n"),
            "config.yaml:2:14: admin.token_env: environment variable $SWITCHYARD_TEST_UNSET_VARIABLE is not set, expected it to hold the admin token"
        );
        std::env::set_var("SWITCHYARD_TEST_SHORT_TOKEN", "short");
        assert_eq!(
            err("admin:\n  token_env: SWITCHYARD_TEST_SHORT_TOKEN\n"),
            "config.yaml:2:14: admin.token_env: the token in $SWITCHYARD_TEST_SHORT_TOKEN is too short, expected at least 16 characters"
        );
        assert_eq!(
            err("admin:\n  token_env: \"\"\n"),
            "config.yaml:2:14: admin.token_env: empty, expected the name of an environment variable"
        );
        std::env::set_var("SWITCHYARD_TEST_GOOD_TOKEN", "0123456789abcdef0123");
        let c = parse("admin:\n  bind: 0.0.0.0:9901\n  token_env: SWITCHYARD_TEST_GOOD_TOKEN\n")
            .expect("a public bind with a token is fine");
        let a = c.admin.expect("admin");
        assert!(a.token.expect("token").matches(b"0123456789abcdef0123"));
        assert!(!format!(
            "{:?}",
            parse("admin:\n  token_env: SWITCHYARD_TEST_GOOD_TOKEN\n")
        )
        .contains("0123456789abcdef0123"));
    }

    #[test]
    fn admin_bad_values() {
        assert_eq!(
            err("admin:\n  bind: localhost:9901\n"),
            "config.yaml:2:9: admin.bind: invalid address \"localhost:9901\", expected IP:port such as 127.0.0.1:5432 or [::1]:5432"
        );
        let e = err("admin:\n  bnd: 127.0.0.1:1\n");
        assert!(
            e.starts_with("config.yaml:2:3: admin.bnd: unknown key \"bnd\""),
            "{e}"
        );
        assert_eq!(
            err("admin:\n  upgrade_socket: \" \"\n"),
            "config.yaml:2:19: admin.upgrade_socket: empty, expected a path for a unix socket"
        );
    }

    #[test]
    fn access_log_sections() {
        let c = parse("access_log:\n  path: \"-\"\n").expect("stdout");
        let a = c.access_log.expect("access log");
        assert_eq!(a.target, AccessLogTarget::Stdout);
        assert_eq!(a.format, AccessLogFormat::Json);
        let c = parse("access_log: { path: /var/log/a.log, format: text }\n").expect("file");
        let a = c.access_log.expect("access log");
        assert_eq!(a.target, AccessLogTarget::File("/var/log/a.log".into()));
        assert_eq!(a.format, AccessLogFormat::Text);
        assert_eq!(
            err("access_log:\n  path: \"\"\n"),
            "config.yaml:2:9: access_log.path: empty, expected a file path or \"-\" for stdout"
        );
        assert_eq!(
            err("access_log:\n  path: a.log\n  format: xml\n"),
            "config.yaml:3:11: access_log.format: unknown value \"xml\", expected json or text"
        );
        let e = err("access_log:\n  format: json\n");
        assert!(e.starts_with("config.yaml:2:"), "{e}");
        assert!(e.ends_with("access_log: missing field path"), "{e}");
    }

    #[test]
    fn token_debug_is_masked_and_comparison_exact() {
        let t = AdminToken::new("s3cret-s3cret-s3cret");
        assert_eq!(format!("{t:?}"), "AdminToken(***)");
        assert!(t.matches(b"s3cret-s3cret-s3cret"));
        assert!(!t.matches(b"s3cret-s3cret-s3creT"));
        assert!(!t.matches(b"s3cret"));
        assert!(!t.matches(b""));
    }
}
