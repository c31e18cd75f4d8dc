//! A property-based fuzz of the HTTP API on both backends: random methods, paths (ids, names,
//! percent-encoded junk with `%00`), query strings (duplicates, long values, NUL, bad cursors),
//! headers (content types, idempotency keys) and bodies (random JSON, deep nesting, long
//! strings, big numbers, bytes that are not JSON). Whatever comes, the answer is never a 5xx,
//! every error has a JSON body with an `error` string, and afterwards sagas can still be
//! started and read back, the fuzz's own included.

mod support;

use std::fmt;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Value, json};
use support::{App, Backend, spawn_app_on};

/// Cases per backend: enough to reach every kind of input, few enough to finish in seconds.
const CASES: u32 = 300;

/// The operator commands, as path suffixes.
const COMMANDS: [&str; 5] = [
    "abort",
    "retry",
    "retry-step",
    "mark-completed",
    "mark-compensated",
];

/// Where a request goes: a saga started before the fuzz is picked by index.
#[derive(Debug, Clone)]
enum Target {
    Fixed(&'static str),
    Saga(usize),
    Command(usize, &'static str),
    Junk(String),
    JunkUnder(&'static str, String),
}

#[derive(Clone)]
struct Request {
    method: &'static str,
    target: Target,
    query: Vec<(String, String)>,
    content_type: Option<&'static str>,
    idempotency_key: Option<Vec<u8>>,
    body: Vec<u8>,
}

impl fmt::Debug for Request {
    // Bodies run to megabytes: show their start.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let body = String::from_utf8_lossy(&self.body[..self.body.len().min(300)]);
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("target", &self.target)
            .field("query", &self.query)
            .field("content_type", &self.content_type)
            .field("idempotency_key", &self.idempotency_key)
            .field("body", &format!("{body}… ({} bytes)", self.body.len()))
            .finish()
    }
}

impl Request {
    fn path(&self, sagas: &[String]) -> String {
        let mut path = match &self.target {
            Target::Fixed(path) => (*path).to_owned(),
            Target::Saga(i) => format!("/sagas/{}", sagas[i % sagas.len()]),
            Target::Command(i, command) => format!("/sagas/{}/{command}", sagas[i % sagas.len()]),
            Target::Junk(junk) => format!("/{junk}"),
            Target::JunkUnder(prefix, junk) => format!("{prefix}/{junk}"),
        };
        if !self.query.is_empty() {
            let pairs: Vec<String> = self.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
            path = format!("{path}?{}", pairs.join("&"));
        }
        path
    }
}

/// Percent-encoded random bytes (letters and digits kept as they are), `%00` included.
fn junk(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<u8>(), 0..max).prop_map(|bytes| {
        bytes
            .iter()
            .map(|b| match b {
                b'a'..=b'z' | b'0'..=b'9' => (*b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    })
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        prop::sample::select(vec![
            "/sagas",
            "/sagas/order",
            "/sagas/order/abort",
            "/set-aside",
            "/definitions",
            "/healthz",
            "/metrics",
            "/",
        ])
        .prop_map(Target::Fixed),
        (0..3usize).prop_map(Target::Saga),
        (0..3usize, prop::sample::select(COMMANDS.to_vec()))
            .prop_map(|(i, c)| Target::Command(i, c)),
        junk(24).prop_map(Target::Junk),
        (
            prop::sample::select(vec!["/sagas", "/set-aside", "/sagas/order"]),
            junk(24)
        )
            .prop_map(|(p, j)| Target::JunkUnder(p, j)),
    ]
}

fn query_value() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "running",
            "completed",
            "order",
            "10",
            "0",
            "501",
            "%00",
            "a%00b",
            "",
            // Year -250000, and one past 9999.
            "-7952618304000000000_00000000-0000-0000-0000-000000000000",
            "253402300800000000_00000000-0000-0000-0000-000000000000",
        ])
        .prop_map(str::to_owned),
        junk(16),
        (0..12_000usize).prop_map(|n| "v".repeat(n)),
        (any::<i64>(), any::<u128>())
            .prop_map(|(m, id)| format!("{m}_{}", uuid::Uuid::from_u128(id))),
    ]
}

