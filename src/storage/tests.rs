//! Tests of the store as a whole: concurrency of writers, evictions and cleans.

use std::collections::HashSet;
use std::time::SystemTime;

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
    store.put_bytes(key, body).await.unwrap()
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
    let mut held = 0;
    for item in store
        .inner
        .db
        .iterator_cf(store.cf(meta::CF_ARTIFACTS), rocksdb::IteratorMode::Start)
    {
        let (key, value) = item.unwrap();
        let record: ArtifactRecord = meta::decode(&value).unwrap();
        usage.bytes += record.charge(key.len());
        usage.artifacts += 1;
        let presence = store
            .get(meta::CF_PRESENCE, store.presence_key(&key))
            .unwrap();
        assert_eq!(
            presence.and_then(|bytes| meta::Presence::decode(&bytes)),
            Some(meta::Presence::of(&record)),
            "a record whose presence entry is missing or stale"
        );
        held += u64::from(held_rightly(store, &key, &record));
        if let BodyRef::File(id) = record.body {
            file_bodies.insert(id);
        }
    }
    // Once it answers, the presence map holds every content-addressed record (above) and
    // nothing else.
    if store.inner.presence_map.serving() {
        assert_eq!(
            store.inner.presence_map.len(),
            held,
            "the presence map holds removed artifacts"
        );
    }
    // Every queue entry names an artifact at its last access, and every `atime` entry an artifact.
    let mut access_entries = 0;
    for item in store
        .inner
        .db
        .iterator_cf(store.cf(meta::CF_ACCESS), rocksdb::IteratorMode::Start)
    {
        let (entry, _) = item.unwrap();
        let (time, key) = meta::split_access_key(&entry).unwrap();
        let record = store
            .record(key)
            .unwrap()
            .expect("a queue entry without a record");
        assert_eq!(store.last_access(key, record.accessed_ms).unwrap(), time);
        access_entries += 1;
    }
    for item in store
        .inner
        .db
        .iterator_cf(store.cf(meta::CF_ATIME), rocksdb::IteratorMode::Start)
    {
        let (key, _) = item.unwrap();
        assert!(
            store.record(&key).unwrap().is_some(),
            "an atime without a record"
        );
    }
    // Every record has its entry (above), so as many entries as records means none is stray.
    let entries = store
        .inner
        .db
        .iterator_cf(store.cf(meta::CF_PRESENCE), rocksdb::IteratorMode::Start)
        .count();
    assert_eq!(
        entries as u64, usage.artifacts,
        "presence entries without a record"
    );
    Recount {
        usage,
        access_entries,
        file_bodies,
    }
}

/// Whether the presence map holds `record` under `key`, checking that it holds it rightly; false
/// for a record it does not hold (not serving yet, or not a content-addressed key).
fn held_rightly(store: &Store, key: &[u8], record: &ArtifactRecord) -> bool {
    let map = &store.inner.presence_map;
    if !map.serving() || !presence_map::PresenceMap::holds_shape(key) {
        return false;
    }
    let presence_map::Held::Present(held) = map.get(key) else {
        panic!("the presence map misses a record");
    };
    // The access time may have moved on: the map keeps when an access was last noted.
    let published = meta::Presence::of(record);
    assert_eq!(
        (held.size, held.version_ms),
        (published.size, published.version_ms),
        "the presence map misstates a record"
    );
    assert!(held.accessed_ms >= published.accessed_ms);
    true
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
                    let n = (writer * 7 + i) % 40;
                    // Half of the keys content-addressed, which the presence map holds.
                    let key = if n % 2 == 0 {
                        ArtifactKey::new(project, Kind::Gradle, format!("k{n}"))
                    } else {
                        ArtifactKey::new(project, Kind::CasSha256, digest_of(n))
                    };
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
                                Provenance::local(&store),
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

async fn staged(store: &Store, body: &[u8]) -> StagedBody {
    let mut writer = store.writer(u64::MAX, false);
    writer.write(body).await.unwrap();
    writer.finish(None).await.unwrap()
}

async fn put_as(
    store: &Store,
    key: &ArtifactKey,
    body: &[u8],
    provenance: Provenance,
) -> Result<Committed, StoreError> {
    let staged = staged(store, body).await;
    store
        .commit(
            key,
            staged,
            NewArtifact::default(),
            WriteMode::Overwrite,
            provenance,
        )
        .await
}

/// [`put_as`] of a peer's version (`version_ms`, written by `origin`), which must not fail.
async fn put_remote(
    store: &Store,
    key: &ArtifactKey,
    body: &[u8],
    version_ms: u64,
    origin: &str,
) -> Committed {
    put_as(store, key, body, Provenance::remote(version_ms, origin))
        .await
        .unwrap()
}

async fn body_of(store: &Store, key: &ArtifactKey) -> Option<Vec<u8>> {
    let artifact = store.read(key).await.unwrap()?;
    let size = artifact.info.size;
    match artifact.into_body(0, size) {
        BodyStream::Bytes(bytes) => Some(bytes.to_vec()),
        BodyStream::Stream(_) => panic!("test bodies are small"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequence_numbers_strictly_increase_across_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let mut seen = Vec::new();
    for round in 0..3 {
        let store = store_with(dir.path(), 1 << 30);
        let mut logged = store.watch_log();
        assert_eq!(*logged.borrow_and_update(), store.stable_seq());
        let tasks: Vec<_> = (0..24)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    // Some bodies inline, some in files; several writers per key.
                    let key = ArtifactKey::new("p", Kind::Gradle, format!("k{}", i % 5));
                    put(&store, &key, &vec![i as u8; 600 * (i % 4)]).await
                })
            })
            .collect();
        let mut numbers = Vec::new();
        for task in tasks {
            numbers.push(task.await.unwrap().seq().unwrap());
        }
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(
            numbers.len(),
            24,
            "round {round}: every publish has its own number"
        );
        assert_eq!(store.stable_seq(), *numbers.last().unwrap());
        assert!(
            !logged.has_changed().unwrap(),
            "round {round}: a store without peers logs nothing, and wakes no reader"
        );
        if let Some(before) = seen.last() {
            assert!(
                numbers[0] > *before,
                "round {round}: {numbers:?} after {before}"
            );
        }
        seen.extend(numbers);
    }
    // A failed publish takes no number that a later one could see again.
    let store = store_with(dir.path(), 1 << 30);
    let key = ArtifactKey::new("p", Kind::Nx, "once");
    let first = store
        .commit(
            &key,
            staged(&store, b"a").await,
            NewArtifact::default(),
            WriteMode::WriteOnce,
            Provenance::local(&store),
        )
        .await
        .unwrap();
    assert!(first.seq().unwrap() > *seen.last().unwrap());
}

#[test]
fn the_stored_sequence_number_is_the_highest_whatever_the_order_of_batches() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = store_with(dir.path(), 1 << 30);
        // Batches of concurrent publishes may reach the log in any order.
        for seq in [5u64, 9, 7] {
            let mut batch = WriteBatch::default();
            batch.merge_cf(
                store.cf(meta::CF_STATE),
                meta::SEQ_KEY,
                meta::encode_seq(seq),
            );
            store.write(batch).unwrap();
        }
    }
    let store = store_with(dir.path(), 1 << 30);
    assert_eq!(store.stable_seq(), 9);
}

#[tokio::test]
async fn last_writer_wins_for_remote_versions_in_both_directions() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(dir.path(), 1 << 30);
    let key = ArtifactKey::new("p", Kind::Gradle, "k");
    let first = put_remote(&store, &key, b"v1000", 1000, "peer-b").await;
    assert!(first.created && first.seq().is_some());

    // Older, and equal with a smaller origin: ignored, not errors; the stored version stays.
    for (version, origin) in [(999, "peer-z"), (1000, "peer-a"), (1000, "peer-b")] {
        let late = put_remote(&store, &key, b"old", version, origin).await;
        assert_eq!(late.outcome, Outcome::Stale, "{version} {origin}");
        assert!(!late.created);
        assert_eq!(body_of(&store, &key).await.unwrap(), b"v1000");
    }
    // Newer by origin at the same instant, then newer by time: applied.
    let tie = put_remote(&store, &key, b"tie", 1000, "peer-c").await;
    assert!(tie.seq().is_some() && !tie.created);
    assert_eq!(body_of(&store, &key).await.unwrap(), b"tie");
    put_remote(&store, &key, b"v2000", 2000, "peer-a").await;
    assert_eq!(store.head(&key).unwrap().unwrap().version_ms, 2000);

    // A local write always replaces, and is stamped past what it replaced, so peers take it
    // even when the remote version came from a clock ahead of ours.
    let future = now_ms() + 60_000;
    put_remote(&store, &key, b"ahead", future, "peer-a").await;
    let local = put(&store, &key, b"local").await;
    assert_eq!(local.info.version_ms, future + 1);
    assert_eq!(body_of(&store, &key).await.unwrap(), b"local");
    let echo = put_remote(&store, &key, b"ahead", future, "peer-a").await;
    assert_eq!(echo.outcome, Outcome::Stale);
}

#[tokio::test]
async fn a_stale_remote_version_leaves_no_body_behind() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(dir.path(), 1 << 30);
    let key = ArtifactKey::new("p", Kind::Gradle, "big");
    let big = vec![1u8; 5000];
    put_remote(&store, &key, &big, 2000, "peer").await;
    let before = body_ids_on_disk(dir.path());
    assert_eq!(before.len(), 1);
    let stale = put_remote(&store, &key, &[2u8; 5000], 1000, "peer").await;
    assert_eq!(stale.outcome, Outcome::Stale);
    assert_eq!(body_ids_on_disk(dir.path()), before);
    assert_eq!(store.stats().artifacts, 1);
}

