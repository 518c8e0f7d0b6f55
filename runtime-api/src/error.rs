//! Dapr's API errors: an `errorCode` (`ERR_…`), a message, the HTTP status Dapr answers with, and
//! the matching gRPC status code.

use bytes::Bytes;
use http::StatusCode;
use mecha_filters::{full, Body};

/// An error answered to an API caller, as Dapr shapes it: `{"errorCode":"ERR_…","message":"…"}`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: &'static str,
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            status,
            message: message.into(),
        }
    }

    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "ERR_MALFORMED_REQUEST", message)
    }

    pub fn state_store_not_found(name: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "ERR_STATE_STORE_NOT_FOUND",
            format!("state store {name} is not found"),
        )
    }

    pub fn state_stores_not_configured() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ERR_STATE_STORE_NOT_CONFIGURED",
            "state store is not configured",
        )
    }

    pub fn pubsub_not_found(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "ERR_PUBSUB_NOT_FOUND",
            format!("pubsub {name} not found"),
        )
    }

    /// The JSON body Dapr sends with an error.
    pub fn body_json(&self) -> serde_json::Value {
        serde_json::json!({"errorCode": self.code, "message": self.message})
    }

    pub fn to_response(&self) -> http::Response<Body> {
        let body = Bytes::from(self.body_json().to_string());
        let mut resp = mecha_filters::spare::response(full(body));
        *resp.status_mut() = self.status;
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        resp
    }

    /// The gRPC status Dapr returns for this error.
    pub fn to_status(&self) -> tonic::Status {
        let code = match self.status {
            StatusCode::BAD_REQUEST => tonic::Code::InvalidArgument,
            StatusCode::NOT_FOUND => tonic::Code::NotFound,
            StatusCode::CONFLICT => tonic::Code::Aborted,
            StatusCode::UNAUTHORIZED => tonic::Code::Unauthenticated,
            StatusCode::PAYLOAD_TOO_LARGE => tonic::Code::ResourceExhausted,
            StatusCode::FORBIDDEN => tonic::Code::PermissionDenied,
            _ => tonic::Code::Internal,
        };
        tonic::Status::new(code, format!("{}: {}", self.code, self.message))
    }
}

/// Why a component (store or broker) operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ComponentError {
    /// The request's etag does not match the stored version (or the key is absent).
    #[error("possible etag mismatch. error from state store: {0}")]
    EtagMismatch(String),
    /// The etag is not one this store ever issues.
    #[error("invalid etag value: {0}")]
    InvalidEtag(String),
    /// The backend (database, broker, connection) failed.
    #[error("{0}")]
    Backend(String),
    /// The request is not valid for this component.
    #[error("{0}")]
    Invalid(String),
}
