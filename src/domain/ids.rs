//! Ids: the web app's own (job ids, candidate ids), and new queue task ids.

use std::fmt;

/// An id chosen by the web app: 1 to 128 characters from `[A-Za-z0-9._:-]`.
/// The database enforces the same rule (`external_id` domain).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ExternalId(String);

impl ExternalId {
    pub(crate) const MAX_LEN: usize = 128;

    /// Parses an id, saying what is wrong with it when it is not one.
    pub(crate) fn parse(raw: &str) -> Result<Self, &'static str> {
        if raw.is_empty() {
            return Err("must not be empty");
        }
        if raw.len() > Self::MAX_LEN {
            return Err("must be at most 128 characters");
        }
        if !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        {
            return Err("may contain only A-Z, a-z, 0-9, '.', '_', ':' and '-'");
        }
        Ok(Self(raw.to_owned()))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for ExternalId {
    type Err = &'static str;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        Self::parse(raw)
    }
}

impl fmt::Display for ExternalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A new queue task id (`apalis.jobs.id`): apalis expects ULIDs.
pub fn new_task_id() -> String {
    ulid::Ulid::generate().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_of_the_allowed_alphabet_parse() {
        for ok in ["job-42", "c.1", "a:b_c", &"x".repeat(128)] {
            assert!(ExternalId::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn empty_long_or_foreign_ids_are_refused() {
        for bad in ["", &"x".repeat(129), "a b", "a/b", "é", "a'--", "<b>"] {
            assert!(ExternalId::parse(bad).is_err(), "{bad}");
        }
    }
}
