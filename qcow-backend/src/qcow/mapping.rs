//! Where a disk range's bytes come from: the runs of a read, resolved
//! through the chain once per request ([`map_runs`]), and the layer-file
//! runs a read-ahead hints ([`plan_hints`]).

use std::fs::File as StdFile;
use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use imago::file::File;
use imago::Storage;

use super::layer_walk::{LayerWalk, PieceKind};
use super::Access;
use crate::readahead::ReadAhead;

/// Where one run of a read comes from.
pub(super) enum Source<'a> {
    /// Reads as zeroes (unallocated, zero clusters, past the end).
    Zero,
    /// Plain data at this offset of this layer's file.
    Raw(&'a File, u64),
    /// Anything else (compressed clusters): imago's own read path.
    Other,
}

/// One run of a disk range: where it starts, its length, its source.
pub(super) type Run<'a> = (u64, u64, Source<'a>);

/// The runs the disk range `range` reads from ([`LayerWalk`]): adjacent
/// zero runs merged, and data runs that continue in the same file. Past
/// the end reads as zeroes. On a mapping error, the runs before it and the
/// error.
pub(super) async fn map_runs(a: &Access, range: Range<u64>) -> (Vec<Run<'_>>, Option<io::Error>) {
    let mut runs: Vec<Run<'_>> = Vec::new();
    let mut walk = LayerWalk::new(a, range);
    loop {
        let p = match walk.next().await {
            Ok(Some(p)) => p,
            Ok(None) => return (runs, None),
            Err(e) => return (runs, Some(e)),
        };
        let src = match p.kind {
            PieceKind::Raw(f, host) => Source::Raw(f, host),
            PieceKind::Zero { .. } | PieceKind::Eof => Source::Zero,
            // Compressed clusters: imago reads them by disk offset.
            PieceKind::Special => Source::Other,
        };
        push_run(&mut runs, p.at, p.len, src);
    }
}

/// Append `n` bytes at `at` from `src`, merged into the last run where
/// they continue it.
pub(super) fn push_run<'a>(runs: &mut Vec<Run<'a>>, at: u64, n: u64, src: Source<'a>) {
    match (runs.last_mut(), &src) {
        (Some((_, ln, Source::Zero)), Source::Zero) => *ln += n,
        // The next cluster follows in the same file: one read.
        (Some((_, ln, Source::Raw(f, host))), Source::Raw(g, h))
            if continues(f, *host, *ln, g, *h) =>
        {
            *ln += n
        }
        _ => runs.push((at, n, src)),
    }
}

/// The read-only layer `f`'s own descriptor (opened for read-ahead, page
/// cache probes and reads off imago), if it is one.
pub(super) fn own_descriptor(readahead: &ReadAhead, f: &File) -> Option<Arc<StdFile>> {
    readahead.descriptor(&f.get_filename()?)
}

/// Whether `g` at `h` continues the run of `len` bytes at `host` in `f`.
fn continues(f: &File, host: u64, len: u64, g: &File, h: u64) -> bool {
    std::ptr::eq(f, g) && host.checked_add(len) == Some(h)
}

/// The layer-file runs that the disk range `window` reads from (path,
/// offset in the file, length), runs contiguous in one file merged: what a
/// read-ahead of `window` hints. Zero and compressed clusters have none.
/// Stops early on an error (the read that needs the mapping reports it).
pub(super) async fn plan_hints(a: &Access, window: Range<u64>) -> Vec<(PathBuf, u64, u64)> {
    let (mapped, _) = map_runs(a, window).await;
    let mut runs: Vec<(&File, u64, u64)> = Vec::new();
    for (_, n, src) in mapped {
        let Source::Raw(g, h) = src else {
            continue;
        };
        match runs.last_mut() {
            Some((f, host, ln)) if continues(f, *host, *ln, g, h) => *ln += n,
            _ => runs.push((g, h, n)),
        }
    }
    runs.into_iter()
        .filter_map(|(f, host, n)| Some((f.get_filename()?, host, n)))
        .collect()
}
