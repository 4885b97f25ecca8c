//! Invariants of the pure parsers, checked on arbitrary input by the `cargo fuzz` targets
//! (`fuzz/`) and by the seeded mutation test in `cargo test` (`tests/fuzz_corpus.rs`). Each
//! function panics when an invariant breaks; that panic is the finding. Not used at runtime.

use std::net::SocketAddr;

use crate::acl::canonical;
use crate::proxy_protocol::{self, Decoded};
use crate::tls::postgres::{self, Opening};
use crate::tls::sni::{self, Parsed};

/// Prefix lengths worth checking for an input of `len` bytes.
fn prefixes(len: usize) -> [usize; 4] {
    [0, len / 3, len / 2, len.saturating_sub(1)]
}

/// ClientHello parser: never panics; a decision on a prefix is the decision on the whole;
/// a found server name is already normalized; the Postgres opening classifier agrees with
/// itself on prefixes, and after an SSLRequest the rest parses the same way.
pub fn client_hello(data: &[u8]) {
    let full = sni::parse(data);
    for k in prefixes(data.len()) {
        let part = sni::parse(&data[..k]);
        assert!(
            part == Ok(Parsed::Incomplete) || part == full,
            "prefix {k} of {} bytes: {part:?} but whole: {full:?}",
            data.len()
        );
    }
    if let Ok(Parsed::Complete(hello)) = &full {
        if let Some(name) = &hello.sni {
            assert_eq!(sni::normalize_host(name).as_deref(), Some(name.as_str()));
        }
        assert!(hello.alpn.iter().all(|p| !p.is_empty() && p.len() <= 255));
    }
    let opening = postgres::classify(data);
    for k in prefixes(data.len()) {
        let part = postgres::classify(&data[..k]);
        assert!(
            part == Opening::Incomplete || part == opening,
            "classify prefix {k}"
        );
    }
    if opening == Opening::SslRequest {
        let _ = sni::parse(&data[postgres::SSL_REQUEST.len()..]);
    }
}

/// PROXY header decoder: never panics; prefix-stable; a decoded header is no longer than
/// the input and within the version's bound; encoding what was decoded decodes back.
pub fn proxy_header(data: &[u8]) {
    let full = proxy_protocol::decode(data);
    for k in prefixes(data.len()) {
        let part = proxy_protocol::decode(&data[..k]);
        assert!(
            part == Ok(Decoded::Incomplete) || part == full,
            "prefix {k}: {part:?} but whole: {full:?}"
        );
    }
    if let Ok(Decoded::Complete {
        header,
        version,
        len,
    }) = full
    {
        assert!(len <= data.len());
        let bound = match version {
            proxy_protocol::Version::V1 => proxy_protocol::MAX_V1_LEN,
            proxy_protocol::Version::V2 => proxy_protocol::MAX_V2_LEN,
        };
        assert!(len <= bound);
        let again = proxy_protocol::encode(version, &header);
        let decoded = proxy_protocol::decode(&again);
        let expected_header = match (version, header) {
            // v1 cannot say LOCAL; it says UNKNOWN.
            (proxy_protocol::Version::V1, proxy_protocol::Header::Local) => {
                proxy_protocol::Header::Unknown
            }
            // IPv4-mapped addresses on both sides go out as TCP4.
            (
                _,
                proxy_protocol::Header::Tcp {
                    source,
                    destination,
                },
            ) if is_v4(source) && is_v4(destination) => proxy_protocol::Header::Tcp {
                source: v4(source),
                destination: v4(destination),
            },
            (_, h) => h,
        };
        assert_eq!(
            decoded,
            Ok(Decoded::Complete {
                header: expected_header,
                version,
                len: again.len()
            }),
            "re-encoding {header:?}"
        );
    }
}

/// Whether `a` is IPv4, or IPv6 mapping an IPv4 address.
fn is_v4(a: SocketAddr) -> bool {
    canonical(a.ip()).is_ipv4()
}

/// `a` with an IPv4-mapped address as IPv4.
fn v4(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical(a.ip()), a.port())
}
