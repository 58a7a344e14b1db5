//! A TCP proxy between two nodes that a test can cut, and that can flip one byte in transit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running proxy; it stops when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

struct Shared {
    upstream: SocketAddr,
    /// While set, open connections are closed and new ones are closed at once.
    cut: AtomicBool,
    /// Tells open connections to close when the link is cut.
    cuts: watch::Sender<u64>,
    /// When set, the first occurrence of these bytes going upstream has its last byte flipped.
    corrupt: Mutex<Option<Vec<u8>>>,
}

impl Proxy {
    /// Listens on `listen` and forwards to `upstream`.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind(listen).await.expect("proxy listen");
        let shared = Arc::new(Shared {
            upstream,
            cut: AtomicBool::new(false),
            cuts: watch::channel(0).0,
            corrupt: Mutex::new(None),
        });
        let accepting = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if accepting.cut.load(Ordering::SeqCst) {
                    continue;
                }
                tokio::spawn(forward(accepting.clone(), client));
            }
        });
        Proxy {
            addr: listen,
            shared,
            task,
        }
    }

    /// Cuts the link: open connections close, new ones are closed as they arrive.
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        self.shared.cuts.send_modify(|n| *n += 1);
    }

    pub fn heal(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// Flips the last byte of the first occurrence of `marker` sent upstream from now on.
    pub fn corrupt_once(&self, marker: &[u8]) {
        *self.shared.corrupt.lock().unwrap() = Some(marker.to_vec());
    }

    /// Whether the armed corruption has happened.
    pub fn corrupted(&self) -> bool {
        self.shared.corrupt.lock().unwrap().is_none()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

async fn forward(shared: Arc<Shared>, client: TcpStream) {
    let Ok(server) = TcpStream::connect(shared.upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let mut cuts = shared.cuts.subscribe();
    let upstream = async {
        let mut buffer = vec![0u8; 64 << 10];
        // The end of the previous read, so a marker split across reads is still found.
        let mut tail: Vec<u8> = Vec::new();
        loop {
            let n = client_read.read(&mut buffer).await?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            flip_marker(&shared, &mut tail, &mut buffer[..n]);
            server_write.write_all(&buffer[..n]).await?;
        }
    };
    let downstream = tokio::io::copy(&mut server_read, &mut client_write);
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
        _ = cuts.changed() => {}
    }
}

/// Flips the marker's last byte if it ends in `chunk` (`tail` is what came before it).
fn flip_marker(shared: &Shared, tail: &mut Vec<u8>, chunk: &mut [u8]) {
    let mut armed = shared.corrupt.lock().unwrap();
    let Some(marker) = armed.as_ref() else {
        return;
    };
    let mut window = tail.clone();
    window.extend_from_slice(chunk);
    if let Some(start) = window.windows(marker.len()).position(|w| w == &marker[..]) {
        let last = start + marker.len() - 1 - tail.len();
        chunk[last] ^= 0x01;
        *armed = None;
        return;
    }
    let keep = marker.len().saturating_sub(1).min(window.len());
    *tail = window[window.len() - keep..].to_vec();
}
