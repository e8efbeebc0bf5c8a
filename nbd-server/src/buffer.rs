//! Page-aligned data buffers for READ replies.
//!
//! Page alignment makes reads into them fast and is what O_DIRECT needs.
//! Buffers of [`MAP_THRESHOLD`] bytes or more are anonymous memory maps of
//! their own, so dropping one returns its memory to the OS at once, on any
//! thread, whatever the allocator. Heap buffers of that size are what kept
//! the process at hundreds of MiB after a burst of clients: glibc serves
//! them from per-thread arenas it rarely trims, and mimalloc keeps them in
//! the heaps of live threads. Smaller buffers come from the heap (reused
//! without page faults). WRITE payloads stay on the heap (see
//! `net::request_reader`): there the faults of a fresh map per request
//! cost too much throughput.
//!
//! A backend that overwrites every byte it returns asks for
//! [`PageBuf::for_overwrite`]: buffers of the common read sizes then
//! come back to a small process-wide pool when the reply is sent and are
//! handed out again without being zeroed (no allocation, no memset, no
//! page faults per read). The pool holds at most [`RECYCLE_LIMIT`] bytes.
//! Maps up to [`RECYCLE_MAX`] are recycled as well: qemu's client reads
//! 2 MiB at a time, and a fresh map per read cost 512 page faults (each
//! zeroing a page) before the data was even copied in.

use std::sync::Mutex;

use bytes::Bytes;
use memmap2::MmapMut;

/// Buffers at least this large are memory maps of their own.
pub const MAP_THRESHOLD: usize = 1 << 20;

const PAGE: usize = 4096;

/// Most bytes the recycling pool keeps (the rest is freed as usual).
pub const RECYCLE_LIMIT: usize = 16 << 20;
/// Smallest buffer worth recycling (below it the allocator is as quick).
const RECYCLE_MIN: usize = 32 << 10;
/// Largest size class recycled (qemu's 2 MiB reads; nbdcopy's are smaller).
pub const RECYCLE_MAX: usize = 4 << 20;

/// Pooled memory: heap buffers below [`MAP_THRESHOLD`] (`class + PAGE`
/// bytes, the aligned window inside), maps of exactly `class` bytes above.
#[derive(Debug)]
enum Mem {
    Heap(Vec<u8>),
    Map(MmapMut),
}

impl Mem {
    fn size(&self) -> usize {
        match self {
            Mem::Heap(v) => v.len(),
            Mem::Map(m) => m.len(),
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Mem::Heap(v) => v,
            Mem::Map(m) => m,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            Mem::Heap(v) => v,
            Mem::Map(m) => m,
        }
    }

    /// Where the page-aligned window starts.
    fn start(&self) -> usize {
        self.as_slice().as_ptr().align_offset(PAGE).min(PAGE)
    }
}

/// Free buffers by size class (a power of two from [`RECYCLE_MIN`] to
/// [`RECYCLE_MAX`]) and their total size.
struct Recycler {
    free: Vec<(usize, Vec<Mem>)>,
    bytes: usize,
}

static RECYCLER: Mutex<Recycler> = Mutex::new(Recycler {
    free: Vec::new(),
    bytes: 0,
});

/// The size class of `len`, if buffers of it are recycled.
fn class_of(len: usize) -> Option<usize> {
    let class = len.checked_next_power_of_two()?;
    (RECYCLE_MIN..=RECYCLE_MAX)
        .contains(&class)
        .then_some(class)
}

/// New memory for `class` (zeroed: fresh).
fn fresh(class: usize) -> Mem {
    if class >= MAP_THRESHOLD {
        if let Ok(m) = MmapMut::map_anon(class) {
            return Mem::Map(m);
        }
    }
    Mem::Heap(vec![0u8; class + PAGE])
}

fn take_recycled(class: usize) -> Option<Mem> {
    let mut r = RECYCLER.lock().ok()?;
    let v = r
        .free
        .iter_mut()
        .find(|(c, _)| *c == class)
        .and_then(|(_, list)| list.pop())?;
    r.bytes -= v.size();
    Some(v)
}

