//! The OpenAPI 3.1 document of the HTTP API, generated from the code: utoipa describes the
//! routes (from the handlers' `#[utoipa::path]` in [`crate::api`], registered with the same
//! calls that build the router) and the API's own bodies; the types the API shares with the
//! saga contract (events, statuses, directions, step kinds) are described by their schemars
//! JSON Schemas, the same source as `schemas/json/`. Served at `GET /openapi.json`, printed by
//! `orchestrator openapi`, and committed as `orchestrator/openapi.json`, which a test keeps
//! equal to [`document`] ([`REGENERATE_COMMAND`]).
//!
//! Which operations need a bearer token, and with which role, is asked of
//! [`crate::auth::required_role`], the function the gate itself asks, so the document's
//! `security` cannot drift from what is enforced.

use std::collections::BTreeMap;

use axum::http::Method;
use schemars::JsonSchema;
use schemars::generate::{Contract, SchemaSettings};
use serde_json::{Value, json};
use utoipa::IntoResponses;
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder, response::Response};

/// The command that rewrites the committed document from the code.
pub const REGENERATE_COMMAND: &str =
    "cargo run -p orchestrator -- openapi > orchestrator/openapi.json";

/// Where components live in the document, and where the contract's schemas' `$ref`s point.
const COMPONENTS: &str = "/components/schemas";

/// The document, as served and committed.
pub fn document() -> Value {
    let mut document =
        serde_json::to_value(crate::api::described()).expect("an OpenAPI document is JSON");
    let schemas = document
        .pointer_mut(COMPONENTS)
        .and_then(Value::as_object_mut)
        .expect("the API names its bodies as components");
    for (name, schema) in contract_schemas() {
        let previous = schemas.insert(name.clone(), schema);
        assert!(previous.is_none(), "two schemas are named {name}");
    }
    secure(&mut document);
    document
}

/// The bearer scheme, and on every operation that needs a token the role it needs (OpenAPI 3.1
/// lets a non-OAuth requirement list roles) with its 401 and 403 answers.
fn secure(document: &mut Value) {
    document["components"]["securitySchemes"] = json!({
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "A token of `--tokens-file` or `API_TOKENS`. The `read` role may \
                            use every GET, `operate` every endpoint. Without tokens configured \
                            the API is open. `/metrics` is open with `--metrics-open`."
        }
    });
    let error = |description: &str| {
        json!({
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
        })
    };
    let mut unauthorized = error("No token, or not a token of this API.");
    unauthorized["headers"] = json!({"WWW-Authenticate": {"schema": {"type": "string"}}});
    let forbidden = error("The token's role may not do this.");
    let paths = document["paths"]
        .as_object_mut()
        .expect("the document has paths");
    for (path, item) in paths {
        let item = item.as_object_mut().expect("a path item is an object");
        for (method, operation) in item {
            let method = Method::from_bytes(method.to_uppercase().as_bytes())
                .expect("an operation's key is a method");
            let Some(role) = crate::auth::required_role(&method, path, false) else {
                continue;
            };
            operation["security"] = json!([{ "bearer": [role.to_string()] }]);
            let responses = &mut operation["responses"];
            responses["401"] = unauthorized.clone();
            responses["403"] = forbidden.clone();
        }
    }
}

/// The contract's types the API shows, as schemars describes what they serialize to, with
/// every `$ref` pointing at the document's components.
fn contract_schemas() -> serde_json::Map<String, Value> {
    let mut generator = SchemaSettings::draft2020_12()
        .with(|settings| {
            settings.definitions_path = COMPONENTS.into();
            settings.contract = Contract::Serialize;
        })
        .into_generator();
    generator.subschema_for::<saga_schemas::SagaEvent>();
    generator.subschema_for::<saga_schemas::SagaStatus>();
    generator.subschema_for::<saga_schemas::Direction>();
    generator.subschema_for::<saga_engine::state::StepStatus>();
    generator.subschema_for::<saga_engine::StepKind>();
    generator.take_definitions(true)
}

/// A reference to the component describing `T`, for a field of a contract type:
/// `#[schema(schema_with = contract_ref::<T>)]`.
pub(crate) fn contract_ref<T: JsonSchema>() -> Ref {
    Ref::from_schema_name(T::schema_name())
}

/// The JSON error body, `{"error": "..."}`, with a description.
fn error(description: &str) -> RefOr<Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
        .into()
}

fn errors(list: &[(u16, &str)]) -> BTreeMap<String, RefOr<Response>> {
    list.iter()
        .map(|(status, why)| (status.to_string(), error(why)))
        .collect()
}

/// The answers of any request that reads or writes the database when it fails.
pub(crate) struct StoreErrors;

impl IntoResponses for StoreErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        errors(&[
            (
                500,
                "Stored data cannot be read; the orchestrator's log says which.",
            ),
            (503, "The database is unavailable; try again."),
        ])
    }
}

/// The answers every operator command shares: its outcome, or why it does not apply.
pub(crate) struct CommandAnswers;

impl IntoResponses for CommandAnswers {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let mut answers = errors(&[
            (400, "Not a saga id (a UUID)."),
            (404, "No saga has that id."),
            (
                409,
                "The command does not apply to the saga as it is now, or a concurrent change won.",
            ),
        ]);
        let applied = ResponseBuilder::new()
            .description("Applied, or nothing to do.")
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("CommandOutcome")))
                    .build(),
            )
            .build();
        answers.insert("200".into(), applied.into());
        answers
    }
}

/// The refusals of a request body, checked before it is parsed.
pub(crate) struct BodyErrors;

impl IntoResponses for BodyErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        errors(&[
            (
                413,
                "The body is over 1 MiB, or the data it carries over 256 KiB.",
            ),
            (
                415,
                "A non-empty body not sent as `Content-Type: application/json`.",
            ),
            (
                422,
                "The body is not what the endpoint takes: not JSON, not an object, an unknown \
                 or missing field, too deeply nested, a NUL character, an integer beyond 64 bits.",
            ),
        ])
    }
}

/// The refusals every request can get before it is routed (see [`crate::http`]).
pub(crate) struct RequestErrors;

impl IntoResponses for RequestErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        errors(&[
            (408, "The body did not arrive in full in time."),
            (413, "The body is over 1 MiB."),
            (414, "The URI is over 8 KiB."),
            (
                431,
                "The request has more than 100 headers, or they are over 64 KiB.",
            ),
        ])
    }
}
