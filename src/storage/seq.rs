//! Publish sequence numbers: what the replication log orders its records by.
//!
//! Every publish takes the next number while it holds its key's lock, and writes it in its own
//! batch as a merge operand on the `state` key `seq`, which RocksDB merges by taking the
//! maximum. So however concurrent batches land in the log, the stored value is the highest
//! number any committed batch carried, and a restart continues above it. Numbers are:
//! - strictly increasing per node, across restarts (a restart resumes after the highest
//!   committed one);
//! - assigned in publish order: two publishes of one key get them in the order their batches
//!   replace each other, and a publish that began after another returned gets a higher one;
//! - not dense: a publish that fails after taking its number leaves a gap.
//!
//! Concurrent publishes may commit out of number order, so a reader of the log must not go past
//! [`Sequencer::stable`]: every publish numbered at or below it has finished (committed or
//! failed), so nothing can appear there later. Its readers (the replication senders) wait for it
//! to move on a `watch` channel instead of polling the log.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};

use rocksdb::DB;
use tokio::sync::watch;

use super::{StoreError, cf, meta};

pub(super) struct Sequencer {
    state: Mutex<State>,
    /// [`Sequencer::stable`] as of the last finished publish.
    stable: watch::Sender<u64>,
}

struct State {
    /// The number the next publish takes.
    next: u64,
    /// Numbers taken by publishes that have not finished.
    in_flight: BTreeSet<u64>,
}

/// A taken number; the publish is finished when this is dropped.
pub(super) struct Ticket<'a> {
    sequencer: &'a Sequencer,
    pub(super) seq: u64,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let stable = {
            let mut state = self.sequencer.lock();
            state.in_flight.remove(&self.seq);
            state.stable()
        };
        // Two finishing publishes may send out of order: the channel only ever moves forward.
        self.sequencer.stable.send_if_modified(|current| {
            let moved = stable > *current;
            if moved {
                *current = stable;
            }
            moved
        });
    }
}

impl Sequencer {
    /// Resumes after the highest number a committed batch carried.
    pub(super) fn recover(db: &DB) -> Result<Sequencer, StoreError> {
        let last = db
            .get_cf(cf(db, meta::CF_STATE), meta::SEQ_KEY)?
            .and_then(|bytes| meta::decode_seq(&bytes))
            .unwrap_or(0);
        Ok(Sequencer::after(last))
    }

    fn after(last: u64) -> Sequencer {
        Sequencer {
            state: Mutex::new(State {
                next: last + 1,
                in_flight: BTreeSet::new(),
            }),
            stable: watch::Sender::new(last),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Two plain updates under this lock, complete or not started: poison is harmless.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the next number. The caller holds the lock of the key it publishes.
    pub(super) fn take(&self) -> Ticket<'_> {
        let mut state = self.lock();
        let seq = state.next;
        state.next += 1;
        state.in_flight.insert(seq);
        Ticket {
            sequencer: self,
            seq,
        }
    }

    /// The highest number at or below which every publish has finished.
    pub(super) fn stable(&self) -> u64 {
        self.lock().stable()
    }

    /// [`Sequencer::stable`], told each time it moves.
    pub(super) fn watch_stable(&self) -> watch::Receiver<u64> {
        self.stable.subscribe()
    }
}

impl State {
    fn stable(&self) -> u64 {
        match self.in_flight.first() {
            Some(oldest) => oldest - 1,
            None => self.next - 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watched_stable_number_moves_only_forward_whatever_order_publishes_finish_in() {
        let sequencer = Sequencer::after(10);
        let mut stable = sequencer.watch_stable();
        assert_eq!(*stable.borrow_and_update(), 10);
        let (first, second, third) = (sequencer.take(), sequencer.take(), sequencer.take());
        drop(second);
        assert!(
            !stable.has_changed().unwrap(),
            "11 is still in flight: a reader woken now would find nothing new"
        );
        drop(first);
        assert!(stable.has_changed().unwrap());
        assert_eq!(*stable.borrow_and_update(), 12);
        drop(third);
        assert_eq!(*stable.borrow_and_update(), 13);
        assert_eq!(sequencer.stable(), 13);
    }
}
