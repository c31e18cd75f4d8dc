//! Traces across services: a saga started with a W3C `traceparent` is one tree of spans in
//! that trace, from the orchestrator through every participant and back, received here by a
//! small OTLP/HTTP (JSON) receiver that every process exports to.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use saga_system::checkout::{order, status, unique_sku};
use saga_system::{Backend, ORCHESTRATOR, Options, PARTICIPANTS, System, pretty};
use serde_json::Value;

/// One exported span, as the receiver keeps it.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    trace_state: String,
    attributes: HashMap<String, String>,
}

type Received = Arc<Mutex<Vec<Span>>>;

/// `{"key": k, "value": {"stringValue": v}}` (or an int, a bool) as (k, v).
fn attributes(list: &Value) -> HashMap<String, String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|kv| {
            let key = kv["key"].as_str()?.to_owned();
            let value = kv["value"]
                .as_object()?
                .values()
                .next()
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))?;
            Some((key, value))
        })
        .collect()
}

/// Every span of an OTLP `ExportTraceServiceRequest` in JSON.
fn spans_of(body: &Value) -> Vec<Span> {
    let mut spans = Vec::new();
    for resource in body["resourceSpans"].as_array().into_iter().flatten() {
        let service = attributes(&resource["resource"]["attributes"])
            .remove("service.name")
            .unwrap_or_default();
        for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
            for span in scope["spans"].as_array().into_iter().flatten() {
                let text = |key: &str| span[key].as_str().unwrap_or_default().to_owned();
                spans.push(Span {
                    service: service.clone(),
                    name: text("name"),
                    trace_id: text("traceId"),
                    span_id: text("spanId"),
                    parent_span_id: text("parentSpanId"),
                    trace_state: text("traceState"),
                    attributes: attributes(&span["attributes"]),
                });
            }
        }
    }
    spans
}

