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

use bytes::Bytes;
use memmap2::MmapMut;

/// Buffers at least this large are memory maps of their own.
pub const MAP_THRESHOLD: usize = 1 << 20;

const PAGE: usize = 4096;

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
        matches!(self.storage, Storage::Mapped(_))
    }

    /// The aligned window.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let (start, len) = (self.start, self.len);
        match &mut self.storage {
            Storage::Heap(v) => &mut v[start..start + len],
            Storage::Mapped(m) => &mut m[start..start + len],
        }
    }

    /// Freeze into `Bytes` without copying; the memory goes when the last
    /// `Bytes` referring to it does.
    pub fn freeze(self) -> Bytes {
        let (start, len) = (self.start, self.len);
        match self.storage {
            Storage::Heap(v) => Bytes::from_owner(v).slice(start..start + len),
            Storage::Mapped(m) => Bytes::from_owner(m).slice(start..start + len),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
