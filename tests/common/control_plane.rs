//! A control-plane double: RFC 7662 token introspection with client authentication, on
//! 127.0.0.1, that can be told to answer slowly, fail with 5xx, return garbage, or stop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Form, Router};
use base64::Engine as _;

pub const CLIENT_ID: &str = "kura-node";
pub const CLIENT_SECRET: &str = "cp-secret-6d1f09";

/// How the double answers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Normal,
    Slow(Duration),
    Fail,
    Garbage,
}

#[derive(Default)]
struct Shared {
    answers: Mutex<HashMap<String, serde_json::Value>>,
    mode: Mutex<Option<Mode>>,
    calls: AtomicUsize,
    request_ids: Mutex<Vec<String>>,
}

pub struct ControlPlane {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl ControlPlane {
    pub async fn start() -> ControlPlane {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut plane = ControlPlane {
            addr: listener.local_addr().unwrap(),
            shared: Arc::default(),
            server: None,
        };
        plane.serve(listener);
        plane
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let app = Router::new()
            .route("/oauth2/introspect", post(introspect))
            .with_state(self.shared.clone());
        self.server = Some(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
    }

    /// Options for a node of account `acme` that asks this control plane (introspection).
    pub fn node_options(&self) -> super::NodeOptions {
        super::NodeOptions::default()
            .env("KURA_NODE_ACCOUNT", "acme")
            .env("KURA_AUTH_MODE", "introspection")
            .env("KURA_AUTH_CONTROL_PLANE_URL", self.url())
            .env("KURA_CONTROL_PLANE_CLIENT_ID", CLIENT_ID)
            .env("KURA_CONTROL_PLANE_CLIENT_SECRET", CLIENT_SECRET)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What the double answers for `token` (unknown tokens get `{"active": false}`).
    pub fn answer(&self, token: &str, body: serde_json::Value) {
        self.shared
            .answers
            .lock()
            .unwrap()
            .insert(token.to_string(), body);
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = Some(mode);
    }

    pub fn calls(&self) -> usize {
        self.shared.calls.load(Ordering::SeqCst)
    }

    pub fn request_ids(&self) -> Vec<String> {
        self.shared.request_ids.lock().unwrap().clone()
    }

    /// Stops accepting; connections are refused until [`ControlPlane::restart`].
    pub fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }

    pub async fn restart(&mut self) {
        self.stop();
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        self.serve(listener);
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

fn client_authenticated(headers: &HeaderMap, form: &HashMap<String, String>) -> bool {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
        .map(|v| v == format!("{CLIENT_ID}:{CLIENT_SECRET}").into_bytes());
    let in_body = form.get("client_id").map(String::as_str) == Some(CLIENT_ID)
        && form.get("client_secret").map(String::as_str) == Some(CLIENT_SECRET);
    basic.unwrap_or(false) || in_body
}

async fn introspect(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    shared.calls.fetch_add(1, Ordering::SeqCst);
    if let Some(id) = headers.get("x-request-id").and_then(|v| v.to_str().ok()) {
        shared.request_ids.lock().unwrap().push(id.to_string());
    }
    let mode = shared.mode.lock().unwrap().unwrap_or(Mode::Normal);
    let close = [(header::CONNECTION, "close")];
    match mode {
        Mode::Fail => return (StatusCode::BAD_GATEWAY, close, "upstream down").into_response(),
        Mode::Garbage => return (StatusCode::OK, close, "<html>not json</html>").into_response(),
        Mode::Slow(delay) => tokio::time::sleep(delay).await,
        Mode::Normal => {}
    }
    if !client_authenticated(&headers, &form) {
        return (
            StatusCode::UNAUTHORIZED,
            close,
            "{\"error\":\"invalid_client\"}",
        )
            .into_response();
    }
    let token = form.get("token").cloned().unwrap_or_default();
    let answer = shared
        .answers
        .lock()
        .unwrap()
        .get(&token)
        .cloned()
        .unwrap_or(serde_json::json!({"active": false}));
    // Closing each connection makes `stop` take effect at once for the node's pooled client.
    (StatusCode::OK, close, axum::Json(answer)).into_response()
}
