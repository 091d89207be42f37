//! Charts of a [`Comparison`], each drawn once by generic plotters code onto an SVG and a PNG:
//! per group (the whole model, then each component) a bar chart of each model's distance, a
//! per-block line chart, the N × N heatmaps of the whole model's L2 distances and cosines, and the
//! 2-D maps of the models (classical MDS).
//!
//! Text is drawn with DejaVu Sans, embedded (registered as plotters' `sans-serif`), so the PNGs
//! need no system font; the SVGs name `sans-serif` and leave the font to the viewer. Sizes grow
//! with the number of models so that 200 of them stay legible.

mod bar;
mod heatmap;
mod lines;
mod map;

use super::compare::Comparison;
use super::stats::ModelStats;
use crate::error::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Once;

/// DejaVu Sans (Bitstream Vera license: `assets/DejaVuSans-LICENSE.txt`).
const FONT: &[u8] = include_bytes!("../../../assets/DejaVuSans.ttf");

/// The font family every chart names.
const FAMILY: &str = "sans-serif";

/// The fill of a model's bar.
const BAR: RGBColor = RGBColor(0x48, 0x78, 0xd0);
/// The fill of an outlier's bar and point.
const OUTLIER: RGBColor = RGBColor(0xd6, 0x27, 0x28);
/// A model's point on a map.
const POINT: RGBColor = RGBColor(0x1f, 0x5f, 0xa8);
/// Text.
const INK: RGBColor = RGBColor(0x22, 0x22, 0x22);
/// Lines of the models not named in a line chart.
const GREY: RGBColor = RGBColor(0x9a, 0x9a, 0x9a);
/// Distinct colours for named lines (Tableau 10, then two more).
const PALETTE: [RGBColor; 12] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
    RGBColor(0x39, 0x3b, 0x79),
    RGBColor(0x63, 0x79, 0x39),
];

/// Text sizes, in plotters' units (the SVG font size is 1/1.24 of it).
const TITLE: f64 = 22.0;
const AXIS: f64 = 17.0;
const LABEL: f64 = 14.5;
const SMALL: f64 = 13.5;
/// Grid lines.
const GRID: RGBColor = RGBColor(0xe2, 0xe2, 0xe2);
const MINOR: RGBColor = RGBColor(0xf2, 0xf2, 0xf2);

/// Names longer than this are cut, with an ellipsis.
const NAME_CHARS: usize = 32;

/// A chart written as SVG and PNG.
#[derive(Clone, Debug, PartialEq)]
pub struct ChartFile {
    /// Its name, also its files' stem: `bars_total`, `bars_<component>`, `blocks`,
    /// `heatmap_l2`, `heatmap_cos`, `map_all`, `map_<component>`.
    pub name: String,
    /// What it shows, in words.
    pub title: String,
    /// The SVG file.
    pub svg: PathBuf,
    /// The PNG file.
    pub png: PathBuf,
}

/// What a chart's drawing returns on the backend `DB`.
type DrawResult<DB> =
    std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// A chart, drawn the same way on any backend.
trait Chart {
    /// What it shows, in words.
    fn title(&self) -> String;
    /// Its size in pixels.
    fn size(&self) -> (u32, u32);
    /// Draws it on `area` (of [`Chart::size`]).
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> DrawResult<DB>;
}

/// Writes the charts of `c` into `dir` (created if missing) as `<name>.svg` and `<name>.png`, and
/// returns them in the order a report shows them: the whole model's bars, the blocks, the
/// heatmaps and the map, then each component's bars and map. Pools of one model get no heatmap
/// nor map.
pub fn write_charts(c: &Comparison, dir: &Path) -> Result<Vec<ChartFile>> {
    register_font();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let n = c.models.len();
    let mut out = Vec::new();
    out.push(render(
        &bar::Bars::new(c, "total", &c.total),
        dir,
        "bars_total",
    )?);
    if !c.blocks.is_empty() {
        out.push(render(&lines::Lines::new(c), dir, "blocks")?);
    }
    if n >= 2 {
        out.push(render(
            &heatmap::Heatmap::new(c, heatmap::Measure::L2),
            dir,
            "heatmap_l2",
        )?);
        out.push(render(
            &heatmap::Heatmap::new(c, heatmap::Measure::Cos),
            dir,
            "heatmap_cos",
        )?);
        if let Some(m) = c.maps.first() {
            out.push(render(
                &map::Map::new(c, m),
                dir,
                &format!("map_{}", file_stem(&m.name)),
            )?);
        }
    }
    // One component is the whole model again.
    if c.components.len() > 1 {
        for comp in &c.components {
            out.push(render(
                &bar::Bars::new(c, &comp.name, &comp.stats),
                dir,
                &format!("bars_{}", file_stem(&comp.name)),
            )?);
            if n >= 2 {
                if let Some(m) = c.maps.iter().skip(1).find(|m| m.name == comp.name) {
                    out.push(render(
                        &map::Map::new(c, m),
                        dir,
                        &format!("map_{}", file_stem(&m.name)),
                    )?);
                }
            }
        }
    }
    Ok(out)
}

