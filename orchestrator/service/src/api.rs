//! The HTTP API (axum): start sagas, read status and history from the read model, operator
//! commands, health. Handlers are thin: they parse, call the runtime or the store, and map the
//! result onto a status code with a JSON body that says why.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use saga_engine::state::StepStatus;
use saga_engine::{OperatorCommand, Outcome, SagaState};
use saga_schemas::{Data, Direction, SagaEvent, SagaStatus};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::metrics::Metrics;
use crate::runtime::{Runtime, RuntimeError};
use crate::service::Health;
use crate::store::{ListFilter, RecordedEvent, SagaRow};

const MAX_PAGE: u64 = 500;
const DEFAULT_PAGE: u64 = 50;

#[derive(Clone)]
pub struct ApiState {
    pub runtime: Runtime,
    /// The broker connection and the background tasks, for `/readyz`.
    pub health: Health,
    pub metrics: Metrics,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/sagas", get(list_sagas))
        .route("/sagas/{saga}", post(start_saga).get(get_saga))
        .route("/sagas/{saga}/abort", post(abort))
        .route("/sagas/{saga}/retry", post(retry))
        .route("/sagas/{saga}/mark-compensated", post(mark_compensated))
        .route("/sagas/{saga}/retry-step", post(retry_step))
        .route("/sagas/{saga}/mark-completed", post(mark_completed))
        .route("/set-aside", get(list_set_aside))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// An error answer: a status and a sentence saying why.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<RuntimeError> for ApiError {
    fn from(error: RuntimeError) -> Self {
        let status = match &error {
            RuntimeError::UnknownSaga(_) | RuntimeError::NotFound(_) => StatusCode::NOT_FOUND,
            RuntimeError::InvalidInput(_) => StatusCode::UNPROCESSABLE_ENTITY,
            RuntimeError::Contended => StatusCode::CONFLICT,
            RuntimeError::DefinitionGone { .. } => StatusCode::CONFLICT,
            RuntimeError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        if status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(%error, "request failed");
        }
        ApiError(status, error.to_string())
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(error: crate::store::StoreError) -> Self {
        RuntimeError::from(error).into()
    }
}

fn bad_request(why: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, why.into())
}

fn unprocessable(why: impl Into<String>) -> ApiError {
    ApiError(StatusCode::UNPROCESSABLE_ENTITY, why.into())
}

fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| bad_request(format!("`{raw}` is not a saga id (a UUID)")))
}

/// A JSON object body; an empty body counts as `{}` only when `empty_ok`.
fn json_object(body: &Bytes, empty_ok: bool) -> Result<Data, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return if empty_ok {
            Ok(Data::new())
        } else {
            Err(unprocessable("the body must be a JSON object; it is empty"))
        };
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(unprocessable(format!(
            "the body must be a JSON object, not {}",
            json_kind(&other)
        ))),
        Err(e) => Err(unprocessable(format!("the body is not valid JSON: {e}"))),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[derive(Serialize)]
struct StartResponse {
    saga_id: Uuid,
    created: bool,
    status_url: String,
}

async fn start_saga(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    if state.runtime.definitions().get(&name).is_none() {
        return Err(RuntimeError::UnknownSaga(name).into());
    }
    let input = json_object(&body, false)?;
    let key = match headers.get("idempotency-key") {
        Some(value) => {
            let key = value
                .to_str()
                .map_err(|_| bad_request("the Idempotency-Key header must be visible ASCII"))?;
            if key.is_empty() || key.len() > 255 {
                return Err(bad_request(
                    "the Idempotency-Key header must have 1 to 255 characters",
                ));
            }
            Some(key.to_owned())
        }
        None => None,
    };
    let started = state.runtime.start(&name, input, key).await?;
    let status_url = format!("/sagas/{}", started.saga_id);
    let body = StartResponse {
        saga_id: started.saga_id,
        created: started.created,
        status_url: status_url.clone(),
    };
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, status_url)],
        Json(body),
    )
        .into_response())
}

#[derive(Serialize)]
struct StepView {
    name: String,
    participant: String,
    kind: saga_engine::StepKind,
    status: StepStatus,
    attempts: u32,
    compensation_attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<Data>,
}

#[derive(Serialize)]
struct HistoryEntry {
    seq: u64,
    recorded_at: DateTime<Utc>,
    #[serde(flatten)]
    event: saga_schemas::SagaEvent,
}

