use std::{path::Path, process::ExitCode};

use clap::Parser;
use invite_worker::{
    app,
    cli::{Cli, Command},
    config::{self, Settings},
    demo,
    http::Role,
    ops, telemetry,
};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One line (what is wrong and, e.g., which argument is missing), exit 1.
            let text = e.render().to_string();
            let what: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!("{} (see --help)", what.join(" "));
            return ExitCode::FAILURE;
        }
    };
    if let Command::Secret = cli.command {
        // Needs no configuration: a broken one must not stop anyone from making a key.
        println!("{}", config::generate_secret());
        return ExitCode::SUCCESS;
    }
    // The demo and the operator commands print their own output; the services log
    // what they do.
    let operator = cli.command.is_operator_command();
    telemetry::init_logging(match cli.command {
        Command::Demo => "warn",
        _ if operator => "warn",
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
            // Operator commands answer 0 or 1, as scripts expect.
            return ExitCode::from(if operator { 1 } else { 2 });
        }
    };
    // The roles that serve for real refuse shipped or weak secrets (the demo does not).
    if let Command::Serve | Command::Api | Command::Work = cli.command
        && let Err(e) = settings.refuse_insecure()
    {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    if operator {
        return match ops::run(&settings, cli.command, cli.json).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
                ExitCode::FAILURE
            }
        };
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
        Command::Status | Command::Batches(_) | Command::Tasks(_) | Command::Operators(_) => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
