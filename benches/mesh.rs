//! The account mesh under load: replication lag, the bandwidth limit, and what replicating costs
//! a node's clients. Run with `cargo bench --bench mesh` (about 5 minutes); pick scenarios with
//! `KURA_BENCH_MESH=lag,bandwidth,get,overflow`. Results and how to read them: docs/benchmarks.md.
//!
//! Every node is the real `kura` binary (the integration tests' harness starts it and reads its
//! port from its log) on its own loopback address 127.0.0.201–219, peer plane on `:7443` with
//! mTLS from one account CA made by `kura::certs`, static peers. Load comes from this process,
//! on the same cores as the nodes. The benchmark reports; it fails only when a node serves bytes
//! other than those written, or a client write fails.
//!
//! - `lag`: three nodes, 500 writes/s of 4 KiB on the first for 30 s; after each write is
//!   acknowledged, a poller per peer GETs it every 2 ms; the time to the first 200 is the lag.
//!   Target p99 < 100 ms.
//! - `bandwidth`: a 1 GiB backlog (1,024 × 1 MiB written while the peer is stopped) drained at
//!   `bandwidth_limit = 50 MiB/s`; the peer's applied bytes are sampled every 100 ms, and every
//!   10 s window after the first second must be within ±10 % of the limit.
//! - `get`: GET of 4 KiB at a steady 1,000 requests/s (open loop: latency counts from when the
//!   request was due) on a node for 15 s without replication, then 15 s while it drains a
//!   backlog at `bandwidth_limit = 20 MiB/s`, then 15 s after. Target: p99 while replicating
//!   within 20 % of the first run's.
//! - `overflow`: 5,000 writes of 4 KiB, 16 at a time, with `outbox.max_entries = 1000`, three
//!   rounds with the peer running and three with it stopped (alternating, fresh nodes each);
//!   then the stopped peer resumes and must catch up all 5,000. Target: write latency with the
//!   stopped peer within 10 % of the running peer's, 0 errors.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use common::mesh::{eventually, gradle_path, node_options, put_with, wait_admitted, wait_ready};
use common::{Node, payload};

const PEER_PORT: u16 = common::mesh::PEER_PORT;
const MIB: u64 = 1 << 20;

/// Nodes with mTLS from one account CA; each has all the others as static peers.
struct Mesh {
    nodes: Vec<Node>,
    _certs: tempfile::TempDir,
}

impl Mesh {
    async fn start(octets: &[u8], settings: &[(&str, String)]) -> Mesh {
        let certs = tempfile::tempdir().expect("temp dir");
        let ca = certs.path().join("ca");
        let leaf = certs.path().join("leaf");
        kura::certs::create_ca(common::mesh::ACCOUNT, &ca).expect("CA");
        let sans: Vec<String> = octets.iter().map(|o| format!("127.0.0.{o}")).collect();
        kura::certs::issue_leaf(&ca, &leaf, &sans, 1).expect("leaf");
        let file = |name: &str| leaf.join(name).display().to_string();
        let nodes: Vec<Node> = octets
            .iter()
            .map(|octet| {
                let peers: Vec<String> = octets
                    .iter()
                    .filter(|o| *o != octet)
                    .map(|o| format!("https://127.0.0.{o}:{PEER_PORT}"))
                    .collect();
                let mut options = node_options(*octet, PEER_PORT, &peers)
                    .env("KURA_REPLICATION_INSECURE", "false")
                    .env("KURA_REPLICATION_TLS_CA", file("ca.crt"))
                    .env("KURA_REPLICATION_TLS_CERT", file("tls.crt"))
                    .env("KURA_REPLICATION_TLS_KEY", file("tls.key"));
                for (key, value) in settings {
                    options = options.env(key, value.clone());
                }
                Node::start_with(options)
            })
            .collect();
        for node in &nodes {
            wait_admitted(node, octets.len() - 1).await;
            wait_ready(node).await;
        }
        Mesh {
            nodes,
            _certs: certs,
        }
    }
}

/// A client that keeps connections, as build tools do.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1000.0)
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

/// Writes `count` bodies of `size` bytes under `prefix`, `at_once` at a time; returns each
/// write's latency.
async fn write_many(
    client: &reqwest::Client,
    node: &Node,
    prefix: &str,
    count: u64,
    size: usize,
    at_once: usize,
) -> Vec<Duration> {
    futures_util::stream::iter(0..count)
        .map(|i| async move {
            let body = payload(i, size);
            let started = Instant::now();
            let path = gradle_path("bench", &format!("{prefix}{i}"));
            put_with(client, node, &path, body).await;
            started.elapsed()
        })
        .buffer_unordered(at_once)
        .collect()
        .await
}

