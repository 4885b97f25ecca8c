//! A bounded, deterministic stand-in for the fuzzer inside `cargo test`: seeded random
//! mutations of the committed corpus (fuzz/corpus/*) fed to the same invariant checks the
//! cargo-fuzz targets run (`switchyard::fuzz_checks`): no panic, prefix-stable decisions,
//! re-encoding round trips. 200,000 inputs in all, the same ones on every run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use switchyard::fuzz_checks;

const ITERATIONS: usize = 100_000;

/// xorshift64*: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn corpus(name: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(name);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    let inputs: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(f).expect("read"))
        .collect();
    assert!(
        inputs.len() >= 5,
        "corpus {name} has {} files",
        inputs.len()
    );
    inputs
}

/// One to four random edits: bit flips, byte sets (with values that matter to length
/// fields), inserts, deletes, truncation, duplicated runs, splices from another input.
fn mutate(rng: &mut Rng, input: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let mut m = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = m.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                m[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                m[i] = [0, 1, 0x7f, 0x80, 0xff, 22, 3, b'\r', b'\n', b' '][rng.below(10)];
            }
            2 => {
                let i = rng.below(len + 1);
                m.insert(i, rng.next() as u8);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below(8.min(len - i));
                m.drain(i..i + n);
            }
            4 => m.truncate(rng.below(len + 1)),
            5 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below(32.min(len - i));
                let run = m[i..i + n].to_vec();
                let at = rng.below(len + 1);
                m.splice(at..at, run);
            }
            6 => {
                let other = &others[rng.below(others.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                m.truncate(cut);
                m.extend_from_slice(&other[from..]);
            }
            _ if len >= 2 => {
                // A 16-bit length field to an edge value.
                let i = rng.below(len - 1);
                let v: u16 = [0, 1, 0xff, 0x100, 0x3fff, 0x4000, 0xffff][rng.below(7)];
                m[i..i + 2].copy_from_slice(&v.to_be_bytes());
            }
            _ => {}
        }
    }
    m
}

/// What a parser made of an input: 0 complete, 1 incomplete, 2 error.
type Outcome = fn(&[u8]) -> usize;

fn run(name: &str, seed: u64, check: fn(&[u8]), outcome: Outcome) {
    let inputs = corpus(name);
    let mut outcomes = [0usize; 3];
    for input in &inputs {
        check(input);
    }
    let mut rng = Rng(seed);
    for i in 0..ITERATIONS {
        let base = &inputs[rng.below(inputs.len())];
        let m = mutate(&mut rng, base, &inputs);
        outcomes[outcome(&m)] += 1;
        let result = std::panic::catch_unwind(|| check(&m));
        if let Err(panic) = result {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{name}: iteration {i} (seed {seed:#x}) failed: {message}\ninput: {m:02x?}");
        }
    }
    // The mutations reach every kind of answer, not only early rejections.
    eprintln!(
        "{name}: complete {}, incomplete {}, error {}",
        outcomes[0], outcomes[1], outcomes[2]
    );
    for (kind, n) in ["complete", "incomplete", "error"].iter().zip(outcomes) {
        assert!(n >= ITERATIONS / 50, "{name}: only {n} {kind} outcomes");
    }
}

fn hello_outcome(data: &[u8]) -> usize {
    use switchyard::tls::sni::{parse, Parsed};
    match parse(data) {
        Ok(Parsed::Complete(_)) => 0,
        Ok(Parsed::Incomplete) => 1,
        Err(_) => 2,
    }
}

fn proxy_outcome(data: &[u8]) -> usize {
    use switchyard::proxy_protocol::{decode, Decoded};
    match decode(data) {
        Ok(Decoded::Complete { .. }) => 0,
        Ok(Decoded::Incomplete) => 1,
        Err(_) => 2,
    }
}

#[test]
fn client_hello_parser_survives_seeded_mutations() {
    run(
        "client_hello",
        0x5eed_0001,
        fuzz_checks::client_hello,
        hello_outcome,
    );
}

#[test]
fn proxy_header_parser_survives_seeded_mutations() {
    run(
        "proxy_header",
        0x5eed_0002,
        fuzz_checks::proxy_header,
        proxy_outcome,
    );
}

#[test]
fn corpus_parses_as_captured() {
    use switchyard::proxy_protocol::{decode, Decoded};
    use switchyard::tls::sni::{parse, Parsed};
    // Every captured hello is a whole ClientHello, SNI where the client sent one.
    for (file, sni) in [
        ("curl-sni", Some("api.example.com")),
        ("openssl-no-sni", None),
        ("openssl-tls13-sni-alpn", Some("db.example.com")),
        ("openssl-tls12-sni", Some("api.example.com")),
        ("psql15-after-sslrequest", Some("db.example.com")),
        ("split-16-byte-records", Some("db.example.com")),
        ("openssl-direct-tls-postgresql-alpn", Some("pg.example.com")),
    ] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus/client_hello")
            .join(file);
        let bytes = std::fs::read(path).expect("read");
        match parse(&bytes) {
            Ok(Parsed::Complete(h)) => {
                assert_eq!(h.sni.as_deref(), sni, "{file}");
                if file.contains("postgresql") {
                    assert!(h.offers_alpn(b"postgresql"));
                }
                if file.contains("tls13") {
                    assert_eq!(h.version, 0x0304);
                    assert!(h.offers_alpn(b"h2"));
                }
            }
            other => panic!("{file}: {other:?}"),
        }
    }
    for input in corpus("proxy_header") {
        assert!(
            matches!(decode(&input), Ok(Decoded::Complete { .. })),
            "{input:?}"
        );
    }
}