#[tokio::test]
async fn a_clean_refuses_remote_versions_from_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(dir.path(), 1 << 30);
    let key = ArtifactKey::new("ios", Kind::Gradle, "k");
    let before = now_ms();
    put_remote(&store, &key, b"old", before - 10, "peer").await;
    store.delete_project("ios").await.unwrap();
    assert!(store.head(&key).unwrap().is_none());
    let cleaned_at = store.inner.tombstones.of("ios").unwrap();

    for version in [before - 5, cleaned_at] {
        let late = put_remote(&store, &key, b"late", version, "peer").await;
        assert_eq!(late.outcome, Outcome::Tombstoned, "version {version}");
        assert!(store.head(&key).unwrap().is_none());
    }
    assert_eq!(store.stats().artifacts, 0);
    let newer = put_remote(&store, &key, b"new", cleaned_at + 1, "peer").await;
    assert!(newer.created && newer.seq().is_some());
    assert_eq!(body_of(&store, &key).await.unwrap(), b"new");
    // Another project is not affected.
    let other = ArtifactKey::new("android", Kind::Gradle, "k");
    let applied = put_remote(&store, &other, b"x", 1, "peer").await;
    assert!(applied.seq().is_some());
}

fn extra_records(store: &Store) -> Vec<(Vec<u8>, Vec<u8>)> {
    store
        .inner
        .db
        .iterator_cf(store.cf(meta::CF_EXTRA), rocksdb::IteratorMode::Start)
        .map(|item| {
            let (k, v) = item.unwrap();
            (k.to_vec(), v.to_vec())
        })
        .collect()
}

fn recording_hook() -> BatchHook {
    Box::new(|publication: &Publication<'_>, extra: &mut ExtraRecords| {
        let value = format!(
            "{}@{}:{}",
            publication.key, publication.info.version_ms, publication.origin
        );
        extra.put(Family::Extra, publication.seq.to_be_bytes(), value);
    })
}

#[tokio::test]
async fn a_hooks_records_commit_if_and_only_if_the_artifact_does() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(dir.path(), 1 << 30);
    let key = ArtifactKey::new("p", Kind::Nx, "k");
    let commit = |body: &'static [u8], mode, provenance| {
        let store = store.clone();
        let key = key.clone();
        async move {
            let staged = staged(&store, body).await;
            store
                .commit_with(
                    &key,
                    staged,
                    NewArtifact::default(),
                    mode,
                    provenance,
                    recording_hook(),
                )
                .await
        }
    };
    let committed = commit(b"one", WriteMode::WriteOnce, Provenance::local(&store))
        .await
        .unwrap();
    let seq = committed.seq().unwrap();
    let expected = format!("p/nx/k@{}:test", committed.info.version_ms);
    assert_eq!(
        extra_records(&store),
        vec![(seq.to_be_bytes().to_vec(), expected.into_bytes())]
    );
    // Refused (write-once) and stale writes add nothing.
    assert!(matches!(
        commit(b"two", WriteMode::WriteOnce, Provenance::local(&store)).await,
        Err(StoreError::AlreadyExists)
    ));
    let stale = commit(
        b"three",
        WriteMode::Overwrite,
        Provenance::remote(1, "peer"),
    )
    .await
    .unwrap();
    assert_eq!(stale.outcome, Outcome::Stale);
    assert_eq!(extra_records(&store).len(), 1);
    // A publish refused on its way to the batch (the disk is full) commits neither.
    drop(store);
    let store = Store::open(StoreOptions {
        min_free: u64::MAX,
        ..StoreOptions::for_tests(dir.path())
    })
    .unwrap();
    let other = ArtifactKey::new("p", Kind::Gradle, "other");
    let refused = store
        .commit_with(
            &other,
            staged(&store, b"x").await,
            NewArtifact::default(),
            WriteMode::Overwrite,
            Provenance::local(&store),
            recording_hook(),
        )
        .await;
    assert!(matches!(refused, Err(StoreError::DiskFull { .. })));
    assert!(store.head(&other).unwrap().is_none());
    assert_eq!(extra_records(&store).len(), 1);
    assert_eq!(body_of(&store, &key).await.unwrap(), b"one");
}

/// Sets a file's mtime `age` in the past.
fn age_file(path: &Path, age: std::time::Duration) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.set_modified(SystemTime::now() - age).unwrap();
}

const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);
const GRACE: std::time::Duration = std::time::Duration::from_secs(600);

#[tokio::test]
async fn the_sweep_removes_orphans_past_the_grace_period_and_keeps_referenced_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(dir.path(), 1 << 30);
    let mut kept = Vec::new();
    for i in 0..5u8 {
        let key = ArtifactKey::new("p", Kind::Gradle, format!("k{i}"));
        put(&store, &key, &vec![i; 3000]).await;
        kept.push(key);
    }
    // Overwritten and evicted-by-clean bodies leave the index with their records.
    put(&store, &kept[0], &[9; 4000]).await;
    let referenced = body_ids_on_disk(dir.path());
    assert_eq!(referenced.len(), 5);
    for id in &referenced {
        age_file(&bodies::body_path(&dir.path().join("bodies"), *id), HOUR);
    }
    // What a crash leaves: a body renamed into place whose batch never ran, a temp file, a
    // part being written; and an orphan too young to be touched yet.
    let orphan = bodies::body_path(&dir.path().join("bodies"), 0xabc);
    std::fs::write(&orphan, b"orphan").unwrap();
    age_file(&orphan, HOUR);
    let young = bodies::body_path(&dir.path().join("bodies"), 0xdef);
    std::fs::write(&young, b"young").unwrap();
    let temp = dir.path().join("tmp").join(format!("{:032x}.body", 7));
    std::fs::write(&temp, b"temp").unwrap();
    age_file(&temp, HOUR);
    let limits = UploadLimits {
        max_in_flight: 4,
        max_parts: 10,
        max_bytes: 1 << 20,
    };
    let upload = store
        .start_upload(&ArtifactKey::new("p", Kind::Module, "m"), &limits)
        .unwrap();
    let partial = dir.path().join("uploads").join(&upload).join("1.partial");
    std::fs::write(&partial, b"half").unwrap();
    age_file(&partial, HOUR);

    let report = store.sweep_orphans(GRACE).unwrap();
    assert_eq!(
        report,
        SweepReport {
            bodies: 1,
            temps: 1,
            uploads: 1
        }
    );
    assert!(!orphan.exists() && !temp.exists() && !partial.exists());
    assert!(young.exists(), "younger than the grace period");
    let mut expected = referenced.clone();
    expected.insert(0xdef);
    assert_eq!(body_ids_on_disk(dir.path()), expected);
    for key in &kept {
        assert!(store.read(key).await.unwrap().is_some(), "{key}");
    }
    assert_eq!(store.sweep_orphans(GRACE).unwrap().total(), 0);
    assert_eq!(store.uploads_in_flight(), 1, "the upload itself stays");
}

#[tokio::test]
async fn a_data_dir_from_before_the_index_is_backfilled_before_anything_is_swept() {
    let dir = tempfile::tempdir().unwrap();
    let key = ArtifactKey::new("p", Kind::Gradle, "k");
    {
        let store = store_with(dir.path(), 1 << 30);
        put(&store, &key, &[1; 5000]).await;
        // What an older release left: no index, no flag.
        let db = &store.inner.db;
        let ids: Vec<_> = db
            .iterator_cf(store.cf(meta::CF_BODIES), rocksdb::IteratorMode::Start)
            .map(|item| item.unwrap().0)
            .collect();
        assert_eq!(ids.len(), 1);
        for id in ids {
            db.delete_cf(store.cf(meta::CF_BODIES), id).unwrap();
        }
    }
    let store = store_with(dir.path(), 1 << 30);
    for id in body_ids_on_disk(dir.path()) {
        age_file(&bodies::body_path(&dir.path().join("bodies"), id), HOUR);
    }
    assert_eq!(
        store
            .sweep_orphans(std::time::Duration::ZERO)
            .unwrap()
            .total(),
        0
    );
    assert_eq!(body_of(&store, &key).await.unwrap(), vec![1; 5000]);
}

/// A runtime whose four workers interleave tasks even on a machine of two cores.
fn four_workers() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

/// Sweeps with no grace period at all, over and over, while writers publish and overwrite file
/// bodies: no body of a write in flight is ever taken, and nothing is left over.
#[test]
fn sweeps_never_race_publishes_in_flight() {
    let runtime = four_workers();
    let dir = tempfile::tempdir().unwrap();
    runtime.block_on(async {
        let store = store_with(dir.path(), 1 << 30);
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sweeper = {
            let (store, done) = (store.clone(), done.clone());
            tokio::task::spawn_blocking(move || {
                let mut removed = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    removed += store
                        .sweep_orphans(std::time::Duration::ZERO)
                        .unwrap()
                        .total();
                }
                removed
            })
        };
        let writers: Vec<_> = (0..8u8)
            .map(|w| {
                let store = store.clone();
                tokio::spawn(async move {
                    for i in 0..40u8 {
                        let key = ArtifactKey::new("p", Kind::Gradle, format!("k{}", i % 10));
                        let body = vec![w ^ i; 2000 + 37 * i as usize];
                        put(&store, &key, &body).await;
                        // What we just wrote (or a newer write) is whole.
                        assert!(body_of_any(&store, &key).await);
                    }
                })
            })
            .collect();
        let mut results = Vec::new();
        for writer in writers {
            results.push(writer.await);
        }
        // Stop the sweeper before asserting, so a failure fails rather than hangs the test.
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let removed = sweeper.await.unwrap();
        for result in results {
            result.unwrap();
        }
        assert_eq!(removed, 0, "nothing was an orphan");
        let counted = recount(&store);
        assert_eq!(counted.usage.artifacts, 10);
        assert_eq!(body_ids_on_disk(dir.path()), counted.file_bodies);
    });
}

/// Whether `key` reads back whole (any version).
async fn body_of_any(store: &Store, key: &ArtifactKey) -> bool {
    let Some(artifact) = store.read(key).await.unwrap() else {
        return false;
    };
    let size = artifact.info.size;
    match artifact.into_body(0, size) {
        BodyStream::Bytes(bytes) => bytes.len() as u64 == size,
        BodyStream::Stream(_) => true,
    }
}

fn raw_record(store: &Store, key: &ArtifactKey) -> Option<Vec<u8>> {
    store
        .inner
        .db
        .get_cf(store.cf(meta::CF_ARTIFACTS), key.encode())
        .unwrap()
}

