//! Who may do what to which project: every cache route takes an [`Authorized`] argument, and
//! that extractor is the single point where a request's account, project, action and token are
//! resolved and checked. Handlers build storage keys only from the project it hands them.
//!
//! Extractors run before the body is read, so a refused `Expect: 100-continue` upload gets its
//! final status without the client sending the body.

use std::borrow::Cow;
use std::marker::PhantomData;

use axum::extract::{FromRequestParts, RawPathParams};
use http::request::Parts;
use http::{Method, header};

use super::AppState;
use super::error::ApiError;
use crate::auth::{AccessRequest, Action, Decision};
use crate::layers::RequestId;
use crate::names;

/// Where a route finds its account and project.
#[derive(Clone, Copy, Debug)]
pub enum ScopeRule {
    /// `account_handle`/`tenant_id` and `project_handle`/`namespace_id` query parameters.
    Query,
    /// `{account}` and `{project}` path segments.
    Path,
    /// The node's account and a fixed project (Nx: `nx`, Metro: `metro`).
    Fixed(&'static str),
}

/// A route's [`ScopeRule`], as a type: each route's extractor is compiled for its rule, so no
/// per-request layer has to carry it.
pub trait Scope: Send + Sync + 'static {
    const RULE: ScopeRule;
}

/// [`ScopeRule::Query`], the rule of most routes.
#[derive(Clone, Copy, Debug)]
pub struct QueryScope;

impl Scope for QueryScope {
    const RULE: ScopeRule = ScopeRule::Query;
}

/// [`ScopeRule::Path`].
#[derive(Clone, Copy, Debug)]
pub struct PathScope;

impl Scope for PathScope {
    const RULE: ScopeRule = ScopeRule::Path;
}

/// A request that passed authorization under the scope rule `S`, with the project it may touch.
#[derive(Clone, Debug)]
pub struct Authorized<S = QueryScope> {
    /// Lowercased project handle; empty for account-scoped requests.
    pub project: String,
    /// Who is calling (a token's name, never the token).
    pub principal: std::sync::Arc<str>,
    scope: PhantomData<fn() -> S>,
}

impl<S: Scope> FromRequestParts<AppState> for Authorized<S> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let (account, project) = match S::RULE {
            ScopeRule::Query => scope_from_query(parts)?,
            ScopeRule::Path => scope_from_path(parts, app).await?,
            ScopeRule::Fixed(project) => (app.account.clone(), Some(project.to_string())),
        };
        let request = AccessRequest {
            account: &account,
            project: project.as_deref(),
            action: match parts.method {
                Method::GET | Method::HEAD => Action::Read,
                _ => Action::Write,
            },
            // A value that is not text cannot be valid credentials.
            authorization: parts
                .headers
                .get(header::AUTHORIZATION)
                .map(|v| v.to_str().unwrap_or("")),
            request_id: parts.extensions.get::<RequestId>().map(|id| &*id.0),
        };
        match app.auth.decide(&app.account, &request).await {
            Decision::Allow { principal } => Ok(Authorized {
                project: project.unwrap_or_default(),
                principal,
                scope: PhantomData,
            }),
            refused => {
                Err(ApiError::from_decision(&refused, &app.account)
                    .unwrap_or_else(ApiError::internal))
            }
        }
    }
}

fn scope_from_query(parts: &Parts) -> Result<(String, Option<String>), ApiError> {
    let query = parts.uri.query().unwrap_or("");
    let account = query_value(query, "account_handle", "tenant_id").ok_or_else(|| {
        ApiError::bad_request(
            "missing_account",
            "The account_handle (or tenant_id) query parameter is required",
        )
    })?;
    let project = query_value(query, "project_handle", "namespace_id")
        .map(|p| handle(&p, "bad_project"))
        .transpose()?;
    Ok((handle(&account, "bad_account")?, project))
}

/// The percent-decoded value of query parameter `name` (or, when it is absent, of `alias`), the
/// last one when repeated; `None` when absent or empty. Walks the query once, building no map:
/// this runs on every request of the query-scoped routes.
pub fn query_value<'q>(query: &'q str, name: &str, alias: &str) -> Option<Cow<'q, str>> {
    let mut named = None;
    let mut aliased = None;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        if key == name {
            named = Some(value);
        } else if key == alias {
            aliased = Some(value);
        }
    }
    named.or(aliased).filter(|value| !value.is_empty())
}

async fn scope_from_path(
    parts: &mut Parts,
    app: &AppState,
) -> Result<(String, Option<String>), ApiError> {
    let account = path_param(parts, app, "account").await?;
    let project = path_param(parts, app, "project").await?;
    Ok((
        handle(&account, "bad_account")?,
        Some(handle(&project, "bad_project")?),
    ))
}

