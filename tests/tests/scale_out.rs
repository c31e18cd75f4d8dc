//! Two orchestrator processes on one database and one vhost: they compete for the same replies
//! and timers, and no saga is ever advanced twice for one reply.

use std::collections::BTreeMap;
use std::time::Duration;

use saga_system::checkout::*;
use saga_system::env::TestEnv;
use saga_system::{Backend, Options, System, pretty};
use serde_json::Value;

const SAGAS: usize = 60;

async fn two_orchestrators(backend: Backend) {
    let mut system = System::start(
        Options::new(backend)
            .label("scale-out")
            .env("payments", "PAYMENT_LIMIT", 20_000)
            .env("shipping", "SHIPPING_FAILURE_RATE", 0.3),
    )
    .await;
    let second = system.start_another_orchestrator("orchestrator-2").await;
    let client = reqwest::Client::new();
    let sku = unique_sku("scale");

    // Both answer the API, and both consume the replies queue.
    let mut ids = Vec::new();
    for i in 0..SAGAS {
        let amount = if i % 5 == 0 { 50_000 } else { 1_000 + i as i64 };
        let input = order(&format!("customer-{i}"), amount, &[(&sku, 1)]);
        let (status, body) = if i % 2 == 0 {
            system.start_saga(&input, None).await
        } else {
            let response = client
                .post(format!("{second}/sagas/order-checkout"))
                .json(&input)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        };
        assert_eq!(status, 202, "{body}");
        ids.push(body["saga_id"].as_str().unwrap().to_owned());
    }
    // The management API's statistics lag by a few seconds.
    let management = TestEnv::get().management().unwrap();
    let mut replies = Value::Null;
    for _ in 0..100 {
        replies = management
            .queue(system.vhost(), "saga.replies")
            .await
            .unwrap();
        if replies["consumers"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        replies["consumers"], 2,
        "both orchestrators consume replies: {replies}"
    );

    let sagas = system.wait_all_settled(&ids, Duration::from_secs(90)).await;
    let mut outcomes = BTreeMap::new();
    for saga in &sagas {
        assert_history_ordered(saga);
        *outcomes.entry(status(saga).to_owned()).or_insert(0) += 1;
        // One transition per reply: no step completed or compensated twice, one ending.
        for kind in ["step_completed", "step_compensated", "step_failed"] {
            for step in saga["steps"].as_array().unwrap() {
                let name = step["name"].as_str().unwrap();
                assert!(
                    count(saga, kind, name) <= 1,
                    "{kind} twice for {name}: {}",
                    pretty(saga)
                );
            }
        }
        let endings = events(saga, "saga_completed").len() + events(saga, "saga_compensated").len();
        assert_eq!(endings, 1, "{}", pretty(saga));
    }
    assert_eq!(
        outcomes.get("completed"),
        Some(&(SAGAS - SAGAS / 5)),
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes.get("compensated"),
        Some(&(SAGAS / 5)),
        "{outcomes:?}"
    );
    assert_books_balance(&system.books().await, None);
}

saga_system::on_both_backends!(two_orchestrators);
