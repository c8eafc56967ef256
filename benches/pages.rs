//! `cargo bench --bench pages [-- FLAGS]`: the console's pages and the API's read routes
//! timed on a seeded history of 1,000,000 items (see the `invite-bench` crate's `pages`
//! module), against the `invite-worker` binary cargo built.

use std::{path::Path, process::ExitCode};

use clap::Parser;
use invite_bench::pages::{self, PagesArgs};
use invite_worker::config::Settings;

#[tokio::main]
async fn main() -> ExitCode {
    let args = PagesArgs::parse();
    if !args.bench {
        // `cargo test --all-targets` runs bench targets as plain programs.
        println!("pages: a benchmark; run it with `cargo bench --bench pages`");
        return ExitCode::SUCCESS;
    }
    invite_worker::telemetry::init_logging("warn");
    let settings = match Settings::load(Path::new("worker.toml"), false) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let exe = args
        .service_bin
        .clone()
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_invite-worker").into());
    match pages::run(settings, args, exe).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
