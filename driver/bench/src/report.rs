//! Results of a benchmark run and their JSON, Markdown and SVG renderings (hand-written: no
//! serialisation or plotting dependency).

use std::fmt::Write as _;
use std::path::Path;

/// A target from the issue, tracked (never asserted).
#[derive(Debug, Clone)]
pub struct Target {
    /// What it asks, e.g. ">= 0.8x MADV_POPULATE_WRITE".
    pub text: String,
    /// Whether this run met it.
    pub met: bool,
}

/// One measured figure beside its same-run baseline.
#[derive(Debug, Clone, Default)]
pub struct Figure {
    /// Group (fault, latency, invalidation, walk, overhead, scaling).
    pub group: String,
    /// What was measured.
    pub name: String,
    /// Service mode ("polling", "interrupt" or "-").
    pub mode: String,
    /// Core placement ("same-core", "cross-core" or "-").
    pub placement: String,
    /// Median over repeats (or iterations for latencies).
    pub value: f64,
    /// p99 where a latency is measured.
    pub p99: Option<f64>,
    /// Unit of `value` and `p99`.
    pub unit: String,
    /// The baseline measured in the same run.
    pub baseline_name: String,
    /// Its value, same unit.
    pub baseline: Option<f64>,
    /// ours / baseline (for throughputs: higher is better; for times: lower is better).
    pub ratio: Option<f64>,
    /// Target, if the issue sets one.
    pub target: Option<Target>,
    /// Anything a reader must know.
    pub note: String,
}

/// A plotted series set.
#[derive(Debug, Clone)]
pub struct Plot {
    /// File stem of the SVG.
    pub file: String,
    /// Title.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Log-scale x.
    pub log_x: bool,
    /// Log-scale y.
    pub log_y: bool,
    /// Named lines of (x, y) points.
    pub lines: Vec<(String, Vec<(f64, f64)>)>,
}

/// Everything one run produced.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// "quick" or "full".
    pub profile: String,
    /// UTC start time, ISO 8601.
    pub date: String,
    /// Machine description.
    pub machine: String,
    /// /proc/loadavg at the start and at the end.
    pub load_start: String,
    /// See `load_start`.
    pub load_end: String,
    /// Wall time of the run in seconds.
    pub seconds: f64,
    /// Figures.
    pub figures: Vec<Figure>,
    /// Plots.
    pub plots: Vec<Plot>,
    /// What was not measured and why.
    pub not_measured: Vec<(String, String)>,
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

fn json_opt(v: Option<f64>) -> String {
    v.map(json_num).unwrap_or_else(|| "null".into())
}

impl Report {
    /// The JSON rendering.
    pub fn to_json(&self) -> String {
        let mut o = String::from("{\n");
        let _ = writeln!(o, "  \"profile\": {},", json_str(&self.profile));
        let _ = writeln!(o, "  \"date\": {},", json_str(&self.date));
        let _ = writeln!(o, "  \"machine\": {},", json_str(&self.machine));
        let _ = writeln!(o, "  \"loadavg_start\": {},", json_str(&self.load_start));
        let _ = writeln!(o, "  \"loadavg_end\": {},", json_str(&self.load_end));
        let _ = writeln!(o, "  \"seconds\": {},", json_num(self.seconds));
        o.push_str("  \"figures\": [\n");
        for (i, f) in self.figures.iter().enumerate() {
            let target = match &f.target {
                Some(t) => format!("{{\"text\": {}, \"met\": {}}}", json_str(&t.text), t.met),
                None => "null".into(),
            };
            let _ = write!(
                o,
                "    {{\"group\": {}, \"name\": {}, \"mode\": {}, \"placement\": {}, \"median\": {}, \"p99\": {}, \"unit\": {}, \"baseline_name\": {}, \"baseline\": {}, \"ratio\": {}, \"target\": {}, \"note\": {}}}",
                json_str(&f.group),
                json_str(&f.name),
                json_str(&f.mode),
                json_str(&f.placement),
                json_num(f.value),
                json_opt(f.p99),
                json_str(&f.unit),
                json_str(&f.baseline_name),
                json_opt(f.baseline),
                json_opt(f.ratio),
                target,
                json_str(&f.note)
            );
            o.push_str(if i + 1 < self.figures.len() {
                ",\n"
            } else {
                "\n"
            });
        }
        o.push_str("  ],\n  \"series\": [\n");
        for (i, p) in self.plots.iter().enumerate() {
            let lines: Vec<String> = p
                .lines
                .iter()
                .map(|(n, pts)| {
                    let pts: Vec<String> = pts
                        .iter()
                        .map(|(x, y)| format!("[{}, {}]", json_num(*x), json_num(*y)))
                        .collect();
                    format!(
                        "{{\"name\": {}, \"points\": [{}]}}",
                        json_str(n),
                        pts.join(", ")
                    )
                })
                .collect();
            let _ = write!(
                o,
                "    {{\"file\": {}, \"title\": {}, \"x\": {}, \"y\": {}, \"lines\": [{}]}}",
                json_str(&format!("{}.svg", p.file)),
                json_str(&p.title),
                json_str(&p.x_label),
                json_str(&p.y_label),
                lines.join(", ")
            );
            o.push_str(if i + 1 < self.plots.len() {
                ",\n"
            } else {
                "\n"
            });
        }
        o.push_str("  ],\n  \"not_measured\": [");
        let nm: Vec<String> = self
            .not_measured
            .iter()
            .map(|(w, why)| format!("{{\"what\": {}, \"why\": {}}}", json_str(w), json_str(why)))
            .collect();
        o.push_str(&nm.join(", "));
        o.push_str("]\n}\n");
        o
    }

