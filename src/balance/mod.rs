//! Backend selection: which backend of a pool a new connection goes to. This module owns the
//! four algorithms and the [`Balancer`] that dispatches between them. A balancer is built off
//! the hot path (startup, reload) from one snapshot's backends and only read afterwards; `pick`
//! takes `&self`, never allocates, and keeps its counters in atomics. Availability (health,
//! admin state, breaker) is read live from [`BackendState`](crate::backend::BackendState), so a
//! health flip never rebuilds a balancer. What a connection does with the pick (connect, retry,
//! count) is not decided here.

mod least_conn;
mod maglev;
mod random_two;
mod round_robin;

pub use least_conn::LeastConn;
pub use maglev::Maglev;
pub use random_two::RandomTwo;
pub use round_robin::RoundRobin;

use crate::backend::Backend;

/// The balancing algorithm of a pool, as written in the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    RoundRobin,
    LeastConn,
    Maglev,
    RandomTwo,
}

impl Algorithm {
    /// Config spellings, in declaration order.
    pub const NAMES: [&'static str; 4] = ["round_robin", "least_conn", "maglev", "random_two"];

    /// The config spelling of this algorithm.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round_robin",
            Algorithm::LeastConn => "least_conn",
            Algorithm::Maglev => "maglev",
            Algorithm::RandomTwo => "random_two",
        }
    }
}

/// Maglev lookup table size when the config gives none (prime, as the algorithm needs).
pub const DEFAULT_MAGLEV_TABLE_SIZE: usize = 65537;

/// Largest weight the balancers honour; larger weights are clamped to it at build time (config
/// validation should reject them first). It bounds the round-robin sequence and Maglev rounds.
pub const MAX_WEIGHT: u32 = 256;

/// Whether `n` is prime (trial division; meant for config validation, not the hot path).
pub fn is_prime(n: usize) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n % 2 == 0 {
        return false;
    }
    let mut divisor = 3;
    while divisor <= n / divisor {
        if n % divisor == 0 {
            return false;
        }
        divisor += 2;
    }
    true
}

/// One pool's balancer, built for one config snapshot.
#[derive(Debug)]
pub enum Balancer {
    RoundRobin(RoundRobin),
    LeastConn(LeastConn),
    Maglev(Maglev),
    RandomTwo(RandomTwo),
}

impl Balancer {
    /// Built off the hot path (at startup / reload) from the pool's backends, in config order.
    /// `maglev_table_size` is only used by Maglev and must be prime (config validation checks
    /// it with [`is_prime`]); a non-prime size falls back to [`DEFAULT_MAGLEV_TABLE_SIZE`].
    pub fn build(algorithm: Algorithm, backends: &[Backend], maglev_table_size: usize) -> Balancer {
        match algorithm {
            Algorithm::RoundRobin => Balancer::RoundRobin(RoundRobin::build(backends)),
            Algorithm::LeastConn => Balancer::LeastConn(LeastConn::new()),
            Algorithm::Maglev => Balancer::Maglev(Maglev::build(backends, maglev_table_size)),
            Algorithm::RandomTwo => Balancer::RandomTwo(RandomTwo::build(backends)),
        }
    }

    /// The algorithm this balancer runs.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            Balancer::RoundRobin(_) => Algorithm::RoundRobin,
            Balancer::LeastConn(_) => Algorithm::LeastConn,
            Balancer::Maglev(_) => Algorithm::Maglev,
            Balancer::RandomTwo(_) => Algorithm::RandomTwo,
        }
    }

    /// Next backend index to try for a connection whose hash key is `key`, skipping backends
    /// that are not `is_available(now_ms)` (weight 0 counts as unavailable) and indices in
    /// `tried` (earlier attempts of this same connection, so retries reuse the algorithm and
    /// never repeat a backend). None when nothing is left. `backends` must be the slice the
    /// balancer was built from. Does not allocate; safe to call from many threads at once.
    pub fn pick(
        &self,
        backends: &[Backend],
        key: u64,
        tried: &[usize],
        now_ms: u64,
    ) -> Option<usize> {
        match self {
            Balancer::RoundRobin(rr) => rr.pick(backends, tried, now_ms),
            Balancer::LeastConn(lc) => lc.pick(backends, tried, now_ms),
            Balancer::Maglev(maglev) => maglev.pick(backends, key, tried, now_ms),
            Balancer::RandomTwo(r2) => r2.pick(backends, tried, now_ms),
        }
    }
}

/// Whether backend `index` may be picked now: it exists, is available, and was not tried.
fn is_candidate(backends: &[Backend], index: usize, tried: &[usize], now_ms: u64) -> bool {
    !tried.contains(&index) && backends.get(index).is_some_and(|b| b.is_available(now_ms))
}

/// Whether any backend may be picked now (O(number of backends)).
fn any_candidate(backends: &[Backend], tried: &[usize], now_ms: u64) -> bool {
    (0..backends.len()).any(|index| is_candidate(backends, index, tried, now_ms))
}

/// Whether `a` carries strictly less load than `b`, load being active connections per unit of
/// weight (compared by cross-multiplication, exact, no floats).
fn less_loaded(a: &Backend, b: &Backend) -> bool {
    let a_load = u128::from(a.state.active()) * u128::from(b.weight);
    let b_load = u128::from(b.state.active()) * u128::from(a.weight);
    a_load < b_load
}

