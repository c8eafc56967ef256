//! Extractors that turn every malformed request into a problem, never a bare 4xx/5xx.

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::{HeaderMap, HeaderName, header, request::Parts},
};
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::error::ApiError;

/// The header that carries a request's id: the client's if it sent one, else a new
/// UUID (the router's request-id layer); answered back, and recorded with a batch the
/// request creates.
pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request's id as a batch stores it: a client's own id longer than 200
/// characters is not kept.
pub(crate) fn request_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|id| (1..=200).contains(&id.len()))
        .map(str::to_owned)
}

/// A JSON body: `Content-Type: application/json` (415 otherwise), at most 1 MiB (413),
/// and a well-formed document of the expected shape (422 naming the field otherwise).
pub(crate) struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_json_bytes(req, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// An optional JSON body: an empty body reads as `None`; any other body must be JSON
/// as [`JsonBody`]'s is.
pub(crate) struct OptionalJsonBody<T>(pub Option<T>);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = is_json(req.headers());
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| body_rejection(e.status()))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJsonBody(None));
        }
        if !is_json {
            return Err(unsupported());
        }
        parse_json(&bytes).map(|v| OptionalJsonBody(Some(v)))
    }
}

/// The raw bytes of a JSON body, with the content type and size checked.
pub(crate) async fn read_json_bytes<S: Send + Sync>(
    req: Request,
    state: &S,
) -> Result<Bytes, ApiError> {
    if !is_json(req.headers()) {
        return Err(unsupported());
    }
    Bytes::from_request(req, state)
        .await
        .map_err(|e| body_rejection(e.status()))
}

/// `Content-Type: application/json` or `application/*+json`, any parameters.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json"
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        })
        .unwrap_or(false)
}

fn unsupported() -> ApiError {
    ApiError::UnsupportedMediaType("send the body as Content-Type: application/json".into())
}

fn body_rejection(status: axum::http::StatusCode) -> ApiError {
    if status == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge
    } else {
        ApiError::Validation("the request body could not be read".into())
    }
}

/// Parses one JSON document (nothing may follow it), refuses control characters in
/// its strings, and reads it into `T`, naming the field at fault
/// (`candidates[3].email: invalid type …`).
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::Validation(format!("malformed JSON: {e}")))?;
    if let Some(path) = control_character_at(&value, &mut String::new()) {
        let path = if path.is_empty() {
            "the body".into()
        } else {
            path
        };
        return Err(ApiError::Validation(format!(
            "{path}: must not contain control characters"
        )));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let what = strip_position(&e.into_inner().to_string());
        ApiError::Validation(if path == "." || path.is_empty() {
            what
        } else {
            format!("{path}: {what}")
        })
    })
}

/// Fields of free text, where a tab is allowed; no other control character is, in any
/// string (PostgreSQL text cannot hold NUL, and a line break has no place in an id).
const FREE_TEXT: &[&str] = &["name", "title"];

/// The path (`candidates[0].name`) of the first string, or object key, holding a
/// control character.
fn control_character_at(value: &serde_json::Value, path: &mut String) -> Option<String> {
    use serde_json::Value;
    let bad = |text: &str, tab_ok: bool| {
        text.chars()
            .any(|c| c.is_control() && !(tab_ok && c == '\t'))
    };
    match value {
        Value::String(text) => {
            let field = path.rsplit('.').next().unwrap_or_default();
            bad(text, FREE_TEXT.contains(&field)).then(|| path.clone())
        }
        Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            let len = path.len();
            path.push_str(&format!("[{i}]"));
            let found = control_character_at(item, path);
            path.truncate(len);
            found
        }),
        Value::Object(fields) => fields.iter().find_map(|(key, item)| {
            let len = path.len();
            if !path.is_empty() {
                path.push('.');
            }
            if bad(key, false) {
                path.push_str("(a field name)");
                return Some(path.clone());
            }
            path.push_str(key);
            let found = control_character_at(item, path);
            path.truncate(len);
            found
        }),
        _ => None,
    }
}

/// serde_json appends " at line 1 column 42"; the field path says more.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// A resource id in the path that must be a UUID; anything else is a 404.
pub(crate) struct PathUuid(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for PathUuid {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(raw) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|_| ApiError::NotFound("no such resource".into()))?;
        Uuid::parse_str(&raw)
            .map(PathUuid)
            .map_err(|_| ApiError::NotFound(format!("no resource with id {raw}")))
    }
}

/// A path parameter as text; one that is not UTF-8 once percent-decoded (`%ff`)
/// names no resource: 404.
pub(crate) struct PathText(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathText {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(text)| PathText(text))
            .map_err(|_| ApiError::NotFound("no such resource: the path is not valid UTF-8".into()))
    }
}

/// For query parameter fields: absent or empty (`?status=`) is `None`; anything else
/// must parse, or the request is a 422 naming the parameter.
pub(crate) fn optional<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let raw: Option<String> = serde::Deserialize::deserialize(d)?;
    match raw.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(text) => text.parse().map(Some).map_err(serde::de::Error::custom),
    }
}

/// Query parameters into a `#[serde(deny_unknown_fields)]` struct; a malformed or
/// unknown parameter is a 422 naming it.
pub(crate) struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(QueryParams)
            .map_err(|e| {
                ApiError::Validation(format!("query parameter {}: {}", e.path(), e.inner()))
            })
    }
}

/// A list's `limit` parameter: 1 to 500, 50 when absent.
pub(crate) fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    let limit = limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::Validation(format!(
            "limit: must be 1 to 500 (got {limit})"
        )));
    }
    Ok(limit)
}
