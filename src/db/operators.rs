//! The operators who sign in to the web console: created, listed and removed by the
//! operator CLI, each change audit-logged in its own transaction.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{FromRow, PgExecutor, PgPool};

use crate::domain::access::{Actor, AuditAction, OperatorRole};

/// An operator as listed (never the password hash).
#[derive(Debug, Clone, Serialize, FromRow)]
pub(crate) struct Operator {
    pub(crate) name: String,
    pub(crate) role: OperatorRole,
    pub(crate) created_at: DateTime<Utc>,
}

/// Adds an operator with the argon2id hash `password_hash`; false (nothing written)
/// when one of that name exists.
pub(crate) async fn add(
    pool: &PgPool,
    name: &str,
    role: OperatorRole,
    password_hash: &str,
    actor: &Actor,
) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    let added = sqlx::query(
        "INSERT INTO operators (name, role, password_hash) VALUES ($1, $2, $3)
         ON CONFLICT (name) DO NOTHING",
    )
    .bind(name)
    .bind(role)
    .bind(password_hash)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if added {
        let detail = serde_json::json!({ "role": role.as_str() });
        super::audit::record(&mut tx, actor, AuditAction::OperatorAdded, name, detail).await?;
        tx.commit().await?;
    }
    Ok(added)
}

/// Every operator, by name.
pub(crate) async fn list(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<Operator>> {
    sqlx::query_as("SELECT name, role, created_at FROM operators ORDER BY name")
        .fetch_all(db)
        .await
}

/// Removes the operator `name`; false when there is none.
pub(crate) async fn remove(pool: &PgPool, name: &str, actor: &Actor) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    let removed = sqlx::query("DELETE FROM operators WHERE name = $1")
        .bind(name)
        .execute(&mut *tx)
        .await?
        .rows_affected()
        == 1;
    if removed {
        let detail = serde_json::json!({});
        super::audit::record(&mut tx, actor, AuditAction::OperatorRemoved, name, detail).await?;
        tx.commit().await?;
    }
    Ok(removed)
}
