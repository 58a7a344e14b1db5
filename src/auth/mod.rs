//! Authorization: may this credential perform this action on this account/project?
//!
//! Every cache request, whatever its protocol, describes itself as an [`AccessRequest`] (the
//! account and project it names, read or write, and the raw `authorization` value its header or
//! metadata carried) and asks [`Authorizer::decide`], which returns a transport-neutral
//! [`Decision`]. The HTTP layer maps it to a status in one place (`http::error`); the gRPC layer
//! maps it to its codes the same way. No protocol checks accounts or tokens itself.

pub(crate) mod cache;
pub(crate) mod grants;
pub(crate) mod introspection;
pub(crate) mod static_tokens;

use std::sync::{Arc, OnceLock};

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

/// An `authorization` value that is neither `Bearer <token>` nor Basic credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MalformedCredentials;

impl Token {
    pub fn new(token: impl Into<String>) -> Self {
        Token(token.into())
    }

    /// The token of an `authorization` value (HTTP header or gRPC metadata): `Bearer <token>`,
    /// or Basic credentials whose password is the token (stock Gradle sends those). An empty
    /// token is no token.
    pub fn from_authorization(value: &str) -> Result<Option<Token>, MalformedCredentials> {
        use base64::Engine as _;
        // A scheme alone counts as an empty token: HTTP parsers strip the trailing space of
        // `Bearer `, which is how a client with an unset token variable sends it.
        let value = value.trim();
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            return Ok((!rest.is_empty()).then(|| Token::new(rest)));
        }
        if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .map_err(|_| MalformedCredentials)?;
            let decoded = String::from_utf8(decoded).map_err(|_| MalformedCredentials)?;
            let (_, password) = decoded.split_once(':').ok_or(MalformedCredentials)?;
            return Ok((!password.is_empty()).then(|| Token::new(password)));
        }
        Err(MalformedCredentials)
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

/// What a request asks for, as any protocol describes it.
#[derive(Clone, Copy, Debug)]
pub struct AccessRequest<'a> {
    /// The account the request names, lowercased.
    pub account: &'a str,
    /// The project it names, lowercased; `None` for account-scoped requests.
    pub project: Option<&'a str>,
    pub action: Action,
    /// The raw `authorization` value (header or metadata), if the request carried one.
    pub authorization: Option<&'a str>,
    /// Forwarded to the control plane when it is asked.
    pub request_id: Option<&'a str>,
}

/// The outcome of an authorization check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed; `principal` names the caller in logs (never the token).
    Allow {
        principal: Arc<str>,
    },
    /// The request names an account other than the node's.
    WrongAccount,
    MissingToken,
    /// Unknown, inactive, expired or malformed token.
    InvalidToken,
    /// A valid token without a grant for this resource and action.
    Forbidden,
    /// The auth backend could not be asked and nothing cached covers the request.
    Unavailable,
}

/// `kura_auth_decisions_total`, one handle per result: resolved at the first decision (after
/// the node installed its recorder), so a decision increments a handle instead of looking its
/// series up by name and label.
fn count(decision: &Decision) {
    static COUNTERS: OnceLock<[metrics::Counter; Decision::LABELS.len()]> = OnceLock::new();
    let counters = COUNTERS.get_or_init(|| {
        Decision::LABELS
            .map(|label| metrics::counter!(crate::metrics::AUTH_DECISIONS_TOTAL, "result" => label))
    });
    counters[decision.index()].increment(1);
}

impl Decision {
    /// Every value of [`Decision::label`].
    const LABELS: [&'static str; 6] = [
        "allow",
        "wrong_account",
        "missing_token",
        "invalid_token",
        "forbidden",
        "unavailable",
    ];

    /// Bounded label for metrics.
    pub fn label(&self) -> &'static str {
        Decision::LABELS[self.index()]
    }

    /// The position of this decision's label in [`Decision::LABELS`].
    fn index(&self) -> usize {
        match self {
            Decision::Allow { .. } => 0,
            Decision::WrongAccount => 1,
            Decision::MissingToken => 2,
            Decision::InvalidToken => 3,
            Decision::Forbidden => 4,
            Decision::Unavailable => 5,
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
    /// Decides a request to a node serving `node_account`: the account first (a node serves
    /// one), then the credentials and their grants.
    pub async fn decide(&self, node_account: &str, request: &AccessRequest<'_>) -> Decision {
        if request.account != node_account {
            count(&Decision::WrongAccount);
            return Decision::WrongAccount;
        }
        let token = match request.authorization.map(Token::from_authorization) {
            None => None,
            Some(Ok(token)) => token,
            Some(Err(MalformedCredentials)) => {
                count(&Decision::InvalidToken);
                return Decision::InvalidToken;
            }
        };
        let resource = Resource {
            account: request.account,
            project: request.project,
        };
        self.authorize(
            token.as_ref(),
            &resource,
            request.action,
            request.request_id,
        )
        .await
    }

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
                    Lookup::Known(answer) => match decide(&answer, resource, action) {
                        // A grant added since the cached answer counts once it is
                        // `negative_ttl` old (auth.md: "no grant" is cached 5 s).
                        Decision::Forbidden => match cache.lookup_again(token, request_id).await {
                            Some(newer) => decide(&newer, resource, action),
                            None => Decision::Forbidden,
                        },
                        decision => decision,
                    },
                    Lookup::Unavailable => Decision::Unavailable,
                }
            }
        };
        count(&decision);
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_bearer_or_basic_password() {
        let token = |value: &str| {
            Token::from_authorization(value).map(|t| t.map(|t| t.expose().to_owned()))
        };
        assert_eq!(token("Bearer abc"), Ok(Some("abc".into())));
        // "x:s3cret"
        assert_eq!(token("Basic eDpzM2NyZXQ="), Ok(Some("s3cret".into())));
        assert_eq!(
            token("Basic eDo="),
            Ok(None),
            "an empty password is no token"
        );
        // An unset token variable: `Bearer ` arrives trimmed to the bare scheme.
        assert_eq!(
            token("Bearer "),
            Ok(None),
            "an empty bearer token is no token"
        );
        assert_eq!(token("Bearer"), Ok(None));
        assert_eq!(token("abc"), Err(MalformedCredentials));
        assert_eq!(token("Digest abc"), Err(MalformedCredentials));
        assert_eq!(token("Basic !!!"), Err(MalformedCredentials));
    }
}
