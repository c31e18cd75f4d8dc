//! A scenario: the system on the suite's services, its load and watchers, and the checks it
//! ends with.

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use saga_amqp::lapin::options::BasicGetOptions;
use serde_json::Value;
use tokio::task::JoinHandle;

use super::watch::{message_count, spawn_load};
use super::{
    Accepted, ApiUrls, Depth, Expect, FaultEnv, INITIAL_STOCK, LoadReport, Observed, Observer,
    Planned, QueueWatch, definitions, options, plan,
};
use crate::checkout::{self, books_of};
use crate::prometheus::{Scrape, scrape};
use crate::system::{
    Backend, CHECKOUT, ORCHESTRATOR, Options, PARTICIPANTS, System, is_settled, pretty,
};

/// How `/metrics` must agree with the statuses.
#[derive(Debug, Clone)]
pub enum MetricsCheck {
    /// Every orchestrator ran from start to end: their counters, summed, equal the statuses.
    Exact,
    /// The orchestrator was killed last at this time and restarted: its counters (reset by the
    /// restart) equal the sagas that settled after it.
    SettledAfter(DateTime<Utc>),
    /// A second orchestrator was killed at `at`, its counters read just before: the survivors
    /// count at least every saga settled after `at`, and with those counters never more than
    /// the statuses (a saga it settled between the read and the kill is counted nowhere).
    OneKilled {
        at: DateTime<Utc>,
        last_read: Counts,
    },
}

/// Terminal counters of `order-checkout`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub completed: u64,
    pub compensated: u64,
    pub compensation_failed: u64,
}

impl Counts {
    pub fn of(scrape: &Scrape) -> Counts {
        let get = |name| scrape.get_or_zero(name, &[("saga", CHECKOUT)]) as u64;
        Counts {
            completed: get("saga_completed_total"),
            compensated: get("saga_compensated_total"),
            compensation_failed: get("saga_compensation_failed_total"),
        }
    }

    fn add(self, other: Counts) -> Counts {
        Counts {
            completed: self.completed + other.completed,
            compensated: self.compensated + other.compensated,
            compensation_failed: self.compensation_failed + other.compensation_failed,
        }
    }
}

/// Reads an orchestrator's terminal counters.
pub async fn counts(http_url: &str) -> Counts {
    Counts::of(&scrape(http_url).await)
}

/// When the participant of a waiting step came back: sagas whose `create-order` expired before
/// must be compensated by the expiry refusal; those with a minute to spare must not be.
#[derive(Debug, Clone, Copy)]
pub struct ExpiryCheck {
    pub back_at: DateTime<Utc>,
}

/// The figures a scenario prints.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub sagas: usize,
    pub completed: usize,
    pub compensated: usize,
    /// Valid orders (below the limit, own SKU) that were compensated anyway.
    pub valid_compensated: usize,
    pub expired: usize,
    pub retries: usize,
    pub duration: Duration,
    pub max_depth: Option<u32>,
}

/// A scenario in progress: the system, its load, the observer, and what the checks need.
pub struct Run {
    pub name: String,
    pub faults: FaultEnv,
    pub system: System,
    pub plan: Arc<Vec<Planned>>,
    /// The live orchestrators' API URLs: update after a restart or a kill.
    pub api: ApiUrls,
    /// Set by scenarios that kill an orchestrator.
    pub metrics: MetricsCheck,
    /// Whether a valid order must complete (false where the issue allows a fault to compensate
    /// it, e.g. PostgreSQL short of connections for 30 s).
    pub strict: bool,
    pub expiry: Option<ExpiryCheck>,
    /// The most messages the watched queue may hold at any moment.
    pub depth_bound: Option<u32>,
    /// Processes that must still run at the end (others may be added, e.g. a second
    /// orchestrator).
    pub alive: Vec<String>,
    /// Lines printed with the figures.
    pub notes: Vec<String>,
    load: Option<JoinHandle<LoadReport>>,
    /// The load's report once [`load_done`](Self::load_done) waited for it.
    loaded: Option<LoadReport>,
    observer: Option<Observer>,
    watch: Option<(String, QueueWatch)>,
    /// The watched queue's depth, once the watch ended.
    depth: Option<(String, Depth)>,
    started: Instant,
}

