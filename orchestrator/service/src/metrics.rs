//! Prometheus metrics. Counters and the step-duration histogram are recorded after each commit
//! from the events it wrote; gauges (in flight, outbox backlog, timers, long-running sagas) are
//! read from the database at scrape time, so they are right whichever process did the work.

use std::sync::OnceLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use saga_engine::{Definitions, SagaState};
use saga_schemas::SagaEvent;

use crate::store::{Store, StoreError};

const STEP_DURATION: &str = "saga_step_duration_seconds";
const STEP_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The process-wide recorder; installed once, shared by every API instance in the process.
static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
    /// Sagas in flight for longer than this are counted in `saga_long_running`.
    long_running: Duration,
}

impl Metrics {
    pub fn install(long_running: Duration) -> Self {
        let handle = HANDLE
            .get_or_init(|| {
                let recorder = PrometheusBuilder::new()
                    .set_buckets_for_metric(Matcher::Full(STEP_DURATION.into()), STEP_BUCKETS)
                    .expect("buckets are not empty")
                    .build_recorder();
                let handle = recorder.handle();
                // Another recorder (a test harness) may be installed already: keep rendering ours.
                let _ = metrics::set_global_recorder(recorder);
                describe();
                handle
            })
            .clone();
        Metrics {
            handle,
            long_running,
        }
    }

    /// The Prometheus text exposition, with gauges refreshed from the database.
    pub async fn render(
        &self,
        store: &Store,
        definitions: &Definitions,
    ) -> Result<String, StoreError> {
        let now = Utc::now();
        let in_flight = store.in_flight_by_name(None).await?;
        let cutoff =
            now - chrono::Duration::from_std(self.long_running).unwrap_or(chrono::Duration::MAX);
        let long_running = store.in_flight_by_name(Some(cutoff)).await?;
        for saga in &definitions.sagas {
            let count = |rows: &[(String, u64)]| {
                rows.iter()
                    .find(|(n, _)| *n == saga.name)
                    .map_or(0, |(_, c)| *c)
            };
            gauge!("saga_in_flight", "saga" => saga.name.clone()).set(count(&in_flight) as f64);
            gauge!("saga_long_running", "saga" => saga.name.clone())
                .set(count(&long_running) as f64);
        }
        gauge!("saga_outbox_backlog").set(store.outbox_backlog().await? as f64);
        gauge!("saga_timers_scheduled").set(store.timer_count().await? as f64);
        gauge!("saga_timers_due").set(store.overdue_timer_count(now).await? as f64);
        gauge!("saga_long_running_threshold_seconds").set(self.long_running.as_secs_f64());
        Ok(self.handle.render())
    }
}

fn describe() {
    describe_counter!("saga_started_total", "Sagas started, by saga name.");
    describe_counter!(
        "saga_completed_total",
        "Sagas that completed, by saga name."
    );
    describe_counter!(
        "saga_compensated_total",
        "Sagas whose completed steps were all undone, by saga name."
    );
    describe_counter!(
        "saga_compensation_failed_total",
        "Sagas whose compensation failed and wait for an operator, by saga name."
    );
    describe_histogram!(
        STEP_DURATION,
        metrics::Unit::Seconds,
        "From a step's first command to its success, retries included, by saga and step."
    );
    describe_gauge!(
        "saga_in_flight",
        "Sagas running or compensating, by saga name."
    );
    describe_gauge!(
        "saga_long_running",
        "Sagas in flight for longer than the threshold, by saga name."
    );
    describe_gauge!(
        "saga_long_running_threshold_seconds",
        "The threshold of saga_long_running."
    );
    describe_gauge!(
        "saga_outbox_backlog",
        "Outbox rows not yet confirmed by the broker."
    );
    describe_gauge!(
        "saga_timers_scheduled",
        "Step timeouts, retries and deadlines waiting in the database."
    );
    describe_gauge!(
        "saga_timers_due",
        "Timers whose time has passed and that have not fired yet."
    );
}

/// Counts what one commit recorded. `state` is the saga's state after the commit.
pub fn record(events: &[SagaEvent], state: &SagaState, now: DateTime<Utc>) {
    let saga = state.saga_name.clone();
    for event in events {
        match event {
            SagaEvent::SagaStarted { .. } => {
                counter!("saga_started_total", "saga" => saga.clone()).increment(1)
            }
            SagaEvent::SagaCompleted => {
                counter!("saga_completed_total", "saga" => saga.clone()).increment(1)
            }
            SagaEvent::SagaCompensated => {
                counter!("saga_compensated_total", "saga" => saga.clone()).increment(1)
            }
            SagaEvent::CompensationFailed { .. } => {
                counter!("saga_compensation_failed_total", "saga" => saga.clone()).increment(1)
            }
            SagaEvent::StepCompleted { step, .. } => {
                let started = state.step(step).and_then(|s| s.started_at);
                if let Some(started) = started {
                    let seconds = (now - started).to_std().unwrap_or_default().as_secs_f64();
                    histogram!(STEP_DURATION, "saga" => saga.clone(), "step" => step.clone())
                        .record(seconds);
                }
            }
            _ => {}
        }
    }
}
