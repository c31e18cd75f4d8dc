//! `saga-bench`: runs N sagas of a K-step definition against no-op participants with C in
//! flight, and in the same run measures the raw broker round trip (a persistent, confirmed
//! publish, consumed, answered the same way, acked) at the same concurrency, so the ratio of
//! the two means something on a noisy machine. One saga at a time it also prints the floor
//! under a saga's latency: its raw round trips and its commits, with nothing else on its path.
//!
//! `--fail-last-step` measures the compensation path instead, `--participants processes` runs
//! each participant as an OS process of its own (as in production), and the CPU time per saga
//! of the bench process, the participant processes, the local broker and the local PostgreSQL
//! server is reported.

mod cpu;
mod floor;
mod memory;
mod processes;

// As the orchestrator and the example participants do: see their `main.rs`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use futures_util::StreamExt;
use orchestrator::relay::PackCommands;
use orchestrator::runtime::{PublishEvents, Runtime};
use orchestrator::service::{ServiceConfig, serve_runtime};
use orchestrator::store::Store;
use saga_amqp::lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use saga_amqp::lapin::types::FieldTable;
use saga_amqp::{OutgoingMessage, Publisher};
use saga_engine::Definitions;
use saga_participant::sea_orm::{ConnectionTrait, Database};
use saga_participant::{Participant, SdkConfig, failure, success};
use saga_schemas::{EventEnvelope, SagaEvent};
use serde_json::json;
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(
    name = "saga-bench",
    about = "Saga throughput and latency against the raw broker round trip"
)]
struct Args {
    /// Sagas to run (after a short warm-up).
    #[arg(long, default_value_t = 2000)]
    sagas: usize,
    /// Steps per saga, one no-op participant each.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Sagas (and raw round trips) in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// The broker. Use a vhost of its own: the benchmark declares the usual topology there.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = saga_amqp::DEFAULT_AMQP_URL,
        hide_env_values = true
    )]
    amqp_url: String,
    /// Which saga events the orchestrator publishes: all or terminal (the benchmark follows
    /// sagas by their terminal events, so not none).
    #[arg(long, env = "PUBLISH_EVENTS", default_value_t = PublishEvents::default())]
    publish_events: PublishEvents,
    /// The participants whose commands go packed, several to a message (the orchestrator's
    /// `PACK_COMMANDS`): `all` (the bench participants are built on the SDK, which takes them),
    /// `none` for one message per command and per reply.
    #[arg(long, env = "PACK_COMMANDS", default_value_t = PackCommands::All)]
    pack_commands: PackCommands,
    /// The type of every queue, the raw round trip's too: quorum or classic.
    #[arg(long, env = "QUEUE_TYPE", default_value_t = saga_amqp::QueueType::Quorum)]
    queue_type: saga_amqp::QueueType,
    /// A PEM file of CA certificates to trust for an `amqps://` broker, besides the built-in
    /// (Mozilla) roots: for a broker certificate signed by a private CA.
    #[arg(long, env = "AMQP_CA_FILE", value_name = "FILE")]
    amqp_ca_file: Option<std::path::PathBuf>,
    /// `postgres://...` (a fresh database is created on that server and dropped afterwards), or
    /// empty for SQLite files in a temporary directory.
    #[arg(
        long,
        env = "BENCH_DATABASE_URL",
        default_value = "",
        hide_env_values = true
    )]
    database_url: String,
    /// Elements per message in the raw round trip: K requests ride in one message and their K
    /// replies in one, with `--concurrency` elements in flight (so 1/K as many messages,
    /// rounded up). What
    /// packing several commands (or replies) into one message would save the broker; 1 is the
    /// wire contract as it is, one command per message.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    raw_pack: u16,
    /// Unacknowledged commands each participant handles at once.
    #[arg(long, default_value_t = 64)]
    participant_prefetch: u16,
    /// Database transactions each participant runs at once (the SDK's default when not given:
    /// 1 on SQLite, 4 on PostgreSQL).
    #[arg(long)]
    participant_transactions: Option<u32>,
    /// Measure the compensation path: the last step's participant answers a business failure,
    /// so every saga compensates the steps before it. A saga then counts as done when it is
    /// compensated; one that completes is an anomaly (reported, and the run fails).
    #[arg(long)]
    fail_last_step: bool,
    /// Where the no-op participants run: `in-process` (tasks of this process, sharing its
    /// runtime with the orchestrator) or `processes` (one OS process each, this binary run
    /// again, as in production; they are killed when the benchmark ends).
    #[arg(long, value_enum, default_value_t = ParticipantsMode::InProcess)]
    participants: ParticipantsMode,
    /// Threads of the runtime of this process (the orchestrator, the driver and in-process
    /// participants) and of each participant process: 1, the binaries' default, runs every
    /// task on one thread.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    runtime_threads: u16,
    /// After the measured run: stop the participants, start this many sagas, sample this
    /// process's RSS, start the participants again and time the drain (0: skip). Meant with
    /// `--participants processes`, so that the RSS is the orchestrator's (and the driver's).
    #[arg(long, default_value_t = 0)]
    backlog: usize,
    /// With `--backlog`: the RSS this process must stay under, in MiB.
    #[arg(long, default_value_t = 256)]
    backlog_rss_bound_mib: u64,
    /// Internal (`--participants processes`): run the named no-op participant until stdin
    /// closes.
    #[arg(long, hide = true, value_name = "NAME")]
    participant_process: Option<String>,
    /// Internal: that participant's database URL.
    #[arg(
        long,
        hide = true,
        env = "SAGA_BENCH_PARTICIPANT_DATABASE_URL",
        hide_env_values = true
    )]
    participant_database_url: Option<String>,
    /// Internal: that participant's PostgreSQL schema.
    #[arg(long, hide = true)]
    participant_database_schema: Option<String>,
    /// Internal: that participant's action answers a business failure.
    #[arg(long, hide = true)]
    participant_fails: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ParticipantsMode {
    InProcess,
    Processes,
}

