//! Prometheus metrics. Counters and the step-duration histogram are recorded after each commit
//! from the events it wrote; gauges (in flight, awaiting an operator, outbox backlog, timers,
//! long-running sagas) are read from the database at scrape time, so they are right whichever
//! process did the work.

use std::sync::OnceLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use saga_engine::{Definitions, SagaState};
use saga_schemas::amqp::{REPLIES_QUEUE, START_QUEUE};
use saga_schemas::{SagaEvent, SagaStatus};

use crate::store::{SetAsideKind, Store, StoreError};

const STEP_DURATION: &str = "saga_step_duration_seconds";
const STEP_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Sagas stopped in a status only an operator ends (`GET /sagas?status=...`), by saga and status.
const AWAITING_OPERATOR: &str = "saga_awaiting_operator";
const OPERATOR_STATUSES: [SagaStatus; 2] =
    [SagaStatus::CompensationFailed, SagaStatus::CompletionFailed];
/// Messages the orchestrator dead-letters itself (to `<queue>.dlq`, with the reason in a
/// header), whatever the reason, by the queue they came from.
pub const DEAD_LETTERS: &str = "saga_dead_letters_total";
/// Replies in `saga.replies` that no orchestrator has taken yet, as last read from the broker.
pub const REPLIES_WAITING: &str = "saga_replies_waiting";

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
                // Served at 0 from the start: the first dead letter is then an increase that
                // `increase()` sees, not a new series.
                for queue in [REPLIES_QUEUE, START_QUEUE] {
                    counter!(DEAD_LETTERS, "queue" => queue).increment(0);
                }
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
        let mut awaiting = Vec::new();
        for status in OPERATOR_STATUSES {
            awaiting.push((status, store.count_by_name(status).await?));
        }
        for saga in &definitions.sagas {
            let count = |rows: &[(String, u64)]| {
                rows.iter()
                    .find(|(n, _)| *n == saga.name)
                    .map_or(0, |(_, c)| *c)
            };
            gauge!("saga_in_flight", "saga" => saga.name.clone()).set(count(&in_flight) as f64);
            gauge!("saga_long_running", "saga" => saga.name.clone())
                .set(count(&long_running) as f64);
            // Every (saga, status) pair is served, 0 included, so an alert sees it go back down.
            for (status, rows) in &awaiting {
                gauge!(AWAITING_OPERATOR, "saga" => saga.name.clone(), "status" => status.as_str())
                    .set(count(rows) as f64);
            }
        }
        gauge!("saga_outbox_backlog").set(store.outbox_backlog().await? as f64);
        gauge!("saga_timers_scheduled").set(store.timer_count().await? as f64);
        gauge!("saga_timers_due").set(store.overdue_timer_count(now).await? as f64);
        gauge!("saga_long_running_threshold_seconds").set(self.long_running.as_secs_f64());
        // Counted from the table (rows are never deleted), so right for the whole cluster.
        let set_aside = store.set_aside_counts().await?;
        for kind in [SetAsideKind::Timer, SetAsideKind::Reply] {
            let count = set_aside
                .iter()
                .find(|(k, _)| *k == kind)
                .map_or(0, |(_, n)| *n);
            counter!("saga_set_aside_total", "kind" => kind.as_str()).absolute(count);
        }
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
    describe_counter!(
        "saga_completion_failed_total",
        "Sagas whose step past the point of no return failed and wait for an operator, by saga name."
    );
    describe_counter!(
        "saga_replies_unknown_total",
        "Replies for a saga this orchestrator's database does not know, dead-lettered."
    );
    describe_counter!(
        DEAD_LETTERS,
        "Messages the orchestrator dead-lettered (unreadable, refused, unknown saga or command), by the queue they came from."
    );
    describe_counter!(
        crate::relay::PACKS,
        "Packed command messages (saga.step_commands) published, by participant."
    );
    describe_counter!(
        crate::relay::PACKED_COMMANDS,
        "Commands published in packed messages, by participant."
    );
    describe_counter!(
        "saga_set_aside_total",
        "Timers and replies that can never be handled, set aside with the reason (GET /set-aside), by kind."
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
        AWAITING_OPERATOR,
        "Sagas in compensation_failed or completion_failed, which only an operator ends, by saga name and status."
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
        REPLIES_WAITING,
        "Replies in saga.replies that no orchestrator has taken yet, read from the broker every second."
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

/// Counts what one commit recorded: `events` got the `seq`s `first_seq ..`, and `state` is the
/// saga's state after the commit. A terminal counter counts a saga only for the event that
/// first brought it to that status, so a saga that returns to a status (an operator's retry
/// that fails again) is counted once per status.
pub fn record(events: &[SagaEvent], first_seq: u64, state: &SagaState, now: DateTime<Utc>) {
    let saga = state.saga_name.clone();
    for (seq, event) in (first_seq..).zip(events) {
        let terminal = match event {
            SagaEvent::SagaCompleted => Some((SagaStatus::Completed, "saga_completed_total")),
            SagaEvent::SagaCompensated => Some((SagaStatus::Compensated, "saga_compensated_total")),
            SagaEvent::CompensationFailed { .. } => Some((
                SagaStatus::CompensationFailed,
                "saga_compensation_failed_total",
            )),
            SagaEvent::CompletionFailed { .. } => {
                Some((SagaStatus::CompletionFailed, "saga_completion_failed_total"))
            }
            _ => None,
        };
        if let Some((status, name)) = terminal {
            if state.first_settled_at(status, seq) {
                counter!(name, "saga" => saga.clone()).increment(1);
            }
            continue;
        }
        match event {
            SagaEvent::SagaStarted { .. } => {
                counter!("saga_started_total", "saga" => saga.clone()).increment(1)
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

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use saga_schemas::{Data, SagaEvent};
    use uuid::Uuid;

    use super::*;

    /// The value of `counter{saga="<saga>"}` in the exposition, 0 when absent.
    fn count(metrics: &Metrics, counter: &str, saga: &str) -> u64 {
        let prefix = format!("{counter}{{saga=\"{saga}\"}} ");
        metrics
            .handle
            .render()
            .lines()
            .find_map(|line| line.strip_prefix(&prefix).map(|v| v.parse().unwrap()))
            .unwrap_or(0)
    }

    /// Records `events` as one commit appended to `log`, as the runtime does after a commit.
    fn commit(log: &mut Vec<SagaEvent>, events: Vec<SagaEvent>) {
        let first_seq = log.len() as u64 + 1;
        log.extend(events.iter().cloned());
        let state = SagaState::fold(Uuid::nil(), log.iter()).expect("a saga");
        let now = Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap();
        record(&events, first_seq, &state, now);
    }

    fn started(saga: &str) -> SagaEvent {
        SagaEvent::SagaStarted {
            saga_name: saga.into(),
            definition_version: "v1".into(),
            input: Data::new(),
            business_key: None,
            deadline_at: None,
        }
    }

    fn failed(step: &str) -> SagaEvent {
        SagaEvent::CompensationFailed {
            step: step.into(),
            reason: "refund refused".into(),
        }
    }

    #[test]
    fn each_saga_counts_once_per_terminal_status() {
        let metrics = Metrics::install(Duration::from_secs(300));
        // A name of this test's own: the recorder is shared by the whole test process.
        let saga = format!("metrics-{}", Uuid::new_v4().simple());
        let mut log = Vec::new();
        commit(&mut log, vec![started(&saga)]);
        commit(
            &mut log,
            vec![
                SagaEvent::CompensationStarted {
                    reason: "declined".into(),
                },
                failed("pay"),
            ],
        );
        assert_eq!(count(&metrics, "saga_compensation_failed_total", &saga), 1);

        // An operator retries; the compensation fails again: still one saga in that status.
        commit(
            &mut log,
            vec![SagaEvent::CompensationRetryRequested {
                step: "pay".into(),
                by: None,
            }],
        );
        commit(&mut log, vec![failed("pay")]);
        assert_eq!(count(&metrics, "saga_compensation_failed_total", &saga), 1);

        // The next retry works: compensated once, and the failure is not counted again.
        commit(
            &mut log,
            vec![SagaEvent::CompensationRetryRequested {
                step: "pay".into(),
                by: None,
            }],
        );
        commit(
            &mut log,
            vec![
                SagaEvent::StepCompensated {
                    step: "pay".into(),
                    attempt: 3,
                    manual: false,
                    by: None,
                },
                SagaEvent::SagaCompensated,
            ],
        );
        assert_eq!(count(&metrics, "saga_compensated_total", &saga), 1);
        assert_eq!(count(&metrics, "saga_compensation_failed_total", &saga), 1);
        assert_eq!(count(&metrics, "saga_started_total", &saga), 1);
    }

    #[test]
    fn a_completion_failure_has_its_own_counter() {
        let metrics = Metrics::install(Duration::from_secs(300));
        let saga = format!("metrics-{}", Uuid::new_v4().simple());
        let mut log = Vec::new();
        commit(&mut log, vec![started(&saga)]);
        commit(
            &mut log,
            vec![SagaEvent::CompletionFailed {
                step: "ship".into(),
                reason: "address unknown".into(),
            }],
        );
        commit(
            &mut log,
            vec![SagaEvent::StepRetryRequested {
                step: "ship".into(),
                by: None,
            }],
        );
        commit(
            &mut log,
            vec![SagaEvent::CompletionFailed {
                step: "ship".into(),
                reason: "address unknown".into(),
            }],
        );
        assert_eq!(count(&metrics, "saga_completion_failed_total", &saga), 1);
        assert_eq!(count(&metrics, "saga_compensation_failed_total", &saga), 0);
    }
}
