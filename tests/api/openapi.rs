//! The served OpenAPI document matches the router.

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{KEY, spawn_app};

#[tokio::test]
async fn every_documented_route_is_served_and_the_document_parses() {
    let app = spawn_app().await;
    let r = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    let doc: Value = r.json().await.expect("the document is JSON");
    let paths = doc["paths"].as_object().expect("paths");
    assert_eq!(paths.len(), 25, "every path of the contract is listed");
    for (path, methods) in paths {
        let concrete = path
            .replace("{job_id}", "job-1")
            .replace("{id}", "00000000-0000-0000-0000-000000000000")
            .replace("{email}", "someone@example.com")
            .replace("{candidate_id}", "c-1");
        for method in methods.as_object().expect("methods").keys() {
            let method =
                reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            // Without a key: /v1 routes answer 401, service routes answer; none is unrouted.
            let r = app
                .client
                .request(method.clone(), app.url(&concrete))
                .send()
                .await
                .expect("request");
            let status = r.status();
            let body: Value = if status.is_success() {
                Value::Null
            } else {
                r.json().await.expect("problem+json")
            };
            if path.starts_with("/v1/") {
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}: {body}");
                // Authentication comes before routing: with a key, the route is there.
                let r = app
                    .client
                    .request(method.clone(), app.url(&concrete))
                    .bearer_auth(KEY)
                    .send()
                    .await
                    .expect("request");
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
                assert!(!body.contains("no such route"), "{method} {path}: {body}");
            } else {
                assert!(status.is_success(), "{method} {path}: {status} {body}");
            }
        }
    }
}
