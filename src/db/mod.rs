//! Every SQL statement of the service. Queries are checked at run time (no build-time
//! database), and each function says which rows it locks and why.

pub(crate) mod attempts;
pub mod audit;
pub mod batches;
pub(crate) mod candidates;
pub(crate) mod console;
pub mod delivery;
pub mod gauges;
pub mod invitations;
pub mod jobs;
pub(crate) mod operators;
pub mod retention;
pub(crate) mod suppressions;
pub mod tasks;
pub mod webhooks;

use std::{str::FromStr, time::Duration};

use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::config::DatabaseSettings;

/// The app's own migrations (`migrations/`).
pub(crate) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Creates the database named in `url` if it does not exist yet (sqlx's own
/// `CREATE DATABASE`, which quotes the name).
pub(crate) async fn create_database_if_missing(url: &str) -> anyhow::Result<()> {
    use sqlx::migrate::MigrateDatabase;
    if sqlx::Postgres::database_exists(url).await? {
        return Ok(());
    }
    match sqlx::Postgres::create_database(url).await {
        Ok(()) => tracing::info!("created the database"),
        // Two processes racing to create it: the other one won, which is fine.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// Applies apalis-postgres' migrations (schema `apalis`) and then the app's.
pub(crate) async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    apalis_postgres::PostgresStorage::setup(pool).await?;
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// True when every migration this binary knows of has been applied.
pub(crate) async fn migrations_applied(pool: &PgPool) -> bool {
    let applied: Result<Vec<i64>, _> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await;
    match applied {
        Ok(applied) => MIGRATOR.iter().all(|m| applied.contains(&m.version)),
        Err(_) => false,
    }
}

pub async fn connect(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    // Plan every statement for its actual parameters. A generic plan cached while a
    // table was small (a fresh database, right after a deploy) keeps scanning the whole
    // table for `WHERE id = ANY($1)` and `FROM unnest(...)` long after it has grown;
    // docs/performance.md has what that cost.
    let options = PgConnectOptions::from_str(settings.url.expose())?
        .application_name("invite-worker")
        .options([("plan_cache_mode", "force_custom_plan")]);
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// A pool connection for one of the worker's group writers (`queue::group`), held by
/// it for good, set up so its statements are planned once and as key lookups.
///
/// The writers' statements (`db::delivery`) find every row by primary key or by an
/// index on the keys they are given. Planned per execution (the pool's
/// `force_custom_plan`), planning cost more than executing; planned once with the
/// planner's usual freedom, a plan made while a table was nearly empty (a fresh
/// database) kept scanning it whole as it grew. So these connections plan once, and
/// the planner may not choose a sequential or bitmap scan, a hash or a merge join:
/// what remains is the index lookups the statements are written for. A scan that has no
/// index to use (a tiny table such as `webhook_endpoints`) then carries the planner's
/// penalty cost, which would pass JIT's thresholds and compile, at tens of milliseconds,
/// a statement that runs in microseconds: JIT is off too. The connection
/// is closed, not returned to the pool, when the writer lets go of it, so these
/// settings never reach another user of the pool.
pub async fn writer_connection(
    pool: &PgPool,
) -> sqlx::Result<sqlx::pool::PoolConnection<sqlx::Postgres>> {
    let mut conn = pool.acquire().await?;
    conn.close_on_drop();
    sqlx::raw_sql(
        "SET plan_cache_mode = force_generic_plan;
         SET enable_seqscan = off;
         SET enable_bitmapscan = off;
         SET enable_hashjoin = off;
         SET enable_mergejoin = off;
         SET jit = off;",
    )
    .execute(&mut *conn)
    .await?;
    Ok(conn)
}
