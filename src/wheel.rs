//! Hierarchical timer wheel: every timer of the daemon (debounce, retry backoff, SIGKILL
//! escalation, startup grace, watchdog) lives here, so the event loop can sleep exactly until the
//! next due timer and not wake at all when none is pending (SPEC §5).
//!
//! The wheel is pure: it never reads a clock. Time is a `u64` count of milliseconds on a monotonic
//! timeline chosen by the caller, passed to [`TimerWheel::new`] and [`TimerWheel::poll`]. That
//! keeps every test deterministic (tests move `now` by hand, no sleeps).
//!
//! # Layout
//!
//! There are eleven levels (`LEVELS`) of 64 slots. A slot at level `l` spans `64^l` ms, so a
//! level spans `64^(l+1)` ms: 1 ms slots over 64 ms at level 0, 64 ms slots over ~4 s at level 1,
//! ~4 s slots over ~4.5 min at level 2, and so on. Eleven levels give 66 bits, more than the 64
//! bits of the timeline, so a deadline anywhere up to `u64::MAX` has a slot and no overflow list
//! is needed.
//!
//! A pending timer sits at the level of the highest bit in which its deadline differs from the
//! wheel's current time, in the slot named by the deadline's 6-bit digit at that level. Its digit
//! there is always above the current time's digit, so the first occupied slot of a level is its
//! lowest set bit (`trailing_zeros` on the level's occupied bitmap), and every slot of a lower
//! level ends before any slot of a higher level starts. A timer whose deadline is not after the
//! current time goes to a separate due list and fires on the next poll.
//!
//! Timers are stored in a `Vec` slab. Each slot's timers form a doubly linked list threaded
//! through slab indices, so insert and cancel are O(1) with no `unsafe`. A [`TimerId`] carries
//! the slab index and the slot's generation, which is bumped whenever a slot is freed, so an id
//! of a timer that already fired or was cancelled never touches a timer that reused its slot.
//! The slab keeps its high-water size and reuses freed slots.
//!
//! # Polling
//!
//! [`TimerWheel::poll`] first fires the due list, then visits occupied slots in time order up to
//! `now`: a level-0 slot holds a single deadline and fires whole; a higher slot is cascaded, each
//! timer moving to a lower level (or firing when its deadline is the slot's start). A timer
//! cascades at most `LEVELS - 1` times, so polling is amortised O(1) per timer.
//!
//! Timers fire ordered by deadline, and timers with equal deadlines fire in insertion order:
//! lists are appended at the tail and cascades walk them head first, and a timer inserted later
//! never sits at a higher level than an earlier one with the same deadline (the common prefix of
//! the current time and a deadline only grows as time moves towards it), so it is never ahead of
//! it. The due list is sorted (stably) by deadline when it fires.
//!
//! # Next deadline
//!
//! [`TimerWheel::next_deadline`] is exact, not rounded to a slot: the daemon uses it as the poll
//! timeout. The answer is cached; insert keeps the cache exact in O(1), and cancelling the
//! earliest timer or firing timers marks it stale. A stale cache is recomputed on the next call
//! in O(`LEVELS`) bitmap tests plus a walk of one list: the due list when it is not empty, else
//! the first occupied slot's list when it is above level 0 (a level-0 slot's start is its
//! deadline, so no walk). The cache is a `Cell`, so the wheel is `Send` but not `Sync`, which
//! suits the single-threaded daemon.

use std::cell::Cell;
use std::fmt;

/// Bits of a deadline consumed by one level.
const SLOT_BITS: u32 = 6;
/// Slots per level: one bit each in a `u64` occupied bitmap.
const SLOTS: usize = 1 << SLOT_BITS;
/// Mask of a deadline's digit within one level.
const SLOT_MASK: u64 = SLOTS as u64 - 1;
/// Enough levels for the top one to span the whole `u64` timeline (11 × 6 = 66 bits ≥ 64).
const LEVELS: usize = u64::BITS.div_ceil(SLOT_BITS) as usize;

/// Handle of a scheduled timer, valid until the timer fires or is cancelled.
///
/// Holds the slab index and that slot's generation, so a stale id (its timer already fired or
/// was cancelled, and the slot may hold a newer timer) is recognised and ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerId {
    index: usize,
    generation: u64,
}

/// Hierarchical timer wheel holding timers of payload `T`; see the module docs.
pub struct TimerWheel<T> {
    /// The wheel's current time: the largest `now_ms` given to `new` or `poll`.
    now: u64,
    /// Slab of timers; freed entries form a free list through `Entry::Vacant`.
    nodes: Vec<Node<T>>,
    /// Head of the free list in `nodes`.
    free_head: Option<usize>,
    /// Number of pending timers.
    len: usize,
    /// Per level, bit `s` is set when slot `s` holds at least one timer.
    occupied: [u64; LEVELS],
    /// Per level and slot, the timers placed there, in insertion (or cascade) order.
    slots: Box<[[List; SLOTS]; LEVELS]>,
    /// Timers inserted with a deadline not after `now`; they fire on the next poll.
    due: List,
    /// Cached answer of `next_deadline`.
    earliest: Cell<Earliest>,
}

