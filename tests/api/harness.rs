//! The test harness keeps the database server clean: every test's database is dropped
//! when the test ends, also when it fails.

use crate::helpers::{TestApp, database_name, prepare_app_with};

async fn database_exists(app_pool_url: &str, name: &str) -> bool {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(app_pool_url)
        .await
        .expect("connects to the server");
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(&mut conn)
        .await
        .expect("pg_database")
}

#[tokio::test]
async fn a_failing_test_still_drops_its_database_and_a_passing_one_too() {
    let server = format!("{}/postgres", crate::helpers::server_url());

    // A test that fails half-way, with its database in use.
    let (name_tx, name_rx) = tokio::sync::oneshot::channel();
    let failing = tokio::spawn(async move {
        let app: TestApp = prepare_app_with(|_| {}).await;
        let _ = name_tx.send(database_name(&app.settings));
        let _held = app.pool.acquire().await.expect("a connection");
        panic!("this test fails on purpose");
    });
    let name = name_rx.await.expect("the failing test named its database");
    assert!(failing.await.is_err_and(|e| e.is_panic()));
    assert!(
        !database_exists(&server, &name).await,
        "{name} is dropped after the test failed"
    );

    // And one that ends normally.
    let app = prepare_app_with(|_| {}).await;
    let name = database_name(&app.settings);
    assert!(
        database_exists(&server, &name).await,
        "{name} exists while the test runs"
    );
    drop(app);
    assert!(
        !database_exists(&server, &name).await,
        "{name} is dropped after the test"
    );
}
