//! Byte-exact against the examples of HAProxy's proxy-protocol.txt, plus round trips and
//! the incremental contract.

use std::net::SocketAddr;

use super::*;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

fn tcp(src: &str, dst: &str) -> Header {
    Header::Tcp {
        source: addr(src),
        destination: addr(dst),
    }
}

fn complete(input: &[u8]) -> (Header, Version, usize) {
    match decode(input) {
        Ok(Decoded::Complete {
            header,
            version,
            len,
        }) => (header, version, len),
        other => panic!("expected a header, got {other:?}"),
    }
}

#[test]
fn v1_spec_examples() {
    // "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n" (section 2.1 example).
    let line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
    let header = tcp("192.168.0.1:56324", "192.168.0.11:443");
    assert_eq!(encode(Version::V1, &header), line);
    assert_eq!(complete(line), (header, Version::V1, line.len()));
    // The worst cases the spec sizes its buffers by.
    let v4 = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n";
    assert_eq!(v4.len(), 56);
    let h = tcp("255.255.255.255:65535", "255.255.255.255:65535");
    assert_eq!(encode(Version::V1, &h), v4);
    assert_eq!(complete(v4).0, h);
    let v6 = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    assert_eq!(v6.len(), 104);
    let h6 = tcp(
        "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
        "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
    );
    assert_eq!(encode(Version::V1, &h6), v6);
    assert_eq!(complete(v6).0, h6);
    let unknown = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    assert_eq!(unknown.len(), MAX_V1_LEN);
    assert_eq!(complete(unknown), (Header::Unknown, Version::V1, 107));
    assert_eq!(complete(b"PROXY UNKNOWN\r\n").0, Header::Unknown);
    assert_eq!(encode(Version::V1, &Header::Local), b"PROXY UNKNOWN\r\n");
}

#[test]
fn v2_spec_layout() {
    // Signature (section 2.2), then 0x21 (v2, PROXY), 0x11 (TCP over IPv4), length 12.
    let bytes = encode(Version::V2, &tcp("172.19.0.1:42578", "172.19.0.3:80"));
    assert_eq!(
        bytes,
        [
            0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54,
            0x0A, // signature
            0x21, 0x11, 0x00, 0x0C, // PROXY, TCP4, 12 bytes
            172, 19, 0, 1, 172, 19, 0, 3, // addresses
            0xA6, 0x52, 0x00, 0x50, // ports 42578, 80
        ]
    );
    assert_eq!(complete(&bytes).2, 28);
    // TCP over IPv6: 0x21, length 36.
    let v6 = encode(Version::V2, &tcp("[2001:db8::1]:1234", "[2001:db8::2]:443"));
    assert_eq!(&v6[12..16], &[0x21, 0x21, 0x00, 0x24]);
    assert_eq!(v6.len(), 16 + 36);
    assert_eq!(
        complete(&v6).0,
        tcp("[2001:db8::1]:1234", "[2001:db8::2]:443")
    );
    // LOCAL: 0x20, UNSPEC, no address.
    let local = encode(Version::V2, &Header::Local);
    assert_eq!(&local[12..], &[0x20, 0x00, 0x00, 0x00]);
    assert_eq!(complete(&local), (Header::Local, Version::V2, 16));
    // PROXY over UNSPEC: addresses unknown.
    let unknown = encode(Version::V2, &Header::Unknown);
    assert_eq!(&unknown[12..], &[0x21, 0x00, 0x00, 0x00]);
    assert_eq!(complete(&unknown).0, Header::Unknown);
}

#[test]
fn v2_local_with_addresses_and_tlvs() {
    // A LOCAL header may still carry an address block and TLVs: all skipped.
    let mut b = V2_SIGNATURE.to_vec();
    b.extend_from_slice(&[0x20, 0x11, 0x00, 12 + 8]);
    b.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2, 0, 1, 0, 2]);
    b.extend_from_slice(&[0x01, 0x00, 0x02, b'h', b'2']); // ALPN TLV
    b.extend_from_slice(&[0x04, 0x00, 0x00]); // NOOP TLV, empty
    assert_eq!(b.len(), 16 + 20);
    b.extend_from_slice(b"payload");
    assert_eq!(complete(&b), (Header::Local, Version::V2, 36));
    // A TLV that overruns the header.
    let mut bad = b[..36].to_vec();
    bad[15] = 12 + 2;
    bad.truncate(30);
    assert_eq!(decode(&bad), Err(ProxyError::Malformed("truncated TLV")));
}

