//! The HTTP API (axum): start sagas, read status and history from the read model, operator
//! commands, health. Handlers are thin: they parse, call the runtime or the store, and map the
//! result onto a status code with a JSON body that says why.
//!
//! Every error answer is `{"error": "..."}`, the reason cut to [`limits::MAX_REASON_CHARS`]:
//! unmatched routes and methods, axum's own rejections, and failures of the store, whose
//! detail goes to the log only. Bodies are JSON sent as `application/json`, checked against
//! the shared [`limits`] before they are parsed. [`crate::http`] serves this router.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Extension, FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use chrono::{DateTime, Datelike, Utc};
use saga_amqp::trace::TraceContext;
use saga_engine::state::StepStatus;
use saga_engine::{OperatorCommand, Outcome, SagaState};
use saga_schemas::limits::{self, LimitError, MAX_MESSAGE_BYTES};
use saga_schemas::{Data, Direction, SagaEvent, SagaStatus};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Caller;
use crate::metrics::Metrics;
use crate::openapi::{BodyErrors, CommandAnswers, RequestErrors, StoreErrors, contract_ref};
use crate::runtime::{Runtime, RuntimeError};
use crate::service::Health;
use crate::store::{
    DefinitionVersion, ListFilter, RecordedEvent, SagaListing, SagaRow, SetAside, StoreError,
};

const MAX_PAGE: u64 = 500;
const DEFAULT_PAGE: u64 = 50;
/// The longest query parameter value, in bytes: far above any name, status, limit or cursor.
pub const MAX_QUERY_VALUE_BYTES: usize = 1024;
/// Cursors are (created_at, id) of sagas: their years lie in what both databases store.
const CURSOR_YEARS: std::ops::RangeInclusive<i32> = 1970..=9999;
/// What a client is told when the store fails; the error itself is logged.
const STORE_UNAVAILABLE: &str = "the database is unavailable; try again";

#[derive(Clone)]
pub struct ApiState {
    pub runtime: Runtime,
    /// The broker connection and the background tasks, for `/readyz`.
    pub health: Health,
    pub metrics: Metrics,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Saga orchestrator",
        description = "Start sagas, read their status and history, and take an operator's \
                       decisions. Every error answer is `{\"error\": \"...\"}`; request bodies \
                       are JSON sent as `application/json`."
    ),
    components(schemas(ErrorBody, CommandOutcome))
)]
struct ApiDoc;

/// Every route, each registered with its description, so that the document and the router
/// cannot differ.
fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(list_sagas))
        .routes(routes!(start_saga, get_saga))
        .routes(routes!(abort))
        .routes(routes!(retry))
        .routes(routes!(mark_compensated))
        .routes(routes!(retry_step))
        .routes(routes!(mark_completed))
        .routes(routes!(list_set_aside))
        .routes(routes!(list_definitions))
        .routes(routes!(healthz))
        .routes(routes!(ready))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
}

/// What utoipa describes of the routes; [`crate::openapi::document`] completes it.
pub(crate) fn described() -> utoipa::openapi::OpenApi {
    routes().split_for_parts().1
}

pub fn router(state: ApiState) -> Router {
    let (router, _) = routes().split_for_parts();
    router
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        // `crate::http` reads bodies up to this limit before routing; the router keeps it too.
        .layer(DefaultBodyLimit::max(MAX_MESSAGE_BYTES))
        .layer(middleware::map_response(json_errors))
        .with_state(state)
}

/// The body of every error answer.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// Why, for people; at most 512 characters.
    error: String,
}

