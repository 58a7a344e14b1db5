//! Metric names (all in one place) and the Prometheus exporter.
//!
//! Labels are bounded: protocol, route template, status, kind, result, state. Never keys, tokens or
//! callers' account handles.

use metrics::Counter;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::storage::Kind;

pub const HTTP_REQUESTS_TOTAL: &str = "kura_http_requests_total";
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "kura_http_request_duration_seconds";
pub const BYTES_WRITTEN_TOTAL: &str = "kura_storage_bytes_written_total";
pub const BYTES_READ_TOTAL: &str = "kura_storage_bytes_read_total";
pub const CACHE_HITS_TOTAL: &str = "kura_cache_hits_total";
pub const CACHE_MISSES_TOTAL: &str = "kura_cache_misses_total";
pub const STORAGE_USED_BYTES: &str = "kura_storage_used_bytes";
pub const STORAGE_CAPACITY_BYTES: &str = "kura_storage_capacity_bytes";
pub const STORAGE_ARTIFACTS: &str = "kura_storage_artifacts";
pub const STORAGE_EVICTIONS_TOTAL: &str = "kura_storage_evictions_total";
pub const STORAGE_CORRUPT_TOTAL: &str = "kura_storage_corrupt_bodies_total";
pub const STORAGE_ORPHANS_REMOVED_TOTAL: &str = "kura_storage_orphans_removed_total";
pub const STORAGE_READ_CACHE_BYTES: &str = "kura_storage_read_cache_bytes";
pub const STORAGE_READ_CACHE_LOOKUPS_TOTAL: &str = "kura_storage_read_cache_lookups_total";
pub const STORAGE_PRESENCE_MAP_ENTRIES: &str = "kura_storage_presence_map_entries";
pub const STORAGE_PRESENCE_MAP_BYTES: &str = "kura_storage_presence_map_bytes";
pub const STORAGE_BODY_CHECKS_TOTAL: &str = "kura_storage_body_checks_total";
pub const STORAGE_BACKGROUND_ERRORS_TOTAL: &str = "kura_storage_background_errors_total";
pub const AUTH_DECISIONS_TOTAL: &str = "kura_auth_decisions_total";
pub const AUTH_CACHE_TOTAL: &str = "kura_auth_cache_lookups_total";
pub const AUTH_BACKEND_CALLS_TOTAL: &str = "kura_auth_backend_calls_total";
pub const AUTH_BACKEND_DURATION_SECONDS: &str = "kura_auth_backend_duration_seconds";
pub const AUTH_STATIC_TOKENS_STATE: &str = "kura_auth_static_tokens_state";
pub const ROCKSDB_MEMORY_BYTES: &str = "kura_storage_rocksdb_memory_bytes";
pub const PROCESS_RSS_BYTES: &str = "kura_process_resident_memory_bytes";
pub const PROCESS_OPEN_FDS: &str = "kura_process_open_fds";
pub const BUILD_INFO: &str = "kura_build_info";
pub const INFLIGHT_REQUESTS: &str = "kura_http_requests_in_flight";
pub const BODY_MEMORY_BYTES: &str = "kura_body_memory_bytes";
pub const CONNECTIONS_CLOSED_TOTAL: &str = "kura_connections_closed_total";
pub const GRPC_CALLS_TOTAL: &str = "kura_grpc_calls_total";
pub const GRPC_CALL_DURATION_SECONDS: &str = "kura_grpc_call_duration_seconds";
pub const GRPC_MESSAGE_BYTES_TOTAL: &str = "kura_grpc_message_bytes_total";
pub const REPLICATION_PENDING_ENTRIES: &str = "kura_replication_pending_entries";
pub const REPLICATION_LAG_SECONDS: &str = "kura_replication_lag_seconds";
pub const REPLICATION_SENT_BYTES_TOTAL: &str = "kura_replication_sent_bytes_total";
pub const REPLICATION_SENT_ENTRIES_TOTAL: &str = "kura_replication_sent_entries_total";
pub const REPLICATION_SKIPPED_TOTAL: &str = "kura_replication_skipped_total";
pub const REPLICATION_ERRORS_TOTAL: &str = "kura_replication_errors_total";
pub const REPLICATION_PEER_STATE: &str = "kura_replication_peer_state";
pub const REPLICATION_APPLIED_TOTAL: &str = "kura_replication_applied_total";
pub const REPLICATION_APPLIED_BYTES_TOTAL: &str = "kura_replication_applied_bytes_total";
pub const REPLICATION_LOG_DROPPED_TOTAL: &str = "kura_replication_log_dropped_total";
pub const REPLICATION_LIMITER_WAIT_SECONDS: &str = "kura_replication_limiter_wait_seconds";
pub const REPLICATION_CATCH_UPS_REQUESTED_TOTAL: &str =
    "kura_replication_catch_ups_requested_total";
