//! Integration tests: one binary, a fresh PostgreSQL database per test, a real SMTP
//! server over TCP, the real binary where a process must die.

mod helpers;
mod hostile;
mod main_path;
mod openapi;
mod rails;
mod resilience;
