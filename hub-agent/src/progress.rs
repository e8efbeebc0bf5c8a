//! A one-line progress bar on stderr for `push`, drawn only when stderr is
//! a terminal (so logs and pipes stay clean).

use std::io::{IsTerminal, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::stream::DiskCounter;

/// Redraw interval.
const EVERY: Duration = Duration::from_millis(250);
const WIDTH: usize = 30;

/// One line: `[#####.....]  42.0%  1.2 GiB / 3.0 GiB  250 MiB/s`.
pub fn render(done: u64, total: u64, elapsed: Duration) -> String {
    let frac = if total == 0 {
        1.0
    } else {
        done as f64 / total as f64
    };
    let filled = ((frac * WIDTH as f64) as usize).min(WIDTH);
    let rate = done as f64 / elapsed.as_secs_f64().max(0.001);
    format!(
        "[{}{}] {:5.1}%  {} / {}  {}/s",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        frac * 100.0,
        human(done as f64),
        human(total as f64),
        human(rate)
    )
}

fn human(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// A bar being drawn.
#[derive(Debug)]
pub struct Bar {
    task: tokio::task::JoinHandle<()>,
    counters: Vec<Arc<DiskCounter>>,
    start: Instant,
}

fn draw(counters: &[Arc<DiskCounter>], start: Instant) {
    let done: u64 = counters
        .iter()
        .map(|c| c.done.load(Ordering::Relaxed))
        .sum();
    let total: u64 = counters
        .iter()
        .map(|c| c.total.load(Ordering::Relaxed))
        .sum();
    let mut e = std::io::stderr().lock();
    let _ = write!(e, "\r{}", render(done, total, start.elapsed()));
    let _ = e.flush();
}

/// Start drawing the bar; `None` when stderr is not a terminal.
pub fn spawn_bar(counters: Vec<Arc<DiskCounter>>) -> Option<Bar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let start = Instant::now();
    let task = tokio::spawn({
        let counters = counters.clone();
        async move {
            let mut tick = tokio::time::interval(EVERY);
            loop {
                tick.tick().await;
                draw(&counters, start);
            }
        }
    });
    Some(Bar {
        task,
        counters,
        start,
    })
}

impl Bar {
    /// Stop, draw the final state and end the line.
    pub fn finish(self) {
        self.task.abort();
        draw(&self.counters, self.start);
        eprintln!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders() {
        let s = render(512 << 20, 1 << 30, Duration::from_secs(2));
        assert!(s.starts_with("[###############..............."), "{s}");
        assert!(
            s.contains(" 50.0%") && s.contains("512.0 MiB / 1.0 GiB"),
            "{s}"
        );
        assert!(s.contains("256.0 MiB/s"), "{s}");
        assert!(render(0, 0, Duration::ZERO).contains("100.0%"));
    }
}
