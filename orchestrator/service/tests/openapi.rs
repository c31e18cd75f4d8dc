//! The OpenAPI document: the committed copy against the code, the served one against the
//! router, and real answers of the API (a saga in each state, every error) against the
//! schemas the document gives for their status.

mod support;

use std::path::PathBuf;

use orchestrator::openapi::{self, REGENERATE_COMMAND};
use orchestrator::runtime::Work;
use saga_engine::Input;
use saga_schemas::{Direction, Outcome};
use serde_json::{Value, json};
use support::{Answer, App, spawn_app};
use uuid::Uuid;

fn committed_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../openapi.json")
}

#[test]
fn the_committed_document_is_what_the_code_generates() {
    let path = committed_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}\nregenerate it with: {REGENERATE_COMMAND}",
            path.display()
        )
    });
    let committed: Value = serde_json::from_str(&text).expect("the committed document is JSON");
    assert!(
        committed == openapi::document(),
        "orchestrator/openapi.json differs from what the code generates; \
         regenerate it with: {REGENERATE_COMMAND}"
    );
}

/// Every `$ref` in `value`.
fn refs<'a>(value: &'a Value, found: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(target)) = map.get("$ref") {
                found.push(target);
            }
            map.values().for_each(|v| refs(v, found));
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, found)),
        _ => {}
    }
}

#[test]
fn the_document_is_openapi_3_1_and_every_reference_resolves() {
    let document = openapi::document();
    assert_eq!(document["openapi"], "3.1.0");
    let mut found = Vec::new();
    refs(&document, &mut found);
    assert!(!found.is_empty());
    for target in found {
        let pointer = target
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("{target} is not local"));
        assert!(
            document.pointer(pointer).is_some(),
            "{target} points at nothing"
        );
    }
    // Names the readers of `GET /sagas/{id}` had to guess before.
    let schemas = &document["components"]["schemas"];
    for name in [
        "SagaView",
        "StepView",
        "HistoryEntry",
        "WaitingOn",
        "SagaEvent",
        "StepStatus",
        "StartResponse",
        "SagaList",
        "SetAsideList",
        "CommandOutcome",
        "Readiness",
        "ErrorBody",
        "AbortBody",
        "MarkBody",
        "MarkCompletedBody",
    ] {
        assert!(schemas.get(name).is_some(), "no component {name}");
    }
    assert!(
        schemas["StepStatus"].to_string().contains("waiting_retry"),
        "{}",
        schemas["StepStatus"]
    );
}

#[test]
fn the_document_says_which_operations_need_which_role() {
    let document = openapi::document();
    assert_eq!(
        document["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let security = |method: &str, path: &str| document["paths"][path][method]["security"].clone();
    assert_eq!(
        security("get", "/sagas/{saga}"),
        json!([{"bearer": ["read"]}])
    );
    assert_eq!(security("get", "/metrics"), json!([{"bearer": ["read"]}]));
    assert_eq!(
        security("post", "/sagas/{saga}/abort"),
        json!([{"bearer": ["operate"]}])
    );
    for open in ["/healthz", "/readyz", "/openapi.json"] {
        assert_eq!(security("get", open), Value::Null, "{open}");
    }
    let responses = &document["paths"]["/sagas"]["get"]["responses"];
    assert!(responses["401"].is_object() && responses["403"].is_object());
    assert!(
        document["paths"]["/healthz"]["get"]["responses"]["401"].is_null(),
        "an open endpoint never says 401"
    );
}

/// Every operation of the document as (method, path).
fn operations(document: &Value) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            found.push((method.clone(), path.clone()));
        }
    }
    found.sort();
    found
}