pub const REPLICATION_CATCH_UP_PASSES_TOTAL: &str = "kura_replication_catch_up_passes_total";
pub const REPLICATION_CATCH_UPS_OWED: &str = "kura_replication_catch_ups_owed";
pub const REPLICATION_BOOTSTRAPPING: &str = "kura_replication_bootstrapping";
pub const REPLICATION_WALK_FETCHED_TOTAL: &str = "kura_replication_walk_fetched_total";
pub const REPLICATION_WALK_FETCHED_BYTES_TOTAL: &str = "kura_replication_walk_fetched_bytes_total";
pub const REPLICATION_WALK_OVER_BUDGET_TOTAL: &str = "kura_replication_walk_over_budget_total";

/// How often the recorder folds the latency samples recorded since into its histograms.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the global recorder and returns the handle `/metrics` renders from.
///
/// The recorder keeps every latency sample in a queue until it is folded into its histogram
/// buckets, which happens when `/metrics` is rendered or at upkeep. A node nobody scrapes would
/// hold eight bytes more for every request it ever served, so call [`spawn_upkeep`] with the
/// handle (the exporter's own `install` would, but it also opens a listener of its own).
pub fn install() -> Result<PrometheusHandle, String> {
    let buckets = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    describe();
    Ok(handle)
}

