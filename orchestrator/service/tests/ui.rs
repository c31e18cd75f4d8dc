//! The web view (`/ui`) over HTTP, in-process (see `support`): what it shows, that saga input
//! is escaped, and its authentication: the login page, the session cookie, the roles of the
//! actions and their CSRF guard. The browser test is tests/tests/ui.rs.

mod support;

use orchestrator::auth::{AuthConfig, TokenText};
use orchestrator::http::HttpConfig;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::redirect::Policy;
use support::{App, Backend, answer, spawn_app, spawn_app_behind};

const OPERATOR: &str = "0perat0r-0perat0r-0perat0r-0perat0r";
const READER: &str = "reader.reader.reader.reader.reader";

/// A client that shows redirects instead of following them.
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap()
}

struct Page {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

async fn get(app: &App, path: &str, cookie: Option<&str>) -> Page {
    let mut request = browser().get(format!("{}{path}", app.url));
    if let Some(cookie) = cookie {
        request = request.header(COOKIE, cookie);
    }
    let response = request.send().await.unwrap();
    Page {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: response.text().await.unwrap(),
    }
}

/// Logs in with `token` through the form, as a browser posts it; returns the answer.
async fn log_in(app: &App, token: &str, origin: Option<&str>) -> Page {
    let mut request = browser()
        .post(format!("{}/ui/login", app.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={token}&next=%2Fui%2Fsagas%2Fx"));
    if let Some(origin) = origin {
        request = request.header("origin", origin);
    }
    let response = request.send().await.unwrap();
    Page {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: response.text().await.unwrap(),
    }
}

/// The `name=value` of the session cookie a login set.
fn session(page: &Page) -> String {
    let set = page.headers[SET_COOKIE].to_str().unwrap();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attribute), "{set}");
    }
    set.split(';').next().unwrap().to_owned()
}

/// `POST /sagas/{id}/{action}` as the view's script sends it: the session cookie, JSON, and
/// (unless `without_header`) the X-Saga-UI header.
async fn act(app: &App, id: &str, action: &str, cookie: &str, with_header: bool) -> (u16, String) {
    let mut request = browser()
        .post(format!("{}/sagas/{id}/{action}", app.url))
        .header(COOKIE, cookie)
        .header("content-type", "application/json")
        .body("{}");
    if with_header {
        request = request.header("x-saga-ui", "1");
    }
    let answer = answer(request.send().await.unwrap()).await;
    (answer.status, answer.body.to_string())
}

