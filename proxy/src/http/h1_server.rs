//! Our own downstream HTTP/1.1 server codec, for the requests a proxy sees most: HTTP/1.1, no
//! upgrade, no `Expect`, and a body that is absent, or small, of known length and already
//! received with the head. Such a request is
//! parsed straight off the connection's read buffer (header values share its bytes), handed to
//! the connection manager in the connection's own task, and its response is written from one
//! buffer, head and first body bytes together.
//!
//! hyper's server costs a proxy more than it gives on that path: its dispatcher moves every
//! request and response through its own state machine and body channel, and it keeps 16 KiB of
//! buffers per connection. Anything else (HTTP/1.0, chunked or large uploads, `Expect:
//! 100-continue`, upgrades, CONNECT, HTTP/2's preface under AUTO, and every malformed or
//! oversized head, whose 400/431 answers hyper already gets right) makes this codec hand the
//! connection, with every byte it has read and not consumed, to hyper for the rest of its life.
//! A hand-off happens only between requests, so nothing is in flight when it does.
//!
//! Framing of the response follows RFC 9112 §6: no body for HEAD, 1xx, 204 and 304; a
//! `content-length` from the response (or from a body of known size); otherwise chunked, with
//! trailers when the client said `te: trailers`. `connection: close` from the client, or a
//! draining connection manager, closes the connection after the response.

use super::hcm::{Activity, ConnInfo, Hcm};
use crate::http1::{
    append_date, encode_field, encode_fields, fields_map, has_token, offsets, parse_length,
    plain_connection, recycle, Fields,
};
use bytes::{Buf, Bytes, BytesMut};
use http::header::{
    CONNECTION, CONTENT_LENGTH, DATE, EXPECT, HOST, SERVER, TE, TRANSFER_ENCODING, UPGRADE,
};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::Body as _;
use mecha_config::CodecType;
use mecha_filters::Body;
use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// httparse's slots on the stack; a configured `max_headers_count` above this goes to hyper.
const MAX_HEADERS: usize = 100;
/// Request bodies up to this size that arrived with their head are ours; others stream via hyper.
const MAX_INLINE_BODY: u64 = 64 * 1024;
/// Reads of the request head.
const READ_CHUNK: usize = 4096;
/// While a request is in flight the connection keeps reading (to see the client go away, and to
/// take pipelined requests), but not beyond this.
const MAX_READ_AHEAD: usize = 64 * 1024;
/// Body chunks up to this size are copied behind the head (one write); bigger ones are written
/// on their own.
const COPY_MAX: usize = 16 * 1024;

/// How the codec's part of a connection ended.
pub(crate) enum Exit {
    /// The connection is done (closed by either side, or shut down).
    Closed,
    /// hyper takes over: see [`H1Conn::into_rewind`].
    Handoff,
}

/// One downstream connection in our codec's hands.
pub(crate) struct H1Conn<IO> {
    io: IO,
    /// Bytes read and not yet consumed.
    rbuf: BytesMut,
    /// The response being written (head, and small body chunks behind it).
    wbuf: Vec<u8>,
}

/// What the head of a request said, beyond the request itself.
struct Parsed {
    req: Request<()>,
    body_len: usize,
    keep_alive: bool,
    te_trailers: bool,
}

#[allow(clippy::large_enum_variant)] // returned by value once per request; a box would cost more
enum Parse {
    Request(Parsed),
    /// Needs more bytes.
    Partial,
    /// Not ours: hyper serves the connection from here.
    Handoff,
    /// Answered with this status, and the connection closed: a request-target that is not a
    /// valid URI, no `Host`, both `Content-Length` and `Transfer-Encoding` or more than one
    /// `Content-Length` (400, as Envoy), a head over `max_request_headers_kb` (431).
    Reject(StatusCode),
}

