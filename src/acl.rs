//! Source address rules: CIDR blocks ([`Cidr`]) and a listener's allow/deny list ([`Acl`]).
//! The most specific block that contains the address decides; when an allow and a deny block
//! are equally specific, deny wins. An address no block contains is allowed only when the
//! allow list is empty. IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) match IPv4 blocks.
//! Pure: built once per config, checked per connection without allocating.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An address block such as `10.0.0.0/8` or `2001:db8::/32` (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a CIDR block is not valid, worded for config errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrError(pub String);

impl fmt::Display for CidrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CidrError {}

impl Cidr {
    /// The block's prefix length in bits.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` lies in this block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask32(u32::from(ip), self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask128(u128::from(ip), self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Cidr, CidrError> {
        let text = text.trim();
        let (addr_text, prefix_text) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr_text.parse().map_err(|_| {
            CidrError(format!(
                "invalid CIDR \"{text}\", expected an address block such as 10.0.0.0/8 or 2001:db8::/32"
            ))
        })?;
        let addr = canonical(addr);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix_text {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && !p.starts_with('+') => n,
                _ => {
                    return Err(CidrError(format!(
                        "invalid prefix length in \"{text}\", expected 0 to {max}"
                    )))
                }
            },
        };
        let network = match addr {
            IpAddr::V4(ip) => IpAddr::V4(mask32(u32::from(ip), prefix).into()),
            IpAddr::V6(ip) => IpAddr::V6(mask128(u128::from(ip), prefix).into()),
        };
        if network != addr {
            return Err(CidrError(format!(
                "\"{text}\" has host bits set, expected the network address {network}/{prefix}"
            )));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it carries; others unchanged.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn mask32(bits: u32, prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        bits & (u32::MAX << (32 - u32::from(prefix)))
    }
}

fn mask128(bits: u128, prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        bits & (u128::MAX << (128 - u32::from(prefix)))
    }
}

/// Whether a listener admits a source address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
}

/// A listener's source ACL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
}

impl Acl {
    /// Whether the ACL has any rule at all (an empty one allows everything).
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// The verdict for `ip`: the longest matching block decides, deny on a tie; no match
    /// allows only when there is no allow list.
    pub fn check(&self, ip: IpAddr) -> Verdict {
        let longest = |blocks: &[Cidr]| {
            blocks
                .iter()
                .filter(|c| c.contains(ip))
                .map(|c| i16::from(c.prefix))
                .max()
                .unwrap_or(-1)
        };
        let (allow, deny) = (longest(&self.allow), longest(&self.deny));
        if deny >= 0 && deny >= allow {
            Verdict::Deny
        } else if allow >= 0 || self.allow.is_empty() {
            Verdict::Allow
        } else {
            Verdict::Deny
        }
    }
}

/// A list of trusted peers (for `accept_proxy_protocol.from`).
pub fn any_contains(blocks: &[Cidr], ip: IpAddr) -> bool {
    blocks.iter().any(|c| c.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn parses_and_matches_blocks() {
        assert!(cidr("10.0.0.0/8").contains(ip("10.255.1.2")));
        assert!(!cidr("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(cidr("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(!cidr("0.0.0.0/0").contains(ip("::1")));
        assert!(cidr("192.0.2.7").contains(ip("192.0.2.7")));
        assert_eq!(cidr("192.0.2.7").prefix(), 32);
        assert!(cidr("2001:db8::/32").contains(ip("2001:db8:1::5")));
        assert!(!cidr("2001:db8::/32").contains(ip("2001:db9::5")));
        assert!(cidr("::/0").contains(ip("::1")));
        assert_eq!(cidr("::1").prefix(), 128);
        // IPv4-mapped IPv6 matches IPv4 blocks, both as block and as address.
        assert!(cidr("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
        assert!(cidr("::ffff:10.0.0.0/8").contains(ip("10.1.2.3")));
        assert_eq!(cidr(" 10.0.0.0/8 ").to_string(), "10.0.0.0/8");
    }

    #[test]
    fn rejects_bad_blocks() {
        for (text, wanted) in [
            ("10.0.0.0/33", "prefix length"),
            ("10.0.0.0/-1", "prefix length"),
            ("10.0.0.0/+8", "prefix length"),
            ("10.0.0.0/", "prefix length"),
            (
                "10.0.0.1/8",
                "host bits set, expected the network address 10.0.0.0/8",
            ),
            ("10.0.0/8", "invalid CIDR"),
            ("example.com/8", "invalid CIDR"),
            ("", "invalid CIDR"),
            ("2001:db8::1/32", "2001:db8::/32"),
            ("::/129", "0 to 128"),
        ] {
            let err = text.parse::<Cidr>().expect_err(text).to_string();
            assert!(err.contains(wanted), "{text}: {err}");
        }
    }

    #[test]
    fn most_specific_wins_deny_on_tie() {
        let acl = Acl {
            allow: vec![cidr("0.0.0.0/0"), cidr("192.0.2.128/25")],
            deny: vec![cidr("192.0.2.0/24"), cidr("198.51.100.7")],
        };
        assert_eq!(acl.check(ip("8.8.8.8")), Verdict::Allow);
        assert_eq!(acl.check(ip("192.0.2.1")), Verdict::Deny);
        assert_eq!(
            acl.check(ip("192.0.2.200")),
            Verdict::Allow,
            "/25 allow beats /24 deny"
        );
        assert_eq!(acl.check(ip("198.51.100.7")), Verdict::Deny);
        assert_eq!(acl.check(ip("::1")), Verdict::Deny, "no IPv6 allow block");
        let tie = Acl {
            allow: vec![cidr("10.0.0.0/8")],
            deny: vec![cidr("10.0.0.0/8")],
        };
        assert_eq!(tie.check(ip("10.1.1.1")), Verdict::Deny);
    }

    #[test]
    fn empty_lists() {
        assert_eq!(Acl::default().check(ip("1.2.3.4")), Verdict::Allow);
        assert!(Acl::default().is_empty());
        let deny_only = Acl {
            allow: vec![],
            deny: vec![cidr("127.0.0.2")],
        };
        assert_eq!(deny_only.check(ip("127.0.0.1")), Verdict::Allow);
        assert_eq!(deny_only.check(ip("127.0.0.2")), Verdict::Deny);
        let allow_only = Acl {
            allow: vec![cidr("127.0.0.0/30")],
            deny: vec![],
        };
        assert_eq!(allow_only.check(ip("127.0.0.3")), Verdict::Allow);
        assert_eq!(allow_only.check(ip("127.0.0.4")), Verdict::Deny);
        assert!(any_contains(&allow_only.allow, ip("127.0.0.1")));
        assert!(!any_contains(&[], ip("127.0.0.1")));
    }
}
