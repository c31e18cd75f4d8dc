//! `GET /metrics`, scraped like Prometheus does: the counters move by exactly what a batch of
//! sagas did, the step-duration histogram counts every step, the gauges go back to zero once
//! everything settles, and a saga stuck waiting shows as long-running.

use std::time::{Duration, Instant};

use saga_system::checkout::*;
use saga_system::prometheus::{Scrape, scrape};
use saga_system::{Backend, CHECKOUT, ORCHESTRATOR, Options, System, pretty};

const SAGA: (&str, &str) = ("saga", CHECKOUT);

/// The counters of one saga name, from one scrape.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Counters {
    started: f64,
    completed: f64,
    compensated: f64,
    compensation_failed: f64,
    create_order_steps: f64,
}

impl Counters {
    fn of(scrape: &Scrape) -> Counters {
        Counters {
            started: scrape.get_or_zero("saga_started_total", &[SAGA]),
            completed: scrape.get_or_zero("saga_completed_total", &[SAGA]),
            compensated: scrape.get_or_zero("saga_compensated_total", &[SAGA]),
            compensation_failed: scrape.get_or_zero("saga_compensation_failed_total", &[SAGA]),
            create_order_steps: scrape.get_or_zero(
                "saga_step_duration_seconds_count",
                &[SAGA, ("step", "create-order")],
            ),
        }
    }

    fn minus(self, before: Counters) -> Counters {
        Counters {
            started: self.started - before.started,
            completed: self.completed - before.completed,
            compensated: self.compensated - before.compensated,
            compensation_failed: self.compensation_failed - before.compensation_failed,
            create_order_steps: self.create_order_steps - before.create_order_steps,
        }
    }
}

/// 6 sagas complete, 3 are declined at the payment, 2 find too little stock: the counters move by
/// exactly 11 / 6 / 5 / 0, create-order's histogram counts 11, and the gauges return to 0.
async fn counters_move_by_the_batch(backend: Backend) {
    let system = System::start(
        Options::new(backend)
            .label("metrics-batch")
            .env("payments", "PAYMENT_LIMIT", 10_000)
            .env("inventory", "INITIAL_STOCK", 5),
    )
    .await;
    let before = scrape(system.http_url()).await;
    for gauge in [
        "saga_outbox_backlog",
        "saga_timers_scheduled",
        "saga_timers_due",
    ] {
        assert!(
            before.get(gauge, &[]).is_some(),
            "{gauge} is served before any saga:\n{}",
            before.text
        );
    }
    assert_eq!(
        before.get("saga_in_flight", &[SAGA]),
        Some(0.0),
        "{}",
        before.text
    );
    let before_counters = Counters::of(&before);

    let mut inputs = Vec::new();
    for i in 0..6 {
        inputs.push(order(&format!("ok-{i}"), 1_000, &[(&unique_sku("pen"), 1)]));
    }
    for i in 0..3 {
        inputs.push(order(
            &format!("declined-{i}"),
            50_000,
            &[(&unique_sku("desk"), 1)],
        ));
    }
    for i in 0..2 {
        inputs.push(order(
            &format!("short-{i}"),
            500,
            &[(&unique_sku("sofa"), 6)],
        ));
    }
    let mut ids = Vec::new();
    for input in &inputs {
        ids.push(system.start_checkout(input).await);
    }

    // While they run, the scrape says so (or they were quick; the counters below are exact).
    let during = scrape(system.http_url()).await;
    let in_flight = during.get("saga_in_flight", &[SAGA]).unwrap_or(-1.0);
    assert!(
        (0.0..=11.0).contains(&in_flight),
        "saga_in_flight is between 0 and 11 while the batch runs: {in_flight}\n{}",
        during.text
    );

    let sagas = system.wait_all_settled(&ids, Duration::from_secs(90)).await;
    let statuses: Vec<&str> = sagas.iter().map(status).collect();
    assert_eq!(
        statuses,
        [["completed"; 6].as_slice(), ["compensated"; 5].as_slice()].concat(),
        "the batch ended as planned: {}",
        sagas.iter().map(pretty).collect::<Vec<_>>().join("\n")
    );

    // Counters are recorded just after the commit that settles a saga, and the gauges are read
    // from the database at scrape time: poll briefly until both have caught up...
    let expected = Counters {
        started: 11.0,
        completed: 6.0,
        compensated: 5.0,
        compensation_failed: 0.0,
        create_order_steps: 11.0,
    };
    let settled = |s: &Scrape| {
        let moved = Counters::of(s).minus(before_counters);
        moved.started >= expected.started
            && moved.completed >= expected.completed
            && moved.compensated >= expected.compensated
            && moved.create_order_steps >= expected.create_order_steps
            && s.get("saga_in_flight", &[SAGA]) == Some(0.0)
            && s.get("saga_outbox_backlog", &[]) == Some(0.0)
            && s.get("saga_replies_waiting", &[]) == Some(0.0)
    };
    let started = Instant::now();
    let mut after = scrape(system.http_url()).await;
    while !settled(&after) && started.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        after = scrape(system.http_url()).await;
    }
    // ...then, a moment later, check that nothing counted twice.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = scrape(system.http_url()).await;
    let moved = Counters::of(&after).minus(before_counters);
    assert_eq!(
        moved, expected,
        "the counters moved by exactly the batch (before: {before_counters:?});\n{}",
        after.text
    );
    assert_eq!(
        after.get("saga_in_flight", &[SAGA]),
        Some(0.0),
        "nothing in flight once all settled:\n{}",
        after.text
    );
    assert_eq!(
        after.get("saga_outbox_backlog", &[]),
        Some(0.0),
        "the outbox is drained:\n{}",
        after.text
    );
    assert_eq!(
        after.get("saga_replies_waiting", &[]),
        Some(0.0),
        "no reply waits in saga.replies:\n{}",
        after.text
    );
    assert_eq!(
        after.get("saga_long_running", &[SAGA]),
        Some(0.0),
        "nothing runs long (threshold 5m):\n{}",
        after.text
    );
    for status in ["compensation_failed", "completion_failed"] {
        assert_eq!(
            after.get("saga_awaiting_operator", &[SAGA, ("status", status)]),
            Some(0.0),
            "no saga waits for an operator in {status}:\n{}",
            after.text
        );
    }
    for gauge in ["saga_timers_scheduled", "saga_timers_due"] {
        let value = after.get(gauge, &[]);
        assert!(
            value.is_some_and(|v| v >= 0.0),
            "{gauge} is served: {value:?}\n{}",
            after.text
        );
    }

    // The histogram: buckets for create-order, cumulative, ending in +Inf = _count.
    let buckets: Vec<(f64, f64)> = after
        .named("saga_step_duration_seconds_bucket")
        .filter(|s| {
            s.labels.get("saga").map(String::as_str) == Some(CHECKOUT)
                && s.labels.get("step").map(String::as_str) == Some("create-order")
        })
        .map(|s| {
            let le = s.labels.get("le").map(String::as_str).unwrap_or("?");
            let le: f64 = le
                .parse()
                .unwrap_or_else(|_| panic!("bucket bound {le:?}:\n{}", after.text));
            (le, s.value)
        })
        .collect();
    assert!(
        buckets.len() > 1,
        "saga_step_duration_seconds has _bucket lines for create-order:\n{}",
        after.text
    );
    assert!(
        buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
        "the buckets are cumulative, in order of their bounds: {buckets:?}"
    );
    let count = after
        .get(
            "saga_step_duration_seconds_count",
            &[SAGA, ("step", "create-order")],
        )
        .unwrap_or(-1.0);
    assert_eq!(
        buckets.last().copied(),
        Some((f64::INFINITY, count)),
        "the last bucket is +Inf and holds every observation:\n{}",
        after.text
    );
    assert!(
        after
            .get(
                "saga_step_duration_seconds_sum",
                &[SAGA, ("step", "create-order")]
            )
            .is_some_and(|sum| sum > 0.0),
        "create-order took some time:\n{}",
        after.text
    );
    // Only the 6 completed sagas completed their last step.
    assert_eq!(
        after.get_or_zero(
            "saga_step_duration_seconds_count",
            &[SAGA, ("step", "approve-order")]
        ) - before.get_or_zero(
            "saga_step_duration_seconds_count",
            &[SAGA, ("step", "approve-order")]
        ),
        6.0,
        "{}",
        after.text
    );
}