/// A store that evicts only what a write needs, so a test can tell which artifact went first.
fn evicting_one_at_a_time(dir: &Path, capacity: u64) -> Store {
    Store::open(StoreOptions {
        capacity,
        low_watermark: capacity,
        ..StoreOptions::for_tests(dir)
    })
    .unwrap()
}

/// A SHA-256-shaped key (64 lowercase hex digits) named by `n`.
fn digest_of(n: u64) -> String {
    hex::encode(blake3::hash(&n.to_le_bytes()).as_bytes())
}

fn gradle(name: &str) -> ArtifactKey {
    ArtifactKey::new("p", Kind::Gradle, name.to_string())
}

/// A read moves the artifact to the young end of the eviction queue through the `atime` family,
/// leaving its record (and inline body) as written.
#[tokio::test]
async fn a_read_moves_the_access_time_without_rewriting_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let body = vec![1u8; 600];
    let charge = meta::charge(600, gradle("a").encode().len(), 0);
    let store = evicting_one_at_a_time(dir.path(), 3 * charge);
    let (old, young) = (gradle("a"), gradle("b"));
    put(&store, &old, &body).await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    put(&store, &young, &body).await;
    let written = raw_record(&store, &old);
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;

    assert!(store.read(&old).await.unwrap().is_some());
    store.maintain().await.unwrap();
    assert_eq!(
        raw_record(&store, &old),
        written,
        "the record was rewritten"
    );
    put(&store, &gradle("c"), &body).await;
    put(&store, &gradle("d"), &body).await;

    assert!(
        raw_record(&store, &old).is_some(),
        "the artifact read last was evicted"
    );
    assert!(
        raw_record(&store, &young).is_none(),
        "the one not read stayed"
    );
    let counted = recount(&store);
    assert_eq!(counted.access_entries as u64, counted.usage.artifacts);
}

/// A file body's first read checks its BLAKE3 and teaches the store the body's checksum, which
/// later reads check instead (`checksums.rs`); when the file goes, the store forgets it.
#[tokio::test]
async fn a_file_body_read_once_is_checked_by_its_checksum_until_its_file_goes() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(dir.path(), 1 << 30);
    let key = gradle("file");
    let body = vec![3u8; 100_000];
    put(&store, &key, &body).await;
    let record = store.record(&key.encode()).unwrap().unwrap();
    let BodyRef::File(id) = record.body else {
        panic!("a body over inline_max is a file");
    };
    let expected = || store.inner.checksums.expected(id, &record.blake3);
    assert_eq!(expected(), checksums::Expected::Blake3(record.blake3));
    assert_eq!(body_of(&store, &key).await, Some(body.clone()));
    assert!(matches!(expected(), checksums::Expected::Xxh3(_)));
    assert_eq!(body_of(&store, &key).await, Some(body));

    put(&store, &key, &[4u8; 100_000]).await;
    assert_eq!(
        expected(),
        checksums::Expected::Blake3(record.blake3),
        "forgotten with the overwritten file"
    );
}

/// What replication reads (`peek`) is no access: an artifact only peers read is evicted first.
#[tokio::test]
async fn replication_reads_do_not_keep_an_artifact_from_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let body = vec![1u8; 600];
    let charge = meta::charge(600, gradle("a").encode().len(), 0);
    let store = evicting_one_at_a_time(dir.path(), 3 * charge);
    let (peeked, read) = (gradle("a"), gradle("b"));
    put(&store, &peeked, &body).await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    put(&store, &read, &body).await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;

    // The client's read comes first: were the peek an access, it would be the younger one.
    assert!(store.read(&read).await.unwrap().is_some());
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let found = store.peek(&peeked).unwrap().unwrap();
    assert!(store.open_found(&peeked, found).await.unwrap().is_some());
    put(&store, &gradle("c"), &body).await;
    put(&store, &gradle("d"), &body).await;

    assert!(
        raw_record(&store, &peeked).is_none(),
        "an artifact only replication read outlived one a client read"
    );
    assert!(raw_record(&store, &read).is_some());
}

/// Accesses within `access_time_resolution` of the last one are not written.
#[tokio::test]
async fn access_times_move_at_most_once_per_resolution() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_noting_per(dir.path(), std::time::Duration::from_secs(3600));
    let key = gradle("hot");
    put(&store, &key, b"x").await;
    for _ in 0..100 {
        assert!(store.read(&key).await.unwrap().is_some());
    }
    store.maintain().await.unwrap();
    let atime = store
        .inner
        .db
        .get_cf(store.cf(meta::CF_ATIME), key.encode())
        .unwrap();
    assert_eq!(atime, None, "an access within the resolution was written");
}

/// A store whose access times move at most once per `resolution`.
fn store_noting_per(dir: &Path, resolution: std::time::Duration) -> Store {
    Store::open(StoreOptions {
        access_time_resolution: resolution,
        ..StoreOptions::for_tests(dir)
    })
    .unwrap()
}

/// The access time written for `key` since its publish, if any.
fn noted_access(store: &Store, key: &ArtifactKey) -> Option<u64> {
    written_access(store, &key.encode())
}

/// [`noted_access`] of an encoded key.
fn written_access(store: &Store, encoded: &[u8]) -> Option<u64> {
    store
        .inner
        .db
        .get_cf(store.cf(meta::CF_ATIME), encoded)
        .unwrap()
        .and_then(|bytes| meta::decode_time(&bytes))
}

/// A blob that existence checks find again and again is queued for an access-time write once
/// per resolution, not by every check, and its access time still moves once a resolution has
/// passed.
#[tokio::test]
async fn a_blob_checked_again_and_again_is_noted_once_per_resolution() {
    let dir = tempfile::tempdir().unwrap();
    let resolution = std::time::Duration::from_secs(1);
    let store = store_noting_per(dir.path(), resolution);
    assert!(store.presence_in_memory());
    let blob = ArtifactKey::new("p", Kind::CasSha256, digest_of(1));
    put(&store, &blob, b"x").await;
    let atime = || noted_access(&store, &blob);
    tokio::time::sleep(resolution).await;
    let noted_at = std::time::Instant::now();
    assert_eq!(
        store.present(std::slice::from_ref(&blob)).await.unwrap(),
        vec![true]
    );
    assert!(
        !store.inner.touches.is_empty(),
        "a resolution after the publish: noted"
    );
    store.maintain().await.unwrap();
    let first = atime().expect("the access time moved");
    for _ in 0..20 {
        assert_eq!(
            store.present(std::slice::from_ref(&blob)).await.unwrap(),
            vec![true]
        );
    }
    // Only while the resolution lasts (a stalled machine may take longer than it; the map's
    // own test covers the rule without a clock).
    if noted_at.elapsed() < resolution {
        assert!(
            store.inner.touches.is_empty(),
            "noted again within the resolution"
        );
    }
    tokio::time::sleep(resolution).await;
    assert_eq!(
        store.present(std::slice::from_ref(&blob)).await.unwrap(),
        vec![true]
    );
    store.maintain().await.unwrap();
    assert!(atime().expect("still there") >= first + resolution.as_millis() as u64);
}

/// A hot small artifact read again and again is queued for an access-time write once per
/// resolution, not after every flush (each of which read its access time back from RocksDB only
/// to find it recent), and its access time still moves once a resolution has passed.
#[tokio::test]
async fn a_hot_artifact_is_noted_once_per_resolution_and_its_access_time_still_moves() {
    let dir = tempfile::tempdir().unwrap();
    // Long enough that a flush and 50 reads fit well inside it on a loaded machine.
    let resolution = std::time::Duration::from_secs(1);
    let store = store_noting_per(dir.path(), resolution);
    let key = gradle("hot");
    let atime = |store: &Store| noted_access(store, &key);
    put(&store, &key, b"x").await;
    tokio::time::sleep(resolution + resolution / 2).await;
    // The first reads (from RocksDB, then from memory) note the access; the flush writes it.
    for _ in 0..2 {
        assert!(store.read(&key).await.unwrap().is_some());
    }
    store.maintain().await.unwrap();
    let first = atime(&store).expect("the first access past the resolution was written");
    for _ in 0..50 {
        assert!(store.read(&key).await.unwrap().is_some());
    }
    assert!(
        store.inner.touches.is_empty(),
        "reads of a hot artifact within the resolution of its last note were queued"
    );
    tokio::time::sleep(resolution + resolution / 2).await;
    assert!(store.read(&key).await.unwrap().is_some());
    store.maintain().await.unwrap();
    let second = atime(&store).expect("access time");
    assert!(
        second >= first + resolution.as_millis() as u64,
        "the access time did not move: {first} then {second}"
    );
}

/// A clean cut short after its tombstone (a crash, an I/O error) hides the project's older
/// records at once, and the next start deletes them: their bodies and usage do not linger until
/// eviction happens to reach them.
#[tokio::test]
async fn a_clean_cut_short_is_finished_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(StoreOptions::for_tests(dir.path())).unwrap();
    let cleaned = |n: usize| ArtifactKey::new("gone", Kind::Gradle, format!("k{n}"));
    for n in 0..3 {
        put(&store, &cleaned(n), &vec![7u8; 100_000]).await;
    }
    put(&store, &gradle("kept"), b"kept").await;
    // Only the tombstone is written: the process stops before any deletion batch.
    let at = store.write_tombstone("gone", None).unwrap();
    assert!(store.head(&cleaned(0)).unwrap().is_none(), "hidden at once");
    drop(store);

    let store = Store::open(StoreOptions::for_tests(dir.path())).unwrap();
    assert!(raw_record(&store, &cleaned(0)).is_some(), "still on disk");
    assert_eq!(store.finish_unfinished_cleans().await.unwrap(), 3);
    for n in 0..3 {
        assert!(raw_record(&store, &cleaned(n)).is_none());
    }
    assert_eq!(store.stats().artifacts, 1);
    assert_eq!(recount(&store).usage, store.accounting().usage);
    assert_eq!(
        store.inner.tombstones.of("gone"),
        Some(at),
        "the tombstone stays"
    );
    // Finished: nothing left for the start after.
    assert_eq!(store.finish_unfinished_cleans().await.unwrap(), 0);
}