impl std::fmt::Display for ParticipantsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ParticipantsMode::InProcess => "in-process",
            ParticipantsMode::Processes => "processes",
        })
    }
}

/// How a saga of the run is meant to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Completed,
    Compensated,
    CompensationFailed,
    CompletionFailed,
}

impl End {
    const ALL: [End; 4] = [
        End::Completed,
        End::Compensated,
        End::CompensationFailed,
        End::CompletionFailed,
    ];

    /// The routing-key suffix of its event on the events exchange.
    fn kind(self) -> &'static str {
        match self {
            End::Completed => "saga_completed",
            End::Compensated => "saga_compensated",
            End::CompensationFailed => "compensation_failed",
            End::CompletionFailed => "completion_failed",
        }
    }

    fn of(event: &SagaEvent) -> Option<End> {
        match event {
            SagaEvent::SagaCompleted => Some(End::Completed),
            SagaEvent::SagaCompensated => Some(End::Compensated),
            SagaEvent::CompensationFailed { .. } => Some(End::CompensationFailed),
            SagaEvent::CompletionFailed { .. } => Some(End::CompletionFailed),
            _ => None,
        }
    }
}

fn main() -> anyhow::Result<()> {
    // A line per message at `info` would be measured too: `RUST_LOG=info` to see them.
    orchestrator::telemetry::init_quiet("warn");
    let args = Args::parse();
    let runtime = saga_amqp::async_runtime(args.runtime_threads.into())?;
    match &args.participant_process {
        Some(name) => runtime.block_on(processes::run_child(&args, name)),
        None => runtime.block_on(bench(&args)),
    }
}

async fn bench(args: &Args) -> anyhow::Result<()> {
    if args.sagas == 0 || args.steps == 0 || args.concurrency == 0 {
        bail!("--sagas, --steps and --concurrency must be at least 1");
    }
    if args.publish_events == PublishEvents::None {
        bail!("--publish-events none: the benchmark follows sagas by their terminal events");
    }
    let databases = Databases::create(&args.database_url, args.steps).await?;
    let shutdown = CancellationToken::new();
    let result = run(args, &databases, shutdown.clone()).await;
    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    databases.drop_all().await;
    result
}