impl Run {
    /// Checks the services, starts a system on them (`tweak` adjusts its options) and the
    /// observer; sizes the plan from `FAULT_SAGAS`.
    pub async fn start(
        name: &str,
        backend: Backend,
        tweak: impl FnOnce(Options) -> Options,
    ) -> Run {
        Run::start_with(name, backend, definitions("2m"), tweak).await
    }

    /// [`start`](Self::start) with other definitions.
    pub async fn start_with(
        name: &str,
        backend: Backend,
        definitions: String,
        tweak: impl FnOnce(Options) -> Options,
    ) -> Run {
        Run::start_in(FaultEnv::ready().await, name, backend, definitions, tweak).await
    }

    /// [`start_with`](Self::start_with) on services of the caller's (e.g. the three-node
    /// cluster of `tests/tests/cluster.rs`), already checked; the plan has `faults.sagas`.
    pub async fn start_in(
        faults: FaultEnv,
        name: &str,
        backend: Backend,
        definitions: String,
        tweak: impl FnOnce(Options) -> Options,
    ) -> Run {
        let opts = tweak(options(name, backend, definitions));
        let alive: Vec<String> = std::iter::once(ORCHESTRATOR.to_owned())
            .chain(opts.participants.iter().cloned())
            .collect();
        let system = System::launch(&faults.env, opts)
            .await
            .unwrap_or_else(|e| panic!("{name}: the system did not start: {e:#}"));
        let api = ApiUrls::new(vec![system.http_url().to_owned()]);
        let observer = Observer::spawn(api.clone());
        Run {
            name: name.to_owned(),
            plan: Arc::new(plan(name, faults.sagas)),
            faults,
            system,
            api,
            metrics: MetricsCheck::Exact,
            strict: true,
            expiry: None,
            depth_bound: None,
            alive,
            notes: Vec::new(),
            load: None,
            loaded: None,
            observer: Some(observer),
            watch: None,
            depth: None,
            started: Instant::now(),
        }
    }

    /// Starts the plan's sagas, spread over `window` from now.
    pub fn load(&mut self, window: Duration) {
        self.started = Instant::now();
        self.load = Some(spawn_load(self.api.clone(), self.plan.clone(), window));
    }

    /// Sleeps until `offset` after the load began.
    pub async fn until(&self, offset: Duration) {
        let at = self.started + offset;
        let now = Instant::now();
        if at > now {
            tokio::time::sleep(at - now).await;
        }
    }

    /// Time since the load began.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits until the load has started every saga; returns how many.
    pub async fn load_done(&mut self) -> usize {
        let load = self.load.take().expect("load() first");
        let report = load
            .await
            .unwrap_or_else(|e| panic!("the load failed: {e}"));
        let n = report.accepted.len();
        self.loaded = Some(report);
        n
    }

    /// Watches the depth of `queue` in the system's vhost until the end.
    pub fn watch(&mut self, queue: &str) {
        self.watch = Some((
            queue.to_owned(),
            QueueWatch::spawn(self.system.amqp_url().to_owned(), queue.to_owned()),
        ));
    }

