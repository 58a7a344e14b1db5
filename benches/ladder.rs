//! What a small GET costs on this machine, one rung at a time: the same 10,000 bodies of 4 KiB,
//! the same `wrk -t2 -c32` load over random keys, against
//!
//! 1. an axum server answering every request with a 4 KiB body from memory (the HTTP stack's
//!    own cost: hyper, axum routing, tokio with two workers);
//! 2. the same server reading the key's record from the store's RocksDB with a point read
//!    (the store's table options and block cache size), answering the record's bytes;
//! 3. the same server reading through the store's own read path (`Store::lookup` and
//!    `Store::open_found`: record decoding, clean tombstones, the access-time note), from
//!    RocksDB on every request (`storage.read_cache` off);
//! 4. the real node (`kura serve`: static auth, the Gradle route, every layer, and its default
//!    read cache, which holds the whole data set once it has been read);
//! 5. nginx serving the same bodies as files, with `benches/load/nginx.conf` (if installed).
//!
//! Each rung runs in its own process, so the CPU it used per request is read from `/proc`.
//! The difference between two rungs is what the lower one adds. `docs/benchmarks.md` has the
//! results and what they say about the get-4k target of `benches/load.sh`.
//!
//! `cargo bench --bench ladder` (wrk and nginx: `scripts/install-deps.sh bench`).
//! `KURA_LADDER_ROUNDS` (default 3; rungs alternate their order each round, the median is
//! reported), `KURA_LADDER_DURATION` (seconds per run, default 8) and
//! `KURA_LADDER_BLOCK_CACHE_MB` (RocksDB's block cache in the three rungs that read it; default
//! the node's own default).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use http::StatusCode;
use kura::storage::{ArtifactKey, BodyStream, Kind, Store, StoreOptions};

#[path = "support/mod.rs"]
mod support;

const KEYS: u64 = 10_000;
const SIZE: usize = 4096;
const TOKEN: &str = "ladder-bench-token";
/// Set in a child process of this bench: serve the rung it names on the data dir given.
const SERVE_ENV: &str = "KURA_LADDER_SERVE";
/// Linux reports process CPU time in these ticks per second (`USER_HZ`).
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Rung {
    Memory,
    RocksDb,
    Store,
    Node,
    Nginx,
}

impl Rung {
    fn label(self) -> &'static str {
        match self {
            Rung::Memory => "axum, body from memory",
            Rung::RocksDb => "axum + RocksDB point read",
            Rung::Store => "axum + the store's read path",
            Rung::Node => "kura serve (static auth, every layer)",
            Rung::Nginx => "nginx, static files",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Rung::Memory => "memory",
            Rung::RocksDb => "rocksdb",
            Rung::Store => "store",
            Rung::Node => "node",
            Rung::Nginx => "nginx",
        }
    }

    fn from_name(name: &str) -> Option<Rung> {
        [Rung::Memory, Rung::RocksDb, Rung::Store]
            .into_iter()
            .find(|rung| rung.name() == name)
    }
}

fn key(n: u64) -> ArtifactKey {
    ArtifactKey::new("", Kind::Gradle, format!("k4-{n}"))
}

/// Incompressible bytes, different for every key.
fn body(n: u64) -> Vec<u8> {
    let mut state = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..SIZE)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn main() {
    if let Ok(spec) = std::env::var(SERVE_ENV) {
        let (name, dir) = spec.split_once(':').expect("rung:dir");
        serve(Rung::from_name(name).expect("rung"), Path::new(dir));
        return;
    }
    if Command::new("wrk").arg("--version").output().is_err() {
        eprintln!("wrk is not installed: run scripts/install-deps.sh bench");
        std::process::exit(2);
    }
    let rounds: usize = env_number("KURA_LADDER_ROUNDS", 3).max(1);
    let seconds: u64 = env_number("KURA_LADDER_DURATION", 8);
    let work = tempfile::tempdir().expect("temp dir");
    let data = work.path().join("data");
    build_data_set(&data);
    let www = work.path().join("www");
    let nginx = nginx_binary();
    if nginx.is_some() {
        write_files(&www.join("k4"));
    }
    let mut rungs = vec![Rung::Memory, Rung::RocksDb, Rung::Store, Rung::Node];
    rungs.extend(nginx.as_ref().map(|_| Rung::Nginx));
    let mut results: Vec<(Rung, Vec<Run>)> = rungs.iter().map(|r| (*r, Vec::new())).collect();
    for round in 0..rounds {
        let mut order = rungs.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        for rung in order {
            let server = match rung {
                Rung::Node => start_node(&data, work.path()),
                Rung::Nginx => start_nginx(nginx.as_deref().expect("nginx"), work.path()),
                in_process => start_rung(in_process, &data),
            };
            let run = load(&server, rung, work.path(), seconds);
            println!(
                "round {round} {:<8} {:>9.0} req/s  {:>5.1} µs CPU/request  p50 {} µs  p99 {} µs",
                rung.name(),
                run.per_second,
                run.cpu_us,
                run.p50_us,
                run.p99_us
            );
            drop(server);
            results
                .iter_mut()
                .find(|(r, _)| *r == rung)
                .expect("rung")
                .1
                .push(run);
        }
    }
    report(results);
}

