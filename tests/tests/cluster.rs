//! Production on a real RabbitMQ cluster: `order-checkout` sagas through the real binaries
//! against the three-node cluster of `scripts/rabbit-cluster` (every service gets the three
//! nodes' URLs), while the node leading `saga.replies` is killed with `kill -9`, and later the
//! node leading `saga.commands.payments`; each is restarted and rejoins under load.
//!
//! The checks are the fault suite's (`Run::finish`): every saga completed or compensated; each
//! effect exactly once in the participants' books, or none left; never `compensation_failed`;
//! no dead letters; `/metrics` agrees. The queues must be quorum queues with a member on every
//! node: on a classic queue the test fails before the first kill.
//!
//! `CLUSTER_SAGAS` sagas (default 300), started at 5 a second. The test kills only the
//! cluster's nodes (their `beam.smp`, checked by node name), never another RabbitMQ. The tests
//! here take the cluster one at a time, across processes too (`ClusterEnv::ready` holds a file
//! lock).

use std::io::Write as _;
use std::time::{Duration, Instant};

use saga_amqp::lapin::options::QueueDeclareOptions;
use saga_amqp::lapin::types::FieldTable;
use saga_system::cluster::{ClusterEnv, RestartOnDrop};
use saga_system::faults::{Run, definitions};
use saga_system::{Backend, ORCHESTRATOR, PARTICIPANTS, System, VhostChoice};

/// Sagas started per second: the window is `CLUSTER_SAGAS / PER_SECOND`.
const PER_SECOND: f64 = 5.0;
/// How long a killed node stays down, under load, before it is restarted.
const DOWN: Duration = Duration::from_secs(10);

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A line on the process's stdout at once (the harness captures `println!`).
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_queue_leaders_killed_under_load() {
    let began = Instant::now();
    let cluster = ClusterEnv::ready().await;
    let vhost = cluster
        .fresh_vhost("leaders-killed")
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let mut run = Run::start_in(
        cluster.fault_env(&vhost),
        "cluster-leaders-killed",
        Backend::Postgres,
        definitions("2m"),
        // The environment's URL already names the vhost, on every node.
        |mut o| {
            o.vhost = VhostChoice::FromUrl;
            o
        },
    )
    .await;
    let window = Duration::from_secs_f64(cluster.sagas as f64 / PER_SECOND);
    run.notes.push(format!(
        "three nodes; {} sagas over {:.0} s; PostgreSQL backend",
        cluster.sagas,
        window.as_secs_f64()
    ));
    run.load(window);
    run.until(secs(8)).await;
    kill_leader(&cluster, &mut run, &vhost, "saga.replies").await;
    // Some load with every node up between the two kills.
    tokio::time::sleep(secs(5)).await;
    kill_leader(&cluster, &mut run, &vhost, "saga.commands.payments").await;
    if run.elapsed() > window {
        run.notes.push(format!(
            "the second node came back at {:.1} s, after the last saga started",
            run.elapsed().as_secs_f64()
        ));
    }
    run.notes.push(sessions(&run.system));
    run.finish().await;
    if let Err(e) = cluster.delete_vhost(&vhost).await {
        say(&format!("warning: cannot delete vhost {vhost}: {e:#}"));
    }
    say(&format!(
        "CLUSTER test took {:.1} s",
        began.elapsed().as_secs_f64()
    ));
}

/// Kills the node leading `queue`, waits [`DOWN`] under load, restarts it and waits until it
/// is back among the queue's members; notes when and what.
async fn kill_leader(cluster: &ClusterEnv, run: &mut Run, vhost: &str, queue: &str) {
    let leader = cluster
        .queue_leader(vhost, queue)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let mut restart = RestartOnDrop::new(cluster);
    let at = run.elapsed();
    let killed_at = Instant::now();
    let pid = cluster.kill(leader).unwrap_or_else(|e| panic!("{e:#}"));
    say(&format!(
        "CLUSTER {:.1} s: kill -9 {pid} ({}, leader of {queue})",
        at.as_secs_f64(),
        leader.name
    ));
    let (new_leader, election) = cluster
        .wait_new_leader(vhost, queue, &leader.name, killed_at)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let left = DOWN.saturating_sub(killed_at.elapsed());
    tokio::time::sleep(left).await;
    let back = cluster
        .restart(leader, vhost, queue)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    restart.armed = false;
    let note = format!(
        "{:.1} s: kill -9 of {} (pid {pid}), leader of {queue}; {new_leader} led it {:.1} s \
         later (as a survivor's management API showed it); down {} s, then restarted and back \
         among the queue's online members in {:.1} s",
        at.as_secs_f64(),
        leader.name,
        election.as_secs_f64(),
        DOWN.as_secs(),
        back.as_secs_f64()
    );
    say(&format!("CLUSTER {note}"));
    run.notes.push(note);
}

/// The nodes each service's AMQP sessions connected to, in order, from their logs (a figure:
/// how the services moved when a node died).
fn sessions(system: &System) -> String {
    let mut line = String::from("AMQP sessions (node ports in order):");
    for service in std::iter::once(ORCHESTRATOR).chain(PARTICIPANTS) {
        let log = std::fs::read_to_string(system.log_path(service)).unwrap_or_default();
        let ports: Vec<String> = log
            .lines()
            .filter(|l| l.contains("connected to the broker"))
            .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("broker=")))
            .map(|url| {
                reqwest::Url::parse(url)
                    .ok()
                    .and_then(|u| u.port())
                    .map_or_else(|| "?".to_owned(), |p| p.to_string())
            })
            .collect();
        line.push_str(&format!(" {service}={}", ports.join(">")));
    }
    line
}

/// A classic queue has no leader to kill and dies with its node: the scenario refuses it
/// rather than kill a node and lose its messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_refuses_a_classic_queue() {
    let cluster = ClusterEnv::ready().await;
    let vhost = cluster
        .fresh_vhost("classic")
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let url = saga_system::env::with_vhost(&cluster.nodes[0].amqp_url, &vhost);
    let connection = saga_amqp::connect(&url, "cluster-test-classic")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let channel = connection.create_channel().await.expect("a channel");
    channel
        .queue_declare(
            "classic".into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declaring a classic queue");
    let _ = connection.close(200, "done".into()).await;
    let refused = cluster.queue_leader(&vhost, "classic").await;
    let _ = cluster.delete_vhost(&vhost).await;
    let error = format!("{:#}", refused.expect_err("a classic queue is refused"));
    assert!(error.contains("not a quorum queue"), "{error}");
}
