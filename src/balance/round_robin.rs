//! Smooth weighted round robin, in nginx's order. nginx keeps a mutable `current_weight` per
//! backend behind a lock; here the whole cycle of that state machine (sum of the reduced
//! weights long) is played once at build time into a sequence of backend indices, and `pick`
//! only advances a shared atomic cursor through it. Skipping unavailable or already-tried
//! backends walks forward in the sequence, at most one lap, and moves the cursor past what
//! it walked, so the others keep their weights' proportions.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{any_candidate, is_candidate, reduced_weights};
use crate::backend::Backend;

/// Weighted round robin over a precomputed nginx sequence.
pub struct RoundRobin {
    /// One full nginx cycle of backend indices; backends of weight 0 never appear.
    sequence: Vec<u32>,
    /// Position of the next pick in `sequence` (taken modulo its length).
    cursor: AtomicUsize,
}

impl RoundRobin {
    /// Plays one full cycle of nginx's smooth weighted round robin over `backends`.
    /// Cost: O(sum of weights × backends), with weights clamped to `MAX_WEIGHT` and divided
    /// by their gcd.
    pub fn build(backends: &[Backend]) -> RoundRobin {
        let weights: Vec<i64> = reduced_weights(backends)
            .into_iter()
            .map(i64::from)
            .collect();
        let total: i64 = weights.iter().sum();
        let mut current = vec![0i64; weights.len()];
        let mut sequence = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        for _ in 0..total {
            // nginx: every backend gains its weight, the first with the largest current
            // weight is chosen, and the chosen one pays back the total.
            let mut best: Option<usize> = None;
            for (index, &weight) in weights.iter().enumerate() {
                if weight == 0 {
                    continue;
                }
                current[index] += weight;
                if best.is_none_or(|b| current[index] > current[b]) {
                    best = Some(index);
                }
            }
            let Some(best) = best else { break };
            current[best] -= total;
            sequence.push(best as u32);
        }
        RoundRobin {
            sequence,
            cursor: AtomicUsize::new(0),
        }
    }

    /// The next backend in the weighted order that is available and not in `tried`.
    ///
    /// A pick takes one ticket from the shared cursor; on a miss it walks forward in the
    /// sequence from there (at most one lap), then moves the cursor past the entries it
    /// walked, so they count as taken. A down backend's share thus goes to the others by
    /// weight instead of to whichever backend follows it in the sequence (with `a b c` and
    /// `b` down: `a c a c`, not `a c c a c c`), at one more atomic add per pick that missed.
    pub fn pick(&self, backends: &[Backend], tried: &[usize], now_ms: u64) -> Option<usize> {
        let len = self.sequence.len();
        if len == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % len;
        let lap = self.sequence[start..].iter().chain(&self.sequence[..start]);
        for (misses, &entry) in lap.enumerate() {
            let index = entry as usize;
            if is_candidate(backends, index, tried, now_ms) {
                if misses > 0 {
                    self.cursor.fetch_add(misses, Ordering::Relaxed);
                }
                return Some(index);
            }
            // A long weighted sequence during an outage: after as many misses as there are
            // backends, check in O(backends) whether walking on can find anything at all.
            if misses + 1 == backends.len() && !any_candidate(backends, tried, now_ms) {
                return None;
            }
        }
        None
    }
}

impl fmt::Debug for RoundRobin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoundRobin")
            .field("sequence_len", &self.sequence.len())
            .field("cursor", &self.cursor)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Health;
    use crate::balance::test_support::{backends, letter};

    fn picks(rr: &RoundRobin, pool: &[Backend], tried: &[usize], count: usize) -> String {
        (0..count)
            .map(|_| rr.pick(pool, tried, 1).map_or("-".to_string(), letter))
            .collect()
    }

    #[test]
    fn nginx_order_for_weights_5_1_1() {
        let pool = backends(&[5, 1, 1]);
        let rr = RoundRobin::build(&pool);
        assert_eq!(picks(&rr, &pool, &[], 14), "aabacaaaabacaa");
    }

    #[test]
    fn equal_weights_cycle_in_order() {
        let pool = backends(&[1, 1, 1]);
        let rr = RoundRobin::build(&pool);
        assert_eq!(picks(&rr, &pool, &[], 7), "abcabca");
        let pool = backends(&[40, 40, 40]);
        let rr = RoundRobin::build(&pool);
        assert_eq!(rr.sequence.len(), 3, "weights divided by their gcd");
        assert_eq!(picks(&rr, &pool, &[], 6), "abcabc");
    }

    #[test]
    fn weight_zero_never_picked() {
        let pool = backends(&[2, 0, 1]);
        let rr = RoundRobin::build(&pool);
        assert_eq!(picks(&rr, &pool, &[], 6), "acaaca");
    }

    #[test]
    fn skips_unavailable_backend() {
        let pool = backends(&[5, 1, 1]);
        pool[1].state.set_health(Health::Down);
        let rr = RoundRobin::build(&pool);
        // b's ticket in "aabacaa" takes the next ticket: a and c keep their 5:1.
        assert_eq!(picks(&rr, &pool, &[], 12), "aaacaaaaacaa");
        pool[1].state.set_health(Health::Up);
        assert_eq!(
            picks(&rr, &pool, &[], 7),
            "aabacaa",
            "back in rotation without rebuild"
        );
    }

    #[test]
    fn a_down_backend_shares_its_load_evenly() {
        let pool = backends(&[1, 1, 1]);
        pool[1].state.set_health(Health::Down);
        let rr = RoundRobin::build(&pool);
        assert_eq!(picks(&rr, &pool, &[], 6), "acacac");
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            if let Some(index) = rr.pick(&pool, &[], 1) {
                counts[index] += 1;
            }
        }
        assert_eq!(counts, [1500, 0, 1500]);
    }

    #[test]
    fn heavy_backend_down_finds_the_light_one() {
        let pool = backends(&[256, 1]);
        pool[0].state.set_health(Health::Down);
        let rr = RoundRobin::build(&pool);
        assert_eq!(picks(&rr, &pool, &[], 5), "bbbbb");
    }

    #[test]
    fn skips_tried_indices() {
        let pool = backends(&[5, 1, 1]);
        let rr = RoundRobin::build(&pool);
        assert_eq!(picks(&rr, &pool, &[0], 6), "bcbcbc");
        assert_eq!(picks(&rr, &pool, &[0, 2], 3), "bbb");
        assert_eq!(picks(&rr, &pool, &[0, 1, 2], 3), "---");
    }

    #[test]
    fn distribution_over_7000_picks_equals_weights() {
        let pool = backends(&[5, 1, 1]);
        let rr = RoundRobin::build(&pool);
        let mut counts = [0usize; 3];
        for _ in 0..7000 {
            if let Some(index) = rr.pick(&pool, &[], 1) {
                counts[index] += 1;
            }
        }
        assert_eq!(counts, [5000, 1000, 1000]);
    }

    #[test]
    fn outage_in_long_sequence_returns_none() {
        let pool = backends(&[256, 255, 254]);
        for backend in &pool {
            backend.state.set_health(Health::Down);
        }
        let rr = RoundRobin::build(&pool);
        assert_eq!(rr.sequence.len(), 765);
        assert_eq!(rr.pick(&pool, &[], 1), None);
    }
}
