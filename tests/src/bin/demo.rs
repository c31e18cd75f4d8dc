//! The demo: the orchestrator and the four example participants as processes on a local
//! RabbitMQ, SQLite files in a fresh directory, and a batch of `order-checkout` sagas over HTTP,
//! some of which complete and some of which are compensated.
//!
//! ```text
//! cargo build --release --bins && cargo run --release --bin demo
//! ```
//!
//! `AMQP_URL` points it at another broker (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//! It exits 0 only when every saga reached the outcome it was meant to.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use saga_system::checkout::{self, order};
use saga_system::env::{TestEnv, amqp_parts};
use saga_system::{Backend, Options, System, VhostChoice, is_settled};
use serde_json::json;

use saga_amqp::DEFAULT_AMQP_URL;
const DEMO_VHOST: &str = "saga-demo";
const PAYMENT_LIMIT: i64 = 100_000;
const INITIAL_STOCK: i64 = 100;
const SHIPPING_FAILURE_RATE: f64 = 0.3;
const SETTLE_TIMEOUT: Duration = Duration::from_secs(90);
/// The orchestrator's API takes this bearer token (role `operate`); the demo's calls send it.
const DEMO_TOKEN: &str = "demo-operator-token-0123456789abcdef";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Completed,
    Declined,
    ShortStock,
}

impl Expect {
    fn status(self) -> &'static str {
        match self {
            Expect::Completed => "completed",
            Expect::Declined | Expect::ShortStock => "compensated",
        }
    }

    /// A word the compensation reason must contain.
    fn reason(self) -> Option<&'static str> {
        match self {
            Expect::Completed => None,
            Expect::Declined => Some("declined"),
            Expect::ShortStock => Some("stock"),
        }
    }
}

struct Planned {
    customer: &'static str,
    amount: i64,
    items: &'static [(&'static str, i64)],
    expect: Expect,
}