fn give_back(class: usize, v: Mem) {
    let Ok(mut r) = RECYCLER.lock() else {
        return;
    };
    if v.size() == 0 || r.bytes + v.size() > RECYCLE_LIMIT {
        return;
    }
    r.bytes += v.size();
    match r.free.iter_mut().find(|(c, _)| *c == class) {
        Some((_, list)) => list.push(v),
        None => r.free.push((class, vec![v])),
    }
}

/// A recycled heap buffer owned by a reply: back to the pool on drop.
struct Recycled {
    class: usize,
    v: Mem,
}

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        self.v.as_slice()
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        give_back(
            self.class,
            std::mem::replace(&mut self.v, Mem::Heap(Vec::new())),
        );
    }
}

/// A zero-filled buffer of `len` bytes whose start is page aligned.
#[derive(Debug)]
pub struct PageBuf {
    storage: Storage,
    start: usize,
    len: usize,
}

#[derive(Debug)]
enum Storage {
    Heap(Vec<u8>),
    /// Memory of this size class that goes back to the pool.
    Recycled(usize, Mem),
    Mapped(MmapMut),
}

impl PageBuf {
    /// Allocate `len` zeroed bytes, page aligned.
    pub fn zeroed(len: usize) -> Self {
        if len >= MAP_THRESHOLD {
            // Fresh anonymous pages are zero; if mapping fails, the heap
            // still works.
            if let Ok(map) = MmapMut::map_anon(len) {
                return PageBuf {
                    storage: Storage::Mapped(map),
                    start: 0,
                    len,
                };
            }
        }
        // Over-allocate by a page and use the aligned window (safe code).
        let storage = vec![0u8; len + PAGE];
        let start = storage.as_ptr().align_offset(PAGE).min(PAGE);
        PageBuf {
            storage: Storage::Heap(storage),
            start,
            len,
        }
    }

