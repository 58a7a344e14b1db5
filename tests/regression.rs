//! One test per bug found by the adversarial review (issue "Hardening"), each reproducing the
//! attack against the real binary on 127.0.0.1 and named after what it guards.

use crate::common;

/// Item 13: a static tokens file with loose permissions is warned about, a duplicated hash is
/// refused (the last good tokens stay in force), and deleting the file revokes every static
/// token until a file is back. Old code: no warning, the last duplicate won, a deleted file
/// revoked nothing, and `/status` said nothing about the file.
#[tokio::test]
async fn deleting_the_static_tokens_file_revokes_every_token_and_a_broken_edit_keeps_the_last_good_set()
 {
    use std::os::unix::fs::PermissionsExt as _;
    use std::time::{Duration, Instant};

    use reqwest::StatusCode;

    const TOKEN: &str = "tok-item13-6c1e";
    const GRANT: &str = r#"account = { read = ["acme"], write = ["acme"] }"#;
    // Well above the node's 2 s poll.
    const WAIT: Duration = Duration::from_secs(10);

    /// Polls `probe` until it gives `expected`, for at most `WAIT`.
    async fn wait_for<T, F>(what: &str, expected: T, mut probe: impl FnMut() -> F)
    where
        T: PartialEq + std::fmt::Debug,
        F: std::future::Future<Output = T>,
    {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = probe().await;
            if got == expected {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: still {got:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Puts a tokens file in place by rename, as an operator should: the node's poll never sees
    /// a half-written file.
    fn replace(path: &std::path::Path, entries: &[(&str, &str, &str)]) {
        let staging = tempfile::tempdir().unwrap();
        let written = common::static_tokens_file(staging.path(), entries);
        std::fs::set_permissions(&written, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::rename(written, path).unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let path = &dir.path().join("tokens.toml");
    replace(path, &[("ci", TOKEN, GRANT)]);
    let node = common::Node::start_with(
        common::NodeOptions::default()
            .env("KURA_NODE_ACCOUNT", "acme")
            .env("KURA_AUTH_MODE", "static")
            .env("KURA_AUTH_STATIC_TOKENS_FILE", path.display().to_string()),
    );
    let http = common::client();
    let url = node.url("/api/cache/gradle/item13?account_handle=acme");
    let (http, url, node) = (&http, &url, &node);
    let get = move || async move {
        let response = http.get(url).bearer_auth(TOKEN).send().await.unwrap();
        response.status()
    };
    let file_state = move || async move {
        let status = node.status().await;
        (
            status["static_tokens"]["state"].clone(),
            status["static_tokens"]["tokens"].clone(),
        )
    };
    let state_metric = |state: &str| format!("kura_auth_static_tokens_state{{state=\"{state}\"}}");

    let put = http.put(url).bearer_auth(TOKEN).body("artifact");
    assert_eq!(put.send().await.unwrap().status(), StatusCode::CREATED);
    assert_eq!(get().await, StatusCode::OK);
    assert_eq!(file_state().await, ("ok".into(), 1.into()));
    assert_eq!(node.metric(&state_metric("ok")).await, 1);
    assert!(
        !node.logs().contains("loose permissions"),
        "0600 is not loose"
    );

    // World-writable: anyone could add a token. Warned about on reload, path and mode named.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).unwrap();
    node.signal(libc::SIGHUP);
    let warning = move || async move {
        let logs = node.logs();
        logs.lines().any(|line| {
            line.contains("loose permissions")
                && line.contains("0666")
                && line.contains(&path.display().to_string())
                && line.contains("WARN")
        })
    };
    wait_for("loose-permission warning", true, warning).await;

    // Two entries with one hash: refused on reload, the last good set stays, /status says so.
    replace(path, &[("ci-a", TOKEN, GRANT), ("ci-b", TOKEN, GRANT)]);
    node.signal(libc::SIGHUP);
    wait_for(
        "duplicate refused",
        ("invalid".into(), 1.into()),
        file_state,
    )
    .await;
    let status = node.status().await;
    let error = status["static_tokens"]["error"]
        .as_str()
        .unwrap_or_default();
    let prefix = &common::token_hash(TOKEN)[..8];
    for part in ["\"ci-a\"", "\"ci-b\"", prefix] {
        assert!(error.contains(part), "{part} not named in: {error}");
    }
    assert_eq!(get().await, StatusCode::OK, "the last good set stays");
    assert_eq!(node.metric(&state_metric("invalid")).await, 1);
    assert_eq!(node.metric(&state_metric("ok")).await, 0);
    assert!(
        node.logs()
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("static tokens not reloaded"))
    );

    // Deleted: every static token is revoked once the poll notices (no signal).
    std::fs::remove_file(path).unwrap();
    wait_for(
        "token revoked after deletion",
        StatusCode::UNAUTHORIZED,
        get,
    )
    .await;
    let refused = http.get(url).bearer_auth(TOKEN).send().await.unwrap();
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "invalid_token");
    assert_eq!(file_state().await, ("missing".into(), 0.into()));
    assert_eq!(node.metric(&state_metric("missing")).await, 1);
    assert_eq!(node.metric(&state_metric("invalid")).await, 0);
    assert!(
        node.logs()
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("every static token is revoked"))
    );

    // A good file back: it loads as usual.
    replace(path, &[("ci", TOKEN, GRANT)]);
    wait_for("token back with the file", StatusCode::OK, get).await;
    assert_eq!(file_state().await, ("ok".into(), 1.into()));
    assert_eq!(node.metric(&state_metric("ok")).await, 1);
    assert_eq!(node.metric(&state_metric("missing")).await, 0);
    assert!(
        !node.logs().contains(TOKEN),
        "the token leaked into the logs"
    );
}