async fn run(
    args: &Args,
    databases: &Databases,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let saga = format!("bench-k{}", args.steps);
    let definitions = Definitions::parse("bench.yaml", &definition_yaml(&saga, args.steps))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let participants: Vec<String> = (0..args.steps).map(|i| format!("bench-p{i}")).collect();

    // Topology first, so the completion subscription has an exchange to bind to.
    let tls = saga_amqp::Tls::from_ca_file(args.amqp_ca_file.as_deref())?;
    let conn = saga_amqp::connect_with_tls(&args.amqp_url, "saga-bench driver", &tls).await?;
    let channel = conn.create_channel().await?;
    let names: Vec<&str> = participants.iter().map(String::as_str).collect();
    saga_amqp::declare_orchestrator_topology(&channel, &names, args.queue_type).await?;

    let store = Store::connect(&databases.orchestrator).await?;
    let runtime = Runtime::open(definitions, store)
        .await?
        .publishing(args.publish_events);
    let config = ServiceConfig {
        amqp_url: args.amqp_url.clone().into(),
        queue_type: args.queue_type,
        publish_events: args.publish_events,
        pack_commands: args.pack_commands.clone(),
        database_url: databases.orchestrator.clone().into(),
        database_pool_size: orchestrator::store::DEFAULT_POOL_SIZE,
        http: "127.0.0.1:0".parse()?,
        connection_name: "saga-bench orchestrator".into(),
        prefetch: 256,
        long_running_threshold: Duration::from_secs(300),
        inbox_retention: orchestrator::retention::DEFAULT_INBOX_RETENTION,
        amqp_tls: tls.clone(),
        auth: Default::default(),
        management_url: orchestrator::ui::DEFAULT_MANAGEMENT_URL.into(),
    };
    let service = tokio::spawn(serve_runtime(runtime.clone(), config, shutdown.clone()));
    // Cancelled when a participant process exits before the end: no use waiting for sagas.
    let abort = CancellationToken::new();
    let mut running = Participants::start(args, &participants, databases, &shutdown, &abort)?;
    let expected = if args.fail_last_step {
        End::Compensated
    } else {
        End::Completed
    };

    // Enough to fill the pipeline once, before the measured run.
    let warmup = (args.sagas / 10)
        .clamp(1, 200)
        .max(args.concurrency.min(args.sagas));
    let tracker = Tracker::subscribe(&channel, &saga).await?;
    let driver = Driver {
        runtime: &runtime,
        tracker: &tracker,
        saga: &saga,
        concurrency: args.concurrency,
        expected,
        abort: &abort,
    };
    driver.drive(warmup).await?;
    let meters = cpu::Meters::find(
        &args.amqp_url,
        &args.database_url,
        running
            .children
            .iter()
            .map(|c| (c.name.clone(), c.pid))
            .collect(),
    );
    let before = meters.read();
    let timed_out_before = tracker.timed_out();
    let measured = driver.drive(args.sagas).await?;
    let after = meters.read();
    let timed_out = tracker.timed_out() - timed_out_before;
    let backlog = if args.backlog > 0 {
        running.stop().await;
        let rss = memory::RssSampler::start();
        let started = Instant::now();
        driver.start_only(args.backlog).await?;
        let filled = started.elapsed();
        running = Participants::start(args, &participants, databases, &shutdown, &abort)?;
        let draining = Instant::now();
        let unfinished = driver.wait(args.backlog).await?;
        let drained = draining.elapsed();
        Some(Backlog {
            filled,
            drained,
            unfinished,
            timed_out: tracker.timed_out() - timed_out_before - timed_out,
            rss: rss.stop().await,
        })
    } else {
        None
    };
    shutdown.cancel();
    service.await.ok();
    // Not running during the raw round trips.
    running.stop().await;

    let raw_before = meters.read();
    let raw = raw_round_trips(
        &args.amqp_url,
        &tls,
        args.queue_type,
        args.sagas * args.steps,
        args.concurrency,
        usize::from(args.raw_pack),
        args.participant_prefetch,
    )
    .await?;
    let raw_after = meters.read();
    // One at a time only: at 64 in flight a round trip's p50 is mostly queueing.
    let lone_commits = if args.concurrency == 1 {
        let (url, schema) = &databases.commits;
        Some(floor::lone_commits(url, schema.as_deref(), LONE_COMMITS).await?)
    } else {
        None
    };

    let sagas_per_s = args.sagas as f64 / measured.elapsed.as_secs_f64();
    // On the compensation path a saga runs more steps than it has: the last step's action
    // fails (nothing to undo there), and the steps before it are compensated one by one. Each
    // run of a step, action or compensation, is a command and its reply: one round trip.
    let compensations = if args.fail_last_step {
        args.steps - 1
    } else {
        0
    };
    let steps_per_s = sagas_per_s * (args.steps + compensations) as f64;
    let actions_per_s = sagas_per_s * args.steps as f64;
    let raw_per_s = raw.count as f64 / raw.elapsed.as_secs_f64();
    println!(
        "saga-bench: {} sagas x {} steps, {} in flight, database {}, broker {}, {} queues, \
         events published: {}, commands packed: {}, path: {}, participants: {}, logs: {}",
        args.sagas,
        args.steps,
        args.concurrency,
        databases.kind,
        saga_amqp::redact_url(&args.amqp_url),
        args.queue_type,
        args.publish_events,
        args.pack_commands,
        if args.fail_last_step {
            "compensation (the last step fails)"
        } else {
            "completion"
        },
        args.participants,
        std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into())
    );
    println!("  sagas/s            {sagas_per_s:>10.1}");
    println!(
        "  steps/s            {steps_per_s:>10.1}   ({} actions + {compensations} compensations run per saga)",
        args.steps
    );
    println!(
        "  saga latency       p50 {:>7.1} ms   p99 {:>7.1} ms",
        ms(percentile(&measured.latencies, 50.0)),
        ms(percentile(&measured.latencies, 99.0))
    );
    println!(
        "  raw round trips/s  {raw_per_s:>10.1}   (persistent, confirmed both ways, {} in flight, {} per message)",
        args.concurrency, args.raw_pack
    );
    println!(
        "  raw round trip     p50 {:>7.1} ms   p99 {:>7.1} ms",
        ms(percentile(&raw.latencies, 50.0)),
        ms(percentile(&raw.latencies, 99.0))
    );
    if let Some(commits) = &lone_commits {
        let step_runs = args.steps + compensations;
        let commit = percentile(commits, 50.0);
        let round_trip = percentile(&raw.latencies, 50.0);
        println!(
            "  lone commit        p50 {:>7.2} ms   (one row inserted and fsynced, {LONE_COMMITS} one at a time, the services' driver and settings)",
            ms(commit)
        );
        println!(
            "  floor              {:>10.1} ms   ({step_runs} raw round trips + {} lone commits at their p50: the broker and the disk alone, one saga at a time)",
            ms(floor::floor(step_runs, round_trip, commit)),
            floor::commits_per_saga(step_runs)
        );
    }
    let actions_alone = if compensations > 0 {
        format!("   (actions alone: {:.2})", actions_per_s / raw_per_s)
    } else {
        String::new()
    };
    println!(
        "  ratio steps/s : raw round trips/s = {:.2}{actions_alone}",
        steps_per_s / raw_per_s
    );
    cpu::print_raw(&meters, &raw_before, &raw_after, raw.count);
    let mut outcomes = String::new();
    for end in End::ALL {
        let n = measured.ends.iter().filter(|e| **e == end).count();
        outcomes += &format!("  {} {n}", end.kind().trim_start_matches("saga_"));
    }
    println!(
        "  outcomes         {outcomes}  unfinished {}   (expected: {}); attempts timed out {timed_out}",
        measured.unfinished,
        expected.kind().trim_start_matches("saga_")
    );
    meters.print(&before, &after, args.sagas);
    if let Some(backlog) = &backlog {
        let drain_per_s = args.backlog as f64 / backlog.drained.as_secs_f64();
        let held = backlog.rss.peak_mib <= args.backlog_rss_bound_mib as f64;
        println!(
            "  backlog          {} sagas started in {:.1} s with the participants stopped, \
             drained in {:.1} s once they started ({} unfinished, {} attempts timed out)",
            args.backlog,
            backlog.filled.as_secs_f64(),
            backlog.drained.as_secs_f64(),
            backlog.unfinished,
            backlog.timed_out
        );
        println!(
            "  backlog drain      {drain_per_s:>10.1} sagas/s = {:.2} x the measured run",
            drain_per_s / sagas_per_s
        );
        println!(
            "  backlog RSS        before {:.0} MiB, peak {:.0} MiB, bound {} MiB: {}   (this process{})",
            backlog.rss.first_mib,
            backlog.rss.peak_mib,
            args.backlog_rss_bound_mib,
            if held { "held" } else { "EXCEEDED" },
            match args.participants {
                ParticipantsMode::Processes => ": orchestrator and driver",
                ParticipantsMode::InProcess => ", participants included",
            }
        );
        if !held || backlog.unfinished > 0 {
            bail!("the backlog run failed: RSS over its bound or sagas unfinished");
        }
    }
    let unexpected = measured.ends.iter().filter(|e| **e != expected).count();
    if unexpected + measured.unfinished > 0 {
        bail!(
            "{} sagas did not end {} ({unexpected} ended otherwise, {} unfinished or not started)",
            unexpected + measured.unfinished,
            expected.kind().trim_start_matches("saga_"),
            measured.unfinished
        );
    }
    Ok(())
}