/// Bytes of RocksDB block cache for every rung that reads RocksDB.
fn block_cache() -> usize {
    env_number(
        "KURA_LADDER_BLOCK_CACHE_MB",
        kura::storage::DEFAULT_BLOCK_CACHE >> 20,
    ) << 20
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn build_data_set(dir: &Path) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let store = Store::open(StoreOptions::new(dir)).expect("open store");
        support::fill(&store, KEYS, key, body).await;
        // Every rung then reads the records from SST files through the block cache, as a node
        // that has been running for a while does.
        store.flush_memtables().expect("flush");
        // Kept open meanwhile, so that RocksDB's compactions after the fill finish here rather
        // than in the first rung: a read within the access-time resolution of its artifact's
        // publish notes no access, so every rung and round starts after it, in the steady state.
        tokio::time::sleep(kura::storage::DEFAULT_ACCESS_TIME_RESOLUTION).await;
    });
    // Shutting the runtime down drops the store's background tasks, and with them the store.
    drop(runtime);
}

fn write_files(dir: &Path) {
    std::fs::create_dir_all(dir).expect("www dir");
    for n in 0..KEYS {
        std::fs::write(dir.join(n.to_string()), body(n)).expect("write file");
    }
}

/// A server under test: its process, and the address to load.
struct Server {
    child: Child,
    addr: SocketAddr,
    /// Where its requests go: a path prefix before the key, and what follows the key.
    path: (&'static str, &'static str),
    /// How to stop it when a kill of its process is not enough (nginx's workers outlive a
    /// killed master).
    stop: Option<Command>,
}

/// Stopped when dropped, also when a run panics: no server outlives the bench.
impl Drop for Server {
    fn drop(&mut self) {
        let asked = self
            .stop
            .as_mut()
            .is_some_and(|command| command.status().is_ok_and(|status| status.success()));
        if asked {
            for _ in 0..1000 {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// CPU ticks used so far by the server and every process it started (nginx's workers).
    fn cpu_ticks(&self) -> u64 {
        let root = self.child.id();
        let mut total = 0;
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // Fields after the command name, which may contain spaces but ends at the last ')'.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let pid: u32 = entry.file_name().to_string_lossy().parse().unwrap_or(0);
            let parent: u32 = fields.get(1).and_then(|f| f.parse().ok()).unwrap_or(0);
            if pid == root || parent == root {
                let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
                total += ticks(11).unwrap_or(0) + ticks(12).unwrap_or(0);
            }
        }
        total
    }
}

/// Re-executes this bench as the server of `rung` and waits for the port it prints.
fn start_rung(rung: Rung, data: &Path) -> Server {
    let exe = std::env::current_exe().expect("own path");
    let mut child = Command::new(exe)
        .env(SERVE_ENV, format!("{}:{}", rung.name(), data.display()))
        .stdout(Stdio::piped())
        .spawn()
        .expect("start rung");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("port");
    let addr = line.trim().parse().expect("address");
    Server {
        child,
        addr,
        path: ("/api/cache/gradle/k4-", ""),
        stop: None,
    }
}

fn start_node(data: &Path, work: &Path) -> Server {
    let tokens = work.join("tokens.toml");
    let digest = sha2_hex(TOKEN);
    std::fs::write(
        &tokens,
        format!(
            "[[tokens]]\nname = \"ladder\"\nsha256 = \"{digest}\"\n\
             [tokens.cache_grants]\naccount = {{ read = [\"dev\"], write = [\"dev\"] }}\n"
        ),
    )
    .expect("tokens file");
    // The node warns about a token file that others can read.
    std::fs::set_permissions(&tokens, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod tokens file");
    let addr = free_address();
    let child = Command::new(env!("CARGO_BIN_EXE_kura"))
        .arg("serve")
        .env("KURA_SERVER_HTTP", addr.to_string())
        .env("KURA_SERVER_GRPC", "127.0.0.1:0")
        .env("KURA_STORAGE_DATA_DIR", data)
        .env("KURA_STORAGE_DURABILITY", "process")
        .env("KURA_AUTH_MODE", "static")
        .env("KURA_AUTH_STATIC_TOKENS_FILE", &tokens)
        .env("KURA_LOG_LEVEL", "warn")
        .env("KURA_STORAGE_BLOCK_CACHE", block_cache().to_string())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.join("node.log")).expect("node log"))
        .spawn()
        .expect("start kura");
    // A clean shutdown (SIGTERM), so that the next rung opens a store closed properly.
    let mut term = Command::new("kill");
    term.args(["-TERM", &child.id().to_string()]);
    let mut server = Server {
        child,
        addr,
        path: ("/api/cache/gradle/k4-", "?account_handle=dev"),
        stop: Some(term),
    };
    wait_until_accepting(&mut server);
    server
}

/// A loopback address whose port was free a moment ago (the servers started on it are not
/// this process's to bind for them).
fn free_address() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
}