/// Draws `chart` as `dir/<name>.svg` and `dir/<name>.png`.
fn render<C: Chart>(chart: &C, dir: &Path, name: &str) -> Result<ChartFile> {
    let svg = dir.join(format!("{name}.svg"));
    let png = dir.join(format!("{name}.png"));
    let size = chart.size();
    let failed = |path: &Path, e: &dyn std::fmt::Display| Error::Output {
        path: path.to_path_buf(),
        message: format!("drawing the chart failed: {e}"),
    };
    {
        let area = SVGBackend::new(&svg, size).into_drawing_area();
        chart.draw(&area).map_err(|e| failed(&svg, &e))?;
        area.present().map_err(|e| failed(&svg, &e))?;
    }
    {
        let area = BitMapBackend::new(&png, size).into_drawing_area();
        chart.draw(&area).map_err(|e| failed(&png, &e))?;
        area.present().map_err(|e| failed(&png, &e))?;
    }
    Ok(ChartFile {
        name: name.to_string(),
        title: chart.title(),
        svg,
        png,
    })
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid font: a failure is a build defect, seen by every test.
        if plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_err() {
            panic!("the embedded DejaVu Sans does not parse");
        }
    });
}

/// The text style of `size` pixels.
fn font(size: f64) -> TextStyle<'static> {
    (FAMILY, size).into_font().color(&INK)
}

/// The width in pixels of `text` at `size` (a little more than drawn, never less).
fn text_width(text: &str, size: f64) -> u32 {
    (FAMILY, size)
        .into_font()
        .box_size(text)
        .map(|(w, _)| w + 2)
        .unwrap_or_else(|_| (text.chars().count() as f64 * size * 0.62) as u32)
}

/// `name` cut to [`NAME_CHARS`] characters, ending with an ellipsis when cut.
fn short_name(name: &str) -> String {
    if name.chars().count() <= NAME_CHARS {
        name.to_string()
    } else {
        let mut s: String = name.chars().take(NAME_CHARS - 1).collect();
        s.push('…');
        s
    }
}

/// A name usable as a file stem.
pub(super) fn file_stem(name: &str) -> String {
    name.chars()
        .map(|ch| {
            if ch.is_ascii_alphanumeric() || ch == '_' || ch == '-' {
                ch
            } else {
                '_'
            }
        })
        .collect()
}

/// The pool's outliers, by model index (flagged by any measure).
fn outliers(c: &Comparison) -> HashSet<usize> {
    c.models
        .iter()
        .enumerate()
        .filter(|(_, m)| c.outliers.iter().any(|o| o.model == m.name))
        .map(|(i, _)| i)
        .collect()
}

/// The distance a chart plots: to the base when there is one, else to the pool mean.
fn distance(c: &Comparison, s: &ModelStats) -> f64 {
    if c.base.is_some() {
        s.dist_base.unwrap_or(f64::NAN)
    } else {
        s.dist_mean
    }
}

/// What [`distance`] measures, in words.
fn distance_name(c: &Comparison) -> String {
    match &c.base {
        Some(b) => format!("L2 distance to the base ({})", short_name(&b.name)),
        None => "L2 distance to the pool mean".to_string(),
    }
}

/// A value axis: linear from 0, or log10 where the positive values span more than two decades.
/// Charts plot [`Scale::pos`] on a linear axis and label it with [`Scale::label`].
#[derive(Clone, Copy, Debug)]
struct Scale {
    log: bool,
    /// The axis's ends, in plotted units.
    lo: f64,
    hi: f64,
}

