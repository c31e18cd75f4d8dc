//! Bearer-token authentication of the HTTP API.
//!
//! Tokens come from a file (`--tokens-file`, `TOKENS_FILE`) and from `--api-tokens`
//! (`API_TOKENS`), both in one format: entries `NAME ROLE TOKEN`, separated by newlines or
//! `;`, fields by spaces or tabs; `#` starts a comment that runs to the end of its line.
//!
//! - `NAME` (1 to 64 of `A-Z a-z 0-9 . _ @ -`) is who the token is; it is never secret.
//! - `ROLE` is `read` (every `GET`) or `operate` (everything `read` may, and every other
//!   method: start, abort, retry, retry-step, mark-completed, mark-compensated).
//! - `TOKEN` is at least [`MIN_TOKEN_CHARS`] of `A-Z a-z 0-9 - . _ ~ + / =` (RFC 6750's
//!   token characters), e.g. `openssl rand -hex 32`.
//!
//! `/healthz`, `/readyz` and `/openapi.json` are open; `/metrics` needs `read` unless
//! `--metrics-open`. A request without a usable `Authorization: Bearer` header, or with an
//! unknown token, is 401 with `WWW-Authenticate: Bearer`; a token without the role the request
//! needs is 403; both with the API's JSON `{"error": ...}`.
//!
//! The web view (`/ui`, [`crate::ui`]) logs in with a token once: `POST /ui/login` checks it
//! and sets it as the [`SESSION_COOKIE`] (HttpOnly, `SameSite=Strict`), which is taken like
//! the bearer header when there is none, on the view's pages and on the API calls its buttons
//! make. A request other than `GET` authenticated by the cookie must also carry the
//! [`UI_HEADER`] header: a cross-site form cannot send it, and a cross-site script cannot
//! without a CORS preflight this server never grants. A view page without a usable token
//! redirects to the login page instead of answering 401. The login and logout forms and the
//! view's static assets are open.
//!
//! Only a SHA-256 digest of each token is kept, and a presented token's digest is compared
//! with every one of them in constant time. Tokens never reach a log or an error: parse
//! errors name the line and entry, not what is on it, and [`Tokens`] redacts its `Debug`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::{info, warn};

use crate::api::ApiError;

/// The shortest token taken: 128 bits as hex.
pub const MIN_TOKEN_CHARS: usize = 32;
/// The longest token name.
pub const MAX_NAME_CHARS: usize = 64;

/// The web view's session cookie: it holds the token (see the module's notes).
pub const SESSION_COOKIE: &str = "saga_session";
/// How long the session cookie lasts, in seconds.
pub const SESSION_MAX_AGE: u64 = 12 * 3600;
/// The header a cookie-authenticated request other than `GET` must carry (any value).
pub const UI_HEADER: &str = "x-saga-ui";

/// What a token may do; `Operate` includes `Read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Read,
    Operate,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Read => "read",
            Role::Operate => "operate",
        })
    }
}

/// Who sent an authenticated request: handlers find it in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

struct Token {
    name: String,
    role: Role,
    digest: [u8; 32],
}

/// A set of tokens; cheap to clone. Its `Debug` shows names and roles, never tokens.
#[derive(Clone, Default)]
pub struct Tokens(Arc<Vec<Token>>);

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.0
                    .iter()
                    .map(|t| format!("{} ({}): ***", t.name, t.role)),
            )
            .finish()
    }
}

/// Text holding tokens (the value of `API_TOKENS`) before it is parsed; its `Debug` and
/// `Display` are redacted, so an arguments struct that holds it can be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenText(String);

impl From<String> for TokenText {
    fn from(text: String) -> Self {
        TokenText(text)
    }
}

