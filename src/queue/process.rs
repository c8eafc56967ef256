//! This process as people read it: in the attempt history and in the queue workers'
//! names.

use crate::config::Settings;

/// This process as people read it (the attempt history, the worker names):
/// `worker.name` when set, else `host:pid`.
pub(crate) fn process_name(settings: &Settings) -> String {
    if settings.worker.name.is_empty() {
        format!("{}:{}", hostname(), std::process::id())
    } else {
        settings.worker.name.clone()
    }
}

/// The machine's name (`/proc/sys/kernel/hostname`), or `localhost`.
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