// ---------------------------------------------------------------------------------------------
// (a) replication lag

async fn lag() {
    const RATE: u64 = 500;
    const SECONDS: u64 = 30;
    let mesh = Mesh::start(&[201, 202, 203], &[]).await;
    let client = client();
    let nodes = Arc::new(mesh.nodes);
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    let mut writes = Vec::new();
    for i in 0..RATE * SECONDS {
        ticker.tick().await;
        let (client, nodes) = (client.clone(), nodes.clone());
        writes.push(tokio::spawn(async move {
            let body = payload(10_000_000 + i, 4096);
            let path = gradle_path("bench", &format!("lag{i}"));
            put_with(&client, &nodes[0], &path, body.clone()).await;
            let acknowledged = Instant::now();
            let pollers = nodes[1..]
                .iter()
                .map(|peer| first_seen(&client, peer, &path, &body, acknowledged));
            futures_util::future::join_all(pollers).await
        }));
    }
    let mut lags = Vec::new();
    let mut missing = 0;
    for write in writes {
        for lag in write.await.expect("writer") {
            match lag {
                Some(lag) => lags.push(lag),
                None => missing += 1,
            }
        }
    }
    lags.sort();
    let p99 = percentile(&lags, 0.99);
    println!("\n## (a) replication lag: 3 nodes, {RATE} writes/s of 4 KiB for {SECONDS} s\n");
    println!("| samples | p50 | p90 | p99 | max | not seen in 10 s | target p99 < 100 ms |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {} | {} | {} | {} | {} | {missing} | {} |",
        lags.len(),
        ms(percentile(&lags, 0.5)),
        ms(percentile(&lags, 0.9)),
        ms(p99),
        ms(lags.last().copied().unwrap_or_default()),
        verdict(missing == 0 && p99 < Duration::from_millis(100)),
    );
}

