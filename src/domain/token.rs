//! Single-use link tokens.
//!
//! A token is HMAC-SHA256(secret, invitation id), base64url without padding. Deriving
//! it (rather than storing it) lets every retry of an item rebuild the very same link,
//! while the database keeps only SHA-256(token): a copy of the database opens no link.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The token in an invitation link. Deliberately not `Debug`/`Display`: it must never
/// reach a log line by accident.
pub(crate) struct LinkToken(String);

impl LinkToken {
    /// The token for an invitation, derived with the server's secret.
    pub(crate) fn derive(secret: &[u8], invitation_id: Uuid) -> Self {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(b"invite-worker/link/v1/");
        mac.update(invitation_id.as_bytes());
        Self(URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    pub(crate) fn hash(&self) -> [u8; 32] {
        hash_token(&self.0)
    }
}

/// SHA-256 of a token as presented (what the database stores and looks up).
pub(crate) fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_invitation_always_gets_the_same_token() {
        let id = Uuid::now_v7();
        let a = LinkToken::derive(b"secret-one", id);
        let b = LinkToken::derive(b"secret-one", id);
        assert_eq!(a.expose(), b.expose());
        assert_eq!(a.expose().len(), 43, "32 bytes in unpadded base64url");
    }

    #[test]
    fn tokens_differ_by_invitation_and_by_secret() {
        let id = Uuid::now_v7();
        let a = LinkToken::derive(b"secret-one", id);
        assert_ne!(
            a.expose(),
            LinkToken::derive(b"secret-one", Uuid::now_v7()).expose()
        );
        assert_ne!(a.expose(), LinkToken::derive(b"secret-two", id).expose());
        assert_eq!(a.hash(), hash_token(a.expose()));
    }
}