impl Scale {
    /// The scale of `values` (non-finite ones ignored).
    fn of(values: impl IntoIterator<Item = f64>) -> Scale {
        let v: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if v.is_empty() {
            return Scale {
                log: false,
                lo: 0.0,
                hi: 1.0,
            };
        }
        if min > 0.0 && max / min > 100.0 {
            return Scale {
                log: true,
                lo: min.log10().floor(),
                hi: max.log10().ceil(),
            };
        }
        let lo = min.min(0.0);
        let hi = if max > 0.0 { max * 1.05 } else { 1.0 };
        Scale {
            log: false,
            lo: lo * 1.05,
            hi,
        }
    }

    /// Where `v` is plotted; `None` for values the axis cannot show.
    fn pos(&self, v: f64) -> Option<f64> {
        if !v.is_finite() {
            None
        } else if self.log {
            (v > 0.0).then(|| v.log10())
        } else {
            Some(v)
        }
    }

    /// The tick label at plotted position `x` (log axes label whole decades only).
    fn label(&self, x: f64) -> String {
        if self.log {
            if (x - x.round()).abs() < 1e-6 {
                fmt_num(10f64.powf(x.round()))
            } else {
                String::new()
            }
        } else {
            fmt_num(x)
        }
    }

    /// How many tick labels to ask for: whole decades on a log axis, else `linear`.
    fn labels(&self, linear: usize) -> usize {
        if self.log {
            (self.hi - self.lo).round() as usize + 1
        } else {
            linear
        }
    }

    /// The light lines plotters draws between ticks: none on a log axis (see [`Scale::minor`]).
    fn light(&self) -> RGBAColor {
        MINOR.mix(if self.log { 0.0 } else { 1.0 })
    }

    /// The positions of a log axis's minor grid lines (2 to 9 times each decade); none on a
    /// linear axis.
    fn minor(&self) -> Vec<f64> {
        if !self.log {
            return Vec::new();
        }
        let mut out = Vec::new();
        for d in self.lo.floor() as i32..self.hi.ceil() as i32 {
            for k in 2..10 {
                let p = d as f64 + (k as f64).log10();
                if p > self.lo && p < self.hi {
                    out.push(p);
                }
            }
        }
        out
    }

    /// The axis title's suffix.
    fn note(&self) -> &'static str {
        if self.log {
            " (log scale)"
        } else {
            ""
        }
    }
}

/// A number in at most 4 significant digits, in scientific notation when very small or large.
pub(crate) fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if (1e-3..1e5).contains(&a) {
        let digits = (3 - a.log10().floor() as i32).clamp(0, 6) as usize;
        let s = format!("{v:.digits$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    } else {
        let s = format!("{v:.3e}");
        // 1.500e-4 → 1.5e-4
        match s.split_once('e') {
            Some((m, e)) if m.contains('.') => {
                format!("{}e{e}", m.trim_end_matches('0').trim_end_matches('.'))
            }
            _ => s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_names() {
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_num(1.0), "1");
        assert_eq!(fmt_num(12.345678), "12.35");
        assert_eq!(fmt_num(0.0123456), "0.01235");
        assert_eq!(fmt_num(1.5e-4), "1.5e-4");
        assert_eq!(fmt_num(f64::NAN), "n/a");
        assert_eq!(short_name("abc"), "abc");
        let long = "x".repeat(40);
        assert_eq!(short_name(&long).chars().count(), NAME_CHARS);
        assert!(short_name(&long).ends_with('…'));
        assert_eq!(file_stem("clip_l"), "clip_l");
        assert_eq!(file_stem("a/b"), "a_b");
    }

    #[test]
    fn scales() {
        let s = Scale::of([1.0, 2.0, f64::NAN]);
        assert!(!s.log && s.lo == 0.0 && s.hi > 2.0);
        let s = Scale::of([1e-4, 1.0]);
        assert!(s.log && s.lo == -4.0 && s.hi == 0.0);
        assert_eq!(s.label(-2.0), "0.01");
        assert_eq!(s.label(-2.5), "");
        assert_eq!(s.pos(0.0), None);
        let s = Scale::of([0.0, 1e-4, 1.0]);
        assert!(!s.log);
        let s = Scale::of(Vec::new());
        assert!(!s.log && s.hi == 1.0);
    }
}
