//! Pure types and rules: ids, email addresses, link tokens and the states of batches,
//! items and invitations. Nothing here does I/O.

pub mod email;
pub mod ids;
pub mod states;
pub mod token;
