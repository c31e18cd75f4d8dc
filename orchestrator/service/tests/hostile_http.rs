//! Hostile and malformed requests: each gets a 4xx with a JSON `{"error": ...}` saying why,
//! never a 5xx with a raw database error; the limits of `saga_schemas::limits` hold over HTTP
//! as over AMQP; slow or greedy clients cannot hold the server. The scenarios that reach the
//! database run on SQLite and on PostgreSQL (a database of its own, through `DATABASE_URL`).

mod support;

use std::time::Duration;

use chrono::NaiveDate;
use orchestrator::http::HttpConfig;
use saga_schemas::limits::{MAX_DATA_BYTES, MAX_MESSAGE_BYTES, MAX_REASON_CHARS};
use serde_json::json;
use support::{App, Backend, spawn_app, spawn_app_on, spawn_app_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs each scenario on both backends: `<scenario>::sqlite` and `<scenario>::postgres`.
macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$scenario(super::spawn_app_on(super::Backend::Sqlite).await).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$scenario(super::spawn_app_on(super::Backend::Postgres).await).await
            }
        }
    )*};
}

on_both_backends!(
    query_values_that_cannot_reach_the_database_are_400,
    cursors_outside_years_1970_to_9999_are_400,
    a_store_failure_is_503_with_a_generic_message,
    bodies_are_held_to_the_shared_limits,
);

async fn count_sagas(app: &App) -> usize {
    let (status, body) = app.get("/sagas").await;
    assert_eq!(status, 200, "{body}");
    body["sagas"].as_array().unwrap().len()
}

async fn query_values_that_cannot_reach_the_database_are_400(app: App) {
    for (query, param) in [
        ("name=a%00b", "name"),
        ("name=a%0Ab", "name"),
        ("status=%01running", "status"),
        ("cursor=%00", "cursor"),
    ] {
        let answer = app.get_answer(&format!("/sagas?{query}")).await;
        assert_eq!(answer.status, 400, "{query}: {answer:?}");
        assert!(
            answer.error().contains(param) && answer.error().contains("control"),
            "{query}: {answer:?}"
        );
    }
    let long = "n".repeat(2000);
    let answer = app.get_answer(&format!("/sagas?name={long}")).await;
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(answer.error().contains("name"), "{answer:?}");
    // A name that is merely unknown is a filter that matches nothing.
    app.start().await;
    let (status, body) = app.get("/sagas?name=caf%C3%A9").await;
    assert_eq!((status, body["sagas"].clone()), (200, json!([])), "{body}");
    assert_eq!(count_sagas(&app).await, 1);
}

fn cursor_at_year(year: i32) -> String {
    let micros = NaiveDate::from_ymd_opt(year, 1, 1)
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
        .timestamp_micros();
    format!("{micros}_{}", uuid::Uuid::nil())
}

async fn cursors_outside_years_1970_to_9999_are_400(app: App) {
    for cursor in [
        cursor_at_year(-250_000),
        cursor_at_year(10_000),
        "-1_00000000-0000-0000-0000-000000000000".to_owned(),
        format!("{}_{}", i64::MAX, uuid::Uuid::nil()),
    ] {
        let answer = app.get_answer(&format!("/sagas?cursor={cursor}")).await;
        assert_eq!(answer.status, 400, "{cursor}: {answer:?}");
        assert!(answer.error().contains("cursor"), "{answer:?}");
    }
    // The cursors the API hands out still page through every saga.
    for _ in 0..3 {
        app.start().await;
    }
    let (status, page) = app.get("/sagas?limit=2").await;
    assert_eq!(status, 200, "{page}");
    let cursor = page["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let (status, rest) = app.get(&format!("/sagas?limit=2&cursor={cursor}")).await;
    assert_eq!(status, 200, "{rest}");
    assert_eq!(rest["sagas"].as_array().unwrap().len(), 1, "{rest}");
    let early = cursor_at_year(1970);
    let (status, none) = app.get(&format!("/sagas?cursor={early}")).await;
    assert_eq!((status, none["sagas"].clone()), (200, json!([])), "{none}");
}

async fn a_store_failure_is_503_with_a_generic_message(app: App) {
    let saga = app.start().await;
    use sea_orm::ConnectionTrait;
    let drop_table = match app.runtime.store().backend_name() {
        "postgres" => "DROP TABLE sagas CASCADE",
        _ => "DROP TABLE sagas",
    };
    app.runtime
        .store()
        .connection()
        .execute_unprepared(drop_table)
        .await
        .unwrap();
    for path in ["/sagas".to_owned(), format!("/sagas/{saga}")] {
        let answer = app.get_answer(&path).await;
        assert_eq!(answer.status, 503, "{path}: {answer:?}");
        assert_eq!(
            answer.error(),
            "the database is unavailable; try again",
            "{path}: the detail goes to the log, not to the client"
        );
    }
    let answer = app
        .send(
            "/sagas/order",
            Some("application/json"),
            br#"{"customer": "ada"}"#,
            &[],
        )
        .await;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.error(), "the database is unavailable; try again");
}

