//! The web view at `/ui`: server-rendered HTML (maud, which escapes every value it inserts:
//! saga data and errors are user input) over the same store queries as the API, with a little
//! JavaScript for the Mermaid graph and the operator actions. The assets (the stylesheet, the
//! script, and mermaid.min.js, MIT, vendored from the npm package `mermaid` 11.17.2) are
//! compiled into the binary.
//!
//! - `GET /ui`: sagas newest first, paged like `GET /sagas`, filtered by status and name,
//!   searched by saga id or idempotency key, with counts per status;
//! - `GET /ui/sagas/{id}`: one saga: status, current step, data, steps, the timeline of its
//!   events, its definition's graph coloured by step state, links to its participants' queues
//!   in the RabbitMQ management UI, and the operator actions its status allows;
//! - `GET /ui/login`, `POST /ui/login`, `POST /ui/logout`: the session cookie (see
//!   [`crate::auth`]): a browser cannot send a bearer header when it navigates;
//! - `GET /ui/assets/{file}`: the embedded assets, cached for a year (their URLs carry a hash
//!   of their content).
//!
//! The actions are buttons that, once confirmed, POST to the API itself (`/sagas/{id}/abort`,
//! ...): the same roles and the same answers, with the session cookie and the `X-Saga-UI`
//! header in place of the bearer header.

use std::fmt::Write as _;
use std::sync::{Arc, LazyLock};

use axum::Router;
use axum::extract::{Extension, Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use chrono::{DateTime, TimeDelta, Utc};
use maud::{DOCTYPE, Markup, html};
use saga_engine::state::StepStatus;
use saga_engine::{SagaDefinition, StepKind};
use saga_schemas::SagaStatus;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::api::{self, ApiError, SagaView};
use crate::auth::{Caller, Role, SESSION_COOKIE, SESSION_MAX_AGE, Tokens};
use crate::runtime::Runtime;
use crate::store::{ListFilter, StoreError};

/// Where the RabbitMQ management UI is, for links to queues, when nothing says otherwise.
pub const DEFAULT_MANAGEMENT_URL: &str = "http://localhost:15672";

/// The longest value shown in a timeline row; the saga data section shows data in full.
const MAX_DETAIL_CHARS: usize = 400;

/// What the web view needs besides the runtime: where the management UI is.
#[derive(Debug, Clone)]
pub struct UiConfig {
    /// The management UI's base URL, without a trailing slash.
    pub management_url: String,
    /// The vhost of the orchestrator's AMQP URL (`/` by default).
    pub vhost: String,
}

impl UiConfig {
    /// `amqp_url` may be a comma-separated list of one cluster's nodes: they share a vhost.
    pub fn new(management_url: &str, amqp_url: &str) -> UiConfig {
        let first = amqp_url.split(',').next().unwrap_or_default().trim();
        let vhost = first
            .parse::<saga_amqp::lapin::uri::AMQPUri>()
            .map(|uri| uri.vhost)
            .unwrap_or_else(|_| "/".to_owned());
        UiConfig {
            management_url: management_url.trim_end_matches('/').to_owned(),
            vhost,
        }
    }

    /// The management UI's page of participant's command queue.
    fn queue_url(&self, participant: &str) -> String {
        format!(
            "{}/#/queues/{}/{}",
            self.management_url,
            encode(&self.vhost),
            encode(&format!("saga.commands.{participant}"))
        )
    }
}

#[derive(Clone)]
struct UiState {
    runtime: Runtime,
    config: Arc<UiConfig>,
    /// The API's tokens: none means no login (the API is open too).
    tokens: Tokens,
}

/// The web view's routes; [`crate::auth::protect`] guards them with the API's.
pub fn router(runtime: Runtime, config: UiConfig, tokens: Tokens) -> Router {
    Router::new()
        .route("/ui", get(list))
        .route("/ui/sagas/{id}", get(saga_page))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/assets/{file}", get(asset))
        .with_state(UiState {
            runtime,
            config: Arc::new(config),
            tokens,
        })
}

// --- assets ---------------------------------------------------------------------------------

/// `(file, content type, bytes)` of each embedded asset.
const ASSETS: [(&str, &str, &[u8]); 3] = [
    (
        "ui.css",
        "text/css; charset=utf-8",
        include_bytes!("assets/ui.css"),
    ),
    (
        "ui.js",
        "text/javascript; charset=utf-8",
        include_bytes!("assets/ui.js"),
    ),
    (
        "mermaid.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("assets/mermaid.min.js"),
    ),
];

/// A hash of every asset: in their URLs, so a year's caching never serves a stale one.
static ASSET_VERSION: LazyLock<String> = LazyLock::new(|| {
    let mut hash = Sha256::new();
    for (_, _, bytes) in ASSETS {
        hash.update(bytes);
    }
    hash.finalize()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
});

fn asset_url(file: &str) -> String {
    format!("/ui/assets/{file}?v={}", *ASSET_VERSION)
}

async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, bytes)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            *bytes,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}