impl<IO: AsyncRead + AsyncWrite + Unpin> H1Conn<IO> {
    pub(crate) fn new(io: IO) -> Self {
        Self {
            io,
            rbuf: BytesMut::new(),
            wbuf: Vec::new(),
        }
    }

    /// The connection for hyper, with what was read and not consumed replayed in front.
    pub(crate) fn into_rewind(self) -> Rewind<IO> {
        Rewind {
            pre: self.rbuf.freeze(),
            io: self.io,
        }
    }

    /// Serves requests until the connection closes, hands off, or `stop` is set (then after the
    /// request in flight, if any).
    pub(crate) async fn serve(
        &mut self,
        hcm: &Hcm,
        info: ConnInfo,
        stop: &AtomicBool,
        activity: &Arc<Activity>,
    ) -> Exit {
        let max_head = hcm.max_headers_bytes;
        let max_headers = hcm.max_headers_count.unwrap_or(MAX_HEADERS);
        if max_headers > MAX_HEADERS {
            return Exit::Handoff;
        }
        loop {
            let parsed = loop {
                if !self.rbuf.is_empty() {
                    match parse_request(&mut self.rbuf, max_head, max_headers) {
                        Parse::Request(p) => break p,
                        Parse::Partial if self.rbuf.len() <= max_head => {}
                        Parse::Partial => {
                            self.reject(hcm, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
                                .await;
                            return Exit::Closed;
                        }
                        Parse::Handoff => {
                            // Envoy's HTTP/1 codec takes HTTP/2's preface for a bad request.
                            if hcm.codec == CodecType::HTTP1
                                && self.rbuf.starts_with(b"PRI * HTTP/2.0")
                            {
                                self.reject(hcm, StatusCode::BAD_REQUEST).await;
                                return Exit::Closed;
                            }
                            return Exit::Handoff;
                        }
                        Parse::Reject(status) => {
                            self.reject(hcm, status).await;
                            return Exit::Closed;
                        }
                    }
                }
                let read = poll_fn(|cx| {
                    if self.rbuf.is_empty() && stop.load(Ordering::Relaxed) {
                        return Poll::Ready(Ok(0));
                    }
                    poll_read_buf(&mut self.io, &mut self.rbuf, cx, READ_CHUNK)
                })
                .await;
                match read {
                    Ok(0) | Err(_) => return Exit::Closed,
                    Ok(_) => {}
                }
            };
            let Parsed {
                req,
                body_len,
                keep_alive,
                te_trailers,
            } = parsed;
            let body = if body_len == 0 {
                mecha_filters::empty()
            } else {
                mecha_filters::full(self.rbuf.split_to(body_len).freeze())
            };
            let head_request = req.method() == Method::HEAD;
            let req = hcm.accept(req.map(|()| body));

            let guard = activity.begin();
            let resp = {
                // Built where it is pinned: a `let` first would move the ~2 KiB future once more.
                let mut handling = std::pin::pin!(hcm.respond(req, info));
                poll_fn(|cx| {
                    if let Poll::Ready(resp) = handling.as_mut().poll(cx) {
                        return Poll::Ready(Some(resp));
                    }
                    // A client that hangs up cancels its request (and with it the upstream
                    // attempt), as in hyper and Envoy.
                    match self.poll_peer(cx) {
                        Poll::Ready(()) => Poll::Ready(None),
                        Poll::Pending => Poll::Pending,
                    }
                })
                .await
            };
            let Some(resp) = resp else {
                return Exit::Closed;
            };
            let keep_alive = keep_alive && !stop.load(Ordering::Relaxed);
            let clean = self
                .write_response(resp, head_request, keep_alive, te_trailers)
                .await;
            drop(guard);
            if self.wbuf.capacity() > 2 * COPY_MAX {
                // A big response grew it; idle connections should not keep that.
                self.wbuf = Vec::new();
            }
            if !clean || !keep_alive {
                let _ = self.io.shutdown().await;
                return Exit::Closed;
            }
        }
    }

    /// Writes `resp`; false when the connection can't carry another request (the body failed,
    /// was shorter or longer than announced, or the client went away).
    async fn write_response(
        &mut self,
        resp: Response<Body>,
        head_request: bool,
        keep_alive: bool,
        te_trailers: bool,
    ) -> bool {
        let (mut parts, mut body) = resp.into_parts();
        let framing = encode_head(&mut self.wbuf, &parts, &body, head_request, keep_alive);
        recycle(std::mem::take(&mut parts.headers));
        let mut remaining = match framing {
            Framing::None => return self.flush().await.is_ok(),
            Framing::Length(n) => n,
            Framing::Chunked => 0,
        };
        let chunked = framing == Framing::Chunked;
        let mut trailers_sent = false;
        loop {
            let frame = if !self.wbuf.is_empty() {
                // Something is waiting to be written: take the next frame only if it is ready
                // now, so a small response leaves in one write.
                match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
                    Poll::Ready(frame) => frame,
                    Poll::Pending => {
                        if self.flush().await.is_err() {
                            return false;
                        }
                        continue;
                    }
                }
            } else {
                let next = poll_fn(|cx| {
                    if let Poll::Ready(frame) = Pin::new(&mut body).poll_frame(cx) {
                        return Poll::Ready(Some(frame));
                    }
                    match self.poll_peer(cx) {
                        Poll::Ready(()) => Poll::Ready(None),
                        Poll::Pending => Poll::Pending,
                    }
                })
                .await;
                match next {
                    Some(frame) => frame,
                    None => return false,
                }
            };
            match frame {
                None => {
                    if chunked && !trailers_sent {
                        self.wbuf.extend_from_slice(b"0\r\n\r\n");
                    }
                    let complete = chunked || remaining == 0;
                    if !complete {
                        tracing::debug!(
                            missing = remaining,
                            "response body shorter than its content-length"
                        );
                    }
                    return self.flush().await.is_ok() && complete;
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "response body failed; closing the connection");
                    let _ = self.flush().await;
                    return false;
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if data.is_empty() {
                            continue;
                        }
                        if !chunked {
                            if data.len() as u64 > remaining {
                                tracing::debug!("response body longer than its content-length");
                                let _ = self.flush().await;
                                return false;
                            }
                            remaining -= data.len() as u64;
                        } else {
                            let mut hex = [0u8; 16];
                            self.wbuf.extend_from_slice(hex_len(data.len(), &mut hex));
                            self.wbuf.extend_from_slice(b"\r\n");
                        }
                        if data.len() <= COPY_MAX {
                            self.wbuf.extend_from_slice(&data);
                        } else if self.flush().await.is_err()
                            || self.io.write_all(&data).await.is_err()
                        {
                            return false;
                        }
                        if chunked {
                            self.wbuf.extend_from_slice(b"\r\n");
                        }
                        if self.wbuf.len() >= COPY_MAX && self.flush().await.is_err() {
                            return false;
                        }
                    }
                    Err(frame) => {
                        if let (true, false, Ok(trailers)) =
                            (chunked, trailers_sent, frame.into_trailers())
                        {
                            // Without `te: trailers` the client did not ask for them; HTTP/1.1
                            // lets us drop them (hyper does too).
                            self.wbuf.extend_from_slice(b"0\r\n");
                            if te_trailers {
                                encode_fields(&mut self.wbuf, &trailers);
                            }
                            self.wbuf.extend_from_slice(b"\r\n");
                            trailers_sent = true;
                        }
                    }
                },
            }
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.wbuf.is_empty() {
            let res = self.io.write_all(&self.wbuf).await;
            self.wbuf.clear();
            res?;
        }
        self.io.flush().await
    }

    /// Reads ahead while a request is in flight. Ready when the client closed (or the
    /// connection failed); pending otherwise, also once the read-ahead is full.
    fn poll_peer(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while self.rbuf.len() < MAX_READ_AHEAD {
            match poll_read_buf(&mut self.io, &mut self.rbuf, cx, READ_CHUNK) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Pending
    }

    /// Answers a request we can't serve with an empty `status` and closes, as hyper does.
    async fn reject(&mut self, hcm: &Hcm, status: StatusCode) {
        hcm.count_codec_reply(status, http::Version::HTTP_11);
        self.wbuf.clear();
        self.wbuf.extend_from_slice(b"HTTP/1.1 ");
        self.wbuf.extend_from_slice(status.as_str().as_bytes());
        self.wbuf.push(b' ');
        self.wbuf
            .extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        self.wbuf
            .extend_from_slice(b"\r\ncontent-length: 0\r\nconnection: close\r\n");
        if let Some(server) = hcm.server_value() {
            encode_field(&mut self.wbuf, &SERVER, server);
        }
        append_date(&mut self.wbuf);
        self.wbuf.extend_from_slice(b"\r\n");
        let _ = self.flush().await;
        let _ = self.io.shutdown().await;
    }
}

