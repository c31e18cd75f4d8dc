//! The committed JSON Schema files (`schemas/json/`) against the Rust types, and example
//! messages (built in Rust, and the ones documented in `schemas/README.md`) against both.

use std::fmt::Debug;
use std::fs;
use std::path::PathBuf;

use chrono::{DateTime, TimeZone, Utc};
use saga_schemas::generate::{self, REGENERATE_COMMAND};
use saga_schemas::{
    Data, Direction, EventEnvelope, Outcome, PackedReply, SagaEvent, StartSaga, StepCommand,
    StepCommands, StepReplies, StepReply,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use uuid::Uuid;

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn schema_dir() -> PathBuf {
    crate_dir().join("json")
}

/// The committed schema `<stem>.schema.json`.
fn committed(stem: &str) -> Value {
    let path = schema_dir().join(format!("{stem}{}", generate::FILE_SUFFIX));
    let text = fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}\nregenerate the schema files with: {REGENERATE_COMMAND}",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn validator(stem: &str) -> jsonschema::Validator {
    jsonschema::options()
        .should_validate_formats(true)
        .build(&committed(stem))
        .unwrap_or_else(|e| panic!("{stem}.schema.json is not a usable schema: {e}"))
}

fn errors(stem: &str, instance: &Value) -> Vec<String> {
    validator(stem)
        .iter_errors(instance)
        .map(|e| format!("at `{}`: {e}", e.instance_path()))
        .collect()
}

#[track_caller]
fn assert_valid(stem: &str, instance: &Value) {
    let errors = errors(stem, instance);
    assert!(
        errors.is_empty(),
        "does not validate against {stem}.schema.json:\n  {}\n{}",
        errors.join("\n  "),
        serde_json::to_string_pretty(instance).unwrap()
    );
}

#[track_caller]
fn assert_invalid(stem: &str, instance: &Value) {
    assert!(
        !errors(stem, instance).is_empty(),
        "{stem}.schema.json accepts an invalid message:\n{}",
        serde_json::to_string_pretty(instance).unwrap()
    );
}

/// Serialises `message`, checks the JSON against the committed schema and that it reads back
/// into an equal value.
#[track_caller]
fn check_message<T>(stem: &str, message: &T) -> Value
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let json = serde_json::to_value(message).unwrap();
    assert_valid(stem, &json);
    let back: T = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(
        &back, message,
        "{stem}: a round trip through JSON changed the message"
    );
    json
}

/// JSON → type → JSON gives the same JSON, and the JSON validates.
#[track_caller]
fn check_round_trip<T>(stem: &str, json: &Value) -> T
where
    T: Serialize + DeserializeOwned,
{
    assert_valid(stem, json);
    let typed: T = serde_json::from_value(json.clone()).unwrap_or_else(|e| {
        panic!(
            "validates against {stem}.schema.json but does not decode: {e}\n{}",
            serde_json::to_string_pretty(json).unwrap()
        )
    });
    let again = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        &again, json,
        "{stem}: JSON -> type -> JSON changed the message"
    );
    typed
}

// ----- example messages -----

fn saga_id() -> Uuid {
    Uuid::parse_str("0f8e3b7a-3c1d-4e2b-9a4f-5d6c7b8a9e01").unwrap()
}

fn at(seconds: u32, millis: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 14, 9, 26, seconds).unwrap()
        + chrono::Duration::milliseconds(i64::from(millis))
}