/// One slab entry.
struct Node<T> {
    /// Bumped each time the entry is freed, so old ids stop matching.
    generation: u64,
    entry: Entry<T>,
}

enum Entry<T> {
    Vacant { next_free: Option<usize> },
    Pending(Pending<T>),
}

/// A scheduled timer and its links in the list of its place.
struct Pending<T> {
    deadline: u64,
    place: Place,
    prev: Option<usize>,
    next: Option<usize>,
    payload: T,
}

/// Which list a pending timer is linked into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Due,
    Slot { level: usize, slot: usize },
}

/// Head and tail of a doubly linked list of slab indices.
#[derive(Clone, Copy, Debug, Default)]
struct List {
    head: Option<usize>,
    tail: Option<usize>,
}

impl List {
    const EMPTY: List = List {
        head: None,
        tail: None,
    };
}

/// State of the `next_deadline` cache.
#[derive(Clone, Copy, Debug)]
enum Earliest {
    Stale,
    Known(Option<u64>),
}

impl<T> TimerWheel<T> {
    /// An empty wheel whose current time is `now_ms`.
    pub fn new(now_ms: u64) -> Self {
        TimerWheel {
            now: now_ms,
            nodes: Vec::new(),
            free_head: None,
            len: 0,
            occupied: [0; LEVELS],
            slots: Box::new([[List::EMPTY; SLOTS]; LEVELS]),
            due: List::EMPTY,
            earliest: Cell::new(Earliest::Known(None)),
        }
    }

    /// Schedules `payload` at the absolute time `deadline_ms`, in O(1).
    ///
    /// A deadline not after the wheel's current time fires on the next poll, whatever `now_ms`
    /// that poll is given.
    pub fn insert(&mut self, deadline_ms: u64, payload: T) -> TimerId {
        let place = self.place_for(deadline_ms);
        let index = self.alloc(Pending {
            deadline: deadline_ms,
            place,
            prev: None,
            next: None,
            payload,
        });
        self.link_back(index);
        self.len += 1;
        self.note_inserted(deadline_ms);
        TimerId {
            index,
            generation: self.nodes[index].generation,
        }
    }

    /// Removes a pending timer in O(1) and returns its payload, or `None` when `id` is stale
    /// (the timer already fired or was cancelled).
    pub fn cancel(&mut self, id: TimerId) -> Option<T> {
        self.pending(id)?;
        self.unlink(id.index);
        let (_, pending) = self.free(id.index);
        self.note_removed(pending.deadline);
        Some(pending.payload)
    }

    /// The earliest pending deadline, exact (not rounded to a slot), or `None` when no timer is
    /// pending. O(1) while cached; see the module docs for the cost of a recompute.
    pub fn next_deadline(&self) -> Option<u64> {
        match self.earliest.get() {
            Earliest::Known(earliest) => earliest,
            Earliest::Stale => {
                let earliest = self.compute_earliest();
                self.earliest.set(Earliest::Known(earliest));
                earliest
            }
        }
    }

    /// Advances the wheel to `now_ms` and returns every timer with a deadline at or before it,
    /// ordered by deadline and then by insertion order. Their ids become stale.
    ///
    /// The wheel's time never moves backwards: an earlier `now_ms` acts as the current time.
    /// A poll that fires nothing does not allocate.
    pub fn poll(&mut self, now_ms: u64) -> Vec<(TimerId, T)> {
        let now = now_ms.max(self.now);
        let mut fired = self.take_due();
        while let Some((level, slot, start)) = self.first_occupied_slot() {
            if start > now {
                break;
            }
            // Moving time to the slot's start keeps every other timer's placement valid: no
            // other slot starts before it.
            self.now = start;
            self.drain_slot(level, slot, &mut fired);
        }
        self.now = now;
        if !fired.is_empty() {
            self.earliest.set(Earliest::Stale);
        }
        fired
    }

    /// Number of pending timers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no timer is pending.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The deadline of a pending timer, or `None` when `id` is stale.
    pub fn deadline(&self, id: TimerId) -> Option<u64> {
        self.pending(id).map(|pending| pending.deadline)
    }

    /// The wheel's current time: the largest `now_ms` given to `new` or `poll`.
    pub fn now_ms(&self) -> u64 {
        self.now
    }

