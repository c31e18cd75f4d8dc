//! Where the broker and the database are: from the environment, or containers started once per
//! test process, or a panic that says what to set. Never a silent skip.

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// What to set when neither the environment nor Docker provides the services.
pub const WHAT_TO_SET: &str = "AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
                               DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres";

/// The RabbitMQ image started when there is no `AMQP_URL` (the module's default is years old).
pub const RABBITMQ_IMAGE_TAG: &str = "3.13-management";
/// The PostgreSQL image started when there is no `DATABASE_URL`.
pub const POSTGRES_IMAGE_TAG: &str = "16-alpine";

/// The RabbitMQ management HTTP API (used to give every system a vhost of its own).
#[derive(Debug, Clone)]
pub struct Management {
    /// e.g. `http://127.0.0.1:15672`, without a trailing slash.
    pub url: String,
    pub user: String,
    pub password: String,
}

/// The services the systems run against.
#[derive(Debug, Clone)]
pub struct TestEnv {
    /// The broker, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`; each system replaces the vhost.
    pub amqp_url: String,
    /// The management API; `None` only where a system may share the URL's vhost (the demo).
    pub management: Option<Management>,
    /// A PostgreSQL URL whose user may `CREATE DATABASE`; every system gets a database of its
    /// own on that server. `None`: SQLite only.
    pub postgres_url: Option<String>,
}

static TEST_ENV: OnceLock<TestEnv> = OnceLock::new();

impl TestEnv {
    /// The environment of the tests, resolved once per process:
    ///
    /// - `AMQP_URL` and `DATABASE_URL` when set (the management API at
    ///   `RABBITMQ_MANAGEMENT_URL`, default `http://<AMQP host>:15672` with the AMQP URL's
    ///   credentials);
    /// - otherwise, when a Docker engine is reachable (`DOCKER_HOST` or
    ///   `/var/run/docker.sock`), RabbitMQ and PostgreSQL in containers started with
    ///   testcontainers, kept for the life of the test process;
    /// - otherwise a panic saying what to set.
    pub fn get() -> &'static TestEnv {
        TEST_ENV.get_or_init(|| match resolve() {
            Ok(env) => env,
            Err(error) => panic!("{error:#}"),
        })
    }

    /// From `AMQP_URL` (and `RABBITMQ_MANAGEMENT_URL`) and an optional PostgreSQL URL.
    pub fn from_urls(amqp_url: &str, postgres_url: Option<String>) -> anyhow::Result<TestEnv> {
        let management = match std::env::var("RABBITMQ_MANAGEMENT_URL") {
            Ok(url) if !url.is_empty() => {
                management_from_url(&url, amqp_url).context("RABBITMQ_MANAGEMENT_URL")?
            }
            _ => default_management(amqp_url)?,
        };
        Ok(TestEnv {
            amqp_url: amqp_url.to_owned(),
            management: Some(management),
            postgres_url,
        })
    }

    /// The management API, or an error saying how to get one.
    pub fn management(&self) -> anyhow::Result<&Management> {
        self.management.as_ref().context(
            "the RabbitMQ management API is needed to give each system a vhost of its own: \
             enable it (`rabbitmq-plugins enable rabbitmq_management`) and set \
             RABBITMQ_MANAGEMENT_URL if it is not at http://<AMQP host>:15672",
        )
    }

    /// The PostgreSQL URL, or an error saying what to set.
    pub fn postgres_url(&self) -> anyhow::Result<&str> {
        self.postgres_url.as_deref().with_context(|| {
            format!("this system needs PostgreSQL: set DATABASE_URL (e.g. {WHAT_TO_SET})")
        })
    }
}

