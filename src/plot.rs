//! Figures, with plotters: the training curves of a run (in the spirit of the paper's Figure 2) and
//! a Figure-3-style bar chart of evaluation summaries with bootstrap error bars. Each figure is
//! drawn once, generically over the drawing backend, and written as PNG and SVG.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;

use crate::verifier::Stage;

const FONT: &str = "sans-serif";

/// DejaVu Sans (assets/fonts, Bitstream Vera license), compiled in so that drawing needs no
/// system font library: the binary links only libc, libm and libgcc (a bare CUDA image has no
/// fontconfig or freetype).
static FONT_BYTES: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

/// Registers the embedded font as [`FONT`] (once per process).
fn register_font() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok()
    });
    ok.then_some(())
        .ok_or_else(|| anyhow!("the embedded font (assets/fonts/DejaVuSans.ttf) is invalid"))
}
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn draw_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing failed: {e}")
}

/// The per-step numbers of a run, read from its `metrics.jsonl`.
#[derive(Debug, Clone, Default)]
pub struct RunCurves {
    /// Key → (step, value) for every numeric key; absent or null values are skipped.
    pub series: BTreeMap<String, Vec<(f64, f64)>>,
    /// Per step, the share of each of the six stages (sums to 1 where the step had replies).
    pub stage_shares: Vec<(f64, [f64; 6])>,
}

impl RunCurves {
    /// Reads `metrics.jsonl`; a line that is not a JSON object is an error naming file and line.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let mut curves = Self::default();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
            let obj = v
                .as_object()
                .ok_or_else(|| anyhow!("{}:{}: not a JSON object", path.display(), i + 1))?;
            let step = obj
                .get("step")
                .and_then(Value::as_f64)
                .ok_or_else(|| anyhow!("{}:{}: no numeric `step`", path.display(), i + 1))?;
            for (k, val) in obj {
                if let Some(x) = val.as_f64().filter(|x| x.is_finite()) {
                    curves.series.entry(k.clone()).or_default().push((step, x));
                }
            }
            if let Some(stages) = obj.get("stages").and_then(Value::as_object) {
                let counts: Vec<f64> = Stage::ALL
                    .iter()
                    .map(|s| stages.get(s.name()).and_then(Value::as_f64).unwrap_or(0.0))
                    .collect();
                let total: f64 = counts.iter().sum();
                if total > 0.0 {
                    let mut shares = [0.0; 6];
                    for (s, c) in shares.iter_mut().zip(&counts) {
                        *s = c / total;
                    }
                    curves.stage_shares.push((step, shares));
                }
            }
        }
        if curves.series.get("step").is_none_or(|s| s.is_empty()) {
            bail!("{}: no steps recorded", path.display());
        }
        Ok(curves)
    }

    fn get(&self, key: &str) -> &[(f64, f64)] {
        self.series.get(key).map(Vec::as_slice).unwrap_or(&[])
    }

    fn step_range(&self) -> std::ops::Range<f64> {
        let steps = self.get("step");
        let lo = steps.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
        let hi = steps.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
        if hi > lo {
            lo..hi
        } else {
            lo - 1.0..hi + 1.0
        }
    }
}

/// A y range that holds every value of the given series, padded by 5 %.
fn auto_range<'a>(series: impl IntoIterator<Item = &'a [(f64, f64)]>) -> std::ops::Range<f64> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for s in series {
        for &(_, y) in s {
            lo = lo.min(y);
            hi = hi.max(y);
        }
    }
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let pad = if hi > lo {
        0.05 * (hi - lo)
    } else {
        0.1 * lo.abs().max(1e-3)
    };
    lo - pad..hi + pad
}

type StepChart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A titled panel with `step` on the x axis and its mesh drawn.
fn step_chart<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    title: &str,
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
) -> Result<StepChart<'a, DB>> {
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 18))
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(52)
        .build_cartesian_2d(x, y)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style((FONT, 12))
        .draw()
        .map_err(draw_err)?;
    Ok(chart)
}

