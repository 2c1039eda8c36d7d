//! Heap allocations counted as they happen, for the bench (`cargo xtask bench` reports
//! allocations per request and per connection from two reads of `/allocations`).
//!
//! [`Counting`] wraps the real allocator; the binary installs it as the global allocator
//! only when built with the feature `count-allocations` (main.rs), so a shipped agent pays
//! nothing. Each thread adds to one of [`SHARDS`] cache-line-sized counters, picked once per
//! thread, so the agent's worker threads do not contend on one line: a count costs an
//! uncontended atomic add (a few nanoseconds, against the tens of microseconds a proxied
//! request takes). No crate counts allocations behind an existing allocator this way
//! (`dhat` replaces it and profiles, `stats_alloc` has one shared counter), hence this file.

use std::{
    alloc::{GlobalAlloc, Layout},
    cell::Cell,
    sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
};

use serde::Serialize;

/// Counters per shard; more threads than shards share them.
const SHARDS: usize = 16;

/// One shard's counter, alone on its cache line(s).
#[repr(align(128))]
struct Shard(AtomicU64);

static COUNTERS: [Shard; SHARDS] = [const { Shard(AtomicU64::new(0)) }; SHARDS];
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);
/// Set once [`Counting`] has counted anything: the binary was built to count.
static COUNTING: AtomicBool = AtomicBool::new(false);

thread_local! {
    // `const`, with no destructor: safe to touch from inside the allocator.
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// The global allocator `A`, counting every allocation (a `realloc` counts as one).
pub struct Counting<A>(pub A);

impl<A> Counting<A> {
    fn count() {
        // A const thread-local without a destructor is there for the thread's whole life.
        let shard = SHARD.with(|shard| {
            if shard.get() == usize::MAX {
                shard.set(NEXT_SHARD.fetch_add(1, Relaxed) % SHARDS);
            }
            shard.get()
        });
        COUNTERS[shard].0.fetch_add(1, Relaxed);
        if !COUNTING.load(Relaxed) {
            COUNTING.store(true, Relaxed);
        }
    }
}

// SAFETY: every call is passed to `A` unchanged; counting touches only atomics and a
// const-initialised thread-local without a destructor, so it cannot allocate or recurse.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::count();
        // SAFETY: the caller's contract is `A`'s.
        unsafe { self.0.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::count();
        // SAFETY: as above.
        unsafe { self.0.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::count();
        // SAFETY: as above.
        unsafe { self.0.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { self.0.dealloc(ptr, layout) }
    }
}

/// The count since the process started.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Allocations {
    pub allocations: u64,
}

/// What has been counted, or `None` when this binary does not count (built without the
/// feature `count-allocations`).
pub fn counted() -> Option<Allocations> {
    if !COUNTING.load(Relaxed) {
        return None;
    }
    Some(Allocations {
        allocations: COUNTERS.iter().map(|shard| shard.0.load(Relaxed)).sum(),
    })
}

#[cfg(test)]
mod tests {
    use std::alloc::System;

    use super::*;

    #[test]
    fn counts_what_it_passes_on() {
        let counting = Counting(System);
        let before = {
            // Counted into the statics, whichever allocator the test binary itself uses.
            Counting::<System>::count();
            counted().expect("counting has begun")
        };
        let layout = Layout::from_size_align(100, 8).expect("layout");
        // SAFETY: a valid layout, freed with the same layout; realloc keeps the alignment.
        unsafe {
            let block = counting.alloc(layout);
            assert!(!block.is_null());
            let grown = counting.realloc(block, layout, 300);
            assert!(!grown.is_null());
            counting.dealloc(grown, Layout::from_size_align(300, 8).expect("layout"));
        }
        let after = counted().expect("counting");
        // Other tests' threads do not allocate through `counting`, so the difference is ours.
        assert_eq!(after.allocations - before.allocations, 2);
    }
}
