//! Plain SQL that runs on both SQLite and PostgreSQL.

use saga_participant::sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement, Value};

/// A statement with `?` placeholders, numbered `$1, $2, ...` for PostgreSQL. (None of the
/// statements here has a `?` inside a string literal.)
pub(crate) fn stmt(
    backend: DbBackend,
    sql: &str,
    values: impl IntoIterator<Item = Value>,
) -> Statement {
    let sql = if backend == DbBackend::Postgres {
        let mut numbered = String::with_capacity(sql.len() + 8);
        let mut n = 0;
        for c in sql.chars() {
            if c == '?' {
                n += 1;
                numbered.push('$');
                numbered.push_str(&n.to_string());
            } else {
                numbered.push(c);
            }
        }
        numbered
    } else {
        sql.to_owned()
    };
    Statement::from_sql_and_values(backend, sql, values)
}

/// Runs each statement in turn (`CREATE TABLE IF NOT EXISTS ...`).
pub(crate) async fn run_all(db: &impl ConnectionTrait, statements: &[&str]) -> Result<(), DbErr> {
    for statement in statements {
        db.execute_unprepared(statement).await?;
    }
    Ok(())
}

/// Now, as RFC 3339 text (stored as TEXT so both databases read it back the same way).
pub(crate) fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
