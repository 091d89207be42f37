//! The N × N matrix of the whole model's pairwise L2 distances or cosines, with a colour scale.
//! Cells shrink with N (to 4 px); names are written every k-th row and column where cells are
//! smaller than a line of text, and values inside the cells where they fit.

use super::{
    fmt_num, font, outliers, short_name, text_width, Chart, DrawResult, INK, LABEL, OUTLIER, SMALL,
    TITLE,
};
use crate::analysis::compare::Comparison;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Which matrix.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Measure {
    /// `total.l2`.
    L2,
    /// `total.cos`.
    Cos,
}

/// A heatmap.
pub(super) struct Heatmap {
    measure: Measure,
    names: Vec<String>,
    far: Vec<bool>,
    values: Vec<Vec<f64>>,
    /// The colour scale's ends, in plotted units (log10 on a log scale).
    lo: f64,
    hi: f64,
    log: bool,
    cell: u32,
    label_width: u32,
    label_size: f64,
    cosine_of: &'static str,
}

const DIAGONAL: RGBColor = RGBColor(0xcc, 0xcc, 0xcc);
const TOP: u32 = 50;
const BAR_WIDTH: u32 = 18;

impl Heatmap {
    pub(super) fn new(c: &Comparison, measure: Measure) -> Heatmap {
        let n = c.models.len();
        let values = match measure {
            Measure::L2 => c.total.l2.clone(),
            Measure::Cos => c.total.cos.clone(),
        };
        let off: Vec<f64> = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| values[i][j])
            .filter(|v| v.is_finite())
            .collect();
        let min = off.iter().copied().fold(f64::INFINITY, f64::min);
        let max = off.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let log = measure == Measure::L2 && min > 0.0 && max / min > 100.0;
        let (mut lo, mut hi) = match (off.is_empty(), log) {
            (true, _) => (0.0, 1.0),
            (false, true) => (min.log10(), max.log10()),
            (false, false) => (min, max),
        };
        if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
            lo -= 0.5;
            hi += 0.5;
        }
        let cell = (900 / n.max(1) as u32).clamp(4, 72);
        let label_size = if cell >= 16 { LABEL } else { SMALL };
        let names: Vec<String> = c.models.iter().map(|m| short_name(&m.name)).collect();
        let label_width = names
            .iter()
            .map(|s| text_width(s, label_size))
            .max()
            .unwrap_or(0)
            + 8;
        let far = outliers(c);
        Heatmap {
            measure,
            far: (0..n).map(|i| far.contains(&i)).collect(),
            names,
            values,
            lo,
            hi,
            log,
            cell,
            label_width,
            label_size,
            cosine_of: if c.base.is_some() {
                "task vectors"
            } else {
                "weights"
            },
        }
    }

    /// Every how many rows a name is written.
    fn label_step(&self) -> usize {
        16u32.div_ceil(self.cell).max(1) as usize
    }

    /// The rows (and columns) named: the outliers, then every [`Heatmap::label_step`]-th row
    /// not too close to a row already named.
    fn labelled(&self) -> Vec<usize> {
        let step = self.label_step();
        let n = self.names.len();
        let mut rows: Vec<usize> = Vec::new();
        let candidates = (0..n)
            .filter(|&i| self.far[i])
            .chain((0..n).filter(|&i| !self.far[i] && i % step == 0));
        for i in candidates {
            if rows.iter().all(|&r| r.abs_diff(i) >= step) {
                rows.push(i);
            }
        }
        rows
    }

    fn matrix(&self) -> u32 {
        self.cell * self.names.len() as u32
    }

    /// The colour of `v`, `None` when it has none.
    fn colour(&self, v: f64) -> Option<RGBColor> {
        let p = if self.log {
            (v > 0.0).then(|| v.log10())?
        } else {
            v
        };
        p.is_finite()
            .then(|| ViridisRGB::get_color(((p - self.lo) / (self.hi - self.lo)).clamp(0.0, 1.0)))
    }
}

impl Chart for Heatmap {
    fn title(&self) -> String {
        match self.measure {
            Measure::L2 => "Pairwise L2 distances (whole model)".to_string(),
            Measure::Cos => format!("Pairwise cosines of the {} (whole model)", self.cosine_of),
        }
    }

