//! Who may do what to which project: every cache route takes an [`Authorized`] argument, and
//! that extractor is the single point where a request's account, project, action and token are
//! resolved and checked. Handlers build storage keys only from the project it hands them.
//!
//! Extractors run before the body is read, so a refused `Expect: 100-continue` upload gets its
//! final status without the client sending the body.

use std::collections::HashMap;

use axum::extract::{FromRequestParts, Query, RawPathParams};
use base64::Engine as _;
use http::request::Parts;
use http::{HeaderMap, Method, header};

use super::AppState;
use super::error::ApiError;
use super::layers::RequestId;
use crate::auth::{Action, Decision, Resource, Token};
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

/// A request that passed authorization, with the project it may touch.
#[derive(Clone, Debug)]
pub struct Authorized {
    /// Lowercased project handle; empty for account-scoped requests.
    pub project: String,
    /// Who is calling (a token's name, never the token).
    pub principal: std::sync::Arc<str>,
}

impl FromRequestParts<AppState> for Authorized {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let rule = parts
            .extensions
            .get::<ScopeRule>()
            .copied()
            .unwrap_or(ScopeRule::Query);
        let (account, project) = match rule {
            ScopeRule::Query => scope_from_query(parts)?,
            ScopeRule::Path => scope_from_path(parts, app).await?,
            ScopeRule::Fixed(project) => (app.account.clone(), Some(project.to_string())),
        };
        if account != app.account {
            return Err(ApiError::new(
                http::StatusCode::FORBIDDEN,
                "wrong_account",
                format!("This node serves account {:?}", app.account),
            ));
        }
        let action = match parts.method {
            Method::GET | Method::HEAD => Action::Read,
            _ => Action::Write,
        };
        let token = token_from_headers(&parts.headers)?;
        let resource = Resource {
            account: &account,
            project: project.as_deref(),
        };
        let request_id = parts.extensions.get::<RequestId>().map(|id| id.0.as_str());
        match app
            .auth
            .authorize(token.as_ref(), &resource, action, request_id)
            .await
        {
            Decision::Allow { principal } => Ok(Authorized {
                project: project.unwrap_or_default(),
                principal,
            }),
            refused => Err(ApiError::from_decision(&refused).unwrap_or_else(ApiError::internal)),
        }
    }
}

/// The query parameters of a request (first value of each name).
pub fn query_params(parts: &Parts) -> Result<HashMap<String, String>, ApiError> {
    Query::<HashMap<String, String>>::try_from_uri(&parts.uri)
        .map(|Query(params)| params)
        .map_err(|e| ApiError::bad_request("bad_query", format!("Malformed query string: {e}")))
}

fn scope_from_query(parts: &Parts) -> Result<(String, Option<String>), ApiError> {
    let params = query_params(parts)?;
    let pick = |a: &str, b: &str| {
        params
            .get(a)
            .or_else(|| params.get(b))
            .filter(|v| !v.is_empty())
    };
    let account = pick("account_handle", "tenant_id").ok_or_else(|| {
        ApiError::bad_request(
            "missing_account",
            "The account_handle (or tenant_id) query parameter is required",
        )
    })?;
    let project = pick("project_handle", "namespace_id")
        .map(|p| handle(p, "bad_project"))
        .transpose()?;
    Ok((handle(account, "bad_account")?, project))
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

/// The token of a request: `Authorization: Bearer <token>` or Basic with the token as password.
fn token_from_headers(headers: &HeaderMap) -> Result<Option<Token>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let malformed = || {
        ApiError::new(
            http::StatusCode::UNAUTHORIZED,
            "invalid_token",
            "Invalid or expired token",
        )
    };
    let value = value.to_str().map_err(|_| malformed())?.trim();
    let (scheme, rest) = value.split_once(' ').ok_or_else(malformed)?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Ok((!rest.is_empty()).then(|| Token::new(rest)));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .map_err(|_| malformed())?;
        let decoded = String::from_utf8(decoded).map_err(|_| malformed())?;
        let (_, password) = decoded.split_once(':').ok_or_else(malformed)?;
        return Ok((!password.is_empty()).then(|| Token::new(password)));
    }
    Err(malformed())
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

    fn headers(value: &str) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert(header::AUTHORIZATION, value.parse().unwrap());
        map
    }

    #[test]
    fn tokens_come_from_bearer_or_basic_password() {
        let bearer = token_from_headers(&headers("Bearer abc")).unwrap().unwrap();
        assert_eq!(bearer.expose(), "abc");
        // "x:s3cret"
        let basic = token_from_headers(&headers("Basic eDpzM2NyZXQ="))
            .unwrap()
            .unwrap();
        assert_eq!(basic.expose(), "s3cret");
        assert!(token_from_headers(&HeaderMap::new()).unwrap().is_none());
        assert!(token_from_headers(&headers("Digest abc")).is_err());
        assert!(token_from_headers(&headers("Basic !!!")).is_err());
    }
}
