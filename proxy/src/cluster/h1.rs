//! Our own HTTP/1.1 upstream codec: the request is written and the response head read by the
//! request's own future, and the response body is read from the socket by whoever polls the body
//! (the downstream connection's task). hyper's client runs a task per connection and hands every
//! request and response across a channel to it; for a proxy that is one more task wake-up, two
//! channel hand-offs and 16 KiB of buffers per upstream connection, for no gain. This codec is
//! used for ordinary requests (no upgrade, no CONNECT, a body that is empty or of known length);
//! everything else goes through hyper on the same pooled connections (`pool.rs`).
//!
//! Framing follows RFC 9112 §6.3: no body for HEAD, 1xx, 204 and 304; `transfer-encoding`
//! ending in `chunked` is decoded (trailers become a trailers frame); otherwise
//! `content-length`; otherwise the body runs to the end of the connection. A connection goes back
//! to the pool only when its response ended cleanly, nothing was left unread, and neither side
//! asked to close.

use super::pool::UpstreamStream;
use crate::cluster::pool::Inner;
use crate::http1::{
    encode_fields, fields_map, last_token, offsets, parse_length, plain_connection, recycle, Fields,
};
use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};
use http_body::{Body as _, Frame, SizeHint};
use mecha_filters::{Body, BoxError};
use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Envoy's defaults: `max_response_headers_kb` 60, `max_headers_count` 100.
const MAX_HEAD: usize = 60 * 1024;
const MAX_HEADERS: usize = 100;
/// The first read of a response; enough for typical heads and small bodies.
const READ_CHUNK: usize = 4096;
/// Reads of a long body grow to this, so a 100 MB body is not 25,000 reads.
const MAX_READ_CHUNK: usize = 64 * 1024;

/// An idle or in-use HTTP/1.1 connection driven by this codec.
pub(crate) struct Conn {
    pub(crate) io: UpstreamStream,
    /// Bytes read but not yet consumed. Empty between requests.
    buf: BytesMut,
    /// The encoded request head; kept for its capacity.
    head: Vec<u8>,
}

/// What went wrong on the connection.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    #[error("connection closed before the response")]
    Closed,
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("request body error: {0}")]
    Body(BoxError),
}

/// Whether a request can go through this codec: not an upgrade or CONNECT (those need hyper's
/// upgrade machinery), and a body that is empty or of known length (chunked request bodies go to
/// hyper, which encodes them).
pub(crate) fn eligible(req: &http::Request<Body>, headers: &HeaderMap) -> bool {
    if req.method() == Method::CONNECT || headers.contains_key(http::header::UPGRADE) {
        return false;
    }
    let body = req.body();
    body.is_end_stream() || body.size_hint().exact().is_some()
}

impl Conn {
    pub(crate) fn new(io: UpstreamStream) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            head: Vec::new(),
        }
    }

    /// True when the connection still looks usable after sitting idle: the server has neither
    /// closed it nor sent anything unasked. Costs no syscall unless the socket became readable.
    pub(crate) fn idle_ok(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.io.inner.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Readiness can be left over from the last read of the previous response; a read
            // tells: would-block means alive (and clears the stale readiness).
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.inner.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }
}

