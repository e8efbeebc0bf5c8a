//! `/metrics` (issue 12, part 4): Prometheus naming (units in names,
//! `_total` counters, one HELP and TYPE per family, escaped labels), checked
//! line by line on a real scrape, and the per-disk series of running
//! backups (bytes received, throughput) following data written over NBD.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};

use common::hub::{parse_targets, Hub};
use integration_tests::support::pattern;

const MIB: u64 = 1 << 20;

/// Units that must end a name (before `_total` or `_per_second`) when
/// the name mentions them.
const UNITS: &[&str] = &["bytes", "seconds"];
/// Words that mean a unit Prometheus spells otherwise.
const WRONG_UNITS: &[&str] = &[
    "ms",
    "millis",
    "milliseconds",
    "kb",
    "mb",
    "kib",
    "mib",
    "duration",
    "latency",
    "sec",
];

fn valid_name(n: &str) -> bool {
    let mut c = n.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

/// The labels of a sample as (name, raw value) pairs; `Err` unless every
/// value is quoted with only `\\`, `\"` and `\n` escapes inside.
fn parse_labels(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (name, after) = rest
            .split_once("=\"")
            .ok_or_else(|| format!("label without =\": {rest:?}"))?;
        if !valid_name(name) || name.starts_with("__") {
            return Err(format!("bad label name {name:?}"));
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("unterminated label value in {s:?}")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, c @ ('\\' | '"' | 'n'))) => {
                        value.push('\\');
                        value.push(c);
                    }
                    other => return Err(format!("bad escape {other:?} in {s:?}")),
                },
                Some((_, c)) => value.push(c),
            }
        };
        out.push((name.to_owned(), value));
        rest = &after[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.is_empty() {
            return Err(format!("junk after a label value: {rest:?}"));
        }
    }
    Ok(out)
}

/// Check an exposition against the naming rules; the first problem found.
fn check(text: &str) -> Result<(), String> {
    let mut help = HashSet::new();
    let mut types: HashMap<String, String> = HashMap::new();
    let mut series = HashSet::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, h) = rest.split_once(' ').unwrap_or((rest, ""));
            if h.trim().is_empty() {
                return Err(format!("{name}: empty HELP"));
            }
            if !help.insert(name.to_owned()) {
                return Err(format!("{name}: second HELP"));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .ok_or_else(|| format!("bad TYPE line {line:?}"))?;
            if !help.contains(name) {
                return Err(format!("{name}: TYPE without HELP before it"));
            }
            if types.insert(name.to_owned(), kind.to_owned()).is_some() {
                return Err(format!("{name}: second TYPE"));
            }
            if !valid_name(name) {
                return Err(format!("{name}: invalid name"));
            }
            match kind {
                "counter" if !name.ends_with("_total") => {
                    return Err(format!("{name}: a counter must end in _total"))
                }
                "counter" => {}
                "gauge" if name.ends_with("_total") => {
                    return Err(format!("{name}: only counters end in _total"))
                }
                "gauge" => {}
                other => return Err(format!("{name}: unexpected type {other}")),
            }
            let base = name.strip_suffix("_total").unwrap_or(name);
            let base = base.strip_suffix("_per_second").unwrap_or(base);
            let words: Vec<&str> = base.split('_').collect();
            for unit in UNITS {
                if words.contains(unit) && words.last() != Some(unit) {
                    return Err(format!("{name}: the unit {unit} must end the name"));
                }
            }
            for w in WRONG_UNITS {
                if words.contains(w) {
                    return Err(format!("{name}: {w} is not a base unit"));
                }
            }
            current = Some(name.to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (head, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("bad sample {line:?}"))?;
        value
            .parse::<f64>()
            .map_err(|_| format!("bad value in {line:?}"))?;
        let (name, labels) = match head.split_once('{') {
            Some((n, l)) => (
                n,
                l.strip_suffix('}')
                    .ok_or_else(|| format!("unclosed labels in {line:?}"))?,
            ),
            None => (head, ""),
        };
        if current.as_deref() != Some(name) {
            return Err(format!("{name}: sample outside its own family"));
        }
        let labels = parse_labels(labels)?;
        let mut names = HashSet::new();
        for (k, _) in &labels {
            if !names.insert(k) {
                return Err(format!("{name}: label {k} twice"));
            }
        }
        if !series.insert(head.to_owned()) {
            return Err(format!("{head}: duplicate series"));
        }
    }
    // OpenMetrics names a counter's family without `_total`: a gauge of
    // that name would clash with it.
    for (name, kind) in &types {
        if kind == "counter" {
            let family = name.trim_end_matches("_total");
            if types.contains_key(family) {
                return Err(format!("{family} clashes with counter {name}"));
            }
        }
    }
    if types.len() != help.len() {
        return Err("a HELP without TYPE".into());
    }
    Ok(())
}

