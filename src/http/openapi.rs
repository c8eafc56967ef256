//! The OpenAPI 3.1 document, generated from the handlers' annotations and the types
//! they take and return (utoipa), served at `GET /openapi.json`.

use axum::{Json, response::IntoResponse};
use utoipa::{
    Modify, OpenApi,
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
};

use super::{
    attempts, audit, batches, candidates, error, invitations, jobs, queue, service, suppressions,
    webhooks,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "invite-worker",
        description = "Bulk interview invitations: one email with a unique, single-use link per candidate, \
                       sent through a durable Postgres queue, with an exact tally. Every error is \
                       application/problem+json with a stable `code` (see the ErrorCode schema). \
                       Any /v1 route answers 429 `rate_limited` (with Retry-After) to an address past \
                       its budget of failed authentications, and any request whose body is not \
                       complete within the request timeout gets 408 `request_timeout`."
    ),
    paths(
        jobs::put_job, jobs::get_job,
        batches::create, batches::preview, batches::list, batches::get, batches::items,
        batches::retry, batches::cancel, batches::failures, attempts::list,
        candidates::erase,
        invitations::list, invitations::redeem, invitations::get, invitations::complete,
        invitations::revoke,
        suppressions::list, suppressions::delete,
        audit::list,
        queue::overview, queue::dead, queue::retry_dead,
        webhooks::create, webhooks::list, webhooks::get, webhooks::delete,
        webhooks::rotate_secret, webhooks::deliveries, webhooks::replay,
        service::healthz, service::readyz, service::metrics, serve,
    ),
    components(schemas(error::Problem, error::ErrorCode)),
    modifiers(&BearerAuth),
    tags(
        (name = "jobs", description = "Job openings"),
        (name = "batches", description = "Bulk invite requests and their items"),
        (name = "invitations", description = "Single-use interview links"),
        (name = "candidates", description = "Erasure of a candidate's personal data"),
        (name = "suppressions", description = "Addresses not sent to: refused before as bad mailboxes"),
        (name = "audit", description = "Who changed what (admin)"),
        (name = "queue", description = "Queue figures and dead tasks (admin)"),
        (name = "webhooks", description = "Signed events to the web app's endpoints, their delivery log and replay (admin)"),
        (name = "service", description = "Health, readiness, metrics, this document (no auth)"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

pub(crate) fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The OpenAPI document, generated from the handlers and types.
#[utoipa::path(get, path = "/openapi.json", tag = "service",
    responses((status = 200, description = "This document (OpenAPI 3.1)", content_type = "application/json")))]
pub(crate) async fn serve() -> impl IntoResponse {
    Json(document())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::error::ErrorCode;

    /// Every route of the contract, as (method, path).
    pub(crate) const ROUTES: &[(&str, &str)] = &[
        ("put", "/v1/jobs/{job_id}"),
        ("get", "/v1/jobs/{job_id}"),
        ("post", "/v1/batches"),
        ("get", "/v1/batches"),
        ("post", "/v1/batches/preview"),
        ("get", "/v1/batches/{id}"),
        ("get", "/v1/batches/{id}/items"),
        ("post", "/v1/batches/{id}/retry"),
        ("post", "/v1/batches/{id}/cancel"),
        ("get", "/v1/batches/{id}/items/{candidate_id}/attempts"),
        ("delete", "/v1/candidates/{candidate_id}"),
        ("get", "/v1/batches/{id}/failures"),
        ("get", "/v1/invitations"),
        ("get", "/v1/invitations/{id}"),
        ("post", "/v1/invitations/redeem"),
        ("post", "/v1/invitations/{id}/complete"),
        ("post", "/v1/invitations/{id}/revoke"),
        ("get", "/v1/suppressions"),
        ("delete", "/v1/suppressions/{email}"),
        ("get", "/v1/audit"),
        ("get", "/v1/queue"),
        ("get", "/v1/queue/dead"),
        ("post", "/v1/queue/dead/retry"),
        ("post", "/v1/webhooks"),
        ("get", "/v1/webhooks"),
        ("get", "/v1/webhooks/{id}"),
        ("delete", "/v1/webhooks/{id}"),
        ("post", "/v1/webhooks/{id}/rotate-secret"),
        ("get", "/v1/webhooks/{id}/deliveries"),
        ("post", "/v1/webhooks/{id}/deliveries/{delivery_id}/replay"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
    ];

    #[test]
    fn the_document_parses_and_lists_every_route_and_error_code() {
        let text = serde_json::to_string(&document()).expect("serializes");
        let doc: serde_json::Value = serde_json::from_str(&text).expect("parses");
        assert!(
            doc["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.1"))
        );
        for (method, path) in ROUTES {
            assert!(
                doc["paths"][path][method].is_object(),
                "{method} {path} is documented"
            );
        }
        let documented = doc["paths"].as_object().map(|p| p.len()).unwrap_or(0);
        let distinct: std::collections::HashSet<_> = ROUTES.iter().map(|(_, p)| p).collect();
        assert_eq!(documented, distinct.len(), "no undocumented extra paths");
        let codes = &doc["components"]["schemas"]["ErrorCode"]["enum"];
        for code in ErrorCode::ALL {
            assert!(
                codes
                    .as_array()
                    .is_some_and(|c| c.iter().any(|v| v == code.as_str())),
                "error code {} is in the schema",
                code.as_str()
            );
        }
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
        for schema in ["AttemptList", "Attempt", "AttemptOutcome", "Erased"] {
            assert!(
                doc["components"]["schemas"][schema].is_object(),
                "{schema} is a component: the routes' $refs resolve"
            );
        }
    }

    /// Every `"$ref"` in `value`, with where it sits.
    fn refs<'a>(value: &'a serde_json::Value, at: String, out: &mut Vec<(String, &'a str)>) {
        match value {
            serde_json::Value::Object(fields) => {
                for (key, item) in fields {
                    match (key.as_str(), item.as_str()) {
                        ("$ref", Some(target)) => out.push((at.clone(), target)),
                        _ => refs(item, format!("{at}/{key}"), out),
                    }
                }
            }
            serde_json::Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    refs(item, format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn every_reference_in_the_document_resolves() {
        let doc = serde_json::to_value(document()).expect("serializes");
        let mut found = Vec::new();
        refs(&doc, String::new(), &mut found);
        assert!(!found.is_empty(), "the document uses references");
        let dangling: Vec<String> = found
            .iter()
            .filter(|(_, target)| {
                target
                    .strip_prefix('#')
                    .is_none_or(|pointer| doc.pointer(pointer).is_none())
            })
            .map(|(at, target)| format!("{at} -> {target}"))
            .collect();
        assert!(
            dangling.is_empty(),
            "references that resolve to nothing: {dangling:#?}"
        );
    }
}
