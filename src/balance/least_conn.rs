//! Weighted least connections: the available backend with the fewest active connections per
//! unit of weight. Loads are compared exactly by cross-multiplication. Ties go to the first
//! backend met by a scan that starts at a rotating offset, so equally loaded backends take
//! turns instead of the first one in config order taking every tie.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{is_candidate, less_loaded};
use crate::backend::Backend;

/// Weighted least connections; its only state is the tie-breaking scan offset.
#[derive(Debug, Default)]
pub struct LeastConn {
    /// Where the next scan starts (taken modulo the number of backends).
    offset: AtomicUsize,
}

impl LeastConn {
    pub fn new() -> LeastConn {
        LeastConn::default()
    }

    /// The available, untried backend with the least active connections per unit of weight.
    /// O(number of backends).
    pub fn pick(&self, backends: &[Backend], tried: &[usize], now_ms: u64) -> Option<usize> {
        let count = backends.len();
        if count == 0 {
            return None;
        }
        let start = self.offset.fetch_add(1, Ordering::Relaxed) % count;
        let mut best: Option<usize> = None;
        for index in (start..count).chain(0..start) {
            if !is_candidate(backends, index, tried, now_ms) {
                continue;
            }
            if best.is_none_or(|b| less_loaded(&backends[index], &backends[b])) {
                best = Some(index);
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Health;
    use crate::balance::test_support::backends;

    #[test]
    fn picks_least_loaded() {
        let pool = backends(&[1, 1, 1]);
        let lc = LeastConn::new();
        let _held: Vec<_> = [0, 0, 0, 1, 2, 2]
            .iter()
            .map(|&i| pool[i].state.connection_opened())
            .collect();
        for _ in 0..6 {
            assert_eq!(lc.pick(&pool, &[], 1), Some(1));
        }
        assert_eq!(
            lc.pick(&pool, &[1], 1),
            Some(2),
            "next least loaded when 1 was tried"
        );
        pool[1].state.set_health(Health::Down);
        assert_eq!(
            lc.pick(&pool, &[], 1),
            Some(2),
            "least loaded among the available"
        );
    }

    #[test]
    fn load_is_relative_to_weight() {
        let pool = backends(&[1, 4]);
        let lc = LeastConn::new();
        let _held: Vec<_> = (0..2)
            .map(|_| pool[0].state.connection_opened())
            .chain((0..7).map(|_| pool[1].state.connection_opened()))
            .collect();
        // 2/1 against 7/4: b carries less per unit of weight.
        assert_eq!(lc.pick(&pool, &[], 1), Some(1));
    }

    #[test]
    fn weight_two_takes_twice_the_held_connections() {
        let pool = backends(&[1, 2]);
        let lc = LeastConn::new();
        let mut held = Vec::new();
        for _ in 0..300 {
            let Some(index) = lc.pick(&pool, &[], 1) else {
                panic!("a backend is available");
            };
            held.push(pool[index].state.connection_opened());
        }
        let (a, b) = (pool[0].state.active(), pool[1].state.active());
        assert_eq!(a + b, 300);
        assert!(a.abs_diff(100) <= 1 && b.abs_diff(200) <= 1, "a={a} b={b}");
    }

    #[test]
    fn ties_alternate() {
        let pool = backends(&[1, 1]);
        let lc = LeastConn::new();
        let picks: Vec<_> = (0..6).filter_map(|_| lc.pick(&pool, &[], 1)).collect();
        assert_eq!(picks, [0, 1, 0, 1, 0, 1]);
        let pool = backends(&[3, 3, 3]);
        let picks: Vec<_> = (0..6).filter_map(|_| lc.pick(&pool, &[], 1)).collect();
        let mut counts = [0; 3];
        picks.iter().for_each(|&i| counts[i] += 1);
        assert_eq!(counts, [2, 2, 2], "three-way tie spreads evenly: {picks:?}");
    }

    #[test]
    fn never_picks_weight_zero_or_tried() {
        let pool = backends(&[0, 1, 1]);
        let lc = LeastConn::new();
        for _ in 0..10 {
            assert_eq!(lc.pick(&pool, &[2], 1), Some(1));
        }
    }
}