fn resolve() -> anyhow::Result<TestEnv> {
    let amqp = std::env::var("AMQP_URL").ok().filter(|s| !s.is_empty());
    let database = std::env::var("DATABASE_URL").ok().filter(|s| !s.is_empty());
    match (amqp, database) {
        (Some(amqp), Some(database)) => {
            if !database.starts_with("postgres") {
                bail!(
                    "DATABASE_URL must name a PostgreSQL server (each system creates a \
                     database of its own there; SQLite systems need no URL), e.g. {WHAT_TO_SET}"
                );
            }
            TestEnv::from_urls(&amqp, Some(database))
        }
        (None, None) if docker_available() => containers::start(),
        (None, None) => bail!(
            "the system tests need RabbitMQ (with the management plugin) and PostgreSQL, and \
             no Docker engine was found to start them (neither DOCKER_HOST nor \
             /var/run/docker.sock). Set, for example: {WHAT_TO_SET}"
        ),
        (Some(_), None) => bail!(
            "AMQP_URL is set but DATABASE_URL is not: the system tests run every scenario on \
             PostgreSQL too. Set both, e.g. {WHAT_TO_SET}"
        ),
        (None, Some(_)) => bail!(
            "DATABASE_URL is set but AMQP_URL is not: the system tests need a RabbitMQ broker. \
             Set both, e.g. {WHAT_TO_SET}"
        ),
    }
}

fn docker_available() -> bool {
    std::env::var_os("DOCKER_HOST").is_some_and(|h| !h.is_empty())
        || std::path::Path::new("/var/run/docker.sock").exists()
}

/// `%XX` escapes decoded (user names and passwords in URLs).
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The parts of an AMQP URL the tests need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpParts {
    pub host: String,
    pub user: String,
    pub password: String,
}

/// Host and credentials of `amqp://user:pass@host:port/vhost` (guest/guest when absent).
pub fn amqp_parts(url: &str) -> anyhow::Result<AmqpParts> {
    let parsed =
        reqwest::Url::parse(url).with_context(|| format!("cannot parse the AMQP URL {url:?}"))?;
    let host = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .unwrap_or("127.0.0.1")
        .to_owned();
    let user = match parsed.username() {
        "" => "guest".to_owned(),
        u => percent_decode(u),
    };
    let password = parsed
        .password()
        .map_or_else(|| "guest".to_owned(), percent_decode);
    Ok(AmqpParts {
        host,
        user,
        password,
    })
}

/// `url` with its vhost replaced by `vhost` (which must need no percent-encoding); for a
/// comma-separated list of the nodes of a cluster, every URL of it.
pub fn with_vhost(url: &str, vhost: &str) -> String {
    url.split(',')
        .map(|one| with_vhost_one(one.trim(), vhost))
        .collect::<Vec<_>>()
        .join(",")
}

fn with_vhost_one(url: &str, vhost: &str) -> String {
    let (url, query) = match url.find('?') {
        Some(i) => (&url[..i], &url[i..]),
        None => (url, ""),
    };
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    let base = match url[authority_start..].find('/') {
        Some(i) => &url[..authority_start + i],
        None => url,
    };
    format!("{base}/{vhost}{query}")
}

/// `url` (postgres) with its database replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    with_vhost(url, name)
}

fn default_management(amqp_url: &str) -> anyhow::Result<Management> {
    let parts = amqp_parts(amqp_url)?;
    let host = if parts.host.contains(':') {
        format!("[{}]", parts.host)
    } else {
        parts.host
    };
    Ok(Management {
        url: format!("http://{host}:15672"),
        user: parts.user,
        password: parts.password,
    })
}

/// The management API at `url`, with the credentials of `amqp_url` unless `url` has its own.
pub fn management_from_url(url: &str, amqp_url: &str) -> anyhow::Result<Management> {
    let mut parsed = reqwest::Url::parse(url)
        .with_context(|| format!("cannot parse the management API's URL {url:?}"))?;
    let fallback = amqp_parts(amqp_url)?;
    let user = match parsed.username() {
        "" => fallback.user,
        u => percent_decode(u),
    };
    let password = parsed.password().map_or(fallback.password, percent_decode);
    let _ = parsed.set_username("");
    let _ = parsed.set_password(None);
    Ok(Management {
        url: parsed.as_str().trim_end_matches('/').to_owned(),
        user,
        password,
    })
}