/// One panel: named series as lines (a series with few points gets markers too).
struct Panel<'a> {
    title: &'a str,
    lines: Vec<(&'a str, &'a [(f64, f64)])>,
    y: Option<std::ops::Range<f64>>,
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    x: std::ops::Range<f64>,
    p: &Panel,
) -> Result<()> {
    let y =
        p.y.clone()
            .unwrap_or_else(|| auto_range(p.lines.iter().map(|l| l.1)));
    let mut chart = step_chart(area, p.title, x, y)?;
    let mut named = false;
    for (i, (name, pts)) in p.lines.iter().enumerate() {
        if pts.is_empty() {
            continue;
        }
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(draw_err)?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
        if pts.len() <= 30 {
            chart
                .draw_series(pts.iter().map(|&q| Circle::new(q, 3, color.filled())))
                .map_err(draw_err)?;
        }
        named |= !name.is_empty();
    }
    if named && p.lines.len() > 1 {
        chart
            .configure_series_labels()
            .label_font((FONT, 12))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(draw_err)?;
    }
    Ok(())
}

/// The six-stage shares over steps, stacked to 1.
fn draw_stages<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    x: std::ops::Range<f64>,
    shares: &[(f64, [f64; 6])],
) -> Result<()> {
    let mut chart = step_chart(area, "stage shares (rollouts)", x, 0.0..1.0)?;
    // Draw the cumulative share up to stage k, from the last stage down, so each band shows.
    for k in (0..6).rev() {
        let color = PALETTE[k];
        let pts: Vec<(f64, f64)> = shares
            .iter()
            .map(|(s, sh)| (*s, sh[..=k].iter().sum::<f64>().min(1.0)))
            .collect();
        chart
            .draw_series(AreaSeries::new(pts, 0.0, color.mix(0.85).filled()))
            .map_err(draw_err)?
            .label(Stage::ALL[k].name().replace('_', " "))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 11))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(draw_err)?;
    Ok(())
}

fn draw_training<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, c: &RunCurves) -> Result<()> {
    root.fill(&WHITE).map_err(draw_err)?;
    let x = c.step_range();
    let rate = Some(-0.02..1.02);
    let panels = [
        Panel {
            title: "mean reward",
            lines: vec![("", c.get("reward_mean"))],
            y: Some(-1.05..1.05),
        },
        Panel {
            title: "format rate",
            lines: vec![
                ("rollout", c.get("format_rate")),
                ("held-out (greedy)", c.get("eval_format_rate")),
            ],
            y: rate.clone(),
        },
        Panel {
            title: "accuracy",
            lines: vec![
                ("rollout", c.get("accuracy")),
                ("held-out (greedy)", c.get("eval_accuracy")),
            ],
            y: rate,
        },
        Panel {
            title: "length",
            lines: vec![
                ("response (tokens)", c.get("response_len_mean")),
                ("think (words)", c.get("think_len_mean")),
            ],
            y: None,
        },
        Panel {
            title: "KL to reference",
            lines: vec![("", c.get("kl"))],
            y: None,
        },
        Panel {
            title: "entropy (nats/token)",
            lines: vec![("", c.get("entropy"))],
            y: None,
        },
        Panel {
            title: "clip fraction / explained variance",
            lines: vec![
                ("clip fraction", c.get("clip_frac")),
                ("explained var", c.get("explained_var")),
            ],
            y: None,
        },
    ];
    let areas = root.split_evenly((2, 4));
    for (area, p) in areas.iter().zip(&panels) {
        draw_panel(area, x.clone(), p)?;
    }
    draw_stages(&areas[7], x, &c.stage_shares)?;
    root.present().map_err(draw_err)?;
    Ok(())
}

/// Writes `training.png` and `training.svg` for a run folder (or a `metrics.jsonl` path) into
/// `out`; returns the files written.
pub fn training_figures(run: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    register_font()?;
    let metrics = if run.is_dir() {
        run.join("metrics.jsonl")
    } else {
        run.to_path_buf()
    };
    let curves = RunCurves::read(&metrics)?;
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let (png, svg) = (out.join("training.png"), out.join("training.svg"));
    let size = (1600, 760);
    draw_training(&BitMapBackend::new(&png, size).into_drawing_area(), &curves)
        .with_context(|| format!("{}: cannot draw", png.display()))?;
    draw_training(&SVGBackend::new(&svg, size).into_drawing_area(), &curves)
        .with_context(|| format!("{}: cannot draw", svg.display()))?;
    Ok(vec![png, svg])
}

/// One model's accuracy per dataset, from an `eval` summary.json.
#[derive(Debug, Clone)]
pub struct EvalBars {
    pub model: String,
    /// (dataset, accuracy, bootstrap std)
    pub datasets: Vec<(String, f64, f64)>,
}