#[tokio::test]
async fn the_document_is_served_and_lists_every_route() {
    let app = spawn_app().await;
    let answer = app.get_answer("/openapi.json").await;
    assert_eq!(answer.status, 200);
    assert!(answer.content_type.starts_with("application/json"));
    assert_eq!(answer.body, openapi::document());

    let expected: Vec<(String, String)> = [
        ("get", "/definitions"),
        ("get", "/healthz"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
        ("get", "/readyz"),
        ("get", "/sagas"),
        ("get", "/sagas/{saga}"),
        ("get", "/set-aside"),
        ("post", "/sagas/{saga}"),
        ("post", "/sagas/{saga}/abort"),
        ("post", "/sagas/{saga}/mark-compensated"),
        ("post", "/sagas/{saga}/mark-completed"),
        ("post", "/sagas/{saga}/retry"),
        ("post", "/sagas/{saga}/retry-step"),
    ]
    .iter()
    .map(|(m, p)| (m.to_string(), p.to_string()))
    .collect();
    assert_eq!(operations(&answer.body), expected);

    // The router answers each as documented: not its fallbacks for unknown routes or methods.
    for (method, path) in expected {
        let path = path.replace("{saga}", &Uuid::new_v4().to_string());
        let url = format!("{}{path}", app.url);
        let request = match method.as_str() {
            "get" => app.client.get(url),
            _ => app.client.post(url),
        };
        let answer = support::answer(request.send().await.unwrap()).await;
        assert_ne!(answer.status, 405, "{method} {path}: {answer:?}");
        if answer.status == 404 {
            assert!(
                !answer.error().starts_with("nothing answers"),
                "{method} {path} is documented but not routed"
            );
        }
    }
}

/// Checks `answer` to `method path` against the schema the document gives for its status.
fn conforms(document: &Value, method: &str, path: &str, answer: &Answer) {
    let operation = &document["paths"][path][method];
    let response = &operation["responses"][answer.status.to_string()];
    assert!(
        response.is_object(),
        "{method} {path}: status {} is not documented: {answer:?}",
        answer.status
    );
    let (media, content) = response["content"]
        .as_object()
        .and_then(|c| c.iter().next())
        .unwrap_or_else(|| panic!("{method} {path} {}: no content", answer.status));
    assert!(
        answer.content_type.starts_with(media.as_str()),
        "{method} {path}: {} is not {media}",
        answer.content_type
    );
    // The schema, with the document's components beside it for its `$ref`s.
    let mut schema = content["schema"].clone();
    schema["components"] = document["components"].clone();
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("{method} {path}: the schema does not compile: {e}"));
    let errors: Vec<String> = validator
        .iter_errors(&answer.body)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {path} {}: {errors:?}\n{:#}",
        answer.status,
        answer.body
    );
}

async fn reply(app: &App, saga: &str, step: &str, attempt: u32, outcome: Outcome) {
    let saga_id: Uuid = saga.parse().unwrap();
    let work = Work {
        saga_id,
        input: Input::Reply {
            step: step.into(),
            direction: Direction::Execute,
            attempt,
            in_reply_to: saga_engine::engine::command_message_id(
                saga_id,
                step,
                Direction::Execute,
                attempt,
            ),
            outcome,
        },
        inbox_id: Some(Uuid::new_v4()),
        fired_timer: None,
        trace: None,
    };
    for result in app.runtime.handle(&[work]).await {
        result.expect("the reply is handled");
    }
}

