//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table of prime size M
//! filled from one permutation of the slots per backend, so a key's backend is
//! `table[key % M]` and a change of backends moves few keys. Permutations derive from the
//! backend *name*, and backends take turns in name order, so instances with the same backends
//! build the same table whatever the config order. The table is built once per snapshot and
//! never rebuilt for health: a key whose backend is unavailable or tried walks on to the
//! following slots, which moves exactly that backend's keys and no others.

use std::fmt;

use super::{is_candidate, is_prime, reduced_weights, DEFAULT_MAGLEV_TABLE_SIZE};
use crate::backend::Backend;
use crate::hash::hash64_seeded;

/// A populated Maglev lookup table over one snapshot's backends.
pub struct Maglev {
    /// Slot → backend index; every slot is filled unless no backend has weight. Empty when
    /// no backend has weight.
    table: Vec<u32>,
    /// Per backend index: whether it owns at least one slot. Lets `pick` tell in O(backends)
    /// whether walking the table can find anything.
    has_slots: Vec<bool>,
}

impl Maglev {
    /// Populates a table of `table_size` slots (prime; otherwise the default size is used).
    /// Backends with weight 0 get no slots; in each round of the population a backend takes
    /// as many slots as its weight (weights divided by their gcd).
    pub fn build(backends: &[Backend], table_size: usize) -> Maglev {
        let size = if is_prime(table_size) {
            table_size
        } else {
            DEFAULT_MAGLEV_TABLE_SIZE
        };
        let weights = reduced_weights(backends);
        let mut has_slots = vec![false; backends.len()];
        let mut turns: Vec<Permutation> = backends
            .iter()
            .zip(&weights)
            .enumerate()
            .filter(|(_, (_, &weight))| weight > 0)
            .map(|(index, (backend, &weight))| Permutation::new(backend, index, weight, size))
            .collect();
        if turns.is_empty() {
            return Maglev {
                table: Vec::new(),
                has_slots,
            };
        }
        // Name order (index for equal names) makes the table independent of config order.
        turns.sort_by(|a, b| {
            let (name_a, name_b) = (&backends[a.index].name, &backends[b.index].name);
            name_a.cmp(name_b).then(a.index.cmp(&b.index))
        });

        const EMPTY: u32 = u32::MAX;
        let mut table = vec![EMPTY; size];
        let mut filled = 0;
        'rounds: loop {
            for turn in &mut turns {
                for _ in 0..turn.weight {
                    // Each permutation visits every slot once (M prime, skip in 1..M), so
                    // while the table has an empty slot this loop finds one.
                    let mut slot = turn.next_slot();
                    while table[slot] != EMPTY {
                        slot = turn.next_slot();
                    }
                    table[slot] = turn.index as u32;
                    has_slots[turn.index] = true;
                    filled += 1;
                    if filled == size {
                        break 'rounds;
                    }
                }
            }
        }
        Maglev { table, has_slots }
    }

    /// The backend owning the key's slot, or when that one is unavailable or tried, the
    /// owner of the first following slot (wrapping) that is available and untried.
    pub fn pick(
        &self,
        backends: &[Backend],
        key: u64,
        tried: &[usize],
        now_ms: u64,
    ) -> Option<usize> {
        let size = self.table.len();
        if size == 0 {
            return None;
        }
        let start = (key % size as u64) as usize;
        let owner = self.table[start] as usize;
        if is_candidate(backends, owner, tried, now_ms) {
            return Some(owner);
        }
        // Before walking up to M slots, make sure some slot holder can be picked at all.
        let reachable = self
            .has_slots
            .iter()
            .enumerate()
            .any(|(index, &has)| has && is_candidate(backends, index, tried, now_ms));
        if !reachable {
            return None;
        }
        let walk = self.table[start + 1..].iter().chain(&self.table[..start]);
        walk.map(|&entry| entry as usize)
            .find(|&index| is_candidate(backends, index, tried, now_ms))
    }
}