impl fmt::Debug for TokenText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenText(***)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the tokens file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{at}: {why} (expected `NAME ROLE TOKEN`)")]
    Entry { at: String, why: String },
    #[error("{0} holds no token")]
    Empty(String),
    #[error("the token name `{0}` is given twice")]
    DuplicateName(String),
    #[error("tokens `{0}` and `{1}` are the same token")]
    DuplicateToken(String, String),
    #[error(
        "no API tokens are configured (--tokens-file, API_TOKENS), so the HTTP API would be \
         open to anyone who can reach {0}: set tokens, serve a loopback address \
         (HTTP_ADDR=127.0.0.1:8080), or pass --insecure-no-auth (INSECURE_NO_AUTH=true) if \
         something in front of the service authenticates"
    )]
    OpenOnNetwork(SocketAddr),
}

impl Tokens {
    /// Parses `text`; `source` names it in errors (`API_TOKENS`, a file's path).
    pub fn parse(text: &str, source: &str) -> Result<Tokens, AuthError> {
        let mut tokens = Vec::new();
        for (line_no, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default();
            let entries: Vec<&str> = line.split(';').filter(|e| !e.trim().is_empty()).collect();
            for (entry_no, entry) in entries.iter().enumerate() {
                let at = match entries.len() {
                    1 => format!("{source}, line {}", line_no + 1),
                    _ => format!("{source}, line {}, entry {}", line_no + 1, entry_no + 1),
                };
                tokens.push(parse_entry(entry).map_err(|why| AuthError::Entry { at, why })?);
            }
        }
        if tokens.is_empty() {
            return Err(AuthError::Empty(source.to_owned()));
        }
        Tokens(Arc::new(Vec::new())).merge(Tokens(Arc::new(tokens)))
    }

    pub fn from_file(path: &Path) -> Result<Tokens, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.to_owned(),
            source,
        })?;
        Tokens::parse(&text, &path.display().to_string())
    }

    /// The tokens of both sets; names and tokens must be unique across them.
    pub fn merge(self, other: Tokens) -> Result<Tokens, AuthError> {
        let mut all: Vec<Token> = Vec::with_capacity(self.len() + other.len());
        for token in self.0.iter().chain(other.0.iter()) {
            if let Some(same) = all.iter().find(|t| t.name == token.name) {
                return Err(AuthError::DuplicateName(same.name.clone()));
            }
            if let Some(same) = all.iter().find(|t| t.digest == token.digest) {
                return Err(AuthError::DuplicateToken(
                    same.name.clone(),
                    token.name.clone(),
                ));
            }
            all.push(Token {
                name: token.name.clone(),
                role: token.role,
                digest: token.digest,
            });
        }
        Ok(Tokens(Arc::new(all)))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The caller `presented` is, if any. Every digest is compared, in constant time.
    pub(crate) fn find(&self, presented: &[u8]) -> Option<Caller> {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found = None;
        for token in self.0.iter() {
            if bool::from(token.digest.ct_eq(&digest)) {
                found = Some(Caller {
                    name: token.name.clone(),
                    role: token.role,
                });
            }
        }
        found
    }
}

/// One entry; the error says what is wrong without echoing a field, which may be a token.
fn parse_entry(entry: &str) -> Result<Token, String> {
    let fields: Vec<&str> = entry.split_whitespace().collect();
    let [name, role, token] = fields[..] else {
        return Err(format!("{} fields", fields.len()));
    };
    let name_ok = |c: char| c.is_ascii_alphanumeric() || ".-_@".contains(c);
    if name.chars().count() > MAX_NAME_CHARS || !name.chars().all(name_ok) {
        return Err(format!(
            "the name must be 1 to {MAX_NAME_CHARS} of A-Z a-z 0-9 . _ @ -"
        ));
    }
    let role = match role {
        "read" => Role::Read,
        "operate" => Role::Operate,
        _ => {
            return Err(format!(
                "token `{name}`: the role must be `read` or `operate`"
            ));
        }
    };
    let token_ok = |c: char| c.is_ascii_alphanumeric() || "-._~+/=".contains(c);
    if token.len() < MIN_TOKEN_CHARS || !token.chars().all(token_ok) {
        return Err(format!(
            "token `{name}`: a token is at least {MIN_TOKEN_CHARS} of A-Z a-z 0-9 - . _ ~ + / ="
        ));
    }
    Ok(Token {
        name: name.to_owned(),
        role,
        digest: Sha256::digest(token.as_bytes()).into(),
    })
}

