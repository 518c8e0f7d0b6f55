//! A lean RESP2 connection for `state.redis` reads.
//!
//! A state get is two commands (HMGET of Dapr's `data` and `version` fields, and PTTL). Through
//! the `redis` crate each get cost ~14k of the ~31k instructions mecha spends on it: its
//! combine-based reply parser ~4k, pipeline encoding and response composition ~3k, two boxed
//! futures of its connection manager and a timer per request most of the rest. This connection
//! encodes the commands straight into bytes and parses the replies by hand, zero-copy (a bulk
//! string is a slice of the read buffer, which becomes the HTTP response body as is).
//!
//! One connection is multiplexed: callers queue encoded commands, a writer task batches every
//! queued request into one write, and a reader task parses the replies in order and hands each
//! caller its own. A connection that fails is replaced on the next request, so a Redis that was
//! down is used again as soon as it is back. Writes, transactions, pub/sub and TLS connections
//! keep the `redis` crate, whose scripting and reconnection they need and whose cost they can
//! afford.

use arc_swap::ArcSwapOption;
use bytes::{Bytes, BytesMut};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// Nesting deeper than this is not a reply to anything we send.
const MAX_DEPTH: usize = 8;
/// Redis's own default `proto-max-bulk-len`.
const MAX_BULK: usize = 512 * 1024 * 1024;
/// Elements of one array reply we accept (ours have two).
const MAX_ARRAY: usize = 1 << 20;
/// A writer batches queued requests up to this many bytes per write.
const MAX_BATCH: usize = 64 * 1024;
/// Room the reader keeps free before each read.
const READ_CHUNK: usize = 16 * 1024;

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Nil,
    Int(i64),
    Bulk(Bytes),
    Simple(Bytes),
    Error(String),
    Array(Vec<Value>),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RespError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("connection closed before the reply")]
    Closed,
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("connect to {0} timed out")]
    ConnectTimeout(String),
    #[error("{0}")]
    Server(String),
}

/// Appends `args` as one command (an array of bulk strings).
pub(crate) fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.push(b'*');
    push_decimal(out, args.len());
    out.extend_from_slice(b"\r\n");
    for a in args {
        out.push(b'$');
        push_decimal(out, a.len());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

fn push_decimal(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// A reply located in a buffer: bulk and simple strings as ranges, so the buffer can be frozen
/// once the whole reply is known to be there and the strings become slices of it.
#[derive(Debug)]
enum Frame {
    Nil,
    Int(i64),
    Bulk(Range<usize>),
    Simple(Range<usize>),
    Error(Range<usize>),
    Array(Vec<Frame>),
}

impl Frame {
    fn into_value(self, buf: &Bytes) -> Value {
        match self {
            Frame::Nil => Value::Nil,
            Frame::Int(i) => Value::Int(i),
            Frame::Bulk(r) => Value::Bulk(buf.slice(r)),
            Frame::Simple(r) => Value::Simple(buf.slice(r)),
            Frame::Error(r) => Value::Error(String::from_utf8_lossy(&buf[r]).into_owned()),
            Frame::Array(items) => {
                Value::Array(items.into_iter().map(|f| f.into_value(buf)).collect())
            }
        }
    }
}

/// The line starting at `pos` (without its CRLF) and the position after it; `None` when the
/// buffer ends first.
fn line(buf: &[u8], pos: usize) -> Option<(Range<usize>, usize)> {
    let rel = buf.get(pos..)?.windows(2).position(|w| w == b"\r\n")?;
    Some((pos..pos + rel, pos + rel + 2))
}

fn integer(digits: &[u8]) -> Result<i64, RespError> {
    let (neg, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(RespError::Protocol("invalid integer"));
    }
    let n = digits
        .iter()
        .try_fold(0i64, |acc, &d| {
            acc.checked_mul(10)?.checked_add(i64::from(d - b'0'))
        })
        .ok_or(RespError::Protocol("integer overflow"))?;
    Ok(if neg { -n } else { n })
}

/// Parses the reply starting at `pos`: `Ok(None)` when it is not all in `buf` yet.
fn frame_at(buf: &[u8], pos: usize, depth: usize) -> Result<Option<(Frame, usize)>, RespError> {
    if depth > MAX_DEPTH {
        return Err(RespError::Protocol("replies nested too deep"));
    }
    let Some(&kind) = buf.get(pos) else {
        return Ok(None);
    };
    let Some((body, next)) = line(buf, pos + 1) else {
        return Ok(None);
    };
    Ok(Some(match kind {
        b'+' => (Frame::Simple(body), next),
        b'-' => (Frame::Error(body), next),
        b':' => (Frame::Int(integer(&buf[body])?), next),
        b'$' => {
            let len = integer(&buf[body])?;
            if len < 0 {
                return Ok(Some((Frame::Nil, next)));
            }
            let len = len as usize;
            if len > MAX_BULK {
                return Err(RespError::Protocol("bulk string too long"));
            }
            let end = next + len;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(RespError::Protocol("bulk string without its CRLF"));
            }
            (Frame::Bulk(next..end), end + 2)
        }
        b'*' => {
            let n = integer(&buf[body])?;
            if n < 0 {
                return Ok(Some((Frame::Nil, next)));
            }
            let n = n as usize;
            if n > MAX_ARRAY {
                return Err(RespError::Protocol("array too long"));
            }
            let mut items = Vec::with_capacity(n.min(64));
            let mut at = next;
            for _ in 0..n {
                let Some((f, after)) = frame_at(buf, at, depth + 1)? else {
                    return Ok(None);
                };
                items.push(f);
                at = after;
            }
            (Frame::Array(items), at)
        }
        _ => return Err(RespError::Protocol("unknown reply type")),
    }))
}

/// Takes the first complete reply off `buf`, if there is one.
pub(crate) fn take_reply(buf: &mut BytesMut) -> Result<Option<Value>, RespError> {
    let Some((frame, len)) = frame_at(buf, 0, 0)? else {
        return Ok(None);
    };
    let bytes = buf.split_to(len).freeze();
    Ok(Some(frame.into_value(&bytes)))
}

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub host: String,
    pub port: u16,
    pub db: i64,
    pub username: Option<String>,
    pub password: Option<String>,
}

