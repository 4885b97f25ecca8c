//! TLS awareness without TLS termination: parsers for what a client sends before any key is
//! agreed ([`sni`]: the ClientHello's server name and ALPN) and the few Postgres bytes that
//! come before its TLS handshake ([`postgres`]). Pure functions over byte slices, no I/O,
//! fuzzed (`fuzz/`). Reading the bytes and choosing a pool happen in `route`.

pub mod postgres;
pub mod sni;