/// Folds queued latency samples into their histograms every [`UPKEEP_INTERVAL`], for the life of
/// the runtime, so memory stays flat whether or not `/metrics` is scraped.
pub fn spawn_upkeep(handle: PrometheusHandle) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(UPKEEP_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            handle.run_upkeep();
        }
    });
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        HTTP_REQUESTS_TOTAL,
        "HTTP requests by protocol, route and status."
    );
    describe_histogram!(
        HTTP_REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Time to response headers by route."
    );
    describe_counter!(
        BYTES_WRITTEN_TOTAL,
        Unit::Bytes,
        "Artifact bytes stored, by kind."
    );
    describe_counter!(
        BYTES_READ_TOTAL,
        Unit::Bytes,
        "Artifact bytes served, by kind."
    );
    describe_counter!(
        GRPC_CALLS_TOTAL,
        "gRPC calls by method and status code, counted when the call ends."
    );
    describe_histogram!(
        GRPC_CALL_DURATION_SECONDS,
        Unit::Seconds,
        "gRPC call time from request to the end of the response stream, by method."
    );
    describe_counter!(
        GRPC_MESSAGE_BYTES_TOTAL,
        Unit::Bytes,
        "gRPC message bytes by method and direction (received, sent)."
    );
    describe_gauge!(
        REPLICATION_PENDING_ENTRIES,
        "Replication log records a peer has not acknowledged, by peer node id."
    );
    describe_gauge!(
        REPLICATION_LAG_SECONDS,
        Unit::Seconds,
        "Age of the oldest record a peer has not acknowledged (0 when it has everything)."
    );
    describe_counter!(
        REPLICATION_SENT_BYTES_TOTAL,
        Unit::Bytes,
        "Artifact body bytes a peer acknowledged, by peer."
    );
    describe_counter!(
        REPLICATION_SENT_ENTRIES_TOTAL,
        "Log records a peer acknowledged, by peer."
    );
    describe_counter!(
        REPLICATION_SKIPPED_TOTAL,
        "Log records not sent, by reason: gone (evicted or cleaned before it was sent), superseded (a newer version is logged)."
    );
    describe_counter!(
        REPLICATION_ERRORS_TOTAL,
        "Failed sends to a peer, by peer and reason (connect, status, rejected, refused)."
    );
    describe_gauge!(
        REPLICATION_PEER_STATE,
        "1 for a peer's current state, 0 for the others (admitted, unreachable, refused)."
    );
    describe_counter!(
        REPLICATION_APPLIED_TOTAL,
        "Entries received from peers, by result: applied, stale, tombstoned, too_large (over this node's capacity, not stored), rejected."
    );
    describe_counter!(
        REPLICATION_APPLIED_BYTES_TOTAL,
        Unit::Bytes,
        "Artifact bytes received from peers and stored."
    );
    describe_histogram!(
        REPLICATION_LIMITER_WAIT_SECONDS,
        Unit::Seconds,
        "Time replication sends waited for the bandwidth limit, per chunk that waited (the sum is the total)."
    );
    describe_counter!(
        REPLICATION_LOG_DROPPED_TOTAL,
        "Log records dropped unacknowledged by replication.outbox.max_entries."
    );
    describe_counter!(
        REPLICATION_CATCH_UPS_REQUESTED_TOTAL,
        "Times this node asked a peer its log no longer covers to catch up from its index, by peer."
    );
    describe_counter!(
        REPLICATION_CATCH_UP_PASSES_TOTAL,
        "Walks of a writer's index this node made to catch up, by result (completed, failed)."
    );
    describe_gauge!(
        REPLICATION_CATCH_UPS_OWED,
        "Writers whose index this node has promised to walk and has not yet."
    );
    describe_gauge!(
        REPLICATION_BOOTSTRAPPING,
        "1 while this node's bootstrap pass runs (/ready answers 503 bootstrapping meanwhile)."
    );
    describe_counter!(
        REPLICATION_WALK_FETCHED_TOTAL,
        "Artifacts fetched by walks of peers' indexes, by walk (bootstrap, catch_up)."
    );
    describe_counter!(
        REPLICATION_WALK_FETCHED_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes of artifacts fetched by walks of peers' indexes, by walk (bootstrap, catch_up)."
    );
    describe_counter!(
        REPLICATION_WALK_OVER_BUDGET_TOTAL,
        "Artifacts a walk of a peer's index left unfetched because they exceed this node's low watermark, by walk."
    );
    describe_counter!(CACHE_HITS_TOTAL, "Reads that found the artifact, by kind.");
    describe_counter!(CACHE_MISSES_TOTAL, "Reads that did not, by kind.");
    describe_gauge!(
        STORAGE_USED_BYTES,
        Unit::Bytes,
        "Bytes of artifact bodies stored."
    );
    describe_gauge!(STORAGE_CAPACITY_BYTES, Unit::Bytes, "Configured capacity.");
    describe_gauge!(STORAGE_ARTIFACTS, "Artifacts stored.");
    describe_counter!(STORAGE_EVICTIONS_TOTAL, "Artifacts evicted for capacity.");
    describe_counter!(
        STORAGE_CORRUPT_TOTAL,
        "Artifacts found corrupt on read (a body failing its check, a record in a damaged metadata block), answered as misses and dropped."
    );
    describe_counter!(
        STORAGE_BACKGROUND_ERRORS_TOTAL,
        "Errors RocksDB met in its background flushes and compactions since the node started; after one it cannot recover from (a damaged block), every write fails (docs/storage.md)."
    );
    describe_counter!(
        STORAGE_ORPHANS_REMOVED_TOTAL,
        "Files no record referenced (left by a crash), removed by the orphan sweep."
    );
    describe_gauge!(
        STORAGE_READ_CACHE_BYTES,
        Unit::Bytes,
        "Memory held by the set of recently read small artifacts (storage.read_cache)."
    );
    describe_gauge!(
        STORAGE_PRESENCE_MAP_ENTRIES,
        "Content-addressed artifacts whose existence is held in memory (storage.presence_in_memory); 0 while it loads at start or when off."
    );
    describe_gauge!(
        STORAGE_PRESENCE_MAP_BYTES,
        Unit::Bytes,
        "Memory taken by the tables of the presence map (75-150 bytes per artifact held; a table three quarters empty is rebuilt smaller)."
    );
    describe_counter!(
        STORAGE_READ_CACHE_LOOKUPS_TOTAL,
        "Reads of an artifact's record by result: hit (answered from memory) or miss (read from RocksDB: not held, a file body, or absent)."
    );
    describe_counter!(
        STORAGE_BODY_CHECKS_TOTAL,
        "Reads of file bodies by what their bytes were checked against: blake3 (a body's first read, or one no longer remembered) or checksum (the XXH3-128 learned when an earlier read matched the BLAKE3; docs/storage.md)."
    );
    describe_counter!(AUTH_DECISIONS_TOTAL, "Authorization decisions by result.");
    describe_counter!(
        AUTH_CACHE_TOTAL,
        "Introspection cache lookups: hit, stale (served while revalidating) or miss."
    );
    describe_counter!(AUTH_BACKEND_CALLS_TOTAL, "Introspection calls by outcome.");
    describe_histogram!(
        AUTH_BACKEND_DURATION_SECONDS,
        Unit::Seconds,
        "Introspection call latency."
    );
    describe_gauge!(
        AUTH_STATIC_TOKENS_STATE,
        "Static tokens file: 1 for the current state, 0 for the others (ok; missing: every static token revoked; invalid: the last good tokens kept)."
    );
    describe_gauge!(
        ROCKSDB_MEMORY_BYTES,
        Unit::Bytes,
        "Memory the metadata store holds, by part: memtables, table_readers (indexes and filters), block_cache."
    );
    describe_gauge!(
        PROCESS_RSS_BYTES,
        Unit::Bytes,
        "Resident set size of the process."
    );
    describe_gauge!(PROCESS_OPEN_FDS, "Open file descriptors.");
    describe_gauge!(BUILD_INFO, "Always 1; labels carry version and git sha.");
    describe_gauge!(
        BODY_MEMORY_BYTES,
        Unit::Bytes,
        "Body bytes leased by transfers from limits.body_memory."
    );
    describe_gauge!(
        INFLIGHT_REQUESTS,
        "HTTP requests being served (bodies included)."
    );
    describe_counter!(
        CONNECTIONS_CLOSED_TOTAL,
        "Connections closed or refused by the node, by listener and reason (idle, header_timeout, evicted, refused, drain, stop, stalled_reader)."
    );
}

