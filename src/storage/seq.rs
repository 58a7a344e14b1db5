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
//! failed), so nothing can appear there later. Its readers (the replication senders) wait on a
//! `watch` channel instead of polling the log: it moves when [`Sequencer::stable`] passes a
//! publish that writes a log record, and not for those that write none (a peer's versions
//! applied here), which would only wake every sender to read nothing.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};

use rocksdb::DB;
use tokio::sync::watch;

use super::{StoreError, cf, meta};

pub(super) struct Sequencer {
    state: Mutex<State>,
    /// [`Sequencer::stable`] as of the last time it passed a logged publish.
    logged: watch::Sender<u64>,
}

struct State {
    /// The number the next publish takes.
    next: u64,
    /// Numbers taken by publishes that have not finished.
    in_flight: BTreeSet<u64>,
    /// Numbers taken by publishes that write a log record, not yet at or below the stable one.
    logged: BTreeSet<u64>,
}

/// A taken number; the publish is finished when this is dropped.
pub(super) struct Ticket<'a> {
    sequencer: &'a Sequencer,
    pub(super) seq: u64,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let readable = {
            let mut state = self.sequencer.lock();
            state.in_flight.remove(&self.seq);
            let stable = state.stable();
            // Logged publishes this one's end made readable (its own, or later ones that
            // finished first and waited on it). Most ends make none: nothing is split then.
            let passed = state.logged.first().is_some_and(|&first| first <= stable);
            if passed {
                state.logged = state.logged.split_off(&(stable + 1));
            }
            passed.then_some(stable)
        };
        let Some(stable) = readable else {
            return;
        };
        // Two finishing publishes may send out of order: the channel only ever moves forward.
        self.sequencer.logged.send_if_modified(|current| {
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
                logged: BTreeSet::new(),
            }),
            logged: watch::Sender::new(last),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Two plain updates under this lock, complete or not started: poison is harmless.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the next number for a publish that writes a log record under it (`logged`) or
    /// not. The caller holds the lock of the key it publishes.
    pub(super) fn take(&self, logged: bool) -> Ticket<'_> {
        let mut state = self.lock();
        let seq = state.next;
        state.next += 1;
        state.in_flight.insert(seq);
        if logged {
            state.logged.insert(seq);
        }
        Ticket {
            sequencer: self,
            seq,
        }
    }

    /// The highest number at or below which every publish has finished.
    pub(super) fn stable(&self) -> u64 {
        self.lock().stable()
    }

    /// [`Sequencer::stable`], told each time it passes a logged publish.
    pub(super) fn watch_logged(&self) -> watch::Receiver<u64> {
        self.logged.subscribe()
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
    fn readers_are_told_when_a_logged_publish_becomes_readable_whatever_order_they_finish_in() {
        let sequencer = Sequencer::after(10);
        let mut readable = sequencer.watch_logged();
        assert_eq!(*readable.borrow_and_update(), 10);
        let (first, second, third) = (
            sequencer.take(false),
            sequencer.take(true),
            sequencer.take(true),
        );
        drop(second);
        assert!(
            !readable.has_changed().unwrap(),
            "11 is still in flight: a reader woken now would find nothing new"
        );
        drop(first);
        assert!(readable.has_changed().unwrap(), "12 is readable");
        assert_eq!(*readable.borrow_and_update(), 12);
        drop(third);
        assert_eq!(*readable.borrow_and_update(), 13);
        // A publish that logs nothing (a peer's version applied here) wakes no reader.
        drop(sequencer.take(false));
        assert!(!readable.has_changed().unwrap());
        assert_eq!(sequencer.stable(), 14);
    }
}
