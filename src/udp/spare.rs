//! Spare upstream sockets, sans-io: per backend, a first-in first-out list of sockets whose
//! flow ended cleanly (every expected reply came), waiting to serve another flow to the same
//! backend. A spare rests [`REST_MS`] before it may be taken, so a reply that comes late
//! (beyond `responses`) but within the rest finds no flow on the socket and is dropped; one
//! resting [`MAX_REST_MS`] unused is handed back to be closed, so idle spares do not hold
//! descriptors after a burst. The lists together hold at most `cap`.
//!
//! The rest bounds the risk of reuse, it does not remove it: a reply later than the rest may
//! find the socket lent to another flow and reach that flow's client (`udp::upstream` says
//! exactly what is dropped). Listeners that cannot take that risk keep no spares
//! (`udp.reuse_upstream_sockets: false`).
//!
//! Time is injected and the items are the caller's (socket handles): this module does no
//! I/O. Which flows may give their socket back, and draining a spare before reuse, are the
//! caller's (`udp::upstream`).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// How long a spare rests after its flow ended before it may serve another flow.
pub const REST_MS: u64 = 10;
/// A spare unused for this long is closed.
pub const MAX_REST_MS: u64 = 1_000;

/// Spares by key (the backend address), oldest first, `cap` in all.
#[derive(Debug)]
pub struct Spares<K, T> {
    /// (resting since, item), oldest at the front.
    lists: HashMap<K, VecDeque<(u64, T)>>,
    len: usize,
    cap: usize,
}

