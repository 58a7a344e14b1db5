//! `auth.mode = "static"` on every HTTP route family: missing and invalid tokens (401), tokens
//! without the grant (403), account grants reaching projects, project grants staying in their
//! project, read-only grants refused on writes, other accounts refused, Basic credentials, and
//! reload on SIGHUP.

use crate::common;

use common::{
    Node, NodeOptions, authorized as allowed, client, route_families as routes, send_route as send,
    static_tokens_file,
};
use reqwest::{Method, StatusCode};

const WRITER: &str = "tok-writer-7f3a";
const READER: &str = "tok-reader-19bc";
const IOS: &str = "tok-ios-5d2e";
const GLOBEX: &str = "tok-globex-88aa";

fn start() -> (Node, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let tokens = static_tokens_file(
        dir.path(),
        &[
            (
                "writer",
                WRITER,
                r#"account = { read = [], write = ["acme"] }"#,
            ),
            (
                "reader",
                READER,
                r#"account = { read = ["ACME"], write = [] }"#,
            ),
            (
                "ios",
                IOS,
                r#"project = { read = [], write = ["acme/ios"] }"#,
            ),
            (
                "globex",
                GLOBEX,
                r#"account = { read = ["globex"], write = ["globex"] }"#,
            ),
        ],
    );
    let node = Node::start_with(
        NodeOptions::default()
            .env("KURA_NODE_ACCOUNT", "acme")
            .env("KURA_AUTH_MODE", "static")
            .env("KURA_AUTH_STATIC_TOKENS_FILE", tokens.display().to_string()),
    );
    (node, dir)
}

#[tokio::test]
async fn every_route_family_applies_the_decision_table() {
    let (node, _dir) = start();
    for route in routes("ios") {
        let none = send(&node, &route, None).await;
        assert_eq!(
            none.status(),
            StatusCode::UNAUTHORIZED,
            "{} without token",
            route.name
        );
        assert_eq!(
            none.headers()["www-authenticate"],
            "Bearer, Basic realm=\"kura\""
        );
        assert_eq!(
            none.json::<serde_json::Value>().await.unwrap()["error"],
            "missing_token"
        );

        let unknown = send(&node, &route, Some("not-a-token")).await;
        assert_eq!(
            unknown.status(),
            StatusCode::UNAUTHORIZED,
            "{} with unknown token",
            route.name
        );
        let body: serde_json::Value = unknown.json().await.unwrap();
        assert_eq!(body["error"], "invalid_token");
        assert_eq!(body["message"], "Invalid or expired token");

        let other_account = send(&node, &route, Some(GLOBEX)).await;
        assert_eq!(
            other_account.status(),
            StatusCode::FORBIDDEN,
            "{} with another account's token",
            route.name
        );

        let writer = send(&node, &route, Some(WRITER)).await;
        assert!(
            allowed(writer.status()),
            "{}: writer got {}",
            route.name,
            writer.status()
        );

        let reader = send(&node, &route, Some(READER)).await;
        let is_read = route.method == Method::GET;
        assert_eq!(
            allowed(reader.status()),
            is_read,
            "{}: reader got {}",
            route.name,
            reader.status()
        );

        let ios = send(&node, &route, Some(IOS)).await;
        assert!(
            allowed(ios.status()),
            "{}: ios grant on ios got {}",
            route.name,
            ios.status()
        );
    }
    for route in routes("android") {
        let ios = send(&node, &route, Some(IOS)).await;
        assert_eq!(
            ios.status(),
            StatusCode::FORBIDDEN,
            "{}: ios grant must not reach android",
            route.name
        );
        let writer = send(&node, &route, Some(WRITER)).await;
        assert!(
            allowed(writer.status()),
            "{}: account grant reaches every project",
            route.name
        );
    }
}

#[tokio::test]
async fn project_grants_do_not_reach_account_scoped_or_fixed_routes() {
    let (node, _dir) = start();
    let http = client();
    let account_scoped = node.url("/api/cache/gradle/k?account_handle=acme");
    let ios = http
        .put(&account_scoped)
        .bearer_auth(IOS)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(ios.status(), StatusCode::FORBIDDEN);
    let writer = http
        .put(&account_scoped)
        .bearer_auth(WRITER)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(writer.status(), StatusCode::CREATED);

    // Nx and Metro live in fixed projects of the node's account.
    for path in ["/v1/cache/1234", "/api/metro/cache/m1"] {
        let put = http
            .put(node.url(path))
            .bearer_auth(IOS)
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), StatusCode::FORBIDDEN, "{path}");
        let put = http
            .put(node.url(path))
            .bearer_auth(WRITER)
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), StatusCode::OK, "{path}");
        let get = http
            .get(node.url(path))
            .bearer_auth(READER)
            .send()
            .await
            .unwrap();
        assert_eq!(get.status(), StatusCode::OK, "{path}");
    }
    // Nx's client wants plain-text errors.
    let nx = http.get(node.url("/v1/cache/1234")).send().await.unwrap();
    assert_eq!(nx.status(), StatusCode::UNAUTHORIZED);
    assert!(
        nx.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert!(nx.text().await.unwrap().contains("missing_token"));
}

