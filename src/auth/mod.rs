//! Authorization: may this credential perform this action on this account/project?
//!
//! Every cache request, whatever its protocol, asks [`Authorizer::authorize`] and gets a
//! transport-neutral [`Decision`]. The HTTP layer maps it to a status in one place
//! (`http::error`); the gRPC layer will map it to its codes the same way.

pub mod cache;
pub mod grants;
pub mod introspection;
pub mod static_tokens;

use std::sync::Arc;

use cache::{DecisionCache, Lookup};
pub use grants::Grants;
use introspection::Introspected;
use static_tokens::StaticTokens;

/// What a request wants to do. GET/HEAD read; everything else writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Read,
    Write,
}

/// A bearer token taken from a request. `Debug` never shows it.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    pub fn new(token: impl Into<String>) -> Self {
        Token(token.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// SHA-256 of the token: the only form in which a token is kept or compared.
    pub fn sha256(&self) -> [u8; 32] {
        use sha2::Digest as _;
        sha2::Sha256::digest(self.0.as_bytes()).into()
    }
}

/// The decision an introspection answer gives for one request.
fn decide(answer: &Introspected, resource: &Resource<'_>, action: Action) -> Decision {
    match answer {
        Introspected::Inactive => Decision::InvalidToken,
        Introspected::Active { exp: Some(exp), .. } if *exp <= introspection::unix_now() => {
            Decision::InvalidToken
        }
        Introspected::Active {
            grants: Some(grants),
            principal,
            ..
        } if grants.allows(resource, action) => Decision::Allow {
            principal: principal.clone(),
        },
        Introspected::Active { .. } => Decision::Forbidden,
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// What a request addresses: the account and, unless account-scoped, one project of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resource<'a> {
    pub account: &'a str,
    pub project: Option<&'a str>,
}

/// The outcome of an authorization check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed; `principal` names the caller in logs (never the token).
    Allow {
        principal: Arc<str>,
    },
    MissingToken,
    /// Unknown, inactive or expired token.
    InvalidToken,
    /// A valid token without a grant for this resource and action.
    Forbidden,
    /// The auth backend could not be asked and nothing cached covers the request.
    Unavailable,
}

impl Decision {
    /// Bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Decision::Allow { .. } => "allow",
            Decision::MissingToken => "missing_token",
            Decision::InvalidToken => "invalid_token",
            Decision::Forbidden => "forbidden",
            Decision::Unavailable => "unavailable",
        }
    }
}

/// The configured authorizer; cheap to clone.
#[derive(Clone)]
pub enum Authorizer {
    /// `auth.mode = "none"`: everything is allowed (dev only).
    Open,
    /// `auth.mode = "static"`: token hashes and grants from a file.
    Static(Arc<StaticTokens>),
    /// `auth.mode = "introspection"`: the control plane decides, through a cache.
    Introspection(Arc<DecisionCache>),
}

impl Authorizer {
    /// Decides whether `token` may perform `action` on `resource`. `request_id` is forwarded
    /// to the control plane when it is asked.
    pub async fn authorize(
        &self,
        token: Option<&Token>,
        resource: &Resource<'_>,
        action: Action,
        request_id: Option<&str>,
    ) -> Decision {
        let decision = match (self, token) {
            (Authorizer::Open, _) => Decision::Allow {
                principal: "anonymous".into(),
            },
            (_, None) => Decision::MissingToken,
            (Authorizer::Static(tokens), Some(token)) => tokens.decide(token, resource, action),
            (Authorizer::Introspection(cache), Some(token)) => {
                match cache.lookup(token, request_id).await {
                    Lookup::Known(answer) => decide(&answer, resource, action),
                    Lookup::Unavailable => Decision::Unavailable,
                }
            }
        };
        metrics::counter!(crate::metrics::AUTH_DECISIONS_TOTAL, "result" => decision.label())
            .increment(1);
        decision
    }
}
