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
