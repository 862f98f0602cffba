//! Errors: [`ServerError`] for starting the server (typed, for the CLI to map to exit codes),
//! [`ApiError`] for one HTTP answer (`{"error", "error_type"}` as text-embeddings-inference
//! writes them).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A setting that cannot work (a limit of 0, an adapter name used twice, ...).
    #[error("{0}")]
    Config(String),
    /// The model or an adapter given at start-up did not load.
    #[error(transparent)]
    Pvera(#[from] pvera::Error),
    /// The address is taken or not ours.
    #[error("cannot listen on {addr}: {source} (pick another --host/--port, or stop what holds it)")]
    Bind {
        /// `host:port`.
        addr: String,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The model worker thread ended unexpectedly.
    #[error("the model worker stopped: {0}")]
    Worker(String),
    /// Serving failed (the listener broke).
    #[error("serving failed: {0}")]
    Serve(std::io::Error),
}

/// One error answer: status, a machine-readable `error_type` and a message naming the value, the
/// expectation and the fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// `validation`, `tokenizer`, `overloaded`, `backend`, `unhealthy` (text-embeddings-inference's
    /// kinds), and `not_found`, `unauthorized`, `forbidden`, `conflict`, `payload_too_large`.
    pub error_type: &'static str,
    /// What went wrong and what to do.
    pub message: String,
    /// Seconds for `Retry-After` (429 and 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, error_type: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, error_type, message: message.into(), retry_after: None }
    }
    /// 400: the body is not JSON.
    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "validation", message)
    }
    /// 422: JSON of the wrong shape or a value out of range.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "validation", message)
    }
    /// 422: a text the tokenizer refuses.
    pub fn tokenizer(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "tokenizer", message)
    }
    /// 413: the body, an input or the number of inputs is over a limit.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }
    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    /// 401 (answered with `WWW-Authenticate: Bearer`).
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    /// 403.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    /// 409.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
    /// 429 with `Retry-After`.
    pub fn overloaded(message: impl Into<String>) -> Self {
        ApiError { retry_after: Some(1), ..Self::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", message) }
    }
    /// 503 with `Retry-After`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError { retry_after: Some(5), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unhealthy", message) }
    }
    /// 500: not the client's fault; the server goes on.
    pub fn backend(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "backend", message)
    }

    /// A library error met while answering a request: the request's fault (4xx) when it is about
    /// what the request sent or asked to load, the server's (500) otherwise.
    pub fn from_pvera(e: pvera::Error) -> Self {
        use pvera::Error as E;
        match e {
            E::Request(m) => Self::invalid(m),
            E::Data(m) => Self::invalid(m),
            // Files a hot-load request pointed at: the catalogue's message, and serving goes on.
            e @ (E::Io { .. }
            | E::ConfigParse { .. }
            | E::InvalidConfig { .. }
            | E::WrongPeftType { .. }
            | E::NoTargetMatched { .. }
            | E::NoDefaultTargets { .. }
            | E::Safetensors { .. }
            | E::MissingTensor { .. }
            | E::ShapeMismatch { .. }
            | E::DtypeMismatch { .. }
            | E::UnexpectedTensors { .. }
            | E::UnsupportedModel { .. }
            // λ's that load but overflow when sampled (row 25 of docs/ERRORS.md): the adapter's
            // fault, named, not the server's.
            | E::NonFinite { .. }) => Self::invalid(e.to_string()),
            e @ E::UnknownAdapter { .. } => Self::not_found(e.to_string()),
            other => Self::backend(other.to_string()),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.error_type, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": self.message, "error_type": self.error_type});
        let mut r = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}
