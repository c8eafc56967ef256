//! The console's webhooks pages: endpoints, each one's recent deliveries, and replay.

use askama::Template;
use axum::{
    extract::{FromRequestParts, Path, State},
    http::{Uri, request::Parts},
    response::{IntoResponse, Redirect, Response},
};
use uuid::Uuid;

use super::{
    pages::{notice, query, when},
    session::{ConsoleForm, SignedIn},
    view::{Failure, Header, page},
};
use crate::{
    db::webhooks::{self, Endpoint, Replay},
    domain::{access::Actor, webhook::DeliveryStatus},
    http::state::AppState,
};

/// The most deliveries an endpoint's page lists.
const DELIVERIES: i64 = 100;

/// The ids of a path (an endpoint's, and a delivery's); anything else is a page that
/// does not exist.
pub(super) struct Ids(Vec<Uuid>);

impl<S: Send + Sync> FromRequestParts<S> for Ids {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Failure> {
        let Path(ids) = Path::<Vec<(String, String)>>::from_request_parts(parts, state)
            .await
            .map_err(|_| Failure::NotFound)?;
        ids.iter()
            .map(|(_, v)| Uuid::parse_str(v).map_err(|_| Failure::NotFound))
            .collect::<Result<_, _>>()
            .map(Ids)
    }
}

struct EndpointLine {
    id: Uuid,
    url: String,
    description: String,
    events: String,
    enabled: bool,
    state: String,
    created_at: String,
    pending: i64,
    failed: i64,
}

impl EndpointLine {
    /// `full_url` for operators; viewers see the scheme and host only, as logs do (a
    /// receiver may put a token in the rest of its URL).
    fn of(e: Endpoint, pending: i64, failed: i64, full_url: bool) -> Self {
        let state = match (&e.disabled_at, &e.disabled_reason) {
            (None, _) => "enabled".to_owned(),
            (Some(at), reason) => format!(
                "disabled {} ({})",
                when(*at),
                reason.as_deref().unwrap_or("no reason recorded")
            ),
        };
        EndpointLine {
            id: e.id,
            url: if full_url {
                e.url
            } else {
                let scheme = e.url.split_once("://").map_or("https", |(s, _)| s);
                format!("{scheme}://{}/…", webhooks::host_of(&e.url))
            },
            description: if e.description.is_empty() {
                e.id.to_string()
            } else {
                e.description
            },
            events: e
                .events
                .iter()
                .map(|t| t.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            enabled: e.disabled_at.is_none(),
            state,
            created_at: when(e.created_at),
            pending,
            failed,
        }
    }
}

#[derive(Template)]
#[template(path = "console/webhooks.html")]
struct ListPage {
    header: Header,
    endpoints: Vec<EndpointLine>,
}

/// Every endpoint, with how many of its deliveries are pending and failed.
pub(super) async fn list(
    State(state): State<AppState>,
    signed_in: SignedIn,
) -> Result<Response, Failure> {
    let endpoints = webhooks::list(&state.pool).await?;
    let counts = webhooks::delivery_counts(&state.pool).await?;
    let header = signed_in.header();
    let endpoints = endpoints
        .into_iter()
        .map(|e| {
            let (pending, failed) = counts
                .iter()
                .find(|c| c.0 == e.id)
                .map_or((0, 0), |c| (c.1, c.2));
            EndpointLine::of(e, pending, failed, header.can_act)
        })
        .collect();
    Ok(page(&ListPage { header, endpoints }))
}

struct DeliveryLine {
    id: Uuid,
    event_id: String,
    event_type: &'static str,
    status: &'static str,
    attempts: i32,
    last_answer: String,
    duration: String,
    next_attempt_at: String,
    created_at: String,
}

#[derive(Template)]
#[template(path = "console/webhook.html")]
struct EndpointPage {
    header: Header,
    endpoint: EndpointLine,
    notice: Option<String>,
    statuses: Vec<(&'static str, bool)>,
    deliveries: Vec<DeliveryLine>,
}

/// One endpoint and its deliveries, newest first, filtered by status; replay for
/// operators.
pub(super) async fn endpoint(
    State(state): State<AppState>,
    signed_in: SignedIn,
    Ids(ids): Ids,
    uri: Uri,
) -> Result<Response, Failure> {
    let id = *ids.first().ok_or(Failure::NotFound)?;
    let Some(endpoint) = webhooks::get(&state.pool, id).await? else {
        return Err(Failure::NotFound);
    };
    let q = query(&uri);
    let status = q.get("status").and_then(|s| DeliveryStatus::parse(s));
    let mut conn = state.pool.acquire().await?;
    let deliveries = webhooks::deliveries(&mut conn, id, status, DELIVERIES)
        .await?
        .ok_or(Failure::NotFound)?;
    let header = signed_in.header();
    let can_act = header.can_act;
    let deliveries = deliveries
        .into_iter()
        .map(|d| DeliveryLine {
            id: d.id,
            event_id: d.event_id,
            event_type: d.event_type.as_str(),
            status: d.status.as_str(),
            attempts: d.attempts,
            last_answer: match (d.last_status_code, d.last_error) {
                (Some(code), _) => format!("HTTP {code}"),
                (None, Some(error)) => header.reply(&error),
                (None, None) => String::new(),
            },
            duration: d
                .last_duration_ms
                .map(|ms| format!("{ms} ms"))
                .unwrap_or_default(),
            next_attempt_at: d.next_attempt_at.map(when).unwrap_or_default(),
            created_at: when(d.created_at),
        })
        .collect();
    Ok(page(&EndpointPage {
        header,
        endpoint: EndpointLine::of(endpoint, 0, 0, can_act),
        notice: notice(&q),
        statuses: DeliveryStatus::ALL
            .iter()
            .map(|s| (s.as_str(), Some(*s) == status))
            .collect(),
        deliveries,
    }))
}

#[derive(serde::Deserialize)]
pub(super) struct ReplayForm {
    csrf: Option<String>,
}

/// Sends a delivery's event once more (same `webhook-id`), as the API's replay does.
pub(super) async fn replay(
    State(state): State<AppState>,
    signed_in: SignedIn,
    Ids(ids): Ids,
    ConsoleForm(form): ConsoleForm<ReplayForm>,
) -> Result<Response, Failure> {
    signed_in.may_act(form.csrf.as_deref())?;
    let [endpoint, delivery] = ids[..] else {
        return Err(Failure::NotFound);
    };
    let actor = Actor::operator(&signed_in.session.name);
    let done = match webhooks::replay(&state.pool, endpoint, delivery, &actor).await? {
        Replay::Queued(_) => "replayed",
        Replay::Disabled => "disabled",
        Replay::NotFound => return Err(Failure::NotFound),
    };
    Ok(Redirect::to(&format!("/console/webhooks/{endpoint}?done={done}")).into_response())
}