impl EvalBars {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let v: Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
        let model = v
            .get("model")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("{}: no `model` (not an eval summary.json?)", path.display()))?
            .to_string();
        let ds = v
            .get("datasets")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("{}: no `datasets` array", path.display()))?;
        let datasets = ds
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let name = d.get("name").and_then(Value::as_str);
                let acc = d.pointer("/overall/accuracy").and_then(Value::as_f64);
                let std = d.pointer("/overall/accuracy_std").and_then(Value::as_f64);
                match (name, acc, std) {
                    (Some(n), Some(a), Some(s)) => Ok((n.to_string(), a, s)),
                    _ => Err(anyhow!(
                        "{}: datasets[{i}] lacks name, overall.accuracy or overall.accuracy_std",
                        path.display()
                    )),
                }
            })
            .collect::<Result<_>>()?;
        Ok(Self { model, datasets })
    }
}

fn draw_eval<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, models: &[EvalBars]) -> Result<()> {
    root.fill(&WHITE).map_err(draw_err)?;
    // Columns: datasets in order of first appearance.
    let mut names: Vec<String> = Vec::new();
    for m in models {
        for d in &m.datasets {
            if !names.contains(&d.0) {
                names.push(d.0.clone());
            }
        }
    }
    let top = models
        .iter()
        .flat_map(|m| m.datasets.iter().map(|d| 100.0 * (d.1 + d.2)))
        .fold(10.0f64, f64::max);
    let top = (top * 1.15).min(100.0).max(top);
    let labels = names.clone();
    let mut chart = ChartBuilder::on(root)
        .caption("accuracy (%), ± bootstrap std", (FONT, 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(-0.5..names.len() as f64 - 0.5, 0.0..top)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .disable_x_mesh()
        .x_labels(names.len().max(1))
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .label_style((FONT, 14))
        .draw()
        .map_err(draw_err)?;
    let k = models.len().max(1) as f64;
    let width = 0.8 / k;
    for (mi, m) in models.iter().enumerate() {
        let color = PALETTE[mi % PALETTE.len()];
        let bars: Vec<(f64, f64, f64)> = m
            .datasets
            .iter()
            .filter_map(|(n, a, s)| {
                let col = names.iter().position(|x| x == n)? as f64;
                Some((col - 0.4 + width * (mi as f64 + 0.5), 100.0 * a, 100.0 * s))
            })
            .collect();
        chart
            .draw_series(bars.iter().map(|&(x, a, _)| {
                Rectangle::new(
                    [(x - 0.45 * width, 0.0), (x + 0.45 * width, a)],
                    color.filled(),
                )
            }))
            .map_err(draw_err)?
            .label(m.model.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        chart
            .draw_series(bars.iter().map(|&(x, a, s)| {
                ErrorBar::new_vertical(x, (a - s).max(0.0), a, a + s, BLACK.stroke_width(2), 8)
            }))
            .map_err(draw_err)?;
        chart
            .draw_series(bars.iter().map(|&(x, a, s)| {
                Text::new(
                    format!("{a:.1}"),
                    (x - 0.2 * width, a + s + 0.01 * top),
                    (FONT, 12),
                )
            }))
            .map_err(draw_err)?;
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(draw_err)?;
    root.present().map_err(draw_err)?;
    Ok(())
}

/// Writes `eval.png` and `eval.svg` (one bar group per dataset, one bar per summary) into `out`.
pub fn eval_figures(summaries: &[PathBuf], out: &Path) -> Result<Vec<PathBuf>> {
    register_font()?;
    if summaries.is_empty() {
        bail!("no summary.json given");
    }
    let models = summaries
        .iter()
        .map(|p| {
            if p.is_dir() {
                EvalBars::read(&p.join("summary.json"))
            } else {
                EvalBars::read(p)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let (png, svg) = (out.join("eval.png"), out.join("eval.svg"));
    let n_ds = models.iter().map(|m| m.datasets.len()).max().unwrap_or(1);
    let size = ((360 + 220 * n_ds as u32).min(1800), 600);
    draw_eval(&BitMapBackend::new(&png, size).into_drawing_area(), &models)
        .with_context(|| format!("{}: cannot draw", png.display()))?;
    draw_eval(&SVGBackend::new(&svg, size).into_drawing_area(), &models)
        .with_context(|| format!("{}: cannot draw", svg.display()))?;
    Ok(vec![png, svg])
}