/// Sends `req` on `conn` and reads the response head. The response body reads the rest of the
/// response from the connection and hands the connection back to `pool` when it ends.
///
/// `headers`, when given, are the request's headers (kept by the caller for a possible retry);
/// `req`'s own are then ignored.
///
/// A failure comes with the request back when it can be sent again on another connection: a
/// kept-alive connection the server had closed before anything of a response came back, and a
/// request without a body (so nothing is lost by sending it twice; browsers do the same).
pub(crate) async fn send(
    mut conn: Conn,
    req: http::Request<Body>,
    headers: Option<&HeaderMap>,
    reused: bool,
    pool: &Arc<Inner>,
) -> Result<http::Response<H1Body>, (H1Error, Option<http::Request<Body>>)> {
    let (parts, body) = req.into_parts();
    let no_body = body.is_end_stream();
    let len = if no_body {
        0
    } else {
        body.size_hint().exact().unwrap_or(0)
    };
    encode_head(
        &mut conn.head,
        &parts,
        headers.unwrap_or(&parts.headers),
        len,
        no_body,
    );

    let head_request = parts.method == Method::HEAD;
    let mut up = Upload {
        body,
        pending: Bytes::new(),
        remaining: len,
        done: no_body,
    };
    let written = match conn.io.write_all(&conn.head).await {
        Err(e) => Sent::Done(Err(H1Error::Io(e))),
        // The body is written while it comes; only when that has to wait (the socket is full or
        // the downstream body has nothing yet) is the connection also watched for a response
        // that comes first (e.g. a 413 from a server that will not read the body), so the
        // ordinary request costs no extra read.
        Ok(()) if no_body => Sent::Done(Ok(())),
        Ok(()) => {
            poll_fn(|cx| {
                if let Poll::Ready(r) = poll_upload(&mut conn.io, &mut up, cx) {
                    return Poll::Ready(Sent::Done(r));
                }
                poll_head(&mut conn, head_request, cx).map(Sent::Early)
            })
            .await
        }
    };
    let written = match written {
        Sent::Done(r) => r,
        Sent::Early(Ok(head)) => {
            // Envoy forwards the response at once; the rest of the body is still offered to the
            // server while the response body is read, and the connection is not reused.
            recycle(parts.headers);
            mecha_filters::spare::recycle_extensions(parts.extensions);
            let mut resp = into_response(conn, head, pool, false);
            if !resp.body().is_end_stream() {
                resp.body_mut().upload = Some(Box::new(up));
            }
            return Ok(resp);
        }
        Sent::Early(Err(e)) => Err(e),
    };
    if let Err(e) = written {
        // The server may have answered early (e.g. 413) and closed: that answer, if complete,
        // is still the response; otherwise the error stands.
        if !no_body && matches!(e, H1Error::Io(_)) {
            if let Ok(resp) = read_head(&mut conn, head_request).await {
                return Ok(into_response(conn, resp, pool, false));
            }
        }
        let replayable = reused && no_body && matches!(e, H1Error::Io(_));
        return Err(failure(e, replayable, parts));
    }

    match read_head(&mut conn, head_request).await {
        Ok(head) => {
            recycle(parts.headers);
            mecha_filters::spare::recycle_extensions(parts.extensions);
            Ok(into_response(conn, head, pool, true))
        }
        Err(e) => {
            let nothing_back = matches!(e, H1Error::Closed)
                || matches!(&e, H1Error::Io(io) if io.kind() == io::ErrorKind::ConnectionReset);
            let replayable = reused && no_body && nothing_back && conn.buf.is_empty();
            Err(failure(e, replayable, parts))
        }
    }
}

fn failure(
    error: H1Error,
    replayable: bool,
    parts: http::request::Parts,
) -> (H1Error, Option<http::Request<Body>>) {
    let again = replayable.then(|| http::Request::from_parts(parts, mecha_filters::empty()));
    (error, again)
}

