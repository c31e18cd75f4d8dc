//! What the HTTP test files share: the real router and server over a runtime with no broker,
//! on a free port, over SQLite in memory or a PostgreSQL database of the test's own (created
//! through `DATABASE_URL`, dropped when the test ends).

// Each test file is a crate of its own and uses part of this module.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use orchestrator::api::ApiState;
use orchestrator::auth::AuthConfig;
use orchestrator::metrics::Metrics;
use orchestrator::runtime::Runtime;
use orchestrator::service::Health;
use orchestrator::store::Store;
use orchestrator::ui::{DEFAULT_MANAGEMENT_URL, UiConfig};
use saga_engine::Definitions;
use sea_orm::ConnectionTrait;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const SAGAS: &str = "
sagas:
  - name: order
    input_schema:
      type: object
      required: [customer]
      properties:
        customer: {type: string}
    steps:
      - name: reserve
        participant: stock
        action: reserve
        compensation: release
        timeout: 30s
      - name: ship
        participant: shipping
        action: ship
        kind: retriable
        timeout: 30s
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database of the test's own; a PostgreSQL one is dropped with this (even on a panic).
pub struct TestDb {
    pub url: String,
    postgres: Option<(String, String)>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        match backend {
            Backend::Sqlite => TestDb {
                url: "sqlite::memory:".into(),
                postgres: None,
            },
            Backend::Postgres => {
                let admin_url = std::env::var("DATABASE_URL").unwrap_or_else(|_| {
                    panic!(
                        "the PostgreSQL HTTP tests need a server: set DATABASE_URL, e.g. \
                         DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres (each test \
                         creates and drops a database of its own)"
                    )
                });
                let name = format!("t_{}", Uuid::new_v4().simple());
                let admin = sea_orm::Database::connect(&admin_url)
                    .await
                    .unwrap_or_else(|e| panic!("cannot connect to DATABASE_URL={admin_url}: {e}"));
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .expect("create the test database");
                admin.close().await.ok();
                TestDb {
                    url: with_database(&admin_url, &name),
                    postgres: Some((admin_url, name)),
                }
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((admin_url, name)) = self.postgres.clone() else {
            return;
        };
        // Drop runs inside the test's runtime: use a runtime of its own on a thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok(admin) = sea_orm::Database::connect(&admin_url).await {
                    let _ = admin
                        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                    admin.close().await.ok();
                }
            });
        })
        .join();
    }
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    }
}

pub struct App {
    pub url: String,
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub runtime: Runtime,
    pub health: Health,
    shutdown: CancellationToken,
    // Last: the server stops before its database goes.
    _db: TestDb,
}

impl Drop for App {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The API over SQLite in memory, with the production HTTP settings.
pub async fn spawn_app() -> App {
    spawn_app_on(Backend::Sqlite).await
}

pub async fn spawn_app_on(backend: Backend) -> App {
    spawn_app_with(backend, orchestrator::http::HttpConfig::default()).await
}

/// The API as `orchestrator run` serves it, with `config` for the connection limits.
pub async fn spawn_app_with(backend: Backend, config: orchestrator::http::HttpConfig) -> App {
    spawn_app_behind(backend, config, &AuthConfig::default()).await
}

/// The API behind the tokens of `auth`, as `orchestrator run` serves it.
pub async fn spawn_app_behind(
    backend: Backend,
    config: orchestrator::http::HttpConfig,
    auth: &AuthConfig,
) -> App {
    let db = TestDb::new(backend).await;
    let store = Store::connect(&db.url).await.expect("a store");
    let definitions = Definitions::parse("sagas.yaml", SAGAS).expect("valid definitions");
    let runtime = Runtime::open(definitions, store).await.expect("a runtime");
    let health = Health::new();
    let api = ApiState {
        runtime: runtime.clone(),
        health: health.clone(),
        metrics: Metrics::install(Duration::from_secs(300)),
    };
    let ui = UiConfig::new(
        DEFAULT_MANAGEMENT_URL,
        "amqp://guest:guest@127.0.0.1:5672/%2f",
    );
    let router = orchestrator::service::app(api, ui, auth);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(orchestrator::http::serve(
        listener,
        router,
        config,
        shutdown.clone(),
    ));
    App {
        url: format!("http://{addr}"),
        addr,
        client: reqwest::Client::new(),
        runtime,
        health,
        shutdown,
        _db: db,
    }
}

/// A status, the `content-type` header, and the body (JSON, or the text as a JSON string).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub body: Value,
}

impl Answer {
    /// The `error` of a JSON error body; panics (saying what came) when there is none.
    pub fn error(&self) -> &str {
        assert!(
            self.content_type.starts_with("application/json"),
            "an error body must be JSON: {self:?}"
        );
        self.body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error string in {self:?}"))
    }
}

pub async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer {
        status,
        content_type,
        body,
    }
}

impl App {
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let answer = self.get_answer(path).await;
        (answer.status, answer.body)
    }

    pub async fn get_answer(&self, path: &str) -> Answer {
        let response = self
            .client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        answer(response).await
    }

    /// `POST` with a JSON body, as clients are to send it.
    pub async fn post(&self, path: &str, body: &str) -> (u16, Value) {
        let answer = self
            .send(path, Some("application/json"), body.as_bytes(), &[])
            .await;
        (answer.status, answer.body)
    }

    /// `POST` with any content type (or none), body and extra headers.
    pub async fn send(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Answer {
        let mut request = self
            .client
            .post(format!("{}{path}", self.url))
            .body(body.to_vec());
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        for (name, value) in headers {
            request = request.header(
                *name,
                reqwest::header::HeaderValue::from_bytes(value).unwrap(),
            );
        }
        answer(request.send().await.unwrap()).await
    }

    /// Starts an `order` saga; returns its id.
    pub async fn start(&self) -> String {
        let (status, body) = self.post("/sagas/order", r#"{"customer": "ada"}"#).await;
        assert_eq!(status, 202, "{body}");
        body["saga_id"].as_str().unwrap().to_owned()
    }

    /// Writes `bytes` on a connection of its own and reads until the server closes it or
    /// `deadline` passes: what came back, and whether the server closed the connection.
    pub async fn raw(&self, bytes: &[u8], deadline: Duration) -> (String, bool) {
        let mut stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        let mut received = Vec::new();
        let closed = tokio::time::timeout(deadline, async {
            let mut buf = [0u8; 4096];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => received.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await
        .is_ok();
        (String::from_utf8_lossy(&received).into_owned(), closed)
    }
}
