//! Per recipient domain, in this process: at most `mail.per_domain_concurrency`
//! messages in flight, and a pause after a throttling reply (421, or 4.7.x "slow down")
//! for the server's hint or the backoff, while other domains go on.
//!
//! Items of a paused domain are not sent: they are deferred until the pause ends,
//! without using an attempt, so a throttling server does not use up
//! `retry.max_attempts` faster than its throttling lasts. The item that got the
//! throttling reply used an attempt, as any transient failure does.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

/// Domains remembered at most; beyond it, idle ones are forgotten.
const MAX_DOMAINS: usize = 10_000;

pub(crate) struct DomainGate {
    per_domain: usize,
    domains: Mutex<HashMap<String, Domain>>,
}

struct Domain {
    sending: Arc<Semaphore>,
    paused_until: Option<Instant>,
}

/// What entering a domain's gate gave.
pub(crate) enum Entry {
    /// Send now; the place is held until this is dropped.
    Go(OwnedSemaphorePermit),
    /// The domain is paused for this long: do not send.
    Paused(Duration),
    /// Every place of the domain stayed taken for the whole wait.
    Busy,
}

impl DomainGate {
    pub(crate) fn new(per_domain: usize) -> Self {
        Self {
            per_domain: per_domain.max(1),
            domains: Mutex::new(HashMap::new()),
        }
    }

    /// A place among `domain`'s sends, waiting up to `wait` for one; or why not.
    pub(crate) async fn enter(&self, domain: &str, wait: Duration) -> Entry {
        let sending = {
            let mut domains = self.lock();
            if domains.len() >= MAX_DOMAINS {
                let per_domain = self.per_domain;
                let now = Instant::now();
                domains.retain(|_, d| {
                    d.sending.available_permits() < per_domain
                        || d.paused_until.is_some_and(|until| until > now)
                });
            }
            let d = domains.entry(domain.to_owned()).or_insert_with(|| Domain {
                sending: Arc::new(Semaphore::new(self.per_domain)),
                paused_until: None,
            });
            if let Some(left) = paused_for(d.paused_until) {
                return Entry::Paused(left);
            }
            d.sending.clone()
        };
        match tokio::time::timeout(wait, sending.acquire_owned()).await {
            Ok(Ok(permit)) => match paused_for(self.paused_until(domain)) {
                // Paused while this send waited for its place.
                Some(left) => Entry::Paused(left),
                None => Entry::Go(permit),
            },
            _ => Entry::Busy,
        }
    }

    /// Pauses `domain` for `how_long` (or longer, if it is paused longer already).
    pub(crate) fn pause(&self, domain: &str, how_long: Duration) {
        let until = Instant::now() + how_long;
        let mut domains = self.lock();
        if let Some(d) = domains.get_mut(domain) {
            d.paused_until = Some(d.paused_until.map_or(until, |u| u.max(until)));
        }
    }

    fn paused_until(&self, domain: &str) -> Option<Instant> {
        self.lock().get(domain).and_then(|d| d.paused_until)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Domain>> {
        self.domains.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn paused_for(until: Option<Instant>) -> Option<Duration> {
    until
        .map(|u| u.saturating_duration_since(Instant::now()))
        .filter(|left| !left.is_zero())
}

/// The recipient domain of an address, lower-cased.
pub(crate) fn domain_of(address: &str) -> String {
    address
        .trim()
        .rsplit_once('@')
        .map(|(_, domain)| domain.to_ascii_lowercase())
        .unwrap_or_default()
}

/// A reply that asks us to slow down: 421 (service not available, closing), or an
/// enhanced status 4.7.x (policy: rate limits, greylisting).
pub(crate) fn is_throttling(reply: &str) -> bool {
    let mut words = reply.split_whitespace();
    let code = words.next().unwrap_or_default();
    code == "421" || (code.starts_with('4') && words.next().is_some_and(|e| e.starts_with("4.7.")))
}

/// How long the reply asks us to wait, when it says (`try again in 30 seconds`,
/// `retry in 2 minutes`); at most an hour.
pub(crate) fn retry_hint(reply: &str) -> Option<Duration> {
    let words: Vec<String> = reply
        .split_whitespace()
        .map(|w| {
            w.trim_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_ascii_lowercase()
        })
        .collect();
    words.windows(2).find_map(|pair| {
        let n: u64 = pair[0].parse().ok()?;
        let unit = pair[1].as_str();
        let secs = if unit.starts_with("sec") || unit == "s" {
            n
        } else if unit.starts_with("min") || unit == "m" {
            n.saturating_mul(60)
        } else {
            return None;
        };
        Some(Duration::from_secs(secs.min(3600)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_replies_and_their_hints_are_recognised() {
        assert!(is_throttling(
            "421 4.7.0 Too many messages, try again in 30 seconds"
        ));
        assert!(is_throttling("451 4.7.1 Rate limited"));
        assert!(is_throttling("421 closing"));
        assert!(!is_throttling("451 4.3.0 try later"));
        assert!(!is_throttling("550 5.7.1 refused"));
        assert!(!is_throttling("connection failed: refused"));
        assert_eq!(
            retry_hint("421 4.7.0 try again in 30 seconds"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_hint("421 retry in 2 minutes."),
            Some(Duration::from_secs(120))
        );
        assert_eq!(retry_hint("421 4.7.0 slow down"), None);
        assert_eq!(
            retry_hint("421 wait 99999 min"),
            Some(Duration::from_secs(3600))
        );
    }

    /// In paused (virtual) time.
    #[tokio::test(start_paused = true)]
    async fn a_domain_holds_at_most_its_places_pauses_alone_and_others_go_on() {
        let gate = DomainGate::new(2);
        let a1 = gate.enter("a.example", Duration::from_secs(1)).await;
        let a2 = gate.enter("a.example", Duration::from_secs(1)).await;
        assert!(matches!((&a1, &a2), (Entry::Go(_), Entry::Go(_))));
        // A third waits its whole bound, then is busy; another domain goes at once.
        let started = Instant::now();
        assert!(matches!(
            gate.enter("a.example", Duration::from_secs(1)).await,
            Entry::Busy
        ));
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        assert!(matches!(
            gate.enter("b.example", Duration::ZERO).await,
            Entry::Go(_)
        ));
        // A place freed goes to the next.
        drop(a1);
        assert!(matches!(
            gate.enter("a.example", Duration::from_secs(1)).await,
            Entry::Go(_)
        ));

        gate.pause("b.example", Duration::from_secs(30));
        assert!(matches!(
            gate.enter("b.example", Duration::from_secs(1)).await,
            Entry::Paused(left) if left == Duration::from_secs(30)
        ));
        assert!(matches!(
            gate.enter("c.example", Duration::ZERO).await,
            Entry::Go(_)
        ));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(matches!(
            gate.enter("b.example", Duration::ZERO).await,
            Entry::Go(_)
        ));
        drop(a2);
    }
}
