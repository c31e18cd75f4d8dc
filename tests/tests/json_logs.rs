//! `LOG_FORMAT=json`: every line the orchestrator and the participants write is a JSON object,
//! and every line about a saga carries the saga id in a structured field, so that a log search
//! for `saga_id = X` finds everything that happened to saga X.

use std::collections::BTreeSet;
use std::time::Duration;

use saga_amqp::HeaderValue;
use saga_schemas::amqp::{
    COMMANDS_EXCHANGE, REPLIES_QUEUE, command_queue, dead_letter_queue, header,
};
use saga_system::checkout::*;
use saga_system::{Backend, ORCHESTRATOR, Options, PARTICIPANTS, System, pretty};
use serde_json::{Map, Value};

/// Fields that make a line about a saga even when it does not name the id.
const SAGA_FIELDS: [&str; 4] = ["saga_id", "saga", "saga_name", "step"];

/// Where tracing-subscriber's JSON writer puts fields: the event's own (flattened at the top
/// level, or under `fields`), the current span (`span`) and the span list (`spans`).
fn field_scopes(line: &Map<String, Value>) -> Vec<&Map<String, Value>> {
    let mut scopes = vec![line];
    for key in ["fields", "span"] {
        if let Some(Value::Object(inner)) = line.get(key) {
            scopes.push(inner);
        }
    }
    if let Some(Value::Array(spans)) = line.get("spans") {
        scopes.extend(spans.iter().filter_map(Value::as_object));
    }
    scopes
}

/// The saga ids a line carries in structured fields.
fn structured_saga_ids(line: &Map<String, Value>) -> BTreeSet<String> {
    field_scopes(line)
        .into_iter()
        .filter_map(|scope| scope.get("saga_id"))
        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
        .collect()
}

/// A line written by the test launcher (`===== orders starting ... =====`), not the service.
fn launcher_marker(line: &str) -> bool {
    line.starts_with("===== ") && line.trim_end().ends_with(" =====")
}

/// What is wrong with one service's log, and how many lines carry each saga id.
fn check_log(service: &str, text: &str, saga_ids: &[String]) -> (Vec<String>, Vec<usize>) {
    let mut problems = Vec::new();
    let mut per_saga = vec![0; saga_ids.len()];
    for (n, raw) in text.lines().enumerate() {
        let at = format!("{service}.log:{}", n + 1);
        if raw.trim().is_empty() || launcher_marker(raw) {
            continue;
        }
        let line = match serde_json::from_str::<Value>(raw) {
            Ok(Value::Object(line)) => line,
            Ok(_) => {
                problems.push(format!("{at}: not a JSON object: {raw}"));
                continue;
            }
            Err(error) => {
                problems.push(format!("{at}: not JSON ({error}): {raw}"));
                continue;
            }
        };
        if !line.contains_key("level") || !line.contains_key("timestamp") {
            problems.push(format!("{at}: no level or timestamp: {raw}"));
        }
        let mentioned: Vec<usize> = saga_ids
            .iter()
            .enumerate()
            .filter(|(_, id)| raw.contains(id.as_str()))
            .map(|(i, _)| i)
            .collect();
        let has_saga_field = field_scopes(&line)
            .iter()
            .any(|scope| SAGA_FIELDS.iter().any(|f| scope.contains_key(*f)));
        if mentioned.is_empty() && !has_saga_field {
            continue;
        }
        let carried = structured_saga_ids(&line);
        if carried.is_empty() {
            problems.push(format!(
                "{at}: about a saga but without a structured saga_id: {raw}"
            ));
            continue;
        }
        for id in &carried {
            match saga_ids.iter().position(|s| s == id) {
                Some(i) => per_saga[i] += 1,
                None => problems.push(format!(
                    "{at}: saga_id {id:?} is none of this test's sagas {saga_ids:?}: {raw}"
                )),
            }
        }
        for i in mentioned {
            if !carried.contains(&saga_ids[i]) {
                problems.push(format!(
                    "{at}: mentions saga {} but its structured saga_id is {carried:?}: {raw}",
                    saga_ids[i]
                ));
            }
        }
    }
    (problems, per_saga)
}

