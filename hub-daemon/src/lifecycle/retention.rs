//! Retention with Proxmox Backup Server's semantics, so operators who know
//! `keep-last`, `keep-daily`, … get exactly what they expect.
//!
//! Restore points are walked newest first. `keep_last` keeps the N newest.
//! Then, in this order, each `keep_<period>` (hourly, daily, weekly
//! (ISO weeks), monthly, yearly) keeps the newest restore point of each of
//! the N most recent periods that has a restore point not already decided:
//! a period whose restore point an earlier rule kept is skipped (it does
//! not count against N), and the other restore points of a period a rule
//! keeps are marked for removal, so later rules do not look at them again.
//! Everything no rule keeps is removed. With no `keep_*` option set at all
//! nothing is removed. Periods are UTC.
//!
//! On top of that, `min_retention_days` protects every restore point
//! younger than that from removal (it is kept and counts for no rule).
//! The worked example is in `docs/retention.md` and in the tests below.

use std::collections::{HashMap, HashSet};

use time::OffsetDateTime;

/// The `keep_*` options of a policy (0 = rule off).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Keep {
    /// The N newest.
    pub last: u32,
    /// Newest of each of the N most recent hours.
    pub hourly: u32,
    /// … days.
    pub daily: u32,
    /// … ISO weeks.
    pub weekly: u32,
    /// … months.
    pub monthly: u32,
    /// … years.
    pub yearly: u32,
}

impl Keep {
    fn any(&self) -> bool {
        self.last + self.hourly + self.daily + self.weekly + self.monthly + self.yearly > 0
    }
}

/// One restore point as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Point {
    /// Backup id.
    pub id: String,
    /// When it was taken (unix ms).
    pub time_ms: i64,
}

/// Why a restore point stays or goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Kept by this rule ("last", "hourly", …, "min-retention", "keep-all").
    Keep(&'static str),
    /// No rule keeps it.
    Remove,
}

