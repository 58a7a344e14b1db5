//! The control plane's OAuth 2.0 token introspection endpoint (RFC 7662), as a client.
//!
//! One call per question, no caching here (that is [`super::cache`]). Connect timeout and total
//! timeout come from config; a connect error is retried once, nothing else is. Neither the
//! token nor the client secret ever appears in an error, a log line or a metric.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use super::Token;
use super::grants::{Grants, GrantsDoc};
use crate::config::{AuthConfig, ClientAuth, Secret};

/// What the control plane said about a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Introspected {
    /// An active token. `grants` is `None` when the answer carried no `cache_grants` (no access).
    Active {
        /// Shared, so serving a cached answer copies a pointer, not the grant sets.
        grants: Option<Arc<Grants>>,
        /// Unix seconds after which the token must not be trusted.
        exp: Option<u64>,
        /// Who the token belongs to, for logs: `sub`, else `client_id`, else a short prefix of
        /// the token's hash. Computed once per answer, shared by every request it serves.
        principal: Arc<str>,
    },
    /// Inactive, unknown or expired.
    Inactive,
}

/// Why the backend could not answer. Every variant means "unavailable" to the decision.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot reach the control plane: {0}")]
    Transport(String),
    #[error("the control plane answered HTTP {0}")]
    Status(u16),
    #[error("the control plane's answer is not valid introspection JSON: {0}")]
    Malformed(String),
}

impl BackendError {
    /// Bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            BackendError::Transport(_) => "transport",
            BackendError::Status(_) => "status",
            BackendError::Malformed(_) => "malformed",
        }
    }
}

#[derive(Deserialize)]
struct Answer {
    active: bool,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    cache_grants: Option<GrantsDoc>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    client_id: Option<String>,
}

/// Asks the control plane about tokens.
pub struct IntrospectionClient {
    http: reqwest::Client,
    endpoint: String,
    client_id: String,
    client_secret: Secret,
    client_auth: ClientAuth,
}

impl IntrospectionClient {
    pub fn new(config: &AuthConfig) -> Result<IntrospectionClient, String> {
        let base = config
            .control_plane_url
            .as_deref()
            .ok_or("auth.control_plane_url is required for introspection")?;
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout.0)
            .timeout(config.timeout.0)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build the introspection client: {e}"))?;
        Ok(IntrospectionClient {
            http,
            endpoint: format!("{}/oauth2/introspect", base.trim_end_matches('/')),
            client_id: config.client_id.clone().unwrap_or_default(),
            client_secret: config.client_secret.clone().unwrap_or_default(),
            client_auth: config.client_auth,
        })
    }

    /// Introspects `token`, forwarding the caller's request id.
    pub async fn introspect(
        &self,
        token: &Token,
        request_id: Option<&str>,
    ) -> Result<Introspected, BackendError> {
        let started = Instant::now();
        let result = match self.send(token, request_id).await {
            Err(error) if error.is_connect() => self.send(token, request_id).await,
            other => other,
        };
        let outcome = match result {
            Ok(response) => parse(response, token).await,
            Err(error) => Err(BackendError::Transport(describe(&error))),
        };
        let label = match &outcome {
            Ok(Introspected::Active { .. }) => "active",
            Ok(Introspected::Inactive) => "inactive",
            Err(error) => error.label(),
        };
        metrics::histogram!(crate::metrics::AUTH_BACKEND_DURATION_SECONDS)
            .record(started.elapsed().as_secs_f64());
        metrics::counter!(crate::metrics::AUTH_BACKEND_CALLS_TOTAL, "outcome" => label)
            .increment(1);
        if let Err(error) = &outcome {
            tracing::warn!(%error, request_id, "token introspection failed");
        }
        outcome
    }

    async fn send(
        &self,
        token: &Token,
        request_id: Option<&str>,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let mut form = vec![("token", token.expose())];
        let mut request = self.http.post(&self.endpoint);
        match self.client_auth {
            ClientAuth::Body => {
                form.push(("client_id", &self.client_id));
                form.push(("client_secret", self.client_secret.expose()));
            }
            ClientAuth::Basic => {
                request = request.basic_auth(&self.client_id, Some(self.client_secret.expose()));
            }
        }
        if let Some(id) = request_id {
            request = request.header("x-request-id", id);
        }
        request.form(&form).send().await
    }
}

async fn parse(response: reqwest::Response, token: &Token) -> Result<Introspected, BackendError> {
    if response.status() != reqwest::StatusCode::OK {
        return Err(BackendError::Status(response.status().as_u16()));
    }
    let bytes = response
        .bytes()
        .await
        .map_err(|e| BackendError::Transport(describe(&e)))?;
    let answer: Answer =
        serde_json::from_slice(&bytes).map_err(|e| BackendError::Malformed(e.to_string()))?;
    if !answer.active || answer.exp.is_some_and(|exp| exp <= unix_now()) {
        return Ok(Introspected::Inactive);
    }
    Ok(Introspected::Active {
        grants: answer.cache_grants.map(|doc| Arc::new(Grants::from(doc))),
        exp: answer.exp,
        principal: answer
            .sub
            .or(answer.client_id)
            .unwrap_or_else(|| format!("token-{}", hex::encode(&token.sha256()[..4])))
            .into(),
    })
}

/// An error's text without the request body (which holds the token).
fn describe(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    match std::error::Error::source(error) {
        Some(source) => format!("{kind}: {source}"),
        None => kind.to_string(),
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}
