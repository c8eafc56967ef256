//! Test and benchmark helpers that run real parts (an SMTP server over TCP).

pub mod smtp;