/// How the API is protected: the tokens (none: no authentication) and the options.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    pub tokens: Tokens,
    /// `/metrics` without a token (a scraper that cannot send one).
    pub metrics_open: bool,
    /// Serve a non-loopback address without tokens.
    pub insecure_no_auth: bool,
}

impl AuthConfig {
    /// The tokens of `file` and `text` together (either, both or neither).
    pub fn load(
        file: Option<&Path>,
        text: Option<&TokenText>,
        metrics_open: bool,
        insecure_no_auth: bool,
    ) -> Result<AuthConfig, AuthError> {
        let mut tokens = Tokens::default();
        if let Some(path) = file {
            tokens = tokens.merge(Tokens::from_file(path)?)?;
        }
        if let Some(TokenText(text)) = text {
            tokens = tokens.merge(Tokens::parse(text, "API_TOKENS")?)?;
        }
        Ok(AuthConfig {
            tokens,
            metrics_open,
            insecure_no_auth,
        })
    }

    /// Refuses to serve `addr` unauthenticated unless it is loopback or that was asked for;
    /// says at start-up how the API is protected.
    pub fn check_address(&self, addr: SocketAddr) -> Result<(), AuthError> {
        if !self.tokens.is_empty() {
            info!(
                tokens = self.tokens.len(),
                metrics_open = self.metrics_open,
                "the HTTP API requires bearer tokens"
            );
            return Ok(());
        }
        if addr.ip().is_loopback() {
            warn!(
                %addr,
                "no API tokens configured (--tokens-file, API_TOKENS): the HTTP API is \
                 unauthenticated, so it serves a loopback address only"
            );
            return Ok(());
        }
        if !self.insecure_no_auth {
            return Err(AuthError::OpenOnNetwork(addr));
        }
        warn!(
            %addr,
            "--insecure-no-auth: the HTTP API is unauthenticated on a network address; anyone \
             who reaches it can start, abort and mark sagas"
        );
        Ok(())
    }
}

/// `router` behind the tokens; unchanged when there are none.
pub fn protect(router: Router, config: &AuthConfig) -> Router {
    if config.tokens.is_empty() {
        return router;
    }
    router.layer(middleware::from_fn_with_state(
        Arc::new(config.clone()),
        gate,
    ))
}

/// The role a request needs; `None` for the open endpoints.
pub fn required_role(method: &Method, path: &str, metrics_open: bool) -> Option<Role> {
    match path {
        "/healthz" | "/readyz" | "/openapi.json" => None,
        "/metrics" if metrics_open => None,
        // Logging in and out, and the web view's static assets (no saga in them).
        "/ui/login" | "/ui/logout" => None,
        _ if path.starts_with("/ui/assets/") => None,
        _ if method == Method::GET || method == Method::HEAD => Some(Role::Read),
        _ => Some(Role::Operate),
    }
}