impl Verdict {
    /// Whether it stays.
    pub fn keeps(self) -> bool {
        matches!(self, Verdict::Keep(_))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    Keep(&'static str),
    /// Younger than `min_retention_days`: stays, but like PBS's protected
    /// backups represents no period for the rules.
    Protected,
    Remove,
}

type Period = fn(OffsetDateTime) -> String;

fn hour(t: OffsetDateTime) -> String {
    format!(
        "{}/{}/{}/{}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour()
    )
}
fn day(t: OffsetDateTime) -> String {
    format!("{}/{}/{}", t.year(), u8::from(t.month()), t.day())
}
fn week(t: OffsetDateTime) -> String {
    let (y, w, _) = t.to_iso_week_date();
    format!("{y}/W{w}")
}
fn month(t: OffsetDateTime) -> String {
    format!("{}/{}", t.year(), u8::from(t.month()))
}
fn year(t: OffsetDateTime) -> String {
    t.year().to_string()
}

fn at(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Decide every restore point. `points` may come in any order; the answer
/// is in the same order.
pub fn plan(points: &[Point], keep: &Keep, min_retention_days: u32, now_ms: i64) -> Vec<Verdict> {
    if !keep.any() {
        return vec![Verdict::Keep("keep-all"); points.len()];
    }
    // Newest first; ties broken by id so the plan is deterministic.
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by(|&a, &b| {
        points[b]
            .time_ms
            .cmp(&points[a].time_ms)
            .then_with(|| points[b].id.cmp(&points[a].id))
    });
    let mut marks: HashMap<usize, Mark> = HashMap::new();
    let guard_ms = i64::from(min_retention_days).saturating_mul(86_400_000);
    for &i in &order {
        if now_ms.saturating_sub(points[i].time_ms) < guard_ms {
            marks.insert(i, Mark::Protected);
        }
    }
    // keep_last: every restore point is its own period.
    select(&order, &mut marks, keep.last, "last", |i| i.to_string());
    let rules: [(u32, &'static str, Period); 5] = [
        (keep.hourly, "hourly", hour),
        (keep.daily, "daily", day),
        (keep.weekly, "weekly", week),
        (keep.monthly, "monthly", month),
        (keep.yearly, "yearly", year),
    ];
    for (n, name, period) in rules {
        select(&order, &mut marks, n, name, |i| {
            period(at(points[i].time_ms))
        });
    }
    (0..points.len())
        .map(|i| match marks.get(&i) {
            Some(Mark::Keep(r)) => Verdict::Keep(r),
            Some(Mark::Protected) => Verdict::Keep("min-retention"),
            _ => Verdict::Remove,
        })
        .collect()
}

/// One rule: PBS's `mark_selections`.
fn select(
    order: &[usize],
    marks: &mut HashMap<usize, Mark>,
    n: u32,
    name: &'static str,
    period_of: impl Fn(usize) -> String,
) {
    if n == 0 {
        return;
    }
    // Periods already represented by a kept restore point do not count.
    let already: HashSet<String> = order
        .iter()
        .filter(|i| matches!(marks.get(i), Some(Mark::Keep(_))))
        .map(|&i| period_of(i))
        .collect();
    let mut chosen: HashSet<String> = HashSet::new();
    for &i in order {
        if marks.contains_key(&i) {
            continue;
        }
        let p = period_of(i);
        if already.contains(&p) {
            continue;
        }
        if chosen.contains(&p) {
            marks.insert(i, Mark::Remove);
        } else {
            if chosen.len() >= n as usize {
                break;
            }
            chosen.insert(p);
            marks.insert(i, Mark::Keep(name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;
    const D: i64 = 24 * H;

    /// 2026-01-01T00:00:00Z (a Thursday).
    const JAN1: i64 = 1_767_225_600_000;

    fn pts(times: &[i64]) -> Vec<Point> {
        times
            .iter()
            .enumerate()
            .map(|(i, &t)| Point {
                id: format!("b{i:03}"),
                time_ms: t,
            })
            .collect()
    }

    fn kept(points: &[Point], v: &[Verdict]) -> Vec<String> {
        let mut k: Vec<String> = points
            .iter()
            .zip(v)
            .filter(|(_, v)| v.keeps())
            .map(|(p, _)| p.id.clone())
            .collect();
        k.sort();
        k
    }

    #[test]
    fn no_rule_keeps_everything() {
        let p = pts(&[JAN1, JAN1 + D]);
        assert!(plan(&p, &Keep::default(), 0, JAN1 + 9 * D)
            .iter()
            .all(|v| *v == Verdict::Keep("keep-all")));
    }

    #[test]
    fn keep_last_keeps_the_newest_n() {
        let p = pts(&[JAN1, JAN1 + D, JAN1 + 2 * D, JAN1 + 3 * D]);
        let v = plan(
            &p,
            &Keep {
                last: 2,
                ..Keep::default()
            },
            0,
            JAN1 + 9 * D,
        );
        assert_eq!(kept(&p, &v), ["b002", "b003"]);
        assert_eq!(v[3], Verdict::Keep("last"));
    }

    /// The worked example of docs/retention.md: two backups a day (06:00
    /// and 18:00) for 40 days from 2026-01-01, pruned on 2026-02-10 00:00
    /// with keep-last 3, keep-daily 5, keep-weekly 2, keep-monthly 2.
    #[test]
    fn worked_example() {
        let mut times = Vec::new();
        for d in 0..40 {
            times.push(JAN1 + d * D + 6 * H);
            times.push(JAN1 + d * D + 18 * H);
        }
        let p = pts(&times);
        let keep = Keep {
            last: 3,
            daily: 5,
            weekly: 2,
            monthly: 2,
            ..Keep::default()
        };
        let v = plan(&p, &keep, 0, JAN1 + 40 * D);
        let by = |r: &str| -> Vec<String> {
            p.iter()
                .zip(&v)
                .filter(|(_, v)| {
                    **v == Verdict::Keep(match r {
                        "last" => "last",
                        "daily" => "daily",
                        "weekly" => "weekly",
                        _ => "monthly",
                    })
                })
                .map(|(p, _)| crate::time::rfc3339(p.time_ms))
                .collect()
        };
        // last: the three newest: Feb 9 18:00, Feb 9 06:00, Feb 8 18:00.
        assert_eq!(
            by("last"),
            [
                "2026-02-08T18:00:00Z",
                "2026-02-09T06:00:00Z",
                "2026-02-09T18:00:00Z"
            ]
        );
        // daily: Feb 9 and Feb 8 already have a kept one; the next five
        // days' newest (18:00) are kept: Feb 3..7.
        assert_eq!(
            by("daily"),
            [
                "2026-02-03T18:00:00Z",
                "2026-02-04T18:00:00Z",
                "2026-02-05T18:00:00Z",
                "2026-02-06T18:00:00Z",
                "2026-02-07T18:00:00Z"
            ]
        );
        // weekly (ISO): week 6 (Feb 2..8) is represented; the morning
        // backups of Feb 3..7 were marked removed by the daily rule, Feb 2
        // 18:00 is the newest undecided one of week 6 — but week 6 is
        // already represented, so the next two weeks are 5 (Jan 26..Feb 1)
        // and 4 (Jan 19..25): their newest, Feb 1 and Jan 25 at 18:00.
        assert_eq!(
            by("weekly"),
            ["2026-01-25T18:00:00Z", "2026-02-01T18:00:00Z"]
        );
        // monthly: February and January are represented: nothing more.
        assert!(by("monthly").is_empty());
        assert_eq!(v.iter().filter(|v| v.keeps()).count(), 10);
    }

    #[test]
    fn min_retention_protects_young_restore_points_which_count_for_no_rule() {
        let p = pts(&[JAN1, JAN1 + D, JAN1 + 2 * D, JAN1 + 2 * D + H]);
        let keep = Keep {
            daily: 1,
            ..Keep::default()
        };
        // The guard (2 days) covers the three newest; they do not
        // represent their days, so keep-daily 1 keeps the oldest.
        let v = plan(&p, &keep, 2, JAN1 + 2 * D + 2 * H);
        assert_eq!(v[0], Verdict::Keep("daily"));
        for x in &v[1..] {
            assert_eq!(*x, Verdict::Keep("min-retention"));
        }
        // Without the guard only the newest survives.
        let v = plan(&p, &keep, 0, JAN1 + 2 * D + 2 * H);
        assert_eq!(kept(&p, &v), ["b003"]);
    }

    #[test]
    fn order_of_input_does_not_matter() {
        let mut times: Vec<i64> = (0..50).map(|i| JAN1 + i * 7 * H).collect();
        let keep = Keep {
            last: 2,
            daily: 3,
            weekly: 2,
            ..Keep::default()
        };
        let p = pts(&times);
        let a = kept(&p, &plan(&p, &keep, 0, JAN1 + 400 * H));
        times.reverse();
        let mut q: Vec<Point> = p.clone();
        q.reverse();
        let b = kept(&q, &plan(&q, &keep, 0, JAN1 + 400 * H));
        assert_eq!(a, b);
    }
}