/// Lone commits timed for the floor of a one-at-a-time run.
const LONE_COMMITS: usize = 200;

/// What `--backlog` saw.
struct Backlog {
    filled: Duration,
    drained: Duration,
    unfinished: usize,
    /// Attempts asked again after their step's timeout, from the start of the backlog on.
    timed_out: u64,
    rss: memory::Rss,
}

/// The no-op participants of a run, in-process or as child processes.
struct Participants {
    stop: CancellationToken,
    children: Vec<processes::Child>,
}

impl Participants {
    fn start(
        args: &Args,
        names: &[String],
        databases: &Databases,
        shutdown: &CancellationToken,
        abort: &CancellationToken,
    ) -> anyhow::Result<Self> {
        let stop = shutdown.child_token();
        let mut children = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let fails = args.fail_last_step && i + 1 == args.steps;
            let (url, schema) = &databases.participants[i];
            match args.participants {
                ParticipantsMode::InProcess => {
                    let sdk = sdk_config(args, name, url, schema.clone());
                    tokio::spawn(bench_participant(name, fails).run(sdk, stop.clone()));
                }
                ParticipantsMode::Processes => children.push(processes::spawn(
                    args,
                    name,
                    url,
                    schema.as_deref(),
                    fails,
                    &stop,
                    abort,
                )?),
            }
        }
        Ok(Participants { stop, children })
    }

    async fn stop(self) {
        self.stop.cancel();
        processes::stop(self.children).await;
        // In-process participants finish what they hold, then close.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A no-op participant; `fails`: its action answers a business failure.
fn bench_participant(name: &str, fails: bool) -> Participant {
    Participant::new(name.to_owned())
        .action("work", move |_, _| {
            Box::pin(async move {
                Ok(if fails {
                    failure("saga-bench --fail-last-step: the last step fails")
                } else {
                    success(json!({}))
                })
            })
        })
        .compensation("undo", |_, _| Box::pin(async { Ok(success(json!({}))) }))
}

fn sdk_config(args: &Args, name: &str, url: &str, schema: Option<String>) -> SdkConfig {
    let mut sdk = SdkConfig::new(name);
    sdk.amqp_url = args.amqp_url.clone().into();
    sdk.database_url = url.to_owned().into();
    sdk.database_schema = schema;
    sdk.prefetch = args.participant_prefetch;
    sdk.database_transactions = args.participant_transactions;
    sdk.amqp_ca_file = args.amqp_ca_file.clone();
    sdk.queue_type = args.queue_type;
    sdk
}

fn definition_yaml(saga: &str, steps: usize) -> String {
    let mut yaml = format!("sagas:\n  - name: {saga}\n    steps:\n");
    for i in 0..steps {
        yaml += &format!(
            "      - name: step-{i}\n        participant: bench-p{i}\n        action: work\n        compensation: undo\n        timeout: 60s\n"
        );
    }
    yaml
}

struct Measured {
    elapsed: Duration,
    /// Of the sagas that ended as expected.
    latencies: Vec<Duration>,
    /// How each saga that ended did.
    ends: Vec<End>,
    /// Not started, or no end seen in time.
    unfinished: usize,
}

/// Completion times of sagas, from the events exchange.
#[derive(Clone)]
struct Tracker {
    inner: Arc<Mutex<TrackerState>>,
    done: Arc<Semaphore>,
}

#[derive(Default)]
struct TrackerState {
    started: HashMap<Uuid, Instant>,
    /// Finished before `start` returned to us.
    early: HashMap<Uuid, (Instant, End)>,
    finished: Vec<(Duration, End)>,
    /// Attempts that got no reply within their step's timeout, so were asked again.
    timed_out: u64,
}

impl Tracker {
    async fn subscribe(channel: &saga_amqp::lapin::Channel, saga: &str) -> anyhow::Result<Self> {
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        for kind in End::ALL
            .map(End::kind)
            .into_iter()
            .chain(["attempt_timed_out"])
        {
            channel
                .queue_bind(
                    queue.name().clone(),
                    saga_schemas::amqp::EVENTS_EXCHANGE.into(),
                    format!("{saga}.{kind}").into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        let mut consumer = channel
            .basic_consume(
                queue.name().clone(),
                "saga-bench tracker".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let tracker = Tracker {
            inner: Arc::default(),
            done: Arc::new(Semaphore::new(0)),
        };
        let t = tracker.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let now = Instant::now();
                let Ok(envelope) = serde_json::from_slice::<EventEnvelope>(&delivery.data) else {
                    continue;
                };
                let mut state = t.inner.lock().expect("tracker lock");
                if matches!(envelope.event, SagaEvent::AttemptTimedOut { .. }) {
                    state.timed_out += 1;
                    continue;
                }
                let Some(end) = End::of(&envelope.event) else {
                    continue;
                };
                match state.started.remove(&envelope.saga_id) {
                    Some(start) => state.finished.push((now - start, end)),
                    None => {
                        state.early.insert(envelope.saga_id, (now, end));
                        continue;
                    }
                }
                drop(state);
                t.done.add_permits(1);
            }
        });
        Ok(tracker)
    }

    /// Attempts timed out so far.
    fn timed_out(&self) -> u64 {
        self.inner.lock().expect("tracker lock").timed_out
    }

    fn started(&self, id: Uuid, at: Instant) {
        let mut state = self.inner.lock().expect("tracker lock");
        match state.early.remove(&id) {
            Some((at_end, end)) => {
                state.finished.push((at_end - at, end));
                drop(state);
                self.done.add_permits(1);
            }
            None => {
                state.started.insert(id, at);
            }
        }
    }
}

/// Starts sagas with `concurrency` in flight and waits for their ends.
#[derive(Clone, Copy)]
struct Driver<'a> {
    runtime: &'a Runtime,
    tracker: &'a Tracker,
    saga: &'a str,
    concurrency: usize,
    expected: End,
    abort: &'a CancellationToken,
}