/// An error answer: a status and a sentence saying why, cut to [`limits::MAX_REASON_CHARS`]
/// since it may echo what the client sent.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    pub fn new(status: StatusCode, why: impl AsRef<str>) -> Self {
        ApiError(status, limits::reason(why.as_ref()))
    }

    /// The status and why, for an answer that is not JSON (the web view's pages).
    pub(crate) fn parts(&self) -> (StatusCode, &str) {
        (self.0, &self.1)
    }

    /// The answer to a failed runtime call; `saga_id` is the saga it concerns, for the log.
    fn runtime(error: RuntimeError, saga_id: Option<Uuid>) -> Self {
        let status = match &error {
            RuntimeError::UnknownSaga(_) | RuntimeError::NotFound(_) => StatusCode::NOT_FOUND,
            RuntimeError::InvalidInput(_) => StatusCode::UNPROCESSABLE_ENTITY,
            RuntimeError::Contended
            | RuntimeError::DefinitionGone { .. }
            | RuntimeError::Store(StoreError::Conflict | StoreError::Duplicate) => {
                StatusCode::CONFLICT
            }
            RuntimeError::Store(StoreError::Db(_)) => {
                tracing::error!(
                    saga_id = saga_id.map(tracing::field::display),
                    %error,
                    "the database failed a request"
                );
                return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, STORE_UNAVAILABLE);
            }
            // Stored data that cannot be read fails the requests that need it, no others.
            RuntimeError::Store(StoreError::Corrupt(_)) => {
                tracing::error!(
                    saga_id = saga_id.map(tracing::field::display),
                    %error,
                    "a request met stored data it cannot read"
                );
                return ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "stored data cannot be read; the orchestrator's log says which",
                );
            }
        };
        ApiError::new(status, error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<RuntimeError> for ApiError {
    fn from(error: RuntimeError) -> Self {
        ApiError::runtime(error, None)
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        RuntimeError::from(error).into()
    }
}

fn bad_request(why: impl AsRef<str>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, why)
}

fn unprocessable(why: impl AsRef<str>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, why)
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("nothing answers {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
    )
}

/// Turns an error answer that is not JSON (axum's rejections of a path or query it cannot
/// decode, say) into `{"error": ...}` with its text, keeping its status and other headers.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(is_json_type);
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_MESSAGE_BYTES)
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_owned())
        .unwrap_or_default();
    let why = match text.is_empty() {
        true => status.canonical_reason().unwrap_or("refused").to_owned(),
        false => text,
    };
    parts.headers.remove(header::CONTENT_TYPE);
    parts.headers.remove(header::CONTENT_LENGTH);
    let mut answer = ApiError::new(status, why).into_response();
    answer.headers_mut().extend(parts.headers);
    answer
}

/// `application/json`, with or without parameters such as `charset`.
fn is_json_type(value: &HeaderValue) -> bool {
    value.to_str().is_ok_and(|v| {
        v.split(';')
            .next()
            .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
    })
}

/// The body of an endpoint that takes JSON, checked against the shared limits
/// ([`limits::check_json`]) before anything parses it. A body must come as
/// `application/json` (so no cross-site form can post one); an empty body, all a bodiless
/// operator command sends, needs no content type, but may not declare another.
struct JsonBody(Bytes);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let declared = match request.headers().get(header::CONTENT_TYPE) {
            None => false,
            Some(value) if is_json_type(value) => true,
            Some(value) => {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!(
                        "send the body as Content-Type: application/json, not `{}`",
                        String::from_utf8_lossy(value.as_bytes())
                    ),
                ));
            }
        };
        let body = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| ApiError::new(rejection.status(), rejection.body_text()))?;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(JsonBody(body));
        }
        if !declared {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send the body with Content-Type: application/json",
            ));
        }
        limits::check_json(&body).map_err(|error| {
            let status = match error {
                LimitError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            };
            ApiError::new(status, error.to_string())
        })?;
        Ok(JsonBody(body))
    }
}

pub(crate) fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
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

#[derive(Serialize, ToSchema)]
struct StartResponse {
    saga_id: Uuid,
    /// False when an earlier request with the same idempotency key started the saga.
    created: bool,
    /// Where the saga's status is (also the `Location` header).
    status_url: String,
}

