//! The account mesh with nodes as real processes on 127.0.0.x (insecure peer plane, static
//! peers): what one node stores reaches the others, whatever the kind, the size, the faults.
//!
//! Loopback octets by test (each test owns its addresses, so tests run in parallel):
//! 10–12 every kind, 20–22 cleans, 23–25 last writer wins, 26–27 the bandwidth limit, 28–29 and 33–34 eviction, 35–36 bootstrap's timeout, 37–38 a peer too small for an artifact, 30–32 a stopped peer, 40–41 a killed
//! peer, 50–51 a killed writer, 60–61 progress in `/status` and `/metrics`, 70–71 another
//! account, 80–83 a proxy between two nodes, 110–111 the log's bound, 112 bad catch-up requests, 120–121 a
//! wiped node, 122–124 bootstrap's budget, 125–126 two nodes under one node id, 127–129 bootstrap's budget
//! with small artifacts.

use std::time::Duration;

use kura::grpc::proto::health::HealthCheckRequest;
use kura::grpc::proto::health::health_check_response::ServingStatus;
use kura::grpc::proto::reapi::{ActionResult, OutputFile, UpdateActionResultRequest};
use serde_json::json;

use crate::common::grpc::{Grpc, blob_name, sha256, upload_name};
use crate::common::mesh::{
    ACCOUNT, PEER_PORT, assert_replicated, body_at, eventually, gradle_path, mesh_options,
    node_options, peer_url, put, start_discovered_mesh, start_mesh, wait_admitted, wait_ready,
};
use crate::common::proxy::Proxy;
use crate::common::{Node, artifact_charge, client, payload};

/// Xcode CAS, key-value and module paths take the account and project as query parameters.
fn scoped(path: &str, project: &str) -> String {
    let separator = if path.contains('?') { '&' } else { '?' };
    format!("{path}{separator}account_handle={ACCOUNT}&project_handle={project}")
}

