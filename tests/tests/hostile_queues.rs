//! Hostile and malformed messages on every queue of a running system: starts, replies and each
//! participant's commands. Whatever arrives, the message ends in its queue's `.dlq` with a short
//! `x-dead-letter-reason` (or, for a start, is also answered), no connection is ever lost, and
//! the good sagas running at the same time settle as the checkout rules say.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use saga_amqp::lapin::BasicProperties;
use saga_amqp::lapin::message::Delivery;
use saga_amqp::lapin::options::{BasicGetOptions, QueueDeclareOptions};
use saga_amqp::lapin::types::{AMQPValue, FieldTable};
use saga_schemas::amqp::{
    COMMANDS_EXCHANGE, REPLIES_QUEUE, START_QUEUE, command_queue, dead_letter_queue, header,
    message_type,
};
use saga_schemas::limits::{MAX_DATA_BYTES, MAX_DEPTH, MAX_MESSAGE_BYTES, MAX_REASON_CHARS};
use saga_schemas::{RejectionReason, SCHEMA_VERSION, StartRejected};
use saga_system::checkout::*;
use saga_system::management::user_provided_name;
use saga_system::{
    Amqp, Backend, CHECKOUT, ORCHESTRATOR, Options, PARTICIPANTS, System, TestEnv,
    dead_letter_reason, pretty,
};
use serde_json::{Value, json};
use uuid::Uuid;

/// A reason is cut to [`MAX_REASON_CHARS`], plus a short note of how much was cut.
const MAX_REASON_WITH_NOTE: usize = MAX_REASON_CHARS + 64;
/// Longer than a frame (128 KiB) and than the saga data limit.
const HUGE: usize = 300_000;
/// No log line should echo a hostile value whole.
const MAX_LOG_LINE: usize = 16 * 1024;
const DEAD_LETTERS_WITHIN: Duration = Duration::from_secs(90);

// --- the system as the broker sees it -----------------------------------------------------------

