//! One test per bug found by the adversarial review (issue "Hardening"), each reproducing the
//! attack against the real binary on 127.0.0.1 and named after what it guards.

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Node, NodeOptions, client, payload};
use futures_util::StreamExt;
use reqwest::StatusCode;

/// Waits up to `limit` for the node to close `stream`, reading and dropping whatever it sends;
/// returns how long that took, or `None` while it is still open.
fn wait_for_close(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("read timeout");
    let mut buf = [0u8; 4096];
    while started.elapsed() < limit {
        match stream.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(started.elapsed()),
        }
    }
    None
}

/// Sends a keep-alive `GET path` and reads one whole response (it has a `content-length`);
/// returns its head.
fn keep_alive_get(stream: &mut TcpStream, path: &str) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: kura\r\n\r\n").expect("send request");
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("content-length");
            if data.len() >= end + 4 + length {
                return head;
            }
        }
        let n = stream.read(&mut buf).expect("read response");
        assert!(n > 0, "connection closed before the whole response");
        data.extend_from_slice(&buf[..n]);
    }
}

/// `count` connections that never complete a request: every other one sends nothing, the
/// others half a request line.
fn idle_connections(addr: SocketAddr, count: usize) -> Vec<TcpStream> {
    (0..count)
        .map(|i| {
            let mut stream = TcpStream::connect(addr).expect("connect");
            if i % 2 == 1 {
                stream.write_all(b"GET /up HT").expect("half a request");
            }
            stream
        })
        .collect()
}

/// Item 2 (header timeout): a client that sends one header line a second never finishes its
/// request; it must be cut off once `server.header_timeout` has passed since its first byte.
#[test]
fn slow_header_client_is_disconnected_after_the_header_timeout() {
    let node = Node::start_with(NodeOptions::default().env("KURA_SERVER_HEADER_TIMEOUT", "2s"));
    let mut stream = TcpStream::connect(node.addr).expect("connect");
    let started = Instant::now();
    stream
        .write_all(b"GET /up HTTP/1.1\r\n")
        .expect("request line");
    let mut closed_after = None;
    for line in 0..10 {
        if wait_for_close(&mut stream, Duration::from_secs(1)).is_some()
            || write!(stream, "x-slow-{line}: y\r\n").is_err()
        {
            closed_after = Some(started.elapsed());
            break;
        }
    }
    let closed_after = closed_after.expect("still connected after 10 s of slow headers");
    assert!(
        closed_after >= Duration::from_millis(1500),
        "cut before the header timeout: {closed_after:?}"
    );
    assert!(
        closed_after < Duration::from_secs(5),
        "cut too late: {closed_after:?}"
    );
}

/// Item 2 (idle timeout): a keep-alive connection with no request in flight is closed after
/// `server.idle_timeout`, while a download read more slowly than that is not cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connection_is_closed_but_a_slow_download_is_not() {
    const SIZE: usize = 32 << 20;
    const RATE: f64 = (6 << 20) as f64; // bytes per second: the download takes over 5 s
    let node = Node::start_with(
        NodeOptions::default()
            .env("KURA_SERVER_IDLE_TIMEOUT", "2s")
            .env("KURA_LIMITS_GRADLE", "64MiB"),
    );
    let url = node.url("/api/cache/gradle/slow?account_handle=dev");
    let body = payload(21, SIZE);
    let put = client().put(&url).body(body.clone()).send().await.unwrap();
    assert_eq!(put.status(), StatusCode::CREATED);

    let addr = node.addr;
    let idle = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).expect("connect");
        let head = keep_alive_get(&mut stream, "/up");
        assert!(head.starts_with("http/1.1 200"), "{head}");
        wait_for_close(&mut stream, Duration::from_secs(6))
    });

    let download = client().get(&url).send().await.unwrap();
    assert_eq!(download.status(), StatusCode::OK);
    let started = Instant::now();
    let mut stream = download.bytes_stream();
    let mut received = Vec::with_capacity(SIZE);
    let mut in_flight_past_idle_timeout = None;
    while let Some(chunk) = stream.next().await {
        received.extend_from_slice(&chunk.expect("the download was cut"));
        let due = Duration::from_secs_f64(received.len() as f64 / RATE);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        if in_flight_past_idle_timeout.is_none() && started.elapsed() > Duration::from_secs(3) {
            in_flight_past_idle_timeout = Some(node.metric("kura_http_requests_in_flight").await);
        }
    }
    assert_eq!(received.len(), SIZE);
    assert!(received == body, "the download arrives intact");
    assert_eq!(
        in_flight_past_idle_timeout,
        Some(1),
        "the node was still sending 3 s in (longer than the idle timeout)"
    );

    let closed_after = idle
        .await
        .unwrap()
        .expect("an idle keep-alive connection still open 6 s after its response");
    assert!(
        closed_after >= Duration::from_millis(1500),
        "closed before the idle timeout: {closed_after:?}"
    );
}