/// The `Idempotency-Key` header, under the same rule as a start over AMQP.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all("idempotency-key").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(bad_request("send one Idempotency-Key header, not several"));
    }
    let key = std::str::from_utf8(value.as_bytes())
        .map_err(|_| bad_request("the idempotency key must be printable ASCII (space to `~`)"))?;
    limits::check_idempotency_key(key).map_err(bad_request)?;
    Ok(Some(key.to_owned()))
}

/// Starts a saga; with an `Idempotency-Key`, a repeated request answers the saga the first
/// one started.
#[utoipa::path(
    post,
    path = "/sagas/{saga}",
    params(
        ("saga" = String, Path, description = "The saga's name, as defined."),
        ("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255,
         description = "1 to 255 printable ASCII characters (space to `~`)."),
    ),
    request_body(
        content = Object,
        content_type = "application/json",
        description = "The saga's input: a JSON object its `input_schema` accepts.",
    ),
    responses(
        RequestErrors,
        (status = 202, description = "Started, or started before under the same idempotency key.",
         body = StartResponse,
         headers(("Location" = String, description = "The saga's status URL."))),
        (status = 400, description = "The idempotency key breaks its rule.", body = ErrorBody),
        (status = 404, description = "No saga of that name is defined.", body = ErrorBody),
        (status = 409, description = "A concurrent start or change won; try again.",
         body = ErrorBody),
        BodyErrors,
        StoreErrors,
    ),
)]
async fn start_saga(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    if state.runtime.definitions().get(&name).is_none() {
        return Err(RuntimeError::UnknownSaga(name).into());
    }
    let input = json_object(&body, false)?;
    limits::check_data_size("the input", &input)
        .map_err(|why| ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, why))?;
    let key = idempotency_key(&headers)?;
    let trace = TraceContext::from_headers(|key| headers.get(key)?.to_str().ok());
    let started = state.runtime.start_traced(&name, input, key, trace).await?;
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

#[derive(Serialize, ToSchema)]
pub(crate) struct StepView {
    pub(crate) name: String,
    pub(crate) participant: String,
    #[schema(schema_with = contract_ref::<saga_engine::StepKind>)]
    pub(crate) kind: saga_engine::StepKind,
    #[schema(schema_with = contract_ref::<StepStatus>)]
    pub(crate) status: StepStatus,
    /// Commands sent for the action.
    pub(crate) attempts: u32,
    /// Commands sent for the compensation.
    pub(crate) compensation_attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) last_error: Option<String>,
    /// What the action returned, merged into the saga data.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub(crate) output: Option<Data>,
}

/// One event of the saga's log: the event's fields with its place in the log.
#[derive(Serialize, ToSchema)]
pub(crate) struct HistoryEntry {
    /// Position in the log, from 1, without gaps.
    pub(crate) seq: u64,
    pub(crate) recorded_at: DateTime<Utc>,
    #[serde(flatten)]
    #[schema(schema_with = contract_ref::<SagaEvent>)]
    pub(crate) event: SagaEvent,
}

