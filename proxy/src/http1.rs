//! HTTP/1.1 syntax shared by our two codecs: the downstream server (`http/h1_server.rs`) and the
//! upstream client (`cluster/h1.rs`).

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use smallvec::SmallVec;
use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

/// Header maps kept per thread for reuse (enough for the messages of ~64 requests in flight, at
/// ~1.3 KiB each), and the largest one worth keeping.
const SPARE_MAPS: usize = 128;
const SPARE_MAX_CAPACITY: usize = 48;

thread_local! {
    /// Every proxied HTTP/1.1 request builds two header maps (the request's and the upstream
    /// response's), each two allocations of over a kilobyte, which glibc serves from its slow
    /// path. The maps of finished messages come back here, cleared, for the next heads.
    static SPARE: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
    /// Likewise the extensions of finished requests: the connection manager inserts the
    /// request's `RequestInfo` into every request, and a fresh `Extensions` is a boxed hash map
    /// with its own table, two allocations and two frees per request.
    static SPARE_EXTENSIONS: RefCell<Vec<http::Extensions>> = const { RefCell::new(Vec::new()) };
}

type Spares<T> = std::thread::LocalKey<RefCell<Vec<T>>>;

/// A spare from `spares`, if this thread has one (and is not being torn down).
fn take_spare<T: 'static>(spares: &'static Spares<T>) -> Option<T> {
    spares.try_with(|s| s.borrow_mut().pop()).ok().flatten()
}

/// Keeps `spare` for reuse, up to [`SPARE_MAPS`] per thread.
fn give_spare<T: 'static>(spares: &'static Spares<T>, spare: T) {
    let _ = spares.try_with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < SPARE_MAPS {
            s.push(spare);
        }
    });
}

/// Empty request extensions, with a recycled map when this thread has one.
pub(crate) fn extensions() -> http::Extensions {
    take_spare(&SPARE_EXTENSIONS).unwrap_or_default()
}

/// Takes back the extensions of a request that is done with them (see [`extensions`]).
pub(crate) fn recycle_extensions(mut ext: http::Extensions) {
    if ext.is_empty() {
        // Never used (no map allocated), or already cleared: nothing worth keeping.
        return;
    }
    ext.clear();
    give_spare(&SPARE_EXTENSIONS, ext);
}

/// An empty header map with room for `n` fields: a recycled one when this thread has one.
pub(crate) fn header_map(n: usize) -> HeaderMap {
    match take_spare(&SPARE) {
        Some(mut m) => {
            // A spare too small (say, a small response's map) is grown rather than dropped:
            // dropping it and allocating anew cost a free and a malloc per request on paths
            // whose maps come back smaller than they go out (the runtime API's replies).
            if m.capacity() < n {
                m.reserve(n);
            }
            m
        }
        None => HeaderMap::with_capacity(n),
    }
}

/// Takes back the map of a message that is done with it (see [`header_map`]).
pub(crate) fn recycle(mut map: HeaderMap) {
    // An empty map without room (a message whose headers were moved out) is not worth keeping.
    if map.capacity() == 0 || map.capacity() > SPARE_MAX_CAPACITY {
        return;
    }
    map.clear();
    give_spare(&SPARE, map);
}

/// A `content-length` value: digits only (RFC 9110 §8.6), no sign, no overflow.
pub(crate) fn parse_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// The last element of a comma-separated list (the transfer coding that frames the message).
pub(crate) fn last_token(v: &[u8]) -> &[u8] {
    v.rsplit(|&b| b == b',').next().unwrap_or(v).trim_ascii()
}

/// A `connection` value that only says keep-alive or close (nominates no other header). Both
/// codecs read it for the connection's persistence and leave it out of the header map: it is
/// hop-by-hop, and the proxy would only remove it again (`strip_hop_by_hop`).
pub(crate) fn plain_connection(v: &[u8]) -> bool {
    v.split(|&b| b == b',').all(|t| {
        let t = t.trim_ascii();
        t.is_empty() || t.eq_ignore_ascii_case(b"keep-alive") || t.eq_ignore_ascii_case(b"close")
    })
}

