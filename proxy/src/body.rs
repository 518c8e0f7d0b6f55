//! Body adapters used on the proxy path.

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use mecha_filters::BoxError;
use std::pin::Pin;
use std::task::{Context, Poll};

pin_project_lite::pin_project! {
    /// A body that keeps a guard alive until the body is dropped (accounting of active requests).
    pub struct WithGuard<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<B, G> WithGuard<B, G> {
    pub fn new(inner: B, guard: G) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B: HttpBody<Data = Bytes, Error = BoxError>, G> HttpBody for WithGuard<B, G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let res = this.inner.poll_frame(cx);
        if let Poll::Ready(None) | Poll::Ready(Some(Err(_))) = &res {
            this.guard.take();
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
