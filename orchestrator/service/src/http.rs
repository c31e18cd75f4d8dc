//! Serving the HTTP API: hyper's HTTP/1 server, set up for clients that are slow, greedy or
//! hostile. Every refusal made here is the API's JSON `{"error": ...}`:
//!
//! - a URI over [`MAX_URI_BYTES`] is 414; a header section over [`MAX_HEADER_BYTES`], or with
//!   more than [`MAX_HEADERS`] headers, is 431. hyper's own limits are set above ours so that
//!   ours answer; a request past hyper's (a URI over 64 KiB, a request head over
//!   [`HYPER_MAX_BUF_BYTES`], more than [`HYPER_MAX_HEADERS`] headers) gets hyper's own reply,
//!   with an empty body, since it never reaches the router;
//! - a request head that has not fully arrived [`HEADER_READ_TIMEOUT`] after the connection
//!   (or the previous request on it) was ready for it closes the connection, so an idle
//!   keep-alive connection is closed after that long too;
//! - every request body is read in full before the request is routed, so that whatever the
//!   answer the connection can serve the next request: over [`MAX_MESSAGE_BYTES`] it is 413,
//!   not in full within [`BODY_READ_TIMEOUT`] it is 408. These refusals, and 414 and 431, are
//!   sent with `Connection: close`; the rest of a body over the limit is read and thrown away
//!   first, up to [`DRAIN_BYTES`], so that a client still writing it gets the answer;
//! - a response the client does not read for [`WRITE_TIMEOUT`] (not one byte of it goes out)
//!   closes the connection, so a client that stops reading cannot hold a connection slot, nor
//!   a graceful shutdown, forever;
//! - at most [`MAX_CONNECTIONS`] connections are served at once; more wait in the listen
//!   backlog, accepted as others close. Bodies held at once are bounded by the same number,
//!   at most [`MAX_MESSAGE_BYTES`] each.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, BodyDataStream, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::serve::Listener;
use futures_util::StreamExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use saga_schemas::limits::MAX_MESSAGE_BYTES;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_io_timeout::TimeoutStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::api::ApiError;

/// The longest request URI (request target), in bytes.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// The largest header section: each header's name and value plus 4 bytes (`: ` and CRLF).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// The most headers in one request.
pub const MAX_HEADERS: usize = 100;
/// How long a connection may take to send a request head, or sit idle between requests.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request body may take to arrive in full.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a response may wait for the client to take any of it.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// The most connections served at once; 2,000 concurrent clients are served without waiting.
pub const MAX_CONNECTIONS: usize = 4096;

/// hyper's header count and read buffer, well above [`MAX_HEADERS`] and [`MAX_URI_BYTES`] plus
/// [`MAX_HEADER_BYTES`], so that requests past ours reach the router and get a JSON reason.
pub const HYPER_MAX_HEADERS: usize = 1000;
pub const HYPER_MAX_BUF_BYTES: usize = 256 * 1024;

/// The limits a server runs with; [`Default`] is the production set (tests shorten them).
#[derive(Debug, Clone, Copy)]
pub struct HttpConfig {
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub write_timeout: Duration,
    pub max_connections: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            header_read_timeout: HEADER_READ_TIMEOUT,
            body_read_timeout: BODY_READ_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// Serves `router` on `listener` until `shutdown`, then lets the requests in progress finish.
pub async fn serve(
    mut listener: TcpListener,
    router: axum::Router,
    config: HttpConfig,
    shutdown: CancellationToken,
) {
    let app = router.layer(middleware::from_fn_with_state(config, guard));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_headers(HYPER_MAX_HEADERS)
        .max_buf_size(HYPER_MAX_BUF_BYTES);
    let connections = Arc::new(Semaphore::new(config.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        // A permit first: past the cap, connections wait in the backlog, not in memory here.
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = Arc::clone(&connections).acquire_owned() => {
                permit.expect("the semaphore is never closed")
            }
        };
        let (stream, remote) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = Listener::accept(&mut listener) => accepted,
        };
        // hyper has no write timeout of its own.
        let mut stream = TimeoutStream::new(stream);
        stream.set_write_timeout(Some(config.write_timeout));
        let connection = http.serve_connection(
            TokioIo::new(Box::pin(stream)),
            TowerToHyperService::new(app.clone()),
        );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%remote, %error, "HTTP connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Refuses a request head over our limits, reads the body in full, then routes the request.
async fn guard(State(config): State<HttpConfig>, request: Request, next: Next) -> Response {
    if let Some(refusal) = over_limits(request.uri(), request.headers()) {
        return closing(refusal);
    }
    let (parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if let Some(declared) = declared.filter(|n| *n > MAX_MESSAGE_BYTES as u64) {
        if declared <= DRAIN_BYTES as u64 {
            let mut stream = body.into_data_stream();
            let _ = tokio::time::timeout(config.body_read_timeout, drain(&mut stream, 0)).await;
        }
        return closing(too_large());
    }
    let body = match tokio::time::timeout(config.body_read_timeout, read_body(body)).await {
        Ok(Ok(body)) => body,
        Ok(Err(refusal)) => return closing(refusal),
        Err(_) => {
            return closing(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the body did not arrive in full within {}",
                    humantime::format_duration(config.body_read_timeout)
                ),
            ));
        }
    };
    next.run(Request::from_parts(parts, Body::from(body))).await
}

/// The whole body, up to [`MAX_MESSAGE_BYTES`].
async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|error| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("the body could not be read: {error}"),
            )
        })?;
        if bytes.len() + chunk.len() > MAX_MESSAGE_BYTES {
            drain(&mut stream, bytes.len() + chunk.len()).await;
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes.into())
}

/// How much of a body over the limit is read and thrown away before the 413: a client that
/// writes its whole body before reading (most do, without `Expect: 100-continue`) then gets the
/// answer, instead of a broken pipe from a connection closed under it. Bodies past this are not
/// worth the bandwidth: the connection is closed.
pub const DRAIN_BYTES: usize = 8 * MAX_MESSAGE_BYTES;

/// Reads and discards the rest of a body, `seen` bytes of which were read, up to [`DRAIN_BYTES`].
async fn drain(stream: &mut BodyDataStream, mut seen: usize) {
    while seen <= DRAIN_BYTES {
        match stream.next().await {
            Some(Ok(chunk)) => seen += chunk.len(),
            _ => return,
        }
    }
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the body has more than {MAX_MESSAGE_BYTES} bytes, the limit"),
    )
}

/// A refusal after which the connection closes: the request's body was not read.
fn closing(refusal: ApiError) -> Response {
    let mut response = refusal.into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

fn over_limits(uri: &Uri, headers: &HeaderMap) -> Option<ApiError> {
    let uri_bytes = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len());
    if uri_bytes > MAX_URI_BYTES {
        return Some(ApiError::new(
            StatusCode::URI_TOO_LONG,
            format!("the URI has {uri_bytes} bytes; the limit is {MAX_URI_BYTES}"),
        ));
    }
    if headers.len() > MAX_HEADERS {
        return Some(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "the request has {} headers; the limit is {MAX_HEADERS} headers",
                headers.len()
            ),
        ));
    }
    let header_bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return Some(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("the headers have {header_bytes} bytes; the limit is {MAX_HEADER_BYTES}"),
        ));
    }
    None
}