/// The multi-key lookup answers in order, hides cleaned projects, and refreshes what it finds.
#[tokio::test]
async fn present_answers_in_order_and_refreshes_what_it_finds() {
    let dir = tempfile::tempdir().unwrap();
    let body = vec![2u8; 600];
    let charge = meta::charge(600, gradle("k0").encode().len(), 0);
    let store = evicting_one_at_a_time(dir.path(), 4 * charge);
    for name in ["k0", "k1", "k2"] {
        put(&store, &gradle(name), &body).await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let other = ArtifactKey::new("gone", Kind::Gradle, "k0".to_string());
    put(&store, &other, b"y").await;
    // Answered by the presence map rather than RocksDB: hidden by the clean all the same.
    let other_blob = ArtifactKey::new("gone", Kind::CasSha256, digest_of(0));
    put(&store, &other_blob, b"z").await;
    store.delete_project("gone").await.unwrap();
    let asked = vec![
        gradle("k0"),
        gradle("missing"),
        gradle("k2"),
        other,
        other_blob,
    ];
    assert_eq!(
        store.present(&asked).await.unwrap(),
        vec![true, false, true, false, false]
    );

    store.maintain().await.unwrap();
    put(&store, &gradle("k3"), &body).await;
    put(&store, &gradle("k4"), &body).await;
    assert!(
        raw_record(&store, &gradle("k0")).is_some(),
        "k0 was vouched for"
    );
    assert!(
        raw_record(&store, &gradle("k1")).is_none(),
        "k1 was the oldest unvouched"
    );
}

/// Deletes every `presence` entry, as if the family had never been written.
fn forget_presence(store: &Store) {
    let keys: Vec<_> = store
        .inner
        .db
        .iterator_cf(store.cf(meta::CF_PRESENCE), rocksdb::IteratorMode::Start)
        .map(|item| item.unwrap().0)
        .collect();
    for key in keys {
        store
            .inner
            .db
            .delete_cf(store.cf(meta::CF_PRESENCE), key)
            .unwrap();
    }
}

/// What an older release left: records, but no presence entries and no flag.
fn as_before_the_presence_family(store: &Store) {
    forget_presence(store);
    store
        .inner
        .db
        .delete_cf(store.cf(meta::CF_STATE), meta::PRESENCE_INDEXED_KEY)
        .unwrap();
}

/// A data dir written before the `presence` family existed: existence checks read the records
/// until the backfill has written every entry, then the family, and both give the same answers.
#[tokio::test]
async fn a_data_dir_from_before_the_presence_family_answers_the_same_before_and_after_backfill() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(dir.path(), 1 << 30);
    let blob = ArtifactKey::new("p", Kind::CasSha256, hex::encode([7u8; 32]));
    let (small, large) = (gradle("small"), gradle("large"));
    put(&store, &small, b"tiny").await;
    put(&store, &large, &vec![5u8; 5000]).await;
    put(&store, &blob, b"blob").await;
    as_before_the_presence_family(&store);
    drop(store);

    let store = store_with(dir.path(), 1 << 30);
    let missing = ArtifactKey::new("p", Kind::CasSha256, hex::encode([8u8; 32]));
    let asked = || {
        [&small, &gradle("missing"), &large, &blob, &missing]
            .into_iter()
            .collect::<KeyBatch>()
    };
    let expected = vec![Some(4), None, Some(5000), Some(4), None];
    assert_eq!(store.stored_sizes(asked()).await.unwrap(), expected);
    assert_eq!(store.backfill_presence().unwrap(), 3);
    assert_eq!(store.stored_sizes(asked()).await.unwrap(), expected);
    assert_eq!(recount(&store).usage, store.accounting().usage);
    assert_eq!(store.backfill_presence().unwrap(), 0, "once is enough");
    drop(store);

    // The flag survives a restart, and new writes keep the family complete.
    let store = store_with(dir.path(), 1 << 30);
    assert_eq!(store.backfill_presence().unwrap(), 0);
    put(&store, &gradle("new"), b"later").await;
    assert_eq!(store.present(&[gradle("new")]).await.unwrap(), vec![true]);
    recount(&store);

    // A family lost while its flag stayed (dropped by hand) is noticed at open and rebuilt,
    // instead of calling every blob missing.
    forget_presence(&store);
    drop(store);
    let store = store_with(dir.path(), 1 << 30);
    assert_eq!(store.stored_sizes(asked()).await.unwrap(), expected);
    assert_eq!(store.backfill_presence().unwrap(), 4);
    assert_eq!(store.stored_sizes(asked()).await.unwrap(), expected);
    recount(&store);
}

/// A lookup large enough to be split over the cores answers every key at its own position:
/// the chunks are put back together in order, from both families.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_split_into_chunks_answers_each_key_in_its_place() {
    const KEYS: usize = 3000;
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(dir.path(), 1 << 30);
    let key = |n: usize| {
        if n.is_multiple_of(2) {
            ArtifactKey::new(
                "p",
                Kind::CasSha256,
                hex::encode(blake3::hash(&n.to_le_bytes()).as_bytes()),
            )
        } else {
            gradle(&format!("k{n}"))
        }
    };
    // Every third key is stored, with a size that says which one it is.
    let stored = |n: usize| n.is_multiple_of(3);
    for n in (0..KEYS).filter(|n| stored(*n)) {
        put(&store, &key(n), &vec![7u8; n % 1000 + 1]).await;
    }
    let expected: Vec<_> = (0..KEYS)
        .map(|n| stored(n).then_some((n % 1000 + 1) as u64))
        .collect();
    let asked = || (0..KEYS).map(key).collect::<Vec<_>>();
    let batch = || asked().iter().collect::<KeyBatch>();
    assert_eq!(store.stored_sizes(batch()).await.unwrap(), expected);

    // The same answers from the records, before a backfill.
    as_before_the_presence_family(&store);
    drop(store);
    let store = store_with(dir.path(), 1 << 30);
    assert_eq!(store.stored_sizes(batch()).await.unwrap(), expected);
    let present = store.present(&asked()).await.unwrap();
    assert_eq!(present, (0..KEYS).map(stored).collect::<Vec<_>>());
}

/// A backfill racing writes, overwrites, evictions and cleans leaves exactly one entry per
/// record, each matching its record (checked by `recount`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_racing_writes_evictions_and_cleans_leaves_the_family_exact() {
    const RECORDS: usize = 5000;
    let dir = tempfile::tempdir().unwrap();
    // Room for the first artifacts and little more: the overwrites below evict.
    let capacity = RECORDS as u64 * 270;
    let store = store_with(dir.path(), capacity);
    for n in 0..RECORDS {
        put(&store, &gradle(&format!("k{n}")), &[n as u8; 40]).await;
    }
    as_before_the_presence_family(&store);
    drop(store);
    let store = store_with(dir.path(), capacity);

    let backfill = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.backfill_presence())
    };
    // Writes go on for as long as the backfill runs (and at least 600 rounds).
    let (mut rounds, mut during_backfill) = (0usize, 0usize);
    while rounds < 600 || !backfill.is_finished() {
        put(
            &store,
            &gradle(&format!("k{}", (rounds * 7) % RECORDS)),
            &[1; 900],
        )
        .await;
        put(
            &store,
            &ArtifactKey::new("q", Kind::Gradle, format!("q{rounds}")),
            b"x",
        )
        .await;
        if rounds % 50 == 0 {
            store.delete_project("q").await.unwrap();
        }
        rounds += 1;
        if !backfill.is_finished() {
            during_backfill += 1;
        }
    }
    assert!(backfill.await.unwrap().unwrap() > 0, "the backfill ran");
    assert!(
        during_backfill > 0,
        "no write overlapped the backfill: the test checks nothing"
    );
    let counted = recount(&store);
    assert_eq!(counted.usage, store.accounting().usage);
    assert!(
        counted.usage.artifacts < RECORDS as u64,
        "eviction ran meanwhile ({} artifacts)",
        counted.usage.artifacts
    );
}

/// A presence map loaded in the background while writes, overwrites, evictions and cleans go
/// on ends up exactly what RocksDB holds (checked by `recount`), and answers from the end of
/// the load on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_map_loaded_while_writes_evictions_and_cleans_run_is_exact() {
    const RECORDS: u64 = 3000;
    let dir = tempfile::tempdir().unwrap();
    // Room for the first artifacts and little more: the overwrites below evict.
    let capacity = RECORDS * 300;
    let blob = |n: u64| ArtifactKey::new("p", Kind::CasSha256, digest_of(n));
    let store = store_with(dir.path(), capacity);
    for n in 0..RECORDS {
        put(&store, &blob(n), &[n as u8; 40]).await;
    }
    drop(store);

    presence::LOAD_IN_BACKGROUND.set(true);
    let store = store_with(dir.path(), capacity);
    presence::LOAD_IN_BACKGROUND.set(false);
    assert!(
        !store.presence_in_memory(),
        "not loaded before open returns"
    );
    let (mut rounds, mut during_load) = (0u64, 0u64);
    while rounds < 300 || !store.presence_in_memory() {
        let loading = !store.presence_in_memory();
        put(&store, &blob((rounds * 7) % RECORDS), &[1; 900]).await;
        let other = ArtifactKey::new("q", Kind::CasSha256, digest_of(RECORDS + rounds));
        put(&store, &other, b"x").await;
        if rounds % 50 == 0 {
            store.delete_project("q").await.unwrap();
            store.maintain().await.unwrap();
        }
        rounds += 1;
        if loading {
            during_load += 1;
        }
        assert!(rounds < 100_000, "the load never ended");
    }
    assert!(
        during_load > 0,
        "no write overlapped the load: the test checks nothing"
    );
    store.maintain().await.unwrap();
    let counted = recount(&store);
    assert_eq!(counted.usage, store.accounting().usage);
    assert!(
        counted.usage.artifacts < RECORDS,
        "eviction ran meanwhile ({} artifacts)",
        counted.usage.artifacts
    );
    assert_eq!(store.stats().presence_map_entries, counted.usage.artifacts);
    // Answers come from the map now, and match what the family says.
    let asked: Vec<_> = (0..RECORDS + rounds).map(blob).collect();
    let in_memory = store.present(&asked).await.unwrap();
    store.inner.presence_map.turn_off();
    assert_eq!(store.present(&asked).await.unwrap(), in_memory);
    assert!(in_memory.iter().any(|p| *p) && in_memory.iter().any(|p| !*p));
}

