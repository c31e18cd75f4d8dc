//! Passwords in `AMQP_URL` and `DATABASE_URL` never reach a terminal: not through `--help`
//! (clap would print environment values), not through the error about an unsupported
//! database URL (sea-orm's would echo it whole), and not through a running system's logs at
//! every level, its API's answers or its metrics; neither does an API token.
//!
//! The binaries must be built (`cargo test --workspace` builds them).

use std::process::{Command, Output};

use saga_participant::sea_orm::ConnectionTrait;
use saga_system::bins;
use saga_system::env::{Management, TestEnv};
use saga_system::system::{
    Backend, ORCHESTRATOR, Options, PARTICIPANTS, System, default_config_path,
};
use serde_json::json;
use uuid::Uuid;

const SECRET: &str = "S3CRET-pw";

fn run(binary: &str, args: &[&str], env: &[(&str, String)]) -> Output {
    let path = bins::find(binary).unwrap_or_else(|e| panic!("{e:#}"));
    let mut command = Command::new(path);
    command.args(args).env_remove("RUST_LOG");
    for (key, value) in env {
        command.env(key, value);
    }
    command
        .output()
        .unwrap_or_else(|e| panic!("running {binary}: {e}"))
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn secret_urls() -> Vec<(&'static str, String)> {
    vec![
        ("AMQP_URL", format!("amqp://app:{SECRET}@127.0.0.1:1/%2f")),
        (
            "DATABASE_URL",
            format!("postgres://app:{SECRET}@127.0.0.1:1/db"),
        ),
    ]
}

#[test]
fn help_names_the_url_variables_without_their_values() {
    for (binary, args) in [
        ("orchestrator", &["run", "--help"][..]),
        ("payments", &["--help"][..]),
    ] {
        let output = run(binary, args, &secret_urls());
        let help = text(&output);
        assert!(output.status.success(), "{binary} --help failed:\n{help}");
        assert!(
            help.contains("AMQP_URL") && help.contains("DATABASE_URL"),
            "{binary} --help should still name the variables:\n{help}"
        );
        assert!(!help.contains(SECRET), "{binary} --help leaks:\n{help}");
    }
}

#[test]
fn an_unsupported_database_url_is_refused_without_its_password() {
    let config = default_config_path();
    let config = config.to_str().expect("a UTF-8 path");
    let env = [(
        "DATABASE_URL",
        format!("mysql://root:{SECRET}@127.0.0.1:3306/app"),
    )];
    for (binary, args) in [
        ("orchestrator", &["run", "--config", config][..]),
        ("payments", &[][..]),
    ] {
        let output = run(binary, args, &env);
        let said = text(&output);
        assert!(!output.status.success(), "{binary} should refuse:\n{said}");
        assert!(
            said.contains("unsupported database URL") && said.contains("mysql://root:***@"),
            "{binary} should say which URL it refuses, redacted:\n{said}"
        );
        assert!(!said.contains(SECRET), "{binary} leaks:\n{said}");
    }
}

/// Every level of every crate, the chatty ones included (they are muted unless named).
const EVERYTHING: &str = "trace,sqlx=trace,sea_orm=trace,lapin=trace,amq_protocol=trace";
const TOKEN: &str = "S3CRET-t0ken-S3CRET-t0ken-S3CRET-t0ken";

/// A RabbitMQ user and a PostgreSQL role whose passwords are [`SECRET`], made for one test and
/// removed when dropped (even on a panic).
struct SecretAccounts {
    name: String,
    management: Management,
    postgres_admin: String,
}

impl SecretAccounts {
    async fn create(env: &TestEnv) -> SecretAccounts {
        let name = format!("secrets_{}", &Uuid::new_v4().simple().to_string()[..12]);
        let management = env.management().expect("the management API").clone();
        // An administrator, so that the system can make its vhost with these credentials.
        let created = reqwest::Client::new()
            .put(format!("{}/api/users/{name}", management.url))
            .basic_auth(&management.user, Some(&management.password))
            .json(&json!({"password": SECRET, "tags": "administrator"}))
            .send()
            .await
            .expect("the management API answers");
        assert!(
            created.status().is_success(),
            "creating a RabbitMQ user: {created:?}"
        );
        // The servers here trust local connections, so any password would do: what matters is
        // that the URLs carry one, and that it never shows.
        let postgres_admin = env.postgres_url().expect("PostgreSQL").to_owned();
        let admin = saga_participant::connect_database(&postgres_admin, None)
            .await
            .expect("connect to PostgreSQL");
        admin
            .execute_unprepared(&format!(
                "CREATE ROLE {name} LOGIN CREATEDB PASSWORD '{SECRET}'"
            ))
            .await
            .expect("create a PostgreSQL role");
        admin.close().await.ok();
        SecretAccounts {
            name,
            management,
            postgres_admin,
        }
    }

    /// The environment's URLs with this user, this password.
    fn env(&self, env: &TestEnv) -> TestEnv {
        let with_user = |url: &str| {
            let (scheme, rest) = url.split_once("://").expect("a URL");
            let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
            format!("{scheme}://{}:{SECRET}@{host}", self.name)
        };
        let mut env = TestEnv::from_urls(
            &with_user(&env.amqp_url),
            Some(with_user(env.postgres_url().expect("PostgreSQL"))),
        )
        .expect("the environment");
        // The management API with the new user too (RABBITMQ_MANAGEMENT_URL may name another).
        if let Some(management) = env.management.as_mut() {
            management.url = self.management.url.clone();
            management.user = self.name.clone();
            management.password = SECRET.to_owned();
        }
        env
    }
}

impl Drop for SecretAccounts {
    fn drop(&mut self) {
        let (name, management, admin_url) = (
            self.name.clone(),
            self.management.clone(),
            self.postgres_admin.clone(),
        );
        // Drop runs inside the test's runtime: use a runtime of its own on a thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let _ = reqwest::Client::new()
                    .delete(format!("{}/api/users/{name}", management.url))
                    .basic_auth(&management.user, Some(&management.password))
                    .send()
                    .await;
                if let Ok(admin) = saga_participant::connect_database(&admin_url, None).await {
                    let _ = admin
                        .execute_unprepared(&format!("DROP ROLE IF EXISTS {name}"))
                        .await;
                    admin.close().await.ok();
                }
            });
        })
        .join();
    }
}

