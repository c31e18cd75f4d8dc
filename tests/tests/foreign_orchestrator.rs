//! An orchestrator with ANOTHER database on the same vhost would take replies and starts meant
//! for this one: both notice it through their heartbeats, say so in their log, and fail
//! `/readyz` until it is gone.

use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use saga_system::system::free_port;
use saga_system::{Backend, Options, System, bins, pretty};

/// A process killed when dropped.
struct Intruder(Child);

impl Drop for Intruder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_with_another_database_on_the_vhost_is_reported() {
    let system = System::start(
        Options::new(Backend::Sqlite)
            .label("foreign")
            .participants(&[]),
    )
    .await;
    let (status, _) = system.get("/readyz").await;
    assert_eq!(status, 200, "ready before the intruder comes");

    let port = free_port().unwrap();
    let log = system.dir().join("intruder.log");
    let intruder = Command::new(bins::find("orchestrator").unwrap())
        .arg("run")
        .arg("--config")
        .arg(system.config_path())
        .env("AMQP_URL", system.amqp_url())
        .env(
            "DATABASE_URL",
            format!("sqlite://{}/intruder.db?mode=rwc", system.dir().display()),
        )
        .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("CONNECTION_NAME", "intruder")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let intruder = Intruder(intruder);

    let body = wait_for_readyz(&system, Duration::from_secs(90), |status, body| {
        status == 503
            && body["foreign_orchestrators"]
                .as_array()
                .is_some_and(|names| names.iter().any(|n| n == "intruder"))
    })
    .await;
    assert_eq!(body["database"], true, "{}", pretty(&body));
    assert_eq!(body["broker"], true, "{}", pretty(&body));
    let own_log = std::fs::read_to_string(system.log_path("orchestrator")).unwrap();
    assert!(
        own_log.contains("another orchestrator with a different database")
            && own_log.contains("intruder"),
        "the orchestrator says so in its log"
    );
    // The intruder hears the next heartbeat (one every 5 s).
    let started = Instant::now();
    loop {
        let theirs = std::fs::read_to_string(&log).unwrap_or_default();
        if theirs.contains("another orchestrator with a different database") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the intruder says so in its log too:\n{theirs}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    drop(intruder);
    wait_for_readyz(&system, Duration::from_secs(120), |status, _| status == 200).await;
}

async fn wait_for_readyz(
    system: &System,
    timeout: Duration,
    done: impl Fn(u16, &serde_json::Value) -> bool,
) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let (status, body) = system.get("/readyz").await;
        if done(status, &body) {
            return body;
        }
        assert!(
            started.elapsed() < timeout,
            "/readyz did not change as expected within {timeout:?}: {status} {}",
            pretty(&body)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
