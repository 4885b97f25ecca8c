//! Unit tests of the ClientHello parser: TLS 1.2 and 1.3 hellos, SNI and ALPN, hellos
//! split across records and segments, and each malformed or oversized input.

use super::*;

fn complete(input: &[u8]) -> ClientHello {
    match parse(input) {
        Ok(Parsed::Complete(h)) => h,
        other => panic!("expected a complete hello, got {other:?}"),
    }
}

#[test]
fn finds_sni_and_alpn() {
    let hello = build_client_hello(Some("DB.Example.COM."), &[b"h2", b"postgresql"], 0);
    let h = complete(&hello);
    assert_eq!(h.sni.as_deref(), Some("db.example.com"));
    assert_eq!(h.alpn, vec![b"h2".to_vec(), b"postgresql".to_vec()]);
    assert!(h.offers_alpn(b"postgresql"));
    assert!(!h.offers_alpn(b"http/1.1"));
    assert_eq!(h.alpn_list(), "h2,postgresql");
    assert_eq!(h.version, 0x0303);
}

#[test]
fn no_sni_no_extensions() {
    let h = complete(&build_client_hello(None, &[], 0));
    assert_eq!(h.sni, None);
    assert!(h.alpn.is_empty());
    // A TLS 1.2 hello may end right after the compression methods.
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0; 32]);
    body.extend_from_slice(&[0, 0, 2, 0, 0x2f, 1, 0]);
    let mut rec = vec![
        22,
        3,
        1,
        0,
        (body.len() + 4) as u8,
        1,
        0,
        0,
        body.len() as u8,
    ];
    rec.extend_from_slice(&body);
    assert_eq!(complete(&rec).sni, None);
}

#[test]
fn every_prefix_is_incomplete() {
    let hello = build_client_hello(Some("api.example.com"), &[b"h2"], 300);
    for k in 0..hello.len() {
        assert_eq!(parse(&hello[..k]), Ok(Parsed::Incomplete), "prefix {k}");
    }
    // Bytes after the hello (early data) do not change the answer.
    let mut more = hello.clone();
    more.extend_from_slice(&[23, 3, 3, 0, 1, 0]);
    assert_eq!(complete(&more).sni.as_deref(), Some("api.example.com"));
}

#[test]
fn hello_across_many_records() {
    let hello = build_client_hello(Some("db.example.com"), &[], 0);
    for size in [1, 2, 7, 64] {
        let split = resplit_records(&hello, size);
        assert!(split.len() > hello.len());
        assert_eq!(
            complete(&split).sni.as_deref(),
            Some("db.example.com"),
            "{size}"
        );
    }
}

#[test]
fn large_hello_up_to_the_bound() {
    // 16 KiB exactly (handshake header included) is accepted.
    let base = build_client_hello(Some("a.example.com"), &[], 1);
    let pad = MAX_HELLO_LEN - (base.len() - 5) + 1;
    let big = build_client_hello(Some("a.example.com"), &[], pad);
    assert_eq!(big.len() - 5, MAX_HELLO_LEN, "one full record");
    assert_eq!(complete(&big).sni.as_deref(), Some("a.example.com"));
    // One byte more is refused once the first record shows the handshake length.
    let too_big = build_client_hello(Some("a.example.com"), &[], pad + 1);
    assert_eq!(
        parse(&too_big[..5 + MAX_RECORD_LEN]),
        Err(HelloError::TooLarge)
    );
    assert_eq!(
        parse(&too_big[..5 + MAX_RECORD_LEN - 1]),
        Ok(Parsed::Incomplete)
    );
}

#[test]
fn input_bound() {
    // A hello in 1-byte records needs 6 bytes per byte: past MAX_INPUT it is refused.
    let hello = build_client_hello(Some("x.example.com"), &[], 4000);
    let split = resplit_records(&hello, 1);
    assert!(split.len() > MAX_INPUT);
    assert_eq!(parse(&split), Err(HelloError::TooLarge));
    assert_eq!(parse(&split[..MAX_INPUT - 1]), Ok(Parsed::Incomplete));
}

#[test]
fn rejects_non_tls_and_broken_records() {
    assert_eq!(
        parse(b"GET / HTTP/1.1\r\n"),
        Err(HelloError::NotHandshake(b'G'))
    );
    assert_eq!(parse(&[23]), Err(HelloError::NotHandshake(23)));
    assert_eq!(parse(&[22, 2, 0]), Err(HelloError::RecordVersion(0x0200)));
    assert!(HelloError::NotHandshake(0).is_not_tls());
    assert!(!HelloError::TooLarge.is_not_tls());
    assert_eq!(parse(&[22, 3, 1, 0, 0]), Err(HelloError::RecordLength(0)));
    assert_eq!(
        parse(&[22, 3, 1, 0x40, 1]),
        Err(HelloError::RecordLength(16385))
    );
    // ServerHello (type 2) is not what a client sends first.
    assert_eq!(
        parse(&[22, 3, 3, 0, 4, 2, 0, 0, 0]),
        Err(HelloError::NotClientHello(2))
    );
    // A record of another type in the middle of a hello.
    let hello = build_client_hello(Some("db.example.com"), &[], 0);
    let mut split = resplit_records(&hello, 10);
    split[15] = 21;
    assert_eq!(parse(&split), Err(HelloError::NotHandshake(21)));
}

#[test]
fn rejects_malformed_bodies() {
    let hello = build_client_hello(Some("db.example.com"), &[b"h2"], 0);
    // Every single-byte corruption either still parses or is a typed error: never a panic,
    // and a prefix never disagrees with the whole.
    for i in 0..hello.len() {
        for v in [0u8, 1, 0x7f, 0xff] {
            let mut m = hello.clone();
            m[i] = v;
            let full = parse(&m);
            for k in [i, i + 1, m.len() / 2] {
                let part = parse(&m[..k.min(m.len())]);
                assert!(
                    part == Ok(Parsed::Incomplete) || part == full,
                    "byte {i}={v} prefix {k}"
                );
            }
        }
    }
    // A bad host name.
    let bad = build_client_hello(Some("bad name"), &[], 0);
    assert_eq!(
        parse(&bad),
        Err(HelloError::Malformed("server name is not a host name"))
    );
    // Duplicate extension.
    let mut dup = build_client_hello(None, &[b"h2"], 0);
    let ext = dup[dup.len() - 9..].to_vec();
    dup.extend_from_slice(&ext);
    let total = dup.len();
    // Fix the lengths: record, handshake, extensions block.
    let rec = total - 5;
    dup[3..5].copy_from_slice(&(rec as u16).to_be_bytes());
    dup[6..9].copy_from_slice(&(rec as u32 - 4).to_be_bytes()[1..]);
    let ext_at = 5 + 4 + 2 + 32 + 1 + 4 + 2;
    let ext_len = total - ext_at - 2;
    dup[ext_at..ext_at + 2].copy_from_slice(&(ext_len as u16).to_be_bytes());
    assert_eq!(
        parse(&dup),
        Err(HelloError::Malformed("duplicate extension"))
    );
}

#[test]
fn host_names() {
    assert_eq!(normalize_host("Example.COM."), Some("example.com".into()));
    assert_eq!(normalize_host("a-b_c.d1"), Some("a-b_c.d1".into()));
    for bad in [
        "",
        ".",
        "a..b",
        ".a",
        "a b",
        "a:b",
        "*.a",
        &"a".repeat(64),
        &"a.".repeat(130),
    ] {
        assert_eq!(normalize_host(bad), None, "{bad}");
    }
}