// --- pages ----------------------------------------------------------------------------------

/// An HTML answer: never cached (it shows live state), and under a policy that runs only this
/// origin's scripts, so that nothing a saga carries can run even if it slipped through.
fn page(status: StatusCode, markup: Markup) -> Response {
    const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self' \
                          'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; \
                          connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
                          base-uri 'none'";
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // Not `no-referrer`: under it a browser posts the login form with `Origin: null`,
            // and the login checks the origin.
            (header::REFERRER_POLICY, "same-origin"),
        ],
        markup.into_string(),
    )
        .into_response()
}

/// Who is looking, for the header and the actions.
struct Viewer<'a> {
    caller: Option<&'a Caller>,
    /// Tokens are configured: the API and the view need them.
    auth: bool,
}

impl Viewer<'_> {
    /// Without tokens every request may operate.
    fn may_operate(&self) -> bool {
        !self.auth || self.caller.is_some_and(|c| c.role >= Role::Operate)
    }
}

fn layout(title: &str, viewer: &Viewer, graph: bool, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · saga orchestrator" }
                link rel="stylesheet" href=(asset_url("ui.css"));
                @if graph {
                    script src=(asset_url("mermaid.min.js")) defer {}
                }
                script src=(asset_url("ui.js")) defer {}
            }
            body {
                header.top {
                    a href="/ui" { "Saga orchestrator" }
                    a href="/ui" { "Sagas" }
                    span.who {
                        @if let Some(caller) = viewer.caller {
                            "signed in as " strong { (caller.name) } " (" (caller.role) ") "
                            form method="post" action="/ui/logout" {
                                button type="submit" { "Log out" }
                            }
                        } @else if !viewer.auth {
                            "no API tokens configured: open to this machine"
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// An error page: the status and why.
fn error_page(status: StatusCode, viewer: &Viewer, why: &str) -> Response {
    let title = status.canonical_reason().unwrap_or("Error");
    page(
        status,
        layout(
            title,
            viewer,
            false,
            html! {
                h1 { (title) }
                p.notice.error { (why) }
                p { a href="/ui" { "Back to the sagas" } }
            },
        ),
    )
}

fn api_error_page(error: ApiError, viewer: &Viewer) -> Response {
    let (status, why) = error.parts();
    error_page(status, viewer, why)
}

fn store_error_page(error: StoreError, viewer: &Viewer) -> Response {
    api_error_page(ApiError::from(error), viewer)
}

// --- the list -------------------------------------------------------------------------------

#[derive(Deserialize)]
struct ListParams {
    status: Option<String>,
    name: Option<String>,
    /// A saga id: straight to its page.
    id: Option<String>,
    /// An idempotency key.
    key: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

/// A query parameter, checked as the API checks them; empty counts as absent.
fn param<'a>(name: &str, value: &'a Option<String>) -> Result<Option<&'a str>, ApiError> {
    Ok(api::query_value(name, value.as_deref())?.filter(|v| !v.trim().is_empty()))
}

async fn list(
    State(state): State<UiState>,
    caller: Option<Extension<Caller>>,
    Query(params): Query<ListParams>,
) -> Response {
    let caller = caller.map(|Extension(c)| c);
    let viewer = Viewer {
        caller: caller.as_ref(),
        auth: !state.tokens.is_empty(),
    };
    let parsed = (|| {
        let id = param("id", &params.id)?;
        let status = match param("status", &params.status)? {
            Some(raw) => Some(raw.parse::<SagaStatus>().map_err(|e| {
                ApiError::new(StatusCode::BAD_REQUEST, format!("{e}: not a saga status"))
            })?),
            None => None,
        };
        let name = param("name", &params.name)?.map(str::to_owned);
        let key = param("key", &params.key)?.map(str::to_owned);
        let limit = api::page_limit(param("limit", &params.limit)?)?;
        let before = param("cursor", &params.cursor)?
            .map(api::decode_cursor)
            .transpose()?;
        Ok::<_, ApiError>((id, status, name, key, limit, before))
    })();
    let (id, status, name, key, limit, before) = match parsed {
        Ok(parsed) => parsed,
        Err(error) => return api_error_page(error, &viewer),
    };
    if let Some(id) = id {
        return match api::parse_id(id.trim()) {
            Ok(id) => Redirect::to(&format!("/ui/sagas/{id}")).into_response(),
            Err(error) => api_error_page(error, &viewer),
        };
    }
    let store = state.runtime.store();
    let filter = ListFilter {
        status,
        name: name.clone(),
        idempotency_key: key.clone(),
        limit: limit + 1,
        before,
    };
    let (mut rows, counts) =
        match tokio::try_join!(store.listing(&filter), store.status_counts(name.as_deref())) {
            Ok(found) => found,
            Err(error) => return store_error_page(error, &viewer),
        };
    let next = if rows.len() as u64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(api::encode_cursor)
    } else {
        None
    };
    let count = |s: SagaStatus| {
        counts
            .iter()
            .find(|(status, _)| *status == s)
            .map_or(0, |(_, n)| *n)
    };
    let total: u64 = counts.iter().map(|(_, n)| n).sum();
    let link = |status: Option<SagaStatus>, cursor: Option<&str>| {
        let limit = limit.to_string();
        query_string(&[
            ("status", status.map(SagaStatus::as_str)),
            ("name", name.as_deref()),
            ("key", key.as_deref()),
            ("limit", params.limit.as_ref().map(|_| limit.as_str())),
            ("cursor", cursor),
        ])
    };
    let mut names: Vec<&str> = state
        .runtime
        .definitions()
        .sagas
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    names.sort_unstable();
    let body = html! {
        h1 { "Sagas" }
        nav.counts aria-label="Counts per status" {
            a.on[status.is_none()] href=(link(None, None)) {
                "all " strong { (total) }
            }
            @for s in SagaStatus::ALL {
                a.on[status == Some(s)] href=(link(Some(s), None)) data-status=(s.as_str()) {
                    span class={"badge st-" (s.as_str())} { (s.as_str()) } " " strong { (count(s)) }
                }
            }
        }
        form.filters method="get" action="/ui" {
            label { "Status"
                select name="status" {
                    option value="" { "any" }
                    @for s in SagaStatus::ALL {
                        option value=(s.as_str()) selected[status == Some(s)] { (s.as_str()) }
                    }
                }
            }
            label { "Saga name"
                select name="name" {
                    option value="" { "any" }
                    @for n in &names {
                        option value=(n) selected[name.as_deref() == Some(*n)] { (n) }
                    }
                    @if let Some(other) = name.as_deref().filter(|n| !names.contains(n)) {
                        option value=(other) selected { (other) }
                    }
                }
            }
            label { "Idempotency key"
                input type="search" name="key" value=[key.as_deref()] placeholder="order-1";
            }
            button type="submit" { "Filter" }
        }
        form.filters method="get" action="/ui" {
            label { "Saga id"
                input type="search" name="id" size="38"
                    placeholder="00000000-0000-0000-0000-000000000000";
            }
            button type="submit" { "Open" }
        }
        @if rows.is_empty() {
            p.notice.info { "No saga matches." }
        } @else {
            table #sagas {
                thead { tr {
                    th { "Saga id" } th { "Name" } th { "Status" } th { "Current step" }
                    th { "Business key" } th { "Started (UTC)" } th { "Updated (UTC)" }
                } }
                tbody {
                    @for row in &rows {
                        tr data-saga=(row.id) {
                            td.mono { a href={"/ui/sagas/" (row.id)} { (row.id) } }
                            td { (row.name) }
                            td { (status_badge(row.status)) }
                            td { (row.current_step.as_deref().unwrap_or("")) }
                            td { (row.business_key.as_deref().unwrap_or("")) }
                            td.mono { (timestamp(row.created_at)) }
                            td.mono { (timestamp(row.updated_at)) }
                        }
                    }
                }
            }
        }
        p.pager {
            @if before.is_some() {
                a href=(link(status, None)) { "First page" } " "
            }
            @if let Some(cursor) = &next {
                a rel="next" href=(link(status, Some(cursor))) { "Next page" }
            }
        }
    };
    page(StatusCode::OK, layout("Sagas", &viewer, false, body))
}

// --- one saga -------------------------------------------------------------------------------

#[derive(Deserialize)]
struct SagaParams {
    /// The action the page's script just sent, to say it was taken.
    done: Option<String>,
    /// Why that action changed nothing.
    unchanged: Option<String>,
}

/// An operator action the page offers: the API route's last segment, its label, the question
/// that confirms it, and the step it names (mark-completed, mark-compensated).
struct Action {
    route: &'static str,
    label: &'static str,
    confirm: String,
    step: Option<String>,
    danger: bool,
}

const ACTIONS: [&str; 5] = [
    "abort",
    "retry",
    "mark-compensated",
    "retry-step",
    "mark-completed",
];

fn actions(view: &SagaView) -> Vec<Action> {
    let step = view.current_step.clone().unwrap_or_default();
    let action = |route, label, confirm: String, step: Option<String>, danger| Action {
        route,
        label,
        confirm,
        step,
        danger,
    };
    match view.status {
        // Before the point of no return an operator may abort; past it (the pivot done, or
        // a retriable step begun) only push the retriable step on, or do it by hand.
        SagaStatus::Running if !past_point_of_no_return(view) => vec![action(
            "abort",
            "Abort",
            format!(
                "Abort saga {}? Its completed steps will be compensated.",
                view.id
            ),
            None,
            true,
        )],
        SagaStatus::Running => vec![
            action(
                "retry-step",
                "Retry step now",
                format!("Retry step `{step}` now, with a fresh budget?"),
                None,
                false,
            ),
            action(
                "mark-completed",
                "Mark completed",
                format!("Record that `{step}` was done by hand? The saga goes on."),
                Some(step.clone()),
                true,
            ),
        ],
        SagaStatus::CompensationFailed => vec![
            action(
                "retry",
                "Retry compensation",
                format!("Retry the compensation of `{step}` with a fresh budget?"),
                None,
                false,
            ),
            action(
                "mark-compensated",
                "Mark compensated",
                format!("Record that `{step}` was undone by hand? The saga goes on compensating."),
                Some(step.clone()),
                true,
            ),
        ],
        SagaStatus::CompletionFailed => vec![
            action(
                "retry-step",
                "Retry step",
                format!("Retry step `{step}` with a fresh budget?"),
                None,
                false,
            ),
            action(
                "mark-completed",
                "Mark completed",
                format!("Record that `{step}` was done by hand? The saga goes on."),
                Some(step.clone()),
                true,
            ),
        ],
        SagaStatus::Compensating | SagaStatus::Completed | SagaStatus::Compensated => vec![],
    }
}

/// Whether the saga has passed its point of no return: its pivot completed, or (without one)
/// its first retriable step was sent.
fn past_point_of_no_return(view: &SagaView) -> bool {
    view.steps.iter().any(|s| match s.kind {
        StepKind::Pivot => s.status == StepStatus::Completed,
        StepKind::Retriable => s.attempts > 0,
        StepKind::Compensatable => false,
    })
}

async fn saga_page(
    State(state): State<UiState>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
    Query(params): Query<SagaParams>,
) -> Response {
    let caller = caller.map(|Extension(c)| c);
    let viewer = Viewer {
        caller: caller.as_ref(),
        auth: !state.tokens.is_empty(),
    };
    let id = match api::parse_id(&id) {
        Ok(id) => id,
        Err(error) => return api_error_page(error, &viewer),
    };
    let store = state.runtime.store();
    let row = match store.saga(id).await {
        Ok(Some(row)) => row,
        Ok(None) => {
            return error_page(
                StatusCode::NOT_FOUND,
                &viewer,
                &format!("No saga has the id {id}."),
            );
        }
        Err(error) => return store_error_page(error, &viewer),
    };
    let history = match store.history(id).await {
        Ok(history) => history,
        Err(error) => return store_error_page(error, &viewer),
    };
    let idempotency_key = row.idempotency_key.clone();
    let runtime = &state.runtime;
    let definition = runtime
        .definition_of(&row.name, &row.state.definition_version)
        .or_else(|| runtime.definitions().get(&row.name));
    let view = api::saga_view(runtime, row, history);
    let done = params
        .done
        .as_deref()
        .and_then(|done| ACTIONS.iter().find(|a| **a == done));
    let actions = actions(&view);
    let may_operate = viewer.may_operate();
    let mut participants: Vec<&str> = view.steps.iter().map(|s| s.participant.as_str()).collect();
    participants.sort_unstable();
    participants.dedup();

    let body = html! {
        h1 { (view.name) " " span.mono.muted { (view.id) } }
        @if let Some(done) = done {
            @match params.unchanged.as_deref() {
                Some(why) => p.notice.info #flash { (done) " changed nothing: " (why) },
                None => p.notice.ok #flash { (done) ": done." },
            }
        }
        div.overview {
        dl.facts {
            dt { "Status" } dd #status { (status_badge(view.status)) }
            dt { "Current step" } dd #current-step { (view.current_step.as_deref().unwrap_or("–")) }
            @if let Some(waiting) = &view.waiting_on {
                dt { "Waiting on" }
                dd {
                    (waiting.step) " (" (direction(waiting.direction)) ", attempt " (waiting.attempt)
                    ") since " (timestamp(waiting.since)) " UTC, "
                    (duration(Utc::now() - waiting.since)) " ago"
                }
            }
            @if let Some(reason) = &view.compensation_reason {
                dt { "Compensation reason" } dd { (reason) }
            }
            dt { "Business key" } dd { (view.business_key.as_deref().unwrap_or("–")) }
            dt { "Idempotency key" } dd { (idempotency_key.as_deref().unwrap_or("–")) }
            dt { "Definition version" } dd.mono { (view.definition_version) }
            dt { "Started" } dd { (timestamp(view.created_at)) " UTC" }
            dt { "Updated" } dd { (timestamp(view.updated_at)) " UTC (" (duration(view.updated_at - view.created_at)) " after the start)" }
            dt { "Participants' queues" }
            dd {
                @for p in &participants {
                    a.queue href=(state.config.queue_url(p)) target="_blank" rel="noopener noreferrer" {
                        "saga.commands." (p)
                    }
                    " "
                }
                span.muted { "(RabbitMQ management UI, vhost " code { (state.config.vhost) } ")" }
            }
        }
        section.definition {
            @if let Some(definition) = definition {
                p.legend.muted {
                    "Definition, steps coloured by state: "
                    @for (class, what) in LEGEND {
                        span class={"badge st-step-" (class)} { (what) }
                    }
                }
                div.graph {
                    pre.mermaid #graph { (graph(definition, &view)) }
                }
            } @else {
                p.notice.error { "This saga's definition is gone: no graph." }
            }
        }
        }

        h2 { "Operator actions" }
        div.actions {
            @if actions.is_empty() {
                span.muted { "None: a " (view.status.as_str()) " saga takes no operator action." }
            }
            @for action in &actions {
                @if action.route == "abort" {
                    label { "Reason "
                        input #abort-reason type="text" maxlength="512" placeholder="aborted in the web view" disabled[!may_operate];
                    }
                }
                @if action.route == "mark-completed" {
                    label { "Output (a JSON object, merged into the data) "
                        input #mark-output.mono type="text" size="30" placeholder=r#"{"shipment_id": "by hand"}"# disabled[!may_operate];
                    }
                }
                button type="button" class=[action.danger.then_some("danger")]
                    data-action=(action.route) data-saga=(view.id) data-confirm=(action.confirm)
                    data-step=[action.step.as_deref()] disabled[!may_operate] {
                    (action.label)
                }
            }
            @if !actions.is_empty() && !may_operate {
                span #role-note.notice.error {
                    @if let Some(caller) = viewer.caller {
                        "Token " strong { (caller.name) } " has the role " (caller.role)
                        ": these actions need a token with the role operate."
                    }
                }
            }
            noscript { span.muted { "The actions need JavaScript (or the API: POST /sagas/" (view.id) "/…)." } }
        }
        p #action-result role="status" {}

        h2 { "Steps" }
        table #steps {
            thead { tr {
                th { "Step" } th { "Participant" } th { "Kind" } th { "Status" }
                th.num { "Attempts" } th.num { "Compensation attempts" } th { "Last error" }
                th { "Output" }
            } }
            tbody {
                @for step in &view.steps {
                    tr data-step=(step.name) {
                        td { (step.name) }
                        td { a href=(state.config.queue_url(&step.participant)) target="_blank" rel="noopener noreferrer" { (step.participant) } }
                        td { (kind(step.kind)) }
                        td { (step_badge(step.status)) }
                        td.num { (step.attempts) }
                        td.num { (step.compensation_attempts) }
                        td { (step.last_error.as_deref().unwrap_or("")) }
                        td.mono { @if let Some(output) = &step.output { (clip(&compact(&Value::Object(output.clone())))) } }
                    }
                }
            }
        }
        @if view.steps.is_empty() {
            p.notice.error { "The definition this saga runs on is gone: its steps cannot be shown." }
        }

        h2 { "Timeline" }
        table #timeline {
            thead { tr {
                th.num { "#" } th { "Recorded (UTC)" } th.num { "Since previous" }
                th.num { "Since start" } th { "Event" } th { "Details" }
            } }
            tbody {
                @for (i, entry) in view.history.iter().enumerate() {
                    @let start = view.history[0].recorded_at;
                    @let previous = if i == 0 { entry.recorded_at } else { view.history[i - 1].recorded_at };
                    tr data-event=(entry.event.kind()) {
                        td.num { (entry.seq) }
                        td.mono { (timestamp(entry.recorded_at)) }
                        td.num { @if i > 0 { "+" (duration(entry.recorded_at - previous)) } }
                        td.num { (duration(entry.recorded_at - start)) }
                        td { code { (entry.event.kind()) } }
                        td.mono { (event_details(&entry.event)) }
                    }
                }
            }
        }


        h2 { "Saga data" }
        pre #data { (serde_json::to_string_pretty(&view.data).unwrap_or_default()) }
    };
    let title = format!("{} {}", view.name, view.id);
    page(StatusCode::OK, layout(&title, &viewer, true, body))
}

