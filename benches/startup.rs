//! Start-up after a crash: a node holding 1,000,000 artifacts (10 % of them file bodies) is
//! killed with kill -9 while it takes writes, and the time from exec of the new process to its
//! first `/ready` 200 is measured. Target: under 1 s. Run with `cargo bench --bench startup`.
//!
//! The data set is built once through the store's API (a minute or two on 2 cores, about
//! 1 GB on disk) under cargo's target dir (`CARGO_TARGET_TMPDIR/startup-1m-cas`) and reused by later runs;
//! each round then runs the real `kura` binary on it: start, write for a while over HTTP (so
//! the write-ahead log has something to replay), kill -9, start again and time it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kura::storage::{ArtifactKey, Kind, Store, StoreOptions};

#[path = "support/mod.rs"]
mod support;

const STORED: u64 = 1_000_000;
/// Every tenth artifact has a body larger than the data set's inline limit: a file under
/// `bodies/`. (The limit is lowered to 1 KiB while building, so that 100,000 file bodies take
/// 400 MB rather than 4 GB; what start-up could be slowed by is their number, not their size.)
const FILE_EVERY: u64 = 10;
const BUILD_INLINE_MAX: usize = 1024;
const ROUNDS: usize = 5;

fn body(n: u64) -> Vec<u8> {
    let size = if n.is_multiple_of(FILE_EVERY) {
        2048
    } else {
        64
    };
    vec![(n % 251) as u8; size]
}

/// Half of the artifacts are content-addressed (64 hex digits, as REAPI and Bazel HTTP write
/// them): those the presence map loads at start, in the background.
fn key(n: u64) -> ArtifactKey {
    if n.is_multiple_of(2) {
        ArtifactKey::new("startup", Kind::Gradle, format!("k{n:07}"))
    } else {
        let digest = blake3::hash(&n.to_le_bytes());
        ArtifactKey::new("startup", Kind::CasSha256, hex::encode(digest.as_bytes()))
    }
}

/// The data dir, built first if an earlier run did not finish it.
fn data_set() -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("startup-1m-cas");
    if dir.join("complete").exists() {
        return dir;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let started = Instant::now();
    runtime.block_on(async {
        let store = Store::open(StoreOptions {
            inline_max: BUILD_INLINE_MAX,
            ..StoreOptions::new(&dir)
        })
        .expect("open store");
        support::fill(&store, STORED, key, body).await;
    });
    eprintln!("built {STORED} artifacts in {:?}", started.elapsed());
    std::fs::write(dir.join("complete"), b"").expect("marker");
    dir
}

/// A running node and the address it logged.
struct Node {
    child: Child,
    addr: SocketAddr,
}

/// Starts the node on `dir`; returns once it logged its address, and when that was.
fn start(dir: &Path) -> (Node, Instant) {
    let exec = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kura"))
        .arg("serve")
        .env("KURA_SERVER_HTTP", "127.0.0.1:0")
        .env("KURA_STORAGE_DATA_DIR", dir)
        .env("KURA_LOG_FORMAT", "json")
        .env("KURA_LOG_LEVEL", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kura");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("kura exited before serving")
            .expect("log line");
        if line.contains("kura is serving") {
            let value: serde_json::Value = serde_json::from_str(&line).expect("json log");
            let addr = value["fields"]["address"]
                .as_str()
                .or_else(|| value["address"].as_str())
                .expect("address in log");
            break addr.parse().expect("socket address");
        }
    };
    // Keep draining the log so the node never blocks on a full pipe, and tell when the presence
    // map (which `/ready` does not wait for) has loaded.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if line.contains("presence map loaded") {
                eprintln!("  presence map loaded {:?} after exec", exec.elapsed());
            }
        }
    });
    (Node { child, addr }, exec)
}

/// Polls `/ready` until it answers 200.
fn wait_ready(addr: SocketAddr) {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(mut stream) = std::net::TcpStream::connect(addr) {
            let _ =
                stream.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut answer = [0u8; 12];
            if stream.read_exact(&mut answer).is_ok() && &answer[9..12] == b"200" {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("/ready did not answer 200 within 60 s");
}

/// Writes over HTTP for `duration` with 16 connections (new keys, a tenth of them file bodies).
fn write_for(addr: SocketAddr, round: usize, duration: Duration) -> u64 {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let http = reqwest::Client::new();
        let written = Arc::new(AtomicU64::new(0));
        let deadline = tokio::time::Instant::now() + duration;
        let tasks: Vec<_> = (0..16u64)
            .map(|task| {
                let (http, written) = (http.clone(), written.clone());
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while tokio::time::Instant::now() < deadline {
                        let url = format!(
                            "http://{addr}/api/cache/gradle/r{round}-{task}-{n}?account_handle=dev"
                        );
                        let sent = http.put(url).body(body(n)).send().await;
                        if sent.is_ok_and(|r| r.status().is_success()) {
                            written.fetch_add(1, Ordering::Relaxed);
                        }
                        n += 1;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("writer");
        }
        written.load(Ordering::Relaxed)
    })
}

fn main() {
    // `cargo test --benches` runs benches once as tests: too long for that.
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let dir = data_set();
    let mut times = Vec::new();
    for round in 0..ROUNDS {
        let (mut node, _) = start(&dir);
        wait_ready(node.addr);
        let written = write_for(node.addr, round, Duration::from_secs(3));
        node.child.kill().expect("kill -9"); // SIGKILL, mid-write
        node.child.wait().expect("reap");

        let (mut node, exec) = start(&dir);
        wait_ready(node.addr);
        let elapsed = exec.elapsed();
        eprintln!("round {round}: {written} writes before kill -9; /ready 200 after {elapsed:?}");
        times.push(elapsed);
        let _ = node.child.kill();
        let _ = node.child.wait();
    }
    times.sort();
    eprintln!(
        "start-up after kill -9 with {STORED} artifacts: median {:?}, max {:?} (target: under 1 s)",
        times[times.len() / 2],
        times[times.len() - 1]
    );
}
