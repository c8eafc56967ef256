//! What a person should read about one candidate of a batch.

use serde::{Deserialize, Serialize};

use super::states::WarningCode;

/// A warning on a batch: `already_invited` (the candidate holds a live invitation for
/// the job) or `invalid_email` (the address cannot be sent to).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub(crate) struct Warning {
    pub(crate) candidate_id: String,
    pub(crate) code: WarningCode,
    pub(crate) message: String,
}