fn query() -> impl Strategy<Value = Vec<(String, String)>> {
    let key = prop_oneof![
        prop::sample::select(vec!["status", "name", "limit", "cursor"]).prop_map(str::to_owned),
        junk(8),
    ];
    prop::collection::vec((key, query_value()), 0..4)
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        json_value().prop_map(|v| json!({"customer": "ada", "extra": v})
            .to_string()
            .into_bytes()),
        (
            json_value(),
            prop::sample::select(vec!["reserve", "ship", "nope"])
        )
            .prop_map(|(output, step)| json!({"step": step, "output": output})
                .to_string()
                .into_bytes()),
        any::<String>().prop_map(|r| json!({"reason": r}).to_string().into_bytes()),
        (1..160usize).prop_map(|n| format!(
            r#"{{"customer": "ada", "deep": {}1{}}}"#,
            "[".repeat(n),
            "]".repeat(n)
        )
        .into_bytes()),
        prop::sample::select(vec![1_000usize, 300_000, 1_100_000]).prop_map(|n| format!(
            r#"{{"customer": "{}"}}"#,
            "c".repeat(n)
        )
        .into_bytes()),
        prop::sample::select(vec![
            "18446744073709551616",
            "-9223372036854775809",
            "1e400",
            "-0",
            "123456789012345678901234567890",
        ])
        .prop_map(|n| format!(r#"{{"customer": "ada", "amount": {n}}}"#).into_bytes()),
        prop::collection::vec(any::<u8>(), 0..64),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    (
        prop::sample::select(vec![
            "GET", "GET", "POST", "POST", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS",
        ]),
        target(),
        query(),
        prop::option::of(prop::sample::select(vec![
            "application/json",
            "application/json; charset=utf-8",
            "text/plain",
            "application/x-www-form-urlencoded",
            "application/xml",
            "multipart/form-data; boundary=x",
            "application/json;;;",
            "json",
        ])),
        prop::option::of(prop_oneof![
            Just(b"order-1".to_vec()),
            Just(Vec::new()),
            Just(vec![b'k'; 300]),
            Just(b"a\tb".to_vec()),
            Just("café".as_bytes().to_vec()),
            prop::collection::vec(32u8..127, 1..40),
        ]),
        body(),
    )
        .prop_map(
            |(method, target, query, content_type, idempotency_key, body)| Request {
                method,
                target,
                query,
                content_type,
                idempotency_key,
                body,
            },
        )
}

/// Sends `request`; fails the case on a 5xx or an error without a JSON `error` string.
/// Returns the id of a saga it started.
async fn check(app: &App, sagas: &[String], request: &Request) -> Result<Option<String>, String> {
    let url = format!("{}{}", app.url, request.path(sagas));
    let method = reqwest::Method::from_bytes(request.method.as_bytes()).unwrap();
    let mut builder = app.client.request(method, &url).body(request.body.clone());
    if let Some(content_type) = request.content_type {
        builder = builder.header("content-type", content_type);
    }
    if let Some(key) = &request.idempotency_key {
        let value = reqwest::header::HeaderValue::from_bytes(key).expect("a header value");
        builder = builder.header("idempotency-key", value);
    }
    let response = builder
        .send()
        .await
        .map_err(|e| format!("no answer: {e:?}"))?;
    let answer = support::answer(response).await;
    let shown = || {
        let mut text = format!("{:?}", answer.body);
        text.truncate(500);
        format!(
            "{} {} ({}): {text}",
            answer.status,
            answer.content_type,
            url.len()
        )
    };
    if answer.status >= 500 {
        return Err(format!("a server error: {}", shown()));
    }
    if answer.status >= 400 && request.method != "HEAD" {
        let json = answer.content_type.starts_with("application/json");
        if !json || !answer.body["error"].is_string() {
            return Err(format!("an error without a JSON reason: {}", shown()));
        }
    }
    Ok(match (answer.status, answer.body["saga_id"].as_str()) {
        (202, Some(id)) => Some(id.to_owned()),
        _ => None,
    })
}

fn fuzz(backend: Backend) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = rt.block_on(spawn_app_on(backend));
    let mut sagas: Vec<String> = rt.block_on(async {
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(app.start().await);
        }
        ids
    });
    let known = sagas.clone();
    let started = std::cell::RefCell::new(Vec::new());
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        max_shrink_iters: 200,
        ..Config::default()
    });
    let result = runner.run(&request(), |request| {
        let id = rt
            .block_on(check(&app, &known, &request))
            .map_err(TestCaseError::fail)?;
        started.borrow_mut().extend(id);
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{backend:?}: {failure}");
    }
    sagas.extend(started.into_inner());

    rt.block_on(async {
        // Good requests still work, and everything the fuzz started reads back.
        sagas.push(app.start().await);
        let (status, body) = app.get("/sagas?limit=500").await;
        assert_eq!(status, 200, "{body}");
        for id in &sagas {
            let (status, body) = app.get(&format!("/sagas/{id}")).await;
            assert_eq!(status, 200, "{id}: {body}");
        }
        let (status, body) = app.get("/set-aside").await;
        assert_eq!(status, 200, "{body}");
    });
    drop(app);
}

#[test]
fn the_api_survives_random_requests_on_sqlite() {
    fuzz(Backend::Sqlite);
}

#[test]
fn the_api_survives_random_requests_on_postgres() {
    fuzz(Backend::Postgres);
}
