//! Running the service: the HTTP server and/or the queue workers in one process, with
//! a graceful shutdown of both on SIGINT/SIGTERM.

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{MailTransport, Settings},
    db,
    http::{self, AppState, Role},
    mail::Mailer,
    queue::{self, deliver::Deliverer},
    telemetry,
};

/// A started service: where it listens and how to stop it.
pub struct RunningApp {
    pub addr: SocketAddr,
    pub pool: sqlx::PgPool,
    pub(crate) shutdown: CancellationToken,
    /// The router the listener serves, to call in-process (the demo does).
    pub(crate) router: axum::Router,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl RunningApp {
    /// Asks both parts to stop and waits for them (the workers within their timeout).
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.handle.await.context("service task panicked")?
    }

    /// Waits until the service stops by itself or `shutdown` is cancelled.
    pub(crate) async fn wait(self) -> anyhow::Result<()> {
        self.handle.await.context("service task panicked")?
    }
}

/// Starts the parts of `role` on `listener`. The database must be migrated.
pub async fn start(
    settings: Settings,
    role: Role,
    listener: TcpListener,
) -> anyhow::Result<RunningApp> {
    telemetry::init_metrics();
    if settings.mail.transport == MailTransport::Smtp && settings.sends_password_in_clear() {
        // `serve`, `api` and `work` get here only with smtp.allow_plaintext_auth = true.
        tracing::warn!(
            "smtp.tls = \"none\" with smtp.username set: the SMTP password crosses the \
             network in clear (smtp.allow_plaintext_auth)"
        );
    }
    let settings = Arc::new(settings);
    let pool = db::connect(&settings.database)
        .await
        .context("database.url: cannot connect")?;
    if !db::migrations_applied(&pool).await {
        anyhow::bail!("the database is not migrated: run `invite-worker migrate` first");
    }
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();

    let workers = if role == Role::Api {
        None
    } else {
        let deliverer = Arc::new(Deliverer::start(
            pool.clone(),
            Arc::new(Mailer::new(&settings)?),
            settings.clone(),
        ));
        let (pool, settings, stop) = (pool.clone(), settings.clone(), shutdown.clone());
        Some(tokio::spawn(async move {
            let maintenance = queue::maintenance::run(pool.clone(), &settings, stop.clone());
            let webhooks = queue::webhooks::run(pool, settings.clone(), stop.clone());
            let (workers, (), ()) = tokio::join!(
                queue::worker::run(deliverer, &settings, stop),
                maintenance,
                webhooks
            );
            workers
        }))
    };

    // Every role serves /metrics, so every role publishes the queue gauges.
    tokio::spawn({
        let (pool, settings, stop) = (pool.clone(), settings.clone(), shutdown.clone());
        async move { queue::gauges::run(pool, &settings, stop).await }
    });

    let state = AppState::new(pool.clone(), settings.clone(), role);
    let router = http::router(state);
    let served = router.clone();
    let stop = shutdown.clone();
    let limits = settings.http.clone();
    let handle = tokio::spawn(async move {
        let http_result = http::serve(listener, served, &limits, stop.clone()).await;
        // Whichever part stops first takes the other down with it.
        stop.cancel();
        tracing::info!("HTTP server stopped");
        if let Some(workers) = workers {
            match workers.await {
                Ok(Ok(())) => tracing::info!("queue workers stopped"),
                Ok(Err(e)) => tracing::error!(error = %e, "queue workers stopped with an error"),
                Err(e) => tracing::error!(error = %e, "queue workers panicked"),
            }
        }
        http_result.context("HTTP server failed")
    });
    tracing::info!(%addr, ?role, "invite-worker listening");
    Ok(RunningApp {
        addr,
        pool,
        shutdown,
        router,
        handle,
    })
}

/// Cancels `token` on SIGINT or SIGTERM.
pub(crate) fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        token.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => tracing::info!("SIGINT: shutting down"),
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
        token.cancel();
    });
}

/// `serve`, `api`, `work`: runs until a signal.
pub async fn run(settings: Settings, role: Role) -> anyhow::Result<()> {
    let listener = TcpListener::bind(settings.http.bind)
        .await
        .with_context(|| format!("http.bind: cannot listen on {}", settings.http.bind))?;
    let app = start(settings, role, listener).await?;
    cancel_on_signal(app.shutdown.clone());
    app.wait().await
}

/// `migrate`: creates the database if missing, applies every migration.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let url = settings.database.url.expose();
    db::create_database_if_missing(url)
        .await
        .context("database.url: cannot create the database")?;
    let pool = db::connect(&settings.database)
        .await
        .context("database.url: cannot connect")?;
    db::migrate(&pool).await.context("migrations failed")?;
    pool.close().await;
    Ok(())
}
