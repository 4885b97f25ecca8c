//! Config errors: every message names the file, the line and column, the key path, and
//! what was expected, e.g.
//! `config.yaml:14:7: pools[0].balance: unknown value "leastconn", expected one of ...`.

use std::fmt;

/// Where in the config a problem is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigLocation {
    pub file: String,
    /// 1-based line and column; None when the text could not be located (e.g. I/O errors).
    pub position: Option<(usize, usize)>,
    /// Key path such as `pools[0].backends[1].address`; empty for the whole document.
    pub path: String,
}

/// A config that cannot be used, with where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub location: ConfigLocation,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let loc = &self.location;
        write!(f, "{}", loc.file)?;
        if let Some((line, column)) = loc.position {
            write!(f, ":{line}:{column}")?;
        }
        if !loc.path.is_empty() {
            write!(f, ": {}", loc.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Rewrites serde's wording into the config's own: "unknown value" for enum variants and
/// "unknown key" for fields, with the choices listed without backticks; strips the
/// " at line N column M" suffix that serde_yaml appends (the location is printed in front).
pub(crate) fn humanize_serde_message(raw: &str) -> String {
    let raw = match raw.rfind(" at line ") {
        Some(i) if raw[i..].contains(" column ") => &raw[..i],
        _ => raw,
    };
    // serde_yaml prefixes its own idea of the path ("pools[0].balance: "); ours is printed
    // in front already.
    let raw = match raw.split_once(": ") {
        Some((path, rest))
            if !path.is_empty()
                && path
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.[]".contains(c)) =>
        {
            rest
        }
        _ => raw,
    };
    let plain = |s: &str| s.replace('`', "");
    for (serde_word, ours) in [
        ("unknown variant `", "unknown value"),
        ("unknown field `", "unknown key"),
    ] {
        if let Some(rest) = raw.strip_prefix(serde_word) {
            if let Some((value, tail)) = rest.split_once('`') {
                return format!("{ours} \"{value}\"{}", plain(tail));
            }
        }
    }
    plain(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_has_file_line_column_path() {
        let e = ConfigError {
            location: ConfigLocation {
                file: "config.yaml".into(),
                position: Some((14, 7)),
                path: "pools[0].balance".into(),
            },
            message: "unknown value".into(),
        };
        assert_eq!(
            e.to_string(),
            "config.yaml:14:7: pools[0].balance: unknown value"
        );
    }

    #[test]
    fn humanizes_serde() {
        assert_eq!(
            humanize_serde_message(
                "unknown variant `leastconn`, expected one of `round_robin`, `least_conn` at line 3 column 5"
            ),
            "unknown value \"leastconn\", expected one of round_robin, least_conn"
        );
        assert_eq!(
            humanize_serde_message("listeners[0]: unknown field `bnd`, expected `name` or `bind`"),
            "unknown key \"bnd\", expected name or bind"
        );
    }
}
