//! Webhooks (operations.md §4): the event types, the states of a delivery, endpoint
//! secrets, and the rules for where events may be sent (the SSRF guard's rules; the
//! guard itself, which applies them to every resolved address at send time, is in
//! `queue::webhook_client`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use base64::Engine;

use super::states::string_enum;

string_enum! {
    /// What happened: the `type` of an event and what an endpoint subscribes to.
    EventType {
        /// The last pending item of a batch settled (again, after a retry).
        BatchCompleted = "batch.completed",
        BatchCancelled = "batch.cancelled",
        /// An item failed for good (`invalid_email`, `rejected`, `retries_exhausted`, …).
        ItemFailed = "item.failed",
        /// A candidate opened their link (PENDING → IN_PROGRESS).
        InvitationRedeemed = "invitation.redeemed",
        /// IN_PROGRESS → COMPLETED.
        InvitationCompleted = "invitation.completed",
        /// A link passed its `expires_at` unused (found by the periodic sweep).
        InvitationExpired = "invitation.expired",
    }
}

string_enum! {
    /// Where one event's delivery to one endpoint stands.
    DeliveryStatus {
        /// Waiting for its next attempt (`next_attempt_at`).
        Pending = "pending",
        /// An attempt is on its way.
        Sending = "sending",
        /// An attempt got a 2xx.
        Succeeded = "succeeded",
        /// The retry schedule ran out, the endpoint answered 410 Gone, or it was disabled.
        Failed = "failed",
    }
}

/// A new endpoint secret: `whsec_` and the base64 of 24 random bytes, as the Standard
/// Webhooks libraries expect it.
pub fn new_secret() -> String {
    let bytes: [u8; 24] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// An endpoint URL as given: `https://` (or `http://` where private targets are
/// allowed), with a host, no user or password, at most 2048 characters. Why not, when
/// it is refused.
pub fn check_endpoint_url(raw: &str, allow_private: bool) -> Result<url::Url, String> {
    if raw.len() > 2048 {
        return Err("url: at most 2048 characters".into());
    }
    let url = url::Url::parse(raw).map_err(|e| format!("url: not a valid URL ({e})"))?;
    // As stored: parsing percent-encodes and punycodes, so the URL can grow.
    if url.as_str().len() > 2048 {
        return Err("url: at most 2048 characters once encoded".into());
    }
    match url.scheme() {
        "https" => {}
        "http" if allow_private => {}
        _ => {
            return Err(
                "url: must be https:// (http:// only with webhooks.allow_private_targets)".into(),
            );
        }
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("url: must not carry a user name or password".into());
    }
    let Some(host) = url.host() else {
        return Err("url: must name a host".into());
    };
    if !allow_private {
        let literal = match host {
            url::Host::Ipv4(ip) => Some(IpAddr::V4(ip)),
            url::Host::Ipv6(ip) => Some(IpAddr::V6(ip)),
            url::Host::Domain(_) => None,
        };
        if literal.is_some_and(|ip| !is_public(ip)) {
            return Err("url: must be a public address".into());
        }
    }
    Ok(url)
}

/// Whether `ip` is a public unicast address: not loopback, private, link-local,
/// shared (CGNAT), unspecified, broadcast, multicast, documentation, benchmarking or
/// reserved; an IPv4-mapped or -compatible IPv6 address is judged as its IPv4 address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0                                   // "this network"
        || (a == 100 && (64..128).contains(&b))     // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0)           // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b))      // benchmarking
        || a >= 240) // reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00                // unique local
        || (s[0] & 0xffc0) == 0xfe80                // link-local
        || (s[0] & 0xffc0) == 0xfec0                // site-local (deprecated, still private)
        || s[0..4] == [0x0100, 0, 0, 0]             // discard-only
        || (s[0] == 0x2001 && s[1] == 0)            // Teredo: an IPv4 address inside
        || (s[0] == 0x2001 && s[1] == 0x0db8)       // documentation
        || (s[0] == 0x0064 && s[1] == 0xff9b)       // NAT64: an IPv4 address inside
        || s[0] == 0x2002                           // 6to4: an IPv4 address inside
        || (s[0..6] == [0, 0, 0, 0, 0, 0])) // IPv4-compatible (deprecated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_unicast_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2002:a00:1::",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "fec0::1",
            "100::1",
        ] {
            let ip: IpAddr = private.parse().expect("address");
            assert!(!is_public(ip), "{private} is not public");
        }
        for public in ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"] {
            let ip: IpAddr = public.parse().expect("address");
            assert!(is_public(ip), "{public} is public");
        }
    }

    #[test]
    fn endpoint_urls_must_be_https_to_a_host_without_credentials() {
        assert!(check_endpoint_url("https://hooks.example.com/in", false).is_ok());
        for bad in [
            "http://hooks.example.com/in",
            "ftp://hooks.example.com/in",
            "https://user:pw@hooks.example.com/in",
            "https://127.0.0.1/in",
            "https://[::1]/in",
            "https://10.0.0.5/in",
            "not a url",
        ] {
            assert!(check_endpoint_url(bad, false).is_err(), "{bad}");
        }
        assert!(check_endpoint_url("http://127.0.0.1:9000/in", true).is_ok());
        // 1,800 characters as typed, over 2,048 once percent-encoded as stored.
        let spaced = format!("https://hooks.example.com/{}", " x".repeat(900));
        assert!(spaced.len() <= 2048);
        let refused = check_endpoint_url(&spaced, false).expect_err("too long once encoded");
        assert!(refused.contains("2048"), "{refused}");
    }

    #[test]
    fn a_secret_is_whsec_and_24_bytes_of_base64() {
        let secret = new_secret();
        let encoded = secret.strip_prefix("whsec_").expect("prefix");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .expect("base64");
        assert_eq!(bytes.len(), 24);
        assert_ne!(new_secret(), secret);
    }
}