fn handle(value: &str, code: &'static str) -> Result<String, ApiError> {
    names::normalize_handle(value).ok_or_else(|| {
        ApiError::bad_request(
            code,
            "Handles are 1-128 characters of a-z, 0-9, '.', '_' and '-'",
        )
    })
}

/// A percent-decoded path parameter; 400 when it is not valid UTF-8.
pub async fn path_param(parts: &mut Parts, app: &AppState, name: &str) -> Result<String, ApiError> {
    let params = RawPathParams::from_request_parts(parts, app)
        .await
        .map_err(|_| ApiError::bad_request("bad_path", "Malformed request path"))?;
    let raw = params
        .iter()
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
        .ok_or_else(|| ApiError::bad_request("bad_path", format!("Missing path segment {name}")))?;
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map(|v| v.into_owned())
        .map_err(|_| ApiError::bad_request("invalid_key", "Path segment is not valid UTF-8"))
}

/// The `{key}` path segment of a cache route, validated (no separators, NUL or dot segments).
#[derive(Clone, Debug)]
pub struct KeyParam(pub String);

impl FromRequestParts<AppState> for KeyParam {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let key = path_param(parts, app, "key").await?;
        if !names::valid_key(&key) {
            return Err(invalid_key());
        }
        Ok(KeyParam(key))
    }
}

