//! The PROXY protocol v1/v2 decoder (and re-encoding what it decodes) on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    switchyard::fuzz_checks::proxy_header(data);
});
