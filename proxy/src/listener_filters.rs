//! Listener filters that sniff the first bytes of a connection without consuming them:
//! `envoy.filters.listener.tls_inspector` (TLS ClientHello → transport `tls`, SNI, ALPN) and
//! `envoy.filters.listener.http_inspector` (HTTP/1.x request line or the h2 preface →
//! application protocol `http/1.0`, `http/1.1` or `h2c`). What they find feeds
//! `filter_chain_match`; the bytes stay in the socket for the chain that is selected.
//!
//! Bytes are read with `recv(MSG_PEEK)`. Peeking does not drain the socket, so readiness would
//! stay set and a naive loop would spin while a ClientHello is still arriving. Clearing the
//! stream's own readiness while bytes wait in the socket is not an option either: epoll is
//! edge-triggered, so after a listener-filter timeout the selected chain would wait for an edge
//! that never comes (the client has sent its ClientHello and waits for the server). So the
//! stream's readiness is only ever cleared by a real `EAGAIN`; waiting for *more* bytes uses a
//! second registration of the same socket (a `dup`ed fd in an `AsyncFd`, created only when the
//! first bytes are incomplete), whose readiness is cleared when a peek finds nothing new.

use mecha_filters::stats::{Counter, Scope, Store};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Envoy's limit for a ClientHello (`tls_inspector` `max_client_hello_size`).
const MAX_CLIENT_HELLO: usize = 64 * 1024;
/// The h2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How much of a request line the HTTP inspector reads before giving up.
const MAX_REQUEST_LINE: usize = 8 * 1024;

/// What the listener filters learned about a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    /// `tls` or `raw_buffer`.
    pub transport: &'static str,
    pub server_name: Option<String>,
    pub application_protocols: Vec<String>,
}

impl Default for Detected {
    fn default() -> Self {
        Self {
            transport: "raw_buffer",
            server_name: None,
            application_protocols: vec![],
        }
    }
}

/// Envoy's `tls_inspector.*` and `http_inspector.*` stats.
#[derive(Clone)]
pub struct InspectorStats {
    pub tls_found: Counter,
    pub tls_not_found: Counter,
    pub sni_found: Counter,
    pub sni_not_found: Counter,
    pub alpn_found: Counter,
    pub alpn_not_found: Counter,
    pub client_hello_too_large: Counter,
    pub http10_found: Counter,
    pub http11_found: Counter,
    pub http2_found: Counter,
    pub http_not_found: Counter,
}

impl InspectorStats {
    pub fn new(store: &Store) -> Self {
        let tls = Scope::plain("tls_inspector");
        let http = Scope::plain("http_inspector");
        Self {
            tls_found: store.counter(&tls, "tls_found"),
            tls_not_found: store.counter(&tls, "tls_not_found"),
            sni_found: store.counter(&tls, "sni_found"),
            sni_not_found: store.counter(&tls, "sni_not_found"),
            alpn_found: store.counter(&tls, "alpn_found"),
            alpn_not_found: store.counter(&tls, "alpn_not_found"),
            client_hello_too_large: store.counter(&tls, "client_hello_too_large"),
            http10_found: store.counter(&http, "http10_found"),
            http11_found: store.counter(&http, "http11_found"),
            http2_found: store.counter(&http, "http2_found"),
            http_not_found: store.counter(&http, "http_not_found"),
        }
    }
}

/// The inspecting listener filters of one listener.
#[derive(Clone)]
pub struct Inspectors {
    pub tls: bool,
    pub http: bool,
    pub timeout: Option<Duration>,
    pub continue_on_timeout: bool,
    pub stats: InspectorStats,
}

/// How inspection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Done(Detected),
    /// The timeout passed; with `continue_on_listener_filters_timeout` the connection goes on
    /// with what is known (`Detected::default()` fields not found).
    TimedOut(Detected),
    /// The peer closed or the ClientHello was unacceptable: close the connection.
    Close(&'static str),
}

/// Result of looking at the bytes peeked so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse<T> {
    NeedMore,
    NotFound,
    Found(T),
}

