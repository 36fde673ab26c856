//! The report: every figure as the median of its rounds, the ratios between them, the
//! issue's goals, written to `target/bench/report.json` and `report.md`.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde_json::{Value, json};

use super::worker::Sample;

/// One measured quantity: its rounds, or why it could not be measured.
#[derive(Debug, Clone)]
pub(crate) struct Figure {
    pub(crate) key: String,
    pub(crate) unit: String,
    pub(crate) rounds: Vec<f64>,
    pub(crate) missing: Option<String>,
}

impl Figure {
    /// The median of the rounds; `None` when there are none.
    pub(crate) fn median(&self) -> Option<f64> {
        median(&self.rounds)
    }
}

/// The median of `values` (the upper one of an even count); `None` when empty.
pub(crate) fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied()
}

/// An issue goal: a figure (or ratio) compared with a bound.
#[derive(Debug, Clone)]
pub(crate) struct Goal {
    pub(crate) text: String,
    pub(crate) measured: Option<f64>,
    pub(crate) met: Option<bool>,
}

/// Everything one `cargo xtask bench` run measured.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) meta: Vec<(String, String)>,
    pub(crate) figures: Vec<Figure>,
    pub(crate) ratios: Vec<(String, Option<f64>)>,
    pub(crate) goals: Vec<Goal>,
}

impl Report {
    pub(crate) fn meta(&mut self, key: &str, value: impl Into<String>) {
        self.meta.push((key.to_owned(), value.into()));
    }

    /// Adds `key` with `rounds` in `unit`.
    pub(crate) fn figure(&mut self, key: &str, unit: &str, rounds: Vec<f64>) {
        let missing = rounds.is_empty().then(|| "no round finished".to_owned());
        self.figures.push(Figure { key: key.to_owned(), unit: unit.to_owned(), rounds, missing });
    }

    /// Adds `key` as not measured, for `reason`.
    pub(crate) fn missing(&mut self, key: &str, unit: &str, reason: impl Into<String>) {
        self.figures.push(Figure {
            key: key.to_owned(),
            unit: unit.to_owned(),
            rounds: Vec::new(),
            missing: Some(reason.into()),
        });
    }

    /// Adds `<key>.rate` (msg/s) and `<key>.cpu` (CPU µs/msg) from worker samples.
    pub(crate) fn samples(&mut self, key: &str, samples: &[Sample]) {
        self.figure(&format!("{key}.rate"), "msg/s", samples.iter().map(Sample::rate).collect());
        self.figure(
            &format!("{key}.cpu"),
            "CPU µs/msg",
            samples.iter().map(Sample::cpu_us).collect(),
        );
    }

    /// The median of figure `key`, if it was measured.
    pub(crate) fn value(&self, key: &str) -> Option<f64> {
        self.figures.iter().find(|f| f.key == key).and_then(Figure::median)
    }

    /// The ratio of the medians of two figures.
    pub(crate) fn ratio_of(&self, a: &str, b: &str) -> Option<f64> {
        match (self.value(a), self.value(b)) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        }
    }

    /// Adds the ratio of the medians of two figures to the report, named `a / b`.
    pub(crate) fn ratio(&mut self, a: &str, b: &str) {
        let value = self.ratio_of(a, b);
        self.ratios.push((format!("{a} / {b}"), value));
    }

    /// Adds a goal: `measured` at least (`at_least`) or at most `bound`.
    pub(crate) fn goal(&mut self, text: &str, measured: Option<f64>, at_least: bool, bound: f64) {
        let met = measured.map(|v| if at_least { v >= bound } else { v <= bound });
        self.goals.push(Goal { text: text.to_owned(), measured, met });
    }

    fn to_json(&self) -> Value {
        json!({
            "meta": self.meta.iter().map(|(k, v)| (k.clone(), Value::from(v.clone()))).collect::<serde_json::Map<_, _>>(),
            "figures": self.figures.iter().map(|f| json!({
                "key": f.key,
                "unit": f.unit,
                "median": f.median(),
                "rounds": f.rounds,
                "missing": f.missing,
            })).collect::<Vec<_>>(),
            "ratios": self.ratios.iter().map(|(name, value)| json!({ "ratio": name, "value": value })).collect::<Vec<_>>(),
            "goals": self.goals.iter().map(|g| json!({ "goal": g.text, "measured": g.measured, "met": g.met })).collect::<Vec<_>>(),
        })
    }

    /// The Markdown tables.
    pub(crate) fn to_markdown(&self) -> String {
        let mut out = String::new();
        for (key, value) in &self.meta {
            let _ = writeln!(out, "- {key}: {value}");
        }
        out.push_str("\n| figure | median | unit | rounds |\n|---|---:|---|---|\n");
        for f in &self.figures {
            match (&f.missing, f.median()) {
                (None, Some(median)) => {
                    let rounds: Vec<String> = f.rounds.iter().map(|r| number(*r)).collect();
                    let _ = writeln!(
                        out,
                        "| {} | {} | {} | {} |",
                        f.key,
                        number(median),
                        f.unit,
                        rounds.join(", ")
                    );
                }
                (reason, _) => {
                    let reason = reason.as_deref().unwrap_or("no round finished");
                    let _ = writeln!(out, "| {} | missing | {} | {reason} |", f.key, f.unit);
                }
            }
        }
        out.push_str("\n| ratio of medians | value |\n|---|---:|\n");
        for (name, value) in &self.ratios {
            let value = value.map_or_else(|| "missing".to_owned(), |v| format!("{v:.2}"));
            let _ = writeln!(out, "| {name} | {value} |");
        }
        out.push_str("\n| goal | measured | |\n|---|---:|---|\n");
        for g in &self.goals {
            let measured = g.measured.map_or_else(|| "missing".to_owned(), number);
            let verdict = match g.met {
                Some(true) => "met",
                Some(false) => "missed",
                None => "not measured",
            };
            let _ = writeln!(out, "| {} | {measured} | {verdict} |", g.text);
        }
        out
    }

    /// Writes `report.json` and `report.md` into `dir`.
    pub(crate) fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(&self.to_json())?)?;
        std::fs::write(dir.join("report.md"), self.to_markdown())?;
        Ok(())
    }
}

/// A figure with three significant digits at most, without exponent notation.
fn number(value: f64) -> String {
    if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}
