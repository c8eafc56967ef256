//! Integration tests: one binary, a fresh PostgreSQL database per test, a real SMTP
//! server over TCP, the real binary where a process must die.

mod delivery;
mod faults;
mod helpers;
mod hostile;
mod main_path;
mod openapi;
mod plans;
mod process;
mod rails;
mod rejections;
mod resilience;
mod restart;
