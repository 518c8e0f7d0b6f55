//! HTTP/1.1 syntax shared by our two codecs: the downstream server (`http/h1_server.rs`) and the
//! upstream client (`cluster/h1.rs`).

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
pub(crate) use mecha_filters::spare::{header_map, recycle};
use smallvec::SmallVec;
use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

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
    fn date_is_an_imf_fixdate() {
        let mut out = Vec::new();
        append_date(&mut out);
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("date: ") && s.ends_with(" GMT\r\n"), "{s}");
        assert!(httpdate::parse_http_date(&s[6..s.len() - 2]).is_ok());
    }
}