async fn json_lines(backend: Backend) {
    let mut opts = Options::new(backend)
        .label("json-logs")
        .env("payments", "PAYMENT_LIMIT", 10_000)
        .env(ORCHESTRATOR, "LOG_FORMAT", "json");
    for participant in PARTICIPANTS {
        opts = opts.env(participant, "LOG_FORMAT", "json");
    }
    let mut system = System::start(opts).await;

    let completed = system
        .start_checkout(&order("nia", 800, &[(&unique_sku("mug"), 1)]))
        .await;
    let compensated = system
        .start_checkout(&order("oto", 90_000, &[(&unique_sku("rug"), 1)]))
        .await;
    let ids = [completed.clone(), compensated.clone()];
    let sagas = system.wait_all_settled(&ids, Duration::from_secs(60)).await;
    assert_eq!(status(&sagas[0]), "completed", "{}", pretty(&sagas[0]));
    assert_eq!(status(&sagas[1]), "compensated", "{}", pretty(&sagas[1]));
    // Stopped, every line is written, the shutdown lines included.
    system.stop_all().await;

    let mut problems = Vec::new();
    for service in std::iter::once(ORCHESTRATOR).chain(PARTICIPANTS) {
        let path = system.log_path(service);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let (mut found, per_saga) = check_log(service, &text, &ids);
        problems.append(&mut found);
        // Not vacuous: every service logged structured lines about the sagas it took part in
        // (shipping only about the one that got that far).
        for (i, id) in ids.iter().enumerate() {
            if service == "shipping" && id == &compensated {
                continue;
            }
            if per_saga[i] == 0 {
                problems.push(format!(
                    "{service}.log: no line carries saga_id {id} (the {} saga)",
                    if i == 0 { "completed" } else { "compensated" }
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} problem(s) with the JSON logs (in {}):\n{}",
        problems.len(),
        system.dir().display(),
        problems.join("\n")
    );
}

/// The JSON lines of `text` whose message is `message` (top level or under `fields`).
fn lines_with_message(text: &str, message: &str) -> Vec<Map<String, Value>> {
    text.lines()
        .filter_map(|raw| match serde_json::from_str::<Value>(raw) {
            Ok(Value::Object(line)) => Some(line),
            _ => None,
        })
        .filter(|line| {
            line.get("message").and_then(Value::as_str) == Some(message)
                || line
                    .get("fields")
                    .and_then(|f| f.get("message"))
                    .and_then(Value::as_str)
                    == Some(message)
        })
        .collect()
}

/// A message about a known saga that its receiver cannot read (an unsupported
/// `x-schema-version`, the `saga-id` header set) is dead-lettered on both sides; the log line
/// that says so is about that saga, and names it in a structured field like every other.
async fn dead_letter_lines(backend: Backend) {
    let mut opts =
        Options::new(backend)
            .label("json-logs-dlq")
            .env(ORCHESTRATOR, "LOG_FORMAT", "json");
    for participant in PARTICIPANTS {
        opts = opts.env(participant, "LOG_FORMAT", "json");
    }
    let mut system = System::start(opts).await;
    let id = system
        .start_checkout(&order("pia", 800, &[(&unique_sku("bowl"), 1)]))
        .await;
    let saga = system.wait_settled(&id, Duration::from_secs(60)).await;
    assert_eq!(status(&saga), "completed", "{}", pretty(&saga));

    let amqp = system.amqp().await;
    let headers = [
        (header::SCHEMA_VERSION, HeaderValue::Int(99)),
        (header::SAGA_ID, HeaderValue::Str(id.clone())),
        (header::SAGA_NAME, HeaderValue::Str("order-checkout".into())),
        (header::STEP, HeaderValue::Str("create-order".into())),
    ];
    let body = format!(r#"{{"saga_id": "{id}", "step": "create-order"}}"#);
    amqp.publish_raw("", REPLIES_QUEUE, body.as_bytes(), &headers, None)
        .await;
    amqp.publish_raw(
        COMMANDS_EXCHANGE,
        "orders",
        body.as_bytes(),
        &headers,
        Some(REPLIES_QUEUE),
    )
    .await;
    for queue in [REPLIES_QUEUE.to_owned(), command_queue("orders")] {
        let dlq = dead_letter_queue(&queue);
        assert!(
            amqp.wait_get(&dlq, Duration::from_secs(15)).await.is_some(),
            "nothing reached {dlq}"
        );
    }
    amqp.close().await;
    system.stop_all().await;

    let mut problems = Vec::new();
    for (service, message) in [
        (ORCHESTRATOR, "dead-lettering a message"),
        ("orders", "dead-lettering a message"),
    ] {
        let path = system.log_path(service);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let lines = lines_with_message(&text, message);
        if lines.is_empty() {
            problems.push(format!("{service}.log: no {message:?} line"));
        }
        for line in lines {
            let carried = structured_saga_ids(&line);
            if !carried.contains(&id) {
                problems.push(format!(
                    "{service}.log: the dead letter of a message about saga {id} (its saga-id \
                     header) is logged without that saga_id (structured saga_id: {carried:?}): {}",
                    Value::Object(line)
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} problem(s) (logs in {}):\n{}",
        problems.len(),
        system.dir().display(),
        problems.join("\n")
    );
}

saga_system::on_both_backends!(json_lines);

mod dead_letter_lines {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::dead_letter_lines(saga_system::Backend::Sqlite).await;
    }
}

#[test]
fn the_checker_finds_what_it_should() {
    let ids = ["11111111-1111-1111-1111-111111111111".to_owned()];
    let good = concat!(
        "===== orders starting ([]) =====\n",
        r#"{"timestamp":"t","level":"INFO","message":"saga started","saga_id":"11111111-1111-1111-1111-111111111111","saga":"x"}"#,
        "\n",
        r#"{"timestamp":"t","level":"INFO","fields":{"message":"replied"},"span":{"saga_id":"11111111-1111-1111-1111-111111111111","step":"s","name":"command"}}"#,
        "\n",
        r#"{"timestamp":"t","level":"INFO","fields":{"message":"consuming commands"}}"#,
        "\n",
    );
    let (problems, per_saga) = check_log("x", good, &ids);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(per_saga, [2]);

    let bad = concat!(
        "plain text\n",
        r#"{"timestamp":"t","level":"INFO","message":"about 11111111-1111-1111-1111-111111111111"}"#,
        "\n",
        r#"{"timestamp":"t","level":"INFO","fields":{"message":"m","step":"s"}}"#,
        "\n",
        r#"{"timestamp":"t","level":"INFO","message":"m","saga_id":"22222222-2222-2222-2222-222222222222"}"#,
        "\n",
    );
    let (problems, _) = check_log("x", bad, &ids);
    assert_eq!(problems.len(), 4, "{problems:#?}");
}
