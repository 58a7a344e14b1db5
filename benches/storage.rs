//! Micro-benchmarks of the storage engine: the cost of a durable write in each durability mode,
//! a verified read, and BLAKE3 hashing. Run with `cargo bench --bench storage`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kura::storage::{ArtifactKey, Durability, Kind, NewArtifact, Store, StoreOptions, WriteMode};

fn open(durability: Durability, dir: &std::path::Path) -> Store {
    Store::open(StoreOptions {
        durability,
        node_id: Some("bench".into()),
        ..StoreOptions::new(dir)
    })
    .expect("open store")
}

async fn put(store: &Store, key: &ArtifactKey, body: &[u8]) {
    let mut writer = store.writer(u64::MAX, false);
    for chunk in body.chunks(64 * 1024) {
        writer.write(chunk).await.expect("write");
    }
    let staged = writer.finish(None).await.expect("finish");
    store
        .commit(key, staged, NewArtifact::default(), WriteMode::Overwrite)
        .await
        .expect("commit");
}

fn writes(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut group = c.benchmark_group("put");
    for durability in [Durability::Process, Durability::Fsync] {
        for size in [4 * 1024, 1024 * 1024] {
            let dir = tempfile::tempdir().expect("tempdir");
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

criterion_group!(benches, writes, reads, hashing, ranges);
criterion_main!(benches);
