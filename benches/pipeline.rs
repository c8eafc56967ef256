//! `cargo bench --bench pipeline [-- FLAGS]`: the benchmark of the whole pipeline (see
//! the `invite-bench` crate), run against the `invite-worker` binary cargo built.

use std::{path::Path, process::ExitCode};

use clap::Parser;
use invite_bench::BenchArgs;
use invite_worker::config::Settings;

#[tokio::main]
async fn main() -> ExitCode {
    let args = BenchArgs::parse();
    if !args.bench {
        // `cargo test --all-targets` runs bench targets as plain programs.
        println!("pipeline: a benchmark; run it with `cargo bench --bench pipeline`");
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
    match invite_bench::run(settings, args, exe).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
