//! Candidate email addresses: parsed once, with the rules the mailer uses.

use std::{fmt, str::FromStr};

use email_address::{EmailAddress, Options};

/// An address that lettre will accept as a recipient and an ordinary mail server will
/// carry: `local@domain.tld` in ASCII, no display text, no domain literal, no quoted
/// local part, at most 64 characters before the `@` and 254 in all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CandidateEmail(String);

/// Why an address is not one we can send to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidEmail(String);

impl CandidateEmail {
    pub fn parse(raw: &str) -> Result<Self, InvalidEmail> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(InvalidEmail("the address is empty".into()));
        }
        if trimmed.len() > 254 {
            return Err(InvalidEmail(
                "the address is longer than 254 characters".into(),
            ));
        }
        if trimmed.chars().any(|c| c.is_control()) {
            return Err(InvalidEmail(
                "the address contains control characters".into(),
            ));
        }
        if trimmed.starts_with('"') {
            return Err(InvalidEmail(
                "a quoted local part (\"…\"@) is not accepted: many mail servers refuse it".into(),
            ));
        }
        if !trimmed.is_ascii() {
            return Err(InvalidEmail(
                "the address has non-ASCII characters: sending to it needs SMTPUTF8, which \
                 mail servers may not offer (write an international domain as xn--…)"
                    .into(),
            ));
        }
        let options = Options::default()
            .with_required_tld()
            .without_domain_literal()
            .without_display_text();
        let parsed = EmailAddress::parse_with_options(trimmed, options)
            .map_err(|e| InvalidEmail(format!("not a valid email address: {e}")))?;
        if parsed.local_part().len() > 64 {
            return Err(InvalidEmail(
                "the part before @ is longer than 64 characters".into(),
            ));
        }
        // The mailer's own parser is the final word: what it refuses is not an address.
        lettre::Address::from_str(trimmed)
            .map_err(|e| InvalidEmail(format!("not a valid email address: {e}")))?;
        Ok(Self(trimmed.to_owned()))
    }
}

impl fmt::Display for CandidateEmail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An address as logs may show it: the first character of the local part, then `***`,
/// then the domain (`a***@example.com`). Anything without an `@` becomes `***`.
pub(crate) fn mask(address: &str) -> String {
    match address.trim().rsplit_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).filter(|c| !c.is_control()).collect();
            let domain: String = domain.chars().filter(|c| !c.is_control()).collect();
            format!("{first}***@{domain}")
        }
        None => "***".to_owned(),
    }
}

/// `text` with every address in it masked as [`mask`] does: for a mail server's reply,
/// which may quote the recipient (`550 5.1.1 <ada@example.com>: unknown` becomes
/// `550 5.1.1 <a***@example.com>: unknown`). An address is any run of characters
/// holding an `@` between whitespace, angle brackets, quotes, parentheses, brackets,
/// commas, semicolons or colons, so nothing around an `@` survives unmasked.
pub(crate) fn mask_addresses(text: &str) -> String {
    let is_delimiter = |c: char| {
        c.is_whitespace()
            || matches!(
                c,
                '<' | '>' | '"' | '\'' | '(' | ')' | '[' | ']' | ',' | ';' | ':'
            )
    };
    fn flush(word: &mut String, out: &mut String) {
        if word.contains('@') {
            out.push_str(&mask(word));
        } else {
            out.push_str(word);
        }
        word.clear();
    }
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    for c in text.chars() {
        if is_delimiter(c) {
            flush(&mut word, &mut out);
            out.push(c);
        } else {
            word.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_addresses_parse_and_are_trimmed() {
        let e = CandidateEmail::parse("  ada@example.com ").expect("valid");
        assert_eq!(e.to_string(), "ada@example.com");
        assert!(CandidateEmail::parse("first.last+tag@sub.example.co.uk").is_ok());
    }

    #[test]
    fn addresses_the_mailer_would_refuse_do_not_parse() {
        for bad in [
            "",
            "not-an-email",
            "a@b",
            "john..doe@example.com",
            "Ada <ada@example.com>",
            "a@[127.0.0.1]",
            "ada@example.com\r\nBcc: x@example.com",
            "ada@exa mple.com",
            "\"ada lovelace\"@example.com",
            "\"ada\"@example.com",
            "adá@example.com",
            "ada@exämple.com",
            &format!("{}@example.com", "a".repeat(65)),
        ] {
            assert!(CandidateEmail::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn masking_keeps_the_first_letter_and_the_domain() {
        assert_eq!(mask("ada@example.com"), "a***@example.com");
        assert_eq!(mask("nonsense"), "***");
    }

    #[test]
    fn addresses_inside_a_reply_are_masked_and_the_rest_kept() {
        for (reply, masked) in [
            (
                "550 5.1.1 <someone@example.com>: Recipient address rejected",
                "550 5.1.1 <s***@example.com>: Recipient address rejected",
            ),
            (
                "550 5.1.1 someone@example.com unknown; also other@example.org",
                "550 5.1.1 s***@example.com unknown; also o***@example.org",
            ),
            ("451 4.3.0 try later", "451 4.3.0 try later"),
            (
                "550 <@relay:bob@example.com>",
                "550 <***@relay:b***@example.com>",
            ),
        ] {
            assert_eq!(mask_addresses(reply), masked, "{reply}");
        }
    }
}
