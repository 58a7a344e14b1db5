//! A DNS server for the discovery tests: answers A queries for one name with a set of
//! addresses the test changes as it goes, on UDP on loopback. Everything else gets an empty
//! answer (AAAA) or NXDOMAIN (other names); while failing, every query gets SERVFAIL.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::net::UdpSocket;

pub struct DnsServer {
    pub addr: SocketAddr,
    addresses: Arc<Mutex<Vec<Ipv4Addr>>>,
    failing: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl DnsServer {
    /// Serves `name` on `127.0.0.1` (a free port), answering with `addresses`.
    pub async fn start(name: &str, addresses: &[Ipv4Addr]) -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind DNS");
        let addr = socket.local_addr().unwrap();
        let served = Name::from_ascii(format!("{}.", name.trim_end_matches('.'))).unwrap();
        let addresses = Arc::new(Mutex::new(addresses.to_vec()));
        let current = addresses.clone();
        let failing = Arc::new(AtomicBool::new(false));
        let fails = failing.clone();
        let task = tokio::spawn(async move {
            let mut buffer = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buffer).await else {
                    return;
                };
                let Ok(request) = Message::from_vec(&buffer[..n]) else {
                    continue;
                };
                let ips = current.lock().unwrap().clone();
                let mut response = answer(&request, &served, &ips);
                if fails.load(Ordering::SeqCst) {
                    response.take_answers();
                    response.set_response_code(ResponseCode::ServFail);
                }
                if let Ok(bytes) = response.to_vec() {
                    let _ = socket.send_to(&bytes, from).await;
                }
            }
        });
        DnsServer {
            addr,
            addresses,
            failing,
            task,
        }
    }

    /// What the name resolves to from now on.
    pub fn set(&self, addresses: &[Ipv4Addr]) {
        *self.addresses.lock().unwrap() = addresses.to_vec();
    }

    /// Whether every query gets SERVFAIL from now on (a resolver that cannot say).
    pub fn fail(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// The nameserver setting that points a node here.
    pub fn nameserver(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(request: &Message, served: &Name, ips: &[Ipv4Addr]) -> Message {
    let mut response = Message::new();
    response
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(true);
    response.add_queries(request.queries().to_vec());
    for query in request.queries() {
        if !query.name().eq_case(served) {
            response.set_response_code(ResponseCode::NXDomain);
            continue;
        }
        if query.query_type() == RecordType::A {
            for ip in ips {
                response.add_answer(Record::from_rdata(
                    query.name().clone(),
                    1,
                    RData::A(A(*ip)),
                ));
            }
        }
    }
    response
}