    /// Fires the due list: timers inserted with a deadline not after the current time.
    fn take_due(&mut self) -> Vec<(TimerId, T)> {
        let mut cursor = std::mem::take(&mut self.due).head;
        let mut fired = Vec::new();
        while let Some(index) = cursor {
            cursor = self.node(index).next;
            let (id, pending) = self.free(index);
            fired.push((pending.deadline, id, pending.payload));
        }
        // Stable, so equal deadlines keep insertion order; the due list is usually empty or
        // already sorted (a run of `deadline == now` inserts), which the sort handles in O(n).
        fired.sort_by_key(|&(deadline, _, _)| deadline);
        fired
            .into_iter()
            .map(|(_, id, payload)| (id, payload))
            .collect()
    }

    /// Empties one slot whose start is the current time: timers due now fire, the others move
    /// to a lower level. Called with `self.now` set to the slot's start.
    fn drain_slot(&mut self, level: usize, slot: usize, fired: &mut Vec<(TimerId, T)>) {
        let mut cursor = std::mem::take(&mut self.slots[level][slot]).head;
        self.occupied[level] &= !(1 << slot);
        while let Some(index) = cursor {
            let (deadline, next) = {
                let pending = self.node(index);
                (pending.deadline, pending.next)
            };
            cursor = next;
            if deadline <= self.now {
                let (id, pending) = self.free(index);
                fired.push((id, pending.payload));
            } else {
                let place = self.place_for(deadline);
                debug_assert!(
                    matches!(place, Place::Slot { level: lower, .. } if lower < level),
                    "cascade from level {level} slot {slot} at {now} put {deadline} at {place:?}",
                    now = self.now
                );
                self.node_mut(index).place = place;
                self.link_back(index);
            }
        }
    }

    /// The occupied slot that starts first, as `(level, slot, start)`.
    fn first_occupied_slot(&self) -> Option<(usize, usize, u64)> {
        let (level, bits) = self
            .occupied
            .iter()
            .enumerate()
            .find(|(_, bits)| **bits != 0)?;
        let slot = bits.trailing_zeros() as usize;
        Some((level, slot, slot_start(self.now, level, slot)))
    }

    /// The exact earliest deadline, walking at most one list.
    fn compute_earliest(&self) -> Option<u64> {
        if self.due.head.is_some() {
            return self.list_min(self.due);
        }
        let (level, slot, start) = self.first_occupied_slot()?;
        if level == 0 {
            // A level-0 slot is one millisecond wide: its start is its timers' deadline.
            return Some(start);
        }
        self.list_min(self.slots[level][slot])
    }

    fn list_min(&self, list: List) -> Option<u64> {
        std::iter::successors(list.head, |&index| self.node(index).next)
            .map(|index| self.node(index).deadline)
            .min()
    }

    /// Keeps the `next_deadline` cache exact after an insert.
    fn note_inserted(&self, deadline: u64) {
        if let Earliest::Known(earliest) = self.earliest.get() {
            let earliest = earliest.map_or(deadline, |earliest| earliest.min(deadline));
            self.earliest.set(Earliest::Known(Some(earliest)));
        }
    }

    /// Marks the `next_deadline` cache stale when the removed timer may have been the earliest.
    fn note_removed(&self, deadline: u64) {
        if self.len == 0 {
            self.earliest.set(Earliest::Known(None));
        } else if let Earliest::Known(Some(earliest)) = self.earliest.get()
            && earliest == deadline
        {
            self.earliest.set(Earliest::Stale);
        }
    }

    /// Where a timer with `deadline` belongs given the current time.
    fn place_for(&self, deadline: u64) -> Place {
        if deadline <= self.now {
            Place::Due
        } else {
            let level = level_for(self.now, deadline);
            Place::Slot {
                level,
                slot: slot_for(deadline, level),
            }
        }
    }

    /// The pending timer `id` names, if it is not stale.
    fn pending(&self, id: TimerId) -> Option<&Pending<T>> {
        let node = self.nodes.get(id.index)?;
        match &node.entry {
            Entry::Pending(pending) if node.generation == id.generation => Some(pending),
            _ => None,
        }
    }

    /// The pending timer at a slab index reached through a list link.
    fn node(&self, index: usize) -> &Pending<T> {
        match &self.nodes[index].entry {
            Entry::Pending(pending) => pending,
            Entry::Vacant { .. } => unreachable!("timer lists link only pending slab entries"),
        }
    }

    fn node_mut(&mut self, index: usize) -> &mut Pending<T> {
        match &mut self.nodes[index].entry {
            Entry::Pending(pending) => pending,
            Entry::Vacant { .. } => unreachable!("timer lists link only pending slab entries"),
        }
    }

    fn list_mut(&mut self, place: Place) -> &mut List {
        match place {
            Place::Due => &mut self.due,
            Place::Slot { level, slot } => &mut self.slots[level][slot],
        }
    }

