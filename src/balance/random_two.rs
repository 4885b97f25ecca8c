//! Power of two random choices: draw two distinct available backends at random, each with
//! probability proportional to its weight (as nginx's `random two` draws), and take the one
//! with fewer active connections per unit of weight. Nearly as even as least connections,
//! without every connection piling onto the same momentarily least-loaded backend. The draw
//! is a binary search in a table of cumulative weights built with the pool, so a pick costs
//! O(log backends). Randomness is fastrand's thread-local generator, so picks share nothing
//! between threads.

use super::{is_candidate, less_loaded, reduced_weights};
use crate::backend::Backend;

/// Weighted draws per candidate before falling back to scanning from the last draw.
const DRAWS: usize = 4;

/// Power of two random choices over a cumulative weight table.
#[derive(Debug)]
pub struct RandomTwo {
    /// `cumulative[i]`: the sum of the reduced weights of backends `0..=i`. A draw `r` below
    /// the last entry lands on the first backend whose entry exceeds `r`.
    cumulative: Vec<u64>,
}

impl RandomTwo {
    /// Builds the weight table for `backends`, in config order (weights reduced as the other
    /// balancers reduce them; weight 0 is never drawn).
    pub fn build(backends: &[Backend]) -> RandomTwo {
        let cumulative = reduced_weights(backends)
            .into_iter()
            .scan(0u64, |sum, w| {
                *sum += u64::from(w);
                Some(*sum)
            })
            .collect();
        RandomTwo { cumulative }
    }

    /// The less loaded of two distinct weighted random candidates, or the only candidate.
    /// Ties go to the first drawn, so at equal load picks follow the weights.
    pub fn pick(&self, backends: &[Backend], tried: &[usize], now_ms: u64) -> Option<usize> {
        let first = self.draw_candidate(backends, None, tried, now_ms)?;
        let Some(second) = self.draw_candidate(backends, Some(first), tried, now_ms) else {
            return Some(first);
        };
        if less_loaded(&backends[second], &backends[first]) {
            Some(second)
        } else {
            Some(first)
        }
    }

    /// A weighted draw that is a candidate other than `exclude`: up to [`DRAWS`] draws, then
    /// the first candidate at or after the last draw (wrapping). The scan favours a backend
    /// that follows unavailable ones, but only once several draws have missed.
    fn draw_candidate(
        &self,
        backends: &[Backend],
        exclude: Option<usize>,
        tried: &[usize],
        now_ms: u64,
    ) -> Option<usize> {
        let total = self.cumulative.last().copied().unwrap_or(0);
        if total == 0 || backends.is_empty() {
            return None;
        }
        let mut index = 0;
        for _ in 0..DRAWS {
            let r = fastrand::u64(..total);
            index = self.cumulative.partition_point(|&c| c <= r) % backends.len();
            if Some(index) != exclude && is_candidate(backends, index, tried, now_ms) {
                return Some(index);
            }
        }
        scan_from(backends, index, exclude, tried, now_ms)
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
        let r2 = RandomTwo::build(&pool);
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
        let r2 = RandomTwo::build(&pool);
        for _ in 0..50 {
            assert_eq!(r2.pick(&pool, &[0, 2], 1), Some(1));
        }
        let alone = backends(&[1]);
        assert_eq!(RandomTwo::build(&alone).pick(&alone, &[], 1), Some(0));
    }

    #[test]
    fn draws_follow_the_weights_at_zero_load() {
        fastrand::seed(5);
        let pool = backends(&[1, 3]);
        let r2 = RandomTwo::build(&pool);
        let mut seen = [0; 2];
        for _ in 0..8000 {
            if let Some(index) = r2.pick(&pool, &[], 1) {
                seen[index] += 1;
            }
        }
        // 2000 and 6000 expected; a standard deviation is about 40.
        assert!((1800..=2200).contains(&seen[0]), "{seen:?}");
        assert_eq!(seen[0] + seen[1], 8000, "{seen:?}");
        // Weights 10 and 30 are the same as 1 and 3; an unavailable backend in between
        // takes nothing and skews nothing.
        let pool = backends(&[10, 5, 30]);
        pool[1].state.set_health(Health::Down);
        let r2 = RandomTwo::build(&pool);
        let mut seen = [0; 3];
        for _ in 0..8000 {
            if let Some(index) = r2.pick(&pool, &[], 1) {
                seen[index] += 1;
            }
        }
        assert_eq!(seen[1], 0, "{seen:?}");
        assert!((1800..=2200).contains(&seen[0]), "{seen:?}");
    }

    #[test]
    fn loaded_backend_gets_clearly_fewer_picks() {
        fastrand::seed(11);
        let pool = backends(&[1, 1, 1, 1]);
        let _held: Vec<_> = (0..100)
            .map(|_| pool[2].state.connection_opened())
            .collect();
        let r2 = RandomTwo::build(&pool);
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
        let r2 = RandomTwo::build(&pool);
        for _ in 0..50 {
            assert_eq!(r2.pick(&pool, &[], 1), Some(1));
        }
    }
}
