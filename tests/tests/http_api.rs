//! The HTTP API's answers to requests that cannot start a saga.

use saga_system::checkout::*;
use saga_system::{Backend, Options, System};
use serde_json::json;

async fn rejected_requests(backend: Backend) {
    // No participant is needed: nothing may start.
    let system = System::start(Options::new(backend).label("http-api").participants(&[])).await;

    let (status, body) = system
        .start_named("no-such-saga", &order("kim", 100, &[("a", 1)]), None)
        .await;
    assert_eq!(status, 404, "an unknown saga name: {body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("no-such-saga")),
        "{body}"
    );

    let bad_bodies: [(&str, &[u8]); 6] = [
        ("not JSON", b"{\"customer\": "),
        ("an array", b"[{\"customer\": \"kim\"}]"),
        ("a string", b"\"kim\""),
        ("empty", b""),
        ("missing fields", b"{\"customer\": \"kim\"}"),
        (
            "wrong types",
            b"{\"customer\": \"kim\", \"amount\": \"12.50\", \"items\": [{\"sku\": \"a\", \"quantity\": 0}]}",
        ),
    ];
    for (what, body) in bad_bodies {
        let (status, answer) = system.post_raw("/sagas/order-checkout", body, &[]).await;
        assert_eq!(status, 422, "{what}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(!error.is_empty(), "{what}: the answer says why: {answer}");
    }
    // An input that does not match the input_schema names the field.
    let (status, answer) = system
        .start_saga(&json!({"customer": "kim", "amount": -5, "items": []}), None)
        .await;
    assert_eq!(status, 422, "{answer}");
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("amount") || error.contains("items"),
        "{answer}"
    );

    // Nothing was started by any of them.
    assert!(system.list_all("").await.is_empty());
    let (status, body) = system
        .get(&format!("/sagas/{}", uuid::Uuid::new_v4()))
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = system.get("/sagas/not-a-uuid").await;
    assert!(status == 400 || status == 404, "{status} {body}");
    let (status, _) = system.get("/healthz").await;
    assert_eq!(status, 200);
    let (status, body) = system.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
}

saga_system::on_both_backends!(rejected_requests);
