//! Sending one signed webhook attempt, behind the SSRF guard.
//!
//! **Signature** (Standard Webhooks, with the spec authors' `standardwebhooks` crate):
//! `webhook-id` (the event's id, the same on every attempt), `webhook-timestamp` (this
//! attempt's unix seconds) and `webhook-signature: v1,<base64 HMAC-SHA256 of
//! "{id}.{timestamp}.{body}">` keyed with the base64-decoded part of the `whsec_` secret.
//!
//! **SSRF guard**: unless `webhooks.allow_private_targets`, a target must be `https`,
//! and its host is resolved here, at send time, by [`GuardedResolver`]: every address
//! it resolves to must be public ([`is_public`]), and the connection is made to those
//! checked addresses (reqwest connects to what the resolver answers; it does not
//! resolve again). A host that is an IP literal is checked before the request, since
//! no resolution happens for it. Proxies from the environment are ignored: through a
//! proxy the guard would check the proxy's address, not the target's.
//!
//! Redirects are not followed (a 3xx is an answer like any other non-2xx), and an
//! attempt has one deadline for connect, TLS, request and answer headers.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::Utc;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use crate::{
    config::WebhookSettings,
    db::webhooks::{AttemptResult, Claimed},
    domain::webhook::is_public,
};

/// The error the resolver answers for a host with a non-public address.
#[derive(Debug, thiserror::Error)]
#[error("refused by the SSRF guard: {0} resolves to a non-public address")]
struct NotPublic(String);

/// Resolves with the system resolver and lets only public addresses through (all of a
/// host's addresses must be public, or none is used).
struct GuardedResolver {
    allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if !allow_private && addrs.iter().any(|a| !is_public(a.ip())) {
                return Err(Box::new(NotPublic(host)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// The HTTP client of webhook delivery.
pub(crate) struct WebhookClient {
    client: reqwest::Client,
    allow_private: bool,
}

impl WebhookClient {
    pub(crate) fn new(settings: &WebhookSettings) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardedResolver {
                allow_private: settings.allow_private_targets,
            }))
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(settings.timeout())
            .connect_timeout(settings.timeout())
            .user_agent(concat!("invite-worker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            client,
            allow_private: settings.allow_private_targets,
        })
    }

    /// Makes one attempt of `claimed` and says how it went. Never fails: every failure
    /// is an attempt result to record.
    pub(crate) async fn attempt(&self, claimed: &Claimed) -> AttemptResult {
        let started_at = Utc::now();
        let clock = Instant::now();
        let (status_code, error) = match self.send(claimed).await {
            Ok(code) if (200..300).contains(&code) => (Some(code), None),
            Ok(code) => (Some(code), Some(format!("the endpoint answered {code}"))),
            Err(e) => (None, Some(e)),
        };
        AttemptResult {
            started_at,
            duration: clock.elapsed(),
            status_code,
            error,
        }
    }

    async fn send(&self, claimed: &Claimed) -> Result<u16, String> {
        let url = reqwest::Url::parse(&claimed.url).map_err(|e| format!("bad URL: {e}"))?;
        if !self.allow_private {
            if url.scheme() != "https" {
                return Err("refused by the SSRF guard: not https".into());
            }
            let literal = match url.host() {
                Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
                Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
                _ => None,
            };
            if literal.is_some_and(|ip| !is_public(ip)) {
                return Err("refused by the SSRF guard: not a public address".into());
            }
        }
        let timestamp = Utc::now().timestamp();
        let signature = standardwebhooks::Webhook::new(&claimed.secret)
            .and_then(|w| w.sign(&claimed.event_id, timestamp, claimed.body.as_bytes()))
            .map_err(|e| format!("cannot sign: {e}"))?;
        let response = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", &claimed.event_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(claimed.body.clone())
            .send()
            .await
            .map_err(|e| describe(&e))?;
        Ok(response.status().as_u16())
    }
}

/// What went wrong, in one line: a timeout, the guard's refusal, or the connection's
/// error with its causes (no URL: it may carry a token of the receiver's).
fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".into();
    }
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    let mut causes = Vec::new();
    while let Some(cause) = source {
        if let Some(refused) = cause.downcast_ref::<NotPublic>() {
            return refused.to_string();
        }
        causes.push(cause.to_string());
        source = cause.source();
    }
    let kind = if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    match causes.last() {
        Some(root) => format!("{kind}: {root}"),
        None => kind.to_owned(),
    }
}

/// How long a claim is held: the attempt's deadline and a margin for recording it.
pub(crate) fn lease(settings: &WebhookSettings) -> Duration {
    settings.timeout() + Duration::from_secs(5)
}