async fn gate(State(config): State<Arc<AuthConfig>>, mut request: Request, next: Next) -> Response {
    let Some(needed) = required_role(request.method(), request.uri().path(), config.metrics_open)
    else {
        return next.run(request).await;
    };
    let view = is_view(request.uri().path());
    let mut values = request.headers().get_all(header::AUTHORIZATION).iter();
    let (presented, by_cookie) = match (values.next(), values.next()) {
        (None, _) => match session_token(request.headers()) {
            Some(token) => (Some(token), true),
            None if view => return to_login(&request, None),
            None => {
                return unauthorized(
                    "this endpoint needs a token: send `Authorization: Bearer TOKEN`",
                    false,
                );
            }
        },
        (Some(value), None) => (bearer(value), false),
        (Some(_), Some(_)) => (None, false),
    };
    let Some(presented) = presented else {
        return unauthorized("the Authorization header must be one `Bearer TOKEN`", true);
    };
    let Some(caller) = config.tokens.find(presented) else {
        if view {
            return to_login(&request, Some("expired"));
        }
        return unauthorized("the token is not valid", true);
    };
    let safe = request.method() == Method::GET || request.method() == Method::HEAD;
    if by_cookie && !safe && !request.headers().contains_key(UI_HEADER) {
        let why = "a request authenticated by the web view's session cookie must carry the \
                   X-Saga-UI header (a cross-site form cannot); API clients send \
                   `Authorization: Bearer TOKEN`";
        return ApiError::new(StatusCode::FORBIDDEN, why).into_response();
    }
    if caller.role < needed {
        let why = format!(
            "token `{}` has the role {}; {} {} needs {needed}",
            caller.name,
            caller.role,
            request.method(),
            request.uri().path()
        );
        return ApiError::new(StatusCode::FORBIDDEN, why).into_response();
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// A page of the web view (which answers HTML, and sends people to log in).
fn is_view(path: &str) -> bool {
    path == "/ui" || path.starts_with("/ui/")
}

/// The token in the web view's session cookie, if one is sent.
fn session_token(headers: &axum::http::HeaderMap) -> Option<&[u8]> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|cookies| cookies.split(';'))
        .filter_map(|cookie| cookie.trim().split_once('='))
        .find(|(name, value)| *name == SESSION_COOKIE && !value.is_empty())
        .map(|(_, value)| value.as_bytes())
}

/// Sends a person to the login page, to come back to this page after.
fn to_login(request: &Request, why: Option<&str>) -> Response {
    let back = request.uri().path_and_query().map_or("/ui", |p| p.as_str());
    let mut location = format!("/ui/login?next={}", crate::ui::encode(back));
    if let Some(why) = why {
        location.push_str("&why=");
        location.push_str(why);
    }
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// The token of `Bearer TOKEN` (the scheme in any case).
fn bearer(value: &HeaderValue) -> Option<&[u8]> {
    let value = value.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim_start();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token.as_bytes())
}

