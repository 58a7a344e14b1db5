//! Micro-benchmarks of the storage engine: the cost of a durable write in each durability mode
//! (alone and with 32 concurrent writers, which `fsync` durability serves by group commit), a
//! verified read, and BLAKE3 hashing. Run with `cargo bench --bench storage`.
//!
//! Data dirs live under cargo's target dir (`CARGO_TARGET_TMPDIR`), i.e. on a real disk even
//! where `/tmp` is a tmpfs, on which an fsync would cost nothing and prove nothing.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kura::storage::{ArtifactKey, Durability, Kind, Store, StoreOptions};

fn open(durability: Durability, dir: &std::path::Path) -> Store {
    Store::open(StoreOptions {
        durability,
        node_id: Some("bench".into()),
        ..StoreOptions::new(dir)
    })
    .expect("open store")
}

async fn put(store: &Store, key: &ArtifactKey, body: &[u8]) {
    store.put_bytes(key, body).await.expect("put");
}

fn writes(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut group = c.benchmark_group("put");
    for durability in [Durability::Process, Durability::Fsync] {
        for size in [4 * 1024, 1024 * 1024] {
            let dir = data_dir();
            let store = runtime.block_on(async { open(durability, dir.path()) });
            let body = vec![7u8; size];
            let mut n = 0u64;
            group.throughput(Throughput::Bytes(size as u64));
            group.bench_with_input(
                BenchmarkId::new(format!("{durability:?}"), size),
                &size,
                |b, _| {
                    b.to_async(&runtime).iter(|| {
                        n += 1;
                        let key = ArtifactKey::new("bench", Kind::Gradle, format!("k{}", n % 1000));
                        let (store, body) = (&store, &body);
                        async move { put(store, &key, body).await }
                    })
                },
            );
        }
    }
    group.finish();
}

/// A data dir on the disk the target dir is on.
fn data_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir")
}

/// Concurrent writers of 4 KiB artifacts (distinct keys): in `fsync` durability RocksDB syncs
/// one log write for every group of writers waiting, so the rate should approach `process`
/// durability's instead of being one device flush per write.
fn concurrent_writes(c: &mut Criterion) {
    const WRITERS: u64 = 32;
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut group = c.benchmark_group("concurrent");
    group.throughput(Throughput::Elements(1));
    for durability in [Durability::Process, Durability::Fsync] {
        let dir = data_dir();
        let store = runtime.block_on(async { open(durability, dir.path()) });
        let body = std::sync::Arc::new(vec![9u8; 4096]);
        let round = std::sync::atomic::AtomicU64::new(0);
        group.bench_function(
            BenchmarkId::new(format!("{WRITERS}_writers_4KiB"), format!("{durability:?}")),
            |b| {
                b.to_async(&runtime).iter_custom(|iters| {
                    let (store, body) = (store.clone(), body.clone());
                    let round = round.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    async move {
                        let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
                        let start = std::time::Instant::now();
                        let tasks: Vec<_> = (0..WRITERS)
                            .map(|_| {
                                let (store, body, next) =
                                    (store.clone(), body.clone(), next.clone());
                                tokio::spawn(async move {
                                    loop {
                                        let n =
                                            next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                        if n >= iters {
                                            break;
                                        }
                                        let key = ArtifactKey::new(
                                            "bench",
                                            Kind::Gradle,
                                            format!("c{round}-{}", n % 5000),
                                        );
                                        put(&store, &key, &body).await;
                                    }
                                })
                            })
                            .collect();
                        for task in tasks {
                            task.await.expect("writer");
                        }
                        start.elapsed()
                    }
                })
            },
        );
    }
    group.finish();
}

fn reads(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = runtime.block_on(async { open(Durability::Process, dir.path()) });
    let mut group = c.benchmark_group("read_verified");
    for size in [4 * 1024, 1024 * 1024] {
        let key = ArtifactKey::new("bench", Kind::Gradle, format!("r{size}"));
        runtime.block_on(put(&store, &key, &vec![3u8; size]));
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, _| {
            b.to_async(&runtime).iter(|| async {
                let artifact = store.read(&key).await.expect("read").expect("present");
                let size = artifact.info.size;
                match artifact.into_body(0, size) {
                    kura::storage::BodyStream::Bytes(bytes) => bytes.len(),
                    kura::storage::BodyStream::Stream(_) => 0,
                }
            })
        });
    }
    group.finish();
}

fn hashing(c: &mut Criterion) {
    let data = vec![5u8; 1 << 20];
    let mut group = c.benchmark_group("hash_1MiB");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("blake3", |b| b.iter(|| blake3::hash(&data)));
    group.bench_function("sha256", |b| {
        use sha2::Digest;
        b.iter(|| sha2::Sha256::digest(&data))
    });
    group.finish();
}

fn ranges(c: &mut Criterion) {
    c.bench_function("range_header", |b| {
        b.iter(|| kura::http::range::answer(Some("bytes=1048576-2097151"), 64 << 20))
    });
}

criterion_group!(benches, writes, concurrent_writes, reads, hashing, ranges);
criterion_main!(benches);