    /// A page-aligned buffer of `len` bytes whose contents are
    /// unspecified (bytes of an earlier reply, or zeroes): for callers that
    /// overwrite all of it before it is sent. Buffers of the common read
    /// sizes are recycled (see the module documentation).
    pub fn for_overwrite(len: usize) -> Self {
        let Some(class) = class_of(len) else {
            return Self::zeroed(len);
        };
        let storage = take_recycled(class).unwrap_or_else(|| fresh(class));
        let start = storage.start();
        PageBuf {
            storage: Storage::Recycled(class, storage),
            start,
            len,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the buffer is a memory map of its own.
    pub fn is_mapped(&self) -> bool {
        matches!(
            self.storage,
            Storage::Mapped(_) | Storage::Recycled(_, Mem::Map(_))
        )
    }

    /// The aligned window.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let (start, len) = (self.start, self.len);
        match &mut self.storage {
            Storage::Heap(v) => &mut v[start..start + len],
            Storage::Recycled(_, m) => &mut m.as_mut_slice()[start..start + len],
            Storage::Mapped(m) => &mut m[start..start + len],
        }
    }

    /// Freeze into `Bytes` without copying; the memory goes when the last
    /// `Bytes` referring to it does.
    pub fn freeze(mut self) -> Bytes {
        let (start, len) = (self.start, self.len);
        // Taken out (Drop would otherwise give a recycled buffer back).
        match std::mem::replace(&mut self.storage, Storage::Heap(Vec::new())) {
            Storage::Heap(v) => Bytes::from_owner(v).slice(start..start + len),
            Storage::Recycled(class, v) => {
                Bytes::from_owner(Recycled { class, v }).slice(start..start + len)
            }
            Storage::Mapped(m) => Bytes::from_owner(m).slice(start..start + len),
        }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        // A recycled buffer dropped before it was frozen (a failed read).
        if let Storage::Recycled(class, v) = &mut self.storage {
            give_back(*class, std::mem::replace(v, Mem::Heap(Vec::new())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pool is process-wide: its tests take turns, each on an empty pool.
    fn empty_pool() -> std::sync::MutexGuard<'static, ()> {
        static TURN: Mutex<()> = Mutex::new(());
        let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let mut r = RECYCLER.lock().unwrap();
        r.free.clear();
        r.bytes = 0;
        turn
    }

    #[test]
    fn recycled_buffers_come_back_and_the_pool_stays_bounded() {
        let _turn = empty_pool();
        let len = 256 << 10;
        let mut b = PageBuf::for_overwrite(len);
        assert!(!b.is_mapped());
        let s = b.as_mut_slice();
        assert_eq!(s.len(), len);
        assert_eq!(s.as_ptr() as usize % PAGE, 0);
        s.fill(9);
        let frozen = b.freeze();
        assert_eq!(frozen.as_ptr() as usize % PAGE, 0);
        assert!(frozen.iter().all(|x| *x == 9));
        let addr = frozen.as_ptr() as usize;
        drop(frozen);
        // Nothing else in this process asks for recycled buffers: the same
        // memory is handed out again, not zeroed.
        let mut again = PageBuf::for_overwrite(len);
        assert_eq!(again.as_mut_slice().as_ptr() as usize, addr);
        assert!(again.as_mut_slice().iter().all(|x| *x == 9));
        // Dropped unfrozen (a failed read): back to the pool as well.
        drop(again);
        assert_eq!(
            PageBuf::for_overwrite(len).as_mut_slice().as_ptr() as usize,
            addr
        );
        // However many come back, the pool keeps at most RECYCLE_LIMIT.
        let many: Vec<Bytes> = (0..(2 * RECYCLE_LIMIT / len))
            .map(|_| PageBuf::for_overwrite(len).freeze())
            .collect();
        drop(many);
        assert!(RECYCLER.lock().unwrap().bytes <= RECYCLE_LIMIT);
        // Sizes outside the recycled classes are plain zeroed buffers.
        let mut small = PageBuf::for_overwrite(4096);
        assert!(small.as_mut_slice().iter().all(|x| *x == 0));
        let mut big = PageBuf::for_overwrite(RECYCLE_MAX + 1);
        assert!(big.is_mapped());
        assert!(big.as_mut_slice().iter().all(|x| *x == 0));
    }

    #[test]
    fn mapped_read_buffers_are_recycled_too() {
        let _turn = empty_pool();
        // qemu's 2 MiB reads: a map, page aligned, handed out again.
        let len = (2 << 20) - 4096;
        let mut b = PageBuf::for_overwrite(len);
        assert!(b.is_mapped());
        assert_eq!(b.as_mut_slice().len(), len);
        b.as_mut_slice().fill(5);
        let frozen = b.freeze();
        assert_eq!(frozen.as_ptr() as usize % PAGE, 0);
        let addr = frozen.as_ptr() as usize;
        drop(frozen);
        let mut again = PageBuf::for_overwrite(len);
        assert_eq!(again.as_mut_slice().as_ptr() as usize, addr);
        assert!(
            again.as_mut_slice().iter().all(|x| *x == 5),
            "not zeroed again"
        );
        drop(again);
        // Bounded like the heap classes.
        let many: Vec<Bytes> = (0..(2 * RECYCLE_LIMIT / len))
            .map(|_| PageBuf::for_overwrite(len).freeze())
            .collect();
        drop(many);
        assert!(RECYCLER.lock().unwrap().bytes <= RECYCLE_LIMIT);
    }

    #[test]
    fn window_is_page_aligned_zeroed_and_sized() {
        for len in [
            0,
            1,
            4096,
            100_000,
            MAP_THRESHOLD - 1,
            MAP_THRESHOLD,
            3 << 20,
        ] {
            let mut b = PageBuf::zeroed(len);
            assert_eq!(b.is_mapped(), len >= MAP_THRESHOLD, "{len}");
            let s = b.as_mut_slice();
            assert_eq!(s.len(), len);
            assert!(s.iter().all(|x| *x == 0));
            assert_eq!(s.as_ptr() as usize % PAGE, 0);
            if len > 0 {
                s[len - 1] = 7;
            }
            let frozen = b.freeze();
            assert_eq!(frozen.len(), len);
            assert_eq!(frozen.as_ptr() as usize % PAGE, 0);
            if len > 0 {
                assert_eq!(frozen[len - 1], 7);
            }
        }
    }
}
