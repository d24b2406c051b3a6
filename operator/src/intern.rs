//! Sharing of identical node assignments in the node-state cache.
//!
//! Nodes with the same kernel facts get the same assignment of a program, so thousands of
//! cached node states hold a few dozen distinct assignments. Each state read from the API
//! arrives as its own copy; [`Interner::intern`] swaps every copy for one shared `Arc`, which
//! keeps the cache's memory close to (nodes × programs) pointers instead of full copies.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, Weak};

use bpfpoly_crds::state::AssignedProgram;

/// How many new entries between sweeps of entries no cached state uses any more.
const SWEEP_EVERY: usize = 4096;

/// A table of live assignments by content.
#[derive(Default)]
pub struct Interner {
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    by_digest: HashMap<u64, Vec<Weak<AssignedProgram>>>,
    added: usize,
}

fn digest(a: &AssignedProgram) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    a.hash(&mut h);
    h.finish()
}

impl Interner {
    /// Replaces `a` by the shared assignment with the same content, or makes `a` the shared
    /// one.
    pub fn intern(&self, a: &mut Arc<AssignedProgram>) {
        let d = digest(a);
        let mut t = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let slot = t.by_digest.entry(d).or_default();
        if let Some(shared) = slot.iter().filter_map(Weak::upgrade).find(|s| **s == **a) {
            *a = shared;
            return;
        }
        slot.retain(|w| w.strong_count() > 0);
        slot.push(Arc::downgrade(a));
        t.added += 1;
        if t.added >= SWEEP_EVERY {
            t.added = 0;
            t.by_digest.retain(|_, v| {
                v.retain(|w| w.strong_count() > 0);
                !v.is_empty()
            });
        }
    }

    /// Distinct assignments in the table (including ones no longer used, until a sweep).
    pub fn len(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .by_digest
            .values()
            .map(Vec::len)
            .sum()
    }

    /// True when the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(name: &str, generation: i64) -> Arc<AssignedProgram> {
        Arc::new(AssignedProgram {
            name: name.into(),
            generation,
            variants: vec![],
            config_fallbacks: vec![],
        })
    }

    #[test]
    fn equal_assignments_share_one_allocation_and_different_ones_do_not() {
        let i = Interner::default();
        let mut a1 = assignment("p", 1);
        let mut a2 = assignment("p", 1);
        let mut b = assignment("p", 2);
        assert!(!Arc::ptr_eq(&a1, &a2));
        i.intern(&mut a1);
        i.intern(&mut a2);
        i.intern(&mut b);
        assert!(Arc::ptr_eq(&a1, &a2));
        assert!(!Arc::ptr_eq(&a1, &b));
        assert_eq!(*b, *assignment("p", 2));
        assert_eq!(i.len(), 2);
    }

    #[test]
    fn an_assignment_no_state_holds_is_not_kept_alive() {
        let i = Interner::default();
        let mut a = assignment("p", 1);
        i.intern(&mut a);
        let weak = Arc::downgrade(&a);
        drop(a);
        assert!(weak.upgrade().is_none());
        // A new equal copy becomes the shared one.
        let mut again = assignment("p", 1);
        let ptr = Arc::as_ptr(&again);
        i.intern(&mut again);
        assert_eq!(Arc::as_ptr(&again), ptr);
        assert_eq!(i.len(), 1);
    }
}