impl<K: Eq + Hash + Copy, T> Spares<K, T> {
    /// Empty lists that will hold at most `cap` spares in all.
    pub fn new(cap: usize) -> Spares<K, T> {
        Spares {
            lists: HashMap::new(),
            len: 0,
            cap,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps `item` as a spare of `key`, resting from `now_ms`; hands it back when the lists
    /// are full (the caller closes it).
    pub fn put(&mut self, key: K, item: T, now_ms: u64) -> Result<(), T> {
        if self.len >= self.cap {
            return Err(item);
        }
        self.lists.entry(key).or_default().push_back((now_ms, item));
        self.len += 1;
        Ok(())
    }

    /// The longest-resting spare of `key`, once it has rested [`REST_MS`], with the time it
    /// began resting.
    pub fn take(&mut self, key: &K, now_ms: u64) -> Option<(u64, T)> {
        let list = self.lists.get_mut(key)?;
        let &(since, _) = list.front()?;
        if now_ms < since.saturating_add(REST_MS) {
            // The others came later: none has rested long enough either.
            return None;
        }
        let taken = list.pop_front()?;
        self.len -= 1;
        Some(taken)
    }

    /// Removes one spare equal to `item` of `key` (it failed while resting); false when
    /// there is none.
    pub fn remove(&mut self, key: &K, item: &T) -> bool
    where
        T: PartialEq,
    {
        let Some(list) = self.lists.get_mut(key) else {
            return false;
        };
        let Some(at) = list.iter().position(|(_, t)| t == item) else {
            return false;
        };
        list.remove(at);
        self.len -= 1;
        true
    }

    /// The longest-resting spare of any key, rested or not (to free a descriptor when none
    /// is left for a new socket).
    pub fn pop_oldest(&mut self) -> Option<T> {
        let list = self
            .lists
            .values_mut()
            .filter(|l| !l.is_empty())
            .min_by_key(|l| l.front().map(|(since, _)| *since))?;
        let (_, item) = list.pop_front()?;
        self.len -= 1;
        Some(item)
    }

    /// Hands to `evict` every spare whose key `keep` rejects (its backend was removed or is
    /// down) and every spare that has rested [`MAX_REST_MS`] or more.
    pub fn trim(&mut self, now_ms: u64, keep: impl Fn(&K) -> bool, mut evict: impl FnMut(T)) {
        let mut evicted = 0;
        self.lists.retain(|key, list| {
            let kept = keep(key);
            while let Some(&(since, _)) = list.front() {
                if kept && now_ms < since.saturating_add(MAX_REST_MS) {
                    break;
                }
                if let Some((_, item)) = list.pop_front() {
                    evict(item);
                    evicted += 1;
                }
            }
            kept
        });
        self.len -= evicted;
    }

    /// Removes every spare (shutdown).
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.len = 0;
        self.lists
            .drain()
            .flat_map(|(_, list)| list.into_iter().map(|(_, t)| t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spare_is_taken_only_after_resting_oldest_first() {
        let mut s: Spares<char, u32> = Spares::new(10);
        assert_eq!(s.take(&'a', 0), None);
        s.put('a', 1, 100).expect("room");
        s.put('a', 2, 110).expect("room");
        s.put('b', 3, 100).expect("room");
        assert_eq!(s.len(), 3);
        assert_eq!(s.take(&'a', 100 + REST_MS - 1), None, "still resting");
        assert_eq!(s.take(&'a', 100 + REST_MS), Some((100, 1)));
        assert_eq!(
            s.take(&'a', 100 + REST_MS),
            None,
            "the next rests until 110"
        );
        assert_eq!(s.take(&'a', 110 + REST_MS), Some((110, 2)));
        assert_eq!(s.take(&'a', u64::MAX), None);
        assert_eq!(
            s.take(&'c', u64::MAX),
            None,
            "another backend's spares are not lent"
        );
        assert_eq!(s.take(&'b', 100 + REST_MS), Some((100, 3)));
        assert!(s.is_empty());
    }

    #[test]
    fn the_lists_are_capped_in_all() {
        let mut s: Spares<char, u32> = Spares::new(2);
        s.put('a', 1, 0).expect("room");
        s.put('b', 2, 0).expect("room");
        assert_eq!(s.put('c', 3, 0), Err(3), "full: handed back to be closed");
        assert_eq!(s.take(&'a', REST_MS), Some((0, 1)));
        s.put('c', 3, 0).expect("room again");
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn trim_closes_removed_or_down_backends_and_long_rested_spares() {
        let mut s: Spares<char, u32> = Spares::new(10);
        s.put('a', 1, 0).expect("room");
        s.put('a', 2, 500).expect("room");
        s.put('b', 3, 500).expect("room");
        let mut closed = Vec::new();
        s.trim(MAX_REST_MS - 1, |_| true, |t| closed.push(t));
        assert!(closed.is_empty());
        s.trim(MAX_REST_MS, |_| true, |t| closed.push(t));
        assert_eq!(closed, [1], "rested too long");
        s.trim(MAX_REST_MS, |k| *k != 'b', |t| closed.push(t));
        assert_eq!(closed, [1, 3], "b was removed");
        assert_eq!(s.len(), 1);
        assert_eq!(s.take(&'a', MAX_REST_MS), Some((500, 2)));
        assert!(s.is_empty());
    }

    #[test]
    fn remove_pop_oldest_and_drain() {
        let mut s: Spares<char, u32> = Spares::new(10);
        s.put('a', 1, 20).expect("room");
        s.put('b', 2, 10).expect("room");
        s.put('b', 3, 30).expect("room");
        s.put('a', 4, 40).expect("room");
        assert!(s.remove(&'a', &4));
        assert!(!s.remove(&'a', &4));
        assert!(!s.remove(&'c', &1));
        assert_eq!(
            s.pop_oldest(),
            Some(2),
            "unrested spares go too when a descriptor is needed"
        );
        assert_eq!(s.pop_oldest(), Some(1));
        assert_eq!(s.len(), 1);
        let rest: Vec<u32> = s.drain().collect();
        assert_eq!(rest, [3]);
        assert!(s.is_empty() && s.pop_oldest().is_none());
    }

    #[test]
    fn steady_reuse_keeps_the_lists_at_the_resting_rate() {
        // One flow per millisecond, each ending 1 ms after it starts: after the first
        // REST_MS, every flow finds a rested spare, and the lists stop growing.
        let mut s: Spares<char, u64> = Spares::new(10_000);
        let mut opened = 0u64;
        let mut reused = 0u64;
        for now in 0..10_000u64 {
            let socket = match s.take(&'a', now) {
                Some((_, socket)) => {
                    reused += 1;
                    socket
                }
                None => {
                    opened += 1;
                    opened
                }
            };
            s.put('a', socket, now + 1).expect("room");
        }
        assert_eq!(opened + reused, 10_000);
        assert!(opened <= REST_MS + 2, "opened {opened} sockets");
        assert!(s.len() as u64 <= REST_MS + 2);
    }
}