    fn size(&self) -> (u32, u32) {
        let m = self.matrix().max(220);
        (
            self.label_width + self.matrix() + 60 + BAR_WIDTH + 100,
            TOP + self.label_width + m + 50,
        )
    }

    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        area.fill(&WHITE)?;
        let n = self.names.len();
        let (cell, step) = (self.cell as i32, self.label_step());
        let left = 10 + self.label_width as i32;
        let top = TOP as i32 + self.label_width as i32;
        let side = self.matrix() as i32;
        area.draw(&Text::new(self.title(), (10, 14), font(TITLE)))?;
        let label = font(self.label_size);
        for i in self.labelled() {
            let name = &self.names[i];
            let label = if self.far[i] {
                label.color(&OUTLIER)
            } else {
                label.clone()
            };
            let mid = i as i32 * cell + cell / 2;
            // The row's name, right-aligned left of the matrix.
            area.draw(&Text::new(
                name.clone(),
                (left - 6, top + mid),
                label.pos(Pos::new(HPos::Right, VPos::Center)),
            ))?;
            // The column's, read upwards above it.
            area.draw(&Text::new(
                name.clone(),
                (left + mid, top - 6),
                label
                    .pos(Pos::new(HPos::Left, VPos::Center))
                    .transform(FontTransform::Rotate270),
            ))?;
        }
        let show_values = cell >= 56;
        for i in 0..n {
            for j in 0..n {
                let (x, y) = (left + j as i32 * cell, top + i as i32 * cell);
                let v = self.values[i][j];
                let fill = if i == j {
                    DIAGONAL
                } else {
                    match self.colour(v) {
                        Some(c) => c,
                        None => WHITE,
                    }
                };
                area.draw(&Rectangle::new(
                    [(x, y), (x + cell, y + cell)],
                    fill.filled(),
                ))?;
                if show_values && i != j && v.is_finite() {
                    let light = self.colour(v).is_some_and(|c| {
                        0.299 * c.0 as f64 + 0.587 * c.1 as f64 + 0.114 * c.2 as f64 > 140.0
                    });
                    let ink = if light { INK } else { WHITE };
                    area.draw(&Text::new(
                        fmt_num(v),
                        (x + cell / 2, y + cell / 2),
                        font(SMALL)
                            .color(&ink)
                            .pos(Pos::new(HPos::Center, VPos::Center)),
                    ))?;
                }
            }
        }
        area.draw(&Rectangle::new(
            [(left, top), (left + side, top + side)],
            INK.stroke_width(1),
        ))?;
        // The colour scale: bottom = lo, top = hi.
        let bx = left + side + 40;
        let bh = side.max(220);
        let steps = 120;
        for k in 0..steps {
            let t = (k as f64 + 0.5) / steps as f64;
            let y0 = top + bh - (k + 1) * bh / steps;
            let y1 = top + bh - k * bh / steps;
            area.draw(&Rectangle::new(
                [(bx, y0), (bx + BAR_WIDTH as i32, y1)],
                ViridisRGB::get_color(t).filled(),
            ))?;
        }
        area.draw(&Rectangle::new(
            [(bx, top), (bx + BAR_WIDTH as i32, top + bh)],
            INK.stroke_width(1),
        ))?;
        for p in self.ticks() {
            let y = top + bh - ((p - self.lo) / (self.hi - self.lo) * bh as f64).round() as i32;
            let v = if self.log { 10f64.powf(p) } else { p };
            area.draw(&PathElement::new(
                vec![(bx + BAR_WIDTH as i32, y), (bx + BAR_WIDTH as i32 + 5, y)],
                INK.stroke_width(1),
            ))?;
            area.draw(&Text::new(
                fmt_num(v),
                (bx + BAR_WIDTH as i32 + 8, y),
                font(LABEL).pos(Pos::new(HPos::Left, VPos::Center)),
            ))?;
        }
        let mut note = "grey: the diagonal; white: no value".to_string();
        if self.log {
            note.push_str("; log colour scale");
        }
        if n > 1 && step > 1 {
            note.push_str(&format!(
                "; one name in {step} shown, and the outliers' (red)"
            ));
        }
        area.draw(&Text::new(note, (10, top + bh + 18), font(LABEL)))?;
        Ok(())
    }
}

impl Heatmap {
    /// The colour scale's ticks, in plotted units: its ends and three between, or the decades
    /// inside it on a log scale.
    fn ticks(&self) -> Vec<f64> {
        let (lo, hi) = (self.lo, self.hi);
        if self.log {
            let mut t = vec![lo];
            let mut d = lo.floor() + 1.0;
            while d < hi {
                // Not too close to the ends, whose labels would overlap.
                if d - lo > 0.08 * (hi - lo) && hi - d > 0.08 * (hi - lo) {
                    t.push(d);
                }
                d += 1.0;
            }
            t.push(hi);
            t
        } else {
            (0..5).map(|k| lo + (hi - lo) * k as f64 / 4.0).collect()
        }
    }
}
