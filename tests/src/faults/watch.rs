//! The load of sagas and what runs beside it: the operator's view of the API, a queue's depth,
//! and PostgreSQL starved of connections.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use saga_amqp::lapin::options::QueueDeclareOptions;
use saga_amqp::lapin::types::FieldTable;
use saga_participant::sea_orm::sqlx::{self, Connection as _};
use serde_json::Value;
use tokio::task::JoinHandle;

use super::Planned;
use crate::system::CHECKOUT;

/// How long a start request is retried (same idempotency key) while the API is unreachable.
const LOAD_PATIENCE: Duration = Duration::from_secs(300);

/// The orchestrators' API URLs, shared with the load and the observer (they change when an
/// orchestrator restarts on another port, or dies).
#[derive(Debug, Clone, Default)]
pub struct ApiUrls(Arc<Mutex<Vec<String>>>);

impl ApiUrls {
    pub fn new(urls: Vec<String>) -> Self {
        ApiUrls(Arc::new(Mutex::new(urls)))
    }

    pub fn set(&self, urls: Vec<String>) {
        *self.0.lock().expect("the URL lock") = urls;
    }

    pub fn get(&self) -> Vec<String> {
        self.0.lock().expect("the URL lock").clone()
    }
}

pub(super) fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .expect("an HTTP client")
}

/// A saga the API accepted (202).
#[derive(Debug, Clone)]
pub struct Accepted {
    /// Its index in the plan.
    pub index: usize,
    pub saga_id: String,
}

#[derive(Debug, Default)]
pub struct LoadReport {
    pub accepted: Vec<Accepted>,
    /// Start requests repeated because the API did not answer 202.
    pub retries: usize,
}