/// Runs the configured inspectors on `stream` (without consuming anything).
pub async fn inspect(stream: &TcpStream, insp: &Inspectors) -> Outcome {
    let run = inspect_inner(stream, insp);
    match insp.timeout {
        None => run.await,
        Some(t) => match tokio::time::timeout(t, run).await {
            Ok(o) => o,
            Err(_) => Outcome::TimedOut(Detected::default()),
        },
    }
}

/// `recv(MSG_PEEK)` into `buf`: how many bytes the socket holds (up to `buf.len()`).
fn peek(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: recv writes at most buf.len() bytes into buf.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            libc::MSG_PEEK,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

async fn inspect_inner(stream: &TcpStream, insp: &Inspectors) -> Outcome {
    let fd = stream.as_raw_fd();
    let mut buf = vec![0u8; 2048];
    let mut seen = 0usize;
    // Waits for bytes beyond `seen` without touching the stream's readiness (module docs).
    let mut more: Option<AsyncFd<OwnedFd>> = None;
    let mut tls_state = if insp.tls {
        Parse::NeedMore
    } else {
        Parse::NotFound
    };
    let mut http_state = if insp.http {
        Parse::NeedMore
    } else {
        Parse::NotFound
    };
    loop {
        let peeked = match &more {
            None => {
                if stream.readable().await.is_err() {
                    return Outcome::Close("socket error during listener filters");
                }
                // A WouldBlock here is a real EAGAIN (nothing buffered): clearing is right.
                match stream.try_io(Interest::READABLE, || peek(fd, &mut buf)) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    r => r,
                }
            }
            Some(waiter) => {
                let Ok(mut guard) = waiter.readable().await else {
                    return Outcome::Close("socket error during listener filters");
                };
                match peek(fd, &mut buf) {
                    Ok(n) if n != 0 && n == seen && n < buf.len() => {
                        // Nothing new: wait for the next edge on the second registration.
                        guard.clear_ready();
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        guard.clear_ready();
                        continue;
                    }
                    r => r,
                }
            }
        };
        let n = match peeked {
            Ok(n) => n,
            Err(_) => return Outcome::Close("socket error during listener filters"),
        };
        if n == 0 {
            return Outcome::Close("peer closed during listener filters");
        }
        seen = n;
        let data = &buf[..n];
        if tls_state == Parse::NeedMore {
            tls_state = parse_client_hello(data);
        }
        // The HTTP inspector does not look at TLS connections (as Envoy): a ClientHello ends
        // its search, it must not wait for bytes the client sends only after the handshake.
        if matches!(tls_state, Parse::Found(_)) {
            http_state = Parse::NotFound;
        } else if http_state == Parse::NeedMore {
            http_state = parse_http(data);
        }
        if let (Parse::NeedMore, _) | (_, Parse::NeedMore) = (&tls_state, &http_state) {
            if n == buf.len() {
                if buf.len() >= MAX_CLIENT_HELLO + 5 {
                    if tls_state == Parse::NeedMore {
                        insp.stats.client_hello_too_large.inc();
                        return Outcome::Close("client hello too large");
                    }
                    http_state = Parse::NotFound;
                } else {
                    let want = (buf.len() * 4).min(MAX_CLIENT_HELLO + 5);
                    buf.resize(want, 0);
                    seen = 0;
                    continue;
                }
            } else {
                if more.is_none() {
                    let registered = stream.as_fd().try_clone_to_owned().and_then(|dup| {
                        // SAFETY: the AsyncFd owns `dup`, an open fd that stays open and
                        // refers to the same socket until the AsyncFd is dropped.
                        unsafe { AsyncFd::register_with_interest(dup, Interest::READABLE) }
                            .map_err(io::Error::from)
                    });
                    match registered {
                        Ok(w) => more = Some(w),
                        Err(_) => return Outcome::Close("socket error during listener filters"),
                    }
                }
                continue;
            }
        }
        if !matches!(tls_state, Parse::NeedMore) && !matches!(http_state, Parse::NeedMore) {
            return Outcome::Done(finish(insp, tls_state, http_state));
        }
    }
}

