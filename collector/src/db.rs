//! PostgreSQL: a small pool of connections, the embedded migrations, day partitions of the audit
//! records and their retention.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tokio_postgres::{Client, NoTls};

/// Schema migrations, applied in order, each once, under an advisory lock (several collectors
/// may start at once on one database).
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE nodes (
    node          text PRIMARY KEY,
    token_sha256  text NOT NULL UNIQUE,
    enrolled_ms   bigint NOT NULL,
    node_key      text,
    last_seen_ms  bigint,
    heartbeat     jsonb,
    heartbeat_ms  bigint,
    telemetry     jsonb,
    telemetry_ms  bigint
);
CREATE TABLE readers (
    name          text PRIMARY KEY,
    token_sha256  text NOT NULL UNIQUE,
    created_ms    bigint NOT NULL
);
CREATE TABLE chains (
    node            text PRIMARY KEY REFERENCES nodes ON DELETE CASCADE,
    first_seq       bigint,
    head_seq        bigint NOT NULL DEFAULT 0,
    head_hash       text NOT NULL,
    head_time_ms    bigint,
    records         bigint NOT NULL DEFAULT 0,
    checkpoint_seq  bigint,
    checkpoint_ms   bigint,
    alarms          bigint NOT NULL DEFAULT 0,
    last_alarm      text
);
CREATE TABLE chain_alarms (
    id      bigserial PRIMARY KEY,
    node    text NOT NULL,
    at_ms   bigint NOT NULL,
    kind    text NOT NULL,
    seq     bigint,
    detail  text NOT NULL
);
CREATE INDEX chain_alarms_node ON chain_alarms (node, id);
-- Records that contradict the witnessed chain (a second record for a seq): kept as evidence.
CREATE TABLE chain_conflicts (
    id       bigserial PRIMARY KEY,
    node     text NOT NULL,
    seq      bigint,
    at_ms    bigint NOT NULL,
    line     text NOT NULL
);
CREATE TABLE audit_records (
    node         text NOT NULL,
    seq          bigint NOT NULL,
    day          date NOT NULL,
    time_ms      bigint NOT NULL,
    prev         text NOT NULL,
    hash         text NOT NULL,
    body         text NOT NULL,
    received_ms  bigint NOT NULL,
    PRIMARY KEY (node, seq, day)
) PARTITION BY RANGE (day);
"#];

const MIGRATION_LOCK: i64 = 0x6f75_7470_6f73_7401;
const RETENTION_LOCK: i64 = 0x6f75_7470_6f73_7402;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Pg(#[from] tokio_postgres::Error),
    #[error("database schema version {0} is newer than this collector knows ({1}): upgrade the collector")]
    Newer(i32, i32),
}

/// A fixed set of connections, each used by one task at a time; a broken one is reopened on
/// its next use.
pub struct Pool {
    dsn: String,
    slots: Vec<tokio::sync::Mutex<Option<Client>>>,
    next: AtomicUsize,
    /// Day partitions known to exist (days since 1970-01-01).
    partitions: Mutex<HashSet<i64>>,
}

pub struct Conn<'a>(tokio::sync::MutexGuard<'a, Option<Client>>);

impl std::ops::Deref for Conn<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        // A `Conn` is only handed out holding a client.
        self.0.as_ref().unwrap_or_else(|| unreachable!("a pooled connection holds a client"))
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.0.as_mut().unwrap_or_else(|| unreachable!("a pooled connection holds a client"))
    }
}

async fn connect(dsn: &str) -> Result<Client, DbError> {
    let (client, connection) = tokio_postgres::connect(dsn, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "database connection closed");
        }
    });
    Ok(client)
}