impl Management {
    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .expect("an HTTP client")
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<reqwest::Response> {
        let url = format!("{}{path}", self.url);
        let mut request = Self::client()
            .request(method.clone(), &url)
            .basic_auth(&self.user, Some(&self.password));
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.with_context(|| {
            format!(
                "the RabbitMQ management API did not answer {method} {url} (enable the plugin \
                 with `rabbitmq-plugins enable rabbitmq_management`, or set \
                 RABBITMQ_MANAGEMENT_URL)"
            )
        })
    }

    /// `GET /api/overview` answers 200.
    pub async fn available(&self) -> bool {
        matches!(
            self.send(reqwest::Method::GET, "/api/overview", None).await,
            Ok(r) if r.status().is_success()
        )
    }

    /// Creates `vhost` and gives the management user every permission on it.
    pub async fn create_vhost(&self, vhost: &str) -> anyhow::Result<()> {
        let response = self
            .send(
                reqwest::Method::PUT,
                &format!("/api/vhosts/{vhost}"),
                Some(json!({})),
            )
            .await?;
        if !response.status().is_success() {
            bail!(
                "creating vhost {vhost}: {} {}",
                response.status(),
                response.text().await.unwrap_or_default()
            );
        }
        let permissions = json!({"configure": ".*", "write": ".*", "read": ".*"});
        let response = self
            .send(
                reqwest::Method::PUT,
                &format!("/api/permissions/{vhost}/{}", self.user),
                Some(permissions),
            )
            .await?;
        if !response.status().is_success() {
            bail!(
                "setting permissions on vhost {vhost}: {} {}",
                response.status(),
                response.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Deletes `vhost` (and everything in it); a missing vhost is fine.
    pub async fn delete_vhost(&self, vhost: &str) -> anyhow::Result<()> {
        let response = self
            .send(
                reqwest::Method::DELETE,
                &format!("/api/vhosts/{vhost}"),
                None,
            )
            .await?;
        if !(response.status().is_success() || response.status() == reqwest::StatusCode::NOT_FOUND)
        {
            bail!("deleting vhost {vhost}: {}", response.status());
        }
        Ok(())
    }

    /// `GET /api/queues/{vhost}/{queue}`, as JSON.
    pub async fn queue(&self, vhost: &str, queue: &str) -> anyhow::Result<Value> {
        let response = self
            .send(
                reqwest::Method::GET,
                &format!("/api/queues/{vhost}/{queue}"),
                None,
            )
            .await?;
        if !response.status().is_success() {
            bail!("queue {queue} in vhost {vhost}: {}", response.status());
        }
        Ok(response.json().await?)
    }
}

/// RabbitMQ and PostgreSQL in containers, started once per test process on a thread of their
/// own (with its own runtime, so they outlive any one test's runtime) and removed when the
/// process exits.
mod containers {
    use std::sync::Mutex;
    use std::sync::mpsc;
    use std::time::Duration;

    use anyhow::Context;
    use testcontainers_modules::postgres::Postgres;
    use testcontainers_modules::rabbitmq::RabbitMq;
    use testcontainers_modules::testcontainers::ImageExt;
    use testcontainers_modules::testcontainers::runners::AsyncRunner;

    use super::{Management, POSTGRES_IMAGE_TAG, RABBITMQ_IMAGE_TAG, TestEnv};

    /// Tells the container thread to remove the containers, and waits until it has.
    static STOP: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>> = Mutex::new(None);

    extern "C" fn remove_at_exit() {
        let taken = STOP.lock().ok().and_then(|mut stop| stop.take());
        if let Some((stop, done)) = taken {
            let _ = stop.send(());
            let _ = done.recv_timeout(Duration::from_secs(30));
        }
    }

    pub(super) fn start() -> anyhow::Result<TestEnv> {
        let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<TestEnv>>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("saga-system-containers".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let rabbit = match RabbitMq::default()
                        .with_tag(RABBITMQ_IMAGE_TAG)
                        .start()
                        .await
                    {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = ready_tx.send(Err(anyhow::Error::new(e).context(format!(
                                "cannot start rabbitmq:{RABBITMQ_IMAGE_TAG} with Docker"
                            ))));
                            return;
                        }
                    };
                    let postgres = match Postgres::default()
                        .with_tag(POSTGRES_IMAGE_TAG)
                        .start()
                        .await
                    {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = ready_tx.send(Err(anyhow::Error::new(e).context(format!(
                                "cannot start postgres:{POSTGRES_IMAGE_TAG} with Docker"
                            ))));
                            let _ = rabbit.rm().await;
                            return;
                        }
                    };
                    let env = async {
                        let host = rabbit.get_host().await?.to_string();
                        let amqp_port = rabbit.get_host_port_ipv4(5672).await?;
                        let management_port = rabbit.get_host_port_ipv4(15672).await?;
                        let pg_host = postgres.get_host().await?.to_string();
                        let pg_port = postgres.get_host_port_ipv4(5432).await?;
                        anyhow::Ok(TestEnv {
                            amqp_url: format!("amqp://guest:guest@{host}:{amqp_port}/%2f"),
                            management: Some(Management {
                                url: format!("http://{host}:{management_port}"),
                                user: "guest".into(),
                                password: "guest".into(),
                            }),
                            postgres_url: Some(format!(
                                "postgres://postgres:postgres@{pg_host}:{pg_port}/postgres"
                            )),
                        })
                    }
                    .await;
                    let failed = env.is_err();
                    let _ = ready_tx.send(env);
                    if !failed {
                        // Keep the containers until the process exits.
                        let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
                    }
                    let _ = rabbit.rm().await;
                    let _ = postgres.rm().await;
                });
                let _ = done_tx.send(());
            })
            .context("cannot start the container thread")?;
        let env = ready_rx
            .recv()
            .context("the container thread stopped before the containers were ready")??;
        *STOP.lock().expect("the container lock") = Some((stop_tx, done_rx));
        // SAFETY: registers a plain function without captures; it only touches a Mutex.
        unsafe {
            libc::atexit(remove_at_exit);
        }
        // The management plugin answers a little after the broker logs that it started.
        let management = env.management.clone().expect("set above");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let probe = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        while !probe.block_on(management.available()) {
            if std::time::Instant::now() > deadline {
                anyhow::bail!("the RabbitMQ container's management API did not answer within 60s");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_helpers() {
        assert_eq!(
            with_vhost("amqp://guest:guest@127.0.0.1:5672/%2f", "v"),
            "amqp://guest:guest@127.0.0.1:5672/v"
        );
        assert_eq!(
            with_vhost("amqp://h:5672?heartbeat=5", "v"),
            "amqp://h:5672/v?heartbeat=5"
        );
        assert_eq!(
            with_vhost("amqp://a:5681/%2f, amqp://b:5682/%2f", "v"),
            "amqp://a:5681/v,amqp://b:5682/v"
        );
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "db1"),
            "postgres://postgres@127.0.0.1:5432/db1"
        );
        let parts = amqp_parts("amqp://bob:p%40ss@rabbit:5672/%2f").unwrap();
        assert_eq!(
            parts,
            AmqpParts {
                host: "rabbit".into(),
                user: "bob".into(),
                password: "p@ss".into()
            }
        );
        let parts = amqp_parts("amqp://127.0.0.1:5672/%2f").unwrap();
        assert_eq!(
            (parts.user.as_str(), parts.password.as_str()),
            ("guest", "guest")
        );
        let m = management_from_url(
            "http://admin:secret@mgmt:15673/",
            "amqp://guest:guest@h/%2f",
        )
        .unwrap();
        assert_eq!(
            (m.url.as_str(), m.user.as_str(), m.password.as_str()),
            ("http://mgmt:15673", "admin", "secret")
        );
    }
}