/// The badge classes of the legend, and what each means.
const LEGEND: [(&str, &str); 7] = [
    ("pending", "pending"),
    ("running", "running"),
    ("waiting_retry", "waiting for a retry"),
    ("completed", "completed"),
    ("failed", "failed"),
    ("compensating", "compensating"),
    ("compensated", "compensated"),
];

/// The definition's flowchart with each step (and its compensation) styled by its state.
fn graph(definition: &SagaDefinition, view: &SagaView) -> String {
    use saga_engine::graph;
    let mut source = graph::mermaid(definition);
    source.push_str(
        "    classDef pending fill:#f3f4f6,stroke:#9ca3af,color:#374151\n\
         \x20   classDef running fill:#dbeafe,stroke:#1d4ed8,color:#1e3a8a,stroke-width:3px\n\
         \x20   classDef waiting fill:#fef9c3,stroke:#a16207,color:#713f12,stroke-width:3px\n\
         \x20   classDef done fill:#dcfce7,stroke:#15803d,color:#14532d\n\
         \x20   classDef failed fill:#fee2e2,stroke:#b91c1c,color:#7f1d1d,stroke-width:3px\n\
         \x20   classDef compensating fill:#ffedd5,stroke:#c2410c,color:#7c2d12,stroke-width:3px\n\
         \x20   classDef compensated fill:#e5e7eb,stroke:#4b5563,color:#1f2937\n",
    );
    for (i, step) in definition.steps.iter().enumerate() {
        let status = view
            .steps
            .iter()
            .find(|s| s.name == step.name)
            .map_or(StepStatus::Pending, |s| s.status);
        let (node, undo) = match status {
            StepStatus::Pending => ("pending", None),
            StepStatus::Running => ("running", None),
            StepStatus::WaitingRetry => ("waiting", None),
            StepStatus::Completed => ("done", None),
            StepStatus::Failed => ("failed", None),
            StepStatus::Compensating => ("compensating", Some("running")),
            StepStatus::Compensated => ("compensated", Some("done")),
            StepStatus::CompensationFailed => ("failed", Some("failed")),
        };
        let _ = writeln!(source, "    class {} {node}", graph::step_id(i, &step.name));
        if let (StepKind::Compensatable, Some(undo)) = (step.kind, undo) {
            let _ = writeln!(source, "    class {} {undo}", graph::undo_id(i, &step.name));
        }
    }
    let end = match view.status {
        SagaStatus::Completed => Some(("completed", "done")),
        SagaStatus::Compensated => Some(("compensated", "compensated")),
        _ => None,
    };
    if let Some((node, class)) = end {
        let _ = writeln!(source, "    class {node} {class}");
    }
    source
}