/// Refreshes gauges that are sampled rather than counted (called on every scrape).
pub fn sample(
    stats: crate::storage::StoreStats,
    rocksdb: Option<crate::storage::RocksDbMemory>,
    in_flight: usize,
) {
    if let Some(memory) = rocksdb {
        metrics::gauge!(ROCKSDB_MEMORY_BYTES, "part" => "memtables").set(memory.memtables as f64);
        metrics::gauge!(ROCKSDB_MEMORY_BYTES, "part" => "table_readers")
            .set(memory.table_readers as f64);
        metrics::gauge!(ROCKSDB_MEMORY_BYTES, "part" => "block_cache")
            .set(memory.block_cache as f64);
    }
    metrics::gauge!(INFLIGHT_REQUESTS).set(in_flight as f64);
    metrics::gauge!(STORAGE_USED_BYTES).set(stats.used_bytes as f64);
    metrics::gauge!(STORAGE_CAPACITY_BYTES).set(stats.capacity as f64);
    metrics::gauge!(STORAGE_ARTIFACTS).set(stats.artifacts as f64);
    // RocksDB keeps the count; the counter is set to it whenever metrics are sampled.
    metrics::counter!(STORAGE_BACKGROUND_ERRORS_TOTAL).absolute(stats.background_errors);
    // The set counts its own hits and misses; they are copied here rather than counted on
    // every read.
    metrics::gauge!(STORAGE_READ_CACHE_BYTES).set(stats.read_cache.bytes as f64);
    metrics::counter!(STORAGE_READ_CACHE_LOOKUPS_TOTAL, "result" => "hit")
        .absolute(stats.read_cache.hits);
    metrics::counter!(STORAGE_READ_CACHE_LOOKUPS_TOTAL, "result" => "miss")
        .absolute(stats.read_cache.misses);
    metrics::gauge!(STORAGE_PRESENCE_MAP_ENTRIES).set(stats.presence_map_entries as f64);
    metrics::gauge!(STORAGE_PRESENCE_MAP_BYTES).set(stats.presence_map_bytes as f64);
    metrics::counter!(STORAGE_BODY_CHECKS_TOTAL, "against" => "blake3")
        .absolute(stats.body_checks.blake3);
    metrics::counter!(STORAGE_BODY_CHECKS_TOTAL, "against" => "checksum")
        .absolute(stats.body_checks.checksum);
    if let Some(rss) = resident_memory_bytes() {
        metrics::gauge!(PROCESS_RSS_BYTES).set(rss as f64);
    }
    if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
        metrics::gauge!(PROCESS_OPEN_FDS).set(entries.count() as f64);
    }
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "git_sha" => crate::GIT_SHA).set(1.0);
}

/// Resident set size from `/proc/self/statm` (Linux).
pub fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page_size.max(4096) as u64)
}

/// Per-kind cache counters, resolved once when the node starts: a read or write increments a
/// handle instead of looking its series up by name and labels (a hash and an allocation per
/// call). Built after the recorder is installed (before that, handles are no-ops).
pub struct KindCounters {
    hits: Vec<Counter>,
    misses: Vec<Counter>,
    bytes_read: Vec<Counter>,
    bytes_written: Vec<Counter>,
}

impl KindCounters {
    pub fn resolve() -> KindCounters {
        let each = |name: &'static str| {
            Kind::ALL
                .iter()
                .map(|kind| metrics::counter!(name, "kind" => kind.as_str()))
                .collect()
        };
        KindCounters {
            hits: each(CACHE_HITS_TOTAL),
            misses: each(CACHE_MISSES_TOTAL),
            bytes_read: each(BYTES_READ_TOTAL),
            bytes_written: each(BYTES_WRITTEN_TOTAL),
        }
    }

    fn index(kind: Kind) -> usize {
        Kind::ALL.iter().position(|k| *k == kind).unwrap_or(0)
    }

    pub fn hit(&self, kind: Kind) {
        self.hits[Self::index(kind)].increment(1);
    }

    pub fn miss(&self, kind: Kind) {
        self.misses[Self::index(kind)].increment(1);
    }

    pub fn read(&self, kind: Kind, bytes: u64) {
        self.bytes_read[Self::index(kind)].increment(bytes);
    }

    pub fn written(&self, kind: Kind, bytes: u64) {
        self.bytes_written[Self::index(kind)].increment(bytes);
    }
}
