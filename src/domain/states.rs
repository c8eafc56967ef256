//! The states of batches, items and invitations, as the API names them. The database
//! enforces the same sets and transitions (see `migrations/`) and stores each as the
//! same text: every enum here is read and written as a `text` column (`sqlx::Type`),
//! so no code compares a state as a string.

/// An enum of fixed strings: serde and `FromStr`/`Display` use the strings, and so does
/// PostgreSQL (a `text` value; an unknown one fails to decode).
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash,
            ::serde::Serialize, ::serde::Deserialize, ::utoipa::ToSchema,
        )]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            pub fn parse(text: &str) -> Option<Self> {
                match text {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;

            fn from_str(text: &str) -> Result<Self, Self::Err> {
                Self::parse(text).ok_or_else(|| {
                    let all: Vec<&str> = Self::ALL.iter().map(|v| v.as_str()).collect();
                    format!("must be one of {} (got {text:?})", all.join(", "))
                })
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::sqlx::Type<::sqlx::Postgres> for $name {
            fn type_info() -> ::sqlx::postgres::PgTypeInfo {
                <&str as ::sqlx::Type<::sqlx::Postgres>>::type_info()
            }

            fn compatible(ty: &::sqlx::postgres::PgTypeInfo) -> bool {
                <&str as ::sqlx::Type<::sqlx::Postgres>>::compatible(ty)
            }
        }

        impl ::sqlx::postgres::PgHasArrayType for $name {
            fn array_type_info() -> ::sqlx::postgres::PgTypeInfo {
                <&str as ::sqlx::postgres::PgHasArrayType>::array_type_info()
            }
        }

        impl ::sqlx::Encode<'_, ::sqlx::Postgres> for $name {
            fn encode_by_ref(
                &self,
                buf: &mut ::sqlx::postgres::PgArgumentBuffer,
            ) -> Result<::sqlx::encode::IsNull, ::sqlx::error::BoxDynError> {
                <&str as ::sqlx::Encode<::sqlx::Postgres>>::encode(self.as_str(), buf)
            }
        }

        impl ::sqlx::Decode<'_, ::sqlx::Postgres> for $name {
            fn decode(
                value: ::sqlx::postgres::PgValueRef<'_>,
            ) -> Result<Self, ::sqlx::error::BoxDynError> {
                let text = <&str as ::sqlx::Decode<::sqlx::Postgres>>::decode(value)?;
                Ok(text.parse::<$name>()?)
            }
        }
    };
}

pub(crate) use string_enum;

string_enum! {
    /// `queued` (nothing started) → `running` → `completed`; `cancelled` after a cancel;
    /// a retry moves a completed batch back to `running`.
    BatchStatus {
        Queued = "queued",
        Running = "running",
        Completed = "completed",
        Cancelled = "cancelled",
    }
}

string_enum! {
    /// `pending` until the item is `sent`, `failed` or `skipped`; a retry moves `failed`
    /// back to `pending`.
    ItemStatus {
        Pending = "pending",
        Sent = "sent",
        Failed = "failed",
        Skipped = "skipped",
    }
}

string_enum! {
    /// Why an item failed or was skipped.
    ItemReason {
        InvalidEmail = "invalid_email",
        Rejected = "rejected",
        RetriesExhausted = "retries_exhausted",
        Suppressed = "suppressed",
        AlreadyInvited = "already_invited",
        JobClosed = "job_closed",
        Cancelled = "cancelled",
    }
}

impl ItemReason {
    /// The status an item with this reason is in.
    pub(crate) fn status(self) -> ItemStatus {
        match self {
            Self::InvalidEmail | Self::Rejected | Self::RetriesExhausted | Self::Suppressed => {
                ItemStatus::Failed
            }
            Self::AlreadyInvited | Self::JobClosed | Self::Cancelled => ItemStatus::Skipped,
        }
    }
}

string_enum! {
    /// What one attempt of an item ended in (its row in the attempt history). A
    /// `transient` attempt is tried again, unless it was the last one allowed (the
    /// item then fails as `retries_exhausted`).
    AttemptOutcome {
        Sent = "sent",
        Transient = "transient",
        Rejected = "rejected",
        InvalidEmail = "invalid_email",
        Skipped = "skipped",
        Suppressed = "suppressed",
    }
}

impl AttemptOutcome {
    /// The outcome of the attempt that ended an item with `reason`.
    pub(crate) fn ending(reason: ItemReason) -> Self {
        match reason {
            ItemReason::InvalidEmail => Self::InvalidEmail,
            ItemReason::Rejected => Self::Rejected,
            ItemReason::RetriesExhausted => Self::Transient,
            ItemReason::Suppressed => Self::Suppressed,
            ItemReason::AlreadyInvited | ItemReason::JobClosed | ItemReason::Cancelled => {
                Self::Skipped
            }
        }
    }
}

string_enum! {
    /// `PENDING` (link not used yet) → `IN_PROGRESS` (redeemed) → `COMPLETED`;
    /// `PENDING` → `REVOKED`; a `PENDING` link past its expiry reads as `EXPIRED`.
    InvitationStatus {
        Pending = "PENDING",
        InProgress = "IN_PROGRESS",
        Completed = "COMPLETED",
        Expired = "EXPIRED",
        Revoked = "REVOKED",
    }
}

string_enum! {
    /// The kinds of [`Warning`](super::warning::Warning) a batch can carry.
    WarningCode {
        AlreadyInvited = "already_invited",
        InvalidEmail = "invalid_email",
    }
}

string_enum! {
    /// What to do with a candidate who already holds a live invitation for the job.
    OnDuplicate {
        Skip = "skip",
        Send = "send",
    }
}

string_enum! {
    /// A job opening's state.
    JobStatus {
        Open = "open",
        Closed = "closed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_belongs_to_a_terminal_status() {
        for reason in ItemReason::ALL {
            assert!(matches!(
                reason.status(),
                ItemStatus::Failed | ItemStatus::Skipped
            ));
            assert_eq!(ItemReason::parse(reason.as_str()), Some(*reason));
        }
    }
}
