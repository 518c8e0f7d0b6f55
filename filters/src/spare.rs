//! Per-thread reuse of the header maps and extensions of finished messages.
//!
//! Every HTTP/1.1 message the proxy parses gets a header map, and every request gets
//! extensions (the connection manager inserts its `RequestInfo`). A fresh map is two
//! allocations of over a kilobyte, a fresh `Extensions` a boxed hash map with its own table:
//! glibc serves those from its slow path, consolidating its fast bins first. The codecs hand
//! the maps and extensions of messages they are done with back here, cleared, and take the
//! next ones from here. A filter that answers a request itself (the runtime API) does the
//! same with the request it consumed ([`recycle_request`]) and builds its reply in a spare map
//! ([`response`]), so a locally answered request allocates no map either.

use http::{HeaderMap, Request, Response};
use std::cell::RefCell;

/// Maps kept per thread (enough for the messages of ~64 requests in flight, at ~1.3 KiB
/// each), and the largest one worth keeping.
const SPARE_MAPS: usize = 128;
const SPARE_MAX_CAPACITY: usize = 48;

/// Room a reply map is made with: the filter's few fields plus what the connection manager
/// adds (`date`, `server`, `content-length`, `x-request-id`, route headers) without growing.
const REPLY_FIELDS: usize = 12;

thread_local! {
    static MAPS: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
    static EXTENSIONS: RefCell<Vec<http::Extensions>> = const { RefCell::new(Vec::new()) };
}

type Spares<T> = std::thread::LocalKey<RefCell<Vec<T>>>;

/// A spare from `spares`, if this thread has one (and is not being torn down).
fn take<T: 'static>(spares: &'static Spares<T>) -> Option<T> {
    spares.try_with(|s| s.borrow_mut().pop()).ok().flatten()
}

/// Keeps `spare` for reuse, up to [`SPARE_MAPS`] per thread.
fn give<T: 'static>(spares: &'static Spares<T>, spare: T) {
    let _ = spares.try_with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < SPARE_MAPS {
            s.push(spare);
        }
    });
}

/// Empty request extensions, with a recycled map when this thread has one.
pub fn extensions() -> http::Extensions {
    take(&EXTENSIONS).unwrap_or_default()
}

/// Takes back the extensions of a message that is done with them (see [`extensions`]).
pub fn recycle_extensions(mut ext: http::Extensions) {
    if ext.is_empty() {
        // Never used (no map allocated), or already cleared: nothing worth keeping.
        return;
    }
    ext.clear();
    give(&EXTENSIONS, ext);
}

/// An empty header map with room for `n` fields: a recycled one when this thread has one.
pub fn header_map(n: usize) -> HeaderMap {
    match take(&MAPS) {
        Some(mut m) => {
            // A spare too small is grown rather than dropped: dropping it and allocating anew
            // would cost a free and a malloc.
            if m.capacity() < n {
                m.reserve(n);
            }
            m
        }
        None => HeaderMap::with_capacity(n),
    }
}

/// Takes back the map of a message that is done with it (see [`header_map`]).
pub fn recycle(mut map: HeaderMap) {
    // An empty map without room (a message whose headers were moved out) is not worth keeping.
    if map.capacity() == 0 || map.capacity() > SPARE_MAX_CAPACITY {
        return;
    }
    map.clear();
    give(&MAPS, map);
}

/// Takes back the head of a request a filter has consumed (its body is dropped).
pub fn recycle_request<B>(req: Request<B>) {
    let (parts, _) = req.into_parts();
    recycle(parts.headers);
    recycle_extensions(parts.extensions);
}

/// A response with `body` whose header map is a spare with room for a local reply's fields.
pub fn response<B>(body: B) -> Response<B> {
    let mut r = Response::new(body);
    *r.headers_mut() = header_map(REPLY_FIELDS);
    r
}

/// A map handed to [`recycle`] when dropped: for headers kept across awaits with several exits.
pub struct RecycleOnDrop(pub HeaderMap);

impl Drop for RecycleOnDrop {
    fn drop(&mut self) {
        recycle(std::mem::take(&mut self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn extensions_are_recycled_empty() {
        let mut e = extensions();
        e.insert(7u32);
        recycle_extensions(e);
        let again = extensions();
        assert!(again.is_empty());
        assert!(again.get::<u32>().is_none());
    }

    #[test]
    fn a_consumed_request_gives_back_its_head() {
        let mut req = Request::new(());
        req.headers_mut()
            .insert("x-a", http::HeaderValue::from_static("1"));
        req.extensions_mut().insert(1u8);
        recycle_request(req);
        let reply = response(());
        assert!(reply.headers().is_empty());
        assert!(reply.headers().capacity() >= REPLY_FIELDS);
        assert!(extensions().is_empty());
    }
}