/// An OTLP/HTTP receiver on a free port: its endpoint and what it received.
async fn receiver() -> (String, Received) {
    let received = Received::default();
    let kept = received.clone();
    let app = Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let kept = kept.clone();
            async move {
                let body: Value = serde_json::from_slice(&body).expect("OTLP JSON");
                kept.lock().unwrap().extend(spans_of(&body));
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (endpoint, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_saga_is_one_tree_of_spans_across_the_services() {
    let (endpoint, received) = receiver().await;
    let mut opts = Options::new(Backend::Sqlite).label("traces");
    for service in std::iter::once(ORCHESTRATOR).chain(PARTICIPANTS) {
        opts = opts
            .env(service, "OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
            .env(service, "OTEL_BSP_SCHEDULE_DELAY", 100);
    }
    let system = System::start(opts).await;

    // A caller's trace: the saga joins it.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{caller_span}-01");
    // A vendor's entries, which every hop passes on unchanged (W3C Trace Context).
    let tracestate = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";
    let (code, body) = system
        .post_raw(
            "/sagas/order-checkout",
            order("tracy", 1200, &[(&unique_sku("lamp"), 1)]).to_string(),
            &[("traceparent", &traceparent), ("tracestate", tracestate)],
        )
        .await;
    assert_eq!(code, 202, "{body}");
    let id = body["saga_id"].as_str().unwrap().to_owned();
    let saga = system.wait_settled(&id, Duration::from_secs(60)).await;
    assert_eq!(status(&saga), "completed", "{}", pretty(&saga));

    // Wait until every service's spans of this saga arrived.
    let everyone: BTreeSet<String> = std::iter::once(ORCHESTRATOR)
        .chain(PARTICIPANTS)
        .map(str::to_owned)
        .collect();
    let started = Instant::now();
    let spans = loop {
        let spans: Vec<Span> = received
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect();
        let services: BTreeSet<String> = spans.iter().map(|s| s.service.clone()).collect();
        let commands = spans.iter().filter(|s| s.name == "command").count();
        let replies = spans
            .iter()
            .filter(|s| s.attributes.get("input").map(String::as_str) == Some("reply"))
            .count();
        // A span is exported when it closes, so a parent (the handling of a reply) can reach
        // the collector a batch after its children (the steps it sent): wait for the tree to
        // be whole: one span whose parent is not in the trace, the saga's start.
        let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
        let dangling = spans
            .iter()
            .filter(|s| !ids.contains(s.parent_span_id.as_str()))
            .count();
        if services == everyone && commands >= 5 && replies >= 5 && dangling == 1 {
            break spans;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "spans from {services:?} only ({} spans in the trace, {commands} commands, {replies} \
             replies, {dangling} without their parent, {} received in all)",
            spans.len(),
            received.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // Every span of the saga, wherever it came from, is in the caller's trace, with the
    // caller's trace state...
    let all = received.lock().unwrap().clone();
    for span in all
        .iter()
        .filter(|s| s.attributes.get("saga_id") == Some(&id))
    {
        assert_eq!(span.trace_id, trace_id, "{span:?}");
    }
    for span in &spans {
        assert_eq!(span.trace_state, tracestate, "{span:?}");
    }
    // ...and the trace is one tree: every span's parent is a span of it, but one, the saga's
    // start, whose parent is the caller's span.
    let ids: HashMap<&str, &Span> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let roots: Vec<&Span> = spans
        .iter()
        .filter(|s| !ids.contains_key(s.parent_span_id.as_str()))
        .collect();
    assert_eq!(roots.len(), 1, "roots: {roots:#?}");
    assert_eq!(roots[0].name, "saga.input", "{:?}", roots[0]);
    assert_eq!(
        roots[0].attributes.get("input").map(String::as_str),
        Some("start")
    );
    assert_eq!(roots[0].parent_span_id, caller_span);
    // Each participant's span of a command is a child of the orchestrator's span of that step.
    for command in spans.iter().filter(|s| s.name == "command") {
        let parent = ids[command.parent_span_id.as_str()];
        assert_eq!(
            (parent.service.as_str(), parent.name.as_str()),
            (ORCHESTRATOR, "saga.step"),
            "{command:?}"
        );
        assert_eq!(
            parent.attributes.get("step"),
            command.attributes.get("step")
        );
        assert_eq!(command.attributes.get("saga_id"), Some(&id));
    }
    // And the orchestrator's handling of each reply is a child of the participant's span.
    let replies: Vec<&Span> = spans
        .iter()
        .filter(|s| {
            s.name == "saga.input" && s.attributes.get("input").map(String::as_str) == Some("reply")
        })
        .collect();
    assert!(replies.len() >= 5, "{replies:#?}");
    for reply in replies {
        let parent = ids[reply.parent_span_id.as_str()];
        assert_eq!(parent.name, "command", "{reply:?} under {parent:?}");
        assert_ne!(parent.service, ORCHESTRATOR, "{parent:?}");
    }
    let steps: BTreeSet<&str> = spans
        .iter()
        .filter(|s| s.name == "command")
        .filter_map(|s| s.attributes.get("step").map(String::as_str))
        .collect();
    assert_eq!(
        steps,
        BTreeSet::from([
            "approve-order",
            "charge-payment",
            "create-order",
            "reserve-stock",
            "schedule-shipment"
        ])
    );

    // The log lines about the saga carry its trace id next to its id.
    let log = std::fs::read_to_string(system.log_path(ORCHESTRATOR)).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("saga completed") && l.contains(&id))
        .unwrap_or_else(|| panic!("no completion line for {id}:\n{log}"));
    assert!(line.contains(trace_id), "{line}");
    let orders = std::fs::read_to_string(system.log_path("orders")).unwrap();
    assert!(
        orders
            .lines()
            .any(|l| l.contains("replied") && l.contains(&id) && l.contains(trace_id)),
        "{orders}"
    );
}