#[tokio::test]
async fn real_answers_match_the_document() {
    let app = spawn_app().await;
    let document = openapi::document();
    let get = |path: &str, template: &'static str| {
        let (app, document, path) = (&app, &document, path.to_owned());
        async move {
            let answer = app.get_answer(&path).await;
            conforms(document, "get", template, &answer);
            answer
        }
    };
    let post = |path: &str, template: &'static str, body: &str| {
        let (app, document, path, body) = (&app, &document, path.to_owned(), body.to_owned());
        async move {
            let answer = app
                .send(&path, Some("application/json"), body.as_bytes(), &[])
                .await;
            conforms(document, "post", template, &answer);
            answer
        }
    };

    // A saga waiting for a retry of its first step, with output and errors in its history.
    let started = post("/sagas/order", "/sagas/{saga}", r#"{"customer": "ada"}"#).await;
    assert_eq!(started.status, 202);
    let retrying = started.body["saga_id"].as_str().unwrap().to_owned();
    reply(
        &app,
        &retrying,
        "reserve",
        1,
        Outcome::RetryableError {
            error: "stock service down".into(),
        },
    )
    .await;
    let view = get(&format!("/sagas/{retrying}"), "/sagas/{saga}").await;
    assert_eq!(view.body["steps"][0]["status"], "waiting_retry", "{view:?}");
    assert!(view.body["waiting_on"].is_object(), "{view:?}");

    // A saga compensated after a business failure, and one completed.
    let failed = app.start().await;
    reply(
        &app,
        &failed,
        "reserve",
        1,
        Outcome::Failure {
            reason: "no stock".into(),
        },
    )
    .await;
    let completed = app.start().await;
    let output = json!({"reservation": "r-1"}).as_object().unwrap().clone();
    reply(&app, &completed, "reserve", 1, Outcome::Success { output }).await;
    reply(
        &app,
        &completed,
        "ship",
        1,
        Outcome::Success {
            output: Default::default(),
        },
    )
    .await;
    for saga in [&failed, &completed] {
        let view = get(&format!("/sagas/{saga}"), "/sagas/{saga}").await;
        assert_eq!(view.status, 200);
    }

    // Listings, with and without a next page; the operator commands' outcomes.
    let page = get("/sagas?limit=1", "/sagas").await;
    let cursor = page.body["next_cursor"].as_str().unwrap().to_owned();
    get(&format!("/sagas?limit=1&cursor={cursor}"), "/sagas").await;
    get("/sagas?status=completed", "/sagas").await;
    get("/set-aside", "/set-aside").await;
    get("/definitions", "/definitions").await;
    let aborted = post(
        &format!("/sagas/{retrying}/abort"),
        "/sagas/{saga}/abort",
        r#"{"reason": "customer left"}"#,
    )
    .await;
    assert_eq!(aborted.body["applied"], true, "{aborted:?}");
    let again = post(
        &format!("/sagas/{retrying}/abort"),
        "/sagas/{saga}/abort",
        "",
    )
    .await;
    assert_eq!(again.status, 409, "{again:?}");
    let view = get(&format!("/sagas/{retrying}"), "/sagas/{saga}").await;
    assert_eq!(view.body["status"], "compensated", "{view:?}");

    // Refusals, each with its documented status and the error body.
    let unknown = Uuid::new_v4();
    for (status, answer) in [
        (404, post("/sagas/nope", "/sagas/{saga}", "{}").await),
        (422, post("/sagas/order", "/sagas/{saga}", "[1]").await),
        (400, get("/sagas/not-a-uuid", "/sagas/{saga}").await),
        (
            404,
            get(&format!("/sagas/{unknown}"), "/sagas/{saga}").await,
        ),
        (400, get("/sagas?limit=0", "/sagas").await),
        (400, get("/set-aside?limit=x", "/set-aside").await),
        (
            409,
            post(
                &format!("/sagas/{completed}/retry"),
                "/sagas/{saga}/retry",
                "",
            )
            .await,
        ),
        (
            422,
            post(
                &format!("/sagas/{completed}/mark-compensated"),
                "/sagas/{saga}/mark-compensated",
                r#"{"stp": "reserve"}"#,
            )
            .await,
        ),
    ] {
        assert_eq!(answer.status, status, "{answer:?}");
    }
    let unsupported = app
        .send("/sagas/order", Some("text/plain"), b"{}", &[])
        .await;
    conforms(&document, "post", "/sagas/{saga}", &unsupported);
    assert_eq!(unsupported.status, 415);

    // Health: the broker is not connected in this test, so not ready.
    get("/healthz", "/healthz").await;
    let ready = get("/readyz", "/readyz").await;
    assert_eq!(ready.status, 503);
}
