//! Power of two random choices: draw two distinct available backends at random and take the
//! one with fewer active connections per unit of weight. Nearly as even as least connections,
//! without every connection piling onto the same momentarily least-loaded backend. Randomness
//! is fastrand's thread-local generator, so picks share nothing between threads.

use super::{is_candidate, less_loaded};
use crate::backend::Backend;

/// Power of two random choices; stateless.
#[derive(Debug, Default)]
pub struct RandomTwo;

impl RandomTwo {
    pub fn new() -> RandomTwo {
        RandomTwo
    }

    /// The less loaded of two distinct random candidates, or the only candidate.
    pub fn pick(&self, backends: &[Backend], tried: &[usize], now_ms: u64) -> Option<usize> {
        let count = backends.len();
        if count == 0 {
            return None;
        }
        // A random start, then the first candidate at or after it (wrapping). Without
        // allocating a list of candidates this favours a backend that follows unavailable
        // ones; with few unavailable backends the bias is small.
        let first_start = fastrand::usize(..count);
        let first = scan_from(backends, first_start, None, tried, now_ms)?;
        let second_start = if count > 1 {
            (first + fastrand::usize(1..count)) % count
        } else {
            first
        };
        let Some(second) = scan_from(backends, second_start, Some(first), tried, now_ms) else {
            return Some(first);
        };
        if less_loaded(&backends[second], &backends[first]) {
            Some(second)
        } else {
            Some(first)
        }
    }
}

/// The first candidate at or after `start` (wrapping), other than `exclude`.
fn scan_from(
    backends: &[Backend],
    start: usize,
    exclude: Option<usize>,
    tried: &[usize],
    now_ms: u64,
) -> Option<usize> {
    let count = backends.len();
    (start..count)
        .chain(0..start)
        .find(|&index| Some(index) != exclude && is_candidate(backends, index, tried, now_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Health;
    use crate::balance::test_support::backends;

    #[test]
    fn never_picks_unavailable_or_tried() {
        fastrand::seed(7);
        let pool = backends(&[1, 1, 0, 1, 1, 1]);
        pool[1].state.set_health(Health::Down);
        let r2 = RandomTwo::new();
        let mut seen = [0; 6];
        for _ in 0..2000 {
            let Some(index) = r2.pick(&pool, &[4], 1) else {
                panic!("candidates remain");
            };
            seen[index] += 1;
        }
        assert_eq!([seen[1], seen[2], seen[4]], [0, 0, 0], "{seen:?}");
        assert!(seen[0] > 0 && seen[3] > 0 && seen[5] > 0, "{seen:?}");
    }

    #[test]
    fn single_candidate_is_picked() {
        let pool = backends(&[1, 1, 1]);
        let r2 = RandomTwo::new();
        for _ in 0..50 {
            assert_eq!(r2.pick(&pool, &[0, 2], 1), Some(1));
        }
        let alone = backends(&[1]);
        assert_eq!(r2.pick(&alone, &[], 1), Some(0));
    }

    #[test]
    fn loaded_backend_gets_clearly_fewer_picks() {
        fastrand::seed(11);
        let pool = backends(&[1, 1, 1, 1]);
        let _held: Vec<_> = (0..100)
            .map(|_| pool[2].state.connection_opened())
            .collect();
        let r2 = RandomTwo::new();
        let mut seen = [0; 4];
        for _ in 0..4000 {
            if let Some(index) = r2.pick(&pool, &[], 1) {
                seen[index] += 1;
            }
        }
        // Two distinct candidates: the loaded one always loses to the other.
        assert_eq!(seen[2], 0, "{seen:?}");
        for &n in [seen[0], seen[1], seen[3]].iter() {
            assert!(n > 1000, "{seen:?}");
        }
    }

    #[test]
    fn weight_scales_load() {
        fastrand::seed(3);
        // 10 connections on weight 10 is lighter than 2 on weight 1.
        let pool = backends(&[1, 10]);
        let _a: Vec<_> = (0..2).map(|_| pool[0].state.connection_opened()).collect();
        let _b: Vec<_> = (0..10).map(|_| pool[1].state.connection_opened()).collect();
        let r2 = RandomTwo::new();
        for _ in 0..50 {
            assert_eq!(r2.pick(&pool, &[], 1), Some(1));
        }
    }
}
