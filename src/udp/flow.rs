//! The UDP flow table, sans-io: which client addresses have a flow, when each was last
//! active, how many datagrams and replies it has seen, and when it must be forgotten. Time
//! is injected (`now_ms`), so every rule here is tested without sockets or sleeps.
//!
//! Lookup by client address is one hash probe; a flow is also reachable by its [`FlowId`]
//! (slot and generation), which fits in a `u64` and so can ride in an epoll event. Expiry
//! never scans the table: each flow has one entry in a min-heap of deadlines, pushed when
//! the flow starts and re-pushed only when its entry comes due while the flow is still in
//! use, so a datagram costs a timestamp store, not a heap operation. Entries of flows that
//! ended early (by `responses`) go stale; the heap is compacted once they outnumber the live
//! flows, which keeps it within twice the table plus a constant.
//!
//! What a flow carries (socket, backend, counters) is the caller's `V`; this module never
//! does I/O.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;

use super::slots::{SlotId, Slots};

/// Handle to one flow; stale once the flow ends (its slot's generation moves on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowId(SlotId);

impl FlowId {
    /// Packs the id into 64 bits (for epoll event data).
    pub fn to_u64(self) -> u64 {
        self.0.to_u64()
    }

    pub fn from_u64(v: u64) -> FlowId {
        FlowId(SlotId::from_u64(v))
    }
}

/// What a reply means for its flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyVerdict {
    /// Forward it; the flow goes on.
    Forward,
    /// Forward it; every client datagram now has its replies, so the flow ends.
    ForwardAndEnd,
}

/// Why an insert did not happen; the value is handed back.
#[derive(Debug, PartialEq, Eq)]
pub enum InsertError<V> {
    /// `max_flows` flows exist.
    Full(V),
    /// The client already has a flow (remove it first).
    Exists(V),
}

#[derive(Debug)]
struct Entry<V> {
    key: SocketAddr,
    last_seen_ms: u64,
    requests: u64,
    replies: u64,
    value: V,
}

/// (deadline, flow), ordered by deadline.
type Deadline = Reverse<(u64, SlotId)>;

/// Flows by client address, with idle expiry, a reply budget and a cap.
#[derive(Debug)]
pub struct FlowTable<V> {
    index: HashMap<SocketAddr, FlowId>,
    entries: Slots<Entry<V>>,
    deadlines: BinaryHeap<Deadline>,
    /// Heap entries whose flow has ended.
    stale: usize,
    idle_ms: u64,
    responses: Option<u32>,
    max_flows: usize,
}