/// The checker catches each kind of mistake (so a clean real scrape means
/// something).
#[test]
fn the_checker_refuses_each_rule_break() {
    let ok = "# HELP a_bytes_total x\n# TYPE a_bytes_total counter\na_bytes_total{k=\"v\\\"\\\\\\n\"} 1\n\
              # HELP b_bytes x\n# TYPE b_bytes gauge\nb_bytes 2.5\n";
    assert_eq!(check(ok), Ok(()));
    for (bad, why) in [
        ("# HELP a x\n# TYPE a counter\na 1\n", "counter without _total"),
        ("# HELP a_total x\n# TYPE a_total gauge\na_total 1\n", "gauge with _total"),
        ("# HELP a x\n# HELP a y\n# TYPE a gauge\na 1\n", "second HELP"),
        ("# TYPE a gauge\na 1\n", "TYPE without HELP"),
        ("# HELP a x\n# TYPE a gauge\nb 1\n", "sample of another family"),
        ("b 1\n", "sample without TYPE"),
        ("# HELP a x\n# TYPE a gauge\na{k=\"v\"w\"} 1\n", "raw quote in a label"),
        ("# HELP a x\n# TYPE a gauge\na{k=\"v\\x\"} 1\n", "unknown escape"),
        ("# HELP a x\n# TYPE a gauge\na{k=\"v\"} 1\na{k=\"v\"} 2\n", "duplicate series"),
        ("# HELP a x\n# TYPE a gauge\na{k=\"1\",k=\"2\"} 1\n", "label twice"),
        ("# HELP a_bytes_read x\n# TYPE a_bytes_read gauge\na_bytes_read 1\n", "unit not last"),
        ("# HELP a_ms x\n# TYPE a_ms gauge\na_ms 1\n", "milliseconds"),
        ("# HELP a_duration x\n# TYPE a_duration gauge\na_duration 1\n", "no unit"),
        ("# HELP a_bytes_per_sec x\n# TYPE a_bytes_per_sec gauge\na_bytes_per_sec 1\n", "per_sec"),
        (
            "# HELP a x\n# TYPE a gauge\na 1\n# HELP a_total x\n# TYPE a_total counter\na_total 1\n",
            "gauge clashing with a counter's family",
        ),
        ("# HELP a x\n# TYPE a gauge\na one\n", "not a number"),
        ("# HELP a \n# TYPE a gauge\na 1\n", "empty HELP"),
        ("# HELP a x\n", "HELP without TYPE"),
    ] {
        assert!(check(bad).is_err(), "accepted ({why}):\n{bad}");
    }
}

/// The value of the sample whose line starts with `head` (name and labels).
fn sample(text: &str, head: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(head)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_prometheus_naming_and_show_running_disks() {
    let mut hub = Hub::start().await;
    let idle = hub.get("/metrics").await.text();
    check(&idle).unwrap_or_else(|e| panic!("{e}\n{idle}"));
    // The renamed gauges (the old names broke the rules).
    assert!(sample(&idle, "hub_nbd_ports_capacity").is_some(), "{idle}");
    assert!(
        sample(&idle, "hub_nbd_connections_open").is_some(),
        "{idle}"
    );
    assert!(!idle.contains("hub_nbd_ports_total"), "{idle}");

    hub.register("vm1", &[4 * MIB, 2 * MIB]).await;
    let b = hub.backup("vm1", "full").await;
    let id = b["backup_id"].as_str().unwrap().to_owned();
    let uris = parse_targets(b["nbd_targets_string"].as_str().unwrap());
    let written = |disk: u32| {
        format!(
            "hub_backup_disk_written_bytes_total{{backup_id=\"{id}\",vm=\"vm1\",disk=\"{disk}\"}}"
        )
    };
    let rate = |disk: u32| {
        format!("hub_backup_disk_throughput_bytes_per_second{{backup_id=\"{id}\",vm=\"vm1\",disk=\"{disk}\"}}")
    };

    let first = hub.get("/metrics").await.text();
    check(&first).unwrap_or_else(|e| panic!("{e}\n{first}"));
    for disk in [0, 1] {
        assert_eq!(sample(&first, &written(disk)), Some(0.0), "{first}");
        assert_eq!(sample(&first, &rate(disk)), Some(0.0), "{first}");
    }
    // No export name (a capability) is ever a label.
    for (_, uri) in &uris {
        let name = uri.rsplit('/').next().unwrap();
        assert!(!first.contains(name), "export name leaked: {name}");
    }

    // 3 MiB to disk 0 over NBD: its counter says exactly that, and it has
    // a throughput now; disk 1 stays still.
    let c = nbd_client::connect_uri(&uris[0].1).await.unwrap();
    c.write(0, bytes::Bytes::from(pattern(1, 3 * MIB as usize)), false)
        .await
        .unwrap();
    c.flush().await.unwrap();
    c.disconnect().await.unwrap();
    let second = hub.get("/metrics").await.text();
    check(&second).unwrap_or_else(|e| panic!("{e}\n{second}"));
    assert_eq!(
        sample(&second, &written(0)),
        Some((3 * MIB) as f64),
        "{second}"
    );
    assert_eq!(sample(&second, &written(1)), Some(0.0), "{second}");
    assert!(sample(&second, &rate(0)).unwrap() > 0.0, "{second}");
    assert_eq!(sample(&second, &rate(1)), Some(0.0), "{second}");
    // The totals over every export agree.
    assert!(sample(&second, "hub_nbd_written_bytes_total").unwrap() >= (3 * MIB) as f64);

    // Completed: its running-disk series end, the families stay (with
    // HELP and TYPE); the restore point's own series begin.
    hub.complete(&id).await;
    let done = hub.get("/metrics").await.text();
    check(&done).unwrap_or_else(|e| panic!("{e}\n{done}"));
    assert!(
        !done
            .lines()
            .any(|l| l.starts_with("hub_backup_disk_") && l.contains(&id)),
        "{done}"
    );
    assert!(
        done.lines()
            .any(|l| l.starts_with("hub_backup_image_bytes{") && l.contains(&id)),
        "{done}"
    );
    assert!(done.contains("# TYPE hub_backup_disk_written_bytes_total counter"));
    hub.stop().await;
}
