//! Request/response header hygiene shared by the connection manager and the router.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

static HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
];

/// Removes hop-by-hop headers (and those the Connection header names). `te: trailers` survives,
/// as gRPC needs it; upgrade headers survive when the request is a permitted upgrade.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    if let Some(conn) = headers
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    {
        for name in conn.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if keep_upgrade && name.eq_ignore_ascii_case("upgrade") {
                continue;
            }
            if let Ok(n) = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
                if n != header::TE {
                    headers.remove(&n);
                }
            }
        }
    }
    let te_trailers = headers.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    });
    for h in &HOP_BY_HOP {
        if keep_upgrade && (h == header::CONNECTION || h == header::UPGRADE) {
            continue;
        }
        headers.remove(h);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Whether this is an HTTP/1.1 upgrade request, and of which protocol (lower-cased).
pub fn upgrade_type(headers: &HeaderMap) -> Option<String> {
    let conn = headers.get(header::CONNECTION)?.to_str().ok()?;
    if !conn
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    {
        return None;
    }
    Some(
        headers
            .get(header::UPGRADE)?
            .to_str()
            .ok()?
            .to_ascii_lowercase(),
    )
}

/// A random RFC 4122 version-4 UUID, as Envoy generates for `x-request-id`.
pub fn uuid_v4() -> String {
    let buf = uuid_v4_bytes();
    // The buffer holds only ASCII hex digits and dashes.
    String::from_utf8_lossy(&buf).into_owned()
}

/// [`uuid_v4`] as a header value, formatted on the stack (one allocation: the value's bytes).
pub fn uuid_v4_header() -> HeaderValue {
    HeaderValue::from_bytes(&uuid_v4_bytes()).unwrap_or(HeaderValue::from_static(""))
}

fn uuid_v4_bytes() -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut out = [b'-'; 36];
    let mut o = 0;
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            o += 1;
        }
        out[o] = HEX[(x >> 4) as usize];
        out[o + 1] = HEX[(x & 0x0f) as usize];
        o += 2;
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn uuid_v4_is_rfc4122_v4() {
        let u = super::uuid_v4();
        assert_eq!(u.len(), 36);
        let parts: Vec<&str> = u.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(u.bytes().all(|c| c == b'-' || c.is_ascii_hexdigit()));
        assert_eq!(&parts[2][..1], "4");
        assert!(matches!(&parts[3][..1], "8" | "9" | "a" | "b"));
        assert_ne!(u, super::uuid_v4());
        assert_eq!(super::uuid_v4_header().len(), 36);
    }
}