impl Pool {
    /// Opens the first connection (so a wrong address fails at start) and applies migrations.
    pub async fn open(dsn: &str, size: usize) -> Result<Pool, DbError> {
        let pool = Pool {
            dsn: dsn.to_owned(),
            slots: (0..size.max(1)).map(|_| tokio::sync::Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            partitions: Mutex::new(HashSet::new()),
        };
        let mut c = pool.get().await?;
        migrate(&mut c).await?;
        drop(c);
        Ok(pool)
    }

    /// A connection: a free one when there is one, else the next in turn when it frees.
    pub async fn get(&self) -> Result<Conn<'_>, DbError> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.slots.len();
        let mut guard = None;
        for i in 0..n {
            if let Ok(g) = self.slots[(start + i) % n].try_lock() {
                guard = Some(g);
                break;
            }
        }
        let mut guard = match guard {
            Some(g) => g,
            None => self.slots[start % n].lock().await,
        };
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = Some(connect(&self.dsn).await?);
        }
        Ok(Conn(guard))
    }

    /// Creates the day partitions of the audit records that `days` need.
    pub async fn ensure_partitions(&self, days: &[i64]) -> Result<(), DbError> {
        let missing: Vec<i64> = {
            let known = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
            let mut m: Vec<i64> = days.iter().copied().filter(|d| !known.contains(d)).collect();
            m.sort_unstable();
            m.dedup();
            m
        };
        if missing.is_empty() {
            return Ok(());
        }
        let c = self.get().await?;
        for day in missing {
            // Integers only: nothing from a request reaches the statement text.
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS audit_records_d{day} PARTITION OF audit_records \
                 FOR VALUES FROM (DATE '1970-01-01' + {day}) TO (DATE '1970-01-01' + {next})",
                next = day + 1
            );
            match c.batch_execute(&sql).await {
                Ok(()) => {}
                // Another collector created it between our check and our statement.
                Err(e) if is_duplicate(&e) => {}
                Err(e) => return Err(e.into()),
            }
            self.partitions.lock().unwrap_or_else(|p| p.into_inner()).insert(day);
        }
        Ok(())
    }

    /// Drops the day partitions older than `keep_days` before `today`; returns how many.
    pub async fn drop_old_partitions(&self, today: i64, keep_days: u32) -> Result<usize, DbError> {
        let c = self.get().await?;
        let locked: bool = c.query_one("SELECT pg_try_advisory_lock($1)", &[&RETENTION_LOCK]).await?.get(0);
        if !locked {
            return Ok(0);
        }
        let result = async {
            let rows = c
                .query(
                    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                     JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'audit_records'",
                    &[],
                )
                .await?;
            let mut dropped = 0;
            for row in rows {
                let name: String = row.get(0);
                let Some(day) = name.strip_prefix("audit_records_d").and_then(|d| d.parse::<i64>().ok()) else {
                    continue;
                };
                if day < today - i64::from(keep_days) {
                    c.batch_execute(&format!("DROP TABLE IF EXISTS audit_records_d{day}")).await?;
                    self.partitions.lock().unwrap_or_else(|p| p.into_inner()).remove(&day);
                    dropped += 1;
                }
            }
            Ok::<_, DbError>(dropped)
        }
        .await;
        let _ = c.execute("SELECT pg_advisory_unlock($1)", &[&RETENTION_LOCK]).await;
        result
    }
}

fn is_duplicate(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.code().is_some_and(|c| *c == SqlState::DUPLICATE_TABLE || *c == SqlState::UNIQUE_VIOLATION)
}

async fn migrate(c: &mut Client) -> Result<(), DbError> {
    let tx = c.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    tx.batch_execute("SET LOCAL client_min_messages = warning").await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version int NOT NULL)").await?;
    let have: i32 = tx.query_opt("SELECT version FROM schema_version", &[]).await?.map(|r| r.get(0)).unwrap_or(0);
    let known = MIGRATIONS.len() as i32;
    if have > known {
        return Err(DbError::Newer(have, known));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(have as usize) {
        tracing::info!(version = i + 1, "applying database migration");
        tx.batch_execute(sql).await?;
    }
    tx.execute("DELETE FROM schema_version", &[]).await?;
    tx.execute("INSERT INTO schema_version VALUES ($1)", &[&known]).await?;
    tx.commit().await?;
    Ok(())
}
