//! `auth.mode = "introspection"` against a control-plane double on 127.0.0.1: the decision table
//! on every route family, grant scoping, the decision cache (single flight, revalidation,
//! serve-stale during an outage, recovery), slow and broken backends, and secrets kept out of
//! logs and metrics.

use crate::common;

use std::time::{Duration, Instant};

use common::control_plane::{CLIENT_SECRET, ControlPlane, Mode};
use common::{Node, NodeOptions, authorized, client, route_families, send_route};
use reqwest::{Method, StatusCode};
use serde_json::json;

const WRITER: &str = "cp-writer-0a1b";
const READER: &str = "cp-reader-2c3d";
const IOS: &str = "cp-ios-4e5f";
const GLOBEX: &str = "cp-globex-6a7b";
const NO_GRANTS: &str = "cp-nogrants-8c9d";
const EXPIRED: &str = "cp-expired-0e1f";
const REVOKED: &str = "cp-revoked-2a3b";

fn active(grants: serde_json::Value) -> serde_json::Value {
    json!({"active": true, "sub": "user-1", "exp": 4_000_000_000u64, "cache_grants": grants})
}

async fn control_plane() -> ControlPlane {
    let plane = ControlPlane::start().await;
    plane.answer(WRITER, active(json!({"account": {"write": ["acme"]}})));
    plane.answer(READER, active(json!({"account": {"read": ["ACME"]}})));
    plane.answer(IOS, active(json!({"project": {"write": ["acme/ios"]}})));
    plane.answer(
        GLOBEX,
        active(json!({"account": {"read": ["globex"], "write": ["globex"]}})),
    );
    plane.answer(NO_GRANTS, json!({"active": true}));
    plane.answer(
        EXPIRED,
        json!({"active": true, "exp": 1_000, "cache_grants": {"account": {"read": ["acme"]}}}),
    );
    plane.answer(REVOKED, json!({"active": false}));
    plane
}

fn options(plane: &ControlPlane) -> NodeOptions {
    plane.node_options()
}

