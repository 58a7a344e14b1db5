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
//! failed), so nothing can appear there later.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};

use rocksdb::DB;

use super::{StoreError, cf, meta};

pub(super) struct Sequencer(Mutex<State>);

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
        self.sequencer.lock().in_flight.remove(&self.seq);
    }
}

impl Sequencer {
    /// Resumes after the highest number a committed batch carried.
    pub(super) fn recover(db: &DB) -> Result<Sequencer, StoreError> {
        let last = db
            .get_cf(cf(db, meta::CF_STATE), meta::SEQ_KEY)?
            .and_then(|bytes| meta::decode_seq(&bytes))
            .unwrap_or(0);
        Ok(Sequencer(Mutex::new(State {
            next: last + 1,
            in_flight: BTreeSet::new(),
        })))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Two plain updates under this lock, complete or not started: poison is harmless.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
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
        let state = self.lock();
        match state.in_flight.first() {
            Some(oldest) => oldest - 1,
            None => state.next - 1,
        }
    }
}