/// The broker's names of the services' connections: a reconnect gives a new one.
async fn service_connections(system: &System) -> BTreeSet<String> {
    let management = TestEnv::get().management().unwrap();
    let services: Vec<String> = PARTICIPANTS
        .iter()
        .chain([&ORCHESTRATOR])
        .map(|s| system.connection_name(s))
        .collect();
    let started = Instant::now();
    loop {
        let connections = management.connections(system.vhost()).await.unwrap();
        let names: BTreeSet<String> = connections
            .iter()
            .filter(|c| user_provided_name(c).is_some_and(|n| services.iter().any(|s| n == s)))
            .filter_map(|c| c["name"].as_str().map(str::to_owned))
            .collect();
        // The management API lists a new connection a moment after it opens.
        if names.len() >= services.len() {
            return names;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not every service is connected: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn assert_no_reconnect(system: &System, before: &BTreeSet<String>) {
    let after = service_connections(system).await;
    assert_eq!(
        &after,
        before,
        "a service lost its broker connection (a reconnect shows as a new connection)\n{}",
        system.log_tails(30)
    );
    let (status, body) = system.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
}

fn assert_short_log_lines(system: &System) {
    for service in PARTICIPANTS.iter().chain([&ORCHESTRATOR]) {
        let log = std::fs::read_to_string(system.log_path(service)).unwrap_or_default();
        if let Some(line) = log.lines().find(|l| l.len() > MAX_LOG_LINE) {
            panic!(
                "{service} logged a line of {} bytes (a hostile value echoed whole?): {}…",
                line.len(),
                &line[..line.floor_char_boundary(300)]
            );
        }
    }
}

// --- publishing ---------------------------------------------------------------------------------

/// One message as the test sends it.
struct Sent {
    message_id: String,
    body: Vec<u8>,
    /// What the message is, for failure messages.
    what: String,
}

async fn publish(
    amqp: &Amqp,
    exchange: &str,
    routing_key: &str,
    body: Vec<u8>,
    headers: FieldTable,
    reply_to: Option<&str>,
    what: String,
) -> Sent {
    let message_id = Uuid::new_v4().to_string();
    let mut properties = BasicProperties::default()
        .with_message_id(message_id.as_str().into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(reply_to) = reply_to {
        properties = properties.with_reply_to(reply_to.into());
    }
    amqp.publisher
        .publish_raw(exchange, routing_key, &body, properties)
        .await
        .unwrap_or_else(|e| panic!("publishing {what} to {exchange:?}/{routing_key:?}: {e:?}"));
    Sent {
        message_id,
        body,
        what,
    }
}

fn version_header() -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(
        header::SCHEMA_VERSION.into(),
        AMQPValue::LongLongInt(SCHEMA_VERSION.into()),
    );
    headers
}

/// Takes every message of `queue` until `expected` ones came, and checks each: one of those
/// sent, its body unchanged, a reason no longer than the limit.
async fn take_dead_letters(amqp: &Amqp, queue: &str, expected: &[Sent]) -> Vec<Delivery> {
    let dlq = dead_letter_queue(queue);
    let by_id: BTreeMap<&str, &Sent> = expected
        .iter()
        .map(|s| (s.message_id.as_str(), s))
        .collect();
    let started = Instant::now();
    let mut got: Vec<Delivery> = Vec::new();
    while got.len() < expected.len() {
        match amqp.get(&dlq).await {
            Some(dead) => got.push(dead),
            None if started.elapsed() > DEAD_LETTERS_WITHIN => {
                let seen: BTreeSet<String> = got.iter().map(message_id).collect();
                let missing: Vec<&str> = expected
                    .iter()
                    .filter(|s| !seen.contains(&s.message_id))
                    .map(|s| s.what.as_str())
                    .collect();
                panic!(
                    "{} of {} messages did not reach {dlq} within {DEAD_LETTERS_WITHIN:?}: {missing:?}",
                    missing.len(),
                    expected.len()
                );
            }
            None => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    for dead in &got {
        let id = message_id(dead);
        let sent = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("{dlq} holds a message the test did not send there: {id}"));
        assert!(
            dead.data == sent.body,
            "{}: the body in {dlq} is not the one sent ({} bytes, not {})",
            sent.what,
            dead.data.len(),
            sent.body.len()
        );
        let reason = dead_letter_reason(dead)
            .unwrap_or_else(|| panic!("{}: no x-dead-letter-reason in {dlq}", sent.what));
        assert!(!reason.trim().is_empty(), "{}: an empty reason", sent.what);
        assert!(
            reason.chars().count() <= MAX_REASON_WITH_NOTE,
            "{}: a reason of {} characters in {dlq}: {}…",
            sent.what,
            reason.chars().count(),
            &reason[..reason.floor_char_boundary(200)]
        );
        assert_eq!(
            saga_amqp::header_str(dead, header::DEAD_LETTER_QUEUE),
            Some(queue),
            "{}",
            sent.what
        );
    }
    got
}

fn message_id(delivery: &Delivery) -> String {
    delivery
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.to_string())
        .unwrap_or_default()
}

/// An exclusive queue for the answers to start requests, and a reader of it.
struct Answers {
    channel: saga_amqp::lapin::Channel,
    queue: String,
}

impl Answers {
    async fn new(amqp: &Amqp) -> Answers {
        let channel = amqp.connection.create_channel().await.unwrap();
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .name()
            .as_str()
            .to_owned();
        Answers { channel, queue }
    }

    async fn next(&self, what: &str) -> Delivery {
        let started = Instant::now();
        loop {
            let got = self
                .channel
                .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap();
            if let Some(message) = got {
                return message.delivery;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no answer to {what} within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

// --- start requests ---------------------------------------------------------------------------

fn start_body(saga: &str, input: Value, key: Option<&str>) -> Vec<u8> {
    let mut start = json!({"saga": saga, "input": input});
    if let Some(key) = key {
        start["idempotency_key"] = json!(key);
    }
    serde_json::to_vec(&start).unwrap()
}

fn nested(levels: usize) -> String {
    format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
}

/// Each start request breaking one rule is answered on its `reply_to` with `saga.start_rejected`
/// and the reason, and dead-lettered with that reason cut short; none starts a saga, no
/// connection is lost, and a good request after them is answered at once.
async fn start_requests_are_checked(backend: Backend) {
    let system = System::start(Options::new(backend).label("hostile-starts")).await;
    let connections = service_connections(&system).await;
    let amqp = system.amqp().await;
    let answers = Answers::new(&amqp).await;
    let sku = unique_sku("quill");
    let good = || order("olga", 500, &[(&sku, 1)]);
    let with = |key: &str, value: Value| {
        let mut input = good();
        input[key] = value;
        input
    };
    let over_data_limit = "c".repeat(MAX_DATA_BYTES + 10);
    let raw = |body: String| body.into_bytes();
    let data_limit = format!("the limit is {MAX_DATA_BYTES}");
    let message_limit = format!("the limit is {MAX_MESSAGE_BYTES}");
    let cases: Vec<(&str, Vec<u8>, RejectionReason, &str)> = vec![
        (
            "an amount of 200,000 characters",
            start_body(CHECKOUT, with("amount", json!("9".repeat(200_000))), None),
            RejectionReason::InvalidInput,
            "/amount",
        ),
        (
            "a saga name of 200 KB",
            start_body(&"n".repeat(200_000), good(), None),
            RejectionReason::UnknownSaga,
            "no saga named",
        ),
        (
            "an idempotency key with a NUL",
            raw(format!(
                r#"{{"saga": "{CHECKOUT}", "input": {}, "idempotency_key": "a\u0000b"}}"#,
                good()
            )),
            RejectionReason::InvalidRequest,
            "NUL",
        ),
        (
            "an idempotency key of 10 KB",
            start_body(CHECKOUT, good(), Some(&"k".repeat(10_000))),
            RejectionReason::InvalidRequest,
            "idempotency key",
        ),
        (
            "an idempotency key with a control character",
            start_body(CHECKOUT, good(), Some("tab\there")),
            RejectionReason::InvalidRequest,
            "printable ASCII",
        ),
        (
            "an input over the saga data limit",
            start_body(CHECKOUT, with("customer", json!(over_data_limit)), None),
            RejectionReason::InvalidInput,
            &data_limit,
        ),
        (
            "a NUL in the customer",
            raw(format!(
                r#"{{"saga": "{CHECKOUT}", "input": {{"customer": "ol\u0000ga", "amount": 500, "items": [{{"sku": "{sku}", "quantity": 1}}]}}}}"#
            )),
            RejectionReason::InvalidRequest,
            "NUL",
        ),
        (
            "a body over the message limit",
            start_body(
                CHECKOUT,
                with("customer", json!("c".repeat(MAX_MESSAGE_BYTES))),
                None,
            ),
            RejectionReason::InvalidRequest,
            &message_limit,
        ),
        (
            "an input nested too deep",
            raw(format!(
                r#"{{"saga": "{CHECKOUT}", "input": {{"customer": "olga", "amount": 500, "items": {}}}}}"#,
                nested(MAX_DEPTH + 5)
            )),
            RejectionReason::InvalidRequest,
            "nested deeper",
        ),
        (
            "an amount beyond 64 bits",
            raw(format!(
                r#"{{"saga": "{CHECKOUT}", "input": {{"customer": "olga", "amount": 123456789012345678901234567890, "items": []}}}}"#
            )),
            RejectionReason::InvalidRequest,
            "64 bits",
        ),
    ];

    let mut sent = Vec::new();
    for (what, body, reason, detail) in &cases {
        let message = publish(
            &amqp,
            "",
            START_QUEUE,
            body.clone(),
            version_header(),
            Some(&answers.queue),
            (*what).to_owned(),
        )
        .await;
        let answer = answers.next(what).await;
        assert_eq!(
            answer.properties.kind().as_ref().map(|k| k.as_str()),
            Some(message_type::START_REJECTED),
            "{what}: {}",
            String::from_utf8_lossy(&answer.data[..answer.data.len().min(300)])
        );
        assert_eq!(
            answer
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str()),
            Some(message.message_id.as_str()),
            "{what}: correlated by the request's message id"
        );
        let rejected: StartRejected = serde_json::from_slice(&answer.data).unwrap();
        assert_eq!(rejected.reason, *reason, "{what}: {rejected:?}");
        assert!(
            rejected.detail.contains(detail),
            "{what}: the detail should mention {detail:?}: {}",
            &rejected.detail[..rejected.detail.floor_char_boundary(300)]
        );
        assert!(
            rejected.detail.chars().count() <= MAX_REASON_WITH_NOTE,
            "{what}: a detail of {} characters",
            rejected.detail.chars().count()
        );
        sent.push(message);
    }
    let dead = take_dead_letters(&amqp, START_QUEUE, &sent).await;
    for ((what, _, _, detail), message) in cases.iter().zip(&sent) {
        let copy = dead
            .iter()
            .find(|d| message_id(d) == message.message_id)
            .unwrap();
        let reason = dead_letter_reason(copy).unwrap();
        assert!(
            reason.contains(detail),
            "{what}: the dead-letter reason should mention {detail:?}: {reason}"
        );
    }

    // The queue is not clogged: a good request is answered and its saga completes.
    let key = format!("good-{}", Uuid::new_v4());
    publish(
        &amqp,
        "",
        START_QUEUE,
        start_body(CHECKOUT, good(), Some(&key)),
        version_header(),
        Some(&answers.queue),
        "a good start".into(),
    )
    .await;
    let answer = answers.next("a good start").await;
    let started: Value = serde_json::from_slice(&answer.data).unwrap();
    assert_eq!(started["created"], true, "{started}");
    let id = started["saga_id"].as_str().unwrap();
    let saga = system.wait_settled(id, Duration::from_secs(60)).await;
    assert_eq!(status(&saga), "completed", "{}", pretty(&saga));
    assert_eq!(
        system.list_all("").await.len(),
        1,
        "only the good one started"
    );
    assert!(
        amqp.get(&dead_letter_queue(START_QUEUE)).await.is_none(),
        "nothing else was dead-lettered"
    );

    assert_no_reconnect(&system, &connections).await;
    assert_short_log_lines(&system);
    amqp.close().await;
}

// --- junk on every queue ------------------------------------------------------------------------

/// xorshift64*: reproducible junk from a printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

#[derive(Clone, Copy, Debug)]
enum Target {
    Start,
    Replies,
    Commands(&'static str),
}

impl Target {
    fn queue(self) -> String {
        match self {
            Target::Start => START_QUEUE.into(),
            Target::Replies => REPLIES_QUEUE.into(),
            Target::Commands(participant) => command_queue(participant),
        }
    }

    /// A message every field of which is valid.
    fn template(self) -> Value {
        match self {
            Target::Start => json!({
                "saga": CHECKOUT,
                "input": order("junk", 100, &[("junk-sku", 1)]),
                "idempotency_key": format!("junk-{}", Uuid::new_v4()),
            }),
            // For a saga nobody knows: even a readable one is set aside.
            Target::Replies => json!({
                "message_id": Uuid::new_v4(),
                "in_reply_to": Uuid::new_v4(),
                "saga_id": Uuid::new_v4(),
                "step": "create-order",
                "direction": "execute",
                "attempt": 1,
                "outcome": {"status": "success", "output": {}},
            }),
            Target::Commands(participant) => json!({
                "message_id": Uuid::new_v4(),
                "saga_id": Uuid::new_v4(),
                "saga_name": CHECKOUT,
                "step": "a-step",
                "direction": "execute",
                "action": action_of(participant),
                "attempt": 1,
                "data": order("junk", 100, &[("junk-sku", 1)]),
            }),
        }
    }

    /// The fields that must be there.
    fn required(self) -> &'static [&'static str] {
        match self {
            // Without `input` the saga's input_schema refuses it; without a key it would start.
            Target::Start => &["saga", "input"],
            Target::Replies => &[
                "message_id",
                "in_reply_to",
                "saga_id",
                "step",
                "direction",
                "attempt",
                "outcome",
            ],
            Target::Commands(_) => &[
                "message_id",
                "saga_id",
                "saga_name",
                "step",
                "direction",
                "action",
                "attempt",
                "data",
            ],
        }
    }

    /// Every field of the template, with values of a type it does not accept.
    fn wrong_types(self, field: &str) -> Vec<Value> {
        match field {
            "input" | "data" | "output" => vec![json!(42), json!("x"), json!([]), json!(true)],
            "outcome" => vec![json!("success"), json!(42), json!({"status": "maybe"})],
            "attempt" => vec![json!("1"), json!(-1), json!(1.5), json!([]), json!({})],
            "direction" => vec![json!("sideways"), json!(1), json!([])],
            "message_id" | "in_reply_to" | "saga_id" => {
                vec![json!("not-a-uuid"), json!(42), json!({}), json!(true)]
            }
            // Strings; never null, which an optional key would accept.
            _ => vec![json!(42), json!([]), json!({}), json!(true)],
        }
    }
}

fn action_of(participant: &str) -> &'static str {
    match participant {
        "orders" => "create_order",
        "inventory" => "reserve",
        "payments" => "charge",
        _ => "schedule",
    }
}

/// A message `target` must refuse, whatever the draw: (what it is, body).
fn junk_body(rng: &mut Rng, target: Target) -> (String, Vec<u8>) {
    let fields: Vec<String> = target
        .template()
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let field = rng.pick(&fields).clone();
    let kind = rng.below(JUNK_KINDS);
    junk_of_kind(rng, target, kind, field)
}

/// Kinds of junk [`junk_of_kind`] makes.
const JUNK_KINDS: usize = 9;
const HUGE_FIELD: usize = 4;
/// A NUL, too deep, an integer beyond 64 bits, over the message limit.
const LIMIT_KINDS: [usize; 4] = [5, 6, 7, 8];

/// Junk of one kind; `field` is the field it changes, where it changes one.
fn junk_of_kind(rng: &mut Rng, target: Target, kind: usize, field: String) -> (String, Vec<u8>) {
    let mut message = target.template();
    let json_body = |v: &Value| serde_json::to_vec(v).unwrap();
    match kind {
        0 => {
            let len = rng.below(2048);
            (format!("{len} random bytes"), rng.bytes(len))
        }
        1 => {
            let text = json_body(&message);
            let cut = rng.below(text.len() - 1);
            (format!("JSON cut at {cut}"), text[..cut].to_vec())
        }
        2 => {
            let value = rng.pick(&target.wrong_types(&field)).clone();
            message[&field] = value.clone();
            (format!("{field} = {value}"), json_body(&message))
        }
        3 => {
            let field = rng.pick(target.required());
            message.as_object_mut().unwrap().remove(*field);
            (format!("no {field}"), json_body(&message))
        }
        4 => {
            // A string of 300 KB in a field: a wrong type, an unknown saga or action, a key or
            // names too long, or saga data over its limit.
            let field = match target {
                Target::Start if rng.chance(30) => "customer".to_owned(),
                _ => field,
            };
            let huge = json!("h".repeat(HUGE));
            if field == "customer" {
                message["input"]["customer"] = huge;
            } else {
                message[&field] = huge;
            }
            (format!("{field} of {HUGE} bytes"), json_body(&message))
        }
        5 => {
            let text = json_body(&message);
            let text = String::from_utf8(text).unwrap();
            // A NUL in the first string value.
            let body = text.replacen("\":\"", "\":\"\\u0000", 1);
            ("a NUL in a string".into(), body.into_bytes())
        }
        6 => {
            let levels = MAX_DEPTH + 1 + rng.below(200);
            let object_field = match target {
                Target::Start => "input",
                Target::Replies => "outcome",
                Target::Commands(_) => "data",
            };
            let text = json_body(&message);
            let text = String::from_utf8(text).unwrap();
            let body = text.replacen(
                &format!("\"{object_field}\":{{"),
                &format!("\"{object_field}\":{{\"deep\":{},", nested(levels)),
                1,
            );
            (format!("{levels} levels deep"), body.into_bytes())
        }
        7 => {
            let text = String::from_utf8(json_body(&message)).unwrap();
            let body = match target {
                Target::Start => text.replacen(
                    "\"amount\":100",
                    "\"amount\":1e2,\"big\":123456789012345678901234567890",
                    1,
                ),
                _ => text.replacen(
                    "\"attempt\":1",
                    "\"attempt\":123456789012345678901234567890",
                    1,
                ),
            };
            ("an integer beyond 64 bits".into(), body.into_bytes())
        }
        _ => {
            message["padding"] = json!("p".repeat(MAX_MESSAGE_BYTES));
            ("a body over the message limit".into(), json_body(&message))
        }
    }
}

/// Headers that the broker takes (the whole header frame stays under 128 KiB): mostly the right
/// version, sometimes none or a wrong one, a few random ones, sometimes a large one.
fn junk_headers(rng: &mut Rng) -> (String, FieldTable) {
    let mut headers = FieldTable::default();
    let mut what = Vec::new();
    match rng.below(10) {
        0 => what.push("no version".to_owned()),
        1 => {
            headers.insert(header::SCHEMA_VERSION.into(), AMQPValue::LongInt(99));
            what.push("version 99".into());
        }
        2 => {
            headers.insert(
                header::SCHEMA_VERSION.into(),
                AMQPValue::LongString("1".into()),
            );
            what.push("version as text".into());
        }
        _ => {
            headers.insert(header::SCHEMA_VERSION.into(), AMQPValue::LongLongInt(1));
        }
    }
    for i in 0..rng.below(4) {
        // No short strings: RabbitMQ reads the tag `s` as a 16-bit integer and closes the
        // sender's connection.
        let value = match rng.below(4) {
            0 => AMQPValue::Boolean(rng.chance(50)),
            1 => AMQPValue::LongLongInt(rng.next() as i64),
            2 => AMQPValue::Double(rng.next() as f64),
            _ => {
                let len = rng.below(200);
                AMQPValue::LongString(String::from_utf8_lossy(&rng.bytes(len)).into_owned().into())
            }
        };
        headers.insert(format!("x-junk-{i}").into(), value);
    }
    if rng.chance(25) {
        let len = 20_000 + rng.below(105_000);
        headers.insert(
            "x-large".into(),
            AMQPValue::LongString("L".repeat(len).into()),
        );
        what.push(format!("a header of {len} bytes"));
    }
    (what.join(", "), headers)
}

/// Sagas with known outcomes, started over HTTP while the junk arrives: (id, expected status).
async fn start_good_sagas(system: &System, count: usize) -> Vec<(String, &'static str)> {
    let mut started = Vec::new();
    for i in 0..count {
        let sku = unique_sku("good");
        // Payments declines amounts over 100,000 cents: the saga is compensated.
        let (amount, expected) = if i % 3 == 2 {
            (150_000, "compensated")
        } else {
            (1_000 + i as i64, "completed")
        };
        let id = system
            .start_checkout(&order(&format!("good-{i}"), amount, &[(&sku, 1)]))
            .await;
        started.push((id, expected));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    started
}

/// Junk of every kind on `saga.start`, `saga.replies` and each participant's queue, mixed with
/// good sagas: the junk all lands in the matching `.dlq`, nothing else does, no connection is
/// lost, and the good sagas settle as the checkout rules say.
async fn junk_on_every_queue(backend: Backend) {
    let seed = std::env::var("HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("junk_on_every_queue: HOSTILE_SEED={seed}");
    let mut rng = Rng(seed);
    let system = System::start(Options::new(backend).label("hostile-queues")).await;
    let connections = service_connections(&system).await;
    let amqp = system.amqp().await;

    let targets: Vec<Target> = [Target::Start, Target::Replies]
        .into_iter()
        .chain(PARTICIPANTS.iter().map(|p| Target::Commands(p)))
        .collect();
    let good = async { start_good_sagas(&system, 9).await };
    // First every field of every message huge, and every limit broken, on each queue (the
    // failures seen), then random junk of every kind.
    let mut bodies: Vec<(Target, String, Vec<u8>)> = Vec::new();
    for target in &targets {
        let fields: Vec<String> = target
            .template()
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        for field in fields {
            let (what, body) = junk_of_kind(&mut rng, *target, HUGE_FIELD, field);
            bodies.push((*target, what, body));
        }
        for kind in LIMIT_KINDS {
            let (what, body) = junk_of_kind(&mut rng, *target, kind, String::new());
            bodies.push((*target, what, body));
        }
    }
    for _ in 0..20 {
        for target in &targets {
            let (what, body) = junk_body(&mut rng, *target);
            bodies.push((*target, what, body));
        }
    }
    let junk = async {
        let mut sent: BTreeMap<String, Vec<Sent>> = BTreeMap::new();
        for (n, (target, what_body, body)) in bodies.into_iter().enumerate() {
            let (what_headers, headers) = junk_headers(&mut rng);
            let (exchange, routing_key) = match target {
                Target::Commands(participant) => (COMMANDS_EXCHANGE, participant.to_owned()),
                _ => ("", target.queue()),
            };
            let reply_to = match target {
                Target::Start | Target::Replies => None,
                Target::Commands(_) if rng.chance(10) => None,
                Target::Commands(_) => Some(REPLIES_QUEUE),
            };
            let what = format!("{target:?} #{n}: {what_body}; headers: {what_headers}");
            let message =
                publish(&amqp, exchange, &routing_key, body, headers, reply_to, what).await;
            sent.entry(target.queue()).or_default().push(message);
        }
        sent
    };
    let (good, sent) = tokio::join!(good, junk);

    for (queue, messages) in &sent {
        take_dead_letters(&amqp, queue, messages).await;
    }
    let ids: Vec<String> = good.iter().map(|(id, _)| id.clone()).collect();
    let sagas = system
        .wait_all_settled(&ids, Duration::from_secs(120))
        .await;
    for ((_, expected), saga) in good.iter().zip(&sagas) {
        assert_eq!(status(saga), *expected, "{}", pretty(saga));
    }
    assert_eq!(
        system.list_all("").await.len(),
        good.len(),
        "no junk started a saga"
    );
    for target in &targets {
        let dlq = dead_letter_queue(&target.queue());
        if let Some(extra) = amqp.get(&dlq).await {
            panic!(
                "{dlq} holds more than the junk sent there: {:?} {}",
                dead_letter_reason(&extra),
                String::from_utf8_lossy(&extra.data[..extra.data.len().min(300)])
            );
        }
    }
    assert_no_reconnect(&system, &connections).await;
    assert_short_log_lines(&system);
    amqp.close().await;
}

saga_system::on_both_backends!(start_requests_are_checked, junk_on_every_queue);