fn wait_until_accepting(server: &mut Server) {
    for _ in 0..3000 {
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("the server meant for {} exited: {status}", server.addr);
        }
        if std::net::TcpStream::connect(server.addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("nothing accepts connections on {} after 30 s", server.addr);
}

fn sha2_hex(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

fn nginx_binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
}

fn start_nginx(binary: &Path, work: &Path) -> Server {
    let addr = free_address();
    for dir in ["nginx/body", "nginx/logs"] {
        std::fs::create_dir_all(work.join(dir)).expect("nginx dirs");
    }
    let root =
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").expect("/proc")) == 0;
    let config = include_str!("load/nginx.conf")
        .replace("@USER_LINE@", if root { "user root;" } else { "" })
        .replace("@WORK@", &work.display().to_string())
        .replace("@PORT@", &addr.port().to_string())
        .replace("@EXTRA@", "");
    let path = work.join("nginx/nginx.conf");
    std::fs::write(&path, config).expect("nginx config");
    let child = Command::new(binary)
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(work.join("nginx"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    let mut stop = Command::new(binary);
    stop.arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(work.join("nginx"))
        .args(["-s", "stop"]);
    stop.stderr(Stdio::null());
    let mut server = Server {
        child,
        addr,
        path: ("/k4/", ""),
        stop: Some(stop),
    };
    wait_until_accepting(&mut server);
    server
}

/// One wrk run against a server.
#[derive(Clone, Copy)]
struct Run {
    per_second: f64,
    cpu_us: f64,
    p50_us: u64,
    p99_us: u64,
}

fn load(server: &Server, rung: Rung, work: &Path, seconds: u64) -> Run {
    let script = work.join(format!("{}.lua", rung.name()));
    let mut file = std::fs::File::create(&script).expect("wrk script");
    write!(
        file,
        "-- Each wrk thread runs this in its own interpreter: seeded alike, both would ask for\n\
         -- the same keys in the same order.\n\
         function init(args) math.randomseed(os.time() + tonumber(tostring({{}}):sub(8), 16) % 100000) end\n\
         request = function()\n  return wrk.format(nil, \"{}\" .. math.random(0, {}) .. \"{}\", \
         {{[\"Authorization\"] = \"Bearer {TOKEN}\"}})\nend\n",
        server.path.0,
        KEYS - 1,
        server.path.1,
    )
    .expect("write script");
    let url = format!("http://{}", server.addr);
    let before = server.cpu_ticks();
    let output = Command::new("wrk")
        .args(["-t2", "-c32", "--latency", "-d"])
        .arg(format!("{seconds}s"))
        .arg("-s")
        .arg(&script)
        .arg(&url)
        .output()
        .expect("run wrk");
    let ticks = server.cpu_ticks() - before;
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "wrk failed: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    let requests = wrk_number(&text, "requests in", 0).expect("request count") as f64;
    assert!(
        !text.contains("Non-2xx") && !text.contains("Socket errors"),
        "{} answered errors:\n{text}",
        rung.name()
    );
    Run {
        per_second: wrk_number(&text, "Requests/sec:", 1).expect("req/s"),
        cpu_us: ticks as f64 / TICKS_PER_SECOND * 1e6 / requests,
        p50_us: wrk_latency(&text, "50%"),
        p99_us: wrk_latency(&text, "99%"),
    }
}

/// Field `index` (counted from 0) of wrk's first output line containing `marker`, as a number:
/// wrk prints "N requests in ..." and "Requests/sec: N".
fn wrk_number(text: &str, marker: &str, index: usize) -> Option<f64> {
    let line = text.lines().find(|line| line.contains(marker))?;
    line.split_whitespace().nth(index)?.parse().ok()
}

/// A latency percentile of wrk's `--latency` table, in microseconds.
fn wrk_latency(text: &str, percentile: &str) -> u64 {
    let value = text
        .lines()
        .map(str::split_whitespace)
        .find_map(|mut fields| (fields.next() == Some(percentile)).then(|| fields.next())?)
        .unwrap_or("0us");
    let digits = value.trim_end_matches(char::is_alphabetic);
    let number: f64 = digits.parse().unwrap_or(0.0);
    let scale = match &value[digits.len()..] {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        _ => 0.0,
    };
    (number * scale) as u64
}

fn report(results: Vec<(Rung, Vec<Run>)>) {
    let median = |runs: &[Run]| -> Run {
        let mut sorted: Vec<&Run> = runs.iter().collect();
        sorted.sort_by(|a, b| a.per_second.total_cmp(&b.per_second));
        let m = sorted[sorted.len() / 2];
        *m
    };
    let medians: Vec<(Rung, Run)> = results
        .iter()
        .map(|(rung, runs)| (*rung, median(runs)))
        .collect();
    let nginx = medians
        .iter()
        .find(|(rung, _)| *rung == Rung::Nginx)
        .map(|(_, run)| run.per_second);
    println!("\n| rung | req/s | vs nginx | µs CPU / request | p50 / p99 µs |");
    println!("| --- | ---: | ---: | ---: | --- |");
    for (rung, run) in &medians {
        let ratio = nginx.map_or("—".to_string(), |n| format!("{:.2}", run.per_second / n));
        println!(
            "| {} | {:.0} | {ratio} | {:.1} | {} / {} |",
            rung.label(),
            run.per_second,
            run.cpu_us,
            run.p50_us,
            run.p99_us
        );
    }
}

// --- the in-process rungs (run in a child process: see `start_rung`) ---------------------------

#[derive(Clone)]
struct Rungs {
    rung: Rung,
    memory: Bytes,
    db: Option<Arc<rocksdb::DB>>,
    store: Option<Store>,
}

fn serve(rung: Rung, data: &Path) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let state = Rungs {
            rung,
            memory: Bytes::from(body(0)),
            db: (rung == Rung::RocksDb).then(|| Arc::new(open_db(data))),
            store: (rung == Rung::Store).then(|| {
                Store::open(StoreOptions {
                    block_cache: block_cache(),
                    // What the store's own path adds to rung 2's RocksDB read.
                    read_cache: 0,
                    ..StoreOptions::new(data)
                })
                .expect("open store")
            }),
        };
        let router = Router::new()
            .route("/api/cache/gradle/{key}", get(answer))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        println!("{}", listener.local_addr().expect("address"));
        axum::serve(listener, router).await.expect("serve");
    });
}

