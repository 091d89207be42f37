//! The models in the plane (classical MDS of their L2 distances), named where a name fits: the
//! outliers first, then from the edge inwards, each name beside its point where it overlaps no
//! other name nor point.

use super::{
    fmt_num, font, outliers, short_name, text_width, Chart, DrawResult, AXIS, GRID, LABEL, MINOR,
    OUTLIER, POINT, SMALL, TITLE,
};
use crate::analysis::compare::{Comparison, ModelMap};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// A map.
pub(super) struct Map {
    group: String,
    names: Vec<String>,
    points: Vec<[f64; 2]>,
    far: Vec<bool>,
    explained: f64,
    centre: [f64; 2],
    half: f64,
    side: u32,
}

const NAME: f64 = SMALL;

impl Map {
    pub(super) fn new(c: &Comparison, m: &ModelMap) -> Map {
        let far = outliers(c);
        let n = c.models.len();
        let finite: Vec<[f64; 2]> = m
            .points
            .iter()
            .copied()
            .filter(|p| p[0].is_finite() && p[1].is_finite())
            .collect();
        let ext = |axis: usize| {
            finite
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
                    (lo.min(p[axis]), hi.max(p[axis]))
                })
        };
        let ((x0, x1), (y0, y1)) = (ext(0), ext(1));
        let (centre, mut half) = if finite.is_empty() {
            ([0.0, 0.0], 1.0)
        } else {
            (
                [(x0 + x1) / 2.0, (y0 + y1) / 2.0],
                0.56 * (x1 - x0).max(y1 - y0),
            )
        };
        if half <= 0.0 || !half.is_finite() {
            half = centre[0].abs().max(centre[1].abs()).max(1.0) * 0.1;
        }
        Map {
            group: m.name.clone(),
            names: c.models.iter().map(|m| short_name(&m.name)).collect(),
            points: m.points.clone(),
            far: (0..n).map(|i| far.contains(&i)).collect(),
            explained: m.explained,
            centre,
            half,
            side: match n {
                0..=30 => 640,
                31..=100 => 900,
                _ => 1150,
            },
        }
    }
}

/// A rectangle in pixels: left, top, right, bottom.
type Box2 = (i32, i32, i32, i32);

fn note(named: usize, of: usize) -> String {
    format!("{named} of {of} models named (the others' names would overlap)")
}

fn overlaps(a: &Box2, b: &Box2) -> bool {
    a.0 < b.2 && b.0 < a.2 && a.1 < b.3 && b.1 < a.3
}

impl Chart for Map {
    fn title(&self) -> String {
        format!(
            "Map of the models (classical MDS of the L2 distances): {}",
            self.group
        )
    }

    fn size(&self) -> (u32, u32) {
        (self.side + 110, self.side + 120)
    }

    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        area.fill(&WHITE)?;
        let ([cx, cy], h) = (self.centre, self.half);
        let mut chart = ChartBuilder::on(area)
            .caption(self.title(), font(TITLE))
            .margin(12)
            .margin_right(24)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(cx - h..cx + h, cy - h..cy + h)?;
        let tick = |v: &f64| fmt_num(*v);
        let share = if self.explained.is_finite() {
            format!("{:.0}%", 100.0 * self.explained)
        } else {
            "n/a".to_string()
        };
        chart
            .configure_mesh()
            .x_labels(7)
            .y_labels(7)
            .x_label_formatter(&tick)
            .y_label_formatter(&tick)
            .x_desc(format!(
                "MDS axis 1 (axes 1 and 2 hold {share} of the distances' variance)"
            ))
            .y_desc("MDS axis 2")
            .label_style(font(LABEL))
            .axis_desc_style(font(AXIS))
            .light_line_style(MINOR)
            .bold_line_style(GRID)
            .draw()?;
        let shown: Vec<usize> = (0..self.points.len())
            .filter(|&i| self.points[i].iter().all(|v| v.is_finite()))
            .collect();
        let radius = |i: usize| if self.far[i] { 6 } else { 4 };
        // Outliers drawn last, on top.
        let mut order = shown.clone();
        order.sort_by_key(|&i| self.far[i]);
        chart.draw_series(order.iter().map(|&i| {
            let p = self.points[i];
            let colour = if self.far[i] { OUTLIER } else { POINT };
            Circle::new((p[0], p[1]), radius(i), colour.mix(0.85).filled())
        }))?;
        // Names: where they fit.
        let (xr, yr) = chart.plotting_area().get_pixel_range();
        let pixel: Vec<(i32, i32)> = self
            .points
            .iter()
            .map(|p| chart.backend_coord(&(p[0], p[1])))
            .collect();
        let mut taken: Vec<Box2> = shown
            .iter()
            .map(|&i| {
                let (x, y) = pixel[i];
                let r = radius(i);
                (x - r, y - r, x + r, y + r)
            })
            .collect();
        // The corner where the count of names goes.
        let note_box = (
            xr.start,
            yr.start,
            xr.start + 12 + text_width(&note(shown.len(), shown.len()), LABEL) as i32,
            yr.start + 24,
        );
        taken.push(note_box);
        let mut by_priority = shown.clone();
        let dist2 = |i: usize| {
            let p = self.points[i];
            (p[0] - cx).powi(2) + (p[1] - cy).powi(2)
        };
        by_priority.sort_by(|&a, &b| {
            self.far[b]
                .cmp(&self.far[a])
                .then(dist2(b).total_cmp(&dist2(a)))
        });
        let mut named = 0;
        for i in by_priority {
            let (x, y) = pixel[i];
            let (w, hgt) = (text_width(&self.names[i], NAME) as i32, 15);
            let gap = radius(i) + 3;
            let candidates = [
                (x + gap, y - hgt / 2),
                (x - gap - w, y - hgt / 2),
                (x - w / 2, y - gap - hgt),
                (x - w / 2, y + gap),
            ];
            let spot = candidates
                .into_iter()
                .map(|(l, t)| (l, t, l + w, t + hgt))
                .find(|b| {
                    b.0 >= xr.start
                        && b.2 <= xr.end
                        && b.1 >= yr.start
                        && b.3 <= yr.end
                        && !taken.iter().any(|o| overlaps(o, b))
                });
            if let Some(b) = spot {
                let colour = if self.far[i] { OUTLIER } else { super::INK };
                area.draw(&Text::new(
                    self.names[i].clone(),
                    (b.0, b.1 + hgt / 2),
                    font(NAME)
                        .color(&colour)
                        .pos(Pos::new(HPos::Left, VPos::Center)),
                ))?;
                taken.push(b);
                named += 1;
            }
        }
        if named < shown.len() {
            area.draw(&Text::new(
                note(named, shown.len()),
                (xr.start + 6, yr.start + 6),
                font(LABEL).color(&RGBColor(0x55, 0x55, 0x55)),
            ))?;
        }
        Ok(())
    }
}