#[test]
fn mixed_families_are_sent_as_ipv6() {
    let h = tcp("10.1.2.3:5000", "[::1]:443");
    assert_eq!(
        encode(Version::V1, &h),
        b"PROXY TCP6 ::ffff:10.1.2.3 ::1 5000 443\r\n".to_vec()
    );
    let v2 = encode(Version::V2, &h);
    assert_eq!(v2[13], 0x21);
    assert_eq!(complete(&v2).0, tcp("[::ffff:10.1.2.3]:5000", "[::1]:443"));
}

#[test]
fn ipv4_mapped_addresses_are_sent_as_ipv4() {
    // A dual-stack [::] listener sees an IPv4 client and its own address as ::ffff:a.b.c.d.
    let h = tcp("[::ffff:10.1.2.3]:5000", "[::ffff:10.0.0.1]:443");
    assert_eq!(
        encode(Version::V1, &h),
        b"PROXY TCP4 10.1.2.3 10.0.0.1 5000 443\r\n".to_vec()
    );
    let v2 = encode(Version::V2, &h);
    assert_eq!(
        &v2[12..16],
        &[0x21, 0x11, 0x00, 0x0C],
        "PROXY, TCP4, 12 bytes"
    );
    assert_eq!(complete(&v2).0, tcp("10.1.2.3:5000", "10.0.0.1:443"));
    // One mapped, one plain IPv4: IPv4 too.
    assert_eq!(
        encode(Version::V1, &tcp("[::ffff:10.1.2.3]:5000", "10.0.0.1:443")),
        b"PROXY TCP4 10.1.2.3 10.0.0.1 5000 443\r\n".to_vec()
    );
    // A mapped client on a real IPv6 address stays IPv6.
    assert_eq!(
        encode(
            Version::V1,
            &tcp("[::ffff:10.1.2.3]:5000", "[2001:db8::1]:443")
        ),
        b"PROXY TCP6 ::ffff:10.1.2.3 2001:db8::1 5000 443\r\n".to_vec()
    );
}

#[test]
fn incremental_and_prefix_stable() {
    for bytes in [
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET /".to_vec(),
        encode(Version::V2, &tcp("[2001:db8::1]:1", "[2001:db8::2]:2")),
        encode(Version::V2, &Header::Local),
    ] {
        let (_, _, len) = complete(&bytes);
        for k in 0..len {
            assert_eq!(decode(&bytes[..k]), Ok(Decoded::Incomplete), "prefix {k}");
        }
    }
}

#[test]
fn rejects_bad_headers() {
    let cases: [(&[u8], ProxyError); 14] = [
        (b"GET / HTTP/1.1\r\n", ProxyError::NotProxy),
        (b"PROXX", ProxyError::NotProxy),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            ProxyError::Malformed("line does not end with CRLF"),
        ),
        (
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            ProxyError::Malformed("family is not TCP4, TCP6 or UNKNOWN"),
        ),
        (
            b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
            ProxyError::Malformed("TCP4 address"),
        ),
        (
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
            ProxyError::Malformed("TCP6 address"),
        ),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            ProxyError::Malformed("port"),
        ),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            ProxyError::Malformed("port"),
        ),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
            ProxyError::Malformed("port"),
        ),
        (
            b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
            ProxyError::Malformed("expected family, two addresses, two ports"),
        ),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            ProxyError::Malformed("expected family, two addresses, two ports"),
        ),
        (
            &[
                0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x11,
            ],
            ProxyError::UnsupportedVersion(1),
        ),
        (
            &[
                0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x22,
            ],
            ProxyError::Malformed("command"),
        ),
        (
            &[
                0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21, 0x41,
            ],
            ProxyError::Malformed("address family or transport"),
        ),
    ];
    for (bytes, err) in cases {
        assert_eq!(
            decode(bytes),
            Err(err),
            "{:?}",
            String::from_utf8_lossy(bytes)
        );
    }
    // v1 without CRLF within 107 bytes.
    let long = [b"PROXY UNKNOWN ".as_slice(), &[b'a'; 100]].concat();
    assert_eq!(decode(&long), Err(ProxyError::TooLarge));
    // v2 declaring more than the bound.
    let mut big = V2_SIGNATURE.to_vec();
    big.extend_from_slice(&[0x21, 0x11, 0xFF, 0xFF]);
    assert_eq!(decode(&big), Err(ProxyError::TooLarge));
    // v2 TCP4 with a short address block.
    let mut short = V2_SIGNATURE.to_vec();
    short.extend_from_slice(&[0x21, 0x11, 0x00, 0x04, 1, 2, 3, 4]);
    assert_eq!(
        decode(&short),
        Err(ProxyError::Malformed(
            "address block shorter than its family"
        ))
    );
}