#[derive(Serialize, ToSchema)]
struct SagaSummary {
    id: Uuid,
    name: String,
    #[schema(schema_with = contract_ref::<SagaStatus>)]
    status: SagaStatus,
    current_step: Option<String>,
    business_key: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<&SagaListing> for SagaSummary {
    fn from(row: &SagaListing) -> Self {
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
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct WaitingOn {
    pub(crate) step: String,
    #[schema(schema_with = contract_ref::<Direction>)]
    pub(crate) direction: Direction,
    /// The attempt in flight, or the one the scheduled retry will send.
    pub(crate) attempt: u32,
    /// When the step's first command in this direction was sent: how long it has waited.
    pub(crate) since: DateTime<Utc>,
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

/// A saga: its state from the read model, its steps as defined, and its whole log.
#[derive(Serialize, ToSchema)]
pub(crate) struct SagaView {
    pub(crate) id: Uuid,
    pub(crate) name: String,
    #[schema(schema_with = contract_ref::<SagaStatus>)]
    pub(crate) status: SagaStatus,
    pub(crate) current_step: Option<String>,
    /// While running or compensating: the step the saga waits for.
    pub(crate) waiting_on: Option<WaitingOn>,
    pub(crate) business_key: Option<String>,
    /// Content hash of the saga definition the saga runs.
    pub(crate) definition_version: String,
    /// The start input with every completed step's output merged in.
    #[schema(value_type = Object)]
    pub(crate) data: Data,
    pub(crate) compensation_reason: Option<String>,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) updated_at: DateTime<Utc>,
    /// Every step of the definition, in order (none when the definition is gone).
    pub(crate) steps: Vec<StepView>,
    pub(crate) history: Vec<HistoryEntry>,
}

pub(crate) fn saga_view(runtime: &Runtime, row: SagaRow, history: Vec<RecordedEvent>) -> SagaView {
    let waiting_on = waiting_on(&row.state, &history);
    let def = runtime
        .definition_of(&row.name, &row.state.definition_version)
        .or_else(|| runtime.definitions().get(&row.name));
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
    SagaView {
        id: row.id,
        name: row.name,
        status: row.status,
        current_step: row.current_step,
        waiting_on,
        business_key: row.business_key,
        definition_version: row.definition_version,
        data: row.state.data,
        compensation_reason: row.state.compensation_reason,
        created_at: row.created_at,
        updated_at: row.updated_at,
        steps,
        history,
    }
}

/// A saga's status, steps and history.
#[utoipa::path(
    get,
    path = "/sagas/{saga}",
    params(("saga" = Uuid, Path, description = "The saga's id.")),
    responses(
        RequestErrors,
        (status = 200, description = "The saga.", body = SagaView),
        (status = 400, description = "Not a saga id (a UUID).", body = ErrorBody),
        (status = 404, description = "No saga has that id.", body = ErrorBody),
        StoreErrors,
    ),
)]
async fn get_saga(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<SagaView>, ApiError> {
    let id = parse_id(&id)?;
    let store = state.runtime.store();
    let failed = |error: StoreError| ApiError::runtime(error.into(), Some(id));
    let row = store
        .saga(id)
        .await
        .map_err(failed)?
        .ok_or(RuntimeError::NotFound(id))?;
    let history = store.history(id).await.map_err(failed)?;
    Ok(Json(saga_view(&state.runtime, row, history)))
}

/// Every value is at most 1024 bytes without control characters; an empty one is absent.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Only sagas in this status: running, compensating, completed, compensated,
    /// compensation_failed or completion_failed.
    status: Option<String>,
    /// Only sagas of this name.
    name: Option<String>,
    /// Sagas per page (default 50).
    #[param(value_type = Option<u64>, minimum = 1, maximum = 500)]
    limit: Option<String>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// A page of sagas, newest first.
#[derive(Serialize, ToSchema)]
struct SagaList {
    sagas: Vec<SagaSummary>,
    /// Pass as `cursor` for the next page; null on the last page.
    next_cursor: Option<String>,
}

/// A query parameter's value, refused with 400 when it holds a control character (NUL, which
/// PostgreSQL cannot take, among them) or is longer than [`MAX_QUERY_VALUE_BYTES`].
pub(crate) fn query_value<'a>(
    name: &str,
    value: Option<&'a str>,
) -> Result<Option<&'a str>, ApiError> {
    let Some(value) = value else {
        return Ok(None);
    };
    if value.chars().any(char::is_control) {
        return Err(bad_request(format!(
            "the query parameter `{name}` contains a control character"
        )));
    }
    if value.len() > MAX_QUERY_VALUE_BYTES {
        return Err(bad_request(format!(
            "the query parameter `{name}` has {} bytes; the limit is {MAX_QUERY_VALUE_BYTES}",
            value.len()
        )));
    }
    Ok(Some(value))
}

