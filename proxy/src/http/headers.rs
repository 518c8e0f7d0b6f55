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
    // One pass over the names (standard names compare as enum tags) finds which hop-by-hop
    // headers are present, so only those are removed: most messages carry none, or one
    // (`connection: keep-alive`, `transfer-encoding: chunked`).
    let mut present = 0u8;
    for k in headers.keys() {
        // Standard names compare by their tag; only the two non-standard ones by bytes.
        present |= if k == header::CONNECTION {
            1
        } else if k == header::TRANSFER_ENCODING {
            1 << 3
        } else if k == header::UPGRADE {
            1 << 4
        } else if k == header::TE {
            1 << 5
        } else if k == HOP_BY_HOP[1] {
            1 << 1
        } else if k == HOP_BY_HOP[2] {
            1 << 2
        } else {
            0
        };
    }
    if present == 0 && !keep_upgrade {
        return;
    }
    if present == 1 && !keep_upgrade {
        // The usual case, `connection: keep-alive` or `close` alone: nothing it nominates.
        let plain = headers.get_all(header::CONNECTION).iter().all(|v| {
            let v = v.as_bytes();
            v.eq_ignore_ascii_case(b"keep-alive") || v.eq_ignore_ascii_case(b"close")
        });
        if plain {
            headers.remove(header::CONNECTION);
            return;
        }
    }
    const CONNECTION: u8 = 1;
    const TE: u8 = 1 << 5;
    if present == TE && !keep_upgrade {
        // gRPC's `te: trailers` alone: the one value that passes, already as it should be.
        let mut te = headers.get_all(header::TE).iter();
        if let (Some(v), None) = (te.next(), te.next()) {
            if v.as_bytes().eq_ignore_ascii_case(b"trailers") {
                return;
            }
        }
    }
    let mut nominated: Vec<HeaderName> = Vec::new();
    if present & CONNECTION != 0 {
        for v in headers.get_all(header::CONNECTION) {
            let Ok(v) = v.to_str() else { continue };
            for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                if name.eq_ignore_ascii_case("close")
                    || name.eq_ignore_ascii_case("te")
                    || HOP_BY_HOP
                        .iter()
                        .any(|h| name.eq_ignore_ascii_case(h.as_str()))
                {
                    // Not a header, kept on purpose, or removed below anyway.
                    continue;
                }
                if let Ok(n) = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
                    nominated.push(n);
                }
            }
        }
    }
    for n in &nominated {
        headers.remove(n);
    }
    let te_trailers = present & TE != 0
        && headers.get_all(header::TE).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
        });
    for (i, h) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) == 0
            || (keep_upgrade && (h == header::CONNECTION || h == header::UPGRADE))
        {
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

/// Appends `via` to a message's `via` header as Envoy does: one field, values joined by `, `.
pub fn append_via(headers: &mut HeaderMap, via: &HeaderValue) {
    match headers.entry(header::VIA) {
        header::Entry::Vacant(e) => {
            e.insert(via.clone());
        }
        header::Entry::Occupied(mut e) => {
            let mut joined = Vec::new();
            for v in e.iter() {
                joined.extend_from_slice(v.as_bytes());
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(via.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&joined) {
                e.insert(v);
            }
        }
    }
}

/// Whether `headers` say gRPC (`content-type: application/grpc…`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Whether a request is gRPC: the connection manager's reading in its [`RequestInfo`], or
/// (a request that did not come through it) its headers.
pub fn request_is_grpc<B>(req: &http::Request<B>) -> bool {
    match req.extensions().get::<mecha_filters::RequestInfo>() {
        Some(i) => i.grpc,
        None => is_grpc(req.headers()),
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
    let bytes = bytes::Bytes::copy_from_slice(&uuid_v4_bytes());
    // SAFETY: lowercase hex digits and dashes only, all valid in a header value.
    unsafe { HeaderValue::from_maybe_shared_unchecked(bytes) }
}

/// A decimal header value. Small values (service times in ms, attempt counts) come from a
/// table of static values built once, and each thread remembers its last larger value (the
/// route timeout, usually the same for every request), so the hot path seldom formats or
/// allocates.
pub fn number_header(n: u64) -> HeaderValue {
    const CACHED: usize = 1024;
    static TABLE: std::sync::OnceLock<Box<[HeaderValue]>> = std::sync::OnceLock::new();
    thread_local! {
        static LAST: std::cell::RefCell<(u64, HeaderValue)> =
            const { std::cell::RefCell::new((0, HeaderValue::from_static("0"))) };
    }
    if n as usize >= CACHED {
        return LAST.with(|last| {
            let mut last = last.borrow_mut();
            if last.0 != n {
                *last = (n, HeaderValue::from(n));
            }
            last.1.clone()
        });
    }
    let table = TABLE.get_or_init(|| {
        let mut text = String::with_capacity(CACHED * 5);
        let mut ends = Vec::with_capacity(CACHED);
        for i in 0..CACHED {
            use std::fmt::Write;
            let _ = write!(text, "{i}");
            ends.push(text.len());
        }
        // Leaked once so each value can be a zero-copy static slice.
        let text: &'static str = Box::leak(text.into_boxed_str());
        let mut start = 0;
        ends.into_iter()
            .map(|end| {
                let v = HeaderValue::from_static(&text[start..end]);
                start = end;
                v
            })
            .collect()
    });
    table[n as usize].clone()
}

thread_local! {
    static FAST_RNG: std::cell::RefCell<rand::rngs::SmallRng> =
        std::cell::RefCell::new(<rand::rngs::SmallRng as rand::SeedableRng>::from_rng(&mut rand::rng()));
}

fn uuid_v4_bytes() -> [u8; 36] {
    use rand::RngCore;
    /// Each byte's two hex digits, so a byte is one lookup and one two-byte store.
    const PAIRS: [[u8; 2]; 256] = {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut t = [[0u8; 2]; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = [HEX[i >> 4], HEX[i & 0x0f]];
            i += 1;
        }
        t
    };
    /// Where each byte's digits go in `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    const AT: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];
    // Request ids need uniqueness, not secrecy: a per-thread xoshiro seeded from the OS is a
    // fraction of the cost of the reseeding ChaCha `ThreadRng`.
    let (hi, lo) = FAST_RNG.with(|r| {
        let mut r = r.borrow_mut();
        (r.next_u64(), r.next_u64())
    });
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&hi.to_le_bytes());
    b[8..].copy_from_slice(&lo.to_le_bytes());
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut out = [b'-'; 36];
    for (x, at) in b.iter().zip(AT) {
        out[at..at + 2].copy_from_slice(&PAIRS[*x as usize]);
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

    #[test]
    fn number_headers() {
        for n in [0, 7, 1023, 1024, 15000, 15000, 99_999, u64::MAX, 3] {
            assert_eq!(super::number_header(n), n.to_string().as_str());
        }
    }

    #[test]
    fn strips_hop_by_hop_and_nominated_headers() {
        use http::header::{HeaderMap, HeaderValue};
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret, close"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("te", HeaderValue::from_static("gzip, trailers"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        super::strip_hop_by_hop(&mut h, false);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["te", "x-keep"]);
        assert_eq!(h["te"], "trailers");

        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        super::strip_hop_by_hop(&mut h, true);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");

        let mut h = HeaderMap::new();
        h.insert("x-keep", HeaderValue::from_static("1"));
        super::strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);

        // `te` alone: `trailers` stays (gRPC's case, untouched), anything else goes.
        for (te, kept) in [
            (&["trailers"][..], Some("trailers")),
            (&["Trailers"], Some("Trailers")),
            (&["gzip"], None),
            (&["trailers", "gzip"], Some("trailers")),
            (&["deflate", "gzip"], None),
        ] {
            let mut h = HeaderMap::new();
            for v in te {
                h.append("te", HeaderValue::from_static(v));
            }
            super::strip_hop_by_hop(&mut h, false);
            let got: Vec<_> = h.get_all("te").iter().collect();
            match kept {
                Some(v) => assert_eq!(got, [v], "{te:?}"),
                None => assert!(got.is_empty(), "{te:?}"),
            }
        }
    }
}
