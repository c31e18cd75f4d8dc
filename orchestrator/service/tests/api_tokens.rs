//! `orchestrator run` and its API tokens, as a user runs it: the refusal to serve a network
//! address unauthenticated, errors in a tokens file, and tokens kept out of the log even at
//! every level of every crate. No broker is needed: the HTTP API serves while the broker is retried.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_orchestrator");
const OPERATOR: &str = "s3cret-0perat0r-t0ken-s3cret-0perat0r";
const READER: &str = "s3cret-reader-t0ken-s3cret-reader-t0ken";
/// Every level of every crate, the chatty ones included (they are muted unless named).
const EVERYTHING: &str = "trace,sqlx=trace,sea_orm=trace,lapin=trace,amq_protocol=trace";

fn sagas_yaml() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sagas.yaml")
}

/// `orchestrator run` on an in-memory database and a broker that never answers, with none of
/// the caller's own settings.
fn orchestrator(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(BIN);
    command
        .arg("run")
        .arg("--config")
        .arg(sagas_yaml())
        .args(args);
    for var in [
        "API_TOKENS",
        "TOKENS_FILE",
        "INSECURE_NO_AUTH",
        "METRICS_OPEN",
        "HTTP_ADDR",
        "RUST_LOG",
        "LOG_FORMAT",
    ] {
        command.env_remove(var);
    }
    command
        .env("DATABASE_URL", "sqlite::memory:")
        .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f");
    for (key, value) in env {
        command.env(key, value);
    }
    command
}

/// Runs until it exits on its own (within a minute).
fn output(mut command: Command) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the orchestrator binary runs");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().ok();
            panic!("the orchestrator did not exit within a minute");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn said(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running orchestrator, killed on drop; its stderr is collected by [`Running::stop`].
struct Running {
    child: Child,
    url: String,
}

impl Running {
    async fn start(mut command: Command, port: u16) -> Running {
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the orchestrator binary runs");
        let mut running = Running {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = reqwest::get(format!("{}/healthz", running.url)).await
                && r.status() == 200
            {
                return running;
            }
            if let Some(status) = running.child.try_wait().unwrap() {
                panic!("the orchestrator exited ({status}): {}", running.stop());
            }
            assert!(Instant::now() < deadline, "no /healthz within a minute");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops it; what it logged.
    fn stop(&mut self) -> String {
        self.child.kill().ok();
        self.child.wait().ok();
        let mut log = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            stderr.read_to_string(&mut log).ok();
        }
        log
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

#[test]
fn a_network_address_without_tokens_is_refused_unless_insecure_is_explicit() {
    let refused = output(orchestrator(&["--http", "0.0.0.0:0"], &[]));
    let text = said(&refused);
    assert!(!refused.status.success(), "{text}");
    assert!(
        text.contains("no API tokens are configured") && text.contains("--insecure-no-auth"),
        "{text}"
    );
}

#[tokio::test]
async fn insecure_no_auth_serves_a_network_address_with_a_warning() {
    let port = free_port();
    let address = format!("0.0.0.0:{port}");
    let command = orchestrator(
        &["--http", &address],
        &[("INSECURE_NO_AUTH", "true"), ("RUST_LOG", "warn")],
    );
    let mut running = Running::start(command, port).await;
    let sagas = reqwest::get(format!("{}/sagas", running.url))
        .await
        .unwrap();
    assert_eq!(sagas.status(), 200);
    let log = running.stop();
    assert!(
        log.contains("unauthenticated on a network address"),
        "{log}"
    );
}

#[test]
fn a_bad_tokens_file_is_refused_naming_the_line_not_the_token() {
    let path = std::env::temp_dir().join(format!("api-tokens-{}", std::process::id()));
    std::fs::write(&path, format!("ops operate {OPERATOR}\nci {READER} read\n")).unwrap();
    let refused = output(orchestrator(
        &["--tokens-file", path.to_str().unwrap()],
        &[],
    ));
    std::fs::remove_file(&path).ok();
    let text = said(&refused);
    assert!(!refused.status.success(), "{text}");
    assert!(text.contains("line 2") && text.contains("role"), "{text}");
    assert!(!text.contains(READER) && !text.contains(OPERATOR), "{text}");
}

#[tokio::test]
async fn tokens_are_checked_and_never_logged_even_at_trace() {
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let tokens = format!("ops operate {OPERATOR}\ndashboards read {READER}");
    let command = orchestrator(
        &["--http", &address],
        &[("API_TOKENS", &tokens), ("RUST_LOG", EVERYTHING)],
    );
    let mut running = Running::start(command, port).await;
    let client = reqwest::Client::new();
    let send = |method: reqwest::Method, path: &str, token: &str| {
        client
            .request(method, format!("{}{path}", running.url))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(r#"{"customer": "ada", "amount": 1, "items": [{"sku": "TEA", "quantity": 1}]}"#)
            .send()
    };
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(
        status(send(reqwest::Method::GET, "/sagas", READER).await.unwrap()),
        200
    );
    assert_eq!(
        status(
            send(reqwest::Method::GET, "/sagas", "x-wrong-token-x")
                .await
                .unwrap()
        ),
        401
    );
    assert_eq!(
        status(
            send(reqwest::Method::POST, "/sagas/order-checkout", READER)
                .await
                .unwrap()
        ),
        403
    );
    let started = send(reqwest::Method::POST, "/sagas/order-checkout", OPERATOR)
        .await
        .unwrap();
    assert_eq!(started.status(), 202);
    let log = running.stop();
    assert!(log.contains("TRACE"), "every level should be logged: {log}");
    assert!(log.contains("the HTTP API requires bearer tokens"), "{log}");
    for secret in [OPERATOR, READER, "x-wrong-token-x"] {
        assert!(!log.contains(secret), "the log holds a token:\n{log}");
    }
}
