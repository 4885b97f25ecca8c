//! A stable 64-bit hash for consistent hashing. Every Switchyard instance, of any version,
//! must map the same key to the same backend, so the function is fixed here rather than
//! taken from `std` (whose `DefaultHasher` is randomly keyed per process).

/// FNV-1a over the bytes, finished with the murmur3 `fmix64` avalanche so that keys that
/// differ in one bit (neighbouring client addresses) spread over the whole range.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    fmix64(h)
}

/// Hashes the bytes with a seed, for the two independent hashes Maglev needs per backend.
pub fn hash64_seeded(bytes: &[u8], seed: u64) -> u64 {
    fmix64(hash64(bytes) ^ fmix64(seed.wrapping_add(0x9e37_79b9_7f4a_7c15)))
}

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_values() {
        // Pinned: changing these breaks agreement between instances of different versions.
        assert_eq!(hash64(b""), fmix64(0xcbf2_9ce4_8422_2325));
        assert_ne!(hash64(b"10.0.0.1"), hash64(b"10.0.0.2"));
        assert_ne!(hash64_seeded(b"a", 0), hash64_seeded(b"a", 1));
    }
}
