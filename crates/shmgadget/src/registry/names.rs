//! The name index: open addressing (linear probing) over `name_buckets` u32 buckets in the
//! registry object, each 0 (empty), `TOMBSTONE` (deleted) or slot + 1, and a count of
//! tombstones in the header. Only touched under the registry lock, and derived from the
//! entries, so a torn update is repaired by rebuilding it ([`RegistryGuard::rebuild_index`]).
//!
//! [`NameIndex`] is the algorithm alone, over any bucket array (the property tests below run
//! it against a map); the guard methods at the end apply it to the registry's buckets and
//! entries.

use std::sync::atomic::{AtomicU32, Ordering};

use super::layout::{CREATING, LIVE};
use super::read::SectionRecord;
use super::write::RegistryGuard;

const TOMBSTONE: u32 = u32::MAX;

/// FNV-1a over the name's bytes, for the name index.
fn name_hash(name: &str) -> u64 {
    crate::fnv::fnv1a(name.as_bytes())
}

/// The name index over `buckets` (a power of two of them) and its tombstone count. Every
/// access is Relaxed: the index is only used under the registry lock, which orders it.
pub(super) struct NameIndex<'a> {
    buckets: &'a [AtomicU32],
    tombs: &'a AtomicU32,
}

impl<'a> NameIndex<'a> {
    pub(super) fn new(buckets: &'a [AtomicU32], tombs: &'a AtomicU32) -> NameIndex<'a> {
        assert!(buckets.len().is_power_of_two(), "the name index has a power of two of buckets");
        NameIndex { buckets, tombs }
    }

    /// The buckets to probe for `name`, in order: every bucket once, from its hash on.
    fn probe(&self, name: &str) -> impl Iterator<Item = &'a AtomicU32> + 'a {
        let buckets = self.buckets;
        let mask = buckets.len() as u64 - 1;
        let start = name_hash(name) & mask;
        (0..=mask).map(move |i| &buckets[((start + i) & mask) as usize])
    }

    /// Records that `slot` holds `name` (in the first empty or deleted bucket of its probe).
    pub(super) fn insert(&self, name: &str, slot: u32) {
        for b in self.probe(name) {
            // Relaxed: the index is only accessed under the lock.
            let v = b.load(Ordering::Relaxed);
            if v == 0 || v == TOMBSTONE {
                if v == TOMBSTONE {
                    self.tombs.fetch_sub(1, Ordering::Relaxed);
                }
                b.store(slot + 1, Ordering::Relaxed);
                return;
            }
        }
    }

    /// Forgets that `slot` holds `name`. Returns true when tombstones fill more than a quarter
    /// of the buckets: the caller should rebuild the index.
    pub(super) fn remove(&self, name: &str, slot: u32) -> bool {
        for b in self.probe(name) {
            // Relaxed: under the lock.
            let v = b.load(Ordering::Relaxed);
            if v == 0 {
                return false;
            }
            if v == slot + 1 {
                b.store(TOMBSTONE, Ordering::Relaxed);
                let tombs = self.tombs.fetch_add(1, Ordering::Relaxed) + 1;
                return tombs as u64 > self.buckets.len() as u64 / 4;
            }
        }
        false
    }

    /// Empties the index (before a rebuild).
    pub(super) fn clear(&self) {
        for b in self.buckets {
            // Relaxed: under the lock.
            b.store(0, Ordering::Relaxed);
        }
        self.tombs.store(0, Ordering::Relaxed);
    }

    /// Probes for `name`: asks `entry` about each candidate slot below `max_slots` (`None`: not
    /// this name, go on) and returns its first answer; `None` when the probe reaches an empty
    /// bucket or runs out.
    pub(super) fn find<R>(&self, name: &str, max_slots: u32, mut entry: impl FnMut(u32) -> Option<R>) -> Option<R> {
        for b in self.probe(name) {
            // Relaxed: under the lock.
            let v = b.load(Ordering::Relaxed);
            if v == 0 {
                return None;
            }
            if v == TOMBSTONE || v > max_slots {
                continue;
            }
            if let Some(r) = entry(v - 1) {
                return Some(r);
            }
        }
        None
    }
}