/// Item 2 (connection limit): idle sockets (silent, or half a request line) up to and past
/// `server.max_connections` must not lock out a probe from a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_past_max_connections_do_not_lock_out_probes() {
    let node = Node::start_with(NodeOptions::default().env("KURA_SERVER_MAX_CONNECTIONS", "64"));
    let idle = idle_connections(node.addr, 300);
    let up = tokio::time::timeout(Duration::from_secs(2), client().get(node.url("/up")).send())
        .await
        .expect("/up answers within 2 s")
        .expect("/up");
    assert_eq!(up.status(), StatusCode::OK);
    drop(idle);
}

/// Item 2 (accept errors): with a descriptor limit of 256, 300 idle connections make
/// `accept()` fail with EMFILE; the node must make room by closing idle connections rather than
/// stop answering (it used to retry once a second while the idle sockets held every
/// descriptor, forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_does_not_stop_accepting() {
    let node = Node::start_with(NodeOptions::default().nofile(256));
    let idle = idle_connections(node.addr, 300);
    let up = tokio::time::timeout(Duration::from_secs(2), client().get(node.url("/up")).send())
        .await
        .expect("/up answers within 2 s")
        .expect("/up");
    assert_eq!(up.status(), StatusCode::OK);
    drop(idle);
}

/// Item 14: over h2c, a PUT refused early (413, body unread) reached curl as error 92 ("HTTP/2
/// stream was not closed cleanly") without its status. curl must see the 413 and exit 0.
#[test]
fn h2c_early_413_reaches_curl_with_its_status() {
    let node = Node::start_with(NodeOptions::default().env("KURA_LIMITS_GRADLE", "1MiB"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("3MB");
    std::fs::write(&file, payload(14, 3_000_000)).unwrap();
    let url = node.url("/api/cache/gradle/too-big?account_handle=dev");
    for attempt in 1..=3 {
        let output = Command::new("curl")
            .args(["-sS", "--http2-prior-knowledge", "--max-time", "10"])
            .args(["-X", "PUT", "--data-binary"])
            .arg(format!("@{}", file.display()))
            .args(["-o", "/dev/null", "-w", "%{http_code}"])
            .arg(&url)
            .output()
            .unwrap_or_else(|e| {
                panic!("this test needs curl with HTTP/2 on PATH (apt-get install curl): {e}")
            });
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            (output.status.code(), stdout.trim()),
            (Some(0), "413"),
            "attempt {attempt}: curl {stderr}"
        );
    }
}

/// Item 2 (drain): once draining, idle keep-alive connections are closed, and a new connection
/// still gets its probe answered, with `connection: close`.
#[test]
fn drain_closes_idle_keep_alive_connections_and_still_answers_probes() {
    let node = Node::start();
    let mut kept = TcpStream::connect(node.addr).expect("connect");
    let head = keep_alive_get(&mut kept, "/up");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    node.signal(libc::SIGUSR1);
    assert!(
        wait_for_close(&mut kept, Duration::from_secs(3)).is_some(),
        "an idle keep-alive connection outlived the start of the drain"
    );
    let mut probe = TcpStream::connect(node.addr).expect("connect");
    let head = keep_alive_get(&mut probe, "/up");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(
        wait_for_close(&mut probe, Duration::from_secs(3)).is_some(),
        "a connection opened while draining outlived its request"
    );
}