fn data(value: Value) -> Data {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

fn order_data() -> Data {
    data(json!({
        "order_id": "A-1001",
        "customer_id": "C-42",
        "amount": 4999,
        "currency": "EUR",
        "items": [{"sku": "TEA-01", "quantity": 2}],
        "reservation_id": "R-77",
    }))
}

fn command(direction: Direction) -> StepCommand {
    StepCommand {
        message_id: Uuid::new_v4(),
        saga_id: saga_id(),
        saga_name: "order".into(),
        step: "charge_payment".into(),
        direction,
        action: match direction {
            Direction::Execute => "charge".into(),
            Direction::Compensate => "refund".into(),
        },
        attempt: 1,
        data: order_data(),
        action_output: match direction {
            Direction::Execute => None,
            Direction::Compensate => Some(data(json!({"payment_id": "P-9"}))),
        },
        expires_at: match direction {
            Direction::Execute => Some(at(14, 0)),
            Direction::Compensate => None,
        },
    }
}

const OUTCOME_VARIANTS: usize = 3;

/// Adding an `Outcome` variant breaks this match: add it here and to [`all_outcomes`].
fn outcome_index(outcome: &Outcome) -> usize {
    match outcome {
        Outcome::Success { .. } => 0,
        Outcome::Failure { .. } => 1,
        Outcome::RetryableError { .. } => 2,
    }
}

fn all_outcomes() -> Vec<Outcome> {
    vec![
        Outcome::Success {
            output: data(json!({"payment_id": "P-9"})),
        },
        Outcome::Success {
            output: Data::new(),
        },
        Outcome::Failure {
            reason: "card declined".into(),
        },
        Outcome::RetryableError {
            error: "payment gateway timed out".into(),
        },
    ]
}

fn reply(outcome: Outcome) -> StepReply {
    StepReply {
        message_id: Uuid::new_v4(),
        in_reply_to: Uuid::new_v4(),
        saga_id: saga_id(),
        step: "charge_payment".into(),
        direction: Direction::Execute,
        attempt: 2,
        outcome,
    }
}

const EVENT_VARIANTS: usize = 17;

/// Adding a `SagaEvent` variant breaks this match: add it here and to [`all_events`].
fn event_index(event: &SagaEvent) -> usize {
    match event {
        SagaEvent::SagaStarted { .. } => 0,
        SagaEvent::CommandSent { .. } => 1,
        SagaEvent::StepCompleted { .. } => 2,
        SagaEvent::StepFailed { .. } => 3,
        SagaEvent::AttemptFailed { .. } => 4,
        SagaEvent::AttemptTimedOut { .. } => 5,
        SagaEvent::RetryScheduled { .. } => 6,
        SagaEvent::DeadlineExceeded => 7,
        SagaEvent::AbortRequested { .. } => 8,
        SagaEvent::CompensationStarted { .. } => 9,
        SagaEvent::StepCompensated { .. } => 10,
        SagaEvent::CompensationFailed { .. } => 11,
        SagaEvent::CompensationRetryRequested { .. } => 12,
        SagaEvent::SagaCompleted => 13,
        SagaEvent::SagaCompensated => 14,
        SagaEvent::CompletionFailed { .. } => 15,
        SagaEvent::StepRetryRequested { .. } => 16,
    }
}

fn all_events() -> Vec<SagaEvent> {
    vec![
        SagaEvent::SagaStarted {
            saga_name: "order".into(),
            definition_version: "3f2a9c0d5e7b1a46".into(),
            input: data(json!({"order_id": "A-1001", "amount": 4999})),
            business_key: Some("A-1001".into()),
            deadline_at: Some(at(53, 0) + chrono::Duration::minutes(10)),
        },
        SagaEvent::SagaStarted {
            saga_name: "order".into(),
            definition_version: "3f2a9c0d5e7b1a46".into(),
            input: Data::new(),
            business_key: None,
            deadline_at: None,
        },
        SagaEvent::CommandSent {
            step: "charge_payment".into(),
            direction: Direction::Execute,
            attempt: 1,
            message_id: Uuid::new_v4(),
            timeout_at: at(23, 589),
            sent_at: Some(at(13, 589)),
            expires_at: Some(at(59, 0)),
        },
        SagaEvent::StepCompleted {
            step: "charge_payment".into(),
            attempt: 1,
            output: data(json!({"payment_id": "P-9"})),
            manual: false,
            by: None,
        },
        SagaEvent::StepCompleted {
            step: "create_shipment".into(),
            attempt: 4,
            output: Data::new(),
            manual: true,
            by: Some("ops".into()),
        },
        SagaEvent::StepFailed {
            step: "create_shipment".into(),
            attempt: 1,
            reason: "address not deliverable".into(),
        },
        SagaEvent::AttemptFailed {
            step: "charge_payment".into(),
            direction: Direction::Execute,
            attempt: 1,
            error: "payment gateway timed out".into(),
        },
        SagaEvent::AttemptTimedOut {
            step: "charge_payment".into(),
            direction: Direction::Compensate,
            attempt: 2,
        },
        SagaEvent::RetryScheduled {
            step: "charge_payment".into(),
            direction: Direction::Compensate,
            attempt: 3,
            due_at: at(30, 0),
        },
        SagaEvent::DeadlineExceeded,
        SagaEvent::AbortRequested {
            reason: "customer cancelled".into(),
            by: Some("ops".into()),
        },
        SagaEvent::CompensationStarted {
            reason: "step create_shipment failed".into(),
        },
        SagaEvent::StepCompensated {
            step: "charge_payment".into(),
            attempt: 1,
            manual: false,
            by: None,
        },
        SagaEvent::StepCompensated {
            step: "reserve_stock".into(),
            attempt: 5,
            manual: true,
            by: None,
        },
        SagaEvent::CompensationFailed {
            step: "reserve_stock".into(),
            reason: "warehouse rejected the release".into(),
        },
        SagaEvent::CompensationRetryRequested {
            step: "reserve_stock".into(),
            by: Some("ops".into()),
        },
        SagaEvent::CompletionFailed {
            step: "create_shipment".into(),
            reason: "address not deliverable".into(),
        },
        SagaEvent::StepRetryRequested {
            step: "create_shipment".into(),
            by: None,
        },
        SagaEvent::SagaCompleted,
        SagaEvent::SagaCompensated,
    ]
}

fn envelope(seq: u64, event: SagaEvent) -> EventEnvelope {
    EventEnvelope {
        saga_id: saga_id(),
        saga_name: "order".into(),
        seq,
        recorded_at: at(53, 589),
        event,
    }
}

#[track_caller]
fn assert_covers(what: &str, indices: impl IntoIterator<Item = usize>, count: usize) {
    let mut seen = vec![false; count];
    for i in indices {
        seen[i] = true;
    }
    let missing: Vec<usize> = (0..count).filter(|&i| !seen[i]).collect();
    assert!(
        missing.is_empty(),
        "no example of {what} variants {missing:?}"
    );
}

// ----- the files against the types -----

#[test]
fn committed_schema_files_match_the_types() {
    let drift = generate::check(&schema_dir()).expect("reading schemas/json");
    assert!(
        drift.is_empty(),
        "the committed JSON Schema files differ from the Rust types:\n  {}\n\
         regenerate them with: {REGENERATE_COMMAND}",
        drift
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n  ")
    );
}

#[test]
fn committed_schemas_are_valid_json_schemas() {
    for (name, _) in generate::json_schemas() {
        let stem = name.strip_suffix(generate::FILE_SUFFIX).unwrap();
        let schema = committed(stem);
        if let Err(e) = jsonschema::meta::validate(&schema) {
            panic!("{name} is not a valid JSON Schema: {e}");
        }
        assert_eq!(
            schema["$schema"],
            json!("https://json-schema.org/draft/2020-12/schema")
        );
        assert_eq!(schema["$id"], json!(generate::schema_id(stem)));
        assert_eq!(
            schema["x-schema-version"],
            json!(saga_schemas::SCHEMA_VERSION)
        );
        let _ = validator(stem);
    }
}

// ----- example messages against the committed files -----

#[test]
fn start_saga_messages_validate() {
    check_message(
        "start-saga",
        &StartSaga {
            saga: "order".into(),
            input: order_data(),
            idempotency_key: Some("order-A-1001".into()),
        },
    );
    let minimal = check_message(
        "start-saga",
        &StartSaga {
            saga: "order".into(),
            input: Data::new(),
            idempotency_key: None,
        },
    );
    assert_eq!(minimal, json!({"saga": "order", "input": {}}));
    // `input` may be left out.
    let typed: StartSaga = serde_json::from_value(json!({"saga": "order"})).unwrap();
    assert!(typed.input.is_empty());
    assert_valid("start-saga", &json!({"saga": "order"}));
}

#[test]
fn step_commands_validate() {
    let execute = check_message("step-command", &command(Direction::Execute));
    assert!(execute.get("action_output").is_none());
    let compensate = check_message("step-command", &command(Direction::Compensate));
    assert_eq!(compensate["action_output"], json!({"payment_id": "P-9"}));
    assert_eq!(compensate["direction"], json!("compensate"));
}

#[test]
fn every_outcome_validates_in_a_step_reply() {
    let outcomes = all_outcomes();
    assert_covers(
        "Outcome",
        outcomes.iter().map(outcome_index),
        OUTCOME_VARIANTS,
    );
    for outcome in outcomes {
        let json = check_message("step-reply", &reply(outcome));
        assert!(json["outcome"]["status"].is_string());
    }
    // A success without `output` means an empty output.
    let mut json = serde_json::to_value(reply(Outcome::Success {
        output: Data::new(),
    }))
    .unwrap();
    json["outcome"] = json!({"status": "success"});
    assert_valid("step-reply", &json);
    let typed: StepReply = serde_json::from_value(json).unwrap();
    assert_eq!(
        typed.outcome,
        Outcome::Success {
            output: Data::new()
        }
    );
}

#[test]
fn every_saga_event_validates_in_an_envelope() {
    let events = all_events();
    assert_covers("SagaEvent", events.iter().map(event_index), EVENT_VARIANTS);
    for (seq, event) in (1..).zip(events) {
        let kind = event.kind();
        let json = check_message("event-envelope", &envelope(seq, event));
        assert_eq!(json["event"]["type"], json!(kind));
    }
}

#[test]
fn schemas_reject_malformed_messages() {
    assert_invalid("start-saga", &json!({"input": {}}));
    assert_invalid("start-saga", &json!({"saga": "order", "input": []}));

    let good_command = serde_json::to_value(command(Direction::Execute)).unwrap();
    let mut bad = good_command.clone();
    bad["direction"] = json!("sideways");
    assert_invalid("step-command", &bad);
    let mut bad = good_command.clone();
    bad["message_id"] = json!("not-a-uuid");
    assert_invalid("step-command", &bad);
    let mut bad = good_command.clone();
    bad["attempt"] = json!(-1);
    assert_invalid("step-command", &bad);
    let mut bad = good_command;
    bad.as_object_mut().unwrap().remove("data");
    assert_invalid("step-command", &bad);

    let good_reply = serde_json::to_value(reply(Outcome::Failure {
        reason: "no stock".into(),
    }))
    .unwrap();
    let mut bad = good_reply.clone();
    bad["outcome"] = json!({"status": "ok"});
    assert_invalid("step-reply", &bad);
    let mut bad = good_reply.clone();
    bad["outcome"] = json!({"status": "failure"});
    assert_invalid("step-reply", &bad);
    let mut bad = good_reply;
    bad["outcome"] = json!({"status": "success", "output": ["not", "an", "object"]});
    assert_invalid("step-reply", &bad);

    let good_envelope = serde_json::to_value(envelope(1, SagaEvent::SagaCompleted)).unwrap();
    let mut bad = good_envelope.clone();
    bad["event"] = json!({"type": "saga_exploded"});
    assert_invalid("event-envelope", &bad);
    let mut bad = good_envelope.clone();
    bad["recorded_at"] = json!("yesterday");
    assert_invalid("event-envelope", &bad);
    let mut bad = good_envelope;
    bad["event"] = json!({"type": "step_failed", "step": "x", "attempt": 1});
    assert_invalid("event-envelope", &bad);
}

// ----- the examples documented in README.md -----

struct Example {
    tag: String,
    line: usize,
    json: Value,
}

/// Every ```` ```json <tag> ```` block of the README, parsed.
fn readme_examples() -> Vec<Example> {
    let path = crate_dir().join("README.md");
    let text = fs::read_to_string(&path).expect("reading schemas/README.md");
    let mut examples = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((index, line)) = lines.next() {
        let Some(info) = line.trim_start().strip_prefix("```json") else {
            continue;
        };
        let tag = info.trim().to_string();
        assert!(
            !tag.is_empty(),
            "README.md line {}: tag the JSON example with what it is (```json step-command)",
            index + 1
        );
        let mut body = String::new();
        for (_, line) in lines.by_ref() {
            if line.trim_start().starts_with("```") {
                break;
            }
            body.push_str(line);
            body.push('\n');
        }
        let json = serde_json::from_str(&body).unwrap_or_else(|e| {
            panic!("README.md line {}: the example is not JSON: {e}", index + 1)
        });
        examples.push(Example {
            tag,
            line: index + 1,
            json,
        });
    }
    examples
}

#[test]
fn readme_examples_validate_and_round_trip() {
    let examples = readme_examples();
    let mut outcomes = Vec::new();
    let mut events = Vec::new();
    let mut tags = Vec::new();
    // A reply to wrap `outcome` examples in, and an envelope for `saga-events`.
    let reply_template = serde_json::to_value(reply(Outcome::Success {
        output: Data::new(),
    }))
    .unwrap();
    let envelope_template = serde_json::to_value(envelope(1, SagaEvent::SagaCompleted)).unwrap();

    for example in &examples {
        let context = format!("README.md line {} ({})", example.line, example.tag);
        eprintln!("checking {context}");
        tags.push(example.tag.as_str());
        match example.tag.as_str() {
            "start-saga" => {
                check_round_trip::<StartSaga>("start-saga", &example.json);
            }
            "step-command" => {
                check_round_trip::<StepCommand>("step-command", &example.json);
            }
            "step-reply" => {
                let reply = check_round_trip::<StepReply>("step-reply", &example.json);
                outcomes.push(reply.outcome);
            }
            "step-commands" => {
                let pack = check_round_trip::<StepCommands>("step-commands", &example.json);
                assert!(
                    pack.commands.len() > 1,
                    "{context}: show more than one command"
                );
            }
            "step-replies" => {
                let pack = check_round_trip::<StepReplies>("step-replies", &example.json);
                assert!(
                    pack.replies.len() > 1,
                    "{context}: show more than one reply"
                );
                outcomes.extend(pack.replies.into_iter().map(|packed| packed.reply.outcome));
            }
            "outcome" => {
                let mut wrapped = reply_template.clone();
                wrapped["outcome"] = example.json.clone();
                let reply = check_round_trip::<StepReply>("step-reply", &wrapped);
                outcomes.push(reply.outcome);
            }
            "event-envelope" => {
                let envelope = check_round_trip::<EventEnvelope>("event-envelope", &example.json);
                events.push(envelope.event);
            }
            "saga-events" => {
                let list = example
                    .json
                    .as_array()
                    .expect("saga-events is a JSON array");
                for event in list {
                    let mut wrapped = envelope_template.clone();
                    wrapped["event"] = event.clone();
                    let envelope = check_round_trip::<EventEnvelope>("event-envelope", &wrapped);
                    events.push(envelope.event);
                }
            }
            other => panic!("{context}: unknown example tag `{other}`"),
        }
    }

    for tag in [
        "start-saga",
        "step-command",
        "step-reply",
        "step-commands",
        "step-replies",
        "event-envelope",
        "saga-events",
    ] {
        assert!(tags.contains(&tag), "README.md has no `{tag}` example");
    }
    assert_covers(
        "Outcome (README.md)",
        outcomes.iter().map(outcome_index),
        OUTCOME_VARIANTS,
    );
    assert_covers(
        "SagaEvent (README.md)",
        events.iter().map(event_index),
        EVENT_VARIANTS,
    );
}

/// The README documents the AMQP names; keep them in step with `amqp.rs`.
#[test]
fn readme_names_match_the_amqp_constants() {
    use saga_schemas::amqp::{self, header, message_type};
    let readme = fs::read_to_string(crate_dir().join("README.md")).unwrap();
    let names = [
        amqp::COMMANDS_EXCHANGE,
        amqp::EVENTS_EXCHANGE,
        amqp::DEAD_LETTER_EXCHANGE,
        amqp::REPLIES_QUEUE,
        amqp::START_QUEUE,
        amqp::CONTENT_TYPE_JSON,
        &amqp::command_queue("<participant>"),
        &amqp::dead_letter_queue("<queue>"),
        message_type::START_SAGA,
        message_type::STEP_COMMAND,
        message_type::STEP_REPLY,
        message_type::STEP_COMMANDS,
        message_type::STEP_REPLIES,
        message_type::EVENT,
        header::SCHEMA_VERSION,
        header::SAGA_ID,
        header::SAGA_NAME,
        header::STEP,
        header::ACTION,
        header::DIRECTION,
        header::ATTEMPT,
        header::DEAD_LETTER_REASON,
        header::DEAD_LETTER_QUEUE,
    ];
    for name in names {
        assert!(
            readme.contains(&format!("`{name}`")),
            "README.md does not mention `{name}`"
        );
    }
    for status in [
        "running",
        "compensating",
        "completed",
        "compensated",
        "compensation_failed",
    ] {
        let parsed: saga_schemas::SagaStatus = status.parse().unwrap();
        assert_eq!(parsed.as_str(), status);
        assert!(
            readme.contains(&format!("| `{status}` |")),
            "README.md: status {status}"
        );
    }
    for event in all_events() {
        let kind = event.kind();
        assert!(
            readme.contains(&format!("| `{kind}` |")),
            "README.md: event {kind}"
        );
    }
}

/// The orchestrator puts a packed message's body together from its commands' bodies as text;
/// a participant must read back each command and its trace context, and the schema must hold.
#[test]
fn a_packed_command_message_holds_each_command_with_its_trace_context() {
    use saga_schemas::amqp::{HeaderValue, OutgoingMessage, message_type};
    let execute = command(Direction::Execute);
    let compensate = command(Direction::Compensate);
    let mut traced =
        OutgoingMessage::command(&execute, "payments", "saga.replies", Some(at(30, 0)));
    traced.headers.push((
        "traceparent".into(),
        HeaderValue::Str("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
    ));
    traced.headers.push((
        "tracestate".into(),
        HeaderValue::Str("vendor=\"quoted\"".into()),
    ));
    let later = OutgoingMessage::command(&compensate, "payments", "saga.replies", Some(at(40, 0)));
    let packed = OutgoingMessage::packed_commands(&[&traced, &later]);

    assert_eq!(packed.message_type, message_type::STEP_COMMANDS);
    assert_eq!(packed.routing_key, "payments");
    assert_eq!(packed.reply_to.as_deref(), Some("saga.replies"));
    assert_eq!(
        packed.discard_after,
        Some(at(40, 0)),
        "the latest of its commands'"
    );
    let body: Value = serde_json::from_str(&packed.body).unwrap();
    assert_valid("step-commands", &body);
    let pack: StepCommands = serde_json::from_value(body).unwrap();
    assert_eq!(pack.commands.len(), 2);
    assert_eq!(pack.commands[0].command, execute);
    assert_eq!(
        pack.commands[0].traceparent.as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(
        pack.commands[0].tracestate.as_deref(),
        Some("vendor=\"quoted\"")
    );
    assert_eq!(pack.commands[1].command, compensate);
    assert_eq!(pack.commands[1].traceparent, None);

    let lasting = OutgoingMessage::command(&compensate, "payments", "saga.replies", None);
    let packed = OutgoingMessage::packed_commands(&[&traced, &lasting]);
    assert_eq!(
        packed.discard_after, None,
        "one command that never expires keeps it"
    );
}

#[test]
fn packed_replies_stay_within_the_message_limit() {
    use saga_schemas::amqp::OutgoingMessage;
    use saga_schemas::limits::MAX_MESSAGE_BYTES;
    // Outputs of 200 KiB: five fit in one message, not six.
    let big = |i: u128| PackedReply {
        reply: StepReply {
            message_id: Uuid::from_u128(i),
            ..reply(Outcome::Success {
                output: data(json!({ "blob": "x".repeat(200 * 1024) })),
            })
        },
        traceparent: None,
        tracestate: None,
    };
    let replies: Vec<PackedReply> = (0..12).map(big).collect();
    let messages = OutgoingMessage::packed_replies(&replies, "saga.replies");
    assert_eq!(messages.len(), 3);
    let mut back = Vec::new();
    for message in &messages {
        assert!(
            message.body.len() <= MAX_MESSAGE_BYTES,
            "{}",
            message.body.len()
        );
        let body: Value = serde_json::from_str(&message.body).unwrap();
        assert_valid("step-replies", &body);
        let pack: StepReplies = serde_json::from_value(body).unwrap();
        back.extend(pack.replies);
    }
    assert_eq!(back, replies, "every reply once, in order");

    let small = vec![big(1)];
    assert_eq!(OutgoingMessage::packed_replies(&small, "q").len(), 1);
}
