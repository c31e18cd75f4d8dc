//! `--participants processes`: each no-op participant in an OS process of its own, this binary
//! run again with `--participant-process NAME`. A child stops when its stdin closes, so it
//! cannot outlive the benchmark however that ends; it is also killed when its handle drops.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::process::Command;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{Args, bench_participant, sdk_config};

/// A running participant process.
pub struct Child {
    pub name: String,
    pub pid: Option<u32>,
    watch: JoinHandle<()>,
}

/// Starts participant `name` as a child process with the configuration the in-process mode
/// would give it. Until `shutdown`, its exit is an error that cancels `abort`; at `shutdown`
/// its stdin is closed, and it is killed if it has not exited within seconds.
pub fn spawn(
    args: &Args,
    name: &str,
    database_url: &str,
    database_schema: Option<&str>,
    fails: bool,
    shutdown: &CancellationToken,
    abort: &CancellationToken,
) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("cannot find this executable to run it again")?;
    let mut command = Command::new(exe);
    command
        .arg("--participant-process")
        .arg(name)
        .arg("--queue-type")
        .arg(args.queue_type.as_str())
        .arg("--participant-prefetch")
        .arg(args.participant_prefetch.to_string())
        .arg("--runtime-threads")
        .arg(args.runtime_threads.to_string())
        // URLs by environment: they may hold passwords, which argv shows to every user.
        .env("AMQP_URL", &args.amqp_url)
        .env("SAGA_BENCH_PARTICIPANT_DATABASE_URL", database_url)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    if let Some(transactions) = args.participant_transactions {
        command
            .arg("--participant-transactions")
            .arg(transactions.to_string());
    }
    if let Some(schema) = database_schema {
        command.arg("--participant-database-schema").arg(schema);
    }
    if let Some(ca) = &args.amqp_ca_file {
        command.arg("--amqp-ca-file").arg(ca);
    }
    if fails {
        command.arg("--participant-fails");
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start participant process {name}"))?;
    let pid = child.id();
    let stdin = child.stdin.take();
    let (participant, shutdown, abort) = (name.to_owned(), shutdown.clone(), abort.clone());
    let watch = tokio::spawn(async move {
        let exited = tokio::select! {
            status = child.wait() => Some(status),
            _ = shutdown.cancelled() => None,
        };
        if let Some(status) = exited {
            tracing::error!(participant, ?status, "participant process exited early");
            abort.cancel();
            return;
        }
        drop(stdin);
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_err()
        {
            tracing::warn!(participant, "participant process did not stop; killing it");
            child.kill().await.ok();
        }
    });
    Ok(Child {
        name: name.to_owned(),
        pid,
        watch,
    })
}

/// Waits until every child has exited (the shutdown token must be cancelled).
pub async fn stop(children: Vec<Child>) {
    for child in children {
        child.watch.await.ok();
    }
}

/// The child's side: run one participant until stdin closes or a signal arrives.
pub async fn run_child(args: &Args, name: &str) -> anyhow::Result<()> {
    let url = args
        .participant_database_url
        .as_deref()
        .context("SAGA_BENCH_PARTICIPANT_DATABASE_URL is not set")?;
    let sdk = sdk_config(args, name, url, args.participant_database_schema.clone());
    let shutdown = saga_participant::shutdown_on_signal();
    let stop = shutdown.clone();
    // A blocking read on a thread of its own: it returns when the parent closes its end or
    // exits, however it exits.
    std::thread::spawn(move || {
        std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink()).ok();
        stop.cancel();
    });
    bench_participant(name, args.participant_fails)
        .run(sdk, shutdown)
        .await
        .with_context(|| format!("participant {name}"))
}