type Replies = Result<Vec<Value>, RespError>;

/// A request waiting for its replies.
struct Waiting {
    replies: usize,
    tx: oneshot::Sender<Replies>,
}

/// Encoded commands on their way to the writer.
struct Queued {
    cmds: Vec<u8>,
    waiting: Waiting,
}

/// One live connection: its writer's queue. Closed when either task ends.
struct Link {
    tx: mpsc::UnboundedSender<Queued>,
}

/// A multiplexed connection that is (re)made on demand.
pub(crate) struct RespClient {
    target: Target,
    link: ArcSwapOption<Link>,
    /// Serialises reconnecting, so a burst of requests after a failure makes one connection.
    connecting: tokio::sync::Mutex<()>,
    connect_timeout: Duration,
    reply_timeout: Duration,
}

impl RespClient {
    pub(crate) fn new(target: Target, connect_timeout: Duration, reply_timeout: Duration) -> Self {
        Self {
            target,
            link: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
            connect_timeout,
            reply_timeout,
        }
    }

    /// Sends `cmds` (encoded with [`encode`]) and waits for their `replies` replies.
    pub(crate) async fn query(&self, cmds: Vec<u8>, replies: usize) -> Replies {
        if replies == 0 {
            // Every command has a reply: a request expecting none would put the stream out
            // of step.
            return Err(RespError::Protocol("a request must expect a reply"));
        }
        let (tx, rx) = oneshot::channel();
        let queued = Queued {
            cmds,
            waiting: Waiting { replies, tx },
        };
        // The live link, if there is one; else (or when it has just died) a new one.
        let link = match self.link.load_full() {
            Some(link) => match link.tx.send(queued) {
                Ok(()) => link,
                Err(mpsc::error::SendError(q)) => self.send_on_new_link(q).await?,
            },
            None => self.send_on_new_link(queued).await?,
        };
        self.wait(rx, &link).await
    }

    async fn send_on_new_link(&self, queued: Queued) -> Result<Arc<Link>, RespError> {
        let link = self.reconnect().await?;
        link.tx.send(queued).map_err(|_| RespError::Closed)?;
        Ok(link)
    }

    async fn wait(&self, rx: oneshot::Receiver<Replies>, link: &Arc<Link>) -> Replies {
        match tokio::time::timeout(self.reply_timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(RespError::Closed),
            Err(_) => {
                // A connection that answers nothing for this long is as good as dead, though
                // nothing may ever say so (a failed-over primary behind a VIP, a lost NAT entry):
                // retire it, as go-redis (Dapr's client) discards a connection after a timeout,
                // so the next request connects afresh instead of queueing on it too.
                self.retire(link);
                Err(RespError::Timeout(self.reply_timeout))
            }
        }
    }