#[tokio::test]
async fn without_tokens_the_view_is_open_and_shows_a_saga() {
    let app = spawn_app().await;
    let started = app
        .send(
            "/sagas/order",
            Some("application/json"),
            br#"{"customer": "<script>alert('x')</script>"}"#,
            &[("idempotency-key", b"order-<b>1</b>")],
        )
        .await;
    assert_eq!(started.status, 202, "{started:?}");
    let id = started.body["saga_id"].as_str().unwrap().to_owned();

    let list = get(&app, "/ui", None).await;
    assert_eq!(list.status, 200, "{}", list.body);
    assert!(
        list.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(
        list.headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'self'")
    );
    assert!(list.body.contains(&id), "{}", list.body);
    assert!(
        list.body.contains("no API tokens configured"),
        "{}",
        list.body
    );
    // Counts per status, and the filters.
    assert!(
        list.body.contains(r#"data-status="running""#),
        "{}",
        list.body
    );
    let running = get(&app, "/ui?status=running&name=order", None).await;
    assert!(running.body.contains(&id));
    let completed = get(&app, "/ui?status=completed", None).await;
    assert!(!completed.body.contains(&id) && completed.body.contains("No saga matches"));
    let by_key = get(&app, "/ui?key=order-%3Cb%3E1%3C%2Fb%3E", None).await;
    assert!(by_key.body.contains(&id), "{}", by_key.body);
    assert!(!get(&app, "/ui?key=other", None).await.body.contains(&id));
    let by_id = get(&app, &format!("/ui?id={id}"), None).await;
    assert_eq!(by_id.status, 303);
    assert_eq!(by_id.headers[LOCATION], format!("/ui/sagas/{id}").as_str());
    assert_eq!(get(&app, "/ui?id=nope", None).await.status, 400);
    assert_eq!(get(&app, "/ui?status=lost", None).await.status, 400);

    let saga = get(&app, &format!("/ui/sagas/{id}"), None).await;
    assert_eq!(saga.status, 200);
    for shown in [
        "Timeline",
        "saga_started",
        "command_sent",
        "flowchart TD",
        "class s0_reserve running",
        "saga.commands.stock",
        "http://localhost:15672/#/queues/%2F/saga.commands.stock",
        r#"data-action="abort""#,
    ] {
        assert!(
            saga.body.contains(shown),
            "{shown} missing from {}",
            saga.body
        );
    }
    // What the saga carries is escaped, in the data, the timeline and the keys.
    assert!(!saga.body.contains("<script>alert"), "{}", saga.body);
    assert!(!saga.body.contains("<b>1</b>"), "{}", saga.body);
    assert!(saga.body.contains("&lt;script&gt;alert"), "{}", saga.body);

    // Pages follow the API's cursor: two more sagas, two a page, each saga on one page.
    let ids = [id.clone(), app.start().await, app.start().await];
    let first = get(&app, "/ui?limit=2", None).await;
    let next = first
        .body
        .split(r#"rel="next" href=""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no next page link in {}", first.body))
        .replace("&amp;", "&");
    let second = get(&app, &next, None).await;
    assert!(!second.body.contains(r#"rel="next""#), "{}", second.body);
    let on = |page: &Page| {
        ids.iter()
            .filter(|i| page.body.contains(i.as_str()))
            .count()
    };
    assert_eq!((on(&first), on(&second)), (2, 1), "{next}");
    for saga in &ids {
        assert!(first.body.contains(saga.as_str()) != second.body.contains(saga.as_str()));
    }

    let missing = get(&app, "/ui/sagas/00000000-0000-0000-0000-000000000000", None).await;
    assert_eq!(missing.status, 404);
    assert!(missing.body.contains("No saga has the id"));

    let asset = get(&app, "/ui/assets/mermaid.min.js", None).await;
    assert_eq!(asset.status, 200);
    assert!(
        asset.headers["cache-control"]
            .to_str()
            .unwrap()
            .contains("immutable")
    );
    assert!(asset.body.len() > 1_000_000);
    assert_eq!(get(&app, "/ui/assets/nothing.js", None).await.status, 404);
}

async fn protected() -> App {
    let tokens = TokenText::from(format!("ops operate {OPERATOR}; viewer read {READER}"));
    let auth = AuthConfig::load(None, Some(&tokens), false, false).expect("valid tokens");
    spawn_app_behind(Backend::Sqlite, HttpConfig::default(), &auth).await
}

#[tokio::test]
async fn with_tokens_people_log_in_and_the_roles_hold() {
    let app = protected().await;
    let id = {
        let answer = app
            .send(
                "/sagas/order",
                Some("application/json"),
                br#"{"customer": "ada"}"#,
                &[("authorization", format!("Bearer {OPERATOR}").as_bytes())],
            )
            .await;
        assert_eq!(answer.status, 202, "{answer:?}");
        answer.body["saga_id"].as_str().unwrap().to_owned()
    };

    // No token: to the login page, and back here after it.
    let page = get(&app, &format!("/ui/sagas/{id}"), None).await;
    assert_eq!(page.status, 303);
    let location = page.headers[LOCATION].to_str().unwrap();
    assert_eq!(location, format!("/ui/login?next=%2Fui%2Fsagas%2F{id}"));
    let login = get(&app, location, None).await;
    assert_eq!(login.status, 200);
    assert!(login.body.contains(r#"name="token""#), "{}", login.body);
    // The login form's assets are open; the API still answers JSON 401.
    assert_eq!(get(&app, "/ui/assets/ui.css", None).await.status, 200);
    assert_eq!(get(&app, "/sagas", None).await.status, 401);

    let wrong = log_in(&app, "not-a-token-not-a-token-not-a-token", None).await;
    assert_eq!(wrong.status, 401);
    assert!(
        wrong.body.contains("That token is not valid"),
        "{}",
        wrong.body
    );
    assert!(!wrong.headers.contains_key(SET_COOKIE));
    let forged = log_in(&app, READER, Some("http://evil.example")).await;
    assert_eq!(forged.status, 403);
    assert!(!forged.headers.contains_key(SET_COOKIE));

    // A read token: the view, with the actions disabled and saying why; the API refuses them.
    let reader = log_in(&app, READER, Some(&app.url)).await;
    assert_eq!(reader.status, 303, "{}", reader.body);
    assert_eq!(reader.headers[LOCATION], "/ui/sagas/x");
    let reader = session(&reader);
    let page = get(&app, &format!("/ui/sagas/{id}"), Some(&reader)).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("signed in as"), "{}", page.body);
    assert!(
        page.body
            .contains("these actions need a token with the role operate"),
        "{}",
        page.body
    );
    let (status, body) = act(&app, &id, "abort", &reader, true).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("token `viewer` has the role read"), "{body}");
    assert_eq!(get(&app, "/ui", Some(&reader)).await.status, 200);

    // Behind a proxy that terminates TLS, the cookie is never sent in clear.
    let behind_tls = browser()
        .post(format!("{}/ui/login", app.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-proto", "https")
        .body(format!("token={READER}"))
        .send()
        .await
        .unwrap();
    assert!(
        behind_tls.headers()[SET_COOKIE]
            .to_str()
            .unwrap()
            .ends_with("; Secure")
    );

    // An operate token: the action works, but only with the header a cross-site form lacks.
    let operator = session(&log_in(&app, OPERATOR, None).await);
    let (status, body) = act(&app, &id, "abort", &operator, false).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("X-Saga-UI"), "{body}");
    let (status, body) = act(&app, &id, "abort", &operator, true).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""applied":true"#), "{body}");
    let page = get(&app, &format!("/ui/sagas/{id}?done=abort"), Some(&operator)).await;
    assert!(page.body.contains("abort_requested"), "{}", page.body);
    assert!(page.body.contains("abort: done."), "{}", page.body);

    // A cookie whose token is gone sends the person to log in again; logging out clears it.
    let stale = get(
        &app,
        "/ui",
        Some("saga_session=gone-gone-gone-gone-gone-gone-gone"),
    )
    .await;
    assert_eq!(stale.status, 303);
    assert!(
        stale.headers[LOCATION]
            .to_str()
            .unwrap()
            .ends_with("why=expired")
    );
    let out = browser()
        .post(format!("{}/ui/logout", app.url))
        .header(COOKIE, &operator)
        .send()
        .await
        .unwrap();
    assert_eq!(out.status().as_u16(), 303);
    assert!(
        out.headers()[SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
}
