//! One static page of zeroes, for every place that must send zeroes as
//! data. It lives in .bss: it costs no memory until read, and reading it
//! maps the kernel's shared zero page.

use bytes::Bytes;

static ZEROES: [u8; 1 << 20] = [0; 1 << 20];

/// `n` zero bytes as `Bytes` segments borrowing the static page (no copy,
/// no allocation beyond the segment list).
pub(crate) fn zero_segments(mut n: u64) -> impl Iterator<Item = Bytes> {
    std::iter::from_fn(move || {
        if n == 0 {
            return None;
        }
        let take = n.min(ZEROES.len() as u64) as usize;
        n -= take as u64;
        Some(Bytes::from_static(&ZEROES[..take]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cover_exactly() {
        let v: Vec<Bytes> = zero_segments((3 << 20) + 5).collect();
        assert_eq!(v.len(), 4);
        assert_eq!(v.iter().map(Bytes::len).sum::<usize>(), (3 << 20) + 5);
        assert_eq!(zero_segments(0).count(), 0);
    }
}