/// `limit` of a listing: 1 to [`MAX_PAGE`], [`DEFAULT_PAGE`] when absent.
pub(crate) fn page_limit(raw: Option<&str>) -> Result<u64, ApiError> {
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
pub(crate) fn encode_cursor(row: &SagaListing) -> String {
    format!("{}_{}", row.created_at.timestamp_micros(), row.id)
}

pub(crate) fn decode_cursor(raw: &str) -> Result<(DateTime<Utc>, Uuid), ApiError> {
    let invalid = || bad_request(format!("`{raw}` is not a cursor from a previous page"));
    let (micros, id) = raw.split_once('_').ok_or_else(invalid)?;
    let micros: i64 = micros.parse().map_err(|_| invalid())?;
    let at = DateTime::from_timestamp_micros(micros)
        .filter(|at| CURSOR_YEARS.contains(&at.year()))
        .ok_or_else(invalid)?;
    Ok((at, Uuid::parse_str(id).map_err(|_| invalid())?))
}

/// Sagas, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/sagas",
    params(ListQuery),
    responses(
        RequestErrors,
        (status = 200, description = "A page of sagas.", body = SagaList),
        (status = 400, description = "A query parameter is invalid.", body = ErrorBody),
        StoreErrors,
    ),
)]
async fn list_sagas(
    State(state): State<ApiState>,
    Query(query): Query<ListQuery>,
) -> Result<Json<SagaList>, ApiError> {
    let status = query_value("status", query.status.as_deref())?;
    let name = query_value("name", query.name.as_deref())?;
    let limit = query_value("limit", query.limit.as_deref())?;
    let cursor = query_value("cursor", query.cursor.as_deref())?;
    let status = match status.filter(|s| !s.is_empty()) {
        Some(raw) => Some(raw.parse::<SagaStatus>().map_err(|e| {
            bad_request(format!(
                "{e}; use running, compensating, completed, compensated, compensation_failed or completion_failed"
            ))
        })?),
        None => None,
    };
    let limit = page_limit(limit)?;
    let before = cursor
        .filter(|c| !c.is_empty())
        .map(decode_cursor)
        .transpose()?;
    let filter = ListFilter {
        status,
        name: name.filter(|n| !n.is_empty()).map(str::to_owned),
        idempotency_key: None,
        limit: limit + 1,
        before,
    };
    // The columns alone: one saga whose state cannot be read must not fail every listing.
    let mut rows = state.runtime.store().listing(&filter).await?;
    let next_cursor = if rows.len() as u64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(encode_cursor)
    } else {
        None
    };
    let sagas: Vec<SagaSummary> = rows.iter().map(SagaSummary::from).collect();
    Ok(Json(SagaList { sagas, next_cursor }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct SetAsideQuery {
    /// Entries at most (default 50).
    #[param(value_type = Option<u64>, minimum = 1, maximum = 500)]
    limit: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct SetAsideList {
    set_aside: Vec<SetAside>,
}

/// Timers and replies that can never be handled, newest first, with why.
#[utoipa::path(
    get,
    path = "/set-aside",
    params(SetAsideQuery),
    responses(
        RequestErrors,
        (status = 200, description = "The set-aside inputs.", body = SetAsideList),
        (status = 400, description = "`limit` is invalid.", body = ErrorBody),
        StoreErrors,
    ),
)]
async fn list_set_aside(
    State(state): State<ApiState>,
    Query(query): Query<SetAsideQuery>,
) -> Result<Json<SetAsideList>, ApiError> {
    let limit = page_limit(query_value("limit", query.limit.as_deref())?)?;
    let items = state.runtime.store().list_set_aside(limit).await?;
    Ok(Json(SetAsideList { set_aside: items }))
}

/// An empty body aborts with the reason "aborted through the API".
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct AbortBody {
    /// Recorded with the saga; at most 512 characters.
    #[schema(max_length = 512)]
    reason: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct MarkBody {
    /// The step whose compensation was done by hand.
    step: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct MarkCompletedBody {
    /// The step whose action was done by hand.
    step: String,
    /// Merged into the saga data, as a success's output would be.
    #[serde(default)]
    #[schema(value_type = Object)]
    output: Data,
}

/// The body of a command that takes none: empty, or `{}`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NoBody {}

/// What became of an operator command.
#[derive(Serialize, ToSchema)]
struct CommandOutcome {
    saga_id: Uuid,
    /// False when the command changed nothing (the saga was already where it asked).
    applied: bool,
    /// Why it changed nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
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
    caller: Option<Extension<Caller>>,
    id: &str,
    command: OperatorCommand,
) -> Result<Response, ApiError> {
    let id = parse_id(id)?;
    // Recorded in the events the command causes; absent when the API has no tokens.
    let by = caller.map(|Extension(caller)| caller.name);
    let outcome = state
        .runtime
        .operate_as(id, command, by)
        .await
        .map_err(|error| ApiError::runtime(error, Some(id)))?;
    let body = match outcome {
        Outcome::Applied => CommandOutcome {
            saga_id: id,
            applied: true,
            reason: None,
        },
        Outcome::Ignored(why) => CommandOutcome {
            saga_id: id,
            applied: false,
            reason: Some(why.to_string()),
        },
        Outcome::Rejected(why) => return Err(ApiError::new(StatusCode::CONFLICT, why.to_string())),
    };
    Ok((StatusCode::OK, Json(body)).into_response())
}

/// Stops the saga: it compensates its completed steps as soon as no pivot is in flight.
#[utoipa::path(
    post,
    path = "/sagas/{saga}/abort",
    params(("saga" = Uuid, Path, description = "The saga's id.")),
    request_body(content = Option<AbortBody>, content_type = "application/json"),
    responses(
        RequestErrors,
        CommandAnswers,
        BodyErrors,
        StoreErrors,
    ),
)]
async fn abort(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    caller: Option<Extension<Caller>>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let body: AbortBody = parse_body(&body, Some(AbortBody { reason: None }))?;
    let reason = body
        .reason
        .unwrap_or_else(|| "aborted through the API".into());
    // It is stored and shown with the saga: held to the length of the system's own reasons.
    let chars = reason.chars().count();
    if chars > limits::MAX_REASON_CHARS {
        return Err(unprocessable(format!(
            "the reason has {chars} characters; the limit is {}",
            limits::MAX_REASON_CHARS
        )));
    }
    operate(&state, caller, &id, OperatorCommand::Abort { reason }).await
}

/// Retries the failed compensation, with a fresh budget.
#[utoipa::path(
    post,
    path = "/sagas/{saga}/retry",
    params(("saga" = Uuid, Path, description = "The saga's id.")),
    request_body(content = Option<NoBody>, content_type = "application/json"),
    responses(
        RequestErrors,
        CommandAnswers,
        BodyErrors,
        StoreErrors,
    ),
)]
async fn retry(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    caller: Option<Extension<Caller>>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    parse_body(&body, Some(NoBody {}))?;
    operate(&state, caller, &id, OperatorCommand::RetryCompensation).await
}

