//! Test harness: runs the real `kura` binary on 127.0.0.1 with a temp data dir.
//!
//! The node binds port 0; the harness learns the address from the node's JSON start-up log
//! line, so parallel tests never race for ports. Logs are kept for assertions.
#![allow(dead_code)]

pub mod control_plane;
pub mod dns;
pub mod grpc;
pub mod mesh;
pub mod proxy;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One running node.
pub struct Node {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// The gRPC (REAPI) listener.
    pub grpc_addr: SocketAddr,
    pub data_dir: PathBuf,
    env: Vec<(String, String)>,
    wrapper: Vec<String>,
    nofile: Option<u64>,
    logs: Arc<Mutex<Vec<String>>>,
    _temp: Option<tempfile::TempDir>,
}

/// How to start a node.
#[derive(Default, Clone)]
pub struct NodeOptions {
    /// Extra `KURA_*` variables (and any other environment).
    pub env: Vec<(String, String)>,
    /// Reuse this data dir instead of a fresh temp one.
    pub data_dir: Option<PathBuf>,
    /// Run the node under this command (e.g. `strace -f -o log`), which gets the node's path
    /// and arguments appended.
    pub wrapper: Vec<String>,
    /// Run the node with this file descriptor limit (RLIMIT_NOFILE).
    pub nofile: Option<u64>,
}

impl NodeOptions {
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_string(), value.into()));
        self
    }

    pub fn wrapped_in(mut self, command: &[&str]) -> Self {
        self.wrapper = command.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn nofile(mut self, limit: u64) -> Self {
        self.nofile = Some(limit);
        self
    }
}

impl Node {
    pub fn start() -> Node {
        Node::start_with(NodeOptions::default())
    }