impl Driver<'_> {
    async fn drive(&self, n: usize) -> anyhow::Result<Measured> {
        let Driver {
            runtime,
            tracker,
            saga,
            concurrency,
            expected,
            abort,
        } = *self;
        tracker.inner.lock().expect("tracker lock").finished.clear();
        let begin = Instant::now();
        let mut in_flight = 0usize;
        let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for i in 0..n {
            if in_flight == concurrency {
                tokio::select! {
                    permit = tracker.done.acquire() => permit?.forget(),
                    _ = abort.cancelled() => bail!("a participant process exited"),
                }
                in_flight -= 1;
            }
            // Starts run concurrently, as requests from many clients would.
            let (runtime, tracker, saga, failed) = (
                runtime.clone(),
                tracker.clone(),
                saga.to_owned(),
                failed.clone(),
            );
            tokio::spawn(async move {
                let at = Instant::now();
                let input = json!({"n": i}).as_object().cloned().unwrap_or_default();
                match runtime.start(&saga, input, None).await {
                    Ok(started) => tracker.started(started.saga_id, at),
                    Err(error) => {
                        tracing::error!(%error, "cannot start a saga");
                        failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracker.done.add_permits(1);
                    }
                }
            });
            in_flight += 1;
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while in_flight > 0 {
            let wait = deadline.saturating_duration_since(Instant::now());
            tokio::select! {
                permit = tokio::time::timeout(wait, tracker.done.acquire()) => match permit {
                    Ok(permit) => permit?.forget(),
                    Err(_) => break,
                },
                _ = abort.cancelled() => bail!("a participant process exited"),
            }
            in_flight -= 1;
        }
        let elapsed = begin.elapsed();
        let finished = std::mem::take(&mut tracker.inner.lock().expect("tracker lock").finished);
        Ok(Measured {
            elapsed,
            latencies: finished
                .iter()
                .filter(|(_, end)| *end == expected)
                .map(|(d, _)| *d)
                .collect(),
            ends: finished.iter().map(|(_, end)| *end).collect(),
            unfinished: in_flight + failed.load(std::sync::atomic::Ordering::Relaxed),
        })
    }
}

