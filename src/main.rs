use std::{path::Path, process::ExitCode};

use clap::Parser;
use invite_worker::{
    app,
    cli::{Cli, Command},
    config::Settings,
    demo,
    http::Role,
    telemetry,
};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own progress; the services log what they do.
    telemetry::init_logging(match cli.command {
        Command::Demo => "warn",
        _ => "warn,invite_worker=info",
    });
    let (path, required) = match &cli.config {
        Some(path) => (path.as_path(), true),
        None => (Path::new("worker.toml"), false),
    };
    let settings = match Settings::load(path, required) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Serve => app::run(settings, Role::All).await,
        Command::Api => app::run(settings, Role::Api).await,
        Command::Work => app::run(settings, Role::Worker).await,
        Command::Migrate => app::migrate(&settings).await.map(|()| {
            println!("migrations applied");
        }),
        Command::Demo => demo::run(settings).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