#[tokio::test]
async fn basic_credentials_carry_the_token_as_password() {
    let (node, _dir) = start();
    let http = client();
    let url = node.url("/api/cache/gradle/acme/ios/0123456789abcdef0123456789abcdef");
    let put = http
        .put(&url)
        .basic_auth("gradle", Some(WRITER))
        .body("artifact")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::CREATED);
    let get = http
        .get(&url)
        .basic_auth("anything", Some(READER))
        .send()
        .await
        .unwrap();
    assert_eq!(get.text().await.unwrap(), "artifact");
    let wrong = http
        .get(&url)
        .basic_auth(WRITER, Some("nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let garbage = http
        .get(&url)
        .header("authorization", "Basic %%%")
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn an_empty_bearer_token_is_a_missing_token_not_an_invalid_one() {
    // What a client sends when its token variable is unset: it must learn that no token came.
    let (node, _dir) = start();
    let url = node.url("/api/cache/gradle/acme/ios/0123456789abcdef0123456789abcdef");
    for value in ["Bearer ", "Bearer"] {
        let response = client()
            .get(&url)
            .header("authorization", value)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{value:?}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"], "missing_token", "{value:?}");
    }
}

#[tokio::test]
async fn probes_need_no_token_and_tokens_never_reach_logs_or_metrics() {
    let (node, _dir) = start();
    let http = client();
    for probe in ["/up", "/ready", "/status", "/metrics"] {
        assert_eq!(
            http.get(node.url(probe)).send().await.unwrap().status(),
            StatusCode::OK,
            "{probe}"
        );
    }
    for token in [WRITER, READER, "not-a-token"] {
        http.get(node.url("/api/cache/gradle/k?account_handle=acme"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
    }
    let metrics = node.metrics().await;
    assert!(
        metrics.contains("kura_auth_decisions_total{result=\"invalid_token\"} 1"),
        "{metrics}"
    );
    let logs = node.logs();
    for secret in [WRITER, READER, "not-a-token"] {
        assert!(
            !logs.contains(secret) && !metrics.contains(secret),
            "{secret} leaked"
        );
    }
}

#[tokio::test]
async fn tokens_reload_on_sighup_and_on_file_change() {
    let (node, dir) = start();
    let http = client();
    let url = node.url("/api/cache/gradle/k?account_handle=acme");
    let newcomer = "tok-new-4411";
    assert_eq!(
        http.get(&url)
            .bearer_auth(newcomer)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );

    static_tokens_file(
        dir.path(),
        &[("new", newcomer, r#"account = { read = ["acme"] }"#)],
    );
    node.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let status = http
            .get(&url)
            .bearer_auth(newcomer)
            .send()
            .await
            .unwrap()
            .status();
        if status == StatusCode::NOT_FOUND {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "new token not accepted after reload: {status}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let revoked = http.get(&url).bearer_auth(WRITER).send().await.unwrap();
    assert_eq!(
        revoked.status(),
        StatusCode::UNAUTHORIZED,
        "tokens removed from the file stop working"
    );

    // A broken file keeps the tokens in force.
    std::fs::write(dir.path().join("tokens.toml"), "[[tokens]\nbroken").unwrap();
    node.signal(libc::SIGHUP);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        http.get(&url)
            .bearer_auth(newcomer)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    assert!(node.logs().contains("static tokens not reloaded"));

    // No signal: a changed file is noticed on its own.
    let later = "tok-later-9c0d";
    static_tokens_file(
        dir.path(),
        &[("later", later, r#"account = { read = ["acme"] }"#)],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(6);
    while http
        .get(&url)
        .bearer_auth(later)
        .send()
        .await
        .unwrap()
        .status()
        != StatusCode::NOT_FOUND
    {
        assert!(
            std::time::Instant::now() < deadline,
            "file change not picked up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