pub fn invalid_key() -> ApiError {
    ApiError::bad_request(
        "invalid_key",
        "Keys are 1-512 characters of A-Z, a-z, 0-9 and . _ : + = -",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parts(query: &str) -> Option<Parts> {
        let request = http::Request::builder()
            .uri(format!("/x?{query}"))
            .body(())
            .ok()?;
        Some(request.into_parts().0)
    }

    #[test]
    fn query_scope_spellings_and_errors() {
        let scope = |q: &str| scope_from_query(&parts(q).unwrap()).map_err(|e| e.code);
        assert_eq!(
            scope("account_handle=Acme&project_handle=iOS"),
            Ok(("acme".into(), Some("ios".into())))
        );
        assert_eq!(
            scope("tenant_id=acme&namespace_id=ios"),
            Ok(("acme".into(), Some("ios".into())))
        );
        assert_eq!(scope("account_handle=acme"), Ok(("acme".into(), None)));
        assert_eq!(scope("project_handle=ios"), Err("missing_account"));
        assert_eq!(scope("account_handle="), Err("missing_account"));
        assert_eq!(scope("account_handle=a%2Fb"), Err("bad_account"));
        assert_eq!(
            scope("account_handle=acme&project_handle=.."),
            Err("bad_project")
        );
        // Percent- and plus-decoded; the last of a repeated name counts; a name given empty
        // does not fall back to its alias.
        assert_eq!(
            scope("account_handle=ac%6De&project_handle=a+b&project_handle=ios"),
            Ok(("acme".into(), Some("ios".into())))
        );
        assert_eq!(
            scope("tenant_id=acme&account_handle="),
            Err("missing_account")
        );
        assert_eq!(
            scope("tenant_id=globex&account_handle=acme"),
            Ok(("acme".into(), None))
        );
    }

    proptest! {
        #[test]
        fn any_query_yields_valid_handles_or_a_400(query in "[ -~]{0,80}") {
            if let Some(parts) = parts(&query) {
                match scope_from_query(&parts) {
                    Ok((account, project)) => {
                        prop_assert_eq!(names::normalize_handle(&account), Some(account.clone()));
                        if let Some(project) = project {
                            prop_assert_eq!(names::normalize_handle(&project), Some(project.clone()));
                        }
                    }
                    Err(error) => prop_assert_eq!(error.status, http::StatusCode::BAD_REQUEST),
                }
            }
        }
    }

    /// A node context for `account` "acme" whose requests `auth` decides.
    fn app_with(auth: crate::auth::Authorizer, dir: &std::path::Path) -> AppState {
        let mut config = crate::config::Config::default();
        config.node.account = "acme".into();
        let store =
            crate::storage::Store::open(crate::storage::StoreOptions::for_tests(dir)).unwrap();
        AppState(crate::context::NodeContext::new(
            config,
            store,
            auth,
            crate::lifecycle::Lifecycle::default(),
            None,
            None,
        ))
    }

    /// Asks every combination of credentials, account, project and action through the HTTP
    /// extractor, through the gRPC front end (metadata) and through a plain call of
    /// `Authorizer::decide`, asserts they agree, and returns the answers seen.
    async fn both_front_ends_agree(
        app: &AppState,
        credentials: &[Option<&str>],
    ) -> std::collections::BTreeSet<&'static str> {
        let mut seen = std::collections::BTreeSet::new();
        for authorization in credentials {
            for account in ["acme", "globex"] {
                for project in [None, Some("ios"), Some("android")] {
                    for (method, action) in
                        [(Method::GET, Action::Read), (Method::PUT, Action::Write)]
                    {
                        let mut uri = format!("/x?account_handle={account}");
                        if let Some(project) = project {
                            uri.push_str(&format!("&project_handle={project}"));
                        }
                        let mut request = http::Request::builder().method(method.clone()).uri(uri);
                        if let Some(value) = authorization {
                            request = request.header(header::AUTHORIZATION, *value);
                        }
                        let (mut parts, ()) = request.body(()).unwrap().into_parts();
                        let through_http =
                            match Authorized::<QueryScope>::from_request_parts(&mut parts, app)
                                .await
                            {
                                Ok(_) => "allow",
                                Err(error) => error.code,
                            };
                        let direct = app
                            .auth
                            .decide(
                                "acme",
                                &AccessRequest {
                                    account,
                                    project,
                                    action,
                                    authorization: *authorization,
                                    request_id: None,
                                },
                            )
                            .await;
                        // The gRPC front end (metadata; it always names a project).
                        if let Some(project) = project {
                            let mut metadata = tonic::metadata::MetadataMap::new();
                            if let Some(value) = authorization {
                                metadata.insert("authorization", value.parse().unwrap());
                            }
                            metadata.insert("x-kura-account", account.parse().unwrap());
                            let extensions = tonic::Extensions::new();
                            let call = crate::grpc::access::CallInfo {
                                metadata: &metadata,
                                extensions: &extensions,
                            };
                            let through_grpc =
                                crate::grpc::access::decide(app, &call, project, action).await;
                            assert_eq!(
                                through_grpc, direct,
                                "gRPC: {authorization:?} {account} {project} {action:?}"
                            );
                        }
                        let direct =
                            ApiError::from_decision(&direct, "acme").map_or("allow", |e| e.code);
                        assert_eq!(
                            through_http, direct,
                            "{authorization:?} {account} {project:?} {method}"
                        );
                        seen.insert(direct);
                    }
                }
            }
        }
        seen
    }

    /// Every row of the decision table (static tokens, and a control plane that cannot be
    /// reached), through the HTTP extractor, the gRPC front end and a plain call of
    /// `Authorizer::decide`: the same answers.
    #[tokio::test]
    async fn http_and_a_second_front_end_get_the_same_decisions() {
        use std::sync::Arc;

        use crate::auth::Authorizer;
        use crate::auth::cache::{CacheSettings, DecisionCache};
        use crate::auth::introspection::IntrospectionClient;
        use crate::auth::static_tokens::StaticTokens;

        let dir = tempfile::tempdir().unwrap();
        let hash = |token: &str| crate::auth::Token::new(token).sha256();
        let entry = |name: &str, token: &str, grants: &str| {
            format!(
                "[[tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\n[tokens.cache_grants]\n{grants}\n",
                hex::encode(hash(token))
            )
        };
        let file = dir.path().join("tokens.toml");
        let text = [
            entry(
                "w",
                "writer",
                r#"account = { read = ["acme"], write = ["acme"] }"#,
            ),
            entry(
                "r",
                "reader",
                r#"account = { read = ["acme"], write = [] }"#,
            ),
            entry(
                "i",
                "ios",
                r#"project = { read = ["acme/ios"], write = ["acme/ios"] }"#,
            ),
            entry(
                "g",
                "globex",
                r#"account = { read = ["globex"], write = ["globex"] }"#,
            ),
        ]
        .concat();
        std::fs::write(&file, text).unwrap();
        let credentials = [
            None,
            Some("Bearer writer"),
            Some("Bearer reader"),
            Some("Bearer ios"),
            Some("Bearer globex"),
            Some("Bearer nobody"),
            Some("Digest writer"),
            // "gradle:writer"
            Some("Basic Z3JhZGxlOndyaXRlcg=="),
        ];
        let static_tokens = Authorizer::Static(Arc::new(StaticTokens::load(&file).unwrap()));
        let app = app_with(static_tokens, &dir.path().join("static"));
        let mut seen = both_front_ends_agree(&app, &credentials).await;

        // A control plane on a loopback port nobody listens on: the backend is down.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut auth = crate::config::AuthConfig {
            control_plane_url: Some(format!("http://{}", closed.local_addr().unwrap())),
            ..Default::default()
        };
        auth.timeout.0 = std::time::Duration::from_secs(2);
        drop(closed);
        let cache = DecisionCache::new(
            IntrospectionClient::new(&auth).unwrap(),
            CacheSettings {
                fresh: auth.cache_fresh.0,
                max_age: auth.cache_max_age.0,
                negative_ttl: auth.negative_ttl.0,
                capacity: auth.cache_size,
            },
        );
        let introspection = Authorizer::Introspection(Arc::new(cache));
        let app = app_with(introspection, &dir.path().join("introspection"));
        seen.extend(both_front_ends_agree(&app, &credentials).await);

        let every_row = [
            "allow",
            "auth_unavailable",
            "forbidden",
            "invalid_token",
            "missing_token",
            "wrong_account",
        ];
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), every_row);
    }
}