/// Uploads `body` as a module in three parts on `node`.
async fn upload_module(node: &Node, hash: &str, body: &[u8]) {
    let http = client();
    let start: serde_json::Value = http
        .post(node.url(&scoped(
            &format!("/api/cache/module/start?hash={hash}&name=App.zip"),
            "ios",
        )))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = start["upload_id"].as_str().expect("upload id").to_string();
    let third = body.len() / 3;
    let parts = [&body[..third], &body[third..2 * third], &body[2 * third..]];
    for (n, part) in parts.iter().enumerate() {
        let url = scoped(
            &format!(
                "/api/cache/module/part?upload_id={id}&part_number={}",
                n + 1
            ),
            "ios",
        );
        let status = http
            .post(node.url(&url))
            .body(part.to_vec())
            .send()
            .await
            .unwrap()
            .status();
        assert!(status.is_success(), "part {n}: {status}");
    }
    let complete = scoped(&format!("/api/cache/module/complete?upload_id={id}"), "ios");
    let status = http
        .post(node.url(&complete))
        .json(&json!({"parts": [1, 2, 3]}))
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_success(), "complete: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_written_on_any_node_is_readable_byte_identical_on_the_others() {
    // The three find each other through DNS only.
    let (nodes, _dns) = start_discovered_mesh(&[10, 11, 12]).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);

    // Each kind written on a different node; one large artifact takes the streamed path.
    let small = payload(1, 1000);
    let large = payload(2, 3 << 20);
    let cas = payload(3, 5000);
    let keyvalue_put = json!({"cas_id": "kv1", "entries": [{"value": "v"}]}).to_string();
    let module = payload(4, 700_000);
    let bazel = payload(5, 2000);
    let bazel_path = format!(
        "/bazel/{ACCOUNT}/ios/cas/{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bazel))
    );
    put(a, &gradle_path("ios", "small"), small.clone()).await;
    put(b, &gradle_path("ios", "large"), large.clone()).await;
    let status = client()
        .post(c.url(&scoped("/api/cache/cas/cas1", "ios")))
        .body(cas.clone())
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_success(), "{status}");
    put(
        a,
        &scoped("/api/cache/keyvalue", "ios"),
        keyvalue_put.into_bytes(),
    )
    .await;
    upload_module(b, "m1", &module).await;
    put(c, &bazel_path, bazel.clone()).await;

    // REAPI: a blob and an action result naming it, written over gRPC on `a`.
    let grpc = Grpc::connect(a).await;
    let output = payload(6, 4000);
    let digest = sha256(&output);
    grpc.write(&upload_name("ios", "u1", &digest), &output)
        .await
        .unwrap();
    let action = sha256(b"action");
    let result = ActionResult {
        output_files: vec![OutputFile {
            path: "out/a.o".into(),
            digest: Some(digest.clone()),
            ..Default::default()
        }],
        exit_code: 0,
        ..Default::default()
    };
    grpc.action_cache()
        .update_action_result(grpc.request(UpdateActionResultRequest {
            instance_name: "ios".into(),
            action_digest: Some(action.clone()),
            action_result: Some(result.clone()),
            ..Default::default()
        }))
        .await
        .unwrap();

    // A key-value entry is served in its own shape: what the writer serves, the others must.
    let keyvalue_path = scoped("/api/cache/keyvalue/kv1", "ios");
    let keyvalue = body_at(a, &keyvalue_path)
        .await
        .expect("keyvalue on its writer");
    for node in &nodes {
        assert_replicated(node, &gradle_path("ios", "small"), &small).await;
        assert_replicated(node, &gradle_path("ios", "large"), &large).await;
        assert_replicated(node, &scoped("/api/cache/cas/cas1", "ios"), &cas).await;
        assert_replicated(node, &keyvalue_path, &keyvalue).await;
        assert_replicated(
            node,
            &scoped("/api/cache/module/m1?name=App.zip", "ios"),
            &module,
        )
        .await;
        assert_replicated(node, &bazel_path, &bazel).await;
        let grpc = Grpc::connect(node).await;
        let read = grpc.read(&blob_name("ios", &digest), 0, 0).await;
        assert_eq!(
            read.ok().as_deref(),
            Some(&output[..]),
            "blob on {}",
            node.addr
        );
        let got = eventually(Duration::from_secs(30), || async {
            grpc.get_action_result("ios", action.clone()).await.ok()
        })
        .await;
        assert_eq!(
            got.as_ref(),
            Some(&result),
            "action result on {}",
            node.addr
        );
    }
    // No peer refused anything: a `connect` error while the others were still starting is
    // expected; an entry sent back to its origin would be refused (`status`).
    for node in &nodes {
        let status = node.status().await;
        for peer in status["peers"].as_array().unwrap() {
            assert_eq!(peer["state"], "admitted", "{status}");
            let errors = peer["errors"].as_object().unwrap();
            assert!(errors.keys().all(|reason| reason == "connect"), "{status}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_on_one_node_removes_the_project_everywhere_and_older_copies_stay_out() {
    let nodes = start_mesh(&[20, 21, 22]).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let before = payload(7, 100);
    put(a, &gradle_path("ios", "before"), before.clone()).await;
    put(a, &gradle_path("android", "kept"), before.clone()).await;
    for node in &nodes {
        assert_replicated(node, &gradle_path("ios", "before"), &before).await;
    }
    // `c` stops; `a` writes a key `c` will receive late, then `b` cleans the project after it.
    c.signal(libc::SIGSTOP);
    put(a, &gradle_path("ios", "late"), payload(8, 100)).await;
    assert_replicated(b, &gradle_path("ios", "late"), &payload(8, 100)).await;
    let status = client()
        .delete(b.url(&scoped("/api/cache/clean", "ios")))
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_success(), "{status}");
    c.signal(libc::SIGCONT);
    // A write stamped in the same millisecond as the clean is older-or-equal and loses to it on
    // every node (replication.md: a tombstone removes `version_ms` ≤ its own). The write must be
    // a millisecond later to be "after" it; without this wait, a write on `a` that beat the
    // clean's arrival there within the same millisecond was removed everywhere, now and then.
    tokio::time::sleep(Duration::from_millis(2)).await;
    let after = payload(9, 100);
    put(a, &gradle_path("ios", "after"), after.clone()).await;
    for node in &nodes {
        assert_replicated(node, &gradle_path("ios", "after"), &after).await;
        assert_replicated(node, &gradle_path("android", "kept"), &before).await;
        for gone in ["before", "late"] {
            let absent = eventually(Duration::from_secs(30), || async {
                body_at(node, &gradle_path("ios", gone))
                    .await
                    .is_none()
                    .then_some(())
            })
            .await;
            assert!(absent.is_some(), "ios/{gone} still on {}", node.addr);
        }
    }
    // Whatever order `c` received them in, the older upsert did not come back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(body_at(c, &gradle_path("ios", "late")).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_of_one_key_on_two_nodes_converge_to_the_same_bytes() {
    let nodes = start_mesh(&[23, 24, 25]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let keys: Vec<String> = (0..20).map(|i| format!("race{i}")).collect();
    let mut writes = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        for (n, node) in [a, b].into_iter().enumerate() {
            let url = node.url(&gradle_path("ios", key));
            let body = payload(100 + (i * 2 + n) as u64, 500);
            writes.push(tokio::spawn(async move {
                client().put(url).body(body).send().await.unwrap().status()
            }));
        }
    }
    for write in writes {
        assert!(write.await.unwrap().is_success());
    }
    for key in &keys {
        let path = gradle_path("ios", key);
        let agreed = eventually(Duration::from_secs(30), || async {
            let mut seen = Vec::new();
            for node in &nodes {
                seen.push(body_at(node, &path).await?);
            }
            seen.windows(2).all(|w| w[0] == w[1]).then_some(())
        })
        .await;
        assert!(agreed.is_some(), "{key} did not converge");
    }
}

/// Writes `count` small Gradle artifacts to `node`, 16 at a time; returns their paths.
async fn write_many(node: &Node, prefix: &str, count: usize) -> Vec<(String, Vec<u8>)> {
    use futures_util::StreamExt;
    let items: Vec<(String, Vec<u8>)> = (0..count)
        .map(|i| {
            (
                gradle_path("ios", &format!("{prefix}{i}")),
                payload(i as u64, 256),
            )
        })
        .collect();
    let base = node.url("");
    futures_util::stream::iter(items.clone())
        .map(|(path, body)| {
            let url = format!("{base}{path}");
            async move {
                let status = client().put(url).body(body).send().await.unwrap().status();
                assert!(status.is_success(), "{status}");
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    items
}

/// Waits until `node` serves every item, byte-identical.
async fn assert_all_replicated(node: &Node, items: &[(String, Vec<u8>)]) {
    for (path, body) in items {
        assert_replicated(node, path, body).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_stopped_during_five_thousand_writes_receives_all_of_them() {
    let nodes = start_mesh(&[30, 31, 32]).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    b.signal(libc::SIGSTOP);
    let items = write_many(a, "stop", 5000).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    b.signal(libc::SIGCONT);
    assert_all_replicated(b, &items).await;
    assert_all_replicated(c, &items).await;
    assert_all_replicated(a, &items).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_the_logs_bound_overtook_catches_up_from_the_writers_index() {
    let nodes = crate::common::mesh::start_mesh_with(&[110, 111], |options| {
        options.env("KURA_REPLICATION_OUTBOX_MAX_ENTRIES", "1000")
    })
    .await;
    let (a, b) = (&nodes[0], &nodes[1]);
    b.signal(libc::SIGSTOP);
    // Every write succeeds (write_many asserts it) while the log holds at most 1,000 records.
    let items = write_many(a, "bound", 5000).await;
    let dropped = eventually(Duration::from_secs(10), || async {
        let dropped = a.metric("kura_replication_log_dropped_total").await;
        (dropped >= 3000).then_some(dropped)
    })
    .await;
    assert!(dropped.is_some(), "the bound never dropped records");
    b.signal(libc::SIGCONT);
    assert_all_replicated(b, &items).await;
    let writer = a.status().await;
    let peer = &writer["peers"][0];
    assert_eq!(peer["catch_ups_requested"], 1, "{peer}");
    assert_eq!(peer["errors"]["log_dropped"], 1, "{peer}");
    let caught_up = eventually(Duration::from_secs(10), || async {
        let catch_up = b.status().await["replication"]["catch_up"].clone();
        (catch_up["completed"] == 1 && catch_up["owed_to"] == json!([])).then_some(catch_up)
    })
    .await;
    assert!(caught_up.is_some(), "{}", b.status().await["replication"]);
    // One pass fetched what b lacked, each artifact once.
    let fetched = caught_up.unwrap()["fetched_artifacts"].as_u64().unwrap();
    assert!((3000..=5000).contains(&fetched), "fetched {fetched}");
    let requested = a
        .metric(&format!(
            "kura_replication_catch_ups_requested_total{{peer=\"{}\"}}",
            crate::common::mesh::peer_url(111)
        ))
        .await;
    assert_eq!(requested, 1);
    let passes = b
        .metric("kura_replication_catch_up_passes_total{result=\"completed\"}")
        .await;
    assert_eq!(passes, 1);
    let owed = eventually(Duration::from_secs(5), || async {
        let metrics = b.metrics().await;
        metrics
            .lines()
            .any(|line| line == "kura_replication_catch_ups_owed 0")
            .then_some(())
    })
    .await;
    assert!(owed.is_some(), "the promise is still counted as owed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_catch_up_requests_get_specific_errors_and_promise_nothing() {
    let node = Node::start_with(mesh_options(112, &[113]));
    let url = format!("{}/_internal/catch_up", peer_url(112));
    let send = |account: &'static str, body: &'static str| {
        client()
            .post(url.clone())
            .header("x-kura-account", account)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let other_account = send("globex", r#"{"writer":"node-1"}"#).await.unwrap();
    assert_eq!(other_account.status(), 403);
    let not_json = send(ACCOUNT, "writer=node-1").await.unwrap();
    assert_eq!(not_json.status(), 400);
    let error: serde_json::Value = not_json.json().await.unwrap();
    assert_eq!(error["error"], "bad_catch_up", "{error}");
    let itself = send(ACCOUNT, r#"{"writer":"node-112"}"#).await.unwrap();
    assert_eq!(itself.status(), 400);
    let owed = &node.status().await["replication"]["catch_up"]["owed_to"];
    assert_eq!(*owed, json!([]), "a refused request left a promise");
    // A good one is kept until that writer is an admitted peer (it never is here).
    let good = send(ACCOUNT, r#"{"writer":"node-113"}"#).await.unwrap();
    assert_eq!(good.status(), 202);
    let owed = &node.status().await["replication"]["catch_up"]["owed_to"];
    assert_eq!(*owed, json!(["node-113"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_killed_during_writes_receives_them_after_it_restarts() {
    let mut nodes = start_mesh(&[40, 41]).await;
    nodes[1].kill9();
    let items = write_many(&nodes[0], "down", 5000).await;
    nodes[1].restart();
    wait_admitted(&nodes[0], 1).await;
    assert_all_replicated(&nodes[1], &items).await;
}

/// A node whose disk was wiped, back under the same `node.id`, gets from its peers what it had
/// written and replicated. (Bootstrap skipped every artifact that named the node itself as its
/// origin, and no push ever sends a node its own writes: they were gone from it for good.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_node_back_under_the_same_id_gets_back_what_it_wrote() {
    let mut nodes = start_mesh(&[120, 121]).await;
    let items = write_many(&nodes[0], "mine", 20).await;
    assert_all_replicated(&nodes[1], &items).await;
    nodes[0].kill9();
    std::fs::remove_dir_all(nodes[0].data_dir()).unwrap();
    nodes[0].restart();
    wait_ready(&nodes[0]).await;
    let bootstrap = nodes[0].status().await["replication"]["bootstrap"].clone();
    assert_eq!(bootstrap["state"], "done", "{bootstrap}");
    assert_eq!(bootstrap["fetched_artifacts"], 20, "{bootstrap}");
    for (path, body) in &items {
        assert_eq!(
            body_at(&nodes[0], path).await.as_ref(),
            Some(body),
            "{path}"
        );
    }
}

/// Bootstrap fetches no more than the node keeps after an eviction (its low watermark): from
/// a peer holding more, it takes what fits and evicts nothing. (It fetched everything, evicting
/// as it went, what clients wrote meanwhile included.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_fetches_up_to_the_low_watermark_and_evicts_nothing() {
    // The full node's only peer (124) never starts, so it pushes nothing to the empty one:
    // whatever arrives there, bootstrap fetched.
    let full = Node::start_with(mesh_options(122, &[124]));
    let bodies: Vec<(String, Vec<u8>)> = (0..12)
        .map(|i| {
            (
                gradle_path("ios", &format!("big{i}")),
                payload(800 + i, 256 << 10),
            )
        })
        .collect();
    for (path, body) in &bodies {
        put(&full, path, body.clone()).await;
    }
    // 90 % (the default low watermark) of 2 MiB holds seven of these.
    let empty = Node::start_with(mesh_options(123, &[122]).env("KURA_STORAGE_CAPACITY", "2MiB"));
    wait_ready(&empty).await;
    let bootstrap = empty.status().await["replication"]["bootstrap"].clone();
    assert_eq!(bootstrap["state"], "done", "{bootstrap}");
    assert_eq!(bootstrap["fetched_artifacts"], 7, "{bootstrap}");
    assert_eq!(bootstrap["over_budget"], 5, "{bootstrap}");
    let walked = |name: &str| format!("kura_replication_walk_{name}{{walk=\"bootstrap\"}}");
    assert_eq!(empty.metric(&walked("fetched_total")).await, 7);
    assert_eq!(empty.metric(&walked("over_budget_total")).await, 5);
    assert_eq!(empty.metric("kura_replication_bootstrapping").await, 0);
    // Its logs tell which fetches landed, and whether a try failed and was retried.
    let evictions = empty.metric("kura_storage_evictions_total").await;
    assert_eq!(evictions, 0, "logs:\n{}", empty.logs());
    let mut held = 0;
    for (path, body) in &bodies {
        if let Some(found) = body_at(&empty, path).await {
            assert_eq!(&found, body, "{path}");
            held += 1;
        }
    }
    assert_eq!(held, 7);
}

/// Bootstrap's budget counts what an artifact costs against capacity, metadata included. When
/// it counted bodies alone, a walk of small artifacts fetched far past the low watermark, and
/// the node evicted what it had just fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_counts_small_artifacts_at_what_they_cost_and_evicts_nothing() {
    let full = Node::start_with(mesh_options(127, &[129]));
    let key = |i: u64| format!("small{i:03}");
    for i in 0..60 {
        put(&full, &gradle_path("ios", &key(i)), payload(900 + i, 512)).await;
    }
    let empty = Node::start_with(mesh_options(128, &[127]).env("KURA_STORAGE_CAPACITY", "32KiB"));
    wait_ready(&empty).await;
    // 90 % of 32 KiB holds 57 bodies of 512 bytes, but 41 artifacts at what each costs.
    let each = artifact_charge(512, "ios", "gradle", &key(0));
    let fits = (32 * 1024 * 9 / 10) / each;
    assert!(fits < (32 * 1024 * 9 / 10) / 512);
    let bootstrap = empty.status().await["replication"]["bootstrap"].clone();
    assert_eq!(bootstrap["state"], "done", "{bootstrap}");
    assert_eq!(bootstrap["fetched_artifacts"], fits, "{bootstrap}");
    assert_eq!(bootstrap["over_budget"], 60 - fits, "{bootstrap}");
    let evictions = empty.metric("kura_storage_evictions_total").await;
    assert_eq!(evictions, 0, "logs:\n{}", empty.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_killed_mid_replication_resumes_from_its_persisted_cursors() {
    let mut nodes = start_mesh(&[50, 51]).await;
    let first = write_many(&nodes[0], "acked", 2000).await;
    assert_all_replicated(&nodes[1], &first).await;
    let acknowledged = eventually(Duration::from_secs(10), || async {
        let status = nodes[0].status().await;
        (status["peers"][0]["pending_entries"] == 0).then_some(())
    })
    .await;
    assert!(acknowledged.is_some(), "{}", nodes[0].status().await);
    // The receiver stops, so the writer dies with records it has not sent.
    nodes[1].signal(libc::SIGSTOP);
    let second = write_many(&nodes[0], "pending", 1000).await;
    nodes[0].kill9();
    nodes[1].signal(libc::SIGCONT);
    nodes[0].restart();
    assert_all_replicated(&nodes[1], &second).await;
    assert_all_replicated(&nodes[1], &first).await;
    // The restarted writer resumed after what was acknowledged: the first 2000 were not sent
    // again (a resent entry is applied as `stale`); at most the unacknowledged ones were.
    let stale = nodes[1]
        .metric("kura_replication_applied_total{result=\"stale\"}")
        .await;
    assert!(stale <= 1000, "{stale} entries arrived twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_show_each_peers_progress_and_what_was_applied() {
    let nodes = start_mesh(&[60, 61]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let items = write_many(a, "seen", 10).await;
    assert_all_replicated(b, &items).await;
    let acknowledged = eventually(Duration::from_secs(10), || async {
        let status = a.status().await;
        let peer = status["peers"][0].clone();
        (peer["sent_entries"] == 10 && peer["pending_entries"] == 0).then_some(peer)
    })
    .await
    .expect("the peer acknowledged all 10");
    assert_eq!(acknowledged["node_id"], "node-61");
    assert_eq!(acknowledged["sent_bytes"], 10 * 256);
    assert_eq!(acknowledged["lag_seconds"], 0.0);
    let peer = "http://127.0.0.61:7443";
    assert_eq!(
        a.metric(&format!(
            "kura_replication_sent_entries_total{{peer=\"{peer}\"}}"
        ))
        .await,
        10
    );
    assert_eq!(
        a.metric(&format!(
            "kura_replication_peer_state{{peer=\"{peer}\",state=\"admitted\"}}"
        ))
        .await,
        1
    );
    assert_eq!(
        b.metric("kura_replication_applied_total{result=\"applied\"}")
            .await,
        10
    );
    assert_eq!(b.metric("kura_replication_applied_bytes_total").await, 2560);
}

/// Waits until `node`'s one peer is `refused`.
async fn wait_refused(node: &Node) {
    let refused = eventually(Duration::from_secs(30), || async {
        let status = node.status().await;
        (status["peers"][0]["state"] == "refused").then_some(())
    })
    .await;
    assert!(refused.is_some(), "{}", node.status().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_another_account_is_refused_and_sent_nothing() {
    let ours = Node::start_with(mesh_options(70, &[71]));
    let theirs = Node::start_with(mesh_options(71, &[70]).env("KURA_NODE_ACCOUNT", "other"));
    for node in [&ours, &theirs] {
        wait_refused(node).await;
    }
    let body = payload(10, 100);
    put(&ours, &gradle_path("ios", "mine"), body).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        body_at(&theirs, "/api/cache/gradle/other/ios/mine")
            .await
            .is_none()
    );
    assert_eq!(ours.status().await["peers"][0]["sent_entries"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_under_the_same_node_id_are_refused_not_taken_for_themselves() {
    // A data dir or config copied from another node: the copy is no address of this node.
    let a = Node::start_with(mesh_options(125, &[126]).env("KURA_NODE_ID", "twin"));
    let b = Node::start_with(mesh_options(126, &[125]).env("KURA_NODE_ID", "twin"));
    for node in [&a, &b] {
        wait_refused(node).await;
        assert!(
            node.logs().contains("runs under this node's node.id"),
            "{}",
            node.logs()
        );
    }
}

/// Two nodes where what `a` (octet `a`) sends `b` (octet `b`) passes a proxy on b's address,
/// port 7443, while b's peer plane listens on 7444.
async fn mesh_through_proxy(a: u8, b: u8) -> (Node, Node, Proxy) {
    let receiver = Node::start_with(node_options(b, PEER_PORT + 1, &[peer_url(a)]));
    let proxy = Proxy::start(
        format!("127.0.0.{b}:{PEER_PORT}").parse().unwrap(),
        format!("127.0.0.{b}:{}", PEER_PORT + 1).parse().unwrap(),
    )
    .await;
    let sender = Node::start_with(node_options(a, PEER_PORT, &[peer_url(b)]));
    wait_admitted(&sender, 1).await;
    wait_admitted(&receiver, 1).await;
    // Bootstrap over first: the receiver's bootstrap pulls from the sender directly, not
    // through the proxy, and on a loaded machine it could otherwise fetch what a test wrote.
    wait_ready(&receiver).await;
    wait_ready(&sender).await;
    (sender, receiver, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_corrupted_in_transit_is_rejected_with_422_and_the_retry_delivers_it() {
    let (sender, receiver, proxy) = mesh_through_proxy(80, 81).await;
    let body = payload(11, 2000);
    proxy.corrupt_once(&body[1000..1016]);
    put(&sender, &gradle_path("ios", "flipped"), body.clone()).await;
    assert_replicated(&receiver, &gradle_path("ios", "flipped"), &body).await;
    assert!(proxy.corrupted(), "the proxy never saw the body");
    assert_eq!(
        receiver
            .metric("kura_replication_applied_total{result=\"rejected\"}")
            .await,
        1
    );
    let status = sender.status().await;
    assert_eq!(status["peers"][0]["errors"]["rejected"], 1, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_for_a_minute_heals_with_every_artifact_delivered() {
    let (sender, receiver, proxy) = mesh_through_proxy(82, 83).await;
    let before = write_many(&sender, "before", 200).await;
    proxy.cut();
    let during = write_many(&sender, "during", 1000).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(body_at(&receiver, &during[999].0).await.is_none());
    proxy.heal();
    let after = write_many(&sender, "after", 200).await;
    for items in [&before, &during, &after] {
        assert_all_replicated(&receiver, items).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_waits_for_the_bandwidth_limit_and_client_writes_do_not() {
    let nodes = crate::common::mesh::start_mesh_with(&[26, 27], |options| {
        options.env("KURA_REPLICATION_BANDWIDTH_LIMIT", "1MiB")
    })
    .await;
    let (a, b) = (&nodes[0], &nodes[1]);
    // 4 MiB in four writes: the client is answered at once, the peer gets them over >= 3 s
    // (one second of burst, then 1 MiB/s).
    let started = std::time::Instant::now();
    let bodies: Vec<Vec<u8>> = (0..4).map(|i| payload(300 + i, 1 << 20)).collect();
    for (i, body) in bodies.iter().enumerate() {
        put(a, &gradle_path("ios", &format!("slow{i}")), body.clone()).await;
    }
    let written = started.elapsed();
    assert!(
        written < Duration::from_secs(2),
        "client writes took {written:?}"
    );
    for (i, body) in bodies.iter().enumerate() {
        assert_replicated(b, &gradle_path("ios", &format!("slow{i}")), body).await;
    }
    let replicated = started.elapsed();
    assert!(
        replicated >= Duration::from_millis(2800),
        "4 MiB crossed a 1 MiB/s limit in {replicated:?}"
    );
    let waits = a
        .metric("kura_replication_limiter_wait_seconds_count")
        .await;
    assert!(waits > 0, "{}", a.metrics().await);
    let waited = a.status().await["replication"]["limiter_wait_seconds"].as_f64();
    assert!(waited.is_some_and(|s| s >= 1.5), "{waited:?}");
}

/// Two nodes where the first keeps only 1 MiB (it evicts as it writes) and the second keeps all.
async fn small_writer_and_large_peer(a: u8, b: u8) -> (Node, Node) {
    let small = Node::start_with(
        mesh_options(a, &[b])
            .env("KURA_STORAGE_CAPACITY", "1MiB")
            .env("KURA_STORAGE_ACCESS_TIME_RESOLUTION", "0s"),
    );
    let large = Node::start_with(mesh_options(b, &[a]));
    wait_admitted(&small, 1).await;
    wait_admitted(&large, 1).await;
    (small, large)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_on_one_node_is_never_replicated() {
    let (small, large) = small_writer_and_large_peer(28, 29).await;
    let bodies: Vec<Vec<u8>> = (0..10).map(|i| payload(400 + i, 256 << 10)).collect();
    for (i, body) in bodies.iter().enumerate() {
        let path = gradle_path("ios", &format!("evict{i}"));
        put(&small, &path, body.clone()).await;
        // Each reaches the peer before the next write can evict it.
        assert_replicated(&large, &path, body).await;
    }
    assert!(small.metric("kura_storage_evictions_total").await >= 4);
    assert!(
        body_at(&small, &gradle_path("ios", "evict0"))
            .await
            .is_none()
    );
    // The peer keeps everything the writer evicted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (i, body) in bodies.iter().enumerate() {
        let path = gradle_path("ios", &format!("evict{i}"));
        assert_eq!(body_at(&large, &path).await.as_ref(), Some(body), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_evicted_before_it_is_sent_is_skipped_and_counted() {
    let (small, large) = small_writer_and_large_peer(33, 34).await;
    large.signal(libc::SIGSTOP);
    for i in 0..10 {
        let path = gradle_path("ios", &format!("gone{i}"));
        put(&small, &path, payload(500 + i, 256 << 10)).await;
    }
    large.signal(libc::SIGCONT);
    let evicted = small.metric("kura_storage_evictions_total").await;
    assert!(evicted >= 4, "{evicted}");
    let drained = eventually(Duration::from_secs(30), || async {
        let status = small.status().await;
        (status["peers"][0]["pending_entries"] == 0).then_some(status)
    })
    .await;
    assert!(drained.is_some(), "{}", small.status().await);
    // What the writer still had arrived. What it evicted was skipped, one count each, unless
    // it was already on its way (read before the eviction, held by the stopped peer's socket).
    let mut skipped = 0;
    for i in 0..10 {
        let path = gradle_path("ios", &format!("gone{i}"));
        if let Some(kept) = body_at(&small, &path).await {
            assert_replicated(&large, &path, &kept).await;
        } else if body_at(&large, &path).await.is_none() {
            skipped += 1;
        }
    }
    assert!(skipped >= 1 && skipped <= evicted, "{skipped} of {evicted}");
    assert_eq!(
        small
            .metric("kura_replication_skipped_total{reason=\"gone\"}")
            .await,
        skipped
    );
}

/// An artifact larger than a peer's whole capacity can never be stored there: the peer
/// acknowledges it without storing it (counted), drops the older version of the key it held,
/// and what the writer logged after it still arrives. (It answered 507, and the writer resent it forever: of what came after it, only
/// the request already in flight beside it ever arrived.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_larger_than_a_peers_capacity_does_not_stop_what_follows() {
    let writer = Node::start_with(mesh_options(37, &[38]));
    // Room for what fits twice over: a resent request may stage an artifact while its first
    // copy is still being received.
    let small = Node::start_with(mesh_options(38, &[37]).env("KURA_STORAGE_CAPACITY", "6MiB"));
    wait_admitted(&writer, 1).await;
    wait_admitted(&small, 1).await;
    // The small node started empty: its bootstrap pass is over before the writes, so that only
    // the writer's push can deliver them.
    let bootstrapped = eventually(Duration::from_secs(30), || async {
        (small.status().await["replication"]["bootstrap"]["state"] == "done").then_some(())
    })
    .await;
    assert!(bootstrapped.is_some(), "{}", small.status().await);
    // An older, small version of the key reaches the small node first: once the writer
    // overwrites it with one too large to be stored there, it must not stay the key's answer.
    let too_large = gradle_path("ios", "too-large");
    let old_version = payload(699, 4096);
    put(&writer, &too_large, old_version.clone()).await;
    assert_replicated(&small, &too_large, &old_version).await;
    // Stopped while the writer logs all three, so that they travel as three requests in one
    // round: the one over capacity, one streamed beside it, and a batch behind them.
    small.signal(libc::SIGSTOP);
    put(&writer, &too_large, payload(700, 8 << 20)).await;
    let beside = (gradle_path("ios", "beside"), payload(701, 3 << 19));
    put(&writer, &beside.0, beside.1.clone()).await;
    let behind = (gradle_path("ios", "behind"), payload(702, 4096));
    put(&writer, &behind.0, behind.1.clone()).await;
    small.signal(libc::SIGCONT);
    for (path, body) in [&beside, &behind] {
        assert_replicated(&small, path, body).await;
    }
    assert!(
        body_at(&small, &too_large).await.is_none(),
        "the superseded version is still served"
    );
    // Counted once per time it was sent: a request cut while the peer was stopped is sent again.
    let counted = small
        .metric("kura_replication_applied_total{result=\"too_large\"}")
        .await;
    assert!(counted >= 1, "{counted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_node_is_not_ready_until_bootstrap_ends_or_times_out() {
    // Its only peer serves another account: no pass can complete, so the timeout ends it.
    let node =
        Node::start_with(mesh_options(35, &[36]).env("KURA_REPLICATION_BOOTSTRAP_TIMEOUT", "2s"));
    let _other = Node::start_with(mesh_options(36, &[35]).env("KURA_NODE_ACCOUNT", "other"));
    let ready = client().get(node.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["state"], "bootstrapping");
    // A gRPC health probe gives the same answer as `/ready`.
    let grpc = Grpc::connect(&node).await;
    let health = || async {
        let check = grpc.request(HealthCheckRequest {
            service: String::new(),
        });
        grpc.health()
            .check(check)
            .await
            .unwrap()
            .into_inner()
            .status
    };
    assert_eq!(health().await, ServingStatus::NotServing as i32);
    // The public API serves meanwhile.
    put(&node, &gradle_path("ios", "early"), payload(13, 10)).await;
    let became_ready = eventually(Duration::from_secs(10), || async {
        let response = client().get(node.url("/ready")).send().await.ok()?;
        response.status().is_success().then_some(())
    })
    .await;
    assert!(became_ready.is_some());
    assert_eq!(health().await, ServingStatus::Serving as i32);
    let status = node.status().await;
    assert_eq!(
        status["replication"]["bootstrap"]["state"], "timed_out",
        "{status}"
    );
}
