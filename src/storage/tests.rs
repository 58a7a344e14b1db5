//! Tests of the store as a whole: concurrency of writers, evictions and cleans.

use std::collections::HashSet;

use super::*;

pub(super) fn store_with(dir: &Path, capacity: u64) -> Store {
    Store::open(StoreOptions {
        capacity,
        low_watermark: capacity / 2,
        ..StoreOptions::for_tests(dir)
    })
    .unwrap()
}

pub(super) async fn put(store: &Store, key: &ArtifactKey, body: &[u8]) -> Committed {
    let mut writer = store.writer(u64::MAX, false);
    writer.write(body).await.unwrap();
    let staged = writer.finish(None).await.unwrap();
    store
        .commit(key, staged, NewArtifact::default(), WriteMode::Overwrite)
        .await
        .unwrap()
}

/// What the column families say, recounted: usage, records, queue entries, file bodies named.
struct Recount {
    usage: Usage,
    access_entries: usize,
    file_bodies: HashSet<u128>,
}

fn recount(store: &Store) -> Recount {
    let mut usage = Usage::default();
    let mut file_bodies = HashSet::new();
    for item in store
        .inner
        .db
        .iterator_cf(store.cf(meta::CF_ARTIFACTS), rocksdb::IteratorMode::Start)
    {
        let (key, value) = item.unwrap();
        let record: ArtifactRecord = meta::decode(&value).unwrap();
        usage.bytes += record.charge(key.len());
        usage.artifacts += 1;
        if let BodyRef::File(id) = record.body {
            file_bodies.insert(id);
        }
    }
    let access_entries = store
        .inner
        .db
        .iterator_cf(store.cf(meta::CF_ACCESS), rocksdb::IteratorMode::Start)
        .count();
    Recount {
        usage,
        access_entries,
        file_bodies,
    }
}

pub(super) fn body_ids_on_disk(dir: &Path) -> HashSet<u128> {
    let mut ids = HashSet::new();
    for shard in std::fs::read_dir(dir.join("bodies")).unwrap() {
        for file in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            let name = file.unwrap().file_name();
            ids.insert(u128::from_str_radix(name.to_str().unwrap(), 16).unwrap());
        }
    }
    ids
}

/// Many writers of overlapping keys, reads, evictions (a small capacity) and cleans, all at
/// once: afterwards the usage mirror, the persisted counter and a recount agree, every record
/// has exactly one queue entry, and the body files are exactly those the records name.
#[test]
fn accounting_stays_exact_under_concurrent_writers_evictions_and_cleans() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .max_blocking_threads(32)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let capacity = 200 * 1024;
    runtime.block_on(async {
        let store = store_with(dir.path(), capacity);
        let mut tasks = Vec::new();
        for writer in 0..16u64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..60u64 {
                    let project = if (writer + i) % 3 == 0 { "a" } else { "b" };
                    let key = ArtifactKey::new(
                        project,
                        Kind::Gradle,
                        format!("k{}", (writer * 7 + i) % 40),
                    );
                    let size = ((writer * 131 + i * 977) % 6000) as usize;
                    let body = vec![(writer + i) as u8; size];
                    match i % 4 {
                        3 => {
                            let _ = store.read(&key).await.unwrap();
                        }
                        _ => match store
                            .commit(
                                &key,
                                {
                                    let mut w = store.writer(u64::MAX, false);
                                    w.write(&body).await.unwrap();
                                    w.finish(None).await.unwrap()
                                },
                                NewArtifact::default(),
                                WriteMode::Overwrite,
                            )
                            .await
                        {
                            Ok(_) | Err(StoreError::InsufficientStorage) => {}
                            Err(other) => panic!("{other}"),
                        },
                    }
                }
            }));
        }
        let cleaner = store.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(std::time::Duration::from_millis(15)).await;
                cleaner.delete_project("a").await.unwrap();
                cleaner.maintain().await.unwrap();
            }
        }));
        for task in tasks {
            task.await.unwrap();
        }
        store.maintain().await.unwrap();
        let counted = recount(&store);
        let stats = store.stats();
        assert_eq!(stats.used_bytes, counted.usage.bytes);
        assert_eq!(stats.artifacts, counted.usage.artifacts);
        assert_eq!(counted.access_entries as u64, counted.usage.artifacts);
        assert!(stats.used_bytes <= capacity, "{stats:?}");
        assert_eq!(body_ids_on_disk(dir.path()), counted.file_bodies);
    });
    drop(runtime);
    let store = store_with(dir.path(), capacity);
    let counted = recount(&store);
    let stats = store.stats();
    assert_eq!(
        (stats.used_bytes, stats.artifacts),
        (counted.usage.bytes, counted.usage.artifacts),
        "the persisted counter (merged deltas) matches after reopening"
    );
}

#[tokio::test]
async fn usage_counter_reads_totals_written_before_merges_existed() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = store_with(dir.path(), 1 << 30);
        // What an older release left: a plain total, no merge operands.
        store
            .inner
            .db
            .put_cf(
                store.cf(meta::CF_STATE),
                meta::USAGE_KEY,
                meta::encode(&Usage {
                    bytes: 1000,
                    artifacts: 3,
                }),
            )
            .unwrap();
    }
    let store = store_with(dir.path(), 1 << 30);
    assert_eq!(store.stats().used_bytes, 1000);
    let committed = put(&store, &ArtifactKey::new("p", Kind::Gradle, "k"), b"abc").await;
    drop(store);
    let store = store_with(dir.path(), 1 << 30);
    let charge = meta::charge(committed.info.size, "p\0gradle\0k".len(), 0);
    assert_eq!(store.stats().used_bytes, 1000 + charge);
    assert_eq!(store.stats().artifacts, 4);
}