/// `orders` is down and the long-running threshold is 1s: the saga waiting for create-order
/// shows in `saga_in_flight` and, after a second, in `saga_long_running`.
async fn long_running(backend: Backend) {
    let system = System::start(
        Options::new(backend)
            .label("metrics-long")
            .without("orders")
            .env(ORCHESTRATOR, "LONG_RUNNING_THRESHOLD", "1s"),
    )
    .await;
    let before = scrape(system.http_url()).await;
    assert_eq!(
        before.get("saga_long_running_threshold_seconds", &[]),
        Some(1.0),
        "the orchestrator took LONG_RUNNING_THRESHOLD=1s:\n{}",
        before.text
    );
    assert_eq!(
        before.get("saga_long_running", &[SAGA]),
        Some(0.0),
        "{}",
        before.text
    );

    // Measured from before the request, so the saga is never older than `started.elapsed()`.
    let started = Instant::now();
    let id = system
        .start_checkout(&order("mo", 700, &[(&unique_sku("jar"), 1)]))
        .await;
    let timeout = Duration::from_secs(8);
    let mut last;
    loop {
        last = scrape(system.http_url()).await;
        let long = last.get("saga_long_running", &[SAGA]).unwrap_or(0.0);
        let in_flight = last.get("saga_in_flight", &[SAGA]).unwrap_or(0.0);
        if long >= 1.0 {
            assert!(
                in_flight >= 1.0,
                "a long-running saga is in flight:\n{}",
                last.text
            );
            assert!(
                started.elapsed() >= Duration::from_millis(950),
                "long-running only after the threshold (1s), seen after {:?}:\n{}",
                started.elapsed(),
                last.text
            );
            break;
        }
        if started.elapsed() > timeout {
            let saga = system.saga(&id).await;
            panic!(
                "saga_long_running{{saga=\"{CHECKOUT}\"}} did not reach 1 within {timeout:?} \
                 while the saga waits:\n{}\nthe saga:\n{}",
                last.text,
                pretty(&saga)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let saga = system.saga(&id).await;
    assert_eq!(
        status(&saga),
        "running",
        "the saga still waits for orders:\n{}",
        pretty(&saga)
    );
    // Its step timeout is scheduled.
    assert!(
        last.get("saga_timers_scheduled", &[])
            .is_some_and(|v| v >= 1.0),
        "the step's timeout is a scheduled timer:\n{}",
        last.text
    );
}

saga_system::on_both_backends!(counters_move_by_the_batch);

mod long_running {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::long_running(saga_system::Backend::Sqlite).await;
    }
}