impl<V> FlowTable<V> {
    /// An empty table: flows idle for `idle_ms` expire, `responses` replies per client
    /// datagram end a flow (None: only idleness does), at most `max_flows` at once.
    pub fn new(idle_ms: u64, responses: Option<u32>, max_flows: usize) -> FlowTable<V> {
        FlowTable {
            index: HashMap::new(),
            entries: Slots::default(),
            deadlines: BinaryHeap::new(),
            stale: 0,
            idle_ms: idle_ms.max(1),
            responses,
            max_flows,
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.index.len() >= self.max_flows
    }

    /// The flow of a client, if it has one.
    pub fn lookup(&self, key: &SocketAddr) -> Option<FlowId> {
        self.index.get(key).copied()
    }

    fn entry(&self, id: FlowId) -> Option<&Entry<V>> {
        self.entries.get(id.0)
    }

    fn entry_mut(&mut self, id: FlowId) -> Option<&mut Entry<V>> {
        self.entries.get_mut(id.0)
    }

    pub fn get(&self, id: FlowId) -> Option<&V> {
        self.entry(id).map(|e| &e.value)
    }

    pub fn get_mut(&mut self, id: FlowId) -> Option<&mut V> {
        self.entry_mut(id).map(|e| &mut e.value)
    }

    /// The client address of a flow.
    pub fn key(&self, id: FlowId) -> Option<SocketAddr> {
        self.entry(id).map(|e| e.key)
    }

    /// Starts a flow for `key` at `now_ms`.
    pub fn insert(
        &mut self,
        key: SocketAddr,
        value: V,
        now_ms: u64,
    ) -> Result<FlowId, InsertError<V>> {
        if self.index.contains_key(&key) {
            return Err(InsertError::Exists(value));
        }
        if self.is_full() {
            return Err(InsertError::Full(value));
        }
        let entry = Entry {
            key,
            last_seen_ms: now_ms,
            requests: 0,
            replies: 0,
            value,
        };
        let id = self.entries.insert(entry);
        self.index.insert(key, FlowId(id));
        self.deadlines.push(Reverse((now_ms + self.idle_ms, id)));
        Ok(FlowId(id))
    }

    /// A datagram from the client: the flow is active and owes one more set of replies.
    pub fn on_request(&mut self, id: FlowId, now_ms: u64) {
        if let Some(e) = self.entry_mut(id) {
            e.last_seen_ms = e.last_seen_ms.max(now_ms);
            e.requests += 1;
        }
    }

    /// A reply from the backend. None when the flow is gone.
    pub fn on_reply(&mut self, id: FlowId, now_ms: u64) -> Option<ReplyVerdict> {
        let responses = self.responses;
        let e = self.entry_mut(id)?;
        e.last_seen_ms = e.last_seen_ms.max(now_ms);
        e.replies += 1;
        Some(match responses {
            Some(n) if e.replies >= e.requests.saturating_mul(u64::from(n)) => {
                ReplyVerdict::ForwardAndEnd
            }
            _ => ReplyVerdict::Forward,
        })
    }

    /// Replies the flow still waits for before it ends (by `responses`); None when it is gone
    /// or only idleness ends it.
    pub fn replies_owed(&self, id: FlowId) -> Option<u64> {
        let n = self.responses?;
        let e = self.entry(id)?;
        Some(
            e.requests
                .saturating_mul(u64::from(n))
                .saturating_sub(e.replies),
        )
    }

    /// Ends a flow now; returns its client address and value.
    pub fn remove(&mut self, id: FlowId) -> Option<(SocketAddr, V)> {
        let removed = self.take(id)?;
        // Its deadline stays in the heap until it comes due or the heap is compacted.
        self.stale += 1;
        self.compact_if_needed();
        Some(removed)
    }

    fn take(&mut self, id: FlowId) -> Option<(SocketAddr, V)> {
        let entry = self.entries.remove(id.0)?;
        self.index.remove(&entry.key);
        Some((entry.key, entry.value))
    }

    /// The next flow idle since `now_ms - idle`, removed; call until None.
    pub fn pop_expired(&mut self, now_ms: u64) -> Option<(SocketAddr, V)> {
        while let Some(&Reverse((at, slot))) = self.deadlines.peek() {
            if at > now_ms {
                return None;
            }
            self.deadlines.pop();
            let id = FlowId(slot);
            let Some(last_seen) = self.entry(id).map(|e| e.last_seen_ms) else {
                self.stale = self.stale.saturating_sub(1);
                continue;
            };
            let due = last_seen + self.idle_ms;
            if due > now_ms {
                // Active since the entry was pushed: come back when it may be idle.
                self.deadlines.push(Reverse((due, slot)));
                continue;
            }
            return self.take(id);
        }
        None
    }

    /// The earliest time at which `pop_expired` may return something.
    pub fn next_deadline(&self) -> Option<u64> {
        self.deadlines.peek().map(|Reverse((at, _))| *at)
    }

    /// Removes every flow (shutdown).
    pub fn drain(&mut self) -> Vec<(SocketAddr, V)> {
        let mut out = Vec::with_capacity(self.len());
        out.extend(self.entries.drain().map(|e| (e.key, e.value)));
        self.index.clear();
        self.deadlines.clear();
        self.stale = 0;
        out
    }

    /// Heap entries (live and stale), for tests of the bound.
    pub fn pending_deadlines(&self) -> usize {
        self.deadlines.len()
    }

    fn compact_if_needed(&mut self) {
        if self.stale > self.index.len() + 1024 {
            let entries = &self.entries;
            self.deadlines
                .retain(|Reverse((_, slot))| entries.get(*slot).is_some());
            self.stale = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn lookup_insert_remove() {
        let mut t: FlowTable<&str> = FlowTable::new(1000, None, 10);
        assert!(t.lookup(&addr(1)).is_none());
        let id = t.insert(addr(1), "a", 0).expect("insert");
        assert_eq!(t.lookup(&addr(1)), Some(id));
        assert_eq!(t.get(id), Some(&"a"));
        assert_eq!(t.key(id), Some(addr(1)));
        assert_eq!(t.insert(addr(1), "b", 0), Err(InsertError::Exists("b")));
        assert_eq!(t.remove(id), Some((addr(1), "a")));
        assert!(t.get(id).is_none(), "a removed flow's id goes stale");
        assert!(t.remove(id).is_none());
        let again = t.insert(addr(1), "c", 0).expect("insert");
        assert_ne!(again, id, "the reused slot has a new generation");
        assert!(t.get(id).is_none());
        assert_eq!(t.get(again), Some(&"c"));
        assert_eq!(FlowId::from_u64(again.to_u64()), again);
    }

    #[test]
    fn idle_flows_expire_and_active_ones_do_not() {
        let mut t: FlowTable<u32> = FlowTable::new(1000, None, 10);
        let a = t.insert(addr(1), 1, 0).expect("insert");
        let _b = t.insert(addr(2), 2, 100).expect("insert");
        t.on_request(a, 900);
        assert_eq!(t.next_deadline(), Some(1000));
        assert_eq!(t.pop_expired(999), None);
        // a was active at 900: its first deadline re-arms at 1900; b is idle since 100.
        assert_eq!(t.pop_expired(1100), Some((addr(2), 2)));
        assert_eq!(t.pop_expired(1100), None);
        assert_eq!(t.next_deadline(), Some(1900));
        t.on_reply(a, 1500);
        assert_eq!(t.pop_expired(1900), None, "the reply kept it active");
        assert_eq!(t.pop_expired(2499), None);
        assert_eq!(t.pop_expired(2500), Some((addr(1), 1)));
        assert!(t.is_empty());
        assert_eq!(t.pending_deadlines(), 0);
    }

    #[test]
    fn responses_end_the_flow_once_every_datagram_is_answered() {
        let mut t: FlowTable<()> = FlowTable::new(1000, Some(1), 10);
        let id = t.insert(addr(1), (), 0).expect("insert");
        t.on_request(id, 0);
        t.on_request(id, 1);
        assert_eq!(t.replies_owed(id), Some(2));
        assert_eq!(t.on_reply(id, 2), Some(ReplyVerdict::Forward));
        assert_eq!(t.replies_owed(id), Some(1));
        assert_eq!(t.on_reply(id, 3), Some(ReplyVerdict::ForwardAndEnd));

        let mut t: FlowTable<()> = FlowTable::new(1000, Some(2), 10);
        let id = t.insert(addr(1), (), 0).expect("insert");
        t.on_request(id, 0);
        assert_eq!(t.replies_owed(id), Some(2));
        assert_eq!(t.on_reply(id, 1), Some(ReplyVerdict::Forward));
        assert_eq!(t.on_reply(id, 2), Some(ReplyVerdict::ForwardAndEnd));
        assert_eq!(t.replies_owed(id), Some(0));

        let mut t: FlowTable<()> = FlowTable::new(1000, None, 10);
        let id = t.insert(addr(1), (), 0).expect("insert");
        t.on_request(id, 0);
        for now in 1..10 {
            assert_eq!(t.on_reply(id, now), Some(ReplyVerdict::Forward));
        }
        assert_eq!(t.replies_owed(id), None, "only idleness ends it");
        t.remove(id);
        assert_eq!(t.on_reply(id, 11), None);
        assert_eq!(t.replies_owed(id), None);
    }

    #[test]
    fn max_flows_caps_inserts_until_one_ends() {
        let mut t: FlowTable<u16> = FlowTable::new(1000, None, 3);
        for p in 0..3 {
            t.insert(addr(p), p, 0).expect("insert");
        }
        assert!(t.is_full());
        assert_eq!(t.insert(addr(9), 9, 0), Err(InsertError::Full(9)));
        assert!(t.pop_expired(999).is_none());
        assert_eq!(t.pop_expired(1000).map(|(_, v)| v), Some(0));
        t.insert(addr(9), 9, 1000).expect("room again");
    }

    #[test]
    fn early_ends_keep_the_deadline_heap_bounded() {
        // Many short flows (DNS with responses: 1) that end before their idle deadline.
        let mut t: FlowTable<u64> = FlowTable::new(30_000, Some(1), 100);
        for i in 0..100_000u64 {
            let id = t.insert(addr((i % 50_000) as u16), i, i).expect("insert");
            t.on_request(id, i);
            assert_eq!(t.on_reply(id, i), Some(ReplyVerdict::ForwardAndEnd));
            t.remove(id);
            assert!(t.pending_deadlines() <= 2 * t.len() + 1026);
        }
        assert!(t.is_empty());
        // What is left are stale entries; they drain without returning anything.
        assert_eq!(t.pop_expired(u64::MAX / 2), None);
        assert_eq!(t.pending_deadlines(), 0);
    }

    #[test]
    fn expiry_work_is_proportional_to_expired_flows() {
        let mut t: FlowTable<u32> = FlowTable::new(1000, None, 20_000);
        for i in 0..10_000u32 {
            t.insert(addr(i as u16), i, u64::from(i) / 10)
                .expect("insert");
        }
        // Flows started at 0..=9 ms are due at 1000..=1009 ms: only those go at 1005.
        let mut expired = 0;
        while t.pop_expired(1005).is_some() {
            expired += 1;
        }
        assert_eq!(expired, 60);
        assert_eq!(t.len(), 9_940);
    }

    #[test]
    fn drain_empties_everything() {
        let mut t: FlowTable<u8> = FlowTable::new(1000, None, 10);
        let a = t.insert(addr(1), 1, 0).expect("insert");
        t.insert(addr(2), 2, 0).expect("insert");
        let mut all: Vec<u8> = t.drain().into_iter().map(|(_, v)| v).collect();
        all.sort_unstable();
        assert_eq!(all, [1, 2]);
        assert!(t.is_empty() && t.get(a).is_none() && t.next_deadline().is_none());
        t.insert(addr(1), 3, 0).expect("insert after drain");
    }
}
