//! A comma-separated list of broker addresses: the first one that answers is used, and a
//! supervised session moves to another when its node goes away.
//!
//! The failover test stops and starts the application of the fault suite's own RabbitMQ node
//! (`scripts/fault-services`: AMQP 5673, node `saga-faults@localhost`), as the fault suite
//! does, and restarts it at the end even when the test fails.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::base_url;
use saga_amqp::{AmqpError, Tls, lapin};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The fault suite's node, as `scripts/fault-services` starts it (`FAULT_*` override it).
fn fault_node() -> String {
    std::env::var("FAULT_RABBIT_NODE").unwrap_or_else(|_| "saga-faults@localhost".into())
}

fn fault_amqp_url() -> String {
    std::env::var("FAULT_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5673/%2f".into())
}

/// `rabbitmqctl [-n node] -q args...`: its output, or its error text.
fn ctl(node: Option<&str>, args: &[&str]) -> Result<String, String> {
    let mut command = Command::new("rabbitmqctl");
    if let Some(node) = node {
        command.args(["-n", node]);
    }
    let output = command
        .arg("-q")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!("rabbitmqctl {args:?} on {node:?}: {}", text.trim()))
    }
}

/// `url` with the vhost `vhost` (which needs no percent-encoding).
fn on_vhost(url: &str, vhost: &str) -> String {
    let authority = url.find("://").map_or(0, |i| i + 3);
    let end = url[authority..]
        .find('/')
        .map_or(url.len(), |i| authority + i);
    format!("{}/{vhost}", &url[..end])
}

/// A closed local port: bound, then released.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A vhost of the test's own on one node (`None`: the local broker), deleted on drop.
struct NodeVhost {
    node: Option<String>,
    name: String,
}

impl NodeVhost {
    fn new(node: Option<&str>, name: &str) -> Self {
        ctl(node, &["add_vhost", name]).unwrap_or_else(|e| panic!("{e}"));
        ctl(
            node,
            &["set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        NodeVhost {
            node: node.map(str::to_owned),
            name: name.to_owned(),
        }
    }

    /// The number of client connections to this vhost (only the test's session uses it).
    fn connections(&self) -> usize {
        let out = ctl(
            self.node.as_deref(),
            &["list_connections", "--formatter", "json", "vhost"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_default();
        rows.iter()
            .filter(|row| row["vhost"] == self.name.as_str())
            .count()
    }

    /// The number of ready messages in `queue` of this vhost, if it exists.
    fn messages(&self, queue: &str) -> Option<u64> {
        let out = ctl(
            self.node.as_deref(),
            &[
                "list_queues",
                "-p",
                &self.name,
                "--formatter",
                "json",
                "name",
                "messages_ready",
            ],
        )
        .ok()?;
        let rows: Vec<serde_json::Value> = serde_json::from_str(&out).ok()?;
        rows.iter()
            .find(|row| row["name"] == queue)
            .and_then(|row| row["messages_ready"].as_u64())
    }
}

impl Drop for NodeVhost {
    fn drop(&mut self) {
        let _ = ctl(self.node.as_deref(), &["delete_vhost", &self.name]);
    }
}

/// The fault node's application, started again when this is dropped (even on a panic), so
/// that the node is left running for the fault suite.
struct RestartAppOnDrop(String);

impl Drop for RestartAppOnDrop {
    fn drop(&mut self) {
        let _ = ctl(Some(&self.0), &["start_app"]);
        let _ = ctl(Some(&self.0), &["await_startup", "--timeout", "60"]);
    }
}

/// Polls `check` every 250 ms until it holds, failing with `what` after `limit`.
async fn until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn a_list_skips_a_dead_address_and_connects_to_the_next() {
    let dead = format!("amqp://guest:guest@127.0.0.1:{}/%2f", closed_port());
    let list = format!("{dead},{}", base_url());

    let conn = tokio::time::timeout(
        Duration::from_secs(60),
        saga_amqp::connect(&list, "saga-amqp list connect test"),
    )
    .await
    .expect("connect returns")
    .expect("the second address answers");
    assert!(conn.status().connected());
    conn.close(200, "done".into()).await.unwrap();

    // The supervisor too: the session runs on the second address.
    let shutdown = CancellationToken::new();
    let (ran_tx, mut ran) = mpsc::unbounded_channel();
    let supervisor = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            saga_amqp::supervise(
                &list,
                Tls::default(),
                "saga-amqp list supervise test",
                shutdown.clone(),
                move |conn: lapin::Connection| {
                    let ran_tx = ran_tx.clone();
                    let shutdown = shutdown.clone();
                    async move {
                        conn.create_channel().await?;
                        ran_tx.send(()).unwrap();
                        shutdown.cancelled().await;
                        Ok(())
                    }
                },
            )
            .await
        }
    });
    tokio::time::timeout(Duration::from_secs(60), ran.recv())
        .await
        .expect("the session started on the second address within 60 s")
        .unwrap();
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), supervisor)
        .await
        .expect("supervise returned after shutdown")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_list_where_nothing_answers_names_every_address_without_its_password() {
    let a = format!("amqp://guest:pw-one@127.0.0.1:{}/%2f", closed_port());
    let b = format!("amqp://guest:pw-two@127.0.0.1:{}/%2f", closed_port());
    let err = saga_amqp::connect(&format!("{a},{b}"), "saga-amqp dead list test")
        .await
        .map(|_| ())
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, AmqpError::NoBrokerAnswered { .. }), "{text}");
    for url in [&a, &b] {
        let shown = saga_amqp::redact_url(url);
        assert!(text.contains(&shown), "{text} names {shown}");
    }
    assert!(
        !text.contains("pw-one") && !text.contains("pw-two"),
        "{text}"
    );
}

