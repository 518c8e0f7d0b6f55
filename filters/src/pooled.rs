//! Per-thread reuse of the memory of large boxed futures.
//!
//! Every proxied request boxes the router's future (several KiB) and a request to the runtime
//! API boxes the filter's (about 5 KiB). glibc serves requests of that size from its large bins,
//! and before it does, it consolidates every chunk parked in its fast bins: with tens of
//! requests in flight those are many, and `malloc_consolidate` plus `_int_malloc` became a
//! tenth of the runtime API path's CPU time. The blocks of finished futures are kept here per
//! thread, by size class (512-byte steps: a future's block wastes at most 511 bytes), and handed to the next future of that class, so the
//! steady state makes no large allocation at all. Small futures are boxed as usual (glibc's
//! thread cache serves those well).

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::ptr::NonNull;
use std::task::{Context, Poll};

/// Futures this big or bigger use pooled blocks.
pub(crate) const MIN_POOLED: usize = 1024;
/// Block sizes are multiples of this, up to `CLASSES` of them (32 KiB). Larger futures are
/// boxed as usual.
const STEP: usize = 512;
const CLASSES: usize = 64;
/// glibc's own alignment: a larger one would go through its memalign path, which splits and
/// fragments. Futures that need more are boxed as usual.
const BLOCK_ALIGN: usize = 16;
/// Blocks kept per class and thread: enough for the requests of a busy connection set, while
/// bounding what an idle worker keeps (~1 MiB for the router's 6.5 KiB class).
const KEEP: usize = 128;

/// Class `c` holds blocks of `(c + 1) * STEP` bytes.
fn class_of(size: usize) -> Option<usize> {
    let class = size.max(1).div_ceil(STEP) - 1;
    (class < CLASSES).then_some(class)
}

fn layout(class: usize) -> Layout {
    // A multiple of 512 up to 32 KiB, aligned to 16: always a valid layout.
    Layout::from_size_align((class + 1) * STEP, BLOCK_ALIGN).expect("valid block layout")
}

struct Cache([Vec<NonNull<u8>>; CLASSES]);

impl Drop for Cache {
    fn drop(&mut self) {
        for (class, blocks) in self.0.iter_mut().enumerate() {
            for b in blocks.drain(..) {
                // SAFETY: allocated with this class's layout and owned by the cache.
                unsafe { dealloc(b.as_ptr(), layout(class)) };
            }
        }
    }
}

thread_local! {
    static CACHE: RefCell<Cache> = const { RefCell::new(Cache([const { Vec::new() }; CLASSES])) };
}

fn take_block(class: usize) -> NonNull<u8> {
    if let Some(b) = CACHE
        .try_with(|c| c.borrow_mut().0[class].pop())
        .ok()
        .flatten()
    {
        return b;
    }
    let layout = layout(class);
    // SAFETY: the layout has a non-zero size.
    let p = unsafe { alloc(layout) };
    NonNull::new(p).unwrap_or_else(|| handle_alloc_error(layout))
}

fn give_block(class: usize, block: NonNull<u8>) {
    let kept = CACHE
        .try_with(|c| {
            let mut c = c.borrow_mut();
            let blocks = &mut c.0[class];
            if blocks.len() < KEEP {
                blocks.push(block);
                true
            } else {
                false
            }
        })
        .unwrap_or(false);
    if !kept {
        // SAFETY: allocated with this class's layout, and no longer used.
        unsafe { dealloc(block.as_ptr(), layout(class)) };
    }
}

/// A future living in a pooled block; its block goes back to the pool of the thread that
/// drops it (any thread's pool can take any block: they are plain allocations of the class's
/// layout).
pub struct Pooled<F> {
    fut: NonNull<F>,
    class: usize,
}

// SAFETY: `Pooled` owns its `F` exactly as a `Box<F>` would.
unsafe impl<F: Send> Send for Pooled<F> {}

impl<F: Future> Pooled<F> {
    /// Builds `make()` straight into a block (no copy of the future through the stack), or
    /// `None` when `F` is not a size or alignment the pool serves.
    pub(crate) fn new_in_place(make: impl FnOnce() -> F) -> Result<Self, impl FnOnce() -> F> {
        let size = std::mem::size_of::<F>();
        let class = match class_of(size) {
            Some(c) if size >= MIN_POOLED && std::mem::align_of::<F>() <= BLOCK_ALIGN => c,
            _ => return Err(make),
        };
        let fut = take_block(class).cast::<F>();
        // SAFETY: the block is large and aligned enough for `F`, and not used by anything else.
        unsafe { fut.as_ptr().write(make()) };
        Ok(Pooled { fut, class })
    }
}

impl<F: Future> Future for Pooled<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: the future never moves: it stays in its block until it is dropped in place.
        unsafe { Pin::new_unchecked(&mut *self.fut.as_ptr()) }.poll(cx)
    }
}

impl<F> Drop for Pooled<F> {
    fn drop(&mut self) {
        // SAFETY: `fut` holds an initialised `F`, dropped exactly once here.
        unsafe { std::ptr::drop_in_place(self.fut.as_ptr()) };
        give_block(self.class, self.fut.cast());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn classes() {
        assert_eq!(class_of(1024), Some(1));
        assert_eq!(class_of(1025), Some(2));
        assert_eq!(class_of(6656), Some(12));
        assert_eq!(layout(12).size(), 6656);
        assert_eq!(class_of(32 * 1024), Some(63));
        assert_eq!(class_of(32 * 1024 + 1), None);
        for size in [1024, 1500, 5168, 6656, 32 * 1024] {
            let l = layout(class_of(size).unwrap());
            assert!(l.size() >= size && l.size() < size + STEP, "{size}");
        }
    }

    struct Big {
        data: [u8; 5000],
        dropped: Arc<AtomicUsize>,
    }
    impl Drop for Big {
        fn drop(&mut self) {
            self.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn runs_drops_and_reuses_blocks() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let make = |n: u8| {
            let big = Big {
                data: [n; 5000],
                dropped: dropped.clone(),
            };
            async move { big.data.iter().map(|&b| b as usize).sum::<usize>() }
        };
        let Ok(a) = Pooled::new_in_place(|| make(1)) else {
            panic!("a 5 KB future is pooled")
        };
        let first = a.fut.cast::<u8>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(rt.block_on(a), 5000);
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
        // The block came back and the next future of the class gets it.
        let Ok(b) = Pooled::new_in_place(|| make(2)) else {
            panic!("pooled")
        };
        assert_eq!(b.fut.cast::<u8>(), first);
        // Dropped before completion: the future's state is still dropped.
        drop(b);
        assert_eq!(dropped.load(Ordering::SeqCst), 2);
        // Small futures are not pooled.
        assert!(Pooled::new_in_place(|| async { 1 }).is_err());
    }
}