impl RegistryGuard<'_> {
    /// The registry's name index.
    fn index(&self) -> NameIndex<'_> {
        let reg = self.reg;
        let n = reg.layout.name_buckets;
        assert!((reg.layout.names_offset + n * 4) as usize <= reg.map_len);
        // SAFETY: the name index holds `name_buckets` u32s inside the validated mapping
        // (checked just above), 4-aligned (every table offset is), accessed only atomically.
        let buckets = unsafe {
            std::slice::from_raw_parts(
                reg.base.as_ptr().add(reg.layout.names_offset as usize).cast::<AtomicU32>(),
                n as usize,
            )
        };
        NameIndex::new(buckets, &reg.header().name_tombs)
    }

    pub(super) fn index_insert(&self, name: &str, slot: u32) {
        self.index().insert(name, slot);
    }

    pub(super) fn index_remove(&self, name: &str, slot: u32) {
        if self.index().remove(name, slot) {
            self.rebuild_index();
        }
    }

    /// Rebuilds the name index from the entries (after a crash, or when tombstones pile up).
    pub(super) fn rebuild_index(&self) {
        let index = self.index();
        index.clear();
        for slot in 0..self.reg.backed_slots() {
            if let Some(rec) = self.locked_entry(slot) {
                if rec.state == CREATING || rec.state == LIVE {
                    index.insert(rec.name.as_str(), slot);
                }
            }
        }
    }

    /// The live section called `name`, through the name index.
    pub fn find_live(&self, name: &str) -> Option<SectionRecord> {
        let found = self.index().find(name, self.reg.backed_slots(), |slot| {
            let rec = self.locked_entry(slot)?;
            (rec.name.as_str() == name).then(|| (rec.state == LIVE).then_some(rec))
        });
        found.flatten()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    /// An operation on the index and its model.
    #[derive(Debug, Clone)]
    enum Op {
        /// Create the section called `names[i]` (if it does not exist and a slot is free).
        Insert(usize),
        /// Delete it (if it exists).
        Remove(usize),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(prop_oneof![(0..24usize).prop_map(Op::Insert), (0..24usize).prop_map(Op::Remove)], 0..200)
    }

    /// Names that collide often in a small table: short, from a small alphabet.
    const NAMES: [&str; 24] = [
        "a", "b", "c", "aa", "ab", "ba", "bb", "abc", "cab", "bca", "x", "y", "z", "xy", "yx", "zz", "a.b", "a_b",
        "a-b", "q1", "q2", "q3", "heap", "queue",
    ];

    proptest! {
        /// Under any sequence of creates and deletes (with the rebuild the guard does when
        /// tombstones pile up), every name the model holds is found at its slot and every
        /// other name is not found.
        #[test]
        fn the_index_finds_exactly_the_names_the_entries_hold(slots in 1u32..12, ops in ops()) {
            let buckets: Vec<AtomicU32> = (0..(2 * slots as usize).next_power_of_two()).map(|_| AtomicU32::new(0)).collect();
            let tombs = AtomicU32::new(0);
            let index = NameIndex::new(&buckets, &tombs);
            // The entries: slot -> name.
            let mut entries: HashMap<u32, &str> = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(i) => {
                        let name = NAMES[i];
                        if entries.values().any(|n| *n == name) {
                            continue;
                        }
                        let Some(slot) = (0..slots).find(|s| !entries.contains_key(s)) else { continue };
                        entries.insert(slot, name);
                        index.insert(name, slot);
                    }
                    Op::Remove(i) => {
                        let name = NAMES[i];
                        let Some((&slot, _)) = entries.iter().find(|(_, n)| **n == name) else { continue };
                        entries.remove(&slot);
                        if index.remove(name, slot) {
                            index.clear();
                            for (&s, n) in &entries {
                                index.insert(n, s);
                            }
                        }
                    }
                }
                prop_assert!(tombs.load(Ordering::Relaxed) as usize <= buckets.len() / 4, "tombstones are bounded");
                for name in NAMES {
                    let found = index.find(name, slots, |s| (entries.get(&s) == Some(&name)).then_some(s));
                    let expected = entries.iter().find(|(_, n)| **n == name).map(|(&s, _)| s);
                    prop_assert_eq!(found, expected, "name {:?}", name);
                }
            }
        }
    }

    #[test]
    fn a_removed_name_leaves_the_names_probed_past_it_findable() {
        // Two names whose probes start at the same bucket of four: the second sits behind the
        // first; deleting the first must not hide it.
        let buckets: Vec<AtomicU32> = (0..4).map(|_| AtomicU32::new(0)).collect();
        let tombs = AtomicU32::new(0);
        let index = NameIndex::new(&buckets, &tombs);
        let first = NAMES[0];
        let second =
            *NAMES[1..].iter().find(|n| name_hash(n) & 3 == name_hash(first) & 3).expect("a collision among the names");
        index.insert(first, 0);
        index.insert(second, 1);
        index.remove(first, 0);
        let names = [first, second];
        assert_eq!(index.find(second, 2, |s| (names.get(s as usize) == Some(&second)).then_some(s)), Some(1));
        assert_eq!(index.find(first, 2, |s| (s == 0).then_some(s)), None, "slot 0 no longer holds it");
        assert_eq!(tombs.load(Ordering::Relaxed), 1);
    }
}