/// True when a comma-separated header value lists `token` (case-insensitively).
pub(crate) fn has_token(v: &[u8], token: &[u8]) -> bool {
    v.split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// A field name off the wire. The names nearly every message carries, spelled as clients and
/// servers send them (Title-Case or lower case), are recognised by a fixed-size comparison;
/// anything else goes through `HeaderName::from_bytes`, which lower-cases into a scratch buffer
/// and searches the standard names (~110 instructions a name).
pub(crate) fn field_name(raw: &[u8]) -> Result<HeaderName, http::header::InvalidHeaderName> {
    use http::header::*;
    let known = |title: &[u8], lower: &[u8]| raw == title || raw == lower;
    let name = match raw.len() {
        4 if known(b"Host", b"host") => HOST,
        4 if known(b"Date", b"date") => DATE,
        6 if known(b"Server", b"server") => SERVER,
        6 if known(b"Accept", b"accept") => ACCEPT,
        10 if known(b"Connection", b"connection") => CONNECTION,
        10 if known(b"User-Agent", b"user-agent") => USER_AGENT,
        12 if known(b"Content-Type", b"content-type") => CONTENT_TYPE,
        14 if known(b"Content-Length", b"content-length") => CONTENT_LENGTH,
        15 if known(b"Accept-Encoding", b"accept-encoding") => ACCEPT_ENCODING,
        17 if known(b"Transfer-Encoding", b"transfer-encoding") => TRANSFER_ENCODING,
        _ => return HeaderName::from_bytes(raw),
    };
    Ok(name)
}

/// Parsed fields: each name with the offsets of its value in the head, kept on the stack for
/// typical messages (a heap vector per message showed up in the profile).
pub(crate) type Fields = SmallVec<[(HeaderName, usize, usize); 20]>;

/// Where `value` starts and ends inside `head` (a sub-slice of it, as httparse returns).
pub(crate) fn offsets(head: &[u8], value: &[u8]) -> (usize, usize) {
    let start = value.as_ptr() as usize - head.as_ptr() as usize;
    (start, start + value.len())
}

/// The fields as a header map whose values share `head`'s bytes, with room for `extra` more.
/// Takes the fields by reference: moving the inline vector (~1 KiB) would cost more than the map.
pub(crate) fn fields_map(head: &Bytes, fields: &mut Fields, extra: usize) -> HeaderMap {
    let mut map = header_map(fields.len() + extra);
    for (name, start, end) in fields.drain(..) {
        // SAFETY: httparse accepted these bytes as a field value, and it accepts exactly what
        // `HeaderValue` allows (HTAB, SP, visible ASCII, obs-text; no CR, LF or other controls),
        // so validating them a second time byte by byte would only cost time.
        let value = unsafe { HeaderValue::from_maybe_shared_unchecked(head.slice(start..end)) };
        map.append(name, value);
    }
    map
}

/// Appends `name: value\r\n`.
pub(crate) fn encode_field(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends every field of `fields`.
pub(crate) fn encode_fields(out: &mut Vec<u8>, fields: &HeaderMap) {
    for (name, value) in fields {
        encode_field(out, name, value);
    }
}

/// A map handed to [`recycle`] when dropped: for headers kept across awaits with several exits.
pub(crate) struct RecycleOnDrop(pub(crate) HeaderMap);

impl Drop for RecycleOnDrop {
    fn drop(&mut self) {
        recycle(std::mem::take(&mut self.0));
    }
}

thread_local! {
    /// The formatted `date` of the current second, per worker thread: formatting it for every
    /// response would cost more than the rest of the head.
    static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
}

/// Appends a `date: <IMF-fixdate>\r\n` field for now.
pub(crate) fn append_date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            let text = httpdate::fmt_http_date(now);
            // IMF-fixdate is always 29 bytes; anything else would be a bug in httpdate.
            if text.len() == 29 {
                d.1.copy_from_slice(text.as_bytes());
                d.0 = secs;
            }
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&d.1);
        out.extend_from_slice(b"\r\n");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths() {
        assert_eq!(parse_length(b" 42 "), Some(42));
        assert_eq!(parse_length(b"+1"), None);
        assert_eq!(parse_length(b""), None);
        assert_eq!(parse_length(b"99999999999999999999"), None);
    }

    #[test]
    fn tokens() {
        assert_eq!(last_token(b"gzip, chunked"), b"chunked");
        assert!(has_token(b"keep-alive, Close", b"close"));
        assert!(!has_token(b"closed", b"close"));
        assert!(plain_connection(b"Keep-Alive"));
        assert!(plain_connection(b"close, keep-alive"));
        assert!(!plain_connection(b"keep-alive, x-private"));
        assert!(!plain_connection(b"upgrade"));
    }

    #[test]
    fn maps_are_recycled_empty() {
        let mut m = header_map(4);
        m.insert("x-a", http::HeaderValue::from_static("1"));
        let cap = m.capacity();
        recycle(m);
        let again = header_map(4);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), cap);
        // A spare too small for the asked size is grown.
        recycle(again);
        assert!(header_map(cap + 20).capacity() >= cap + 20);
    }

    #[test]
    fn field_names_match_from_bytes() {
        for raw in [
            "Host",
            "host",
            "HOST",
            "Content-Length",
            "content-length",
            "CONTENT-length",
            "Date",
            "Server",
            "server",
            "Connection",
            "Accept",
            "User-Agent",
            "Content-Type",
            "Accept-Encoding",
            "Transfer-Encoding",
            "transfer-encoding",
            "X-Custom",
            "x-request-id",
            "Hostx",
            "Dat",
        ] {
            assert_eq!(
                field_name(raw.as_bytes()).unwrap(),
                HeaderName::from_bytes(raw.as_bytes()).unwrap(),
                "{raw}"
            );
        }
        assert!(field_name(b"bad name").is_err());
        assert!(field_name(b"").is_err());
    }

    #[test]
    fn extensions_are_recycled_empty() {
        let mut e = extensions();
        e.insert(7u32);
        recycle_extensions(e);
        let again = extensions();
        assert!(again.is_empty());
        assert!(again.get::<u32>().is_none());
    }
    #[test]
    fn date_is_an_imf_fixdate() {
        let mut out = Vec::new();
        append_date(&mut out);
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("date: ") && s.ends_with(" GMT\r\n"), "{s}");
        assert!(httpdate::parse_http_date(&s[6..s.len() - 2]).is_ok());
    }
}