fn status_badge(status: SagaStatus) -> Markup {
    html! { span class={"badge st-" (status.as_str())} data-status=(status.as_str()) { (status.as_str()) } }
}

fn step_status(status: StepStatus) -> &'static str {
    match status {
        StepStatus::Pending => "pending",
        StepStatus::Running => "running",
        StepStatus::WaitingRetry => "waiting_retry",
        StepStatus::Completed => "completed",
        StepStatus::Failed => "failed",
        StepStatus::Compensating => "compensating",
        StepStatus::Compensated => "compensated",
        StepStatus::CompensationFailed => "compensation_failed",
    }
}

fn step_badge(status: StepStatus) -> Markup {
    let name = step_status(status);
    html! { span class={"badge st-step-" (name)} { (name) } }
}

fn kind(kind: StepKind) -> &'static str {
    match kind {
        StepKind::Compensatable => "compensatable",
        StepKind::Pivot => "pivot",
        StepKind::Retriable => "retriable",
    }
}

fn direction(direction: saga_schemas::Direction) -> &'static str {
    match direction {
        saga_schemas::Direction::Execute => "action",
        saga_schemas::Direction::Compensate => "compensation",
    }
}

fn timestamp(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S%.3f").to_string()
}

/// A duration for people: `850 ms`, `12.4 s`, `3 min 5 s`, `2 h 10 min`.
fn duration(d: TimeDelta) -> String {
    let ms = d.num_milliseconds().max(0);
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{} min {} s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{} h {} min", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

/// An event's fields but its type, `key=value`, each value cut to [`MAX_DETAIL_CHARS`].
fn event_details(event: &saga_schemas::SagaEvent) -> String {
    let Ok(Value::Object(fields)) = serde_json::to_value(event) else {
        return String::new();
    };
    fields
        .iter()
        .filter(|(key, _)| *key != "type")
        .map(|(key, value)| {
            let value = match value {
                Value::String(text) => text.clone(),
                other => compact(other),
            };
            format!("{key}={}", clip(&value))
        })
        .collect::<Vec<_>>()
        .join("  ")
}

fn compact(value: &Value) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

fn clip(text: &str) -> String {
    match text.char_indices().nth(MAX_DETAIL_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// Percent-encodes all but RFC 3986's unreserved characters (for a path segment or a query
/// value alike).
pub(crate) fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(byte as char)
            }
            _ => {
                let _ = write!(out, "%{byte:02X}");
            }
        }
    }
    out
}