fn encode_head(
    out: &mut Vec<u8>,
    parts: &http::request::Parts,
    headers: &HeaderMap,
    len: u64,
    no_body: bool,
) {
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| !p.is_empty())
        .unwrap_or("/");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    encode_fields(out, headers);
    if !headers.contains_key(CONTENT_LENGTH) {
        // As hyper's client does: a known-length body gets its length; an empty body of a
        // method that normally carries one says so explicitly.
        let needs = !no_body
            || matches!(parts.method, Method::POST | Method::PUT)
            || parts.method.as_str() == "PATCH";
        if needs {
            out.extend_from_slice(b"content-length: ");
            let mut b = itoa::Buffer::new();
            out.extend_from_slice(b.format(len).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// A parsed response head and how its body is framed.
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Reads until a final (non-1xx) response head is complete, skipping interim responses.
async fn read_head(conn: &mut Conn, head_request: bool) -> Result<Head, H1Error> {
    poll_fn(|cx| poll_head(conn, head_request, cx)).await
}

fn poll_head(
    conn: &mut Conn,
    head_request: bool,
    cx: &mut Context<'_>,
) -> Poll<Result<Head, H1Error>> {
    loop {
        if !conn.buf.is_empty() {
            if let Some(head) = parse_head(&mut conn.buf, head_request)? {
                if head.status.is_informational() {
                    if head.status == StatusCode::SWITCHING_PROTOCOLS {
                        return Poll::Ready(Err(H1Error::Protocol("unexpected 101 response")));
                    }
                    continue;
                }
                return Poll::Ready(Ok(head));
            }
            if conn.buf.len() >= MAX_HEAD {
                return Poll::Ready(Err(H1Error::Protocol("response headers too large")));
            }
        }
        let n = ready!(poll_fill(&mut conn.io, &mut conn.buf, cx, READ_CHUNK))?;
        if n == 0 {
            return Poll::Ready(Err(if conn.buf.is_empty() {
                H1Error::Closed
            } else {
                H1Error::Protocol("connection closed in the response head")
            }));
        }
    }
}

/// How writing the request ended.
enum Sent {
    /// The whole body went out (or writing it failed).
    Done(Result<(), H1Error>),
    /// A final response head arrived before the body was all written.
    Early(Result<Head, H1Error>),
}

/// The request body still to be written.
pub(crate) struct Upload {
    body: Body,
    /// The frame being written.
    pending: Bytes,
    /// Bytes the request's length still promises.
    remaining: u64,
    /// The body ended.
    done: bool,
}

/// Writes the request body as it comes; ready when all of it is out, or on the first error.
fn poll_upload(
    io: &mut UpstreamStream,
    up: &mut Upload,
    cx: &mut Context<'_>,
) -> Poll<Result<(), H1Error>> {
    loop {
        if !up.pending.is_empty() {
            let n = ready!(Pin::new(&mut *io).poll_write(cx, &up.pending))?;
            if n == 0 {
                return Poll::Ready(Err(H1Error::Io(io::ErrorKind::WriteZero.into())));
            }
            bytes::Buf::advance(&mut up.pending, n);
            continue;
        }
        if up.done {
            return Poll::Ready(Ok(()));
        }
        match ready!(Pin::new(&mut up.body).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    if data.len() as u64 > up.remaining {
                        return Poll::Ready(Err(H1Error::Protocol(
                            "request body longer than its length",
                        )));
                    }
                    up.remaining -= data.len() as u64;
                    up.pending = data;
                }
            }
            Some(Err(e)) => return Poll::Ready(Err(H1Error::Body(e))),
            None => {
                up.done = true;
                if up.remaining != 0 {
                    return Poll::Ready(Err(H1Error::Protocol(
                        "request body shorter than its length",
                    )));
                }
            }
        }
    }
}

/// Parses a complete head off the front of `buf` (None: need more bytes).
fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, H1Error> {
    let mut slots: [MaybeUninit<httparse::Header<'_>>; MAX_HEADERS] =
        [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let n = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(H1Error::Protocol("too many response headers"))
        }
        Err(_) => return Err(H1Error::Protocol("malformed response head")),
    };
    let code = resp.code.unwrap_or(0);
    let status =
        StatusCode::from_u16(code).map_err(|_| H1Error::Protocol("invalid response status"))?;
    let version = if resp.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut keep_alive = version == Version::HTTP_11;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut encoded = false;
    let mut fields = Fields::new();
    for h in resp.headers.iter() {
        let name = crate::http1::field_name(h.name.as_bytes())
            .map_err(|_| H1Error::Protocol("invalid response header name"))?;
        let value = h.value;
        if name == CONTENT_LENGTH {
            let v = parse_length(value).ok_or(H1Error::Protocol("invalid content-length"))?;
            if length.is_some_and(|l| l != v) {
                return Err(H1Error::Protocol("conflicting content-length"));
            }
            length = Some(v);
        } else if name == TRANSFER_ENCODING {
            encoded = true;
            chunked = last_token(value).eq_ignore_ascii_case(b"chunked");
        } else if name == CONNECTION {
            for token in value.split(|&b| b == b',') {
                let t = token.trim_ascii();
                if t.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if t.eq_ignore_ascii_case(b"keep-alive") && version == Version::HTTP_10 {
                    keep_alive = true;
                }
            }
            if plain_connection(value) {
                continue;
            }
        }
        let (start, end) = offsets(buf, value);
        fields.push((name, start, end));
    }
    let head = buf.split_to(n).freeze();
    // Room for what the router and connection manager add (server, via, x-envoy-*).
    let headers = fields_map(&head, &mut fields, 4);
    let framing = if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else if encoded {
        if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    if encoded && length.is_some() {
        // RFC 9112 §6.3: transfer-encoding wins, and the message is suspect; don't reuse.
        keep_alive = false;
    }
    if framing == Framing::UntilClose {
        keep_alive = false;
    }
    Ok(Some(Head {
        status,
        version,
        headers,
        framing,
        keep_alive,
    }))
}

fn into_response(
    conn: Conn,
    head: Head,
    pool: &Arc<Inner>,
    request_done: bool,
) -> http::Response<H1Body> {
    let reusable = head.keep_alive && request_done;
    let decoder = match head.framing {
        Framing::Empty => Decoder::Done,
        Framing::Length(n) => Decoder::Length(n),
        Framing::Chunked => Decoder::Chunked(Chunk::Size),
        Framing::UntilClose => Decoder::UntilClose,
    };
    let mut body = H1Body {
        conn: Some(conn),
        pool: reusable.then(|| pool.clone()),
        decoder,
        read_chunk: READ_CHUNK,
        upload: None,
    };
    if body.decoder == Decoder::Done {
        body.finish();
    }
    let mut resp = http::Response::new(body);
    *resp.status_mut() = head.status;
    *resp.version_mut() = head.version;
    *resp.headers_mut() = head.headers;
    resp
}

/// Reads into the spare capacity of `buf` (growing it to `want` first when it is short).
fn poll_fill(
    io: &mut UpstreamStream,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
    want: usize,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < want / 2 {
        buf.reserve(want);
    }
    let spare = buf.spare_capacity_mut();
    let mut rb = ReadBuf::uninit(spare);
    ready!(Pin::new(io).poll_read(cx, &mut rb))?;
    let n = rb.filled().len();
    // SAFETY: `poll_read` initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Poll::Ready(Ok(n))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Decoder {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes to go.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields up to an empty line.
    Trailers,
}

/// One step of the chunked decoder over what is buffered.
enum Step {
    Frame(Frame<Bytes>),
    /// The message ended (no trailers).
    End,
    /// Need more bytes.
    More,
}

fn chunk_step(state: &mut Chunk, buf: &mut BytesMut) -> Result<Step, H1Error> {
    loop {
        match *state {
            Chunk::Size => {
                let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
                    if buf.len() > 1024 {
                        return Err(H1Error::Protocol("chunk size line too long"));
                    }
                    return Ok(Step::More);
                };
                let (used, size) = match httparse::parse_chunk_size(&buf[..=nl]) {
                    Ok(httparse::Status::Complete(v)) => v,
                    _ => return Err(H1Error::Protocol("invalid chunk size")),
                };
                let _ = buf.split_to(used);
                *state = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(rem) => {
                if buf.is_empty() {
                    return Ok(Step::More);
                }
                let take = (rem.min(buf.len() as u64)) as usize;
                let data = buf.split_to(take).freeze();
                *state = if rem == take as u64 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(rem - take as u64)
                };
                return Ok(Step::Frame(Frame::data(data)));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Step::More);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(H1Error::Protocol("missing CRLF after chunk data"));
                }
                let _ = buf.split_to(2);
                *state = Chunk::Size;
            }
            Chunk::Trailers => {
                if buf.len() < 2 {
                    return Ok(Step::More);
                }
                if &buf[..2] == b"\r\n" {
                    let _ = buf.split_to(2);
                    return Ok(Step::End);
                }
                let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    if buf.len() > MAX_HEAD {
                        return Err(H1Error::Protocol("trailers too large"));
                    }
                    return Ok(Step::More);
                };
                let section = buf.split_to(end + 4);
                let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let fields = match httparse::parse_headers(&section, &mut slots) {
                    Ok(httparse::Status::Complete((_, fields))) => fields,
                    _ => return Err(H1Error::Protocol("malformed trailers")),
                };
                let mut trailers = HeaderMap::with_capacity(fields.len());
                for f in fields {
                    let (Ok(name), Ok(value)) = (
                        HeaderName::from_bytes(f.name.as_bytes()),
                        HeaderValue::from_bytes(f.value),
                    ) else {
                        return Err(H1Error::Protocol("invalid trailer"));
                    };
                    trailers.append(name, value);
                }
                return Ok(Step::Frame(Frame::trailers(trailers)));
            }
        }
    }
}

