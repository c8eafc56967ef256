//! A server that throttles one recipient domain: that domain pauses for the server's
//! hint, its items go out when the throttling lifts and none fails, and the other
//! domain's items go on meanwhile.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::spawn_app_with;

#[tokio::test]
async fn a_throttled_domain_pauses_alone_and_its_items_go_out_when_it_lifts_none_failed() {
    let app = spawn_app_with(|s| {
        // With the backoff alone (200 ms, then 400 ms) three throttled attempts would
        // be used up within the throttling's 1.5 s, and the slow domain's items fail.
        s.retry.max_attempts = 3;
        s.mail.per_domain_concurrency = 4;
    })
    .await;
    app.open_job("job-t").await;
    app.smtp.throttle_domain(
        "slow.example",
        Duration::from_millis(1500),
        421,
        "4.7.0 Too many messages, try again in 1 seconds",
    );
    let people: Vec<Value> = (0..20)
        .map(|i| {
            let domain = if i % 2 == 0 {
                "fast.example"
            } else {
                "slow.example"
            };
            json!({"id": format!("t-{i}"), "email": format!("t.{i}@{domain}")})
        })
        .collect();
    let id = app
        .create_batch_with(json!({"job_id": "job-t", "duration_minutes": 30, "candidates": people}))
        .await;
    let batch = app
        .wait_for_status(&id, "completed", Duration::from_secs(60))
        .await;
    assert_eq!(batch["summary"], "20 sent, 0 failed", "{batch}");

    // Every message to the other domain was accepted before the first to the
    // throttled one: the pause held back only its own domain.
    let domains: Vec<String> = app
        .smtp
        .messages()
        .iter()
        .map(|m| {
            m.rcpt_to[0]
                .rsplit('@')
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(domains.len(), 20);
    let first_slow = domains
        .iter()
        .position(|d| d == "slow.example")
        .expect("slow.example got its messages");
    assert!(
        domains[..first_slow]
            .iter()
            .filter(|d| *d == "fast.example")
            .count()
            == 10,
        "the fast domain finished first: {domains:?}"
    );
    // While it throttled, the domain was asked only by the sends already in flight at
    // each pause (per_domain_concurrency each time), not by every item on every retry.
    let slow_rcpts: usize = (0..20)
        .filter(|i| i % 2 == 1)
        .map(|i| app.smtp.attempts(&format!("t.{i}@slow.example")))
        .sum();
    assert!(
        slow_rcpts <= 10 + 3 * 4,
        "{slow_rcpts} RCPTs to the throttled domain: 10 accepted and at most 3 pauses × 4 in flight"
    );
}