/// Starts the plan's sagas spread evenly over `window`, each repeated with its idempotency key
/// (against the next URL) until the API accepts it.
pub fn spawn_load(
    api: ApiUrls,
    plan: Arc<Vec<Planned>>,
    window: Duration,
) -> JoinHandle<LoadReport> {
    tokio::spawn(async move {
        let client = http_client(Duration::from_secs(5));
        let begin = tokio::time::Instant::now();
        let mut report = LoadReport::default();
        let n = plan.len().max(1);
        for (index, planned) in plan.iter().enumerate() {
            tokio::time::sleep_until(begin + window.mul_f64(index as f64 / n as f64)).await;
            let first_try = Instant::now();
            let mut attempt = 0usize;
            let saga_id = loop {
                let urls = api.get();
                let answer = match urls.get((index + attempt) % urls.len().max(1)) {
                    Some(url) => {
                        let response = client
                            .post(format!("{url}/sagas/{CHECKOUT}"))
                            .header("idempotency-key", &planned.key)
                            .json(&planned.input)
                            .send()
                            .await;
                        match response {
                            Ok(r) => {
                                let status = r.status().as_u16();
                                Some((status, r.json::<Value>().await.unwrap_or(Value::Null)))
                            }
                            Err(_) => None,
                        }
                    }
                    None => None,
                };
                match answer {
                    Some((202, body)) => {
                        break body["saga_id"]
                            .as_str()
                            .unwrap_or_else(|| panic!("no saga_id in {body}"))
                            .to_owned();
                    }
                    Some((status @ 400..=499, body)) if status != 408 && status != 429 => {
                        panic!("starting {}: {status} {body}", planned.input)
                    }
                    _ => {}
                }
                attempt += 1;
                report.retries += 1;
                assert!(
                    first_try.elapsed() < LOAD_PATIENCE,
                    "the API did not accept saga {index} ({}) within {LOAD_PATIENCE:?}",
                    planned.key
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            };
            report.accepted.push(Accepted { index, saga_id });
        }
        report
    })
}

/// What the observer saw: sagas listed as waiting for an operator at any moment of the run.
#[derive(Debug, Default, Clone)]
pub struct Observed {
    /// Saga id → the operator status it was seen in.
    pub needs_operator: BTreeMap<String, String>,
    pub polls: usize,
    pub failed_polls: usize,
}

/// Polls every orchestrator's `GET /sagas?status=compensation_failed` and
/// `?status=completion_failed` once a second, through every fault (failures are counted).
pub struct Observer {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Observed>,
}

impl Observer {
    pub fn spawn(api: ApiUrls) -> Observer {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let handle = tokio::spawn(async move {
            let client = http_client(Duration::from_secs(3));
            let mut seen = Observed::default();
            while !stopping.load(Ordering::Relaxed) {
                for url in api.get() {
                    for status in ["compensation_failed", "completion_failed"] {
                        let response = client
                            .get(format!("{url}/sagas?status={status}&limit=500"))
                            .send()
                            .await;
                        let body = match response {
                            Ok(r) if r.status().is_success() => r.json::<Value>().await.ok(),
                            _ => None,
                        };
                        match body {
                            Some(body) => {
                                seen.polls += 1;
                                for saga in body["sagas"].as_array().into_iter().flatten() {
                                    if let Some(id) = saga["id"].as_str() {
                                        seen.needs_operator
                                            .insert(id.to_owned(), status.to_owned());
                                    }
                                }
                            }
                            None => seen.failed_polls += 1,
                        }
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            seen
        });
        Observer { stop, handle }
    }

    pub async fn finish(self) -> Observed {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.expect("the observer task")
    }
}

/// The depth of one queue over the run.
#[derive(Debug, Default, Clone)]
pub struct Depth {
    pub max: u32,
    pub samples: usize,
    pub failed_samples: usize,
    /// Why the last failed sample failed.
    pub last_error: Option<String>,
}

/// Reads a queue's depth (passive `queue_declare`: exact, unlike the management API's
/// statistics) four times a second, reconnecting through faults.
pub struct QueueWatch {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Depth>,
}

impl QueueWatch {
    pub fn spawn(amqp_url: String, queue: String) -> QueueWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let handle = tokio::spawn(async move {
            let mut depth = Depth::default();
            let mut connection = None;
            while !stopping.load(Ordering::Relaxed) {
                if connection.is_none() {
                    match saga_amqp::connect(&amqp_url, "fault-suite-queue-watch").await {
                        Ok(c) => connection = Some(c),
                        Err(e) => depth.last_error = Some(e.to_string()),
                    }
                }
                let count = match &connection {
                    Some(c) => message_count(c, &queue).await,
                    None => Err(anyhow::anyhow!("not connected")),
                };
                match count {
                    Ok(count) => {
                        depth.samples += 1;
                        depth.max = depth.max.max(count);
                    }
                    Err(e) => {
                        depth.failed_samples += 1;
                        if depth.last_error.is_none() || connection.is_some() {
                            depth.last_error = Some(format!("{e:#}"));
                        }
                        connection = None;
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            if let Some(c) = connection {
                let _ = c.close(200, "done".into()).await;
            }
            depth
        });
        QueueWatch { stop, handle }
    }

    pub async fn finish(self) -> Depth {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.expect("the queue watch task")
    }
}

/// Messages ready in `queue` (a channel of its own: a passive declare of a missing queue
/// closes it).
pub(super) async fn message_count(
    connection: &saga_amqp::lapin::Connection,
    queue: &str,
) -> anyhow::Result<u32> {
    let channel = connection.create_channel().await?;
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("passive declare of {queue}"))?;
    let _ = channel.close(200, "done".into()).await;
    Ok(declared.message_count())
}

/// What holding every PostgreSQL connection did.
#[derive(Debug, Default, Clone)]
pub struct Starvation {
    /// Connections the suite held at most.
    pub held: usize,
    /// Connections of the system's database ended so that its services need new ones.
    pub terminated: u64,
}

/// Takes every connection the cluster allows (as a superuser, so the reserved ones too), ends
/// the connections of `database` so that its services must reconnect, takes each slot that
/// frees up, and holds them all for `hold`.
pub async fn starve_postgres(
    url: &str,
    database: &str,
    hold: Duration,
) -> anyhow::Result<Starvation> {
    let mut held: Vec<sqlx::PgConnection> = Vec::new();
    let mut report = Starvation::default();
    let full = |e: &sqlx::Error| {
        let text = e.to_string();
        text.contains("too many clients") || text.contains("remaining connection slots")
    };
    loop {
        match sqlx::PgConnection::connect(url).await {
            Ok(c) => held.push(c),
            Err(e) if full(&e) => break,
            Err(e) => bail!("opening connection {} to {url}: {e}", held.len() + 1),
        }
        if held.len() > 5_000 {
            bail!("{url} took 5000 connections and is still not full");
        }
    }
    let first = held
        .first_mut()
        .context("not one connection to PostgreSQL")?;
    let (terminated,): (i64,) = sqlx::query_as(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(database)
    .fetch_one(&mut *first)
    .await
    .context("ending the system's connections")?;
    report.terminated = u64::try_from(terminated).unwrap_or(0);
    let until = Instant::now() + hold;
    while Instant::now() < until {
        // Several at once: the services race for the same slots.
        let attempts =
            futures_util::future::join_all((0..8).map(|_| sqlx::PgConnection::connect(url))).await;
        for attempt in attempts {
            match attempt {
                Ok(c) => held.push(c),
                Err(e) if full(&e) => {}
                Err(e) => bail!("opening a connection to {url}: {e}"),
            }
        }
        report.held = report.held.max(held.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for connection in held {
        let _ = connection.close().await;
    }
    Ok(report)
}
