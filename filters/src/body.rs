//! The one body type that flows through filters, router and pools.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streamed HTTP body (request or response); frames carry data and trailers.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A locally generated response (Envoy's "local reply"): plain text body, as Envoy sends.
pub fn local_reply(status: http::StatusCode, text: &str) -> http::Response<Body> {
    let mut resp = http::Response::new(if text.is_empty() {
        empty()
    } else {
        full(Bytes::copy_from_slice(text.as_bytes()))
    });
    *resp.status_mut() = status;
    if !text.is_empty() {
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain"),
        );
        resp.headers_mut().insert(
            http::header::CONTENT_LENGTH,
            http::HeaderValue::from(text.len()),
        );
    }
    resp
}