/// With `storage.presence_in_memory` off, nothing is held and RocksDB answers.
#[tokio::test]
async fn without_the_presence_map_rocksdb_answers() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(StoreOptions {
        presence_in_memory: false,
        ..StoreOptions::for_tests(dir.path())
    })
    .unwrap();
    let blob = |n: u64| ArtifactKey::new("p", Kind::CasSha256, digest_of(n));
    put(&store, &blob(1), b"one").await;
    let asked = [blob(1), blob(2)];
    let sizes = store.stored_sizes(asked.iter().collect()).await.unwrap();
    assert_eq!(sizes, vec![Some(3), None]);
    assert!(!store.presence_in_memory());
    let stats = store.stats();
    assert_eq!(
        (stats.presence_map_entries, stats.presence_map_bytes),
        (0, 0)
    );
}

/// The loader reads the family from a snapshot; an overwrite, a removal and a new blob
/// committed after that snapshot win over what the loader reads from it afterwards.
#[tokio::test]
async fn writes_after_the_loaders_snapshot_win_over_what_it_reads() {
    let dir = tempfile::tempdir().unwrap();
    let blob = |n: u64| ArtifactKey::new("p", Kind::CasSha256, digest_of(n));
    let store = store_with(dir.path(), 1 << 30);
    for n in 0..3 {
        put(&store, &blob(n), b"old").await;
    }
    store.inner.presence_map.restart_loading();
    let snapshot = store.presence_entries(&[]);
    put(&store, &blob(0), b"a longer body").await;
    let encoded = blob(1).encode();
    assert!(store.remove_if(&encoded, |_| true).unwrap());
    put(&store, &blob(9), b"new").await;
    assert_eq!(
        store.load_presence_entries(snapshot, usize::MAX).unwrap(),
        None
    );
    store.inner.presence_map.loaded();
    recount(&store);
    let asked = [blob(0), blob(1), blob(2), blob(9)];
    let sizes = store.stored_sizes(asked.iter().collect()).await.unwrap();
    assert_eq!(sizes, vec![Some(13), None, Some(3), Some(3)]);
}

fn logging_store(dir: &Path) -> Store {
    Store::open(StoreOptions {
        replication_log: true,
        ..StoreOptions::for_tests(dir)
    })
    .unwrap()
}

/// What the log holds after `after`, as (seq, record).
fn log_of(store: &Store, after: u64) -> Vec<(u64, LogRecord)> {
    store.log_after(after, usize::MAX).unwrap().records
}

#[tokio::test]
async fn local_writes_and_cleans_are_logged_in_order_and_remote_ones_never() {
    let dir = tempfile::tempdir().unwrap();
    let store = logging_store(dir.path());
    let first = put(&store, &gradle("a"), b"one").await;
    let remote = put_remote(&store, &gradle("b"), b"two", 5, "peer").await;
    assert!(remote.seq().is_some(), "the remote version is published");
    store.delete_project("p").await.unwrap();
    store.apply_remote_clean("other", now_ms()).await.unwrap();
    let log = log_of(&store, 0);
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[0].0, first.seq().unwrap());
    assert_eq!(
        log[0].1,
        LogRecord::Upsert {
            key: gradle("a").encode(),
            version_ms: first.info.version_ms,
            blake3: *blake3::hash(b"one").as_bytes(),
            size: 3,
        }
    );
    assert!(
        matches!(&log[1].1, LogRecord::DeleteProject { project, .. } if project == "p"),
        "{log:?}"
    );
    assert!(log[1].0 > log[0].0);
    // Reading after the first record starts at the second.
    assert_eq!(log_of(&store, log[0].0), log[1..].to_vec());
    // A store without the log writes none.
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = store_with(plain_dir.path(), 1 << 30);
    put(&plain, &gradle("a"), b"one").await;
    assert!(log_of(&plain, 0).is_empty());
}

/// A node that lost its data fetches its own past writes back from its peers. Naming this node
/// as their origin does not make them local writes: they lose to newer versions and to cleans,
/// and are not logged again. (They were raised past both and logged, so a fetched old version
/// overwrote a newer one, or came back after a clean, on every node of the mesh.)
#[tokio::test]
async fn this_nodes_own_writes_fetched_back_are_received_versions_not_local_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = logging_store(dir.path());
    let own = store.node_id().to_owned();
    put_remote(&store, &gradle("k"), b"newer", 200, "peer").await;
    let old = put_remote(&store, &gradle("k"), b"older", 100, &own).await;
    assert_eq!(old.outcome, Outcome::Stale);
    assert_eq!(body_of(&store, &gradle("k")).await.unwrap(), b"newer");
    store.apply_remote_clean("p", 300).await.unwrap();
    let cleaned = put_remote(&store, &gradle("c"), b"x", 250, &own).await;
    assert_eq!(cleaned.outcome, Outcome::Tombstoned);
    let restored = put_remote(&store, &gradle("r"), b"y", 400, &own).await;
    assert_eq!(restored.info.version_ms, 400, "kept as it was written");
    assert!(log_of(&store, 0).is_empty(), "none of them is logged again");
}

/// A clean removes every artifact written before it, whatever its version: a peer's clock 60 s
/// ahead stamped one, and a local write raised past it. The mark survives a restart. (The
/// clean took this node's clock as its time, so both outlived the clean that was answered
/// 204.)
#[tokio::test]
async fn a_clean_removes_what_was_written_before_it_even_versions_stamped_ahead_of_the_clock() {
    let dir = tempfile::tempdir().unwrap();
    let ahead = now_ms() + 60_000;
    {
        let store = logging_store(dir.path());
        put_remote(&store, &gradle("peer"), b"x", ahead, "peer").await;
        put_remote(&store, &gradle("raised"), b"x", ahead, "peer").await;
        let raised = put(&store, &gradle("raised"), b"mine").await;
        assert!(raised.info.version_ms > ahead);
        store.delete_project("p").await.unwrap();
        assert_eq!(body_of(&store, &gradle("peer")).await, None);
        assert_eq!(body_of(&store, &gradle("raised")).await, None);
        put_remote(&store, &gradle("later"), b"x", ahead + 10, "peer").await;
    }
    let store = logging_store(dir.path());
    store.delete_project("p").await.unwrap();
    assert_eq!(
        body_of(&store, &gradle("later")).await,
        None,
        "after a restart"
    );
    // Another project's clean keeps this node's clock: the mark is per project.
    store.delete_project("q").await.unwrap();
    assert!(store.inner.tombstones.of("q").unwrap() < ahead);
    // A version hours ahead (a peer's clock far off) dates the clean at most an hour ahead,
    // and survives it.
    let far = now_ms() + 3 * 3_600_000;
    let key = ArtifactKey::new("r", Kind::Gradle, "far".to_string());
    put_remote(&store, &key, b"x", far, "peer").await;
    store.delete_project("r").await.unwrap();
    let cleaned_at = store.inner.tombstones.of("r").unwrap();
    assert!(cleaned_at <= now_ms() + 3_600_000 && cleaned_at < far);
    let after = put(&store, &gradle("after"), b"kept").await;
    assert!(after.seq().is_some());
    assert_eq!(body_of(&store, &gradle("after")).await.unwrap(), b"kept");
}

#[tokio::test]
async fn a_remote_clean_hides_older_versions_and_refuses_them_later() {
    let dir = tempfile::tempdir().unwrap();
    let store = logging_store(dir.path());
    put_remote(&store, &gradle("old"), b"x", 100, "peer").await;
    store.apply_remote_clean("p", 200).await.unwrap();
    assert!(body_of(&store, &gradle("old")).await.is_none());
    let late = put_remote(&store, &gradle("old"), b"x", 150, "peer").await;
    assert_eq!(late.outcome, Outcome::Tombstoned);
    let newer = put_remote(&store, &gradle("new"), b"y", 250, "peer").await;
    assert!(newer.seq().is_some());
    // An older remote clean does not move the tombstone back. Nor is a clean this node holds
    // (every bootstrap and catch-up pass hands each peer's cleans over again) applied anew: no
    // tombstone batch taking every publish's lock, no rescan of the project.
    let seq = store.stable_seq();
    store.apply_remote_clean("p", 50).await.unwrap();
    assert_eq!(store.apply_remote_clean("p", 200).await.unwrap(), 0);
    assert_eq!(store.stable_seq(), seq, "no tombstone written");
    assert_eq!(store.inner.tombstones.of("p"), Some(200));
}

#[tokio::test]
async fn a_remote_clean_sent_again_finishes_the_deletions_its_first_try_left() {
    let dir = tempfile::tempdir().unwrap();
    let store = logging_store(dir.path());
    put_remote(&store, &gradle("old"), b"x", 100, "peer").await;
    // The first try wrote its tombstone and its unfinished mark, and its deletions failed: the
    // sender retries the same clean.
    store.write_tombstone("p", Some(200)).unwrap();
    assert_eq!(store.stats().artifacts, 1, "hidden, not yet deleted");
    assert_eq!(store.apply_remote_clean("p", 200).await.unwrap(), 1);
    assert_eq!(store.stats().artifacts, 0);
    assert_eq!(store.unfinished_clean("p").unwrap(), None);
    assert_eq!(store.apply_remote_clean("p", 200).await.unwrap(), 0);
}

