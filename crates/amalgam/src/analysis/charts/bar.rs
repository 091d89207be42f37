//! A horizontal bar per model: its distance to the base (or to the pool mean) in one group.

use super::{
    distance, distance_name, font, outliers, short_name, text_width, Chart, DrawResult, Scale,
    AXIS, BAR, GRID, LABEL, MINOR, OUTLIER, SMALL, TITLE,
};
use crate::analysis::compare::Comparison;
use crate::analysis::stats::GroupStats;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One group's bar chart.
pub(super) struct Bars {
    group: String,
    axis: String,
    /// Per model, in pool order: the name shown, the distance, whether an outlier.
    rows: Vec<(String, f64, bool)>,
    scale: Scale,
    label_width: u32,
}

impl Bars {
    pub(super) fn new(c: &Comparison, group: &str, stats: &GroupStats) -> Bars {
        let far = outliers(c);
        let rows: Vec<(String, f64, bool)> = c
            .models
            .iter()
            .zip(&stats.models)
            .enumerate()
            .map(|(i, (m, s))| (short_name(&m.name), distance(c, s), far.contains(&i)))
            .collect();
        let scale = Scale::of(rows.iter().map(|r| r.1));
        let label_width = rows
            .iter()
            .map(|r| text_width(&r.0, LABEL))
            .max()
            .unwrap_or(0)
            + 14;
        Bars {
            group: group.to_string(),
            axis: format!("{}{}", distance_name(c), scale.note()),
            rows,
            scale,
            label_width,
        }
    }

    /// Pixels per model.
    fn row(&self) -> u32 {
        match self.rows.len() {
            0..=20 => 28,
            21..=60 => 20,
            _ => 15,
        }
    }
}

/// `n` rows, as segments (plotters' integer ranges include their end: `0..n - 1` has `n`
/// values; a zero-width range would divide by zero, so one row gets two).
pub(super) fn rows(
    n: usize,
) -> plotters::coord::ranged1d::SegmentedCoord<plotters::coord::types::RangedCoordi32> {
    (0..(n as i32 - 1).max(1)).into_segmented()
}

impl Chart for Bars {
    fn title(&self) -> String {
        format!("Distance per model: {}", self.group)
    }

    fn size(&self) -> (u32, u32) {
        (
            self.label_width + 760,
            110 + self.row() * self.rows.len() as u32,
        )
    }

    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        area.fill(&WHITE)?;
        let n = self.rows.len();
        let s = self.scale;
        let mut chart = ChartBuilder::on(area)
            .caption(self.title(), font(TITLE))
            .margin(12)
            .margin_right(30)
            .x_label_area_size(44)
            .y_label_area_size(self.label_width)
            .build_cartesian_2d(s.lo..s.hi, rows(n))?;
        // Row 0 is at the bottom: the first model is drawn at the top.
        let name_of = |v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(r) if (0..n as i32).contains(r) => {
                self.rows[n - 1 - *r as usize].0.clone()
            }
            _ => String::new(),
        };
        let tick = |x: &f64| s.label(*x);
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n + 1)
            .y_label_formatter(&name_of)
            .x_labels(s.labels(10))
            .x_label_formatter(&tick)
            .x_desc(self.axis.as_str())
            .label_style(font(LABEL))
            .axis_desc_style(font(AXIS))
            .light_line_style(s.light())
            .bold_line_style(GRID)
            .draw()?;
        chart.draw_series(s.minor().into_iter().map(|x| {
            PathElement::new(
                vec![
                    (x, SegmentValue::Exact(0)),
                    (x, SegmentValue::Exact(n as i32)),
                ],
                MINOR,
            )
        }))?;
        let pad = if self.row() > 16 { 4 } else { 2 };
        let bars = self.rows.iter().enumerate().filter_map(|(i, (_, v, far))| {
            let x = s.pos(*v)?;
            let r = (n - 1 - i) as i32;
            let colour = if *far { OUTLIER } else { BAR };
            let mut rect = Rectangle::new(
                [
                    (s.lo, SegmentValue::Exact(r)),
                    (x, SegmentValue::Exact(r + 1)),
                ],
                colour.filled(),
            );
            rect.set_margin(pad, pad, 0, 0);
            Some(rect)
        });
        chart.draw_series(bars)?;
        // Values the axis cannot show are said so.
        let missing = self
            .rows
            .iter()
            .enumerate()
            .filter(|(_, (_, v, _))| s.pos(*v).is_none())
            .map(|(i, (_, v, _))| {
                let r = (n - 1 - i) as i32;
                Text::new(
                    if v.is_finite() { "0" } else { "n/a" },
                    (s.lo, SegmentValue::CenterOf(r)),
                    font(SMALL).pos(Pos::new(HPos::Left, VPos::Center)),
                )
            });
        chart.draw_series(missing)?;
        Ok(())
    }
}
