use std::{path::Path, process::ExitCode};

use clap::Parser;
use invite_worker::{
    app,
    cli::{Cli, Command},
    config::{self, Settings},
    demo,
    http::Role,
    telemetry,
};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Secret = cli.command {
        // Needs no configuration: a broken one must not stop anyone from making a key.
        println!("{}", config::generate_secret());
        return ExitCode::SUCCESS;
    }
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
    // The roles that serve for real refuse shipped or weak secrets (the demo does not).
    if let Command::Serve | Command::Api | Command::Work = cli.command
        && let Err(e) = settings.refuse_insecure()
    {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Serve => app::run(settings, Role::All).await,
        Command::Api => app::run(settings, Role::Api).await,
        Command::Work => app::run(settings, Role::Worker).await,
        Command::Migrate => app::migrate(&settings).await.map(|()| {
            println!("migrations applied");
        }),
        Command::Demo => demo::run(settings).await,
        Command::Secret => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
