//! DKIM signing with lettre's signer (`[dkim]`): RSA or Ed25519 keys from PEM files.
//!
//! lettre reads an RSA key as PKCS#1 PEM and an Ed25519 key as its base64 seed; the
//! contract's key files are PEM, PKCS#1 or PKCS#8 for RSA and PKCS#8 for Ed25519, so a
//! PKCS#8 file is converted here first.

use anyhow::{Context, bail};
use base64::{Engine, engine::general_purpose::STANDARD};
use lettre::message::dkim::{
    DkimCanonicalization, DkimCanonicalizationType, DkimConfig, DkimSigningAlgorithm,
    DkimSigningKey,
};
use lettre::message::header::HeaderName;

use crate::config::DkimSettings;

/// The signer of `[dkim]`, or `None` when it is not configured.
pub(crate) fn config(settings: &DkimSettings) -> anyhow::Result<Option<DkimConfig>> {
    let Some(path) = settings
        .private_key_path
        .as_ref()
        .filter(|_| settings.enabled())
    else {
        return Ok(None);
    };
    let pem = std::fs::read_to_string(path)
        .with_context(|| format!("dkim.private_key_path: cannot read {}", path.display()))?;
    let key = signing_key(&pem).context("dkim.private_key_path")?;
    // The headers a receiver shows and a forger would change; relaxed canonicalization
    // survives the header folding and whitespace changes of relays.
    let headers = [
        "From",
        "To",
        "Subject",
        "Date",
        "Message-ID",
        "MIME-Version",
        "Content-Type",
    ]
    .into_iter()
    .map(HeaderName::new_from_ascii_str)
    .collect();
    Ok(Some(DkimConfig::new(
        settings.selector.clone(),
        settings.domain.clone(),
        key,
        headers,
        DkimCanonicalization {
            header: DkimCanonicalizationType::Relaxed,
            body: DkimCanonicalizationType::Relaxed,
        },
    )))
}

/// A signing key from a PEM file: RSA as PKCS#1 (`RSA PRIVATE KEY`) or PKCS#8
/// (`PRIVATE KEY`), Ed25519 as PKCS#8.
fn signing_key(pem: &str) -> anyhow::Result<DkimSigningKey> {
    if pem.contains("-----BEGIN RSA PRIVATE KEY-----") {
        return DkimSigningKey::new(pem, DkimSigningAlgorithm::Rsa)
            .map_err(|e| anyhow::anyhow!("not a PKCS#1 RSA key: {e}"));
    }
    if pem.contains("-----BEGIN PRIVATE KEY-----") {
        use ed25519_dalek::pkcs8::DecodePrivateKey as _;
        use rsa::pkcs1::{EncodeRsaPrivateKey as _, LineEnding};
        if let Ok(key) = rsa::RsaPrivateKey::from_pkcs8_pem(pem) {
            let pkcs1 = key.to_pkcs1_pem(LineEnding::LF)?;
            return DkimSigningKey::new(&pkcs1, DkimSigningAlgorithm::Rsa)
                .map_err(|e| anyhow::anyhow!("an RSA key lettre refuses: {e}"));
        }
        if let Ok(key) = ed25519_dalek::SigningKey::from_pkcs8_pem(pem) {
            let seed = STANDARD.encode(key.to_bytes());
            return DkimSigningKey::new(&seed, DkimSigningAlgorithm::Ed25519)
                .map_err(|e| anyhow::anyhow!("an Ed25519 key lettre refuses: {e}"));
        }
        bail!("a PKCS#8 key that is neither RSA nor Ed25519");
    }
    bail!("not a PEM private key (RSA PKCS#1 or PKCS#8, Ed25519 PKCS#8)")
}