#[tokio::test]
async fn cursors_persist_and_the_log_is_trimmed_below_the_slowest() {
    let dir = tempfile::tempdir().unwrap();
    let store = logging_store(dir.path());
    assert!(!store.log_lost(0).unwrap(), "nothing logged, nothing lost");
    let mut seqs = Vec::new();
    for i in 0..10 {
        seqs.push(
            put(&store, &gradle(&format!("k{i}")), b"v")
                .await
                .seq()
                .unwrap(),
        );
    }
    assert!(!store.log_lost(0).unwrap(), "a new peer gets the whole log");
    store.set_cursor("fast", seqs[7]).unwrap();
    store.set_cursor("slow", seqs[3]).unwrap();
    drop(store);
    let store = logging_store(dir.path());
    assert_eq!(store.cursor("slow").unwrap(), seqs[3]);
    assert_eq!(store.cursor("never").unwrap(), 0);
    let slowest = store.cursors().unwrap().into_iter().map(|(_, s)| s).min();
    assert_eq!(store.trim_log(slowest, 1000).unwrap(), 0);
    let left: Vec<u64> = log_of(&store, 0).into_iter().map(|(s, _)| s).collect();
    assert_eq!(left, seqs[4..].to_vec(), "records every peer has are gone");
    assert!(!store.log_lost(seqs[3]).unwrap());
    assert!(
        store.log_lost(0).unwrap(),
        "a peer admitted now (or again, after it expired) lacks what was trimmed"
    );
    store.forget_cursor("slow").unwrap();
    assert_eq!(
        store.cursors().unwrap(),
        vec![("fast".to_string(), seqs[7])]
    );
}

/// A logging store with 30 writes in its log; the sequence number of the last.
async fn logging_store_with_thirty_writes(dir: &Path) -> (Store, u64) {
    let store = logging_store(dir);
    let mut last = 0;
    for i in 0..30 {
        last = put(&store, &gradle(&format!("k{i}")), b"v")
            .await
            .seq()
            .unwrap();
    }
    (store, last)
}

/// A peer admitted with nothing acknowledged after the others' cursors took the log past the
/// bound: nothing more is dropped, and none is counted. (The count underflowed: about 1.8e19
/// dropped records and a warning every second in a release build, a panic in a debug one.)
#[tokio::test]
async fn a_peer_admitted_after_the_log_was_trimmed_past_the_bound_drops_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (store, last) = logging_store_with_thirty_writes(dir.path()).await;
    assert_eq!(store.trim_log(Some(last - 2), 10).unwrap(), 0);
    let left = log_of(&store, 0).len();
    assert_eq!(store.trim_log(Some(0), 10).unwrap(), 0);
    assert_eq!(log_of(&store, 0).len(), left);
}

#[tokio::test]
async fn the_bound_drops_the_oldest_records_and_marks_who_lost_them() {
    let dir = tempfile::tempdir().unwrap();
    let (store, last) = logging_store_with_thirty_writes(dir.path()).await;
    store.set_cursor("behind", 2).unwrap();
    let dropped = store.trim_log(Some(2), 10).unwrap();
    assert_eq!(dropped, last - 10 - 2, "unacknowledged records dropped");
    let left = log_of(&store, 0);
    assert_eq!(left.len(), 10);
    assert_eq!(left[0].0, last - 9);
    assert!(store.log_lost(2).unwrap(), "the peer at 2 lost records");
    assert!(
        !store.log_lost(last - 10).unwrap(),
        "a peer past the drop lost none"
    );
    // Writes were never refused, and the bound survives a restart.
    drop(store);
    let store = logging_store(dir.path());
    assert!(store.log_lost(2).unwrap());
}

/// A trim that lands between reading a peer's records and checking the log's floor must not
/// hand the peer a slice with a hole: its cursor would move past records it never got, and
/// nothing would ever send them (regression: the floor was read before the records).
#[tokio::test]
async fn a_trim_racing_a_peers_read_sends_it_to_catch_up_not_past_a_hole() {
    let dir = tempfile::tempdir().unwrap();
    let (store, last) = logging_store_with_thirty_writes(dir.path()).await;
    let cursor = 2;
    let unraced = store.log_for_peer(cursor, 5).unwrap().unwrap();
    assert_eq!(unraced.records[0].0, cursor + 1, "nothing trimmed yet");
    // The bound drops the oldest records while the peer's read is in progress.
    let raced = store
        .log_for_peer_around(cursor, 5, || {
            assert!(store.trim_log(Some(cursor), 10).unwrap() > 0);
        })
        .unwrap();
    assert!(raced.is_none(), "a slice with a hole was handed out");
    // The next read sees the floor at once; a peer past it reads on from its cursor.
    assert!(store.log_for_peer(cursor, 5).unwrap().is_none());
    let after_floor = store.log_for_peer(last - 10, 5).unwrap().unwrap();
    assert_eq!(after_floor.records[0].0, last - 9);
}

#[tokio::test]
async fn catch_up_promises_persist_until_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let store = logging_store(dir.path());
    assert!(store.catch_ups().unwrap().is_empty());
    store.set_catch_up("writer-a", 7).unwrap();
    store.set_catch_up("writer-b", 9).unwrap();
    store.set_catch_up("writer-a", 8).unwrap();
    drop(store);
    let store = logging_store(dir.path());
    assert_eq!(
        store.catch_ups().unwrap(),
        vec![("writer-a".to_string(), 8), ("writer-b".to_string(), 9)]
    );
    store.clear_catch_up("writer-a").unwrap();
    assert_eq!(
        store.catch_ups().unwrap(),
        vec![("writer-b".to_string(), 9)]
    );
    // Cursors and promises share a family and never read as each other.
    assert!(store.cursors().unwrap().is_empty());
}

/// Total bytes of RocksDB's write-ahead log files in the data dir.
fn wal_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir.join("meta"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
        .map(|path| std::fs::metadata(path).unwrap().len())
        .sum()
}

/// The small families (usage counter, sequence number) go hours without filling a memtable; the
/// log files they pin must not pile up meanwhile. And a store reopened over recycled log files
/// replays exactly what was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_ahead_log_stays_bounded_and_recycled_logs_replay() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        inline_max: 16 * 1024,
        wal_limit: 4 << 20,
        ..StoreOptions::for_tests(dir.path())
    };
    let body = vec![7u8; 8 * 1024];
    let count = 8_000;
    {
        let store = Store::open(options.clone()).unwrap();
        for n in 0..count {
            put(&store, &gradle(&format!("wal-{n}")), &body).await;
        }
        // 64 MiB went through the log; what stays is the live log plus the few kept for reuse.
        let logs = wal_bytes(dir.path());
        assert!(
            logs <= 24 << 20,
            "{logs} bytes of log files after 64 MiB of writes"
        );
    }
    let store = Store::open(options).unwrap();
    assert_eq!(store.stats().artifacts, count);
    for n in (0..count).step_by(97) {
        let key = gradle(&format!("wal-{n}"));
        assert_eq!(
            body_of(&store, &key).await.as_deref(),
            Some(&body[..]),
            "{key}"
        );
    }
}

/// Bytes that no compressor shrinks, so they sit in an SST file as written.
fn incompressible(seed: &str, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut bytes);
    bytes
}

/// Flips one byte of the first SST file under `dir` that holds `needle`, in the needle's middle.
fn damage_sst_holding(dir: &Path, needle: &[u8]) {
    let mut pending = vec![dir.to_path_buf()];
    while let Some(at) = pending.pop() {
        for entry in std::fs::read_dir(&at).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            if path.extension().is_none_or(|ext| ext != "sst") {
                continue;
            }
            let mut bytes = std::fs::read(&path).unwrap();
            if let Some(offset) = bytes.windows(needle.len()).position(|w| w == needle) {
                bytes[offset + needle.len() / 2] ^= 0x5a;
                std::fs::write(&path, bytes).unwrap();
                return;
            }
        }
    }
    panic!("no SST file holds the body");
}

/// Stores `damaged` and `intact` with their bodies inline (a 4 KiB record is larger than a data
/// block, so it has one to itself), flushes them to an SST file and closes the store; flips a
/// byte inside the damaged body in that file; and opens the store again.
async fn store_with_damaged_block(
    dir: &Path,
    damaged: (&ArtifactKey, &[u8]),
    intact: (&ArtifactKey, &[u8]),
) -> Store {
    let open = || {
        Store::open(StoreOptions {
            inline_max: 8192,
            ..StoreOptions::for_tests(dir)
        })
        .unwrap()
    };
    {
        let store = open();
        put(&store, damaged.0, damaged.1).await;
        put(&store, intact.0, intact.1).await;
        let record = raw_record(&store, damaged.0).unwrap();
        assert!(
            record.windows(64).any(|w| w == &damaged.1[..64]),
            "the body is inline in its record"
        );
        store
            .inner
            .db
            .flush_cf(store.cf(meta::CF_ARTIFACTS))
            .unwrap();
    }
    damage_sst_holding(dir, &damaged.1[1024..1088]);
    open()
}

/// A store whose RocksDB stopped taking writes: a forced compaction read a damaged block of
/// `gradle("damaged")` (`gradle("intact")` holds `intact`, in another block). Its bodies are
/// indexed, as a node's first sweep does long before any damage (the index backfill would
/// stop at the damaged block).
async fn store_that_stopped_writes(dir: &Path) -> Store {
    let damaged_body = incompressible("damaged", 4096);
    let store = store_with_damaged_block(
        dir,
        (&gradle("damaged"), &damaged_body),
        (&gradle("intact"), b"intact"),
    )
    .await;
    let mut indexed = WriteBatch::default();
    indexed.put_cf(store.cf(meta::CF_STATE), meta::BODIES_INDEXED_KEY, []);
    store.write(indexed).unwrap();
    assert_eq!(store.stats().background_errors, 0, "nothing read it yet");
    let mut compaction = rocksdb::CompactOptions::default();
    compaction.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
    store.inner.db.compact_range_cf_opt(
        store.cf(meta::CF_ARTIFACTS),
        None::<&[u8]>,
        None::<&[u8]>,
        &compaction,
    );
    store
}

/// `gradle("damaged")` in a damaged SST block and `gradle("intact")` in another, each with an
/// inline body of 4 KiB; and the intact one's body.
async fn two_artifacts_one_damaged(dir: &Path) -> (Store, Vec<u8>) {
    let damaged_body = incompressible("damaged", 4096);
    let intact_body = incompressible("intact", 4096);
    let store = store_with_damaged_block(
        dir,
        (&gradle("damaged"), &damaged_body),
        (&gradle("intact"), &intact_body),
    )
    .await;
    (store, intact_body)
}