/// The body of a response read by this codec. Dropping it before its end closes the connection
/// (the rest of the response cannot be skipped safely).
pub struct H1Body {
    conn: Option<Conn>,
    /// Where the connection goes back when the body ended cleanly (None: not reusable).
    pool: Option<Arc<Inner>>,
    decoder: Decoder,
    read_chunk: usize,
    /// The rest of the request body when the response came before it was all written.
    upload: Option<Box<Upload>>,
}

impl H1Body {
    /// The body ended: the connection goes back to the pool if it can carry another request.
    fn finish(&mut self) {
        self.decoder = Decoder::Done;
        self.upload = None;
        if let (Some(conn), Some(pool)) = (self.conn.take(), self.pool.take()) {
            if conn.buf.is_empty() {
                pool.put_idle_raw(conn);
            }
        }
    }

    fn fail(&mut self, e: impl Into<H1Error>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.decoder = Decoder::Done;
        self.conn = None;
        self.pool = None;
        self.upload = None;
        Poll::Ready(Some(Err(Box::new(e.into()))))
    }
}

impl http_body::Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let (Some(up), Some(conn)) = (this.upload.as_mut(), this.conn.as_mut()) {
            // An early response: keep offering the rest of the request body meanwhile. Once it
            // is all out, or writing failed, stop; a failure surfaces through the reads, if at all.
            if poll_upload(&mut conn.io, up, cx).is_ready() {
                this.upload = None;
            }
        }
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.decoder {
                Decoder::Done => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Decoder::Length(rem) => {
                    if !conn.buf.is_empty() {
                        let take = (*rem).min(conn.buf.len() as u64) as usize;
                        let data = conn.buf.split_to(take).freeze();
                        *rem -= take as u64;
                        if *rem == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    let want = (*rem).min(this.read_chunk as u64) as usize;
                    match ready!(poll_fill(&mut conn.io, &mut conn.buf, cx, want)) {
                        Ok(0) => {
                            return this.fail(H1Error::Protocol(
                                "connection closed before the end of the body",
                            ))
                        }
                        Ok(n) => grow(&mut this.read_chunk, n, want),
                        Err(e) => return this.fail(e),
                    }
                }
                Decoder::Chunked(state) => match chunk_step(state, &mut conn.buf) {
                    Ok(Step::Frame(f)) => {
                        if f.is_trailers() {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(f)));
                    }
                    Ok(Step::End) => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(Step::More) => {
                        let want = this.read_chunk;
                        match ready!(poll_fill(&mut conn.io, &mut conn.buf, cx, want)) {
                            Ok(0) => {
                                return this.fail(H1Error::Protocol(
                                    "connection closed inside a chunked body",
                                ))
                            }
                            Ok(n) => grow(&mut this.read_chunk, n, want),
                            Err(e) => return this.fail(e),
                        }
                    }
                    Err(e) => return this.fail(e),
                },
                Decoder::UntilClose => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    let want = this.read_chunk;
                    match ready!(poll_fill(&mut conn.io, &mut conn.buf, cx, want)) {
                        Ok(0) => {
                            this.decoder = Decoder::Done;
                            this.conn = None;
                            return Poll::Ready(None);
                        }
                        Ok(n) => grow(&mut this.read_chunk, n, want),
                        Err(e) => return this.fail(e),
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder == Decoder::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Decoder::Done => SizeHint::with_exact(0),
            Decoder::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

/// A read that filled what was asked for suggests more is waiting: read bigger next time.
fn grow(chunk: &mut usize, got: usize, want: usize) {
    if got >= want && *chunk < MAX_READ_CHUNK {
        *chunk *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[&[u8]]) -> Result<(Vec<u8>, Option<HeaderMap>), H1Error> {
        let mut state = Chunk::Size;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut pieces = input.iter();
        loop {
            match chunk_step(&mut state, &mut buf)? {
                Step::Frame(f) => match f.into_data() {
                    Ok(d) => out.extend_from_slice(&d),
                    Err(f) => return Ok((out, f.into_trailers().ok())),
                },
                Step::End => return Ok((out, None)),
                Step::More => match pieces.next() {
                    Some(p) => buf.extend_from_slice(p),
                    None => return Err(H1Error::Closed),
                },
            }
        }
    }

    #[test]
    fn chunked_body_split_anywhere_decodes_the_same() {
        let wire: &[u8] = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-sum: 42\r\n\r\n";
        for cut in 0..wire.len() {
            let (a, b) = wire.split_at(cut);
            let (data, trailers) = decode_all(&[a, b]).unwrap();
            assert_eq!(data, b"hello, world", "cut at {cut}");
            assert_eq!(trailers.unwrap()["x-sum"], "42", "cut at {cut}");
        }
        let bytewise: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(decode_all(&bytewise).unwrap().0, b"hello, world");
    }

    #[test]
    fn chunked_body_without_trailers_ends() {
        let (data, trailers) = decode_all(&[b"3\r\nabc\r\n0\r\n\r\n"]).unwrap();
        assert_eq!(data, b"abc");
        assert!(trailers.is_none());
    }

    #[test]
    fn malformed_chunks_are_errors() {
        assert!(decode_all(&[b"zz\r\nabc\r\n0\r\n\r\n"]).is_err());
        assert!(decode_all(&[b"3\r\nabcX\r\n0\r\n\r\n"]).is_err());
    }

    fn head(wire: &[u8], head_request: bool) -> Head {
        let mut buf = BytesMut::from(wire);
        parse_head(&mut buf, head_request).unwrap().unwrap()
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let h = head(b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n", false);
        assert_eq!(h.framing, Framing::Length(12));
        assert!(h.keep_alive);
        let h = head(b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n", true);
        assert_eq!(h.framing, Framing::Empty);
        let h = head(b"HTTP/1.1 204 No Content\r\n\r\n", false);
        assert_eq!(h.framing, Framing::Empty);
        let h = head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            false,
        );
        assert_eq!(h.framing, Framing::Chunked);
        let h = head(b"HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!(h.framing, Framing::UntilClose);
        assert!(!h.keep_alive);
        let h = head(b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", false);
        assert!(!h.keep_alive);
        let h = head(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\ncontent-length: 1\r\n\r\n",
            false,
        );
        assert!(h.keep_alive);
        let h = head(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\ncontent-length: 1\r\n\r\n",
            false,
        );
        assert!(!h.keep_alive);
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"[..],
        );
        assert!(parse_head(&mut buf, false).is_err());
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-le"[..]);
        assert!(parse_head(&mut buf, false).unwrap().is_none());
    }

    #[test]
    fn header_values_survive_the_split() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nx-a: one\r\nx-a: two\r\ncontent-length: 3\r\n\r\nabc"[..],
        );
        let h = parse_head(&mut buf, false).unwrap().unwrap();
        let all: Vec<_> = h.headers.get_all("x-a").iter().collect();
        assert_eq!(all, ["one", "two"]);
        assert_eq!(&buf[..], b"abc");
    }

    #[test]
    fn request_head_adds_length_only_when_needed() {
        let mut out = Vec::new();
        let (parts, _) = http::Request::get("/a?b=1")
            .header("host", "x")
            .body(())
            .unwrap()
            .into_parts();
        encode_head(&mut out, &parts, &parts.headers, 0, true);
        assert_eq!(out, b"GET /a?b=1 HTTP/1.1\r\nhost: x\r\n\r\n");
        let (parts, _) = http::Request::post("/p").body(()).unwrap().into_parts();
        encode_head(&mut out, &parts, &parts.headers, 5, false);
        assert_eq!(out, b"POST /p HTTP/1.1\r\ncontent-length: 5\r\n\r\n");
    }
}