#[tokio::test]
async fn a_bad_list_is_refused_at_start_naming_the_entry_without_its_password() {
    let cases = [
        (
            "amqp://guest:secret@a:5672/%2f,,amqp://guest:secret@b:5672/%2f",
            "entry 2",
        ),
        ("amqp://guest:secret@a:5672/%2f,", "entry 2"),
        (
            "amqp://guest:secret@a:5672/%2f,amqp://guest:secret@b:5672/other",
            "amqp://guest:***@b:5672/other",
        ),
        (
            "amqp://guest:secret@a:5672/%2f,http://guest:secret@b",
            "http://guest:***@b",
        ),
    ];
    for (list, named) in cases {
        let err = saga_amqp::supervise(
            list,
            Tls::default(),
            "saga-amqp bad list test",
            CancellationToken::new(),
            |_conn| async { panic!("a bad list never connects") },
        )
        .await
        .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, AmqpError::Invalid(_)), "{list}: {text}");
        assert!(text.contains(named), "{list}: {text} should name {named}");
        assert!(!text.contains("secret"), "{list}: {text}");
        // connect refuses it the same way, before trying anything.
        let err = saga_amqp::connect(list, "x").await.map(|_| ()).unwrap_err();
        assert!(matches!(err, AmqpError::Invalid(_)), "{list}: {err}");
    }
}

/// With two live brokers, a session on [fault node, local broker] runs on the fault node, then
/// moves to the local broker when the fault node's application stops, and works there.
#[tokio::test]
async fn a_supervised_session_fails_over_to_the_next_address_when_its_node_stops() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("saga_amqp=info")
        .with_test_writer()
        .try_init();
    let node = fault_node();
    // What an earlier run cut short may have left: the node running with its app stopped.
    if ctl(Some(&node), &["ping"]).is_ok() {
        let _ = ctl(Some(&node), &["start_app"]);
    }
    ctl(Some(&node), &["await_startup", "--timeout", "60"]).unwrap_or_else(|e| {
        panic!(
            "the fault suite's RabbitMQ node does not answer ({e}): run `scripts/fault-services` \
             as root first, or set FAULT_RABBIT_NODE and FAULT_AMQP_URL"
        )
    });

    let name = format!("saga-amqp-test-failover-{}", uuid::Uuid::new_v4().simple());
    // Dropped last: the vhosts are deleted once the node runs again.
    let local = NodeVhost::new(None, &name);
    let remote = NodeVhost::new(Some(&node), &name);
    let restart = RestartAppOnDrop(node.clone());
    let list = format!(
        "{},{}",
        on_vhost(&fault_amqp_url(), &name),
        on_vhost(&base_url(), &name)
    );

    const CONNECTION: &str = "saga-amqp failover test";
    const QUEUE: &str = "failover.probe";
    let shutdown = CancellationToken::new();
    let (started_tx, mut started) = mpsc::unbounded_channel::<u32>();
    let mut runs = 0u32;
    let supervisor = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            saga_amqp::supervise(
                &list,
                Tls::default(),
                CONNECTION,
                shutdown.clone(),
                move |conn: lapin::Connection| {
                    runs += 1;
                    let run = runs;
                    let started_tx = started_tx.clone();
                    let shutdown = shutdown.clone();
                    async move {
                        // Real work on whichever node: a queue, and a confirmed message in it.
                        let ch = conn.create_channel().await?;
                        ch.queue_declare(
                            QUEUE.into(),
                            lapin::options::QueueDeclareOptions::default(),
                            Default::default(),
                        )
                        .await?;
                        let publisher = saga_amqp::Publisher::open(&conn).await?;
                        let message = saga_amqp::OutgoingMessage {
                            exchange: String::new(),
                            routing_key: QUEUE.into(),
                            message_id: uuid::Uuid::new_v4(),
                            correlation_id: None,
                            message_type: "saga.step_reply".into(),
                            reply_to: None,
                            headers: Vec::new(),
                            body: "{}".into(),
                            mandatory: true,
                            discard_after: None,
                        };
                        publisher.publish(&message).await?;
                        started_tx.send(run).unwrap();
                        shutdown.cancelled().await;
                        Ok(())
                    }
                },
            )
            .await
        }
    });
    let next = async |started: &mut mpsc::UnboundedReceiver<u32>| {
        tokio::time::timeout(Duration::from_secs(90), started.recv())
            .await
            .expect("a session started within 90 s")
            .expect("the supervisor stopped")
    };

    // The first address answers: the session runs on the fault node.
    assert_eq!(next(&mut started).await, 1);
    assert_eq!(remote.messages(QUEUE), Some(1));
    until(
        "the fault node lists the connection",
        Duration::from_secs(30),
        || remote.connections() == 1,
    )
    .await;
    assert_eq!(local.connections(), 0);

    // Its node goes away: the session moves to the second address and works there.
    ctl(Some(&node), &["stop_app"]).unwrap_or_else(|e| panic!("{e}"));
    let run = next(&mut started).await;
    assert!(run >= 2, "{run}");
    until(
        "the local broker has the session's connection and message",
        Duration::from_secs(30),
        || local.connections() == 1 && local.messages(QUEUE) == Some(1),
    )
    .await;

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), supervisor)
        .await
        .expect("supervise returned after shutdown")
        .unwrap()
        .unwrap();
    drop(restart);
    ctl(Some(&node), &["await_startup", "--timeout", "60"]).unwrap_or_else(|e| panic!("{e}"));
}