    /// Waits until every accepted saga is terminal, checks everything, prints the figures, and
    /// fails with every problem found.
    pub async fn finish(mut self) -> Figures {
        let report = match (self.loaded.take(), self.load.take()) {
            (Some(report), _) => report,
            (None, Some(load)) => load
                .await
                .unwrap_or_else(|e| panic!("the load failed: {e}")),
            (None, None) => panic!("{}: no load was started", self.name),
        };
        let mut problems = Vec::new();
        let settle =
            Duration::from_secs(180) + Duration::from_millis(500) * report.accepted.len() as u32;
        let views = self
            .wait_terminal(&report.accepted, settle, &mut problems)
            .await;
        let observed = match self.observer.take() {
            Some(observer) => observer.finish().await,
            None => Observed::default(),
        };
        if let Some((queue, watch)) = self.watch.take() {
            self.depth = Some((queue, watch.finish().await));
        }
        let mut figures = Figures {
            sagas: report.accepted.len(),
            retries: report.retries,
            duration: self.started.elapsed(),
            max_depth: self.depth.as_ref().map(|(_, d)| d.max),
            ..Figures::default()
        };
        if report.accepted.len() != self.plan.len() {
            problems.push(format!(
                "{} of {} sagas were accepted",
                report.accepted.len(),
                self.plan.len()
            ));
        }
        for service in self.alive.clone() {
            if !self.system.is_running(&service) {
                problems.push(format!("{service} is not running at the end"));
            }
        }
        self.check_sagas(&report.accepted, &views, &mut figures, &mut problems);
        self.check_books(&report.accepted, &views, &mut problems)
            .await;
        self.check_dead_letters(&mut problems).await;
        self.check_metrics(&views, &mut problems).await;
        if let (Some(bound), Some((queue, depth))) = (self.depth_bound, &self.depth) {
            if depth.max > bound {
                problems.push(format!(
                    "{queue} held up to {} messages, above the bound of {bound}",
                    depth.max
                ));
            }
            if depth.samples == 0 {
                problems.push(format!("the depth of {queue} was never read"));
            }
        }
        if observed.polls == 0 {
            problems.push("the observer never got an answer from the API".into());
        }
        for (id, status) in &observed.needs_operator {
            problems.push(format!("saga {id} was observed in {status} during the run"));
        }
        self.print(&figures, &observed);
        if !problems.is_empty() {
            let shown = problems.len().min(40);
            panic!(
                "{}: {} problem(s):\n  {}{}",
                self.name,
                problems.len(),
                problems[..shown].join("\n  "),
                if shown < problems.len() {
                    "\n  ..."
                } else {
                    ""
                }
            );
        }
        figures
    }