/// `/ui?k=v&...` of the pairs that have a value.
fn query_string(pairs: &[(&str, Option<&str>)]) -> String {
    let query: Vec<String> = pairs
        .iter()
        .filter_map(|(key, value)| value.map(|v| format!("{key}={}", encode(v))))
        .collect();
    match query.is_empty() {
        true => "/ui".to_owned(),
        false => format!("/ui?{}", query.join("&")),
    }
}

// --- login ----------------------------------------------------------------------------------

#[derive(Deserialize)]
struct LoginParams {
    next: Option<String>,
    /// `expired`: the session's token is no longer accepted.
    why: Option<String>,
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
    #[serde(default)]
    next: String,
}

/// Where to go after logging in: a page of this view, never another site.
fn next_page(next: Option<&str>) -> String {
    next.filter(|n| {
        (*n == "/ui" || n.starts_with("/ui/") || n.starts_with("/ui?"))
            && n.bytes().all(|b| b.is_ascii_graphic())
    })
    .unwrap_or("/ui")
    .to_owned()
}

fn login_form(status: StatusCode, next: &str, why: Option<&str>) -> Response {
    let viewer = Viewer {
        caller: None,
        auth: true,
    };
    let body = html! {
        div.login {
            h1 { "Log in" }
            p.muted { "Paste an API token (a " code { "read" } " token to look, an "
                      code { "operate" } " token to act). It is kept in an HttpOnly cookie for "
                      (SESSION_MAX_AGE / 3600) " hours." }
            @if let Some(why) = why { p.notice.error #login-error { (why) } }
            form method="post" action="/ui/login" {
                input type="hidden" name="next" value=(next);
                label for="token" { "Token" }
                input #token type="password" name="token" autocomplete="current-password" required autofocus;
                button type="submit" { "Log in" }
            }
        }
    };
    page(status, layout("Log in", &viewer, false, body))
}

async fn login_page(State(state): State<UiState>, Query(params): Query<LoginParams>) -> Response {
    if state.tokens.is_empty() {
        return Redirect::to("/ui").into_response();
    }
    let why = (params.why.as_deref() == Some("expired"))
        .then_some("The session's token is no longer accepted: log in again.");
    login_form(StatusCode::OK, &next_page(params.next.as_deref()), why)
}

/// A login posted from another site (a forged form) is refused: browsers send `Origin` with a
/// POST, and `Sec-Fetch-Site` too.
fn same_origin(headers: &HeaderMap) -> bool {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if text("sec-fetch-site").is_some_and(|site| site == "cross-site" || site == "same-site") {
        return false;
    }
    match (text("origin"), text("host")) {
        (Some(origin), Some(host)) => origin.split_once("://").is_some_and(|(_, o)| o == host),
        (Some(_), None) => false,
        (None, _) => true,
    }
}

async fn login(
    State(state): State<UiState>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    if state.tokens.is_empty() {
        return Redirect::to("/ui").into_response();
    }
    let next = next_page(Some(&form.next));
    if !same_origin(&headers) {
        return login_form(
            StatusCode::FORBIDDEN,
            &next,
            Some("Refused: the login form was posted from another site."),
        );
    }
    let token = form.token.trim();
    if state.tokens.find(token.as_bytes()).is_none() {
        return login_form(
            StatusCode::UNAUTHORIZED,
            &next,
            Some("That token is not valid."),
        );
    }
    // The token matched a configured one, so it holds only RFC 6750 token characters: a valid
    // cookie value.
    let mut cookie = format!(
        "{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={SESSION_MAX_AGE}"
    );
    // Behind a proxy that terminates TLS, the browser must never send the token in clear.
    let forwarded = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok());
    if forwarded.is_some_and(|proto| proto.eq_ignore_ascii_case("https")) {
        cookie.push_str("; Secure");
    }
    let mut response = Redirect::to(&next).into_response();
    match HeaderValue::from_str(&cookie) {
        Ok(value) => {
            response.headers_mut().insert(header::SET_COOKIE, value);
            response
        }
        Err(_) => login_form(
            StatusCode::UNAUTHORIZED,
            &next,
            Some("That token is not valid."),
        ),
    }
}