/// Inline bodies are not hashed again on read: RocksDB's block checksums stand in for it
/// (docs/storage.md, "Reading and verification"). A damaged SST block must read as a miss,
/// never as the damaged bytes, leave the artifacts in other blocks readable, and not keep the
/// key from being stored again.
#[tokio::test]
async fn an_inline_body_in_a_damaged_sst_block_reads_as_a_miss_not_wrong_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (damaged, intact) = (gradle("damaged"), gradle("intact"));
    let (store, intact_body) = two_artifacts_one_damaged(dir.path()).await;
    assert!(
        store.lookup(&damaged).unwrap().is_none(),
        "a lookup in the damaged block answers a miss"
    );
    assert_eq!(
        body_of(&store, &damaged).await,
        None,
        "the damaged body is never served"
    );
    assert_eq!(
        body_of(&store, &intact).await.as_deref(),
        Some(&intact_body[..]),
        "an artifact in another block reads back whole"
    );
    // The damaged record is forgotten: existence checks stop vouching for it, its charge is
    // counted back, and the key takes a new upload.
    assert_eq!(
        store
            .present(&[damaged.clone(), intact.clone()])
            .await
            .unwrap(),
        vec![false, true]
    );
    assert_eq!(store.stats().artifacts, 1);
    assert_eq!(
        store.stats().used_bytes,
        meta::charge(4096, intact.encode().len(), 0)
    );
    put(&store, &damaged, b"uploaded again").await;
    assert_eq!(
        body_of(&store, &damaged).await.as_deref(),
        Some(&b"uploaded again"[..])
    );
}

/// A file body's id is in its record, so forgetting a record in a damaged block leaves the file,
/// its body-index entry and its size in the usage behind. The orphan sweep finds the key's
/// record gone and removes all three: nothing leaks, and a referenced file next to it stays.
#[tokio::test]
async fn the_file_of_a_record_forgotten_by_a_read_is_swept_and_uncounted() {
    sweep_the_file_of_a_damaged_record(true).await;
}

/// As above, when no read met the damaged record before the sweep: the sweep forgets it.
#[tokio::test]
async fn the_sweep_forgets_a_damaged_record_and_removes_its_file() {
    sweep_the_file_of_a_damaged_record(false).await;
}

async fn sweep_the_file_of_a_damaged_record(read_first: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (damaged, kept) = (gradle("damaged"), gradle("kept"));
    let body = incompressible("damaged", 64 * 1024);
    let kept_body = incompressible("kept", 2048);
    {
        let store = store_with(dir.path(), 1 << 30);
        // As a node does at start: the first sweep marks the body index complete.
        store.sweep_orphans(GRACE).unwrap();
        put(&store, &damaged, &body).await;
        store
            .inner
            .db
            .flush_cf(store.cf(meta::CF_ARTIFACTS))
            .unwrap();
    }
    // The record holds the body's BLAKE3; the body itself is a file.
    damage_sst_holding(dir.path(), blake3::hash(&body).as_bytes());
    let store = store_with(dir.path(), 1 << 30);
    put(&store, &kept, &kept_body).await;
    assert_eq!(body_ids_on_disk(dir.path()).len(), 2);
    if read_first {
        assert!(store.lookup(&damaged).unwrap().is_none(), "a miss");
        assert_eq!(
            store.stats().used_bytes,
            64 * 1024 + meta::charge(2048, kept.encode().len(), 0),
            "the record's charge went, its file's size is still counted"
        );
    }

    let report = store.sweep_orphans(std::time::Duration::ZERO).unwrap();
    assert_eq!(report.bodies, 1, "the damaged record's file is removed");
    assert_eq!(
        body_ids_on_disk(dir.path()).len(),
        1,
        "the referenced one stays"
    );
    assert_eq!(store.stats().artifacts, 1);
    assert_eq!(
        store.stats().used_bytes,
        meta::charge(2048, kept.encode().len(), 0),
        "only the kept artifact is counted"
    );
    assert!(store.lookup(&damaged).unwrap().is_none());
    assert_eq!(
        body_of(&store, &kept).await.as_deref(),
        Some(&kept_body[..])
    );
    assert_eq!(
        store
            .sweep_orphans(std::time::Duration::ZERO)
            .unwrap()
            .total(),
        0
    );
    put(&store, &damaged, &body).await;
    assert_eq!(body_of(&store, &damaged).await.as_deref(), Some(&body[..]));
}

/// A record this binary cannot decode (a newer release wrote it, say) may still name its file:
/// the sweep keeps the file rather than guessing.
#[tokio::test]
async fn the_sweep_keeps_the_file_of_a_record_it_cannot_decode() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(dir.path(), 1 << 30);
    store.sweep_orphans(GRACE).unwrap();
    let key = gradle("newer");
    put(&store, &key, &incompressible("newer", 4096)).await;
    store
        .inner
        .db
        .put_cf(store.cf(meta::CF_ARTIFACTS), key.encode(), [0xee; 40])
        .unwrap();
    let used = store.stats().used_bytes;
    assert_eq!(
        store
            .sweep_orphans(std::time::Duration::ZERO)
            .unwrap()
            .bodies,
        0
    );
    assert_eq!(body_ids_on_disk(dir.path()).len(), 1);
    assert_eq!(store.stats().used_bytes, used);
}

/// The least recently used artifact's record is in a damaged block. Eviction forgets it and
/// goes on. (Every pass stopped at it with the damage error: only a read of that key forgets
/// it, and nobody reads the least recently used key, so a full node refused writes for good.)
#[tokio::test]
async fn eviction_forgets_a_damaged_record_at_the_head_of_its_queue_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = two_artifacts_one_damaged(dir.path()).await;
    let freed = store
        .evict_until(0)
        .await
        .expect("eviction passes the damaged record")
        .freed;
    assert!(
        freed > 4096,
        "the intact artifact after it is evicted: {freed}"
    );
    assert_eq!(body_of(&store, &gradle("intact")).await, None);
    assert_eq!(body_of(&store, &gradle("damaged")).await, None);
}

/// An access noted for a key in a damaged block (an existence check answered from memory notes
/// one without reading the record) failed every flush of noted accesses, and so every eviction
/// pass after it, for good: the flush now forgets that record and goes on.
#[tokio::test]
async fn a_noted_access_to_a_damaged_record_does_not_stop_flushes_or_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let damaged = gradle("damaged");
    let (store, _) = two_artifacts_one_damaged(dir.path()).await;
    store.inner.touches.note_at(&damaged.encode(), now_ms());
    store
        .maintain()
        .await
        .expect("the flush passes the damaged record");
    assert!(
        store.inner.touches.is_empty(),
        "the access was kept to fail again"
    );
    let freed = store.evict_until(0).await.unwrap().freed;
    assert!(freed > 4096, "the intact artifact is evicted: {freed}");
    assert_eq!(body_of(&store, &damaged).await, None);
}

/// A compaction that reads a damaged block is a RocksDB background error, after which RocksDB
/// refuses writes: the store counts it, so that `/status` and `/metrics` can say why every
/// write now fails, and the write answers an error rather than a success that is not stored.
#[tokio::test]
async fn a_compaction_over_a_damaged_block_is_counted_and_writes_fail() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_that_stopped_writes(dir.path()).await;
    assert!(
        store.stats().background_errors >= 1,
        "the failed compaction is counted"
    );
    match store.put_bytes(&gradle("after"), b"new").await {
        Err(StoreError::WritesStopped(error)) => assert!(
            error.to_string().contains(".sst"),
            "the refusal names the damaged file: {error}"
        ),
        other => panic!("a write after it is refused, not acknowledged and lost: {other:?}"),
    }
    assert_eq!(
        body_of(&store, &gradle("intact")).await.as_deref(),
        Some(&b"intact"[..]),
        "reads keep working"
    );
}

/// A publish whose batch RocksDB failed to write may still be in its write-ahead log and be
/// replayed at the next start, naming the new body (and having dropped the previous version's):
/// the body is kept until then, not deleted at once, which would leave a replayed record
/// without its body. Once RocksDB is known to have stopped taking writes, it refuses before
/// its log, and a refused publish's body goes at once (a full disk of them would follow).
#[tokio::test]
async fn a_body_whose_batch_may_be_replayed_is_kept_until_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_that_stopped_writes(dir.path()).await;
    let before = body_ids_on_disk(dir.path());
    let failed = store
        .put_bytes(&gradle("first"), &incompressible("first", 64 * 1024))
        .await;
    assert!(
        matches!(failed, Err(StoreError::WritesStopped(_))),
        "{failed:?}"
    );
    let kept = body_ids_on_disk(dir.path());
    assert_eq!(kept.len(), before.len() + 1, "the body is kept");
    store.sweep_orphans(std::time::Duration::ZERO).unwrap();
    assert_eq!(
        body_ids_on_disk(dir.path()),
        kept,
        "no sweep takes it before a restart"
    );
    let refused = store
        .put_bytes(&gradle("second"), &incompressible("second", 64 * 1024))
        .await;
    assert!(
        matches!(refused, Err(StoreError::WritesStopped(_))),
        "{refused:?}"
    );
    assert_eq!(
        body_ids_on_disk(dir.path()),
        kept,
        "a refused publish's body goes at once"
    );
    drop(store);
    let store = store_with(dir.path(), 1 << 30);
    let report = store.sweep_orphans(std::time::Duration::ZERO).unwrap();
    assert_eq!(report.bodies, 1, "no record names it after the restart");
    assert_eq!(body_ids_on_disk(dir.path()), before);
}

