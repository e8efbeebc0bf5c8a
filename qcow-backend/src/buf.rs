//! Page-aligned I/O buffers.
//!
//! Reads into page-aligned memory are several times faster than into
//! arbitrary heap buffers (the imago evaluation measured 7.2 GB/s against
//! 1.6 GB/s, the kernel's copy loop dominating), and O_DIRECT needs them.
//! Alignment is done in safe code: over-allocate by a page and use the
//! aligned window; `Bytes::from_owner` keeps the allocation alive.

use bytes::Bytes;

const PAGE: usize = 4096;

/// A zero-filled buffer of `len` bytes whose start is page aligned.
#[derive(Debug)]
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// Allocate `len` zeroed bytes, page aligned.
    pub fn zeroed(len: usize) -> Self {
        // calloc-backed: large allocations come as fresh zero pages, so the
        // zero fill costs nothing until the kernel writes into them.
        let storage = vec![0u8; len + PAGE];
        let start = storage.as_ptr().align_offset(PAGE).min(PAGE);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    /// The aligned window.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }

    /// Freeze into `Bytes` without copying.
    pub fn freeze(self) -> Bytes {
        let (start, len) = (self.start, self.len);
        Bytes::from_owner(self.storage).slice(start..start + len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_is_page_aligned_and_sized() {
        for len in [0, 1, 4096, 100_000, 1 << 20] {
            let mut b = AlignedBuf::zeroed(len);
            let s = b.as_mut_slice();
            assert_eq!(s.len(), len);
            assert_eq!(s.as_ptr() as usize % PAGE, 0);
            let frozen = b.freeze();
            assert_eq!(frozen.len(), len);
            assert_eq!(frozen.as_ptr() as usize % PAGE, 0);
        }
    }
}