impl Driver<'_> {
    /// Starts `n` sagas, many at once, without waiting for their ends.
    async fn start_only(&self, n: usize) -> anyhow::Result<()> {
        let starting = Arc::new(Semaphore::new(self.concurrency * 4));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let permit = starting.clone().acquire_owned().await?;
            let (runtime, tracker, saga) = (
                self.runtime.clone(),
                self.tracker.clone(),
                self.saga.to_owned(),
            );
            tasks.spawn(async move {
                let at = Instant::now();
                let input = json!({"n": i}).as_object().cloned().unwrap_or_default();
                let started = runtime.start(&saga, input, None).await;
                drop(permit);
                started.map(|started| tracker.started(started.saga_id, at))
            });
            while let Some(done) = tasks.try_join_next() {
                done??;
            }
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        Ok(())
    }

    /// Waits for `n` ends (or 10 minutes); returns how many did not come.
    async fn wait(&self, n: usize) -> anyhow::Result<usize> {
        let deadline = Instant::now() + Duration::from_secs(600);
        for waiting in (1..=n).rev() {
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::select! {
                permit = tokio::time::timeout(left, self.tracker.done.acquire()) => match permit {
                    Ok(permit) => permit?.forget(),
                    Err(_) => return Ok(waiting),
                },
                _ = self.abort.cancelled() => bail!("a participant process exited"),
            }
        }
        Ok(0)
    }
}