fn finish(
    insp: &Inspectors,
    tls: Parse<(Option<String>, Vec<String>)>,
    http: Parse<&'static str>,
) -> Detected {
    let mut d = Detected::default();
    let s = &insp.stats;
    if insp.tls {
        match tls {
            Parse::Found((sni, alpn)) => {
                s.tls_found.inc();
                d.transport = "tls";
                match &sni {
                    Some(_) => s.sni_found.inc(),
                    None => s.sni_not_found.inc(),
                }
                if alpn.is_empty() {
                    s.alpn_not_found.inc();
                } else {
                    s.alpn_found.inc();
                }
                d.server_name = sni;
                d.application_protocols = alpn;
            }
            _ => s.tls_not_found.inc(),
        }
    }
    if insp.http && d.transport != "tls" {
        match http {
            Parse::Found(p) => {
                match p {
                    "h2c" => s.http2_found.inc(),
                    "http/1.0" => s.http10_found.inc(),
                    _ => s.http11_found.inc(),
                }
                d.application_protocols = vec![p.to_string()];
            }
            _ => s.http_not_found.inc(),
        }
    }
    d
}

/// Parses a TLS ClientHello (possibly split over several handshake records) for SNI and ALPN.
pub fn parse_client_hello(data: &[u8]) -> Parse<(Option<String>, Vec<String>)> {
    // Gather the handshake bytes from consecutive handshake records.
    let mut hs = Vec::new();
    let mut pos = 0;
    loop {
        let Some(hdr) = data.get(pos..pos + 5) else {
            // A partial header is TLS-shaped only if what we have agrees with one.
            let rest = &data[pos.min(data.len())..];
            if pos == 0
                && (rest.first().is_some_and(|b| *b != 0x16)
                    || rest.get(1).is_some_and(|b| *b != 3))
            {
                return Parse::NotFound;
            }
            return Parse::NeedMore;
        };
        if hdr[0] != 0x16 || hdr[1] != 3 {
            return if pos == 0 {
                Parse::NotFound
            } else {
                // A non-handshake record before the ClientHello ended: malformed.
                Parse::NotFound
            };
        }
        let len = u16::from_be_bytes([hdr[3], hdr[4]]) as usize;
        if len == 0 || len > 16384 + 2048 {
            return Parse::NotFound;
        }
        let Some(body) = data.get(pos + 5..pos + 5 + len) else {
            hs.extend_from_slice(&data[pos + 5..]);
            if hs.first().is_some_and(|t| *t != 1) {
                return Parse::NotFound;
            }
            return Parse::NeedMore;
        };
        hs.extend_from_slice(body);
        pos += 5 + len;
        if hs.len() >= 4 {
            if hs[0] != 1 {
                return Parse::NotFound;
            }
            let hs_len = u32::from_be_bytes([0, hs[1], hs[2], hs[3]]) as usize;
            if hs.len() >= 4 + hs_len {
                return match client_hello_fields(&hs[4..4 + hs_len]) {
                    Some(x) => Parse::Found(x),
                    None => Parse::NotFound,
                };
            }
            if hs_len > MAX_CLIENT_HELLO {
                return Parse::NotFound;
            }
        }
    }
}

/// A bounds-checked reader over a byte slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| b[0] as usize)
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

