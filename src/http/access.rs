//! Who is calling and what they may do: bearer keys checked in constant time, the
//! scope every `/v1` route needs (one table), and the caller's name for handlers.

use std::sync::Arc;

use axum::{
    extract::{FromRequestParts, MatchedPath, Request},
    http::{HeaderMap, Method, header, request::Parts},
    middleware::Next,
    response::Response,
};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use super::error::ApiError;
use crate::{
    config::ApiKey,
    domain::access::{Actor, Scope},
};

/// The scope each `/v1` route needs: (method, route pattern as the router names it,
/// scope). A route missing here needs `admin` (the queue, webhook and other operator
/// routes do), so forgetting a line locks a route down rather than opening it.
const ROUTE_SCOPES: &[(Method, &str, Scope)] = &[
    (Method::GET, "/v1/jobs/{job_id}", Scope::BatchesRead),
    (Method::PUT, "/v1/jobs/{job_id}", Scope::BatchesWrite),
    (Method::GET, "/v1/batches", Scope::BatchesRead),
    (Method::POST, "/v1/batches", Scope::BatchesWrite),
    (Method::POST, "/v1/batches/preview", Scope::BatchesWrite),
    (Method::GET, "/v1/batches/{id}", Scope::BatchesRead),
    (Method::GET, "/v1/batches/{id}/items", Scope::BatchesRead),
    (
        Method::GET,
        "/v1/batches/{id}/items/{candidate_id}/attempts",
        Scope::BatchesRead,
    ),
    (Method::GET, "/v1/batches/{id}/failures", Scope::BatchesRead),
    (Method::POST, "/v1/batches/{id}/retry", Scope::BatchesWrite),
    (Method::POST, "/v1/batches/{id}/cancel", Scope::BatchesWrite),
    (Method::GET, "/v1/invitations", Scope::BatchesRead),
    (Method::GET, "/v1/invitations/{id}", Scope::BatchesRead),
    (
        Method::POST,
        "/v1/invitations/redeem",
        Scope::InvitationsRedeem,
    ),
    (
        Method::POST,
        "/v1/invitations/{id}/complete",
        Scope::InvitationsRedeem,
    ),
    (
        Method::POST,
        "/v1/invitations/{id}/revoke",
        Scope::InvitationsWrite,
    ),
    (Method::GET, "/v1/suppressions", Scope::Admin),
    (Method::DELETE, "/v1/suppressions/{email}", Scope::Admin),
    (
        Method::DELETE,
        "/v1/candidates/{candidate_id}",
        Scope::Admin,
    ),
    (Method::GET, "/v1/audit", Scope::Admin),
    (Method::GET, "/v1/queue", Scope::Admin),
    (Method::GET, "/v1/queue/dead", Scope::Admin),
    (Method::POST, "/v1/queue/dead/retry", Scope::Admin),
    (Method::GET, "/v1/webhooks", Scope::Admin),
    (Method::POST, "/v1/webhooks", Scope::Admin),
    (Method::GET, "/v1/webhooks/{id}", Scope::Admin),
    (Method::DELETE, "/v1/webhooks/{id}", Scope::Admin),
    (
        Method::POST,
        "/v1/webhooks/{id}/rotate-secret",
        Scope::Admin,
    ),
    (Method::GET, "/v1/webhooks/{id}/deliveries", Scope::Admin),
    (
        Method::POST,
        "/v1/webhooks/{id}/deliveries/{delivery_id}/replay",
        Scope::Admin,
    ),
];

/// The scope a request to the route `pattern` with `method` needs.
pub(crate) fn required_scope(method: &Method, pattern: &str) -> Scope {
    // axum answers HEAD with the GET handler: it needs what GET needs.
    let method = if method == Method::HEAD {
        &Method::GET
    } else {
        method
    };
    ROUTE_SCOPES
        .iter()
        .find(|(m, p, _)| m == method && *p == pattern)
        .map_or(Scope::Admin, |(_, _, scope)| *scope)
}

