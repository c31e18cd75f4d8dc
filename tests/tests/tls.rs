//! A whole `order-checkout` saga through the real binaries over TLS only: the broker as
//! `amqps://` (the fault suite node's TLS listener) and PostgreSQL with `sslmode=verify-full`,
//! both certificates signed by the private CA that `scripts/fault-services` makes, given to
//! every binary with `AMQP_CA_FILE` and `sslrootcert`.

use std::time::Duration;

use saga_system::checkout::*;
use saga_system::faults::FaultEnv;
use saga_system::{Backend, Options, PARTICIPANTS, System, pretty};

fn var(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

#[tokio::test]
async fn a_saga_completes_over_amqps_and_postgres_verify_full() {
    let faults = FaultEnv::from_env().expect(saga_system::faults::RUN_FAULT_SERVICES);
    let ca = std::path::Path::new(&var("FAULT_TLS_DIR", "/var/tmp/saga-faults/tls")).join("ca.pem");
    assert!(
        ca.exists(),
        "{} is missing: {}",
        ca.display(),
        saga_system::faults::RUN_FAULT_SERVICES
    );
    let ca = ca.display().to_string();
    let mut env = faults.env.clone();
    env.amqp_url = var("FAULT_AMQPS_URL", "amqps://guest:guest@127.0.0.1:5674/%2f");
    let postgres = env
        .postgres_url
        .take()
        .expect("the fault suite's PostgreSQL");
    env.postgres_url = Some(format!("{postgres}?sslmode=verify-full&sslrootcert={ca}"));

    let mut opts =
        Options::new(Backend::Postgres)
            .label("tls")
            .env("inventory", "INITIAL_STOCK", 10);
    for service in std::iter::once("orchestrator").chain(PARTICIPANTS.iter().copied()) {
        opts = opts.env(service, "AMQP_CA_FILE", &ca);
    }
    let system = System::launch(&env, opts)
        .await
        .unwrap_or_else(|e| panic!("the system did not start over TLS: {e:#}"));
    assert!(system.amqp_url().starts_with("amqps://"));
    assert!(
        system
            .database_url("orchestrator")
            .contains("sslmode=verify-full")
    );

    let sku = unique_sku("tls");
    let id = system
        .start_checkout(&order("alice", 2_500, &[(&sku, 1)]))
        .await;
    let saga = system.wait_settled(&id, Duration::from_secs(60)).await;
    assert_eq!(status(&saga), "completed", "{}", pretty(&saga));
}