async fn status(node: &Node, token: &str) -> StatusCode {
    let url = node.url("/api/cache/gradle/k?account_handle=acme&project_handle=ios");
    client()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_family_applies_the_decision_table() {
    let plane = control_plane().await;
    let node = Node::start_with(options(&plane));
    for route in route_families("ios") {
        let none = send_route(&node, &route, None).await;
        assert_eq!(none.status(), StatusCode::UNAUTHORIZED, "{}", route.name);
        assert_eq!(
            none.json::<serde_json::Value>().await.unwrap()["error"],
            "missing_token"
        );
        for token in [REVOKED, EXPIRED, "never-issued"] {
            let response = send_route(&node, &route, Some(token)).await;
            assert_eq!(
                response.status(),
                StatusCode::UNAUTHORIZED,
                "{} {token}",
                route.name
            );
            assert_eq!(
                response.json::<serde_json::Value>().await.unwrap()["message"],
                "Invalid or expired token"
            );
        }
        for token in [NO_GRANTS, GLOBEX] {
            let response = send_route(&node, &route, Some(token)).await;
            assert_eq!(
                response.status(),
                StatusCode::FORBIDDEN,
                "{} {token}",
                route.name
            );
        }
        assert!(
            authorized(send_route(&node, &route, Some(WRITER)).await.status()),
            "{}",
            route.name
        );
        assert!(
            authorized(send_route(&node, &route, Some(IOS)).await.status()),
            "{}",
            route.name
        );
        let reader = send_route(&node, &route, Some(READER)).await.status();
        assert_eq!(
            authorized(reader),
            route.method == Method::GET,
            "{}: reader got {reader}",
            route.name
        );
    }
    for route in route_families("android") {
        assert_eq!(
            send_route(&node, &route, Some(IOS)).await.status(),
            StatusCode::FORBIDDEN,
            "{}",
            route.name
        );
        assert!(
            authorized(send_route(&node, &route, Some(WRITER)).await.status()),
            "{}",
            route.name
        );
    }
    let account_scoped = node.url("/api/cache/gradle/k?account_handle=acme");
    let ios = client()
        .put(&account_scoped)
        .bearer_auth(IOS)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(
        ios.status(),
        StatusCode::FORBIDDEN,
        "project grants do not reach account-scoped routes"
    );
    for path in ["/v1/cache/77", "/api/metro/cache/m"] {
        let put = client()
            .put(node.url(path))
            .bearer_auth(IOS)
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), StatusCode::FORBIDDEN, "{path}");
        let put = client()
            .put(node.url(path))
            .bearer_auth(WRITER)
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), StatusCode::OK, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_introspection_call_per_token() {
    let plane = control_plane().await;
    let node = Node::start_with(options(&plane));
    for _ in 0..1000 {
        assert_eq!(status(&node, WRITER).await, StatusCode::NOT_FOUND);
    }
    assert_eq!(plane.calls(), 1, "1,000 requests with one token");

    plane.answer(
        "cp-new-token",
        active(json!({"account": {"read": ["acme"]}})),
    );
    let requests: Vec<_> = (0..100)
        .map(|_| {
            let url = node.url("/api/cache/gradle/k?account_handle=acme");
            tokio::spawn(async move {
                client()
                    .get(url)
                    .bearer_auth("cp-new-token")
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    for request in requests {
        assert_eq!(request.await.unwrap(), StatusCode::NOT_FOUND);
    }
    assert_eq!(
        plane.calls(),
        2,
        "100 concurrent first requests with one new token"
    );
}

/// auth.md caches "no grant" for 5 s: a grant added to a token whose cached answer lacks it
/// counts once that answer is `negative_ttl` old, not only after the 10 minutes a positive
/// answer is otherwise trusted; and a token that keeps asking for what it has no grant for
/// costs one backend call per `negative_ttl`, not one per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_added_to_a_cached_token_counts_after_the_negative_ttl() {
    let plane = control_plane().await;
    let node = Node::start_with(options(&plane).env("KURA_AUTH_NEGATIVE_TTL", "1s"));
    let token = "cp-granted-later";
    plane.answer(
        token,
        active(json!({"project": {"read": ["acme/android"]}})),
    );
    let android = node.url("/api/cache/gradle/k?account_handle=acme&project_handle=android");
    let android = || client().get(&android).bearer_auth(token).send();
    assert_eq!(android().await.unwrap().status(), StatusCode::NOT_FOUND);
    for _ in 0..5 {
        assert_eq!(
            status(&node, token).await,
            StatusCode::FORBIDDEN,
            "no grant for ios yet"
        );
    }
    assert_eq!(plane.calls(), 1, "a recent answer is not asked again");
    plane.answer(
        token,
        active(json!({"project": {"read": ["acme/android", "acme/ios"]}})),
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        status(&node, token).await,
        StatusCode::NOT_FOUND,
        "the new grant counts"
    );
    assert_eq!(plane.calls(), 2);
    assert_eq!(android().await.unwrap().status(), StatusCode::NOT_FOUND);
    // Still no grant for another account's project: refused, and asked again at most once a second.
    let other = node.url("/api/cache/gradle/k?account_handle=acme&project_handle=web");
    for _ in 0..5 {
        let refused = client()
            .get(&other)
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    }
    assert!(plane.calls() <= 3, "{} calls", plane.calls());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tokens_stop_working_after_revalidation() {
    let plane = control_plane().await;
    let node = Node::start_with(options(&plane).env("KURA_AUTH_CACHE_FRESH", "1s"));
    let token = "cp-soon-revoked";
    plane.answer(token, active(json!({"account": {"read": ["acme"]}})));
    assert_eq!(status(&node, token).await, StatusCode::NOT_FOUND);
    plane.answer(token, json!({"active": false}));
    assert_eq!(
        status(&node, token).await,
        StatusCode::NOT_FOUND,
        "still fresh: no call"
    );
    assert_eq!(plane.calls(), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The first request after `fresh` is served from the cache and starts a revalidation...
    assert_eq!(status(&node, token).await, StatusCode::NOT_FOUND);
    // ...which lands within moments; from then on the token is refused.
    let deadline = Instant::now() + Duration::from_secs(2);
    while status(&node, token).await != StatusCode::UNAUTHORIZED {
        assert!(Instant::now() < deadline, "revoked token still accepted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(plane.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_serves_recent_tokens_and_recovers_within_a_second() {
    let mut plane = control_plane().await;
    let node = Node::start_with(
        options(&plane)
            .env("KURA_AUTH_CACHE_FRESH", "1s")
            .env("KURA_AUTH_CACHE_MAX_AGE", "4s"),
    );
    assert_eq!(status(&node, WRITER).await, StatusCode::NOT_FOUND);
    plane.stop();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Past `fresh`, the backend down: the cached answer keeps serving.
    for _ in 0..5 {
        assert_eq!(status(&node, WRITER).await, StatusCode::NOT_FOUND);
    }
    let unknown = client()
        .get(node.url("/api/cache/gradle/k?account_handle=acme"))
        .bearer_auth(READER)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: serde_json::Value = unknown.json().await.unwrap();
    assert_eq!(
        (body["error"].as_str(), body["message"].as_str()),
        (
            Some("auth_unavailable"),
            Some("Authentication backend unavailable")
        )
    );

    plane.restart().await;
    let back = Instant::now();
    while status(&node, READER).await != StatusCode::NOT_FOUND {
        assert!(
            back.elapsed() < Duration::from_millis(1500),
            "new tokens must work within a second of recovery"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Never past max_age: with the backend down again, the old answer dies at 4 s.
    plane.stop();
    tokio::time::sleep(Duration::from_millis(4200)).await;
    assert_eq!(status(&node, WRITER).await, StatusCode::SERVICE_UNAVAILABLE);
    let stale = node
        .metric("kura_auth_cache_lookups_total{result=\"stale\"}")
        .await;
    assert!(stale >= 5, "stale serves are counted ({stale})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_control_plane_never_delays_cached_tokens() {
    let plane = control_plane().await;
    let node = Node::start_with(options(&plane).env("KURA_AUTH_CACHE_FRESH", "1s"));
    assert_eq!(status(&node, WRITER).await, StatusCode::NOT_FOUND);
    plane.set_mode(Mode::Slow(Duration::from_secs(2)));
    let fast = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let url = node.url("/api/cache/gradle/k?account_handle=acme");
    let until = Instant::now() + Duration::from_millis(3000);
    // Across the `fresh` boundary too: revalidation runs in the background.
    while Instant::now() < until {
        let response = fast
            .get(&url)
            .bearer_auth(WRITER)
            .send()
            .await
            .expect("a cached token must answer within 500 ms");
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // An uncached token does wait for the slow answer, and gets it (timeout is 3 s).
    let slow = client().get(&url).bearer_auth(READER).send().await.unwrap();
    assert_eq!(slow.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_backends_mean_unavailable() {
    let plane = control_plane().await;
    let node = Node::start_with(options(&plane));
    plane.set_mode(Mode::Fail);
    assert_eq!(status(&node, WRITER).await, StatusCode::SERVICE_UNAVAILABLE);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    plane.set_mode(Mode::Garbage);
    assert_eq!(status(&node, WRITER).await, StatusCode::SERVICE_UNAVAILABLE);
    let calls = plane.calls();
    assert_eq!(status(&node, WRITER).await, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        plane.calls(),
        calls,
        "at most one backend call per token per second after a failure"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    plane.set_mode(Mode::Normal);
    assert_eq!(status(&node, WRITER).await, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_as_basic_and_request_ids_forwarded() {
    let plane = control_plane().await;
    let node = Node::start_with(options(&plane).env("KURA_AUTH_CLIENT_AUTH", "basic"));
    let response = client()
        .get(node.url("/api/cache/gradle/k?account_handle=acme"))
        .bearer_auth(WRITER)
        .header("x-request-id", "trace-4242")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(plane.request_ids(), vec!["trace-4242".to_string()]);

    // Wrong client credentials: the control plane refuses the node, so the backend is unavailable.
    let refused = Node::start_with(
        options(&plane).env("KURA_CONTROL_PLANE_CLIENT_SECRET", "wrong-secret-77"),
    );
    assert_eq!(
        status(&refused, READER).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_the_client_secret_stay_out_of_logs_and_metrics() {
    let mut plane = control_plane().await;
    let node = Node::start_with(options(&plane).env("KURA_LOG_LEVEL", "debug"));
    for token in [WRITER, READER, REVOKED, NO_GRANTS, "never-issued"] {
        status(&node, token).await;
    }
    plane.stop();
    status(&node, IOS).await;
    let metrics = node.metrics().await;
    assert!(
        metrics.contains("kura_auth_backend_calls_total"),
        "{metrics}"
    );
    let logs = node.logs();
    assert!(
        logs.contains("token introspection failed"),
        "the outage is logged"
    );
    for secret in [
        WRITER,
        READER,
        REVOKED,
        NO_GRANTS,
        IOS,
        "never-issued",
        CLIENT_SECRET,
    ] {
        assert!(!logs.contains(secret), "{secret} in logs");
        assert!(!metrics.contains(secret), "{secret} in metrics");
    }
}

#[test]
fn introspection_mode_requires_its_settings() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kura"))
        .args(["config", "check"])
        .env("KURA_AUTH_MODE", "introspection")
        .env("KURA_AUTH_CONTROL_PLANE_URL", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("auth.client_id"));
}
