//! READ data moved from read-only layer files into pipes
//! ([`nbd_server::splice`]): the page-cache pages go to the client's socket
//! without being copied into a buffer and out of it again.

use std::fs::File;
use std::sync::Arc;

use nbd_server::splice::{pages_spanned, PipeFill, Piped, MAX_PIPE_PAGES, PIPE_PAGE};

use crate::cached_read::{read_cached, Cached};

/// Smallest read worth a pipe: below it the two splices cost more than
/// the copies they save (4 KiB random reads measured no better).
pub const MIN_SPLICED: u64 = 64 << 10;

/// One run of plain data in a read-only layer file.
pub struct FileRun<'a> {
    /// The layer's own descriptor.
    pub file: &'a Arc<File>,
    /// Where in the file.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
}

/// The runs, in order, as pipes of at most [`MAX_PIPE_PAGES`] slots each; `None`
/// when any of it cannot go that way (a run's last page not in the page
/// cache, no pipe to be had, a short file, an unaligned run that fills the
/// pipe early): the caller then reads the runs into a buffer, which
/// handles every one of those cases.
///
/// Only the last page of each run is probed: the kernel's read-ahead and
/// ours fill a run front to back, so its last page is the one most likely
/// missing. A page missed anyway is read on this thread, as a plain
/// `pread` would; the pool moves other work off a stalled thread.
pub fn splice_runs(runs: &[FileRun<'_>]) -> Option<Vec<Piped>> {
    for r in runs {
        let last = r.offset.checked_add(r.len.checked_sub(1)?)?;
        match read_cached(r.file, &mut [0u8; 1], last) {
            Cached::Read(1) => {}
            // No way to ask (tmpfs without RWF_NOWAIT): the buffered
            // read would block this thread just the same.
            Cached::Unsupported => {}
            Cached::Read(_) => return None,
        }
    }
    let mut pieces = Vec::new();
    for piece in plan_pieces(runs) {
        let pages = piece.iter().map(|(_, o, n)| pages_spanned(*o, *n)).sum();
        let mut fill = PipeFill::new(pages)?;
        for (file, offset, len) in piece {
            fill.append(&**file, offset, usize::try_from(len).ok()?)
                .ok()?;
        }
        pieces.push(fill.finish());
    }
    Some(pieces)
}

/// The runs cut into pieces of at most [`MAX_PIPE_PAGES`] pipe slots each
/// (a piece of a run that does not start on a page boundary takes a slot
/// more than its bytes fill): (file, offset, length) per part, in order.
fn plan_pieces<'a>(runs: &[FileRun<'a>]) -> Vec<Vec<(&'a Arc<File>, u64, u64)>> {
    let mut pieces = vec![Vec::new()];
    let mut used = 0;
    for r in runs {
        let (mut offset, mut len) = (r.offset, r.len);
        while len > 0 {
            if used == MAX_PIPE_PAGES {
                pieces.push(Vec::new());
                used = 0;
            }
            // Up to the page boundary where this piece's slots run out.
            let limit = (offset / PIPE_PAGE + (MAX_PIPE_PAGES - used)) * PIPE_PAGE - offset;
            let take = len.min(limit);
            used += pages_spanned(offset, take);
            if let Some(piece) = pieces.last_mut() {
                piece.push((r.file, offset, take));
            }
            offset += take;
            len -= take;
        }
    }
    pieces.retain(|p| !p.is_empty());
    pieces
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn file_of(data: &[u8]) -> (tempfile::NamedTempFile, Arc<File>) {
        let mut t = tempfile::NamedTempFile::new().unwrap();
        t.write_all(data).unwrap();
        let f = Arc::new(File::open(t.path()).unwrap());
        (t, f)
    }

    fn drain(pieces: Vec<Piped>) -> Vec<u8> {
        pieces
            .into_iter()
            .flat_map(|p| p.into_bytes().unwrap().to_vec())
            .collect()
    }

    #[test]
    fn runs_across_files_split_into_pipe_sized_pieces_in_order() {
        let a: Vec<u8> = (0..3 << 20).map(|i: usize| (i % 251) as u8).collect();
        let b: Vec<u8> = (0..1 << 20).map(|i: usize| (i % 13) as u8 + 1).collect();
        let (_ta, fa) = file_of(&a);
        let (_tb, fb) = file_of(&b);
        let runs = [
            FileRun {
                file: &fa,
                offset: 64 << 10,
                len: 1536 << 10,
            },
            FileRun {
                file: &fb,
                offset: 0,
                len: 128 << 10,
            },
            FileRun {
                file: &fa,
                offset: 2 << 20,
                len: 512 << 10,
            },
        ];
        let pieces = splice_runs(&runs).expect("written pages are cached");
        let lens: Vec<usize> = pieces.iter().map(Piped::len).collect();
        assert_eq!(lens, vec![1 << 20, 1 << 20, 128 << 10]);
        let mut want = a[64 << 10..1600 << 10].to_vec();
        want.extend_from_slice(&b[..128 << 10]);
        want.extend_from_slice(&a[2 << 20..(2 << 20) + (512 << 10)]);
        assert!(drain(pieces) == want, "pieces hold other bytes");
    }

    #[test]
    fn unaligned_runs_are_cut_where_the_pipe_slots_run_out() {
        let (_t, f) = file_of(&[1u8; 4096]);
        let runs = [
            FileRun {
                file: &f,
                offset: 512,
                len: (1 << 20) - 512,
            },
            FileRun {
                file: &f,
                offset: 8192 + 100,
                len: 3 << 20,
            },
        ];
        let pieces = plan_pieces(&runs);
        let slots: Vec<u64> = pieces
            .iter()
            .map(|p| p.iter().map(|(_, o, n)| pages_spanned(*o, *n)).sum())
            .collect();
        assert!(slots.iter().all(|s| *s <= MAX_PIPE_PAGES), "{slots:?}");
        let parts: Vec<(u64, u64)> = pieces.iter().flatten().map(|(_, o, n)| (*o, *n)).collect();
        // The first run fills one pipe exactly; the second starts 100 bytes
        // into a page and is cut on page boundaries.
        assert_eq!(parts[0], (512, (1 << 20) - 512));
        assert_eq!(parts[1], (8292, (1 << 20) - 100));
        let total: u64 = parts.iter().map(|p| p.1).sum();
        assert_eq!(total, (1 << 20) - 512 + (3 << 20), "bytes lost or added");
        let mut at = 8292;
        for (o, n) in &parts[1..] {
            assert_eq!(*o, at, "parts not contiguous");
            at += n;
        }
    }

    #[test]
    fn a_run_past_the_end_of_its_file_is_refused() {
        let (_t, f) = file_of(&[7u8; 64 << 10]);
        let runs = [FileRun {
            file: &f,
            offset: 32 << 10,
            len: 64 << 10,
        }];
        assert!(splice_runs(&runs).is_none());
    }
}