    pub fn start_with(options: NodeOptions) -> Node {
        let (temp, data_dir) = match options.data_dir {
            Some(dir) => (None, dir),
            None => {
                let temp = tempfile::tempdir().expect("temp dir");
                let dir = temp.path().join("data");
                (Some(temp), dir)
            }
        };
        let mut env = vec![
            ("KURA_SERVER_HTTP".to_string(), "127.0.0.1:0".to_string()),
            ("KURA_SERVER_GRPC".to_string(), "127.0.0.1:0".to_string()),
            (
                "KURA_STORAGE_DATA_DIR".to_string(),
                data_dir.display().to_string(),
            ),
            ("KURA_LOG_FORMAT".to_string(), "json".to_string()),
            ("KURA_LOG_LEVEL".to_string(), "info".to_string()),
        ];
        env.extend(options.env);
        let mut node = Node {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir,
            env,
            wrapper: options.wrapper,
            nofile: options.nofile,
            logs: Arc::new(Mutex::new(Vec::new())),
            _temp: temp,
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        let binary = env!("CARGO_BIN_EXE_kura");
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        command
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command.env_clear();
        for key in ["PATH", "HOME", "TMPDIR"] {
            if let Ok(value) = std::env::var(key) {
                command.env(key, value);
            }
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(limit) = self.nofile {
            limit_descriptors(&mut command, limit);
        }
        let mut child = command.spawn().expect("start kura");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        let logs = self.logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("kura is serving")
                    && let Some(addr) = json_field(&line, "address")
                    && let Some(grpc) = json_field(&line, "grpc_address")
                {
                    let _ = tx.send((addr, grpc));
                }
                logs.lock().unwrap().push(line);
            }
        });
        let (addr, grpc_addr) = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addrs) => addrs,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "kura did not start; logs:\n{}",
                    self.logs.lock().unwrap().join("\n")
                );
            }
        };
        self.addr = addr.parse().expect("address in log");
        self.grpc_addr = grpc_addr.parse().expect("grpc_address in log");
        self.child = Some(child);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends a signal (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// kill -9, then wait for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Under a wrapper the node is the wrapper's child: kill it first.
            let pid = child.id();
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            for grandchild in children
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill(2) on a process the test started.
                unsafe { libc::kill(grandchild, libc::SIGKILL) };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the node again on the same data dir (same address, a new port).
    pub fn restart(&mut self) {
        self.kill9();
        let host = self.addr.ip();
        self.env.retain(|(k, _)| k != "KURA_SERVER_HTTP");
        self.env
            .push(("KURA_SERVER_HTTP".into(), format!("{host}:0")));
        self.spawn();
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the node logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Peak resident set size of the node process (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:") * 1024
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// A JSON document the node serves at `path` (e.g. `/up`, `/status`).
    pub async fn json(&self, path: &str) -> serde_json::Value {
        let response = client().get(self.url(path)).send().await.expect("request");
        response.json().await.expect("JSON body")
    }

    /// The node's `/status` document.
    pub async fn status(&self) -> serde_json::Value {
        self.json("/status").await
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        let response = client()
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics");
        response.text().await.expect("metrics text")
    }

    /// The value of one series in `/metrics` (`name{labels}` as printed), 0 when absent.
    pub async fn metric(&self, series: &str) -> u64 {
        let text = self.metrics().await;
        text.lines()
            .find(|line| line.split_whitespace().next() == Some(series))
            .and_then(|line| line.split_whitespace().last()?.parse::<f64>().ok())
            .map_or(0, |value| value as u64)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Sets RLIMIT_NOFILE in the child before it runs.
fn limit_descriptors(command: &mut Command, limit: u64) {
    use std::os::unix::process::CommandExt;
    let rlimit = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: setrlimit(2) is async-signal-safe and touches nothing of the parent.
    unsafe {
        command.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn json_field(line: &str, field: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = value.get("fields").unwrap_or(&value);
    fields.get(field)?.as_str().map(str::to_owned)
}

/// What one artifact without a content type counts against capacity (docs/storage.md): its
/// body, its encoded key (`project \0 kind \0 key`) twice, and 160 bytes for the record.
pub fn artifact_charge(body_len: u64, project: &str, kind: &str, key: &str) -> u64 {
    let encoded = project.len() + 1 + kind.len() + 1 + key.len();
    body_len + 2 * encoded as u64 + 160
}

/// The body files on disk (there is one per file-backed artifact).
pub fn body_files(node: &Node) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for shard in std::fs::read_dir(node.data_dir().join("bodies")).unwrap() {
        for file in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            files.push(file.unwrap().path());
        }
    }
    files
}

/// Flips bits of one byte of a file in place (simulated disk corruption).
pub fn flip_byte(path: &Path, offset: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8; 1];
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.read_exact(&mut byte).unwrap();
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.write_all(&[byte[0] ^ 0x40]).unwrap();
}

/// A reqwest client that never reuses connections (the node closes some after early answers)
/// and never follows redirects.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

/// Sends a request and gives its status (for tests that need nothing else of the answer).
pub trait StatusOf {
    fn status_of(self) -> impl std::future::Future<Output = reqwest::StatusCode>;
}

impl StatusOf for reqwest::RequestBuilder {
    async fn status_of(self) -> reqwest::StatusCode {
        self.send().await.expect("request").status()
    }
}

/// Deterministic pseudo-random bytes for `seed` (so a test can regenerate what it uploaded).
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// SHA-256 of a token, as a static tokens file wants it.
pub fn token_hash(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// Writes a static tokens file granting each `(token, grants TOML)` and returns its path.
/// A node of account `acme` in `static` auth mode with `tokens` (name, token, grant); the
/// temp dir holds the tokens file.
pub fn static_auth_node(tokens: &[(&str, &str, &str)]) -> (Node, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = static_tokens_file(dir.path(), tokens);
    let node = Node::start_with(
        NodeOptions::default()
            .env("KURA_NODE_ACCOUNT", "acme")
            .env("KURA_AUTH_MODE", "static")
            .env("KURA_AUTH_STATIC_TOKENS_FILE", file.display().to_string()),
    );
    (node, dir)
}

pub fn static_tokens_file(dir: &Path, tokens: &[(&str, &str, &str)]) -> PathBuf {
    let mut text = String::new();
    for (name, token, grants) in tokens {
        text.push_str(&format!(
            "[[tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\n[tokens.cache_grants]\n{grants}\n\n",
            token_hash(token)
        ));
    }
    let path = dir.join("tokens.toml");
    std::fs::write(&path, text).expect("write tokens");
    path
}

/// Sends `head` (request line and headers, ending in a blank line) and then `body`, ignoring
/// write errors (the node may answer and close early), and returns the whole raw response.
pub fn raw_exchange(addr: SocketAddr, head: &str, body: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}

/// One request of a cache route family, aimed at `project` of account `acme`.
pub struct Route {
    pub name: &'static str,
    pub method: reqwest::Method,
    pub path: String,
    pub body: &'static str,
}

/// A request of every HTTP route family that takes a token.
pub fn route_families(project: &str) -> Vec<Route> {
    use reqwest::Method;
    const HASH: &str = "3b1f6a0e6a3b5c0b9f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778";
    let q = format!("account_handle=acme&project_handle={project}");
    let r = |name, method, path: String, body| Route {
        name,
        method,
        path,
        body,
    };
    vec![
        r(
            "gradle query GET",
            Method::GET,
            format!("/api/cache/gradle/k?{q}"),
            "",
        ),
        r(
            "gradle query PUT",
            Method::PUT,
            format!("/api/cache/gradle/k?{q}"),
            "x",
        ),
        r(
            "gradle path GET",
            Method::GET,
            format!("/api/cache/gradle/acme/{project}/k"),
            "",
        ),
        r(
            "gradle path PUT",
            Method::PUT,
            format!("/api/cache/gradle/acme/{project}/k"),
            "x",
        ),
        r("cas GET", Method::GET, format!("/api/cache/cas/c?{q}"), ""),
        r(
            "cas POST",
            Method::POST,
            format!("/api/cache/cas/c?{q}"),
            "x",
        ),
        r(
            "keyvalue GET",
            Method::GET,
            format!("/api/cache/keyvalue/c?{q}"),
            "",
        ),
        r(
            "keyvalue PUT",
            Method::PUT,
            format!("/api/cache/keyvalue?{q}"),
            r#"{"cas_id":"c","entries":[]}"#,
        ),
        r(
            "module start",
            Method::POST,
            format!("/api/cache/module/start?hash=h&name=n&{q}"),
            "",
        ),
        r(
            "module GET",
            Method::GET,
            format!("/api/cache/module/h?name=n&{q}"),
            "",
        ),
        r("clean", Method::DELETE, format!("/api/cache/clean?{q}"), ""),
        r(
            "bazel ac GET",
            Method::GET,
            format!("/bazel/acme/{project}/ac/{HASH}"),
            "",
        ),
        r(
            "bazel ac PUT",
            Method::PUT,
            format!("/bazel/acme/{project}/ac/{HASH}"),
            "x",
        ),
    ]
}

/// Sends one route-family request with an optional bearer token.
pub async fn send_route(node: &Node, route: &Route, token: Option<&str>) -> reqwest::Response {
    let mut request = client()
        .request(route.method.clone(), node.url(&route.path))
        .body(route.body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("request")
}

/// Whether a status means the authorizer let the request through.
pub fn authorized(status: reqwest::StatusCode) -> bool {
    !matches!(status.as_u16(), 401 | 403 | 503)
}