/// Retries the step whose failure past the point of no return stopped the saga.
#[utoipa::path(
    post,
    path = "/sagas/{saga}/retry-step",
    params(("saga" = Uuid, Path, description = "The saga's id.")),
    request_body(content = Option<NoBody>, content_type = "application/json"),
    responses(
        RequestErrors,
        CommandAnswers,
        BodyErrors,
        StoreErrors,
    ),
)]
async fn retry_step(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    caller: Option<Extension<Caller>>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    parse_body(&body, Some(NoBody {}))?;
    operate(&state, caller, &id, OperatorCommand::RetryStep).await
}

/// Records that an operator did the failed step's action by hand.
#[utoipa::path(
    post,
    path = "/sagas/{saga}/mark-completed",
    params(("saga" = Uuid, Path, description = "The saga's id.")),
    request_body(content = MarkCompletedBody, content_type = "application/json"),
    responses(
        RequestErrors,
        CommandAnswers,
        BodyErrors,
        StoreErrors,
    ),
)]
async fn mark_completed(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    caller: Option<Extension<Caller>>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let body: MarkCompletedBody = parse_body(&body, None)?;
    limits::check_data_size("the output", &body.output)
        .map_err(|why| ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, why))?;
    operate(
        &state,
        caller,
        &id,
        OperatorCommand::MarkCompleted {
            step: body.step,
            output: body.output,
        },
    )
    .await
}

