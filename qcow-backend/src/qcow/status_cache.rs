//! Block status of read-only images, remembered for `REQ_ONE` requests.
//!
//! qemu's NBD client asks for the status of one extent at a time
//! (`NBD_CMD_FLAG_REQ_ONE`) and waits for each answer before the next:
//! `qemu-img convert` walks the whole disk that way twice (once to count
//! the allocated bytes, once while copying). Every answer that goes to an
//! I/O thread costs two thread wake-ups, which on a busy host is most of
//! the round trip. The mapping of an image nobody writes never changes,
//! so one walk on the I/O thread describes up to
//! [`MAX_STATUS_EXTENTS`](super::status::MAX_STATUS_EXTENTS) extents ahead
//! ([`WINDOW_SPAN`] bytes at most) and the following requests are answered
//! from it on the connection's own task.

use std::sync::Mutex;

use nbd_server::Extent;

/// Most bytes one walk describes ahead of the requested offset (bounds the
/// metadata a first request on a huge image reads).
pub(super) const WINDOW_SPAN: u64 = 64 << 30;
/// Windows kept per image (a few clients, or a few regions, walking at
/// once); the oldest goes first.
const MAX_WINDOWS: usize = 4;

/// Consecutive extents known from one walk.
#[derive(Debug)]
struct Window {
    /// Offset of each extent (ascending, `starts[0]` is the walk's start).
    starts: Vec<u64>,
    extents: Vec<Extent>,
    end: u64,
}

/// The remembered walks of one read-only image.
#[derive(Debug, Default)]
pub(super) struct StatusCache {
    windows: Mutex<Vec<Window>>,
}

impl StatusCache {
    /// The `REQ_ONE` answer at `offset` for a request ending at `end`, if a
    /// remembered walk covers `offset`: its extents from there up to the
    /// first change of `hole`/`zero`, the end of the walk or `end`.
    pub(super) fn first(&self, offset: u64, end: u64) -> Option<Vec<Extent>> {
        let mut windows = self.windows.lock().ok()?;
        let k = windows
            .iter()
            .position(|w| w.starts.first().is_some_and(|s| *s <= offset) && offset < w.end)?;
        // Most recently used first: a sequential walker keeps its window.
        let w = windows.remove(k);
        let i = w.starts.partition_point(|s| *s <= offset).checked_sub(1)?;
        let lead = w.extents.get(i).copied()?;
        let mut out = Vec::new();
        let mut pos = offset;
        for (s, e) in w.starts[i..].iter().zip(&w.extents[i..]) {
            if pos >= end || (e.hole, e.zero) != (lead.hole, lead.zero) {
                break;
            }
            let take = (s + e.length).min(end) - pos;
            out.push(Extent { length: take, ..*e });
            pos += take;
        }
        windows.insert(0, w);
        (!out.is_empty()).then_some(out)
    }

    /// Remember the walk of `extents`, consecutive from `start`.
    pub(super) fn insert(&self, start: u64, extents: &[Extent]) {
        let mut starts = Vec::with_capacity(extents.len());
        let mut pos = start;
        for e in extents {
            starts.push(pos);
            pos = pos.saturating_add(e.length);
        }
        if starts.is_empty() {
            return;
        }
        let Ok(mut windows) = self.windows.lock() else {
            return;
        };
        windows.insert(
            0,
            Window {
                starts,
                extents: extents.to_vec(),
                end: pos,
            },
        );
        windows.truncate(MAX_WINDOWS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(length: u64, depth: u32) -> Extent {
        Extent {
            length,
            hole: false,
            zero: false,
            depth,
        }
    }

    #[test]
    fn answers_from_a_walk_up_to_the_first_status_change() {
        let c = StatusCache::default();
        assert!(c.first(0, 100).is_none(), "nothing walked yet");
        c.insert(
            1000,
            &[data(100, 1), data(50, 2), Extent::hole(200), data(10, 1)],
        );
        // Inside the first extent: it and the next data extent (other depth).
        let e = c.first(1040, 5000).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!((e[0].length, e[0].depth), (60, 1));
        assert_eq!((e[1].length, e[1].depth), (50, 2));
        // Clipped at the request's end.
        let e = c.first(1040, 1100).unwrap();
        assert_eq!(e.iter().map(|e| e.length).sum::<u64>(), 60);
        // The hole, alone.
        let e = c.first(1150, 5000).unwrap();
        assert_eq!(e.len(), 1);
        assert!(e[0].hole && e[0].length == 200);
        // The last extent ends the walk.
        let e = c.first(1355, 5000).unwrap();
        assert_eq!(e[0].length, 5);
        // Before and after the walk: unknown.
        assert!(c.first(999, 5000).is_none());
        assert!(c.first(1360, 5000).is_none());
    }

    #[test]
    fn keeps_the_most_recently_used_windows() {
        let c = StatusCache::default();
        for i in 0..MAX_WINDOWS as u64 {
            c.insert(i * 1000, &[data(100, 1)]);
        }
        // Touch the oldest, then add one more: the second oldest goes.
        assert!(c.first(0, 50).is_some());
        c.insert(90_000, &[data(100, 1)]);
        assert!(c.first(0, 50).is_some());
        assert!(c.first(1000, 1050).is_none());
        assert!(c.first(90_000, 90_050).is_some());
    }
}