    /// Polls the list until every accepted saga is completed or compensated, or waits for an
    /// operator; then reads each one's view.
    async fn wait_terminal(
        &self,
        accepted: &[Accepted],
        timeout: Duration,
        problems: &mut Vec<String>,
    ) -> Vec<Value> {
        let ids: Vec<&str> = accepted.iter().map(|a| a.saga_id.as_str()).collect();
        let began = Instant::now();
        loop {
            let summaries = self.system.list_all("").await;
            let settled: BTreeSet<&str> = summaries
                .iter()
                .filter(|s| is_settled(s))
                .filter_map(|s| s["id"].as_str())
                .collect();
            let pending: Vec<&str> = ids
                .iter()
                .copied()
                .filter(|id| !settled.contains(id))
                .collect();
            if pending.is_empty() {
                break;
            }
            if began.elapsed() > timeout {
                let first = self.system.saga(pending[0]).await;
                problems.push(format!(
                    "{} of {} sagas were not terminal after {timeout:?}; the first:\n{}",
                    pending.len(),
                    ids.len(),
                    pretty(&first)
                ));
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let mut views = Vec::with_capacity(ids.len());
        for id in ids {
            views.push(self.system.saga(id).await);
        }
        views
    }

    fn check_sagas(
        &self,
        accepted: &[Accepted],
        views: &[Value],
        figures: &mut Figures,
        problems: &mut Vec<String>,
    ) {
        for (a, saga) in accepted.iter().zip(views) {
            let planned = &self.plan[a.index];
            let status = checkout::status(saga);
            let reason = compensation_reason(saga);
            match status {
                "completed" => figures.completed += 1,
                "compensated" => figures.compensated += 1,
                other => problems.push(format!(
                    "saga {} (#{}) ended {other}: {}",
                    a.saga_id,
                    a.index,
                    brief(saga)
                )),
            }
            for kind in ["compensation_failed", "completion_failed"] {
                if !checkout::events(saga, kind).is_empty() {
                    problems.push(format!(
                        "saga {} (#{}) passed through {kind}: {}",
                        a.saga_id,
                        a.index,
                        brief(saga)
                    ));
                }
            }
            let expired = failed_expired(saga);
            if expired {
                figures.expired += 1;
            }
            if planned.expect == Expect::Complete && status == "compensated" {
                figures.valid_compensated += 1;
            }
            let expect = match (planned.expect, self.strict) {
                (Expect::Complete, false) => Expect::Either,
                (e, _) => e,
            };
            match (expect, status) {
                (Expect::Complete, "compensated") if self.expiry.is_none() || !expired => problems
                    .push(format!(
                        "saga {} (#{}) is a valid order but was compensated ({reason}): {}",
                        a.saga_id,
                        a.index,
                        brief(saga)
                    )),
                (Expect::Compensate, "completed") => problems.push(format!(
                    "saga {} (#{}) is above the payment limit but completed",
                    a.saga_id, a.index
                )),
                _ => {}
            }
            if let Some(check) = self.expiry {
                let expires_at = first_expiry(saga, "create-order");
                match expires_at {
                    Some(at) if at < check.back_at => {
                        if !(status == "compensated" && expired) {
                            problems.push(format!(
                                "saga {} (#{}): create-order expired at {at}, before orders came \
                                 back at {}, yet the saga is {status}, not compensated by the \
                                 expiry refusal: {}",
                                a.saga_id,
                                a.index,
                                check.back_at,
                                brief(saga)
                            ));
                        }
                    }
                    Some(at) if at > check.back_at + chrono::Duration::seconds(60) => {
                        if expired {
                            problems.push(format!(
                                "saga {} (#{}): refused as expired although create-order expires \
                                 at {at}, a minute after orders came back",
                                a.saga_id, a.index
                            ));
                        }
                    }
                    Some(_) => {}
                    None => problems.push(format!(
                        "saga {} (#{}): create-order's command carries no expires_at",
                        a.saga_id, a.index
                    )),
                }
            }
        }
    }

    async fn check_books(
        &self,
        accepted: &[Accepted],
        views: &[Value],
        problems: &mut Vec<String>,
    ) {
        let books = self.system.books().await;
        for (a, saga) in accepted.iter().zip(views) {
            let mine = books_of(&books, &a.saga_id);
            let count = |rows: usize, what: &str, n: usize| {
                (rows != n).then(|| format!("{rows} {what}, not {n}"))
            };
            let wrong: Vec<String> = match checkout::status(saga) {
                "completed" => [
                    count(mine.orders.len(), "orders", 1),
                    count(
                        mine.orders
                            .iter()
                            .filter(|o| o.status == "approved")
                            .count(),
                        "approved orders",
                        1,
                    ),
                    count(mine.reservations.len(), "reservations", 1),
                    count(
                        mine.reservations
                            .iter()
                            .filter(|r| r.status == "reserved")
                            .count(),
                        "held reservations",
                        1,
                    ),
                    count(mine.payments.len(), "payments", 1),
                    count(
                        mine.payments
                            .iter()
                            .filter(|p| p.status == "charged")
                            .count(),
                        "charged payments",
                        1,
                    ),
                    count(mine.shipments.len(), "shipments", 1),
                ]
                .into_iter()
                .flatten()
                .collect(),
                "compensated" => [
                    (mine.orders.len() > 1).then(|| format!("{} orders", mine.orders.len())),
                    mine.orders
                        .iter()
                        .find(|o| o.status != "cancelled")
                        .map(|o| format!("an order {}", o.status)),
                    mine.reservations
                        .iter()
                        .find(|r| r.status != "released")
                        .map(|r| format!("a reservation {}", r.status)),
                    mine.payments
                        .iter()
                        .find(|p| p.status == "charged")
                        .map(|_| "a charged payment".to_owned()),
                    (!mine.shipments.is_empty()).then(|| "a shipment".to_owned()),
                ]
                .into_iter()
                .flatten()
                .collect(),
                _ => Vec::new(),
            };
            if !wrong.is_empty() {
                problems.push(format!(
                    "saga {} (#{}, {}) in the books: {}",
                    a.saga_id,
                    a.index,
                    checkout::status(saga),
                    wrong.join(", ")
                ));
            }
        }
        let known: BTreeSet<&str> = accepted.iter().map(|a| a.saga_id.as_str()).collect();
        let strangers: BTreeSet<&str> = books
            .orders
            .iter()
            .flatten()
            .map(|o| o.saga_id.as_str())
            .chain(books.payments.iter().flatten().map(|p| p.saga_id.as_str()))
            .filter(|id| !known.contains(id))
            .collect();
        if !strangers.is_empty() {
            problems.push(format!(
                "the books hold sagas nobody started: {strangers:?}"
            ));
        }
        for problem in saga_examples::books::check(&books, Some(INITIAL_STOCK)) {
            problems.push(format!("books: {problem}"));
        }
    }

    async fn check_dead_letters(&self, problems: &mut Vec<String>) {
        let vhost = self.system.vhost();
        let mut queues: BTreeSet<String> = ["saga.replies.dlq", "saga.start.dlq"]
            .into_iter()
            .map(str::to_owned)
            .chain(PARTICIPANTS.map(|p| format!("saga.commands.{p}.dlq")))
            .collect();
        match self.faults.management().queues(vhost).await {
            Ok(listed) => queues.extend(
                listed
                    .iter()
                    .filter_map(|q| q["name"].as_str())
                    .filter(|name| name.ends_with(".dlq"))
                    .map(str::to_owned),
            ),
            Err(e) => problems.push(format!("listing the queues of {vhost}: {e:#}")),
        }
        let connection = match saga_amqp::connect(self.system.amqp_url(), "fault-suite-dlq").await {
            Ok(c) => c,
            Err(e) => {
                problems.push(format!("connecting to read the dead letters: {e}"));
                return;
            }
        };
        for queue in &queues {
            match message_count(&connection, queue).await {
                Ok(0) => {}
                Ok(n) => {
                    let sample = first_message(&connection, queue).await;
                    problems.push(format!(
                        "{n} dead letter(s) in {queue}; the first: {sample}"
                    ));
                }
                Err(e) => problems.push(format!("{queue}: {e:#}")),
            }
        }
        let _ = connection.close(200, "done".into()).await;
    }

    async fn check_metrics(&self, views: &[Value], problems: &mut Vec<String>) {
        let mut live = Counts::default();
        for url in self.api.get() {
            live = live.add(counts(&url).await);
        }
        let settled_after = |since: DateTime<Utc>| {
            let mut after = Counts::default();
            for saga in views {
                let at = settle_time(saga);
                if at.is_some_and(|at| at > since) {
                    match checkout::status(saga) {
                        "completed" => after.completed += 1,
                        "compensated" => after.compensated += 1,
                        _ => {}
                    }
                }
            }
            after
        };
        let all = settled_after(DateTime::<Utc>::MIN_UTC);
        match &self.metrics {
            MetricsCheck::Exact => {
                if live != all {
                    problems.push(format!(
                        "/metrics of the orchestrators {live:?} disagree with the statuses {all:?}"
                    ));
                }
            }
            MetricsCheck::SettledAfter(since) => {
                let after = settled_after(*since);
                if live != after {
                    problems.push(format!(
                        "/metrics of the orchestrator restarted at {since} {live:?} disagree with \
                         the sagas settled since {after:?}"
                    ));
                }
            }
            MetricsCheck::OneKilled { at, last_read } => {
                let after = settled_after(*at);
                let with_killed = live.add(*last_read);
                let ok = live.completed >= after.completed
                    && live.compensated >= after.compensated
                    && with_killed.completed <= all.completed
                    && with_killed.compensated <= all.compensated
                    && with_killed.compensation_failed == 0;
                if !ok {
                    problems.push(format!(
                        "/metrics: the survivors count {live:?}, the killed orchestrator last \
                         counted {last_read:?}, sagas settled after the kill {after:?}, all \
                         {all:?}: survivors must count at least those settled after the kill, \
                         and all together at most every saga once"
                    ));
                }
            }
        }
    }

    fn print(&self, figures: &Figures, observed: &Observed) {
        let depth = match &self.depth {
            Some((queue, d)) => format!(
                " max_depth[{queue}]={} ({} samples, {} failed{})",
                d.max,
                d.samples,
                d.failed_samples,
                d.last_error
                    .as_ref()
                    .map(|e| format!(", the last: {e}"))
                    .unwrap_or_default()
            ),
            None => String::new(),
        };
        let mut line = format!(
            "FAULT {} ({}): sagas={} completed={} compensated={} (valid orders compensated={}, \
             expired={}) duration={:.1}s start_retries={} operator_polls={}/{}{depth}",
            self.name,
            self.system.backend().name(),
            figures.sagas,
            figures.completed,
            figures.compensated,
            figures.valid_compensated,
            figures.expired,
            figures.duration.as_secs_f64(),
            figures.retries,
            observed.polls,
            observed.polls + observed.failed_polls,
        );
        for note in &self.notes {
            line.push_str(&format!("\n      {note}"));
        }
        // Straight to the process's stdout: the test harness captures `println!`.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

async fn first_message(connection: &saga_amqp::lapin::Connection, queue: &str) -> String {
    let Ok(channel) = connection.create_channel().await else {
        return "(no channel)".into();
    };
    let got = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await;
    let text = match got {
        Ok(Some(message)) => {
            let delivery = message.delivery;
            let body = String::from_utf8_lossy(&delivery.data);
            format!(
                "headers {:?}; body {}",
                delivery.properties.headers(),
                &body[..body.len().min(400)]
            )
        }
        Ok(None) => "(gone)".into(),
        Err(e) => format!("(basic_get: {e})"),
    };
    // Unacked: the message goes back to the queue when the channel closes.
    let _ = channel.close(200, "done".into()).await;
    text
}

/// Why the saga was compensated, from its view.
fn compensation_reason(saga: &Value) -> String {
    checkout::events(saga, "compensation_started")
        .first()
        .and_then(|e| e["reason"].as_str())
        .unwrap_or("-")
        .to_owned()
}

/// Whether a step was refused as expired.
fn failed_expired(saga: &Value) -> bool {
    checkout::events(saga, "step_failed")
        .iter()
        .any(|e| e["reason"] == saga_schemas::EXPIRED)
}

/// The `expires_at` of the first action command of `step`.
fn first_expiry(saga: &Value, step: &str) -> Option<DateTime<Utc>> {
    checkout::events(saga, "command_sent")
        .iter()
        .find(|e| e["step"] == step && e["direction"] == "execute")
        .and_then(|e| e["expires_at"].as_str())
        .and_then(|at| DateTime::parse_from_rfc3339(at).ok())
        .map(|at| at.with_timezone(&Utc))
}

/// When the saga was recorded completed or compensated.
fn settle_time(saga: &Value) -> Option<DateTime<Utc>> {
    checkout::history(saga)
        .iter()
        .rev()
        .find(|e| e["type"] == "saga_completed" || e["type"] == "saga_compensated")
        .and_then(|e| e["recorded_at"].as_str())
        .and_then(|at| DateTime::parse_from_rfc3339(at).ok())
        .map(|at| at.with_timezone(&Utc))
}

/// A saga in one line: status, then its history's event types with steps.
fn brief(saga: &Value) -> String {
    let history: Vec<String> = checkout::history(saga)
        .iter()
        .map(|e| {
            let kind = e["type"].as_str().unwrap_or("?");
            match (e["step"].as_str(), e["reason"].as_str()) {
                (Some(step), Some(reason)) => format!("{kind}({step}: {reason})"),
                (Some(step), None) => format!("{kind}({step})"),
                (None, Some(reason)) => format!("{kind}({reason})"),
                (None, None) => kind.to_owned(),
            }
        })
        .collect();
    format!("{} [{}]", checkout::status(saga), history.join(", "))
}