async fn bodies_are_held_to_the_shared_limits(app: App) {
    let deep = format!(
        r#"{{"customer": "ada", "deep": {}1{}}}"#,
        "[".repeat(125),
        "]".repeat(125)
    );
    let too_large_data = format!(
        r#"{{"customer": "ada", "note": "{}"}}"#,
        "x".repeat(MAX_DATA_BYTES)
    );
    let cases: [(&str, &str, u16, &str); 4] = [
        (&deep, "deep", 422, "nested deeper than 32"),
        (r#"{"customer": "a\u0000b"}"#, "NUL", 422, "NUL"),
        (
            r#"{"customer": "ada", "amount": 18446744073709551616}"#,
            "a 65-bit amount",
            422,
            "64 bits",
        ),
        (&too_large_data, "too much data", 413, "262144"),
    ];
    for (body, what, status, reason) in cases {
        let answer = app
            .send(
                "/sagas/order",
                Some("application/json"),
                body.as_bytes(),
                &[],
            )
            .await;
        assert_eq!(answer.status, status, "{what}: {answer:?}");
        assert!(answer.error().contains(reason), "{what}: {answer:?}");
    }
    let too_large = format!(
        r#"{{"customer": "ada", "note": "{}"}}"#,
        "x".repeat(MAX_MESSAGE_BYTES)
    );
    let answer = app
        .send(
            "/sagas/order",
            Some("application/json"),
            too_large.as_bytes(),
            &[],
        )
        .await;
    assert_eq!(answer.status, 413, "{answer:?}");
    assert!(answer.error().contains("1048576"), "{answer:?}");
    assert_eq!(count_sagas(&app).await, 0, "nothing was started");

    // Operator commands' bodies too: a NUL in an abort reason leaves the saga running.
    let saga = app.start().await;
    let answer = app
        .send(
            &format!("/sagas/{saga}/abort"),
            Some("application/json"),
            br#"{"reason": "a\u0000b"}"#,
            &[],
        )
        .await;
    assert_eq!(answer.status, 422, "{answer:?}");
    assert!(answer.error().contains("NUL"), "{answer:?}");
    let (_, view) = app.get(&format!("/sagas/{saga}")).await;
    assert_eq!(view["status"], "running", "{view}");
}

#[tokio::test]
async fn every_error_body_is_json() {
    let app = spawn_app().await;
    let answer = app.get_answer("/no/such/route").await;
    assert_eq!(answer.status, 404, "{answer:?}");
    assert!(answer.error().contains("/no/such/route"), "{answer:?}");
    let answer = app.get_answer("/sagas/a/b/c").await;
    assert_eq!(answer.status, 404, "{answer:?}");
    answer.error();

    let response = app
        .client
        .delete(format!("{}/sagas", app.url))
        .send()
        .await
        .unwrap();
    let answer = support::answer(response).await;
    assert_eq!(answer.status, 405, "{answer:?}");
    assert!(answer.error().contains("DELETE"), "{answer:?}");
    let response = app
        .client
        .put(format!("{}/sagas/order", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(support::answer(response).await.status, 405);

    for query in ["status=running&status=completed", "limit=1&limit=2"] {
        let answer = app.get_answer(&format!("/sagas?{query}")).await;
        assert_eq!(answer.status, 400, "{query}: {answer:?}");
        assert!(answer.error().contains("duplicate"), "{query}: {answer:?}");
    }
    let answer = app.get_answer("/set-aside?limit=1&limit=2").await;
    assert_eq!(answer.status, 400, "{answer:?}");
    answer.error();
    // A path segment that is not UTF-8 once decoded.
    let answer = app.get_answer("/sagas/%FF").await;
    assert_eq!(answer.status, 400, "{answer:?}");
    answer.error();

    let huge = vec![b' '; MAX_MESSAGE_BYTES + 1];
    let answer = app
        .send("/sagas/order", Some("application/json"), &huge, &[])
        .await;
    assert_eq!(answer.status, 413, "{answer:?}");
    answer.error();
}

#[tokio::test]
async fn a_json_body_needs_the_json_content_type() {
    let app = spawn_app().await;
    let input: &[u8] = br#"{"customer": "ada"}"#;
    for (content_type, body) in [
        (Some("text/plain"), input),
        (Some("application/x-www-form-urlencoded"), input),
        (Some("multipart/form-data; boundary=x"), input),
        (
            Some("application/xml"),
            b"<order customer='ada'/>".as_slice(),
        ),
        (Some("application/jsonx"), input),
        (None, input),
    ] {
        let answer = app.send("/sagas/order", content_type, body, &[]).await;
        assert_eq!(answer.status, 415, "{content_type:?}: {answer:?}");
        assert!(
            answer.error().contains("application/json"),
            "{content_type:?}: {answer:?}"
        );
    }
    assert_eq!(count_sagas(&app).await, 0, "nothing was started");
    for content_type in ["application/json; charset=utf-8", "Application/JSON"] {
        let answer = app
            .send("/sagas/order", Some(content_type), input, &[])
            .await;
        assert_eq!(answer.status, 202, "{content_type}: {answer:?}");
    }

    // A bodiless operator command needs no content type, but a form's is refused: a
    // cross-site form post cannot abort a saga.
    let saga = app.start().await;
    for content_type in ["application/x-www-form-urlencoded", "text/plain"] {
        let answer = app
            .send(
                &format!("/sagas/{saga}/abort"),
                Some(content_type),
                b"",
                &[],
            )
            .await;
        assert_eq!(answer.status, 415, "{content_type}: {answer:?}");
        answer.error();
    }
    let (_, view) = app.get(&format!("/sagas/{saga}")).await;
    assert_eq!(view["status"], "running", "{view}");
    let answer = app
        .send(&format!("/sagas/{saga}/abort"), None, b"", &[])
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body["applied"], true, "{answer:?}");
}

#[tokio::test]
async fn idempotency_keys_follow_the_amqp_rule() {
    let app = spawn_app().await;
    let input: &[u8] = br#"{"customer": "ada"}"#;
    let long = vec![b'k'; 256];
    for key in [b"a\tb".as_slice(), "café".as_bytes(), &long] {
        let answer = app
            .send(
                "/sagas/order",
                Some("application/json"),
                input,
                &[("idempotency-key", key)],
            )
            .await;
        assert_eq!(answer.status, 400, "{key:?}: {answer:?}");
        assert!(answer.error().contains("idempotency key"), "{answer:?}");
    }
    assert_eq!(count_sagas(&app).await, 0);
    let key = vec![b'k'; 255];
    for created in [true, false] {
        let answer = app
            .send(
                "/sagas/order",
                Some("application/json"),
                input,
                &[("idempotency-key", &key)],
            )
            .await;
        assert_eq!(answer.status, 202, "{answer:?}");
        assert_eq!(answer.body["created"], created, "{answer:?}");
    }
}

#[tokio::test]
async fn a_reason_that_echoes_the_input_is_cut() {
    let app = spawn_app().await;
    let body = json!({"customer": ["x".repeat(200_000)]}).to_string();
    let answer = app
        .send(
            "/sagas/order",
            Some("application/json"),
            body.as_bytes(),
            &[],
        )
        .await;
    assert_eq!(answer.status, 422, "the input_schema wants a string");
    let error = answer.error();
    assert!(error.contains("/customer"), "{}", &error[..200]);
    assert!(
        error.chars().count() <= MAX_REASON_CHARS + 64,
        "{} characters",
        error.chars().count()
    );
}

#[tokio::test]
async fn a_request_head_over_the_limits_is_414_or_431_in_json() {
    let app = spawn_app().await;
    // Unknown query parameters are ignored: this one only makes the URI long.
    let answer = app
        .get_answer(&format!("/sagas?pad={}", "p".repeat(8 * 1024)))
        .await;
    assert_eq!(answer.status, 414, "{answer:?}");
    assert!(answer.error().contains("8192"), "{answer:?}");
    let answer = app
        .get_answer(&format!("/sagas?pad={}", "p".repeat(8000)))
        .await;
    assert_eq!(answer.status, 200, "a URI under 8 KiB: {answer:?}");

    let many = |n: usize| {
        let mut request = app.client.get(format!("{}/sagas", app.url));
        for i in 0..n {
            request = request.header(format!("x-h{i}"), "v");
        }
        request
    };
    let answer = support::answer(many(150).send().await.unwrap()).await;
    assert_eq!(answer.status, 431, "{answer:?}");
    assert!(answer.error().contains("100 headers"), "{answer:?}");
    let answer = support::answer(many(90).send().await.unwrap()).await;
    assert_eq!(answer.status, 200, "{answer:?}");

    let response = app
        .client
        .get(format!("{}/sagas", app.url))
        .header("x-big", "b".repeat(70 * 1024))
        .send()
        .await
        .unwrap();
    let answer = support::answer(response).await;
    assert_eq!(answer.status, 431, "{answer:?}");
    assert!(answer.error().contains("65536"), "{answer:?}");
}

/// Slow or greedy clients, against short timeouts and a small connection cap: generous
/// deadlines, since the machine may be busy.
const DEADLINE: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_client_that_stalls_in_the_request_head_is_disconnected() {
    let config = HttpConfig {
        header_read_timeout: Duration::from_secs(1),
        ..HttpConfig::default()
    };
    let app = spawn_app_with(Backend::Sqlite, config).await;
    let (_, closed) = app
        .raw(
            b"GET /sagas HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n",
            DEADLINE,
        )
        .await;
    assert!(closed, "the connection is still open after {DEADLINE:?}");
}

#[tokio::test]
async fn a_client_that_stalls_in_the_body_gets_408() {
    let config = HttpConfig {
        body_read_timeout: Duration::from_secs(1),
        ..HttpConfig::default()
    };
    let app = spawn_app_with(Backend::Sqlite, config).await;
    let (received, _) = app
        .raw(
            b"POST /sagas/order HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"customer\"",
            DEADLINE,
        )
        .await;
    assert!(received.starts_with("HTTP/1.1 408"), "{received:?}");
    assert!(
        received.contains(r#"{"error":"#) && received.contains("application/json"),
        "{received:?}"
    );
    assert_eq!(count_sagas(&app).await, 0);
}

#[tokio::test]
async fn connections_past_the_cap_wait_for_a_free_one() {
    let config = HttpConfig {
        max_connections: 2,
        ..HttpConfig::default()
    };
    let app = spawn_app_with(Backend::Sqlite, config).await;
    let first = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let _second = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let third = tokio::spawn({
        let (client, url) = (app.client.clone(), app.url.clone());
        async move { client.get(format!("{url}/healthz")).send().await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!third.is_finished(), "a third connection was served");
    drop(first);
    let response = tokio::time::timeout(DEADLINE, third)
        .await
        .expect("the third connection is served once the first closes")
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// A client that sends requests and never reads the answers fills the socket's buffers; the
/// server gives up on it after the write timeout, and its connection slot serves another.
#[tokio::test]
async fn a_client_that_does_not_read_its_answers_is_disconnected() {
    let config = HttpConfig {
        write_timeout: Duration::from_secs(1),
        max_connections: 1,
        // Only the write timeout may end the greedy connection.
        header_read_timeout: Duration::from_secs(3600),
        ..HttpConfig::default()
    };
    let app = spawn_app_with(Backend::Sqlite, config).await;
    let mut greedy = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    // Pipelined, never read: far more answer bytes than loopback's buffers hold.
    let requests = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".repeat(100_000);
    let writer = tokio::spawn(async move {
        let _ = greedy.write_all(&requests).await;
        greedy
    });
    let response = tokio::time::timeout(
        DEADLINE,
        app.client.get(format!("{}/healthz", app.url)).send(),
    )
    .await
    .expect("another client is served once the server gives up on the greedy one")
    .unwrap();
    assert_eq!(response.status(), 200);
    let mut greedy = tokio::time::timeout(DEADLINE, writer)
        .await
        .expect("the greedy client's writes end")
        .unwrap();
    let mut received = Vec::new();
    let read = tokio::time::timeout(DEADLINE, greedy.read_to_end(&mut received)).await;
    assert!(read.is_ok(), "the greedy connection is still open");
}

#[tokio::test]
async fn a_refused_request_leaves_its_connection_usable_or_says_it_is_closed() {
    let app = spawn_app().await;
    // The body comes after the answer could have been sent; then a second request follows on
    // the same connection, as a client's pool would reuse it.
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(
            b"POST /sagas/order HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n\
              Content-Length: 19\r\n\r\n",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stream
        .write_all(b"{\"customer\": \"ada\"}GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut received = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&received).contains("\r\n\r\nok") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let received = String::from_utf8_lossy(&received);
    assert!(received.starts_with("HTTP/1.1 415"), "{received:?}");
    assert!(
        received.contains("HTTP/1.1 200") && received.ends_with("ok"),
        "the second request on the connection is answered: {received:?}"
    );

    // Refused before its body is read: the answer says the connection closes.
    let response = app
        .client
        .post(format!("{}/sagas/order", app.url))
        .header("content-type", "application/json")
        .body(vec![b' '; 2 * MAX_MESSAGE_BYTES])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(response.headers()["connection"], "close");
}

#[tokio::test]
async fn a_client_that_writes_its_whole_oversized_body_before_reading_gets_the_413() {
    // Most clients write the whole body before they read: closing the connection under them
    // turns the answer into a broken pipe (the HTTP fuzz met it on a 1.1 MB body).
    let app = spawn_app().await;
    // Larger than the socket buffers, so that the client is still writing when it is refused.
    let body = vec![b' '; 7 * MAX_MESSAGE_BYTES + MAX_MESSAGE_BYTES / 2];
    let declared = format!(
        "POST /sagas/order HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    let mut chunked =
        b"POST /sagas/order HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                        Transfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for piece in body.chunks(64 * 1024) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let declared = [declared.as_bytes(), &body].concat();
    for (what, request) in [("declared", declared), ("chunked", chunked)] {
        let (received, _) = app.raw(&request, Duration::from_secs(30)).await;
        assert!(received.starts_with("HTTP/1.1 413"), "{what}: {received:?}");
        assert!(received.contains("\"error\""), "{what}: {received:?}");
    }
}

#[tokio::test]
async fn operator_command_bodies_are_held_to_the_limits() {
    let app = spawn_app().await;
    let saga = app.start().await;
    let app = &app;
    let saga = &saga;
    let post = |command: &'static str, body: String| async move {
        let path = format!("/sagas/{saga}/{command}");
        app.send(&path, Some("application/json"), body.as_bytes(), &[])
            .await
    };
    let long_reason = json!({"reason": "r".repeat(MAX_REASON_CHARS + 1)}).to_string();
    let answer = post("abort", long_reason).await;
    assert_eq!(answer.status, 422, "{answer:?}");
    assert!(answer.error().contains("512"), "{answer:?}");

    let big_output = json!({"step": "ship", "output": {"o": "o".repeat(MAX_DATA_BYTES)}});
    let answer = post("mark-completed", big_output.to_string()).await;
    assert_eq!(answer.status, 413, "{answer:?}");
    assert!(answer.error().contains("262144"), "{answer:?}");

    // Commands that take no body take `{}` at most, and refuse a form's content type.
    for command in ["retry", "retry-step"] {
        let answer = post(command, r#"{"step": "ship"}"#.into()).await;
        assert_eq!(answer.status, 422, "{command}: {answer:?}");
        assert!(answer.error().contains("unknown field"), "{answer:?}");
        let answer = app
            .send(
                &format!("/sagas/{saga}/{command}"),
                Some("application/x-www-form-urlencoded"),
                b"",
                &[],
            )
            .await;
        assert_eq!(answer.status, 415, "{command}: {answer:?}");
    }
    let (_, view) = app.get(&format!("/sagas/{saga}")).await;
    assert_eq!(view["status"], "running", "{view}");
}