#[derive(Serialize)]
struct SagaSummary {
    id: Uuid,
    name: String,
    status: SagaStatus,
    current_step: Option<String>,
    business_key: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<&SagaRow> for SagaSummary {
    fn from(row: &SagaRow) -> Self {
        SagaSummary {
            id: row.id,
            name: row.name.clone(),
            status: row.status,
            current_step: row.current_step.clone(),
            business_key: row.business_key.clone(),
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

/// What a saga in flight waits for: the step with an attempt in flight or a retry scheduled.
#[derive(Debug, Serialize)]
struct WaitingOn {
    step: String,
    direction: Direction,
    /// The attempt in flight, or the one the scheduled retry will send.
    attempt: u32,
    /// When the step's first command in this direction was sent: how long it has waited.
    since: DateTime<Utc>,
}

fn waiting_on(state: &SagaState, history: &[RecordedEvent]) -> Option<WaitingOn> {
    if !matches!(state.status, SagaStatus::Running | SagaStatus::Compensating) {
        return None;
    }
    // Compensations run in reverse: the latest step with something pending is the one.
    let (step, direction, attempts) = state.steps.iter().rev().find_map(|s| {
        if s.compensation.is_pending() {
            Some((s, Direction::Compensate, &s.compensation))
        } else if s.action.is_pending() {
            Some((s, Direction::Execute, &s.action))
        } else {
            None
        }
    })?;
    let first_sent = history.iter().find_map(|e| match &e.event {
        SagaEvent::CommandSent {
            step: name,
            direction: d,
            sent_at,
            ..
        } if *name == step.name && *d == direction => Some(sent_at.unwrap_or(e.recorded_at)),
        _ => None,
    });
    let since = match direction {
        Direction::Execute => step.started_at.or(first_sent),
        Direction::Compensate => first_sent,
    }?;
    Some(WaitingOn {
        step: step.name.clone(),
        direction,
        attempt: attempts.in_flight.unwrap_or(attempts.sent + 1),
        since,
    })
}

fn saga_view(runtime: &Runtime, row: &SagaRow, history: Vec<RecordedEvent>) -> Value {
    let waiting_on = waiting_on(&row.state, &history);
    let def = runtime.definitions().get(&row.name);
    let steps: Vec<StepView> = def
        .map(|def| {
            def.steps
                .iter()
                .map(|d| {
                    let s = row.state.step(&d.name);
                    StepView {
                        name: d.name.clone(),
                        participant: d.participant.clone(),
                        kind: d.kind,
                        status: s.map_or(StepStatus::Pending, |s| s.status()),
                        attempts: s.map_or(0, |s| s.action.sent),
                        compensation_attempts: s.map_or(0, |s| s.compensation.sent),
                        last_error: s.and_then(|s| s.last_error.clone()),
                        output: s.and_then(|s| s.output.clone()),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let history: Vec<HistoryEntry> = history
        .into_iter()
        .map(|e| HistoryEntry {
            seq: e.seq,
            recorded_at: e.recorded_at,
            event: e.event,
        })
        .collect();
    json!({
        "id": row.id,
        "name": row.name,
        "status": row.status,
        "current_step": row.current_step,
        "waiting_on": waiting_on,
        "business_key": row.business_key,
        "definition_version": row.definition_version,
        "data": row.state.data,
        "compensation_reason": row.state.compensation_reason,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "steps": steps,
        "history": history,
    })
}

async fn get_saga(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    let store = state.runtime.store();
    let row = store.saga(id).await?.ok_or(RuntimeError::NotFound(id))?;
    let history = store.history(id).await?;
    Ok(Json(saga_view(&state.runtime, &row, history)))
}

#[derive(Deserialize)]
struct ListQuery {
    status: Option<String>,
    name: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

/// `limit` of a listing: 1 to [`MAX_PAGE`], [`DEFAULT_PAGE`] when absent.
fn page_limit(raw: Option<&str>) -> Result<u64, ApiError> {
    match raw {
        Some(raw) => match raw.parse::<u64>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
            _ => Err(bad_request(format!(
                "limit must be a whole number from 1 to {MAX_PAGE}"
            ))),
        },
        None => Ok(DEFAULT_PAGE),
    }
}

/// The cursor is the (created_at, id) of the last saga on the previous page.
fn encode_cursor(row: &SagaRow) -> String {
    format!("{}_{}", row.created_at.timestamp_micros(), row.id)
}

fn decode_cursor(raw: &str) -> Result<(DateTime<Utc>, Uuid), ApiError> {
    let invalid = || bad_request(format!("`{raw}` is not a cursor from a previous page"));
    let (micros, id) = raw.split_once('_').ok_or_else(invalid)?;
    let micros: i64 = micros.parse().map_err(|_| invalid())?;
    let at = DateTime::from_timestamp_micros(micros).ok_or_else(invalid)?;
    Ok((at, Uuid::parse_str(id).map_err(|_| invalid())?))
}

async fn list_sagas(
    State(state): State<ApiState>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let status = match query.status.as_deref().filter(|s| !s.is_empty()) {
        Some(raw) => Some(raw.parse::<SagaStatus>().map_err(|e| {
            bad_request(format!(
                "{e}; use running, compensating, completed, compensated, compensation_failed or completion_failed"
            ))
        })?),
        None => None,
    };
    let limit = page_limit(query.limit.as_deref())?;
    let before = query
        .cursor
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(decode_cursor)
        .transpose()?;
    let filter = ListFilter {
        status,
        name: query.name.filter(|n| !n.is_empty()),
        limit: limit + 1,
        before,
    };
    let mut rows = state.runtime.store().list(&filter).await?;
    let next_cursor = if rows.len() as u64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(encode_cursor)
    } else {
        None
    };
    let sagas: Vec<SagaSummary> = rows.iter().map(SagaSummary::from).collect();
    Ok(Json(json!({ "sagas": sagas, "next_cursor": next_cursor })))
}

#[derive(Deserialize)]
struct SetAsideQuery {
    limit: Option<String>,
}

/// Timers and replies that can never be handled, newest first, with why.
async fn list_set_aside(
    State(state): State<ApiState>,
    Query(query): Query<SetAsideQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(query.limit.as_deref())?;
    let items = state.runtime.store().list_set_aside(limit).await?;
    Ok(Json(json!({ "set_aside": items })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AbortBody {
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MarkBody {
    step: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MarkCompletedBody {
    step: String,
    /// Merged into the saga data, as a success's output would be.
    #[serde(default)]
    output: Data,
}

fn parse_body<T: serde::de::DeserializeOwned>(
    body: &Bytes,
    empty: Option<T>,
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace)
        && let Some(default) = empty
    {
        return Ok(default);
    }
    serde_json::from_slice(body).map_err(|e| unprocessable(format!("invalid body: {e}")))
}

async fn operate(
    state: &ApiState,
    id: &str,
    command: OperatorCommand,
) -> Result<Response, ApiError> {
    let id = parse_id(id)?;
    let outcome = state.runtime.operate(id, command).await?;
    let (status, body) = match outcome {
        Outcome::Applied => (StatusCode::OK, json!({ "saga_id": id, "applied": true })),
        Outcome::Ignored(why) => (
            StatusCode::OK,
            json!({ "saga_id": id, "applied": false, "reason": why.to_string() }),
        ),
        Outcome::Rejected(why) => return Err(ApiError(StatusCode::CONFLICT, why.to_string())),
    };
    Ok((status, Json(body)).into_response())
}

async fn abort(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: AbortBody = parse_body(&body, Some(AbortBody { reason: None }))?;
    let reason = body
        .reason
        .unwrap_or_else(|| "aborted through the API".into());
    operate(&state, &id, OperatorCommand::Abort { reason }).await
}

async fn retry(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    operate(&state, &id, OperatorCommand::RetryCompensation).await
}

async fn retry_step(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    operate(&state, &id, OperatorCommand::RetryStep).await
}

async fn mark_completed(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: MarkCompletedBody = parse_body(&body, None)?;
    operate(
        &state,
        &id,
        OperatorCommand::MarkCompleted {
            step: body.step,
            output: body.output,
        },
    )
    .await
}

async fn mark_compensated(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: MarkBody = parse_body(&body, None)?;
    operate(
        &state,
        &id,
        OperatorCommand::MarkCompensated { step: body.step },
    )
    .await
}

/// `200` only when the database answers, the broker connection is open now, and no background
/// task has stopped; the body says which of them is not.
async fn ready(State(state): State<ApiState>) -> Response {
    let database = state.runtime.store().ping().await.is_ok();
    let broker = state.health.broker_connected();
    let stopped = state.health.stopped_tasks();
    let foreign = state.health.foreign_orchestrators();
    let status = if database && broker && stopped.is_empty() && foreign.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "database": database,
            "broker": broker,
            "stopped_tasks": stopped,
            "foreign_orchestrators": foreign,
        })),
    )
        .into_response()
}

async fn metrics(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let text = state
        .metrics
        .render(state.runtime.store(), state.runtime.definitions())
        .await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}