fn unauthorized(why: &str, invalid_token: bool) -> Response {
    let challenge = match invalid_token {
        true => r#"Bearer realm="orchestrator", error="invalid_token""#,
        false => r#"Bearer realm="orchestrator""#,
    };
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, why).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    const T1: &str = "0123456789abcdef0123456789abcdef";
    const T2: &str = "fedcba9876543210fedcba9876543210";

    #[test]
    fn entries_by_line_or_semicolon_with_comments() {
        let text = format!("# who may do what\nops operate {T1}  # the on-call\n\nci read {T2}\n");
        let tokens = Tokens::parse(&text, "f").unwrap();
        assert_eq!(tokens.len(), 2);
        let ops = tokens.find(T1.as_bytes()).unwrap();
        assert_eq!((ops.name.as_str(), ops.role), ("ops", Role::Operate));
        assert_eq!(tokens.find(T2.as_bytes()).unwrap().role, Role::Read);
        assert!(tokens.find(b"0123456789abcdef0123456789abcdee").is_none());
        assert!(tokens.find(b"").is_none());

        let tokens = Tokens::parse(&format!("ops operate {T1}; ci\tread {T2};"), "env").unwrap();
        assert_eq!(tokens.len(), 2);
    }

    #[test]
    fn errors_say_where_and_never_echo_a_token() {
        let cases = [
            (format!("ops {T1} operate"), "line 1: token `ops`: the role"),
            (format!("ops operate {T1} extra"), "line 1: 4 fields"),
            (format!("a read {T2}\n{T1}"), "line 2: 1 fields"),
            ("ops operate short-token".to_owned(), "at least 32"),
            (format!("ops operate {T1}!"), "at least 32 of"),
            (format!("o/ps operate {T1}"), "the name must be"),
            (format!("x read {T2}; ops {T1} read"), "line 1, entry 2"),
        ];
        for (text, expected) in cases {
            let error = Tokens::parse(&text, "API_TOKENS").unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
            assert!(!error.contains(T1) && !error.contains(T2), "{error}");
        }
        let error = Tokens::parse("# nothing\n;\n", "API_TOKENS").unwrap_err();
        assert_eq!(error.to_string(), "API_TOKENS holds no token");
    }

    #[test]
    fn names_and_tokens_are_unique_across_sources() {
        let a = Tokens::parse(&format!("ops operate {T1}"), "file").unwrap();
        let same_name = Tokens::parse(&format!("ops read {T2}"), "env").unwrap();
        let same_token = Tokens::parse(&format!("ci read {T1}"), "env").unwrap();
        let error = a.clone().merge(same_name).unwrap_err().to_string();
        assert!(error.contains("`ops` is given twice"), "{error}");
        let error = a.merge(same_token).unwrap_err().to_string();
        assert!(
            error.contains("`ops` and `ci` are the same token"),
            "{error}"
        );
    }

    #[test]
    fn debug_never_shows_a_token() {
        let tokens = Tokens::parse(&format!("ops operate {T1}"), "env").unwrap();
        let config = AuthConfig {
            tokens,
            ..Default::default()
        };
        let shown = format!("{config:?} {:?}", TokenText(T1.to_owned()));
        assert!(shown.contains("ops (operate): ***"), "{shown}");
        assert!(!shown.contains(T1), "{shown}");
    }

    #[test]
    fn roles_by_method_and_path() {
        let role = |method: Method, path: &str, open| required_role(&method, path, open);
        assert_eq!(role(Method::GET, "/healthz", false), None);
        assert_eq!(role(Method::GET, "/readyz", false), None);
        assert_eq!(role(Method::GET, "/openapi.json", false), None);
        assert_eq!(role(Method::GET, "/metrics", true), None);
        assert_eq!(role(Method::GET, "/metrics", false), Some(Role::Read));
        assert_eq!(role(Method::GET, "/sagas", false), Some(Role::Read));
        assert_eq!(role(Method::HEAD, "/sagas/x", false), Some(Role::Read));
        assert_eq!(role(Method::POST, "/sagas/x", false), Some(Role::Operate));
        assert_eq!(
            role(Method::DELETE, "/healthzz", false),
            Some(Role::Operate)
        );
        assert_eq!(role(Method::GET, "//healthz", false), Some(Role::Read));
        assert_eq!(role(Method::POST, "/ui/login", false), None);
        assert_eq!(role(Method::POST, "/ui/logout", false), None);
        assert_eq!(role(Method::GET, "/ui/assets/ui.js", false), None);
        assert_eq!(role(Method::GET, "/ui", false), Some(Role::Read));
        assert_eq!(role(Method::GET, "/ui/sagas/x", false), Some(Role::Read));
    }

    #[test]
    fn loopback_only_without_tokens_unless_told() {
        let open = AuthConfig::default();
        assert!(
            open.check_address("127.0.0.1:8080".parse().unwrap())
                .is_ok()
        );
        assert!(open.check_address("[::1]:8080".parse().unwrap()).is_ok());
        let error = open
            .check_address("0.0.0.0:8080".parse().unwrap())
            .unwrap_err();
        assert!(error.to_string().contains("--insecure-no-auth"), "{error}");
        let insecure = AuthConfig {
            insecure_no_auth: true,
            ..Default::default()
        };
        assert!(
            insecure
                .check_address("0.0.0.0:8080".parse().unwrap())
                .is_ok()
        );
        let with_tokens = AuthConfig {
            tokens: Tokens::parse(&format!("ops operate {T1}"), "env").unwrap(),
            ..Default::default()
        };
        assert!(
            with_tokens
                .check_address("[::]:8080".parse().unwrap())
                .is_ok()
        );
    }
}