/// Polls `path` on `peer` every 2 ms until it answers 200 with `body`: the time since
/// `acknowledged`, or `None` after 10 s.
async fn first_seen(
    client: &reqwest::Client,
    peer: &Node,
    path: &str,
    body: &[u8],
    acknowledged: Instant,
) -> Option<Duration> {
    let mut poll = tokio::time::interval(Duration::from_millis(2));
    while acknowledged.elapsed() < Duration::from_secs(10) {
        poll.tick().await;
        let Ok(response) = client.get(peer.url(path)).send().await else {
            continue;
        };
        if response.status() == reqwest::StatusCode::OK {
            let seen = acknowledged.elapsed();
            let served = response.bytes().await.expect("body");
            assert_eq!(served.as_ref(), body, "{path}: a peer served other bytes");
            return Some(seen);
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// (b) the bandwidth limit

async fn bandwidth() {
    const LIMIT: u64 = 50 * MIB;
    const BACKLOG: u64 = 1024;
    let settings = [("KURA_REPLICATION_BANDWIDTH_LIMIT", LIMIT.to_string())];
    let mesh = Mesh::start(&[204, 205], &settings).await;
    let (writer, peer) = (&mesh.nodes[0], &mesh.nodes[1]);
    let client = client();
    peer.signal(libc::SIGSTOP);
    write_many(&client, writer, "bw", BACKLOG, MIB as usize, 4).await;
    let total = BACKLOG * MIB;
    let resumed = Instant::now();
    peer.signal(libc::SIGCONT);
    let samples = sample_applied(peer, resumed, total, Duration::from_secs(120)).await;
    let drained = samples.last().map_or(Duration::ZERO, |(at, _)| *at);
    // Windows wholly inside the drain, starting from the first second on.
    let mut rates = Vec::new();
    for (i, (start, start_bytes)) in samples.iter().enumerate() {
        if *start < Duration::from_secs(1) {
            continue;
        }
        let Some((end, end_bytes)) = samples[i..]
            .iter()
            .find(|(at, _)| *at >= *start + Duration::from_secs(10))
        else {
            break;
        };
        if *end_bytes >= total {
            break;
        }
        rates.push((end_bytes - start_bytes) as f64 / (*end - *start).as_secs_f64());
    }
    let mib = |rate: f64| rate / MIB as f64;
    let lowest = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let highest = rates.iter().copied().fold(0.0, f64::max);
    let within = |rate: f64| (rate / LIMIT as f64 - 1.0).abs() <= 0.10;
    println!("\n## (b) bandwidth limit: 1 GiB backlog, limit 50 MiB/s\n");
    println!(
        "| drained in | mean rate | 10 s windows | lowest window | highest window | target: every window ±10 % |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    println!(
        "| {:.1} s | {:.1} MiB/s | {} | {:.1} MiB/s | {:.1} MiB/s | {} |",
        drained.as_secs_f64(),
        mib(total as f64 / drained.as_secs_f64()),
        rates.len(),
        mib(lowest),
        mib(highest),
        verdict(!rates.is_empty() && rates.iter().all(|r| within(*r))),
    );
    let seen = common::mesh::body_at(peer, &gradle_path("bench", "bw7")).await;
    assert_eq!(
        seen,
        Some(payload(7, MIB as usize)),
        "the peer holds other bytes"
    );
}

/// Samples `peer`'s replicated bytes every 100 ms from `since` until `total` arrived.
async fn sample_applied(
    peer: &Node,
    since: Instant,
    total: u64,
    limit: Duration,
) -> Vec<(Duration, u64)> {
    let mut samples = Vec::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    while since.elapsed() < limit {
        ticker.tick().await;
        let bytes = peer.metric("kura_replication_applied_bytes_total").await;
        samples.push((since.elapsed(), bytes));
        if bytes >= total {
            break;
        }
    }
    samples
}

// ---------------------------------------------------------------------------------------------
// (c) GET latency while replicating

async fn get_while_replicating() {
    const LIMIT: u64 = 20 * MIB;
    const HOT: u64 = 1000;
    const PHASE: Duration = Duration::from_secs(15);
    let settings = [("KURA_REPLICATION_BANDWIDTH_LIMIT", LIMIT.to_string())];
    let mesh = Mesh::start(&[206, 207], &settings).await;
    let (node, peer) = (&mesh.nodes[0], &mesh.nodes[1]);
    let client = client();
    write_many(&client, node, "hot", HOT, 4096, 16).await;
    // A backlog that takes longer than a phase to drain at the limit.
    let backlog = 2 * PHASE.as_secs() * LIMIT / MIB;
    peer.signal(libc::SIGSTOP);
    write_many(&client, node, "backlog", backlog, MIB as usize, 4).await;
    let quiet = steady_gets(&client, node, HOT, PHASE).await;
    peer.signal(libc::SIGCONT);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = peer.metric("kura_replication_applied_bytes_total").await;
    let busy = steady_gets(&client, node, HOT, PHASE).await;
    let replicated = peer.metric("kura_replication_applied_bytes_total").await - started;
    let drained = eventually(Duration::from_secs(120), || async {
        let status = node.status().await;
        (status["peers"][0]["pending_entries"] == 0).then_some(())
    })
    .await;
    assert!(drained.is_some(), "the backlog never drained");
    let after = steady_gets(&client, node, HOT, PHASE).await;
    println!("\n## (c) GET 4 KiB at 1,000/s, without and while replicating at 20 MiB/s\n");
    println!("| run | requests | p50 | p99 | max | replicated meanwhile |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let row = |name: &str, latencies: &[Duration], replicated: &str| {
        println!(
            "| {name} | {} | {} | {} | {} | {replicated} |",
            latencies.len(),
            ms(percentile(latencies, 0.5)),
            ms(percentile(latencies, 0.99)),
            ms(latencies.last().copied().unwrap_or_default()),
        );
    };
    row("before (peer stopped)", &quiet, "0");
    row(
        "replicating",
        &busy,
        &format!(
            "{:.1} MiB/s",
            replicated as f64 / MIB as f64 / PHASE.as_secs_f64()
        ),
    );
    row("after (drained)", &after, "0");
    let ratio = percentile(&busy, 0.99).as_secs_f64() / percentile(&quiet, 0.99).as_secs_f64();
    println!(
        "\np99 replicating / before: {ratio:.2} (target ≤ 1.20: {})",
        verdict(ratio <= 1.20)
    );
}

/// GETs random hot keys at 1,000/s for `duration`; each latency counts from when its request
/// was due, so a stalled server is not hidden by a stalled client. Sorted.
async fn steady_gets(
    client: &reqwest::Client,
    node: &Node,
    hot: u64,
    duration: Duration,
) -> Vec<Duration> {
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut requests = Vec::new();
    let mut n: u64 = 0;
    while started.elapsed() < duration {
        let due = ticker.tick().await.into_std();
        n += 1;
        let i = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) % hot;
        let url = node.url(&gradle_path("bench", &format!("hot{i}")));
        let client = client.clone();
        requests.push(tokio::spawn(async move {
            let response = client.get(url).send().await.expect("GET");
            assert_eq!(response.status(), reqwest::StatusCode::OK);
            let body = response.bytes().await.expect("body");
            assert_eq!(body.as_ref(), payload(i, 4096), "hot{i}: other bytes");
            due.elapsed()
        }));
    }
    let mut latencies = Vec::with_capacity(requests.len());
    for request in requests {
        latencies.push(request.await.expect("GET task"));
    }
    latencies.sort();
    latencies
}

// ---------------------------------------------------------------------------------------------
// (d) the log's bound and client writes

async fn overflow() {
    const WRITES: u64 = 5000;
    const ROUNDS: usize = 3;
    let settings = [("KURA_REPLICATION_OUTBOX_MAX_ENTRIES", "1000".to_string())];
    let mut running = Vec::new();
    let mut stopped = Vec::new();
    let mut catch_up_times = Vec::new();
    let client = client();
    for round in 0..ROUNDS * 2 {
        let first = 208 + 2 * round as u8;
        let mesh = Mesh::start(&[first, first + 1], &settings).await;
        let (writer, peer) = (&mesh.nodes[0], &mesh.nodes[1]);
        let stop = round % 2 == 1;
        if stop {
            peer.signal(libc::SIGSTOP);
        }
        let mut latencies = write_many(&client, writer, "over", WRITES, 4096, 16).await;
        latencies.sort();
        if stop {
            stopped.push(latencies);
            // The peer stays away until the bound has dropped what it lacks (trimming runs
            // once a second), so that it must catch up rather than read the log.
            let dropped = eventually(Duration::from_secs(10), || async {
                (writer.metric("kura_replication_log_dropped_total").await > 0).then_some(())
            })
            .await;
            assert!(dropped.is_some(), "the bound never dropped records");
            let resumed = Instant::now();
            peer.signal(libc::SIGCONT);
            let caught_up = eventually(Duration::from_secs(120), || async {
                let catch_up = peer.status().await["replication"]["catch_up"].clone();
                (catch_up["completed"].as_u64() >= Some(1)
                    && catch_up["owed_to"] == serde_json::json!([]))
                .then_some(())
            })
            .await;
            assert!(
                caught_up.is_some(),
                "the stopped peer never caught up: writer {} peer {}",
                writer.status().await,
                peer.status().await
            );
            for i in 0..WRITES {
                let path = gradle_path("bench", &format!("over{i}"));
                let served = common::mesh::body_at(peer, &path).await;
                assert_eq!(served, Some(payload(i, 4096)), "{path} after catch-up");
            }
            catch_up_times.push(resumed.elapsed());
        } else {
            running.push(latencies);
        }
    }
    let median_of = |runs: &[Vec<Duration>], p: f64| {
        let mut values: Vec<Duration> = runs.iter().map(|run| percentile(run, p)).collect();
        values.sort();
        values[values.len() / 2]
    };
    let mean = |runs: &[Vec<Duration>]| {
        let all: Vec<Duration> = runs.iter().flatten().copied().collect();
        all.iter().sum::<Duration>() / all.len().max(1) as u32
    };
    println!(
        "\n## (d) 5,000 writes of 4 KiB (16 at a time), outbox.max_entries = 1000, {ROUNDS} rounds each\n"
    );
    println!("| peer | median p50 | median p99 | mean | errors |");
    println!("| --- | --- | --- | --- | --- |");
    for (name, runs) in [("running", &running), ("stopped", &stopped)] {
        println!(
            "| {name} | {} | {} | {} | 0 |",
            ms(median_of(runs, 0.5)),
            ms(median_of(runs, 0.99)),
            ms(mean(runs)),
        );
    }
    let ratio =
        |p: f64| median_of(&stopped, p).as_secs_f64() / median_of(&running, p).as_secs_f64();
    let (p50, p99) = (ratio(0.5), ratio(0.99));
    println!(
        "\nstopped / running: p50 {p50:.2}, p99 {p99:.2} (target ≤ 1.10: {}); all {WRITES} caught up after the peer resumed in {}",
        verdict(p50 <= 1.10 && p99 <= 1.10),
        catch_up_times
            .iter()
            .map(|t| format!("{:.1} s", t.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", "),
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; a filter among the scenarios comes from the environment.
    let chosen = std::env::var("KURA_BENCH_MESH")
        .unwrap_or_else(|_| "lag,bandwidth,get,overflow".to_string());
    let chosen: Vec<&str> = chosen.split(',').map(str::trim).collect();
    println!("# kura mesh benchmark ({})", env!("CARGO_PKG_VERSION"));
    if chosen.contains(&"lag") {
        lag().await;
    }
    if chosen.contains(&"bandwidth") {
        bandwidth().await;
    }
    if chosen.contains(&"get") {
        get_while_replicating().await;
    }
    if chosen.contains(&"overflow") {
        overflow().await;
    }
}