/// Records that an operator undid the step by hand.
#[utoipa::path(
    post,
    path = "/sagas/{saga}/mark-compensated",
    params(("saga" = Uuid, Path, description = "The saga's id.")),
    request_body(content = MarkBody, content_type = "application/json"),
    responses(
        RequestErrors,
        CommandAnswers,
        BodyErrors,
        StoreErrors,
    ),
)]
async fn mark_compensated(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    caller: Option<Extension<Caller>>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let body: MarkBody = parse_body(&body, None)?;
    operate(
        &state,
        caller,
        &id,
        OperatorCommand::MarkCompensated { step: body.step },
    )
    .await
}

/// Every definition version: those stored (each one an orchestrator started with) and those
/// only sagas recorded, with how many sagas run on each. A saga runs to its end on the version
/// it started with; `orchestrator prune-definitions` deletes versions no saga needs.
#[utoipa::path(
    get,
    path = "/definitions",
    responses(
        RequestErrors,
        (status = 200, description = "Every version.", body = DefinitionList),
        StoreErrors,
    ),
)]
async fn list_definitions(State(state): State<ApiState>) -> Result<Json<DefinitionList>, ApiError> {
    Ok(Json(DefinitionList {
        definitions: state.runtime.store().definition_versions().await?,
    }))
}

#[derive(Serialize, ToSchema)]
struct DefinitionList {
    /// By saga name, the most recently loaded first.
    definitions: Vec<DefinitionVersion>,
}

/// Alive: answers as long as the process serves HTTP.
#[utoipa::path(
    get,
    path = "/healthz",
    responses(
        RequestErrors,
        (status = 200, description = "`ok`.", body = String, content_type = "text/plain"),
    ),
)]
async fn healthz() -> &'static str {
    "ok"
}

/// What `/readyz` found.
#[derive(Serialize, ToSchema)]
struct Readiness {
    /// The database answers.
    database: bool,
    /// The broker connection is open now.
    broker: bool,
    /// Background tasks that stopped, with why.
    stopped_tasks: std::collections::BTreeMap<String, String>,
    /// Other orchestrators seen on the same vhost with another database.
    foreign_orchestrators: Vec<String>,
}

/// `200` only when the database answers, the broker connection is open now, and no background
/// task has stopped; the body says which of them is not.
#[utoipa::path(
    get,
    path = "/readyz",
    responses(
        RequestErrors,
        (status = 200, description = "Ready.", body = Readiness),
        (status = 503, description = "Not ready; the body says why.", body = Readiness),
    ),
)]
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
        Json(Readiness {
            database,
            broker,
            stopped_tasks: stopped,
            foreign_orchestrators: foreign,
        }),
    )
        .into_response()
}

/// Prometheus metrics.
#[utoipa::path(
    get,
    path = "/metrics",
    responses(
        RequestErrors,
        (status = 200, description = "The Prometheus text format.", body = String,
         content_type = "text/plain"),
        StoreErrors,
    ),
)]
async fn metrics(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let text = state
        .metrics
        .render(state.runtime.store(), state.runtime.definitions())
        .await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    responses(
        RequestErrors,
        (status = 200, description = "The OpenAPI 3.1 document of this API.", body = Object),
    ),
)]
async fn openapi_json() -> Json<&'static Value> {
    static DOCUMENT: std::sync::LazyLock<Value> =
        std::sync::LazyLock::new(crate::openapi::document);
    Json(&DOCUMENT)
}
