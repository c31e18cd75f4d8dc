//! The store over TLS: `sslmode=require` and `sslmode=verify-full` (with `sslrootcert` for a
//! private CA) in the database URL, against the fault suite's PostgreSQL cluster, whose
//! certificate `scripts/fault-services` signs with a CA of its own (`FAULT_TLS_DIR`).

use orchestrator::store::Store;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};
use uuid::Uuid;

const RUN_FAULT_SERVICES: &str = "run `scripts/fault-services` as root first: it starts a \
     PostgreSQL cluster with TLS on 127.0.0.1:5433 and makes its CA under \
     /var/tmp/saga-faults/tls (or set FAULT_DATABASE_URL and FAULT_TLS_DIR)";

/// In every URL below; trust authentication ignores it, and no error may show it.
const PASSWORD: &str = "tls-test-secret";

fn var(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// `host:port` of the fault suite's cluster.
fn host_port() -> String {
    let url = var(
        "FAULT_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5433/postgres",
    );
    let authority = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
    let authority = authority.split(['/', '?']).next().unwrap_or_default();
    authority.rsplit('@').next().unwrap_or_default().to_owned()
}

fn tls_file(name: &str) -> String {
    let path = std::path::Path::new(&var("FAULT_TLS_DIR", "/var/tmp/saga-faults/tls")).join(name);
    assert!(
        path.exists(),
        "{} is missing: {RUN_FAULT_SERVICES}",
        path.display()
    );
    path.display().to_string()
}

/// A database of the test's own on the fault suite's cluster, dropped at the end.
struct TestDb {
    name: String,
}

impl TestDb {
    async fn new() -> TestDb {
        let name = format!("tls_{}", Uuid::new_v4().simple());
        let admin = admin().await;
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        admin.close().await.ok();
        TestDb { name }
    }

    fn url(&self, params: &str) -> String {
        format!(
            "postgres://postgres:{PASSWORD}@{}/{}?{params}",
            host_port(),
            self.name
        )
    }

    async fn drop(self) {
        let admin = admin().await;
        admin
            .execute_unprepared(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .unwrap();
        admin.close().await.ok();
    }
}

async fn admin() -> DatabaseConnection {
    let url = format!("postgres://postgres@{}/postgres", host_port());
    Database::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}: {RUN_FAULT_SERVICES}"))
}

/// Whether this session of `db` is encrypted, as the server sees it.
async fn encrypted(db: &DatabaseConnection) -> bool {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get::<bool>("", "ssl").unwrap()
}

#[tokio::test]
async fn the_store_connects_with_sslmode_require_and_verify_full() {
    let db = TestDb::new().await;
    let ca = tls_file("ca.pem");
    for params in [
        "sslmode=require".to_owned(),
        format!("sslmode=verify-full&sslrootcert={ca}"),
    ] {
        let store = Store::connect(&db.url(&params))
            .await
            .unwrap_or_else(|e| panic!("{params}: {e}"));
        assert!(encrypted(store.connection()).await, "{params}");
        store.ping().await.unwrap();
        store.connection().clone().close().await.unwrap();
    }
    db.drop().await;
}

#[tokio::test]
async fn the_store_refuses_a_server_certificate_of_another_ca() {
    let db = TestDb::new().await;
    let params = format!(
        "sslmode=verify-full&sslrootcert={}",
        tls_file("other-ca.pem")
    );
    let err = Store::connect(&db.url(&params))
        .await
        .map(|_| ())
        .expect_err("verify-full with another CA connected");
    let text = format!("{err} {err:?}");
    assert!(
        text.contains("UnknownIssuer") || text.contains("invalid peer certificate"),
        "{text}"
    );
    assert!(!text.contains(PASSWORD), "{text}");
    db.drop().await;
}

#[tokio::test]
async fn a_server_on_this_machine_is_reached_in_plain_text_unless_the_url_asks_for_tls() {
    // The cluster offers TLS; sqlx's default (`prefer`) would take it, for nothing on loopback.
    let db = TestDb::new().await;
    for (params, tls) in [("", false), ("sslmode=prefer", true)] {
        let store = Store::connect(&db.url(params))
            .await
            .unwrap_or_else(|e| panic!("{params}: {e}"));
        assert_eq!(encrypted(store.connection()).await, tls, "`{params}`");
        store.connection().clone().close().await.unwrap();
    }
    db.drop().await;
}
