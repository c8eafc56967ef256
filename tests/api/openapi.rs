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
    assert_eq!(paths.len(), 30, "every path of the contract is listed");
    for (path, methods) in paths {
        let concrete = path
            .replace("{job_id}", "job-1")
            .replace("{id}", "00000000-0000-0000-0000-000000000000")
            .replace("{delivery_id}", "00000000-0000-0000-0000-000000000000")
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

/// The served document is valid OpenAPI 3.1 by an independent validator
/// (`openapi-spec-validator`, which `scripts/test` installs), every `$ref` included.
#[tokio::test]
async fn the_served_document_passes_an_independent_openapi_validator() {
    let app = spawn_app().await;
    let r = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.expect("the document");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("openapi.json");
    std::fs::write(&path, text).expect("written");
    let out = std::process::Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&path)
        .output()
        .expect("python3 runs (scripts/test installs openapi-spec-validator)");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the document does not validate:\n{report}"
    );
    assert!(report.contains("OK"), "{report}");
}
