//! A generational slab, sans-io: values in reusable slots, each reached by a [`SlotId`]
//! (slot and generation) that goes stale once its value is removed, and that fits in a
//! `u64` so it can ride in an epoll event. The flow table and the upstream sockets keep
//! their entries in one.

/// Handle to one value; stale once the value is removed (its slot's generation moves on).
/// Ordered by slot, then generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotId {
    slot: u32,
    generation: u32,
}

impl SlotId {
    /// Packs the id into 64 bits (for epoll event data).
    pub fn to_u64(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.slot)
    }

    pub fn from_u64(v: u64) -> SlotId {
        SlotId {
            slot: v as u32,
            generation: (v >> 32) as u32,
        }
    }
}

#[derive(Debug)]
struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

/// Values by [`SlotId`]; a removed value's slot serves the next insert.
#[derive(Debug)]
pub struct Slots<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
}

impl<T> Default for Slots<T> {
    fn default() -> Slots<T> {
        Slots {
            slots: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Slots<T> {
    pub fn get(&self, id: SlotId) -> Option<&T> {
        let slot = self.slots.get(id.slot as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.value.as_ref()
    }

    pub fn get_mut(&mut self, id: SlotId) -> Option<&mut T> {
        let slot = self.slots.get_mut(id.slot as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.value.as_mut()
    }

    /// Stores `value` in a free slot (a new one when none is free).
    pub fn insert(&mut self, value: T) -> SlotId {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    value: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let entry = &mut self.slots[slot as usize];
        entry.value = Some(value);
        SlotId {
            slot,
            generation: entry.generation,
        }
    }

    /// Takes a value out; its id (and every copy of it) goes stale. None when already gone.
    pub fn remove(&mut self, id: SlotId) -> Option<T> {
        let slot = self.slots.get_mut(id.slot as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        let value = slot.value.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(id.slot);
        Some(value)
    }

    /// Takes every value out, in slot order.
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        let free = &mut self.free;
        self.slots
            .iter_mut()
            .enumerate()
            .filter_map(move |(index, slot)| {
                let value = slot.value.take()?;
                slot.generation = slot.generation.wrapping_add(1);
                free.push(index as u32);
                Some(value)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_go_stale_when_their_slot_is_reused() {
        let mut s: Slots<&str> = Slots::default();
        let a = s.insert("a");
        assert_eq!(s.get(a), Some(&"a"));
        assert_eq!(s.remove(a), Some("a"));
        assert_eq!(s.get(a), None);
        assert_eq!(s.remove(a), None);
        let b = s.insert("b");
        assert_ne!(a, b, "the reused slot has a new generation");
        assert_eq!(s.get(a), None);
        if let Some(v) = s.get_mut(b) {
            *v = "c";
        }
        assert_eq!(SlotId::from_u64(b.to_u64()), b);
        let d = s.insert("d");
        assert_eq!(s.drain().collect::<Vec<_>>(), ["c", "d"]);
        assert_eq!((s.get(b), s.get(d)), (None, None));
    }
}