struct RawResult {
    count: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

/// Request and reply through two durable queues, persistent and confirmed both ways, the
/// responder acking each request after its reply is confirmed: the broker cost of one step.
/// With `pack` above 1 a message carries that many requests (its reply as many replies), and
/// `concurrency / pack` messages are in flight; the count and the latencies are per element.
async fn raw_round_trips(
    url: &str,
    tls: &saga_amqp::Tls,
    queue_type: saga_amqp::QueueType,
    count: usize,
    concurrency: usize,
    pack: usize,
    prefetch: u16,
) -> anyhow::Result<RawResult> {
    // Named by type: a queue cannot change type once declared.
    let (requests_queue, replies_queue) = match queue_type {
        saga_amqp::QueueType::Quorum => (
            "saga-bench.raw.requests.quorum",
            "saga-bench.raw.replies.quorum",
        ),
        saga_amqp::QueueType::Classic => (
            "saga-bench.raw.requests.classic",
            "saga-bench.raw.replies.classic",
        ),
    };
    let mut arguments = FieldTable::default();
    if queue_type == saga_amqp::QueueType::Quorum {
        arguments.insert(
            "x-queue-type".into(),
            saga_amqp::lapin::types::AMQPValue::LongString("quorum".into()),
        );
    }
    let driver = saga_amqp::connect_with_tls(url, "saga-bench raw driver", tls).await?;
    let responder = saga_amqp::connect_with_tls(url, "saga-bench raw responder", tls).await?;
    let setup = driver.create_channel().await?;
    for queue in [requests_queue, replies_queue] {
        setup
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                arguments.clone(),
            )
            .await?;
        setup.queue_purge(queue.into(), Default::default()).await?;
    }

    // Responder: consume a request, publish the reply (confirmed), ack the request.
    let responder_publisher = Publisher::open(&responder).await?;
    let (request_channel, mut requests) =
        saga_amqp::open_consumer(&responder, requests_queue, "raw responder", prefetch).await?;
    let respond = tokio::spawn(async move {
        while let Some(Ok(delivery)) = requests.next().await {
            let publisher = responder_publisher.clone();
            tokio::spawn(async move {
                let id = delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .and_then(|m| Uuid::parse_str(m.as_str()).ok())
                    .unwrap_or_default();
                let elements = elements(&delivery.data);
                if publisher
                    .publish(&message(replies_queue, id, elements))
                    .await
                    .is_ok()
                {
                    saga_amqp::ack(&delivery).await.ok();
                }
            });
        }
    });