    /// The Markdown rendering.
    pub fn to_markdown(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "# mirrorctl bench ({})\n", self.profile);
        let _ = writeln!(
            o,
            "{} on {}. loadavg at start `{}`, at end `{}`; {:.0} s.\n",
            self.date, self.machine, self.load_start, self.load_end, self.seconds
        );
        o.push_str("Values are medians over repeats (latencies: over iterations, with p99). Ratio = ours / baseline, both measured in this run.\n\n");
        o.push_str("| group | figure | mode | placement | median | p99 | unit | baseline | baseline value | ratio | target | met | note |\n");
        o.push_str("|---|---|---|---|---:|---:|---|---|---:|---:|---|---|---|\n");
        for f in &self.figures {
            let (t, met) = match &f.target {
                Some(t) => (t.text.clone(), if t.met { "yes" } else { "**no**" }),
                None => (String::new(), ""),
            };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                f.group,
                f.name,
                f.mode,
                f.placement,
                fmt(f.value),
                f.p99.map(fmt).unwrap_or_default(),
                f.unit,
                f.baseline_name,
                f.baseline.map(fmt).unwrap_or_default(),
                f.ratio.map(|r| format!("{r:.2}x")).unwrap_or_default(),
                t,
                met,
                f.note
            );
        }
        if !self.not_measured.is_empty() {
            o.push_str("\n## Not measured\n\n");
            for (w, why) in &self.not_measured {
                let _ = writeln!(o, "- {w}: {why}");
            }
        }
        if !self.plots.is_empty() {
            o.push_str("\n## Plots\n\n");
            for p in &self.plots {
                let _ = writeln!(o, "- ![{}]({}.svg)", p.title, p.file);
            }
        }
        o
    }

    /// Write `results.json`, `results.md` and one SVG per plot into `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("results.json"), self.to_json())?;
        std::fs::write(dir.join("results.md"), self.to_markdown())?;
        for p in &self.plots {
            std::fs::write(dir.join(format!("{}.svg", p.file)), svg(p))?;
        }
        Ok(())
    }
}

/// Human formatting with 3 significant digits.
pub fn fmt(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.3}M", v / 1e6)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

