//! Start-up refusals, the data-dir lock, and the drain on SIGTERM.

use crate::common;

use std::process::Command;
use std::time::Duration;

use common::{Node, NodeOptions, client};
use futures_util::StreamExt;
use reqwest::StatusCode;

const GIB: u64 = 1 << 30;
const CHUNK: usize = 1 << 20;

/// A 1 GiB body generated on the fly (chunk `i` is `payload(i, 1 MiB)`), never held whole.
fn gib_stream() -> reqwest::Body {
    let chunks = futures_util::stream::iter(0..(GIB as usize / CHUNK))
        .map(|i| Ok::<_, std::io::Error>(common::payload(i as u64, CHUNK)));
    reqwest::Body::wrap_stream(chunks)
}

fn gib_hash() -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    for i in 0..(GIB as usize / CHUNK) {
        hasher.update(&common::payload(i as u64, CHUNK));
    }
    hasher.finalize()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_1_gib_download_finish_and_exits_0() {
    let mut node = Node::start_with(NodeOptions::default().env("KURA_LIMITS_GRADLE", "2GiB"));
    let http = client();
    let url = node.url("/api/cache/gradle/big?account_handle=dev");
    let put = http
        .put(&url)
        .header("content-length", GIB.to_string())
        .body(gib_stream())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::CREATED);

    let download = http.get(&url).send().await.unwrap();
    assert_eq!(download.status(), StatusCode::OK);
    let mut body = download.bytes_stream();
    let mut hasher = blake3::Hasher::new();
    let mut received = 0u64;
    // Take the first chunk, then ask the node to stop.
    let first = body.next().await.unwrap().unwrap();
    hasher.update(&first);
    received += first.len() as u64;
    node.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let ready = http.get(node.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        ready.json::<serde_json::Value>().await.unwrap()["state"],
        "draining"
    );
    let refused = http
        .get(node.url("/api/cache/gradle/other?account_handle=dev"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()["connection"], "close");
    assert_eq!(
        refused.json::<serde_json::Value>().await.unwrap()["error"],
        "draining"
    );
    assert!(
        node.wait_exit(Duration::from_millis(100)).is_none(),
        "must not exit while the download runs"
    );

    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        hasher.update(&chunk);
        received += chunk.len() as u64;
    }
    assert_eq!(received, GIB);
    assert_eq!(
        hasher.finalize(),
        gib_hash(),
        "the download completes byte-identical"
    );
    let status = node
        .wait_exit(Duration::from_secs(20))
        .expect("node exits after the drain");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn sigusr1_drains_without_exiting() {
    let mut node = Node::start();
    let http = client();
    node.signal(libc::SIGUSR1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        http.get(node.url("/ready")).send().await.unwrap().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        http.get(node.url("/up")).send().await.unwrap().status(),
        StatusCode::OK
    );
    assert!(node.wait_exit(Duration::from_millis(500)).is_none());
}

#[test]
fn a_second_node_on_the_same_data_dir_is_refused() {
    let node = Node::start();
    let output = Command::new(env!("CARGO_BIN_EXE_kura"))
        .arg("serve")
        .env("KURA_SERVER_HTTP", "127.0.0.1:0")
        .env("KURA_STORAGE_DATA_DIR", node.data_dir())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("in use by another kura process"),
        "{stderr}"
    );
}

#[test]
fn open_auth_refuses_a_public_address_without_allow_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_kura"))
        .arg("serve")
        .env("KURA_SERVER_HTTP", "0.0.0.0:0")
        .env("KURA_STORAGE_DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--allow-insecure"));
}