/// Parses a request head off the front of `buf`. The head is consumed only when the request is
/// ours (`Request`, or `Reject` of a bad request-target); otherwise `buf` is left as it was, for
/// hyper.
fn parse_request(buf: &mut BytesMut, max_head: usize, max_headers: usize) -> Parse {
    let mut slots: [MaybeUninit<httparse::Header<'_>>; MAX_HEADERS] =
        [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let n = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        buf,
        &mut slots[..max_headers],
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(_) => return Parse::Handoff,
    };
    if n > max_head {
        return Parse::Reject(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }
    if req.version != Some(1) {
        return Parse::Handoff;
    }
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return Parse::Handoff;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parse::Handoff;
    };
    // Origin-form only; absolute-form (forward proxies), authority-form (CONNECT) and `*` are
    // hyper's.
    if method == Method::CONNECT || !path.starts_with('/') {
        return Parse::Handoff;
    }
    let mut length: Option<u64> = None;
    let mut keep_alive = true;
    let mut te_trailers = false;
    let mut host = false;
    let mut chunked = false;
    let mut handoff = false;
    let mut fields = Fields::new();
    for h in req.headers.iter() {
        let Ok(name) = crate::http1::field_name(h.name.as_bytes()) else {
            return Parse::Handoff;
        };
        let value = h.value;
        if name == HOST {
            host = true;
        } else if name == CONTENT_LENGTH {
            if length.is_some() {
                // Envoy refuses a second one even when it agrees with the first.
                return Parse::Reject(StatusCode::BAD_REQUEST);
            }
            match parse_length(value) {
                Some(v) => length = Some(v),
                None => return Parse::Handoff,
            }
            // With `transfer-encoding` the request is refused below.
            if chunked {
                continue;
            }
        } else if name == TRANSFER_ENCODING {
            chunked = true;
            continue;
        } else if name == EXPECT || name == UPGRADE {
            // hyper's, but the fields after this one are still checked.
            handoff = true;
            continue;
        } else if name == CONNECTION {
            if has_token(value, b"close") {
                keep_alive = false;
            }
            if plain_connection(value) {
                continue;
            }
        } else if name == TE {
            te_trailers |= has_token(value, b"trailers");
        }
        let (start, end) = offsets(buf, value);
        fields.push((name, start, end));
    }
    if chunked && length.is_some() {
        // Envoy: content_length_and_chunked_not_allowed (a smuggling vector).
        return Parse::Reject(StatusCode::BAD_REQUEST);
    }
    if chunked || handoff {
        return Parse::Handoff;
    }
    if !host {
        return Parse::Reject(StatusCode::BAD_REQUEST);
    }
    let body_len = length.unwrap_or(0);
    // A body that did not arrive with its head streams through hyper: waiting for it here would
    // hold back the request (and its timers) until the last byte.
    if body_len > MAX_INLINE_BODY || (buf.len() as u64) < n as u64 + body_len {
        return Parse::Handoff;
    }
    let (path_start, path_end) = offsets(buf, path.as_bytes());

    let head = buf.split_to(n).freeze();
    let Ok(uri) = Uri::from_maybe_shared(head.slice(path_start..path_end)) else {
        return Parse::Reject(StatusCode::BAD_REQUEST);
    };
    // Room for what the connection manager and router add (x-forwarded-*, x-request-id,
    // x-envoy-*), so those inserts do not rehash the map.
    let headers = fields_map(&head, &mut fields, 8);
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    Parse::Request(Parsed {
        req,
        body_len: body_len as usize,
        keep_alive,
        te_trailers,
    })
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// Encodes the status line and fields into `out` and decides how the body is framed.
fn encode_head(
    out: &mut Vec<u8>,
    parts: &http::response::Parts,
    body: &Body,
    head_request: bool,
    keep_alive: bool,
) -> Framing {
    let status = parts.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // 1xx and 204 never carry a length; 304 and HEAD keep the one of the representation.
    let never_length = status.is_informational() || status == StatusCode::NO_CONTENT;
    let bodiless = never_length || head_request || status == StatusCode::NOT_MODIFIED;
    let mut length: Option<u64> = None;
    let mut has_date = false;
    for (name, value) in &parts.headers {
        // Framing and persistence belong to this hop.
        if name == TRANSFER_ENCODING || name == CONNECTION {
            continue;
        }
        if name == CONTENT_LENGTH {
            if never_length {
                continue;
            }
            match (parse_length(value.as_bytes()), length) {
                (Some(v), None) => length = Some(v),
                (Some(v), Some(l)) if v == l => continue,
                // A second, different (or an invalid) length: leave it out, the first one or the
                // body frames.
                _ => continue,
            }
        } else if name == DATE {
            has_date = true;
        }
        encode_field(out, name, value);
    }
    if !has_date {
        append_date(out);
    }
    let framing = if bodiless {
        Framing::None
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        let known = if body.is_end_stream() {
            Some(0)
        } else {
            body.size_hint().exact()
        };
        match known {
            Some(n) => {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                out.extend_from_slice(b"\r\n");
                Framing::Length(n)
            }
            None => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked
            }
        }
    };
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    framing
}

/// `n` in lowercase hex, written into the end of `buf`.
fn hex_len(mut n: usize, buf: &mut [u8; 16]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// Reads into the spare capacity of `buf`, growing it to `want` first when it is short.
fn poll_read_buf<IO: AsyncRead + Unpin>(
    io: &mut IO,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
    want: usize,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < want.min(READ_CHUNK) / 2 + 1 {
        buf.reserve(want.max(READ_CHUNK));
    }
    let mut rb = ReadBuf::uninit(buf.spare_capacity_mut());
    ready!(Pin::new(io).poll_read(cx, &mut rb))?;
    let n = rb.filled().len();
    // SAFETY: `poll_read` initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Poll::Ready(Ok(n))
}

/// A connection handed to hyper: the bytes our codec read and did not consume come first.
pub(crate) struct Rewind<IO> {
    pre: Bytes,
    io: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn parse(text: &str) -> Parse {
        let mut buf = BytesMut::from(text.as_bytes());
        parse_request(&mut buf, 60 * 1024, MAX_HEADERS)
    }

    #[test]
    fn ordinary_requests_are_ours() {
        let Parse::Request(p) = parse(
            "POST /a?b=c HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTE: trailers\r\nConnection: close\r\n\r\nabcGET",
        ) else {
            panic!("not parsed");
        };
        assert_eq!(p.req.method(), Method::POST);
        assert_eq!(p.req.uri().path(), "/a");
        assert_eq!(p.req.uri().query(), Some("b=c"));
        assert_eq!(p.req.headers()["host"], "x");
        assert_eq!(p.body_len, 3);
        assert!(!p.keep_alive && p.te_trailers);
    }

    #[test]
    fn everything_else_goes_to_hyper_untouched() {
        for text in [
            "GET / HTTP/1.0\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nabc",
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(text.as_bytes());
            assert!(
                matches!(
                    parse_request(&mut buf, 60 * 1024, MAX_HEADERS),
                    Parse::Handoff
                ),
                "{text:?}"
            );
            assert_eq!(&buf[..], text.as_bytes(), "consumed: {text:?}");
        }
    }

    #[test]
    fn partial_heads_wait_and_oversized_ones_go_to_hyper() {
        assert!(matches!(
            parse("GET / HTTP/1.1\r\nHost: x\r\n"),
            Parse::Partial
        ));
        let mut buf = BytesMut::from("GET / HTTP/1.1\r\nHost: xxxxxxxx\r\n\r\n".as_bytes());
        assert!(matches!(
            parse_request(&mut buf, 16, MAX_HEADERS),
            Parse::Reject(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        ));
        let mut buf = BytesMut::from("GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\n\r\n".as_bytes());
        assert!(matches!(parse_request(&mut buf, 1024, 1), Parse::Handoff));
    }

    #[test]
    fn bad_requests_are_refused() {
        for text in [
            "GET / HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nHost: a\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        ] {
            assert!(
                matches!(parse(text), Parse::Reject(StatusCode::BAD_REQUEST)),
                "{text:?}"
            );
        }
    }

    #[test]
    fn response_heads() {
        let head =
            |status: u16, headers: &[(&str, &str)], body: Body, head_req: bool, keep: bool| {
                let mut resp = Response::new(body);
                *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                for (k, v) in headers {
                    resp.headers_mut().append(
                        http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                        HeaderValue::from_str(v).unwrap(),
                    );
                }
                let (parts, body) = resp.into_parts();
                let mut out = Vec::new();
                let framing = encode_head(&mut out, &parts, &body, head_req, keep);
                (String::from_utf8(out).unwrap(), framing)
            };
        let (text, f) = head(
            200,
            &[("x-a", "1")],
            mecha_filters::full("hello"),
            false,
            true,
        );
        assert!(
            text.starts_with("HTTP/1.1 200 OK\r\nx-a: 1\r\ndate: "),
            "{text}"
        );
        assert!(text.ends_with("content-length: 5\r\n\r\n"), "{text}");
        assert_eq!(f, Framing::Length(5));

        let (text, f) = head(
            204,
            &[("content-length", "0")],
            mecha_filters::empty(),
            false,
            false,
        );
        assert!(!text.contains("content-length"), "{text}");
        assert!(text.ends_with("connection: close\r\n\r\n"), "{text}");
        assert_eq!(f, Framing::None);

        let (text, f) = head(
            200,
            &[("content-length", "10")],
            mecha_filters::empty(),
            true,
            true,
        );
        assert!(text.contains("content-length: 10\r\n"), "{text}");
        assert_eq!(f, Framing::None);

        let stream = http_body_util::BodyExt::boxed_unsync(http_body_util::StreamBody::new(
            futures_util::stream::iter(vec![Ok::<_, mecha_filters::BoxError>(
                http_body::Frame::data(Bytes::from_static(b"x")),
            )]),
        ));
        let (text, f) = head(
            200,
            &[
                ("transfer-encoding", "chunked"),
                ("connection", "keep-alive"),
            ],
            stream,
            false,
            true,
        );
        assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
        assert_eq!(text.matches("transfer-encoding").count(), 1, "{text}");
        assert!(!text.contains("keep-alive"), "{text}");
        assert_eq!(f, Framing::Chunked);
    }

    #[test]
    fn hex_lengths() {
        let mut b = [0u8; 16];
        assert_eq!(hex_len(0, &mut b), b"0");
        assert_eq!(hex_len(255, &mut b), b"ff");
        assert_eq!(hex_len(4096, &mut b), b"1000");
    }
}