/// Axis tick label: integers plainly, large values with k/M suffixes.
fn tick(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{}k", v / 1e3)
    } else if (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// An SVG line plot of `p` (log axes where asked).
pub fn svg(p: &Plot) -> String {
    let (w, h) = (720.0, 440.0);
    let (l, r, t, b) = (80.0, 200.0, 40.0, 60.0);
    let pts = p.lines.iter().flat_map(|(_, v)| v.iter()).filter(|(x, y)| {
        x.is_finite() && y.is_finite() && (!p.log_x || *x > 0.0) && (!p.log_y || *y > 0.0)
    });
    let tx = |v: f64, log: bool| if log { v.log10() } else { v };
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in pts {
        x0 = x0.min(tx(*x, p.log_x));
        x1 = x1.max(tx(*x, p.log_x));
        y0 = y0.min(tx(*y, p.log_y));
        y1 = y1.max(tx(*y, p.log_y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if p.log_y {
        y0 = y0.floor();
        y1 = y1.ceil();
    } else {
        y0 = y0.min(0.0);
    }
    if p.log_x {
        x0 = x0.floor();
        x1 = x1.ceil();
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-12 {
        y1 = y0 + 1.0;
    }
    let sx = |x: f64| l + (tx(x, p.log_x) - x0) / (x1 - x0) * (w - l - r);
    let sy = |y: f64| h - b - (tx(y, p.log_y) - y0) / (y1 - y0) * (h - t - b);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(o, "<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>");
    let _ = writeln!(
        o,
        "<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>",
        (l + w - r) / 2.0,
        esc(&p.title)
    );
    let _ = writeln!(
        o,
        "<rect x=\"{l}\" y=\"{t}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"black\"/>",
        w - l - r,
        h - t - b
    );
    // Ticks: decades on log axes, 5 steps on linear ones.
    let ticks = |lo: f64, hi: f64, log: bool| -> Vec<f64> {
        if log {
            (lo as i32..=hi as i32).map(|e| 10f64.powi(e)).collect()
        } else {
            (0..=5).map(|i| lo + (hi - lo) * i as f64 / 5.0).collect()
        }
    };
    for v in ticks(x0, x1, p.log_x) {
        let x = sx(v);
        let _ = writeln!(
            o,
            "<line x1=\"{x:.1}\" y1=\"{}\" x2=\"{x:.1}\" y2=\"{t}\" stroke=\"#ddd\"/><text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            h - b,
            h - b + 16.0,
            tick(v)
        );
    }
    for v in ticks(y0, y1, p.log_y) {
        let y = sy(v);
        let _ = writeln!(
            o,
            "<line x1=\"{l}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            w - r,
            l - 6.0,
            y + 4.0,
            tick(v)
        );
    }
    let _ = writeln!(
        o,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
        (l + w - r) / 2.0,
        h - 18.0,
        esc(&p.x_label)
    );
    let _ = writeln!(
        o,
        "<text x=\"18\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {})\">{}</text>",
        (t + h - b) / 2.0,
        (t + h - b) / 2.0,
        esc(&p.y_label)
    );
    for (i, (name, v)) in p.lines.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let pts: Vec<String> = v
            .iter()
            .filter(|(x, y)| {
                x.is_finite() && y.is_finite() && (!p.log_x || *x > 0.0) && (!p.log_y || *y > 0.0)
            })
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        let _ = writeln!(
            o,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"2\"/>",
            pts.join(" ")
        );
        for pt in &pts {
            let (x, y) = pt.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(o, "<circle cx=\"{x}\" cy=\"{y}\" r=\"3\" fill=\"{c}\"/>");
        }
        let ly = t + 10.0 + i as f64 * 18.0;
        let _ = writeln!(
            o,
            "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{c}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{}</text>",
            w - r + 10.0,
            w - r + 30.0,
            w - r + 35.0,
            ly + 4.0,
            esc(name)
        );
    }
    o.push_str("</svg>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_well_formed_outputs() {
        let r = Report {
            profile: "quick".into(),
            date: "2026-01-01T00:00:00Z".into(),
            machine: "test \"box\"".into(),
            figures: vec![Figure {
                group: "fault".into(),
                name: "x".into(),
                value: 1.5,
                p99: Some(f64::NAN),
                target: Some(Target {
                    text: ">= 1".into(),
                    met: true,
                }),
                ..Default::default()
            }],
            plots: vec![Plot {
                file: "p".into(),
                title: "a < b".into(),
                x_label: "x".into(),
                y_label: "y".into(),
                log_x: true,
                log_y: true,
                lines: vec![("l".into(), vec![(1.0, 10.0), (100.0, 1000.0), (0.0, 1.0)])],
            }],
            not_measured: vec![("daemon".into(), "no daemon yet".into())],
            ..Default::default()
        };
        let dir = std::env::temp_dir().join(format!("bench-report-{}", std::process::id()));
        r.write(&dir).unwrap();
        let json = std::fs::read_to_string(dir.join("results.json")).unwrap();
        assert!(json.contains("\"p99\": null") && json.contains("test \\\"box\\\""));
        // Balanced brackets outside strings.
        let (mut depth, mut in_str, mut esc) = (0i32, false, false);
        for c in json.chars() {
            match (in_str, esc, c) {
                (true, true, _) => esc = false,
                (true, false, '\\') => esc = true,
                (_, false, '"') => in_str = !in_str,
                (false, _, '{' | '[') => depth += 1,
                (false, _, '}' | ']') => depth -= 1,
                _ => {}
            }
            assert!(depth >= 0);
        }
        assert_eq!(depth, 0);
        let md = std::fs::read_to_string(dir.join("results.md")).unwrap();
        assert!(md.contains("| fault | x |") && md.contains("no daemon yet"));
        let svg = std::fs::read_to_string(dir.join("p.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a &lt; b") && svg.contains("<polyline"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