/// The store's database opened with the table options and cache size the store uses.
fn open_db(data: &Path) -> rocksdb::DB {
    use rocksdb::{BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DataBlockIndexType};
    let path = data.join("meta");
    let cache = Cache::new_lru_cache(block_cache());
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(&cache);
    table.set_bloom_filter(10.0, false);
    table.set_data_block_index_type(DataBlockIndexType::BinaryAndHash);
    table.set_data_block_hash_ratio(0.75);
    let mut family = rocksdb::Options::default();
    family.set_block_based_table_factory(&table);
    let names = DB::list_cf(&rocksdb::Options::default(), &path).expect("families");
    let families = names
        .iter()
        .map(|name| ColumnFamilyDescriptor::new(name, family.clone()));
    DB::open_cf_descriptors(&rocksdb::Options::default(), &path, families).expect("open db")
}

async fn answer(State(rungs): State<Rungs>, UrlPath(name): UrlPath<String>) -> Response {
    let key = ArtifactKey::new("", Kind::Gradle, name);
    match rungs.rung {
        Rung::Memory => rungs.memory.clone().into_response(),
        Rung::RocksDb => {
            let db = rungs.db.as_ref().expect("db");
            let family = db.cf_handle("artifacts").expect("artifacts family");
            match db.get_pinned_cf(&family, key.encode()) {
                Ok(Some(record)) => Bytes::copy_from_slice(&record).into_response(),
                _ => StatusCode::NOT_FOUND.into_response(),
            }
        }
        _ => {
            let store = rungs.store.as_ref().expect("store");
            let Ok(Some(found)) = store.lookup(&key) else {
                return StatusCode::NOT_FOUND.into_response();
            };
            let Ok(Some(artifact)) = store.open_found(&key, found).await else {
                return StatusCode::NOT_FOUND.into_response();
            };
            let size = artifact.info.size;
            match artifact.into_body(0, size) {
                BodyStream::Bytes(bytes) => bytes.into_response(),
                BodyStream::Stream(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            }
        }
    }
}