    /// Stores a timer in a free slab entry (reusing one when possible) and returns its index.
    fn alloc(&mut self, pending: Pending<T>) -> usize {
        let Some(index) = self.free_head else {
            self.nodes.push(Node {
                generation: 0,
                entry: Entry::Pending(pending),
            });
            return self.nodes.len() - 1;
        };
        let node = &mut self.nodes[index];
        let Entry::Vacant { next_free } = node.entry else {
            unreachable!("the free list links only vacant slab entries");
        };
        self.free_head = next_free;
        node.entry = Entry::Pending(pending);
        index
    }

    /// Frees the slab entry of an already unlinked timer; returns the timer and its old id.
    fn free(&mut self, index: usize) -> (TimerId, Pending<T>) {
        let node = &mut self.nodes[index];
        let vacant = Entry::Vacant {
            next_free: self.free_head,
        };
        let Entry::Pending(pending) = std::mem::replace(&mut node.entry, vacant) else {
            unreachable!("only pending slab entries are freed");
        };
        let id = TimerId {
            index,
            generation: node.generation,
        };
        node.generation = node.generation.wrapping_add(1);
        self.free_head = Some(index);
        self.len -= 1;
        (id, pending)
    }

    /// Appends a timer to the list of its `place`.
    fn link_back(&mut self, index: usize) {
        let place = self.node(index).place;
        let old_tail = self.list_mut(place).tail;
        let pending = self.node_mut(index);
        pending.prev = old_tail;
        pending.next = None;
        match old_tail {
            Some(tail) => self.node_mut(tail).next = Some(index),
            None => self.list_mut(place).head = Some(index),
        }
        self.list_mut(place).tail = Some(index);
        if let Place::Slot { level, slot } = place {
            self.occupied[level] |= 1 << slot;
        }
    }

    /// Removes a timer from the list of its place, clearing the slot's bit when it empties.
    fn unlink(&mut self, index: usize) {
        let Pending {
            place, prev, next, ..
        } = *self.node(index);
        match prev {
            Some(prev) => self.node_mut(prev).next = next,
            None => self.list_mut(place).head = next,
        }
        match next {
            Some(next) => self.node_mut(next).prev = prev,
            None => self.list_mut(place).tail = prev,
        }
        if let Place::Slot { level, slot } = place
            && self.slots[level][slot].head.is_none()
        {
            self.occupied[level] &= !(1 << slot);
        }
    }
}

impl<T> fmt::Debug for TimerWheel<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimerWheel")
            .field("now_ms", &self.now)
            .field("len", &self.len)
            .field("next_deadline", &self.next_deadline())
            .finish_non_exhaustive()
    }
}

/// The level of a timer with `deadline` (after `now`): the level holding the highest bit in
/// which the two differ.
fn level_for(now: u64, deadline: u64) -> usize {
    // Or-ing the low digit in makes deadlines that differ from `now` only there land at level 0.
    let differing = (now ^ deadline) | SLOT_MASK;
    let highest_bit = u64::BITS - 1 - differing.leading_zeros();
    (highest_bit / SLOT_BITS) as usize
}

/// The slot of `deadline` at `level`: its 6-bit digit there.
fn slot_for(deadline: u64, level: usize) -> usize {
    ((deadline >> (level as u32 * SLOT_BITS)) & SLOT_MASK) as usize
}