/// The token of `Authorization: Bearer <token>`; the scheme word in any case.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The configured key whose token is `presented`. Every key is compared, by SHA-256
/// digest and in constant time, so timing tells nothing about which key (or how much of
/// one) a guess matched.
pub(crate) fn authenticate<'k>(keys: &'k [ApiKey], presented: &str) -> Option<&'k ApiKey> {
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    let mut found = subtle::Choice::from(0u8);
    let mut index = 0u32;
    for (i, key) in keys.iter().enumerate() {
        let same = key.sha256().ct_eq(&digest);
        let i = u32::try_from(i).unwrap_or(u32::MAX);
        index.conditional_assign(&i, same);
        found |= same;
    }
    let index = usize::try_from(index).ok()?;
    bool::from(found).then(|| keys.get(index)).flatten()
}

/// The API key a request was made with: its name and scopes (never the key). The
/// authentication middleware puts it in the request's extensions; handlers take it as
/// an extractor.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub(crate) name: Arc<str>,
    pub(crate) scopes: Arc<[Scope]>,
}

impl Caller {
    pub(crate) fn new(key: &ApiKey) -> Self {
        Self {
            name: key.name.as_str().into(),
            scopes: key.scopes.as_slice().into(),
        }
    }

    /// How the audit log names this caller: `key:<name>`.
    pub(crate) fn actor(&self) -> Actor {
        Actor::key(&self.name)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or(ApiError::Unauthorized)
    }
}

/// Route middleware: the authenticated caller must hold the scope of the route it
/// reached (403 `forbidden` naming the scope otherwise).
pub(crate) async fn authorize(request: Request, next: Next) -> Result<Response, ApiError> {
    let pattern = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("", MatchedPath::as_str);
    let needed = required_scope(request.method(), pattern);
    let caller = request
        .extensions()
        .get::<Caller>()
        .ok_or(ApiError::Unauthorized)?;
    if !needed.is_granted_by(&caller.scopes) {
        return Err(ApiError::Forbidden {
            scope: needed,
            route: format!("{} {pattern}", request.method()),
        });
    }
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_word_is_case_insensitive_and_the_token_required() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().expect("a header value"));
            bearer_token(&h).map(str::to_owned)
        };
        assert_eq!(with("Bearer abc").as_deref(), Some("abc"));
        assert_eq!(with("bearer abc").as_deref(), Some("abc"));
        assert_eq!(with("BEARER  abc ").as_deref(), Some("abc"));
        assert_eq!(with("Basic abc"), None);
        assert_eq!(with("Bearer "), None);
        assert_eq!(with("Bearerabc"), None);
    }

    #[test]
    fn authentication_finds_the_matching_key_among_several() {
        let keys = [
            ApiKey::new("a", "key-a", &[Scope::BatchesRead]),
            ApiKey::new("b", "key-b", &[Scope::Admin]),
        ];
        assert_eq!(
            authenticate(&keys, "key-b").map(|k| k.name.as_str()),
            Some("b")
        );
        assert_eq!(
            authenticate(&keys, "key-a").map(|k| k.name.as_str()),
            Some("a")
        );
        assert!(authenticate(&keys, "key-c").is_none());
        assert!(authenticate(&keys, "").is_none());
        assert!(authenticate(&[], "key-a").is_none());
    }

    #[test]
    fn every_documented_v1_route_has_its_line_in_the_table() {
        let doc = serde_json::to_value(crate::http::openapi::document()).expect("serializes");
        let paths = doc["paths"].as_object().expect("paths");
        let mut seen = 0;
        for (path, operations) in paths.iter().filter(|(p, _)| p.starts_with("/v1/")) {
            for method in operations.as_object().expect("operations").keys() {
                seen += 1;
                assert!(
                    ROUTE_SCOPES
                        .iter()
                        .any(|(m, p, _)| p == path && m.as_str().eq_ignore_ascii_case(method)),
                    "{method} {path} has no scope in ROUTE_SCOPES"
                );
            }
        }
        assert!(seen > 10, "the document lists the /v1 routes");
    }

    #[test]
    fn a_route_missing_from_the_table_needs_admin() {
        assert_eq!(
            required_scope(&Method::GET, "/v1/nothing-here"),
            Scope::Admin
        );
        assert_eq!(
            required_scope(&Method::HEAD, "/v1/batches"),
            Scope::BatchesRead,
            "HEAD needs what GET needs"
        );
        assert_eq!(
            required_scope(&Method::POST, "/v1/batches"),
            Scope::BatchesWrite
        );
    }
}