#[test]
fn config_check_names_the_bad_key_and_redacts_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kura.toml");
    std::fs::write(&path, "[storage]\ncapacity = \"lots\"\n").unwrap();
    let bad = Command::new(env!("CARGO_BIN_EXE_kura"))
        .args(["config", "check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("storage.capacity"));

    std::fs::write(&path, "[node]\naccount = \"acme\"\n").unwrap();
    let good = Command::new(env!("CARGO_BIN_EXE_kura"))
        .args(["config", "check", "--config"])
        .arg(&path)
        .env("KURA_AUTH_CLIENT_SECRET", "hunter2-secret")
        .output()
        .unwrap();
    assert!(good.status.success());
    let printed = String::from_utf8_lossy(&good.stdout);
    assert!(printed.contains("account = \"acme\""), "{printed}");
    assert!(
        printed.contains("<redacted>") && !printed.contains("hunter2-secret"),
        "{printed}"
    );
}

#[test]
fn token_hash_prints_the_sha256_of_stdin() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kura"))
        .args(["token", "hash"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"dev-token\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        common::token_hash("dev-token")
    );
}

/// The node re-executes itself with glibc's larger thread cache in `GLIBC_TUNABLES` (as the same
/// process: the harness still reads its log), and an operator's own settings win.
#[test]
fn the_node_runs_with_its_malloc_tunables_unless_the_operator_set_them() {
    // The node logs them at start (its /proc environ no longer shows them whole: glibc splits
    // the original string in place when it parses it).
    let tunables = |node: &Node| -> Option<String> {
        node.logs().lines().find_map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).ok()?;
            Some(value["fields"]["glibc_tunables"].as_str()?.to_owned())
        })
    };
    let node = Node::start();
    assert_eq!(
        tunables(&node).as_deref(),
        Some(
            "glibc.malloc.tcache_count=64:glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=524288:glibc.malloc.trim_threshold=4194304"
        )
    );
    let node = Node::start_with(
        NodeOptions::default()
            .env("MALLOC_ARENA_MAX", "4")
            .env("MALLOC_TRIM_THRESHOLD_", "131072"),
    );
    assert_eq!(
        tunables(&node).as_deref(),
        Some("glibc.malloc.tcache_count=64:glibc.malloc.mmap_threshold=524288")
    );
    let node =
        Node::start_with(NodeOptions::default().env("GLIBC_TUNABLES", "glibc.malloc.arena_max=8"));
    assert_eq!(tunables(&node).as_deref(), Some("glibc.malloc.arena_max=8"));
    // Marked as re-executed already (glibc erased the variable: secure execution), it starts
    // as it is instead of re-executing again.
    let node = Node::start_with(NodeOptions::default().env("KURA_MALLOC_TUNED", "1"));
    assert_eq!(tunables(&node), None, "started, and without re-executing");
}

#[tokio::test]
async fn restart_keeps_artifacts_and_node_id() {
    let mut node = Node::start();
    let http = client();
    let url = |node: &Node| node.url("/api/cache/gradle/keep?account_handle=dev");
    http.put(url(&node)).body("kept").send().await.unwrap();
    let before: serde_json::Value = node.json("/up").await;
    node.restart();
    let after: serde_json::Value = node.json("/up").await;
    assert_eq!(before["node_id"], after["node_id"]);
    assert_eq!(
        http.get(url(&node))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "kept"
    );
    let status = node.status().await;
    assert_eq!(status["artifacts"], 1);
    assert_eq!(
        status["disk"]["used_bytes"],
        common::artifact_charge(4, "", "gradle", "keep")
    );
}

/// The README's first command runs `kura serve` with no config and no `KURA_*` variables: that
/// node must listen on 127.0.0.1:4000, keep its data in ./kura-data, and round-trip the README's
/// curl example byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_config_dev_node_serves_the_readme_example() {
    use std::net::TcpStream;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while TcpStream::connect("127.0.0.1:4000").is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "127.0.0.1:4000 is in use: stop the dev node running there"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let cwd = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kura"))
        .arg("serve")
        .current_dir(cwd.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let http = client();
    let up = loop {
        match http.get("http://127.0.0.1:4000/up").send().await {
            Ok(response) => break response,
            Err(_) if std::time::Instant::now() < deadline + Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(error) => panic!("dev node did not come up: {error}"),
        }
    };
    let up: serde_json::Value = up.json().await.unwrap();
    assert_eq!(up["account"], "dev");
    let body = common::payload(77, 1_000_000);
    let url = "http://127.0.0.1:4000/api/cache/gradle/k1?account_handle=dev";
    let put = http.put(url).body(body.clone()).send().await.unwrap();
    assert_eq!(put.status(), StatusCode::CREATED);
    assert_eq!(
        http.get(url).send().await.unwrap().bytes().await.unwrap(),
        body
    );
    assert!(
        cwd.path().join("kura-data/meta").is_dir(),
        "data lives in ./kura-data"
    );
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}
