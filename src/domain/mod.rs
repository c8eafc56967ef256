//! Pure types and rules: ids, email addresses, link tokens, warnings, access scopes,
//! audit actions, the states of batches, items and invitations, and webhook events. Nothing here does
//! I/O, and nothing here uses another module of this crate.

pub mod access;
pub mod email;
pub mod ids;
pub mod states;
pub mod token;
pub mod warning;
pub mod webhook;
