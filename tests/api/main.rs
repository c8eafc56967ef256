//! Integration tests: one binary, a fresh PostgreSQL database per test, a real SMTP
//! server over TCP, the real binary where a process must die.

mod abuse_limits;
mod access;
mod attempts;
mod console;
mod console_browser;
mod delivery;
mod dkim;
mod erasure;
mod faults;
mod harness;
mod helpers;
mod lifecycle;
mod main_path;
mod metrics;
mod openapi;
mod operations;
mod operator_cli;
mod plans;
mod privacy;
mod process;
mod queue_maintenance;
mod rejections;
mod restart;
mod retention;
mod secure_defaults;
mod smtp_tls;
mod suppression;
mod throttling;
mod untrusted_input;
mod webhooks;