const BATCH: [Planned; 9] = [
    Planned {
        customer: "alice",
        amount: 4_250,
        items: &[("book", 2)],
        expect: Expect::Completed,
    },
    Planned {
        customer: "bob",
        amount: 12_999,
        items: &[("mug", 1), ("book", 1)],
        expect: Expect::Completed,
    },
    Planned {
        customer: "carol",
        amount: 250_000,
        items: &[("laptop", 1)],
        expect: Expect::Declined,
    },
    Planned {
        customer: "dave",
        amount: 3_000,
        items: &[("lamp", 150)],
        expect: Expect::ShortStock,
    },
    Planned {
        customer: "erin",
        amount: 899,
        items: &[("pen", 10)],
        expect: Expect::Completed,
    },
    Planned {
        customer: "frank",
        amount: 45_000,
        items: &[("chair", 4)],
        expect: Expect::Completed,
    },
    Planned {
        customer: "grace",
        amount: 120_000,
        items: &[("desk", 1)],
        expect: Expect::Declined,
    },
    Planned {
        customer: "heidi",
        amount: 1_500,
        items: &[("mug", 2), ("vase", 101)],
        expect: Expect::ShortStock,
    },
    Planned {
        customer: "ivan",
        amount: 7_800,
        items: &[("kettle", 1)],
        expect: Expect::Completed,
    },
];

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("demo: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The last 8 characters of a saga id: ids are time-ordered (UUIDv7), so the sagas of one run
/// share their first ones.
fn short(id: &str) -> &str {
    &id[id.len().saturating_sub(8)..]
}

async fn run() -> anyhow::Result<bool> {
    let amqp_url = std::env::var("AMQP_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| DEFAULT_AMQP_URL.to_owned());
    saga_system::bins::check_all()?;

    // Is there a broker?
    let probe = tokio::time::timeout(
        Duration::from_secs(5),
        saga_amqp::connect(&amqp_url, "saga-demo-probe"),
    )
    .await;
    match probe {
        Ok(Ok(connection)) => {
            let _ = connection.close(200, "probe".into()).await;
        }
        outcome => {
            let why = match outcome {
                Ok(Err(error)) => std::error::Error::source(&error)
                    .map_or_else(|| error.to_string(), ToString::to_string),
                _ => "no answer within 5s".to_owned(),
            };
            eprintln!(
                "No RabbitMQ broker answered at {} ({why}).",
                saga_amqp::redact_url(&amqp_url)
            );
            eprintln!("Point the demo at one:");
            eprintln!(
                "  - set AMQP_URL, e.g. AMQP_URL=amqp://user:password@host:5672/%2f cargo run --release --bin demo"
            );
            eprintln!("  - or start one here: rabbitmq-server -detached");
            eprintln!("  - or with Docker: docker compose up rabbitmq");
            return Ok(false);
        }
    }

    // A vhost of its own when the management API answers, otherwise the URL's.
    let mut env = TestEnv::from_urls(&amqp_url, None)?;
    let management = env.management.clone().context("a management API")?;
    let vhost = if management.available().await {
        VhostChoice::Named(DEMO_VHOST.into())
    } else {
        env.management = None;
        VhostChoice::FromUrl
    };

    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let dir = std::env::temp_dir().join(format!("saga-demo-{stamp}"));
    let opts = Options {
        vhost,
        keep: true,
        dir: Some(dir.clone()),
        ..Options::new(Backend::Sqlite)
            .label("demo")
            // Every participant here is built on the SDK, which takes packed commands.
            .env(saga_system::ORCHESTRATOR, "PACK_COMMANDS", "all")
            .env("payments", "PAYMENT_LIMIT", PAYMENT_LIMIT)
            .env("inventory", "INITIAL_STOCK", INITIAL_STOCK)
            .env("shipping", "SHIPPING_FAILURE_RATE", SHIPPING_FAILURE_RATE)
            .api_token("demo", DEMO_TOKEN)
    };
    println!("Saga orchestrator demo");
    println!("  broker     {}", saga_amqp::redact_url(&amqp_url));
    println!("  state      SQLite files and logs in {}", dir.display());
    println!("  binaries   {}", saga_system::bins::bin_dir()?.display());
    let mut system = System::launch(&env, opts).await?;
    println!(
        "  running    orchestrator (HTTP API {}, token {DEMO_TOKEN}), orders, inventory, payments (limit {PAYMENT_LIMIT} cents), \
         shipping ({:.0}% of attempts fail, then retried) on vhost {}",
        system.http_url(),
        SHIPPING_FAILURE_RATE * 100.0,
        if env.management.is_some() {
            DEMO_VHOST
        } else {
            "of AMQP_URL"
        },
    );
    println!();

    let result = drive(&system).await;
    let stopped = system.stop_all().await;
    let unclean: Vec<String> = stopped
        .iter()
        .filter(|(_, status)| !status.is_some_and(|s| s.success()))
        .map(|(service, status)| format!("{service} ({status:?})"))
        .collect();
    let ok = result?;
    println!();
    if unclean.is_empty() {
        println!("Stopped the five processes with SIGTERM.");
    } else {
        println!(
            "Stopped the processes; these did not exit cleanly: {}",
            unclean.join(", ")
        );
    }
    hints(&env, &system);
    if ok {
        println!("\nEvery saga reached the outcome it was meant to.");
    } else {
        println!(
            "\nSome sagas did NOT reach the outcome they were meant to (see above and the logs)."
        );
    }
    Ok(ok)
}

/// Runs the batch and prints the outcomes; true when all went as planned.
async fn drive(system: &System) -> anyhow::Result<bool> {
    let mut ok = true;
    let started = Instant::now();
    let mut planned: Vec<(String, &'static str, Expect)> = Vec::new();
    for p in &BATCH {
        let (status, body) = system
            .start_saga(&order(p.customer, p.amount, p.items), None)
            .await;
        anyhow::ensure!(
            status == 202,
            "starting {}'s order: {status} {body}",
            p.customer
        );
        planned.push((
            body["saga_id"].as_str().unwrap_or_default().to_owned(),
            p.customer,
            p.expect,
        ));
    }

    // The same request twice with one Idempotency-Key: one saga.
    let key = format!("demo-judy-{}", uuid::Uuid::new_v4().simple());
    let judy = order("judy", 2_200, &[("book", 1)]);
    let (s1, first) = system.start_saga(&judy, Some(&key)).await;
    let (s2, second) = system.start_saga(&judy, Some(&key)).await;
    let same = s1 == 202
        && s2 == 202
        && first["saga_id"] == second["saga_id"]
        && first["created"] == true
        && second["created"] == false;
    ok &= same;
    planned.push((
        first["saga_id"].as_str().unwrap_or_default().to_owned(),
        "judy",
        Expect::Completed,
    ));

    // An invalid body.
    let (invalid_status, invalid) = system
        .start_saga(
            &json!({"customer": "mallory", "amount": "a lot", "items": []}),
            None,
        )
        .await;
    ok &= invalid_status == 422;

    // Wait for all of them.
    let ids: Vec<String> = planned.iter().map(|(id, _, _)| id.clone()).collect();
    loop {
        let summaries = system.list_all("").await;
        let settled = ids
            .iter()
            .filter(|id| {
                summaries
                    .iter()
                    .any(|s| s["id"] == id.as_str() && is_settled(s))
            })
            .count();
        if settled == ids.len() {
            break;
        }
        if started.elapsed() > SETTLE_TIMEOUT {
            println!(
                "Only {settled} of {} sagas settled within {SETTLE_TIMEOUT:?}.",
                ids.len()
            );
            ok = false;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();

    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut retries = 0;
    for (id, customer, expect) in &planned {
        let saga = system.saga(id).await;
        let status = checkout::status(&saga).to_owned();
        *counts.entry(status.clone()).or_default() += 1;
        retries += checkout::events(&saga, "retry_scheduled").len();
        let reason = saga["compensation_reason"].as_str().unwrap_or_default();
        let met =
            status == expect.status() && expect.reason().is_none_or(|word| reason.contains(word));
        ok &= met;
        let mut detail = String::new();
        if status == "compensated"
            || status == "compensation_failed"
            || status == "completion_failed"
        {
            let undone = checkout::compensated_steps(&saga);
            detail = format!(
                "{reason}; undone: {}",
                if undone.is_empty() {
                    "nothing".to_owned()
                } else {
                    undone.join(", ")
                }
            );
        } else {
            let tries = checkout::step(&saga, "schedule-shipment")["attempts"]
                .as_u64()
                .unwrap_or(0);
            if tries > 1 {
                detail = format!("shipment scheduled on attempt {tries}");
            }
        }
        let mark = if met { "ok " } else { "BAD" };
        let wanted = if met {
            String::new()
        } else {
            format!(" (meant to be {})", expect.status())
        };
        let amount = saga["data"]["amount"].as_i64().unwrap_or(0);
        let items: Vec<String> = saga["data"]["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|item| {
                format!(
                    "{}x{}",
                    item["quantity"],
                    item["sku"].as_str().unwrap_or("?")
                )
            })
            .collect();
        println!(
            "  {mark} {}  {customer:<6} {:>10}  {:<16} {status:<12}{wanted} {detail}",
            short(id),
            format!("${}.{:02}", amount / 100, amount % 100),
            items.join(" ")
        );
    }
    println!();
    let statuses: Vec<String> = [
        "completed",
        "compensated",
        "compensation_failed",
        "completion_failed",
        "compensating",
        "running",
    ]
    .iter()
    .filter_map(|status| counts.get(*status).map(|n| format!("{n} {status}")))
    .collect();
    println!(
        "{} sagas settled in {:.1}s: {}; {retries} {} of a step after a transient failure.",
        planned.len(),
        elapsed.as_secs_f64(),
        statuses.join(", "),
        if retries == 1 { "retry" } else { "retries" }
    );
    println!(
        "Idempotency-Key {key}, sent twice: {} (saga {}, created {} then {}).",
        if same { "one saga" } else { "NOT one saga" },
        short(first["saga_id"].as_str().unwrap_or("?")),
        first["created"],
        second["created"]
    );
    println!(
        "Invalid body {{\"amount\": \"a lot\", \"items\": []}}: HTTP {invalid_status}, {}",
        invalid["error"]
            .as_str()
            .map_or_else(|| invalid.to_string(), str::to_owned)
    );
    Ok(ok)
}

fn hints(env: &TestEnv, system: &System) {
    println!();
    match &env.management {
        Some(management) => {
            let credentials = amqp_parts(&env.amqp_url).ok();
            let login = match credentials {
                Some(c) if c.user == "guest" && c.password == "guest" => {
                    " (guest/guest)".to_owned()
                }
                Some(c) => format!(" (user {})", c.user),
                None => String::new(),
            };
            println!(
                "Watch it in the management UI at {}{login}: vhost {}, exchanges saga.commands and \
                 saga.events, queues saga.commands.<participant>, saga.replies and their .dlq.",
                management.url,
                system.vhost()
            );
        }
        None => println!(
            "The management API did not answer: enable it with `rabbitmq-plugins enable rabbitmq_management` \
             to watch queues at http://127.0.0.1:15672 (guest/guest)."
        ),
    }
    let bin = saga_system::bins::bin_dir()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    let db = system.database_url("payments");
    println!(
        "Each service's books: DATABASE_URL='{db}' {bin}/payments --report (likewise orders, inventory, shipping)."
    );
    println!(
        "Logs of the five processes: {}/*.log",
        system.dir().display()
    );
    println!(
        "Drive it by hand: API_TOKENS='me operate {DEMO_TOKEN}' {bin}/orchestrator run --config orchestrator/sagas.yaml and the four participants, then\n  \
         curl -X POST localhost:8080/sagas/order-checkout -H 'Authorization: Bearer {DEMO_TOKEN}' -H 'Content-Type: application/json' -d '{{\"customer\":\"you\",\"amount\":1000,\"items\":[{{\"sku\":\"book\",\"quantity\":1}}]}}'"
    );
}

#[cfg(test)]
mod tests {
    use super::short;

    #[test]
    fn short_ids_of_sagas_started_together_differ() {
        let (a, b) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        let (a, b) = (a.to_string(), b.to_string());
        assert_eq!(short(&a).len(), 8);
        assert_ne!(short(&a), short(&b), "{a} and {b}");
    }
}