fn client_hello_fields(body: &[u8]) -> Option<(Option<String>, Vec<String>)> {
    let mut r = Reader(body);
    r.take(2 + 32)?; // legacy_version, random
    r.vec8()?; // session id
    r.vec16()?; // cipher suites
    r.vec8()?; // compression methods
    let mut sni = None;
    let mut alpn = vec![];
    if r.0.is_empty() {
        return Some((sni, alpn)); // no extensions
    }
    let mut exts = Reader(r.vec16()?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let mut ext = Reader(exts.vec16()?);
        match kind {
            0 => {
                let mut list = Reader(ext.vec16()?);
                while !list.0.is_empty() {
                    let name_type = list.u8()?;
                    let name = list.vec16()?;
                    if name_type == 0 {
                        sni = std::str::from_utf8(name)
                            .ok()
                            .map(|s| s.to_ascii_lowercase());
                    }
                }
            }
            16 => {
                let mut list = Reader(ext.vec16()?);
                while !list.0.is_empty() {
                    let p = list.vec8()?;
                    if let Ok(p) = std::str::from_utf8(p) {
                        alpn.push(p.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    Some((sni, alpn))
}

/// Envoy's HTTP inspector: the h2 preface, or an HTTP/1.x request line with a valid method.
pub fn parse_http(data: &[u8]) -> Parse<&'static str> {
    let n = data.len().min(H2_PREFACE.len());
    if data[..n] == H2_PREFACE[..n] {
        return if data.len() >= H2_PREFACE.len() {
            Parse::Found("h2c")
        } else {
            Parse::NeedMore
        };
    }
    // Method: one or more token characters, then a space.
    let method_end = data.iter().position(|b| *b == b' ');
    let method = &data[..method_end.unwrap_or(data.len())];
    if !method
        .iter()
        .all(|b| b.is_ascii_uppercase() || *b == b'-' || *b == b'_')
    {
        return Parse::NotFound;
    }
    let Some(line_end) = data.windows(2).position(|w| w == b"\r\n") else {
        return if data.len() > MAX_REQUEST_LINE {
            Parse::NotFound
        } else {
            Parse::NeedMore
        };
    };
    let line = &data[..line_end];
    if method.is_empty() || method_end.is_none_or(|m| m > line_end) {
        return Parse::NotFound;
    }
    if line.ends_with(b" HTTP/1.1") {
        Parse::Found("http/1.1")
    } else if line.ends_with(b" HTTP/1.0") {
        Parse::Found("http/1.0")
    } else {
        Parse::NotFound
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal TLS 1.2-style ClientHello with SNI and ALPN extensions.
    pub(crate) fn client_hello(sni: &str, alpn: &[&str]) -> Vec<u8> {
        let mut exts = vec![];
        // server_name
        let mut list = vec![0u8];
        list.extend((sni.len() as u16).to_be_bytes());
        list.extend(sni.as_bytes());
        let mut sni_ext = ((list.len()) as u16).to_be_bytes().to_vec();
        sni_ext.extend(list);
        exts.extend(0u16.to_be_bytes());
        exts.extend((sni_ext.len() as u16).to_be_bytes());
        exts.extend(sni_ext);
        // ALPN
        let mut protos = vec![];
        for p in alpn {
            protos.push(p.len() as u8);
            protos.extend(p.as_bytes());
        }
        let mut alpn_ext = (protos.len() as u16).to_be_bytes().to_vec();
        alpn_ext.extend(protos);
        exts.extend(16u16.to_be_bytes());
        exts.extend((alpn_ext.len() as u16).to_be_bytes());
        exts.extend(alpn_ext);
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend(2u16.to_be_bytes());
        body.extend([0x13, 0x01]);
        body.extend([1, 0]);
        body.extend((exts.len() as u16).to_be_bytes());
        body.extend(exts);
        let mut hs = vec![1];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    #[test]
    fn client_hello_sni_and_alpn() {
        let ch = client_hello("Example.COM", &["h2", "http/1.1"]);
        assert_eq!(
            parse_client_hello(&ch),
            Parse::Found((
                Some("example.com".to_string()),
                vec!["h2".to_string(), "http/1.1".to_string()]
            ))
        );
        // Every strict prefix needs more bytes, never a wrong answer.
        for i in 0..ch.len() {
            assert_eq!(parse_client_hello(&ch[..i]), Parse::NeedMore, "prefix {i}");
        }
        assert_eq!(parse_client_hello(b"GET / HTTP/1.1\r\n"), Parse::NotFound);
        assert_eq!(parse_client_hello(&[0x16, 3, 1, 0, 0]), Parse::NotFound);
    }

    #[test]
    fn client_hello_split_over_two_records() {
        let ch = client_hello("a.example", &[]);
        let hs = &ch[5..];
        let (a, b) = hs.split_at(20);
        let mut two = vec![0x16, 3, 1];
        two.extend((a.len() as u16).to_be_bytes());
        two.extend(a);
        two.extend([0x16, 3, 1]);
        two.extend((b.len() as u16).to_be_bytes());
        two.extend(b);
        assert_eq!(
            parse_client_hello(&two),
            Parse::Found((Some("a.example".into()), vec![]))
        );
    }

    fn inspectors(tls: bool, http: bool, timeout: Option<Duration>) -> Inspectors {
        Inspectors {
            tls,
            http,
            timeout,
            continue_on_timeout: true,
            stats: InspectorStats::new(&Store::new()),
        }
    }

    /// A connected (client, accepted server side) pair on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    async fn inspect_within(stream: &TcpStream, insp: &Inspectors) -> Outcome {
        tokio::time::timeout(Duration::from_secs(5), inspect(stream, insp))
            .await
            .expect("inspection did not end")
    }

    #[tokio::test]
    async fn full_client_hello_ends_inspection_with_both_inspectors() {
        use tokio::io::AsyncWriteExt;
        let (mut c, s) = pair().await;
        c.write_all(&client_hello("secure.example.com", &["h2"]))
            .await
            .unwrap();
        // No listener timeout: a ClientHello alone must end inspection (the HTTP inspector
        // must not wait for bytes a TLS client sends only after the server's reply).
        let insp = inspectors(true, true, None);
        let Outcome::Done(d) = inspect_within(&s, &insp).await else {
            panic!("not done")
        };
        assert_eq!(d.transport, "tls");
        assert_eq!(d.server_name.as_deref(), Some("secure.example.com"));
        assert_eq!(d.application_protocols, vec!["h2".to_string()]);
        assert_eq!(insp.stats.sni_found.value(), 1);
        assert_eq!(insp.stats.http_not_found.value(), 0);
    }

    #[tokio::test]
    async fn client_hello_in_two_writes_waits_for_the_rest() {
        use tokio::io::AsyncWriteExt;
        let (mut c, s) = pair().await;
        let ch = client_hello("split.example", &[]);
        let (a, b) = ch.split_at(30);
        c.write_all(a).await.unwrap();
        let b = b.to_vec();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            c.write_all(&b).await.unwrap();
            c
        });
        let insp = inspectors(true, true, Some(Duration::from_secs(3)));
        let Outcome::Done(d) = inspect_within(&s, &insp).await else {
            panic!("not done")
        };
        assert_eq!(d.server_name.as_deref(), Some("split.example"));
        let _c = writer.await.unwrap();
    }

    #[tokio::test]
    async fn after_a_timeout_the_peeked_bytes_are_still_readable() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut c, mut s) = pair().await;
        // An incomplete ClientHello; the client then waits for the server (as TLS clients do).
        let ch = client_hello("slow.example", &[]);
        c.write_all(&ch[..20]).await.unwrap();
        let insp = inspectors(true, true, Some(Duration::from_millis(200)));
        assert_eq!(
            inspect_within(&s, &insp).await,
            Outcome::TimedOut(Detected::default())
        );
        // The chain that gets the connection reads the bytes without a new edge from the peer.
        let mut got = [0u8; 20];
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut got))
            .await
            .expect("bytes buffered before the timeout are readable")
            .unwrap();
        assert_eq!(&got[..], &ch[..20]);
    }

    #[test]
    fn http_detection() {
        assert_eq!(
            parse_http(b"GET / HTTP/1.1\r\nHost: x\r\n"),
            Parse::Found("http/1.1")
        );
        assert_eq!(
            parse_http(b"POST /a HTTP/1.0\r\n"),
            Parse::Found("http/1.0")
        );
        assert_eq!(parse_http(H2_PREFACE), Parse::Found("h2c"));
        assert_eq!(parse_http(&H2_PREFACE[..10]), Parse::NeedMore);
        assert_eq!(parse_http(b"GET /long"), Parse::NeedMore);
        assert_eq!(parse_http(b"\x16\x03\x01"), Parse::NotFound);
        assert_eq!(parse_http(b"hello world\r\n"), Parse::NotFound);
        assert_eq!(parse_http(b"GET / SPDY/3\r\n"), Parse::NotFound);
    }
}
