//! The TLS ClientHello parser and the Postgres opening classifier on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    switchyard::fuzz_checks::client_hello(data);
});