/// One backend's permutation of the table slots, consumed in order during population.
struct Permutation {
    index: usize,
    weight: u32,
    /// Next slot of the permutation: starts at `offset`, advances by `skip` modulo M.
    position: u64,
    skip: u64,
    size: u64,
}

impl Permutation {
    fn new(backend: &Backend, index: usize, weight: u32, size: usize) -> Permutation {
        let size = size as u64;
        let name = backend.name.as_bytes();
        Permutation {
            index,
            weight,
            position: hash64_seeded(name, 0) % size,
            skip: hash64_seeded(name, 1) % (size - 1) + 1,
            size,
        }
    }

    fn next_slot(&mut self) -> usize {
        let slot = self.position;
        // position, skip < size <= usize::MAX, so the sum cannot overflow u64.
        self.position = (self.position + self.skip) % self.size;
        slot as usize
    }
}

impl fmt::Debug for Maglev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Maglev")
            .field("table_size", &self.table.len())
            .field(
                "backends_with_slots",
                &self.has_slots.iter().filter(|&&h| h).count(),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Health;
    use crate::balance::test_support::{backends, named};
    use crate::hash::hash64;

    const M: usize = DEFAULT_MAGLEV_TABLE_SIZE;
    const KEYS: u64 = 100_000;

    fn key(i: u64) -> u64 {
        hash64(&i.to_be_bytes())
    }

    fn slot_counts(maglev: &Maglev, backends: usize) -> Vec<usize> {
        let mut counts = vec![0; backends];
        maglev.table.iter().for_each(|&i| counts[i as usize] += 1);
        counts
    }

    /// The name of the backend each of the test keys maps to.
    fn owners(maglev: &Maglev, pool: &[Backend]) -> Vec<Option<String>> {
        (0..KEYS)
            .map(|i| {
                maglev
                    .pick(pool, key(i), &[], 1)
                    .map(|b| pool[b].name.to_string())
            })
            .collect()
    }

    #[test]
    fn same_key_same_backend() {
        let pool = backends(&[1, 1, 1, 1, 1]);
        let maglev = Maglev::build(&pool, M);
        for i in 0..1000 {
            let first = maglev.pick(&pool, key(i), &[], 1);
            assert!(first.is_some());
            for _ in 0..5 {
                assert_eq!(maglev.pick(&pool, key(i), &[], 1), first);
            }
        }
    }

    #[test]
    fn equal_weights_share_slots_evenly() {
        let pool = backends(&[1, 1, 1, 1, 1]);
        let counts = slot_counts(&Maglev::build(&pool, M), 5);
        let fair = M / 5;
        for &count in &counts {
            assert!(count.abs_diff(fair) * 100 <= fair * 2, "{counts:?}");
        }
        // Also many keys land evenly.
        let maglev = Maglev::build(&pool, M);
        let mut per_backend = [0u64; 5];
        for i in 0..KEYS {
            if let Some(b) = maglev.pick(&pool, key(i), &[], 1) {
                per_backend[b] += 1;
            }
        }
        for &n in &per_backend {
            assert!(
                n.abs_diff(KEYS / 5) * 100 <= (KEYS / 5) * 5,
                "{per_backend:?}"
            );
        }
    }

    #[test]
    fn slots_proportional_to_weight() {
        let pool = backends(&[1, 2]);
        let counts = slot_counts(&Maglev::build(&pool, M), 2);
        assert_eq!(counts.iter().sum::<usize>(), M);
        assert!(counts[0].abs_diff(M / 3) * 100 <= (M / 3) * 2, "{counts:?}");
        let pool = backends(&[1, 2, 0, 1]);
        let counts = slot_counts(&Maglev::build(&pool, M), 4);
        assert_eq!(counts[2], 0, "weight 0 gets no slots");
        assert!(counts[1].abs_diff(M / 2) * 100 <= (M / 2) * 2, "{counts:?}");
    }

    #[test]
    fn removing_one_of_five_moves_little_more_than_its_keys() {
        let pool = backends(&[1, 1, 1, 1, 1]);
        let before = owners(&Maglev::build(&pool, M), &pool);
        let removed = "c";
        let smaller: Vec<Backend> = pool
            .iter()
            .filter(|b| &*b.name != removed)
            .cloned()
            .collect();
        let after = owners(&Maglev::build(&smaller, M), &smaller);
        let mut moved = 0;
        for (old, new) in before.iter().zip(&after) {
            assert_ne!(new.as_deref(), Some(removed));
            if old != new {
                moved += 1;
            }
        }
        let on_removed = before
            .iter()
            .filter(|o| o.as_deref() == Some(removed))
            .count();
        assert!(moved >= on_removed);
        let limit = (1.0 / 5.0 + 0.03) * KEYS as f64;
        assert!(
            (moved as f64) <= limit,
            "moved {moved} of {KEYS}, {on_removed} were on c"
        );
    }

    #[test]
    fn unavailable_backend_moves_exactly_its_keys() {
        let pool = backends(&[1, 1, 1, 1, 1]);
        let maglev = Maglev::build(&pool, M);
        let before = owners(&maglev, &pool);
        pool[3].state.set_health(Health::Down);
        let after = owners(&maglev, &pool);
        let mut moved = 0;
        for (old, new) in before.iter().zip(&after) {
            if old.as_deref() == Some("d") {
                assert!(new.is_some() && new != old);
                moved += 1;
            } else {
                assert_eq!(old, new, "a key not on d moved");
            }
        }
        assert!(moved > 0);
        pool[3].state.set_health(Health::Up);
        assert_eq!(owners(&maglev, &pool), before, "keys return when d is back");
    }

    #[test]
    fn independent_builds_agree_on_every_slot() {
        let names = ["db-1", "db-2", "db-3", "db-4"];
        let first: Vec<Backend> = names
            .iter()
            .enumerate()
            .map(|(i, n)| named(n, i, 1))
            .collect();
        // Different addresses and fresh state, same names: same table.
        let second: Vec<Backend> = names
            .iter()
            .enumerate()
            .map(|(i, n)| named(n, i + 50, 1))
            .collect();
        assert_eq!(
            Maglev::build(&first, M).table,
            Maglev::build(&second, M).table
        );
        // Config order does not matter either: the same name owns the same slots.
        let reversed: Vec<Backend> = first.iter().rev().cloned().collect();
        let (a, b) = (Maglev::build(&first, M), Maglev::build(&reversed, M));
        for (&x, &y) in a.table.iter().zip(&b.table) {
            assert_eq!(first[x as usize].name, reversed[y as usize].name);
        }
    }

    #[test]
    fn tried_walk_yields_distinct_backends() {
        let pool = backends(&[1, 2, 1, 3, 1]);
        let maglev = Maglev::build(&pool, M);
        for i in 0..200 {
            let mut tried = Vec::new();
            while let Some(b) = maglev.pick(&pool, key(i), &tried, 1) {
                assert!(!tried.contains(&b));
                tried.push(b);
            }
            assert_eq!(tried.len(), 5);
        }
    }

    #[test]
    fn small_and_invalid_table_sizes() {
        let pool = backends(&[1, 1, 1]);
        let tiny = Maglev::build(&pool, 2);
        assert_eq!(tiny.table.len(), 2);
        let mut tried = Vec::new();
        while let Some(b) = tiny.pick(&pool, 5, &tried, 1) {
            tried.push(b);
        }
        assert_eq!(
            tried.len(),
            2,
            "a backend without a slot is unreachable, not a hang"
        );
        assert_eq!(
            Maglev::build(&pool, 65_536).table.len(),
            M,
            "non-prime falls back"
        );
    }
}
