//! The API behind bearer tokens, in-process (see `support`): who gets in where, and what the
//! others are told.

mod support;

use orchestrator::auth::{AuthConfig, TokenText};
use orchestrator::http::HttpConfig;
use support::{Answer, App, Backend, answer, spawn_app_behind};

const OPERATOR: &str = "0perat0r-0perat0r-0perat0r-0perat0r";
const READER: &str = "reader.reader.reader.reader.reader";

async fn protected(metrics_open: bool) -> App {
    let tokens = TokenText::from(format!("ops operate {OPERATOR}; dashboards read {READER}"));
    let auth = AuthConfig::load(None, Some(&tokens), metrics_open, false).expect("valid tokens");
    spawn_app_behind(Backend::Sqlite, HttpConfig::default(), &auth).await
}

async fn call(
    app: &App,
    method: reqwest::Method,
    path: &str,
    authorization: &[&str],
    body: &str,
) -> Answer {
    let mut request = app
        .client
        .request(method, format!("{}{path}", app.url))
        .header("content-type", "application/json")
        .body(body.to_owned());
    for value in authorization {
        request = request.header("authorization", *value);
    }
    answer(request.send().await.unwrap()).await
}

async fn get(app: &App, path: &str, authorization: &[&str]) -> Answer {
    call(app, reqwest::Method::GET, path, authorization, "").await
}

async fn post(app: &App, path: &str, authorization: &[&str], body: &str) -> Answer {
    call(app, reqwest::Method::POST, path, authorization, body).await
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A 401 with the challenge, and a JSON reason that does not echo the token sent.
async fn assert_unauthorized(app: &App, method: reqwest::Method, path: &str, sent: &[&str]) {
    let response = app
        .client
        .request(method.clone(), format!("{}{path}", app.url))
        .header("content-type", "application/json");
    let response = sent
        .iter()
        .fold(response, |r, value| r.header("authorization", *value))
        .send()
        .await
        .unwrap();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let answer = answer(response).await;
    assert_eq!(
        answer.status, 401,
        "{method} {path} with {sent:?}: {answer:?}"
    );
    assert!(
        challenge
            .as_deref()
            .is_some_and(|c| c.starts_with("Bearer ")),
        "{method} {path}: {challenge:?}"
    );
    assert!(!answer.error().is_empty());
    for value in sent {
        let token = value.rsplit(' ').next().unwrap();
        assert!(
            token.is_empty() || !answer.body.to_string().contains(token),
            "{answer:?}"
        );
    }
}

#[tokio::test]
async fn without_a_usable_token_everything_but_health_is_401() {
    let app = protected(false).await;
    let wrong = bearer("not-a-token-not-a-token-not-a-token");
    let basic = format!("Basic {OPERATOR}");
    let bare = OPERATOR.to_owned();
    let two = [bearer(OPERATOR), bearer(OPERATOR)];
    let refused: [&[&str]; 6] = [
        &[],
        &[&wrong],
        &[&basic],
        &[&bare],
        &["Bearer "],
        &[&two[0], &two[1]],
    ];
    for sent in refused {
        for (method, path) in [
            (reqwest::Method::GET, "/sagas"),
            (
                reqwest::Method::GET,
                "/sagas/00000000-0000-0000-0000-000000000000",
            ),
            (reqwest::Method::POST, "/sagas/order"),
            (reqwest::Method::POST, "/sagas/x/abort"),
            (reqwest::Method::GET, "/set-aside"),
            (reqwest::Method::GET, "/definitions"),
            (reqwest::Method::GET, "/metrics"),
            (reqwest::Method::GET, "/no-such-route"),
        ] {
            assert_unauthorized(&app, method, path, sent).await;
        }
    }
    // Health stays open (/readyz is 503 here: no broker), and so does the API's description.
    assert_eq!(get(&app, "/healthz", &[]).await.status, 200);
    assert_eq!(get(&app, "/readyz", &[]).await.status, 503);
    assert_ne!(get(&app, "/openapi.json", &[]).await.status, 401);
    // Nothing was started by the refused requests.
    let listed = get(&app, "/sagas", &[&bearer(READER)]).await;
    assert_eq!(listed.status, 200, "{listed:?}");
    assert_eq!(
        listed.body["sagas"].as_array().map(Vec::len),
        Some(0),
        "{listed:?}"
    );
}

#[tokio::test]
async fn read_reads_and_operate_also_operates() {
    let app = protected(false).await;
    let (ops, reader) = (bearer(OPERATOR), bearer(READER));

    let refused = post(&app, "/sagas/order", &[&reader], r#"{"customer": "ada"}"#).await;
    assert_eq!(refused.status, 403, "{refused:?}");
    assert!(
        refused.error().contains("dashboards") && refused.error().contains("operate"),
        "{refused:?}"
    );
    // The scheme's case does not matter.
    let started = post(
        &app,
        "/sagas/order",
        &[&format!("bearer {OPERATOR}")],
        r#"{"customer": "ada"}"#,
    )
    .await;
    assert_eq!(started.status, 202, "{started:?}");
    let id = started.body["saga_id"].as_str().unwrap().to_owned();

    for path in [
        format!("/sagas/{id}"),
        "/sagas".into(),
        "/set-aside".into(),
        "/definitions".into(),
        "/metrics".into(),
    ] {
        for token in [&reader, &ops] {
            let answer = get(&app, &path, &[token]).await;
            assert_eq!(answer.status, 200, "GET {path}: {answer:?}");
        }
    }
    for command in [
        "abort",
        "retry",
        "retry-step",
        "mark-compensated",
        "mark-completed",
    ] {
        let refused = post(&app, &format!("/sagas/{id}/{command}"), &[&reader], "").await;
        assert_eq!(refused.status, 403, "{command}: {refused:?}");
    }
    let aborted = post(&app, &format!("/sagas/{id}/abort"), &[&ops], "").await;
    assert_eq!(aborted.status, 200, "{aborted:?}");
    assert_eq!(aborted.body["applied"], true, "{aborted:?}");
    // The saga's events say who aborted it: the token's name.
    let saga = get(&app, &format!("/sagas/{id}"), &[&reader]).await;
    assert_eq!(abort_event(&saga)["by"], "ops", "{saga:?}");
}

/// The `abort_requested` entry of a saga's history.
fn abort_event(saga: &Answer) -> &serde_json::Value {
    saga.body["history"]
        .as_array()
        .and_then(|h| h.iter().find(|e| e["type"] == "abort_requested"))
        .unwrap_or_else(|| panic!("no abort_requested in {saga:?}"))
}

#[tokio::test]
async fn metrics_can_be_left_open_for_a_scraper() {
    let app = protected(true).await;
    let metrics = get(&app, "/metrics", &[]).await;
    assert_eq!(metrics.status, 200, "{metrics:?}");
    assert_unauthorized(&app, reqwest::Method::GET, "/sagas", &[]).await;
}

#[tokio::test]
async fn without_tokens_the_api_is_open() {
    let app = support::spawn_app().await;
    assert_eq!(get(&app, "/sagas", &[]).await.status, 200);
    let id = app.start().await;
    let aborted = post(&app, &format!("/sagas/{id}/abort"), &[], "").await;
    assert_eq!(aborted.status, 200, "{aborted:?}");
    // No one in particular aborted it.
    let saga = get(&app, &format!("/sagas/{id}"), &[]).await;
    assert!(abort_event(&saga).get("by").is_none(), "{saga:?}");
}
