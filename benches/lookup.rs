//! The multi-key existence check (`Store::present`, what `FindMissingBlobs` runs): 10,000 keys,
//! half of them stored, against a store of 1,000,000 artifacts flushed to SST files, access-time
//! notes included. Target: under 10 ms at p50. Run with `cargo bench --bench lookup`.
//!
//! The data set takes about 20 s to build; it is kept under cargo's target dir
//! (`CARGO_TARGET_TMPDIR/lookup-1m`) and reused by later runs. Besides criterion's estimate of
//! the mean, the bench prints p50 and p99 of 200 timed calls.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use kura::storage::{ArtifactKey, Kind, Store, StoreOptions};

#[path = "support/mod.rs"]
mod support;

const STORED: u64 = 1_000_000;
const ASKED: u64 = 10_000;

/// The `n`th key of the data set: a SHA-256-shaped hex name, spread over the key space.
fn key(n: u64) -> ArtifactKey {
    let digest = blake3::hash(&n.to_le_bytes());
    ArtifactKey::new("bench", Kind::CasSha256, hex::encode(digest.as_bytes()))
}

fn open(dir: &Path) -> Store {
    Store::open(StoreOptions {
        node_id: Some("bench".into()),
        block_cache: std::env::var("KURA_BENCH_BLOCK_CACHE_MB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(kura::storage::DEFAULT_BLOCK_CACHE, |mb| mb << 20),
        presence_in_memory: memory_wanted(),
        ..StoreOptions::new(dir)
    })
    .expect("open store")
}

/// Opens the data set, building it first if an earlier run did not finish it.
fn data_set(runtime: &tokio::runtime::Runtime) -> Store {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("lookup-1m");
    let done = dir.join("complete");
    if !done.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        let store = open(&dir);
        let started = Instant::now();
        runtime.block_on(support::fill(&store, STORED, key, |n| {
            n.to_le_bytes().to_vec()
        }));
        store.flush_memtables().expect("flush");
        eprintln!("built {STORED} artifacts in {:?}", started.elapsed());
        drop(store);
        std::fs::write(&done, b"").expect("marker");
    }
    let started = Instant::now();
    let store = open(&dir);
    store.flush_memtables().expect("flush");
    // The presence map of a store this size loads in the background; the bench times the
    // node as it answers once started, not while it loads.
    if memory_wanted() {
        while !store.presence_in_memory() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let stats = store.stats();
        eprintln!(
            "presence map loaded {:?} after open: {} entries in {} MB",
            started.elapsed(),
            stats.presence_map_entries,
            stats.presence_map_bytes >> 20
        );
    }
    store
}

/// `KURA_BENCH_PRESENCE_IN_MEMORY=false` times the RocksDB lookup instead of the presence map.
fn memory_wanted() -> bool {
    std::env::var("KURA_BENCH_PRESENCE_IN_MEMORY").map_or(true, |v| v != "false")
}

/// Half of the keys asked are stored (even n), half are not (n past the data set).
fn asked(round: u64) -> Vec<ArtifactKey> {
    (0..ASKED)
        .map(|i| {
            let n = (round * ASKED + i) % STORED;
            if i % 2 == 0 { key(n) } else { key(STORED + n) }
        })
        .collect()
}

fn present(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let store = data_set(&runtime);
    let rounds = AtomicU64::new(0);
    let check = |keys: Vec<ArtifactKey>| {
        let found = runtime.block_on(store.present(&keys)).expect("present");
        assert_eq!(found.iter().filter(|p| **p).count() as u64, ASKED / 2);
    };
    c.bench_function("present_10k_of_1m", |b| {
        b.iter_batched(
            || asked(rounds.fetch_add(1, Ordering::Relaxed)),
            check,
            criterion::BatchSize::PerIteration,
        )
    });

    let mut times: Vec<Duration> = (0..200)
        .map(|_| {
            let keys = asked(rounds.fetch_add(1, Ordering::Relaxed));
            let start = Instant::now();
            check(keys);
            start.elapsed()
        })
        .collect();
    times.sort();
    eprintln!(
        "present_10k_of_1m: p50 {:?}, p99 {:?} (target: p50 under 10 ms)",
        times[times.len() / 2],
        times[times.len() * 99 / 100]
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = present
}
criterion_main!(benches);