    // Driver: replies are matched to their waiting request by message id.
    let waiting: Arc<Mutex<HashMap<Uuid, oneshot::Sender<()>>>> = Arc::default();
    let (reply_channel, mut replies) = saga_amqp::open_consumer(
        &driver,
        replies_queue,
        "raw driver",
        prefetch.max(concurrency as u16),
    )
    .await?;
    let w = waiting.clone();
    let collect = tokio::spawn(async move {
        while let Some(Ok(delivery)) = replies.next().await {
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .and_then(|m| Uuid::parse_str(m.as_str()).ok())
                .unwrap_or_default();
            // Decoded as the orchestrator decodes its replies, so a pack costs what it would.
            elements(&delivery.data);
            saga_amqp::ack(&delivery).await.ok();
            if let Some(tx) = w.lock().expect("waiting lock").remove(&id) {
                tx.send(()).ok();
            }
        }
    });
    let publisher = Publisher::open(&driver).await?;
    let messages_in_flight = concurrency.div_ceil(pack);
    let per_worker = count.div_ceil(messages_in_flight * pack);
    let begin = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..messages_in_flight {
        let publisher = publisher.clone();
        let waiting = waiting.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_worker * pack);
            for _ in 0..per_worker {
                let id = Uuid::new_v4();
                let (tx, rx) = oneshot::channel();
                waiting.lock().expect("waiting lock").insert(id, tx);
                let at = Instant::now();
                publisher
                    .publish(&message(requests_queue, id, pack))
                    .await?;
                tokio::time::timeout(Duration::from_secs(30), rx).await??;
                latencies.extend(std::iter::repeat_n(at.elapsed(), pack));
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::with_capacity(per_worker * messages_in_flight * pack);
    for worker in workers {
        latencies.extend(worker.await??);
    }
    let elapsed = begin.elapsed();
    respond.abort();
    collect.abort();
    // Consumers gone before their queues: deleting a queue under a consumer cancels it from
    // the broker's side, which lapin reports as a connection error.
    for channel in [&request_channel, &reply_channel] {
        channel.close(200, "done".into()).await.ok();
    }
    for queue in [requests_queue, replies_queue] {
        setup
            .queue_delete(queue.into(), Default::default())
            .await
            .ok();
    }
    driver.close(200, "done".into()).await.ok();
    responder.close(200, "done".into()).await.ok();
    Ok(RawResult {
        count: latencies.len(),
        elapsed,
        latencies,
    })
}

/// How many elements a raw message carries. A pack is read as a receiver would, each element
/// decoded; a single element is not, as before packs.
fn elements(body: &[u8]) -> usize {
    if body.first() == Some(&b'[') {
        serde_json::from_slice::<Vec<serde_json::Value>>(body).map_or(1, |v| v.len())
    } else {
        1
    }
}

/// A message of `elements` elements, each about the size of a step command.
fn message(queue: &str, id: Uuid, elements: usize) -> OutgoingMessage {
    let element = json!({"payload": "x".repeat(300)});
    OutgoingMessage {
        exchange: String::new(),
        routing_key: queue.into(),
        message_id: id,
        correlation_id: Some(id),
        message_type: "saga-bench.raw".into(),
        reply_to: None,
        headers: Vec::new(),
        body: if elements == 1 {
            element.to_string()
        } else {
            serde_json::Value::Array(vec![element; elements]).to_string()
        },
        mandatory: true,
        discard_after: None,
    }
}

/// The orchestrator's and each participant's database (URL, optional schema).
struct Databases {
    kind: String,
    orchestrator: String,
    participants: Vec<(String, Option<String>)>,
    /// Where the lone commits of the floor go: apart from every service's tables.
    commits: (String, Option<String>),
    cleanup: Cleanup,
}

enum Cleanup {
    Directory(std::path::PathBuf),
    Postgres { admin_url: String, database: String },
}

impl Databases {
    async fn create(url: &str, steps: usize) -> anyhow::Result<Self> {
        if url.is_empty() || url.starts_with("sqlite:") {
            let dir = std::env::temp_dir().join(format!("saga-bench-{}", Uuid::new_v4().simple()));
            std::fs::create_dir_all(&dir)?;
            let file = |name: &str| {
                format!(
                    "sqlite://{}?mode=rwc",
                    dir.join(format!("{name}.db")).display()
                )
            };
            return Ok(Databases {
                kind: "sqlite (one file per service)".into(),
                orchestrator: file("orchestrator"),
                participants: (0..steps).map(|i| (file(&format!("p{i}")), None)).collect(),
                commits: (file("commits"), None),
                cleanup: Cleanup::Directory(dir),
            });
        }
        let database = format!("saga_bench_{}", Uuid::new_v4().simple());
        let admin = Database::connect(url)
            .await
            .context("connect to PostgreSQL")?;
        admin
            .execute_unprepared(&format!("CREATE DATABASE {database}"))
            .await?;
        admin.close().await.ok();
        let (base, _) = url
            .rsplit_once('/')
            .context("a PostgreSQL URL ends in /DATABASE")?;
        let own = format!("{base}/{database}");
        Ok(Databases {
            kind: "postgresql (schema per participant)".into(),
            orchestrator: own.clone(),
            participants: (0..steps)
                .map(|i| (own.clone(), Some(format!("bench_p{i}"))))
                .collect(),
            commits: (own.clone(), Some("bench_commits".into())),
            cleanup: Cleanup::Postgres {
                admin_url: url.to_owned(),
                database,
            },
        })
    }

    async fn drop_all(&self) {
        match &self.cleanup {
            Cleanup::Directory(dir) => {
                std::fs::remove_dir_all(dir).ok();
            }
            Cleanup::Postgres {
                admin_url,
                database,
            } => {
                if let Ok(admin) = Database::connect(admin_url).await {
                    admin
                        .execute_unprepared(&format!(
                            "DROP DATABASE IF EXISTS {database} WITH (FORCE)"
                        ))
                        .await
                        .ok();
                }
            }
        }
    }
}

fn percentile(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_message_carries_as_many_elements_as_asked_and_a_single_one_is_not_a_list() {
        let id = Uuid::new_v4();
        for n in [1, 2, 8] {
            assert_eq!(elements(message("q", id, n).body.as_bytes()), n);
        }
        assert!(message("q", id, 1).body.starts_with('{'));
    }
}
