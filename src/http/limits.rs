//! Abuse limits per client IP (`[limits]`): failed authentications, and redeem calls.
//! Counted with governor's keyed GCRA limiters (a quota of N per minute: N at once,
//! then one more every 60/N s); stale entries are dropped as the maps are used, so
//! memory is bounded by the addresses seen in about the last minute.
//!
//! The client IP is the TCP peer. Behind a proxy every client shares the proxy's
//! address; the contract names no forwarded header to trust.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    num::NonZeroU32,
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::{
    extract::{ConnectInfo, FromRequestParts, Request},
    http::{Extensions, request::Parts},
};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock};

use super::error::ApiError;
use crate::config::LimitsSettings;

/// How often the limiters' maps are swept of entries that no longer limit anyone.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// The per-IP limiters of one process.
pub(crate) struct Limits {
    auth_failures: DefaultKeyedRateLimiter<IpAddr>,
    /// Addresses refused for failed authentications, until when: while here, none of
    /// their requests is authenticated, so a guess cannot be told right or wrong.
    blocked: Mutex<HashMap<IpAddr, Instant>>,
    redeems: DefaultKeyedRateLimiter<IpAddr>,
    last_sweep: Mutex<Instant>,
}

fn per_minute(n: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN))
}

impl Limits {
    pub(crate) fn new(settings: &LimitsSettings) -> Self {
        Self {
            auth_failures: RateLimiter::keyed(per_minute(settings.auth_failures_per_minute)),
            blocked: Mutex::new(HashMap::new()),
            redeems: RateLimiter::keyed(per_minute(settings.redeems_per_minute)),
            last_sweep: Mutex::new(Instant::now()),
        }
    }

    /// 429 when `client` spent its budget of failed authentications: checked when the
    /// key it presented is wrong.
    pub(crate) fn refuse_if_blocked(&self, client: IpAddr) -> Result<(), ApiError> {
        self.sweep();
        let until = lock(&self.blocked).get(&client).copied();
        match until.and_then(|t| t.checked_duration_since(Instant::now())) {
            Some(left) => Err(limited(client, "failed authentications", left)),
            None => Ok(()),
        }
    }

    /// A failed authentication by `client`: logged, counted, and answered 401, or 429
    /// once the budget is spent.
    pub(crate) fn auth_failed(&self, client: IpAddr) -> ApiError {
        tracing::warn!(client = %client, "authentication failed");
        match self.auth_failures.check_key(&client) {
            Ok(()) => ApiError::Unauthorized,
            Err(not_until) => {
                let left = not_until.wait_time_from(self.auth_failures.clock().now());
                lock(&self.blocked).insert(client, Instant::now() + left);
                limited(client, "failed authentications", left)
            }
        }
    }

    /// Counts a redeem call by `client`; 429 above `limits.redeems_per_minute`.
    pub(crate) fn redeem(&self, client: IpAddr) -> Result<(), ApiError> {
        self.redeems.check_key(&client).map_err(|not_until| {
            let left = not_until.wait_time_from(self.redeems.clock().now());
            limited(client, "redeem calls", left)
        })
    }

    /// Drops what no longer limits anyone, at most every [`SWEEP_EVERY`].
    fn sweep(&self) {
        {
            let mut last = lock(&self.last_sweep);
            if last.elapsed() < SWEEP_EVERY {
                return;
            }
            *last = Instant::now();
        }
        let now = Instant::now();
        lock(&self.blocked).retain(|_, until| *until > now);
        self.auth_failures.retain_recent();
        self.auth_failures.shrink_to_fit();
        self.redeems.retain_recent();
        self.redeems.shrink_to_fit();
    }
}

/// A poisoned lock only means another request panicked mid-update of a map of
/// deadlines; its contents are still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn limited(client: IpAddr, what: &str, left: Duration) -> ApiError {
    let retry_after_secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
    tracing::warn!(client = %client, retry_after_secs, "rate limited: too many {what}");
    ApiError::RateLimited {
        what: what.to_owned(),
        retry_after_secs: retry_after_secs.max(1),
    }
}

/// The client's address as the limits count it: the TCP peer, an IPv4-mapped IPv6
/// address as IPv4, and an IPv6 address by its /64 (one host's usual allocation).
/// A request with no peer (called in-process, as the demo does) counts as loopback.
pub(crate) fn client_ip(request: &Request) -> IpAddr {
    client_ip_of(request.extensions())
}

/// [`client_ip`] from a request's extensions.
pub(crate) fn client_ip_of(extensions: &Extensions) -> IpAddr {
    let peer = extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |c| c.0.ip());
    match peer {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
        v4 => v4,
    }
}

/// The client's address ([`client_ip`]) as an extractor, for handlers that read a body.
pub(crate) struct ClientIp(pub(crate) IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientIp(client_ip_of(&parts.extensions)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        let ip = |s: &str| {
            let mut r = Request::new(axum::body::Body::empty());
            r.extensions_mut()
                .insert(ConnectInfo(SocketAddr::new(s.parse().expect("ip"), 1)));
            client_ip(&r)
        };
        assert_eq!(ip("2001:db8:1:2:aaaa::1"), ip("2001:db8:1:2:bbbb::9"));
        assert_ne!(ip("2001:db8:1:2::1"), ip("2001:db8:1:3::1"));
        assert_eq!(
            ip("::ffff:192.0.2.7"),
            "192.0.2.7".parse::<IpAddr>().expect("ip")
        );
    }

    #[test]
    fn addresses_that_no_longer_limit_anyone_are_swept_away() {
        let limits = Limits::new(&LimitsSettings {
            auth_failures_per_minute: 1_000_000,
            redeems_per_minute: 1_000_000,
        });
        for i in 0..1_000u32 {
            let client = IpAddr::V4(i.into());
            let _ = limits.auth_failed(client);
            let _ = limits.redeem(client);
        }
        assert_eq!(limits.auth_failures.len(), 1_000);
        assert_eq!(limits.redeems.len(), 1_000);
        // A million a minute refills in microseconds: every entry is stale by now.
        std::thread::sleep(Duration::from_millis(20));
        {
            let mut last = lock(&limits.last_sweep);
            *last = last.checked_sub(SWEEP_EVERY).expect("an earlier instant");
        }
        limits
            .refuse_if_blocked(IpAddr::V4(Ipv4Addr::LOCALHOST))
            .expect("not blocked");
        assert_eq!(limits.auth_failures.len(), 0);
        assert_eq!(limits.redeems.len(), 0);
    }
}
