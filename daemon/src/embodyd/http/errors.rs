//! Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
//! with the status code that goes with each kind of failure. A client's
//! mistake is never a 500.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use embody_protocol::openai::{self, ConversionError, ErrorResponse};
use embody_protocol::ErrorCode;

/// An error answer: a status and the body.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The OpenAI-shaped body.
    pub body: ErrorResponse,
}

impl ApiError {
    /// An error with an explicit status, OpenAI type and code.
    pub fn new(status: StatusCode, kind: &str, message: impl Into<String>, code: &str) -> Self {
        Self {
            status,
            body: ErrorResponse::new(kind, message, None, Some(code)),
        }
    }

    /// 400: the request is wrong.
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            body: ErrorResponse::new(
                "invalid_request_error",
                message,
                param.map(str::to_string),
                Some("bad_request"),
            ),
        }
    }

    /// 404 for a model that is not loaded.
    pub fn unknown_model(model: &str, served: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            body: ErrorResponse::new(
                "invalid_request_error",
                format!("the model {model:?} does not exist here; this daemon serves {served:?}"),
                Some("model".into()),
                Some("model_not_found"),
            ),
        }
    }

    /// The answer for a stream's error event.
    pub fn from_code(code: ErrorCode, message: impl Into<String>) -> Self {
        let status =
            StatusCode::from_u16(openai::http_status(code)).unwrap_or(StatusCode::BAD_REQUEST);
        Self {
            status,
            body: ErrorResponse::from_code(code, message),
        }
    }

    /// Which outcome the metrics count this error under.
    pub fn outcome(&self) -> &'static str {
        super::metrics::outcome_of_status(self.status.as_u16())
    }
}

impl From<ConversionError> for ApiError {
    fn from(e: ConversionError) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            body: ErrorResponse::from_conversion(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.body).unwrap_or_default();
        let mut res = (self.status, body).into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if matches!(self.status.as_u16(), 429 | 503) {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        res
    }
}
