//! Samples, figures (median/min/max), ratios to qemu-nbd, and the table,
//! JSON and Markdown outputs.

use std::collections::BTreeMap;

use serde::Serialize;

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Server name.
    pub server: String,
    /// Figure name.
    pub test: String,
    /// Repetition (1-based).
    pub rep: usize,
    /// Value.
    pub value: f64,
    /// Unit ("MB/s", "IOPS", "KiB", "s", "bool").
    pub unit: String,
}

/// Aggregated samples of one (server, test).
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Server.
    pub server: String,
    /// Test.
    pub test: String,
    /// Median over repetitions.
    pub median: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
    /// Unit.
    pub unit: String,
    /// Number of samples.
    pub n: usize,
    /// Median of per-repetition ratios to the baseline server, if any.
    pub ratio: Option<f64>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Aggregate; ratios are against `baseline(test)` (per repetition, then median).
pub fn figures(samples: &[Sample], baseline: impl Fn(&str) -> String) -> Vec<Figure> {
    let mut groups: BTreeMap<(String, String), Vec<&Sample>> = BTreeMap::new();
    let mut order: Vec<(String, String)> = Vec::new();
    for s in samples {
        let key = (s.test.clone(), s.server.clone());
        if !groups.contains_key(&key) {
            order.push(key.clone());
        }
        groups.entry(key).or_default().push(s);
    }
    order.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| (a.1 != "ours").cmp(&(b.1 != "ours")).then(a.1.cmp(&b.1)))
    });
    order
        .into_iter()
        .map(|(test, server)| {
            let g = &groups[&(test.clone(), server.clone())];
            let mut vals: Vec<f64> = g.iter().map(|s| s.value).collect();
            let min = vals.iter().copied().fold(f64::INFINITY, f64::min);
            let max = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let unit = g[0].unit.clone();
            let baseline = baseline(&test);
            let ratio = if server != baseline && unit != "bool" {
                groups.get(&(test.clone(), baseline)).and_then(|base| {
                    let mut rs: Vec<f64> = g
                        .iter()
                        .filter_map(|s| {
                            base.iter()
                                .find(|b| b.rep == s.rep && b.value != 0.0)
                                .map(|b| s.value / b.value)
                        })
                        .collect();
                    (!rs.is_empty()).then(|| median(&mut rs))
                })
            } else {
                None
            };
            Figure {
                median: median(&mut vals),
                min,
                max,
                n: vals.len(),
                unit,
                ratio,
                server,
                test,
            }
        })
        .collect()
}

fn fmt(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.3}")
    }
}

/// A plain-text table.
pub fn table(figs: &[Figure], baseline: &str) -> String {
    let mut out = format!(
        "{:<44} {:<14} {:>10} {:>10} {:>10} {:<6} {:>8}\n",
        "figure", "server", "median", "min", "max", "unit", "ratio"
    );
    for f in figs {
        let ratio = f.ratio.map_or(String::new(), |r| format!("{r:.2}x"));
        out.push_str(&format!(
            "{:<44} {:<14} {:>10} {:>10} {:>10} {:<6} {:>8}\n",
            f.test,
            f.server,
            fmt(f.median),
            fmt(f.min),
            fmt(f.max),
            f.unit,
            ratio
        ));
    }
    out.push_str(&format!(
        "(ratio = median of per-repetition ratios to {baseline}; null_* figures to nbdkit-null, digest_* to sha256sum)\n"
    ));
    out
}

/// A Markdown table.
pub fn markdown(figs: &[Figure], baseline: &str) -> String {
    let mut out = format!("| figure | server | median | min | max | unit | ratio to {baseline} (null_*: nbdkit-null; digest_*: sha256sum) |\n|---|---|---:|---:|---:|---|---:|\n");
    for f in figs {
        let ratio = f.ratio.map_or(String::new(), |r| format!("{r:.2}×"));
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            f.test,
            f.server,
            fmt(f.median),
            fmt(f.min),
            fmt(f.max),
            f.unit,
            ratio
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(server: &str, rep: usize, v: f64) -> Sample {
        Sample {
            server: server.into(),
            test: "write".into(),
            rep,
            value: v,
            unit: "MB/s".into(),
        }
    }

    #[test]
    fn ratios_are_per_repetition_medians() {
        let samples = vec![
            s("qemu-nbd", 1, 100.0),
            s("ours", 1, 300.0),
            s("qemu-nbd", 2, 200.0),
            s("ours", 2, 200.0),
            s("qemu-nbd", 3, 100.0),
            s("ours", 3, 150.0),
        ];
        let f = figures(&samples, |_| "qemu-nbd".to_owned());
        let ours = f.iter().find(|f| f.server == "ours").unwrap();
        assert_eq!(ours.median, 200.0);
        assert_eq!(ours.ratio, Some(1.5));
        assert_eq!(f[0].server, "ours", "ours first");
    }
}