/// The weights the balancers work with: clamped to [`MAX_WEIGHT`] and divided by the greatest
/// common divisor of the non-zero ones (so 100,100 behaves as 1,1). Zero stays zero.
fn reduced_weights(backends: &[Backend]) -> Vec<u32> {
    let clamped: Vec<u32> = backends.iter().map(|b| b.weight.min(MAX_WEIGHT)).collect();
    let divisor = clamped.iter().fold(0, |acc, &w| gcd(acc, w)).max(1);
    clamped.into_iter().map(|w| w / divisor).collect()
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
pub(crate) mod test_support {
    use crate::backend::Backend;
    use std::net::{Ipv4Addr, SocketAddr};

    /// Backends named by the letters a, b, c, ... with the given weights.
    pub fn backends(weights: &[u32]) -> Vec<Backend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| named(&letter(i), i, w))
            .collect()
    }

    pub fn named(name: &str, port_offset: usize, weight: u32) -> Backend {
        let port = 10_000 + port_offset as u16;
        Backend::new(name, SocketAddr::from((Ipv4Addr::LOCALHOST, port)), weight)
    }

    pub fn letter(i: usize) -> String {
        char::from(b'a' + i as u8).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::backends;
    use super::*;
    use crate::backend::Health;

    const ALL: [Algorithm; 4] = [
        Algorithm::RoundRobin,
        Algorithm::LeastConn,
        Algorithm::Maglev,
        Algorithm::RandomTwo,
    ];

    #[test]
    fn is_prime_small_and_table_sizes() {
        let primes: Vec<usize> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(DEFAULT_MAGLEV_TABLE_SIZE));
        assert!(is_prime(251));
        assert!(is_prime(655_373));
        assert!(!is_prime(65_536));
        assert!(!is_prime(65_535));
        assert!(!is_prime(7 * 9_973)); // product of two primes
        assert!(!is_prime(25));
    }

    #[test]
    fn names_match_config_spelling() {
        for (algorithm, name) in ALL.into_iter().zip(Algorithm::NAMES) {
            assert_eq!(algorithm.name(), name);
            let parsed = serde_yaml::from_str::<Algorithm>(name).ok();
            assert_eq!(parsed, Some(algorithm));
        }
        assert!(serde_yaml::from_str::<Algorithm>("RoundRobin").is_err());
    }

    #[test]
    fn build_dispatches_to_algorithm() {
        let pool = backends(&[1, 1]);
        for algorithm in ALL {
            let balancer = Balancer::build(algorithm, &pool, 13);
            assert_eq!(balancer.algorithm(), algorithm);
        }
    }

    #[test]
    fn pick_none_when_everything_tried_or_unavailable() {
        let pool = backends(&[1, 2, 3, 0]);
        for algorithm in ALL {
            let balancer = Balancer::build(algorithm, &pool, 251);
            assert_eq!(
                balancer.pick(&pool, 7, &[0, 1, 2], 1),
                None,
                "{algorithm:?} all tried"
            );
            assert_eq!(
                balancer.pick(&[], 7, &[], 1),
                None,
                "{algorithm:?} empty pool"
            );
        }
        pool[0].state.set_health(Health::Down);
        pool[1].state.set_health(Health::Down);
        for algorithm in ALL {
            let balancer = Balancer::build(algorithm, &pool, 251);
            for key in 0..50 {
                assert_eq!(balancer.pick(&pool, key, &[2], 1), None, "{algorithm:?}");
                assert_eq!(balancer.pick(&pool, key, &[], 1), Some(2), "{algorithm:?}");
            }
        }
        pool[2].state.set_health(Health::Down);
        for algorithm in ALL {
            let balancer = Balancer::build(algorithm, &pool, 251);
            assert_eq!(
                balancer.pick(&pool, 3, &[], 1),
                None,
                "{algorithm:?} outage"
            );
        }
        let empty = backends(&[]);
        for algorithm in ALL {
            let balancer = Balancer::build(algorithm, &empty, 251);
            assert_eq!(
                balancer.pick(&empty, 3, &[], 1),
                None,
                "{algorithm:?} no backends"
            );
        }
    }

    #[test]
    fn retries_walk_every_available_backend_once() {
        let pool = backends(&[1, 3, 0, 2, 1]);
        pool[4].state.set_health(Health::Down);
        for algorithm in ALL {
            let balancer = Balancer::build(algorithm, &pool, 251);
            let mut tried = Vec::new();
            while let Some(index) = balancer.pick(&pool, 42, &tried, 1) {
                assert!(!tried.contains(&index), "{algorithm:?} repeated {index}");
                tried.push(index);
            }
            tried.sort_unstable();
            assert_eq!(tried, [0, 1, 3], "{algorithm:?}");
        }
    }

    #[test]
    fn reduced_weights_divide_by_gcd_and_clamp() {
        let pool = backends(&[10, 20, 0, 30]);
        assert_eq!(reduced_weights(&pool), [1, 2, 0, 3]);
        let pool = backends(&[1000, 256]);
        assert_eq!(reduced_weights(&pool), [1, 1]);
        assert_eq!(reduced_weights(&backends(&[0, 0])), [0, 0]);
    }
}