/// The whole system on URLs with a password and an API token, logging everything: neither
/// shows in any log, in any answer of the API (errors included), or in `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_system_never_shows_a_password_or_a_token() {
    let accounts = SecretAccounts::create(TestEnv::get()).await;
    let env = accounts.env(TestEnv::get());
    let mut options = Options::new(Backend::Postgres).label("secrets").env(
        ORCHESTRATOR,
        "API_TOKENS",
        format!("ops operate {TOKEN}"),
    );
    for service in std::iter::once(ORCHESTRATOR).chain(PARTICIPANTS) {
        options = options.env(service, "RUST_LOG", EVERYTHING);
    }
    let mut system = System::launch(&env, options)
        .await
        .unwrap_or_else(|e| panic!("the system did not start: {e:#}"));

    let client = reqwest::Client::new();
    let mut answers = Vec::new();
    let mut call = async |method: reqwest::Method, path: &str, token: Option<&str>, body: &str| {
        let mut request = client
            .request(method, format!("{}{path}", system.http_url()))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response = request.send().await.expect("the API answers");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        answers.push(format!("{path}: {status} {text}"));
        (status, text)
    };
    let input =
        r#"{"customer": "ada", "amount": 4999, "items": [{"sku": "TEA-01", "quantity": 2}]}"#;
    let (status, started) = call(
        reqwest::Method::POST,
        "/sagas/order-checkout",
        Some(TOKEN),
        input,
    )
    .await;
    assert_eq!(status, 202, "{started}");
    let id = serde_json::from_str::<serde_json::Value>(&started).unwrap()["saga_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let (_, saga) = call(
            reqwest::Method::GET,
            &format!("/sagas/{id}"),
            Some(TOKEN),
            "",
        )
        .await;
        if saga.contains(r#""status":"completed""#) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not completed: {saga}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    for (method, path, token, body) in [
        (reqwest::Method::GET, "/sagas", Some(TOKEN), ""),
        (reqwest::Method::GET, "/metrics", Some(TOKEN), ""),
        (reqwest::Method::GET, "/readyz", None, ""),
        (reqwest::Method::GET, "/set-aside", Some(TOKEN), ""),
        (reqwest::Method::GET, "/sagas", None, ""),
        (
            reqwest::Method::GET,
            "/sagas",
            Some("S3CRET-not-a-token"),
            "",
        ),
        (reqwest::Method::GET, "/sagas/not-an-id", Some(TOKEN), ""),
        (
            reqwest::Method::POST,
            "/sagas/order-checkout",
            Some(TOKEN),
            "{\"customer\": 1}",
        ),
        (
            reqwest::Method::POST,
            "/sagas/no-such-saga",
            Some(TOKEN),
            "{}",
        ),
        (
            reqwest::Method::POST,
            &format!("/sagas/{id}/abort"),
            Some(TOKEN),
            "",
        ),
        (reqwest::Method::GET, "/no-such-route", Some(TOKEN), ""),
    ] {
        call(method, path, token, body).await;
    }
    system.stop_all().await;

    let answers = answers.join("\n");
    assert!(
        answers.contains("saga_step_duration") || answers.contains("saga_"),
        "{answers}"
    );
    assert!(
        !answers.contains(SECRET),
        "an answer of the API leaks:\n{answers}"
    );
    for service in std::iter::once(ORCHESTRATOR).chain(PARTICIPANTS) {
        let log = std::fs::read_to_string(system.log_path(service)).expect("the log");
        assert!(log.contains("TRACE"), "{service} should log at every level");
        for line in log.lines() {
            assert!(
                !line.contains(SECRET) && !line.contains(TOKEN),
                "the {service} log leaks: {line}"
            );
        }
    }
    drop(system);
    drop(accounts);
}