/// The first millisecond of `slot` at `level` within the level's span that contains `now`.
fn slot_start(now: u64, level: usize, slot: usize) -> u64 {
    let shift = level as u32 * SLOT_BITS;
    // The top level spans the whole timeline, where the shift would overflow: no bits above.
    let above_level = u64::MAX.checked_shl(shift + SLOT_BITS).unwrap_or(0);
    (now & above_level) | ((slot as u64) << shift)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};

    impl<T> TimerWheel<T> {
        /// Checks every structural invariant; panics with the wheel's state when one fails.
        fn assert_invariants(&self) {
            let mut linked = 0;
            for level in 0..LEVELS {
                for slot in 0..SLOTS {
                    let list = self.slots[level][slot];
                    let bit = self.occupied[level] >> slot & 1 == 1;
                    assert_eq!(
                        bit,
                        list.head.is_some(),
                        "bitmap of level {level} slot {slot}"
                    );
                    for index in self.assert_list(list, Place::Slot { level, slot }) {
                        let deadline = self.node(index).deadline;
                        assert!(deadline > self.now, "{deadline} not after {}", self.now);
                        assert_eq!(level_for(self.now, deadline), level, "level of {deadline}");
                        assert_eq!(slot_for(deadline, level), slot, "slot of {deadline}");
                        linked += 1;
                    }
                }
            }
            for index in self.assert_list(self.due, Place::Due) {
                assert!(self.node(index).deadline <= self.now);
                linked += 1;
            }
            assert_eq!(linked, self.len, "linked timers vs len");
            let pending = self.nodes.iter();
            let pending = pending.filter(|node| matches!(node.entry, Entry::Pending(_)));
            assert_eq!(pending.count(), self.len, "pending slab entries vs len");
            let free =
                std::iter::successors(self.free_head, |&index| match self.nodes[index].entry {
                    Entry::Vacant { next_free } => next_free,
                    Entry::Pending(_) => panic!("free list reaches pending entry {index}"),
                });
            assert_eq!(
                free.count() + self.len,
                self.nodes.len(),
                "free list length"
            );
            if let Earliest::Known(earliest) = self.earliest.get() {
                assert_eq!(earliest, self.compute_earliest(), "cached next deadline");
            }
        }

        /// Walks a list checking its links and places; returns its indices in order.
        fn assert_list(&self, list: List, place: Place) -> Vec<usize> {
            let mut indices = Vec::new();
            let mut prev = None;
            let mut cursor = list.head;
            while let Some(index) = cursor {
                let pending = self.node(index);
                assert_eq!(pending.place, place, "place of entry {index}");
                assert_eq!(pending.prev, prev, "back link of entry {index}");
                indices.push(index);
                prev = Some(index);
                cursor = pending.next;
            }
            assert_eq!(list.tail, prev, "tail of {place:?}");
            indices
        }
    }

    /// Small deterministic PRNG (SplitMix64), enough to drive the model test.
    struct SplitMix64(u64);

    impl SplitMix64 {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, bound: u64) -> u64 {
            if bound == 0 { 0 } else { self.next() % bound }
        }

        /// A value below `2^k` for a random `k < max_bits`: spreads values over every level.
        fn log_uniform(&mut self, max_bits: u64) -> u64 {
            let bits = self.below(max_bits);
            self.below(1 << bits)
        }
    }

    fn payloads<T: Copy>(fired: &[(TimerId, T)]) -> Vec<T> {
        fired.iter().map(|&(_, payload)| payload).collect()
    }

    /// Interesting deadlines: each level boundary and its neighbours, plus the end of time.
    fn boundary_values() -> Vec<u64> {
        let mut values = vec![0, 1, 2, u64::MAX - 1, u64::MAX];
        for level in 1..LEVELS as u32 {
            let edge = 1u64 << (level * SLOT_BITS).min(63);
            values.extend([edge - 1, edge, edge + 1, 2 * edge - 1, 2 * edge]);
        }
        values.extend([62, 63, 64, 65, 127, 128, 4095, 4096, 4097]);
        values.sort_unstable();
        values.dedup();
        values
    }

    #[test]
    fn empty_wheel_has_no_deadline_and_fires_nothing() {
        let mut wheel: TimerWheel<()> = TimerWheel::new(5);
        assert_eq!(wheel.next_deadline(), None);
        assert!(wheel.is_empty());
        assert!(wheel.poll(1_000_000).is_empty());
        assert_eq!(wheel.now_ms(), 1_000_000);
        wheel.assert_invariants();
    }

    #[test]
    fn poll_fires_due_timers_in_deadline_order() {
        let mut wheel = TimerWheel::new(0);
        for (deadline, name) in [(300, "c"), (10, "a"), (5_000, "e"), (64, "b"), (4_096, "d")] {
            wheel.insert(deadline, name);
        }
        assert_eq!(wheel.len(), 5);
        assert!(wheel.poll(9).is_empty());
        assert_eq!(payloads(&wheel.poll(300)), ["a", "b", "c"]);
        assert_eq!(wheel.next_deadline(), Some(4_096));
        assert_eq!(payloads(&wheel.poll(10_000)), ["d", "e"]);
        assert!(wheel.is_empty());
        wheel.assert_invariants();
    }

    #[test]
    fn one_poll_spanning_many_levels_keeps_order() {
        let mut wheel = TimerWheel::new(0);
        let deadlines = [1u64, 70, 5_000, 300_000, 20_000_000, 2_000_000_000, 1 << 40];
        for &deadline in deadlines.iter().rev() {
            wheel.insert(deadline, deadline);
        }
        assert_eq!(payloads(&wheel.poll(u64::MAX)), deadlines);
    }

    #[test]
    fn fired_ids_are_the_ids_insert_returned() {
        let mut wheel = TimerWheel::new(0);
        let a = wheel.insert(3, 'a');
        let b = wheel.insert(100_000, 'b');
        assert_eq!(wheel.poll(100_000), [(a, 'a'), (b, 'b')]);
    }

    #[test]
    fn cancel_returns_payload_once_and_the_timer_never_fires() {
        let mut wheel = TimerWheel::new(0);
        let keep = wheel.insert(50, "keep");
        let drop = wheel.insert(50, "drop");
        assert_eq!(wheel.deadline(drop), Some(50));
        assert_eq!(wheel.cancel(drop), Some("drop"));
        assert_eq!(wheel.cancel(drop), None);
        assert_eq!(wheel.deadline(drop), None);
        assert_eq!(wheel.len(), 1);
        assert_eq!(wheel.poll(50), [(keep, "keep")]);
        wheel.assert_invariants();
    }

    #[test]
    fn cancel_after_fire_returns_none() {
        let mut wheel = TimerWheel::new(0);
        let id = wheel.insert(7, 1);
        assert_eq!(payloads(&wheel.poll(7)), [1]);
        assert_eq!(wheel.cancel(id), None);
        assert_eq!(wheel.deadline(id), None);
    }

    #[test]
    fn stale_id_does_not_touch_a_timer_that_reused_its_slot() {
        let mut wheel = TimerWheel::new(0);
        let fired = wheel.insert(1, "old");
        wheel.poll(1);
        let cancelled = wheel.insert(5, "cancelled");
        wheel.cancel(cancelled);
        let reused = wheel.insert(10, "new");
        assert_eq!(
            reused.index, fired.index,
            "the test needs the slot to be reused"
        );
        assert_eq!(wheel.cancel(fired), None);
        assert_eq!(wheel.cancel(cancelled), None);
        assert_eq!(wheel.deadline(fired), None);
        assert_eq!(wheel.deadline(reused), Some(10));
        assert_eq!(wheel.poll(10), [(reused, "new")]);
    }

    #[test]
    fn rearming_a_debounce_many_times_fires_once_after_the_quiet_period() {
        const DELAY: u64 = 25;
        let mut wheel = TimerWheel::new(1_000);
        let mut timer = wheel.insert(1_000 + DELAY, "reload");
        let mut now = 1_000;
        for step in 0..5_000 {
            // Changes arrive every 1..=24 ms, always inside the debounce window.
            now += 1 + step % (DELAY - 1);
            assert!(
                wheel.poll(now).is_empty(),
                "fired during the burst at {now}"
            );
            assert_eq!(wheel.cancel(timer), Some("reload"));
            timer = wheel.insert(now + DELAY, "reload");
            assert_eq!(wheel.next_deadline(), Some(now + DELAY));
        }
        assert_eq!(wheel.len(), 1);
        assert!(wheel.nodes.len() <= 2, "slab grew to {}", wheel.nodes.len());
        assert!(wheel.poll(now + DELAY - 1).is_empty());
        assert_eq!(wheel.poll(now + DELAY), [(timer, "reload")]);
        assert_eq!(wheel.next_deadline(), None);
    }

    #[test]
    fn zero_delay_timer_fires_on_the_next_poll() {
        let mut wheel = TimerWheel::new(40);
        wheel.poll(100);
        wheel.insert(100, "now");
        assert_eq!(wheel.next_deadline(), Some(100));
        assert_eq!(payloads(&wheel.poll(100)), ["now"]);
    }

    #[test]
    fn equal_deadlines_fire_in_insertion_order_across_levels() {
        const DEADLINE: u64 = 300_000;
        let mut wheel = TimerWheel::new(0);
        let mut expected = Vec::new();
        let mut label = 0;
        // Insert at times that put the same deadline at levels 3, 2, 1 and 0 in turn.
        for now in [0, 1, 250_000, 299_000, 299_990, 299_999] {
            assert!(wheel.poll(now).is_empty());
            for _ in 0..3 {
                wheel.insert(DEADLINE, label);
                expected.push(label);
                label += 1;
            }
            wheel.insert(DEADLINE + 1, 1_000 + label);
        }
        wheel.assert_invariants();
        let fired = payloads(&wheel.poll(DEADLINE));
        assert_eq!(fired, expected);
    }

    #[test]
    fn past_deadlines_fire_on_the_next_poll_ordered_by_deadline() {
        let mut wheel = TimerWheel::new(0);
        wheel.poll(100);
        wheel.insert(101, "future");
        wheel.insert(50, "fifty-a");
        wheel.insert(40, "forty");
        wheel.insert(100, "hundred");
        wheel.insert(50, "fifty-b");
        assert_eq!(wheel.next_deadline(), Some(40));
        // Even a poll "in the past" fires them: the wheel's time does not go back.
        assert_eq!(
            payloads(&wheel.poll(60)),
            ["forty", "fifty-a", "fifty-b", "hundred"]
        );
        assert_eq!(wheel.now_ms(), 100);
        assert_eq!(payloads(&wheel.poll(101)), ["future"]);
    }

    #[test]
    fn far_future_timers_fire_exactly_at_their_deadline() {
        const DAY_MS: u64 = 24 * 60 * 60 * 1_000;
        let start = 123_456_789;
        let deadlines = [
            start + 3 * DAY_MS + 17,
            start + 700 * DAY_MS,
            (1 << 36) + 5,
            (1 << 60) - 1,
            1 << 63,
            u64::MAX - 1,
            u64::MAX,
        ];
        let mut wheel = TimerWheel::new(start);
        for &deadline in deadlines.iter().rev() {
            wheel.insert(deadline, deadline);
        }
        for &deadline in &deadlines {
            assert_eq!(wheel.next_deadline(), Some(deadline));
            assert!(
                wheel.poll(deadline - 1).is_empty(),
                "{deadline} fired early"
            );
            wheel.assert_invariants();
            assert_eq!(payloads(&wheel.poll(deadline)), [deadline]);
            wheel.assert_invariants();
        }
        assert!(wheel.is_empty());
    }

    #[test]
    fn next_deadline_is_exact_at_every_level() {
        let mut wheel = TimerWheel::new(0);
        let deadlines = [7_777_777_777u64, 300_001, 4_099, 65];
        let ids: Vec<_> = deadlines.iter().map(|&d| wheel.insert(d, d)).collect();
        assert_eq!(wheel.next_deadline(), Some(65));
        wheel.cancel(ids[3]);
        assert_eq!(wheel.next_deadline(), Some(4_099));
        wheel.cancel(ids[2]);
        assert_eq!(wheel.next_deadline(), Some(300_001));
        // A later deadline in the same coarse slot must not hide behind the slot's start.
        wheel.insert(300_050, 0);
        wheel.insert(300_000 + 4_000, 0);
        assert_eq!(wheel.next_deadline(), Some(300_001));
        wheel.cancel(ids[1]);
        assert_eq!(wheel.next_deadline(), Some(300_050));
        wheel.poll(300_049);
        assert_eq!(wheel.next_deadline(), Some(300_050));
        wheel.poll(300_050);
        assert_eq!(wheel.next_deadline(), Some(304_000));
        wheel.poll(304_000);
        assert_eq!(wheel.next_deadline(), Some(7_777_777_777));
        wheel.assert_invariants();
    }

    #[test]
    fn level_and_slot_follow_the_highest_differing_digit() {
        assert_eq!(level_for(0, 1), 0);
        assert_eq!(level_for(0, 63), 0);
        assert_eq!(level_for(0, 64), 1);
        assert_eq!(level_for(63, 64), 1);
        assert_eq!(level_for(64, 127), 0);
        assert_eq!(level_for(0, 4_095), 1);
        assert_eq!(level_for(0, 4_096), 2);
        assert_eq!(level_for(0, u64::MAX), LEVELS - 1);
        assert_eq!(slot_for(4_096 + 64 * 5 + 3, 0), 3);
        assert_eq!(slot_for(4_096 + 64 * 5 + 3, 1), 5);
        assert_eq!(slot_for(4_096 + 64 * 5 + 3, 2), 1);
        assert_eq!(slot_for(u64::MAX, LEVELS - 1), 15);
        assert_eq!(slot_start(4_100, 1, 5), 4_096 + 320);
        assert_eq!(slot_start(u64::MAX, LEVELS - 1, 15), 15 << 60);
        assert_eq!(slot_start(u64::MAX, 0, 63), u64::MAX);
    }

    #[test]
    fn boundary_sweep_fires_each_deadline_exactly_on_time() {
        let values = boundary_values();
        for &start in &values {
            for &deadline in values.iter().filter(|&&deadline| deadline > start) {
                let mut wheel = TimerWheel::new(start);
                let id = wheel.insert(deadline, ());
                assert_eq!(wheel.next_deadline(), Some(deadline));
                assert!(wheel.poll(deadline - 1).is_empty(), "{start} -> {deadline}");
                assert_eq!(
                    wheel.next_deadline(),
                    Some(deadline),
                    "{start} -> {deadline}"
                );
                wheel.assert_invariants();
                assert_eq!(wheel.poll(deadline), [(id, ())], "{start} -> {deadline}");
            }
        }
    }

    #[test]
    fn boundary_sweep_with_all_deadlines_in_one_wheel() {
        let values = boundary_values();
        let mut wheel = TimerWheel::new(0);
        wheel.poll(1);
        for &deadline in values.iter().rev() {
            wheel.insert(deadline, deadline);
        }
        let mut fired = payloads(&wheel.poll(1));
        while let Some(next) = wheel.next_deadline() {
            let batch = payloads(&wheel.poll(next));
            assert_eq!(batch, [next]);
            fired.extend(batch);
            wheel.assert_invariants();
        }
        assert_eq!(fired, values);
    }

    /// Reference model: a `BTreeMap` keyed by (deadline, insertion sequence).
    struct Model {
        now: u64,
        seq: u64,
        timers: BTreeMap<(u64, u64), TimerId>,
        keys: HashMap<TimerId, (u64, u64)>,
    }

    impl Model {
        fn insert(&mut self, deadline: u64, id: TimerId) -> u64 {
            self.seq += 1;
            self.timers.insert((deadline, self.seq), id);
            self.keys.insert(id, (deadline, self.seq));
            self.seq
        }

        fn cancel(&mut self, id: TimerId) -> Option<u64> {
            let key = self.keys.remove(&id)?;
            self.timers.remove(&key);
            Some(key.1)
        }

        fn poll(&mut self, now: u64) -> Vec<(TimerId, u64)> {
            self.now = self.now.max(now);
            let later = match self.now.checked_add(1) {
                Some(after) => self.timers.split_off(&(after, 0)),
                None => BTreeMap::new(),
            };
            let fired = std::mem::replace(&mut self.timers, later);
            for id in fired.values() {
                self.keys.remove(id);
            }
            fired.into_iter().map(|((_, seq), id)| (id, seq)).collect()
        }
    }

    fn random_deadline(rng: &mut SplitMix64, model: &Model) -> u64 {
        let now = model.now;
        match rng.below(10) {
            0 => rng.below(now.saturating_add(1)),
            1 => now,
            2..=4 => now.saturating_add(rng.below(70)),
            5..=7 => now.saturating_add(rng.log_uniform(40)),
            8 => now.saturating_add(rng.below(u64::MAX - now).saturating_add(1)),
            _ => match model
                .timers
                .keys()
                .nth(rng.below(model.timers.len() as u64) as usize)
            {
                Some(&(deadline, _)) => deadline,
                None => now.saturating_add(1),
            },
        }
    }

    fn random_poll_time(rng: &mut SplitMix64, wheel: &TimerWheel<u64>, now: u64) -> u64 {
        match rng.below(5) {
            0 => now.saturating_add(rng.below(8)),
            1 => wheel.next_deadline().unwrap_or(now),
            2 => wheel
                .next_deadline()
                .map_or(now, |next| next.saturating_sub(1)),
            3 => now.saturating_add(rng.log_uniform(36)),
            _ => now.saturating_sub(rng.below(100)),
        }
    }

    fn run_against_model(seed: u64, steps: usize) {
        let mut rng = SplitMix64(seed);
        let start = rng.below(1 << 40);
        let mut wheel = TimerWheel::new(start);
        let mut model = Model {
            now: start,
            seq: 0,
            timers: BTreeMap::new(),
            keys: HashMap::new(),
        };
        let mut stale = Vec::new();
        for step in 0..steps {
            let context = format!("seed {seed} step {step} now {}", model.now);
            match rng.below(20) {
                0..=8 => {
                    let deadline = random_deadline(&mut rng, &model);
                    let id = wheel.insert(deadline, model.seq + 1);
                    model.insert(deadline, id);
                }
                9..=12 => {
                    let live: Vec<_> = model.keys.keys().copied().collect();
                    if let Some(&id) = live.get(rng.below(live.len() as u64) as usize) {
                        assert_eq!(wheel.deadline(id), model.keys.get(&id).map(|k| k.0));
                        assert_eq!(wheel.cancel(id), model.cancel(id), "{context}");
                        stale.push(id);
                    }
                }
                13 => {
                    if let Some(&id) = stale.get(rng.below(stale.len() as u64) as usize) {
                        assert_eq!(wheel.cancel(id), None, "{context}");
                        assert_eq!(wheel.deadline(id), None, "{context}");
                    }
                }
                _ => {
                    let now = random_poll_time(&mut rng, &wheel, model.now);
                    let fired = wheel.poll(now);
                    assert_eq!(fired, model.poll(now), "{context} poll {now}");
                    stale.extend(fired.iter().map(|&(id, _)| id));
                }
            }
            let expected_next = model.timers.keys().next().map(|&(deadline, _)| deadline);
            assert_eq!(wheel.next_deadline(), expected_next, "{context}");
            assert_eq!(wheel.len(), model.timers.len(), "{context}");
            if step % 16 == 0 {
                wheel.assert_invariants();
            }
        }
        let fired = wheel.poll(u64::MAX);
        assert_eq!(fired, model.poll(u64::MAX), "seed {seed} final poll");
        assert!(wheel.is_empty());
        wheel.assert_invariants();
    }

    #[test]
    fn matches_a_btreemap_model_under_random_operations() {
        for seed in 0..24 {
            run_against_model(seed, 2_000);
        }
    }
}