    /// Stops using `link` if it is still the current one. Its writer ends when the last request
    /// holding it is done, which shuts the socket's write side down.
    fn retire(&self, link: &Arc<Link>) {
        // Compared by pointer: a request that reconnected meanwhile keeps its new link.
        self.link.compare_and_swap(&Some(link.clone()), None);
    }

    async fn reconnect(&self) -> Result<Arc<Link>, RespError> {
        let _one = self.connecting.lock().await;
        if let Some(link) = self.link.load_full() {
            if !link.tx.is_closed() {
                // Another request reconnected while this one waited.
                return Ok(link);
            }
        }
        let addr = format!("{}:{}", self.target.host, self.target.port);
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&addr))
            .await
            .map_err(|_| RespError::ConnectTimeout(addr))??;
        let link = Arc::new(handshake(stream, &self.target, self.reply_timeout).await?);
        self.link.store(Some(link.clone()));
        Ok(link)
    }
}

/// Authenticates and selects the database, then starts the connection's two tasks.
async fn handshake(
    stream: TcpStream,
    target: &Target,
    reply_timeout: Duration,
) -> Result<Link, RespError> {
    stream.set_nodelay(true)?;
    let (mut rd, mut wr) = stream.into_split();
    let mut hello = Vec::new();
    let mut expected = 0;
    if let Some(pass) = &target.password {
        match &target.username {
            Some(user) => encode(&mut hello, &[b"AUTH", user.as_bytes(), pass.as_bytes()]),
            None => encode(&mut hello, &[b"AUTH", pass.as_bytes()]),
        }
        expected += 1;
    }
    if target.db != 0 {
        encode(&mut hello, &[b"SELECT", target.db.to_string().as_bytes()]);
        expected += 1;
    }
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    if expected > 0 {
        wr.write_all(&hello).await?;
        let replies = tokio::time::timeout(reply_timeout, async {
            let mut got = Vec::new();
            while got.len() < expected {
                match take_reply(&mut buf)? {
                    Some(v) => got.push(v),
                    None => {
                        if rd.read_buf(&mut buf).await? == 0 {
                            return Err(RespError::Closed);
                        }
                    }
                }
            }
            Ok(got)
        })
        .await
        .map_err(|_| RespError::Timeout(reply_timeout))??;
        if let Some(Value::Error(e)) = replies.iter().find(|v| matches!(v, Value::Error(_))) {
            return Err(RespError::Server(e.clone()));
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let (wtx, wrx) = mpsc::unbounded_channel();
    tokio::spawn(write_loop(wr, rx, wtx));
    tokio::spawn(read_loop(rd, buf, wrx));
    Ok(Link { tx })
}

/// Writes queued requests, batched, after handing each one's waiter to the reader (first, so
/// the waiter is there before its reply can be).
async fn write_loop(
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Queued>,
    waiters: mpsc::UnboundedSender<Waiting>,
) {
    let mut batch = Vec::with_capacity(4096);
    while let Some(q) = rx.recv().await {
        let mut next = Some(q);
        while let Some(q) = next.take() {
            batch.extend_from_slice(&q.cmds);
            if waiters.send(q.waiting).is_err() {
                // The reader is gone: the connection is dead.
                return;
            }
            if batch.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if wr.write_all(&batch).await.is_err() {
            return;
        }
        batch.clear();
    }
}

/// Parses replies in order and completes the waiters. Ends (failing every waiter it has, by
/// dropping them) when the connection ends or breaks the protocol; the writer then ends at its
/// next request, which closes the link.
async fn read_loop(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    mut buf: BytesMut,
    mut waiters: mpsc::UnboundedReceiver<Waiting>,
) {
    let mut current: Option<(Waiting, Vec<Value>)> = None;
    loop {
        loop {
            let v = match take_reply(&mut buf) {
                Ok(Some(v)) => v,
                Ok(None) => break,
                Err(e) => {
                    if let Some((w, _)) = current.take() {
                        let _ = w.tx.send(Err(e));
                    }
                    return;
                }
            };
            let (w, mut got) = match current.take() {
                Some(c) => c,
                // The waiter is in the queue already: the writer queues it before it writes
                // the request. An empty, closed queue means the writer is gone.
                None => match waiters.recv().await {
                    Some(w) => {
                        let n = w.replies;
                        (w, Vec::with_capacity(n))
                    }
                    None => return,
                },
            };
            got.push(v);
            if got.len() >= w.replies {
                let _ = w.tx.send(Ok(got));
            } else {
                current = Some((w, got));
            }
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(raw: &[u8]) -> Vec<Value> {
        let mut buf = BytesMut::from(raw);
        let mut out = vec![];
        while let Some(v) = take_reply(&mut buf).unwrap() {
            out.push(v);
        }
        assert!(buf.is_empty(), "left over: {buf:?}");
        out
    }

    #[test]
    fn encodes_commands_as_bulk_arrays() {
        let mut out = vec![];
        encode(&mut out, &[b"HMGET", b"app||k", b"data", b""]);
        assert_eq!(
            out,
            b"*4\r\n$5\r\nHMGET\r\n$6\r\napp||k\r\n$4\r\ndata\r\n$0\r\n\r\n"
        );
    }

    #[test]
    fn parses_every_reply_type() {
        let v = parse_all(
            b"+OK\r\n-ERR bad\r\n:-42\r\n$3\r\na\r\n\r\n$-1\r\n*2\r\n$1\r\nx\r\n$-1\r\n*-1\r\n*0\r\n",
        );
        assert_eq!(
            v,
            vec![
                Value::Simple(Bytes::from_static(b"OK")),
                Value::Error("ERR bad".into()),
                Value::Int(-42),
                Value::Bulk(Bytes::from_static(b"a\r\n")),
                Value::Nil,
                Value::Array(vec![Value::Bulk(Bytes::from_static(b"x")), Value::Nil]),
                Value::Nil,
                Value::Array(vec![]),
            ]
        );
    }

    #[test]
    fn incomplete_replies_wait_for_more_bytes() {
        let full = b"*2\r\n$5\r\nhello\r\n:7\r\n";
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert_eq!(take_reply(&mut buf).unwrap(), None, "cut at {cut}");
            assert_eq!(buf.len(), cut, "nothing consumed at {cut}");
        }
        assert_eq!(parse_all(full).len(), 1);
    }

    #[test]
    fn malformed_replies_are_errors() {
        for bad in [
            &b"?x\r\n"[..],
            b":12a\r\n",
            b":\r\n",
            b"$3\r\nabcd\r\n",
            b":99999999999999999999\r\n",
        ] {
            let mut buf = BytesMut::from(bad);
            assert!(take_reply(&mut buf).is_err(), "{bad:?}");
        }
        let deep = "*1\r\n".repeat(MAX_DEPTH + 2) + ":1\r\n";
        assert!(take_reply(&mut BytesMut::from(deep.as_bytes())).is_err());
    }

    /// A server whose first connection reads requests and never answers (and never closes, as
    /// a failed-over primary behind a VIP would not), and whose later connections answer every
    /// command with `:1`. Returns its port and how many connections it accepted.
    async fn silent_then_answering_server() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let silent = count.fetch_add(1, Ordering::SeqCst) == 0;
                tokio::spawn(async move {
                    let mut buf = BytesMut::new();
                    loop {
                        match conn.read_buf(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        if silent {
                            continue;
                        }
                        // One '*' per command: each is an array, and the test's commands
                        // (`PTTL k`) hold no other '*'.
                        let cmds = buf.split().iter().filter(|&&b| b == b'*').count();
                        if conn.write_all(&b":1\r\n".repeat(cmds)).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (port, accepted)
    }

    #[tokio::test]
    async fn a_connection_that_stops_answering_is_replaced() {
        use std::sync::atomic::Ordering;
        let (port, accepted) = silent_then_answering_server().await;
        let target = Target {
            host: "127.0.0.1".into(),
            port,
            db: 0,
            username: None,
            password: None,
        };
        let client = RespClient::new(target, Duration::from_secs(2), Duration::from_millis(300));
        let cmd = || {
            let mut out = vec![];
            encode(&mut out, &[b"PTTL", b"k"]);
            out
        };
        assert!(matches!(
            client.query(cmd(), 1).await,
            Err(RespError::Timeout(_))
        ));
        // Without retiring the silent connection, this would queue on it and time out too.
        let replies = client
            .query(cmd(), 1)
            .await
            .expect("answered on a new connection");
        assert_eq!(replies, vec![Value::Int(1)]);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // And the new connection stays in use.
        client.query(cmd(), 1).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}