/// A small artifact kept in the set of hot records (`hot.rs`) is never served once it changed:
/// after an overwrite, an eviction and a clean, reads answer what RocksDB holds.
#[tokio::test]
async fn a_hot_small_artifact_is_never_served_after_it_changed() {
    let dir = tempfile::tempdir().unwrap();
    let charge = meta::charge(600, gradle("a").encode().len(), 0);
    let store = evicting_one_at_a_time(dir.path(), 3 * charge);
    let key = gradle("a");
    let is_hot = |store: &Store| store.inner.hot.get(&key.encode()).is_some();
    put(&store, &key, &[1; 600]).await;
    assert_eq!(body_of(&store, &key).await, Some(vec![1; 600]));
    assert!(is_hot(&store), "a read did not keep the small artifact");

    put(&store, &key, &[2; 600]).await;
    assert!(
        !is_hot(&store),
        "an overwrite left the old record in memory"
    );
    assert_eq!(body_of(&store, &key).await, Some(vec![2; 600]));
    assert!(is_hot(&store), "a read did not keep the new version");

    // Three newer artifacts, none read: the one read least recently is evicted for the third.
    for name in ["b", "c", "d"] {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        put(&store, &gradle(name), &[3; 600]).await;
    }
    assert!(
        raw_record(&store, &key).is_none(),
        "the test meant to evict it"
    );
    assert!(!is_hot(&store), "an eviction left the record in memory");
    assert_eq!(body_of(&store, &key).await, None);

    let cleaned = gradle("e");
    put(&store, &cleaned, &[4; 600]).await;
    assert_eq!(body_of(&store, &cleaned).await, Some(vec![4; 600]));
    assert!(store.inner.hot.get(&cleaned.encode()).is_some());
    store.delete_project("p").await.unwrap();
    assert!(
        store.inner.hot.get(&cleaned.encode()).is_none(),
        "a clean left a deleted record in memory"
    );
    assert_eq!(body_of(&store, &cleaned).await, None);
}

/// The race the set's tickets close, played in order: a read fetches the record from RocksDB,
/// an overwrite is written and acknowledged, and only then does the read offer what it fetched
/// to the set. The overwrite's bytes are what is served afterwards.
#[tokio::test]
async fn a_read_that_fetched_a_record_before_an_overwrite_does_not_keep_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(dir.path(), 1 << 30);
    let key = gradle("a");
    let encoded = key.encode();
    put(&store, &key, &[1; 100]).await;
    let ticket = store.inner.hot.ticket(&encoded);
    let fetched = store.record(&encoded).unwrap().unwrap();
    put(&store, &key, &[2; 100]).await;
    store
        .inner
        .hot
        .offer(ticket, &encoded, &hot::ReadRecord::new(fetched));
    assert_eq!(body_of(&store, &key).await, Some(vec![2; 100]));
}

/// Readers hammer a small artifact while it is overwritten again and again: each time the
/// writer's overwrite returns, its own next read sees what it wrote. (It catches a set that
/// forgets a key before the write instead of after it; the ticket check is pinned by
/// `a_read_that_fetched_a_record_before_an_overwrite_does_not_keep_it`.)
#[test]
fn reads_racing_overwrites_never_leave_an_old_version_in_memory() {
    let runtime = four_workers();
    let dir = tempfile::tempdir().unwrap();
    runtime.block_on(async {
        let store = store_with(dir.path(), 1 << 30);
        let key = gradle("contended");
        put(&store, &key, &[0; 64]).await;
        let done = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (store, key, done) = (store.clone(), key.clone(), done.clone());
                tokio::spawn(async move {
                    while !done.load(Ordering::Relaxed) {
                        body_of(&store, &key).await;
                        // A read from memory never yields on its own.
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        let mut stale = None;
        for version in 1..=1500u32 {
            let body = version.to_be_bytes().repeat(16);
            put(&store, &key, &body).await;
            if body_of(&store, &key).await != Some(body) {
                stale = Some(version);
                break;
            }
        }
        done.store(true, Ordering::Relaxed);
        for reader in readers {
            reader.await.unwrap();
        }
        assert_eq!(
            stale, None,
            "a read after this version's write served an older one"
        );
    });
}

/// A flush of access notes that fails part-way keeps what it did not write for the next flush
/// (a lost note would leave the artifact old in the eviction queue, and neither the presence map
/// nor the set of hot records would note it again for a resolution), and a newer note of the
/// same key that came meanwhile wins over the one put back.
#[tokio::test]
async fn a_failed_access_flush_keeps_the_notes_it_did_not_write() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_noting_per(dir.path(), std::time::Duration::from_secs(1));
    let keys: Vec<ArtifactKey> = (0..evict::TOUCH_BATCH + 10)
        .map(|n| gradle(&format!("k{n}")))
        .collect();
    for key in &keys {
        put(&store, key, b"x").await;
    }
    let accessed = now_ms() + 3_600_000;
    for key in &keys {
        store.inner.touches.note_at(&key.encode(), accessed);
    }
    let taken = store.inner.touches.take();
    let (first, rest) = taken.split_at(evict::TOUCH_BATCH);
    let first: Vec<Vec<u8>> = first.iter().map(|(key, _)| key.clone()).collect();
    let rest: Vec<Vec<u8>> = rest.iter().map(|(key, _)| key.clone()).collect();
    let newer = accessed + 1_000;
    store.inner.touches.note_at(&rest[0], newer);

    evict::FAIL_TOUCH_BATCH_AFTER.set(Some(1));
    assert!(store.flush_touches_blocking(taken).is_err());

    for key in &first {
        assert_eq!(store.inner.touches.pending(key), None, "written, not kept");
        assert_eq!(written_access(&store, key), Some(accessed));
    }
    assert_eq!(store.inner.touches.pending(&rest[0]), Some(newer));
    for key in &rest[1..] {
        assert_eq!(store.inner.touches.pending(key), Some(accessed), "kept");
        assert_eq!(written_access(&store, key), None);
    }
    // The next flush writes them.
    store.maintain().await.unwrap();
    assert!(store.inner.touches.is_empty());
    for key in &keys {
        assert!(noted_access(&store, key).is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eviction_pass_keeps_its_lock_when_its_caller_stops_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(StoreOptions::for_tests(dir.path())).unwrap();
    let (started, pass_started) = std::sync::mpsc::channel::<()>();
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let caller = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .one_pass_at_a_time(move |_| {
                    let _ = started.send(());
                    let _ = gate.recv();
                    Ok(())
                })
                .await
        }
    });
    tokio::task::spawn_blocking(move || pass_started.recv())
        .await
        .unwrap()
        .unwrap();
    // The caller goes (its client left, a peer's push timed out); the pass runs on.
    caller.abort();
    let _ = caller.await;
    assert!(
        store.inner.evicting.try_lock().is_err(),
        "a second pass could start beside the running one"
    );
    release.send(()).unwrap();
    let mut freed = false;
    for _ in 0..200 {
        if store.inner.evicting.try_lock().is_ok() {
            freed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(freed, "the lock goes with the pass");
}

/// A store that holds ten artifacts of [`put_numbered`]: low watermark 5, eviction start 7.5;
/// and what each of them costs.
fn store_of_ten(dir: &Path) -> (Store, u64) {
    let charge = meta::charge(600, gradle("k00").encode().len(), 0);
    (store_with(dir, 10 * charge), charge)
}

/// Writes artifact `k{n:02}`, 600 bytes.
async fn put_numbered(store: &Store, n: usize) {
    put(store, &gradle(&format!("k{n:02}")), &[1u8; 600]).await;
}

/// Usage past the eviction start (midway between the low watermark and capacity) is taken down
/// to the low watermark by the background pass, oldest first; below it the pass evicts nothing.
#[tokio::test]
async fn the_background_pass_evicts_to_the_low_watermark_once_usage_passes_the_eviction_start() {
    let dir = tempfile::tempdir().unwrap();
    let (store, charge) = store_of_ten(dir.path());
    for i in 0..7 {
        put_numbered(&store, i).await;
    }
    store.maintain().await.unwrap();
    assert_eq!(
        store.stats().artifacts,
        7,
        "evicted below the eviction start"
    );

    put_numbered(&store, 7).await;
    assert_eq!(
        store.stats().artifacts,
        8,
        "a write that fit evicted nonetheless"
    );
    store.maintain().await.unwrap();
    assert_eq!(store.stats().used_bytes, 5 * charge);
    for i in 0..8 {
        let held = raw_record(&store, &gradle(&format!("k{i:02}"))).is_some();
        assert_eq!(held, i >= 3, "k{i:02}");
    }
}

/// A write that finds the store full evicts only down to the eviction start before it is
/// answered; the background pass does the rest.
#[tokio::test]
async fn a_write_that_finds_the_store_full_evicts_only_down_to_the_eviction_start() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = store_of_ten(dir.path());
    for i in 0..10 {
        put_numbered(&store, i).await;
    }
    assert_eq!(store.stats().artifacts, 10);

    put_numbered(&store, 10).await;
    // Three went to bring usage under 7.5 artifacts, then the write landed; not five (to the
    // low watermark) as when the write that found the store full did it all.
    assert_eq!(store.stats().artifacts, 8);
    store.maintain().await.unwrap();
    assert_eq!(store.stats().artifacts, 5);
    let counted = recount(&store);
    assert_eq!(counted.usage.bytes, store.stats().used_bytes);
    assert_eq!(counted.access_entries, 5);
}

/// A pass takes the eviction lock batch by batch: whatever waits for the lock meanwhile (a write
/// that must make room, the flush of recorded reads) runs before the pass is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// The key lock is held across awaits on purpose: it is what stops the pass.
#[allow(clippy::await_holding_lock)]
async fn a_long_eviction_pass_lets_others_take_the_lock_between_its_batches() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with(dir.path(), 1 << 30);
    for i in 0..1000 {
        put(&store, &gradle(&format!("k{i:04}")), b"x").await;
    }
    // The pass (four batches of at most 256) stops in its first or second batch, at the key
    // lock of an artifact of the second, holding the eviction lock.
    let stripe = store.inner.keys.lock(&gradle("k0300").encode());
    let pass = tokio::spawn({
        let store = store.clone();
        async move { store.evict_until(0).await.map(|evicted| evicted.freed) }
    });
    let holding = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while store.inner.evicting.try_lock().is_ok() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    });
    holding.await.expect("the pass took the eviction lock");
    let waiter = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .one_pass_at_a_time(|store| Ok(store.stats().artifacts))
                .await
        }
    });
    // Time for the waiter to queue for the lock before the stopped batch can go on.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    drop(stripe);
    let left_when_let_in = waiter.await.unwrap().unwrap();
    assert!(pass.await.unwrap().unwrap() > 0);
    assert!(
        (1..1000).contains(&left_when_let_in),
        "let in before the pass began or after it ended: {left_when_let_in} artifacts left"
    );
    assert_eq!(store.stats().artifacts, 0);
}