async fn logout() -> Response {
    let mut response = Redirect::to("/ui/login").into_response();
    let expired = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    if let Ok(value) = HeaderValue::from_str(&expired) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_links_carry_the_vhost() {
        let config = UiConfig::new("http://rabbit:15672/", "amqp://u:p@h:5672/%2f");
        assert_eq!(
            config.queue_url("payments"),
            "http://rabbit:15672/#/queues/%2F/saga.commands.payments"
        );
        let config = UiConfig::new(
            "http://localhost:15672",
            "amqp://u:p@a:5672/shop,amqp://u:p@b:5672/shop",
        );
        assert_eq!(config.vhost, "shop");
        assert!(
            config
                .queue_url("x")
                .contains("/queues/shop/saga.commands.x")
        );
    }

    #[test]
    fn only_this_view_is_a_next_page() {
        assert_eq!(next_page(Some("/ui/sagas/1")), "/ui/sagas/1");
        assert_eq!(next_page(Some("/ui?status=running")), "/ui?status=running");
        for bad in [
            "//evil.example/ui",
            "https://evil.example",
            "/sagas",
            "/ui/\r\nx",
            "",
        ] {
            assert_eq!(next_page(Some(bad)), "/ui", "{bad:?}");
        }
    }

    #[test]
    fn durations_read_like_a_person_writes_them() {
        assert_eq!(duration(TimeDelta::milliseconds(850)), "850 ms");
        assert_eq!(duration(TimeDelta::milliseconds(12_400)), "12.4 s");
        assert_eq!(duration(TimeDelta::seconds(185)), "3 min 5 s");
        assert_eq!(duration(TimeDelta::minutes(130)), "2 h 10 min");
        assert_eq!(duration(TimeDelta::milliseconds(-5)), "0 ms");
    }
}
