//! The distance per block, one line per model: a legend for up to [`LEGEND_MAX`] models; past
//! that the lines are grey and only the outliers' are coloured and named.

use super::{
    distance, distance_name, font, outliers, short_name, text_width, Chart, DrawResult, Scale,
    AXIS, GREY, GRID, LABEL, MINOR, PALETTE, TITLE,
};
use crate::analysis::compare::Comparison;
use plotters::coord::Shift;
use plotters::prelude::*;

/// The most models that each get a colour and a legend entry.
const LEGEND_MAX: usize = 12;

/// The per-block line chart.
pub(super) struct Lines {
    blocks: Vec<String>,
    axis: String,
    /// Per model: the name shown and the distance per block.
    models: Vec<(String, Vec<f64>)>,
    /// The models named (coloured), with their colour index.
    named: Vec<usize>,
    scale: Scale,
    legend_width: u32,
}

impl Lines {
    pub(super) fn new(c: &Comparison) -> Lines {
        let models: Vec<(String, Vec<f64>)> = c
            .models
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let per_block = c
                    .blocks
                    .iter()
                    .map(|b| b.stats.models.get(i).map_or(f64::NAN, |s| distance(c, s)))
                    .collect();
                (short_name(&m.name), per_block)
            })
            .collect();
        let named: Vec<usize> = if models.len() <= LEGEND_MAX {
            (0..models.len()).collect()
        } else {
            let mut far: Vec<usize> = outliers(c).into_iter().collect();
            far.sort_unstable();
            far.truncate(LEGEND_MAX);
            far
        };
        let scale = Scale::of(models.iter().flat_map(|m| m.1.iter().copied()));
        let legend_width = named
            .iter()
            .map(|&i| text_width(&models[i].0, LABEL))
            .chain([text_width("the other 000 models", LABEL)])
            .max()
            .unwrap_or(0)
            + 50;
        Lines {
            blocks: c.blocks.iter().map(|b| b.name.clone()).collect(),
            axis: format!("{}{}", distance_name(c), scale.note()),
            models,
            named,
            scale,
            legend_width,
        }
    }

    fn plot_width(&self) -> u32 {
        (self.blocks.len() as u32 * 44 + 120).max(760)
    }
}

impl Chart for Lines {
    fn title(&self) -> String {
        "Distance per block".to_string()
    }

    fn size(&self) -> (u32, u32) {
        (self.plot_width() + self.legend_width, 560)
    }

    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        area.fill(&WHITE)?;
        let (plot, legend) = area.split_horizontally(self.plot_width());
        let s = self.scale;
        let b = self.blocks.len();
        let mut chart = ChartBuilder::on(&plot)
            .caption(self.title(), font(TITLE))
            .margin(12)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(super::bar::rows(b), s.lo..s.hi)?;
        let block_of = |v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(i) => self.blocks.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        };
        let tick = |y: &f64| s.label(*y);
        chart
            .configure_mesh()
            .x_labels(self.blocks.len() + 1)
            .x_label_formatter(&block_of)
            .y_labels(s.labels(10))
            .y_label_formatter(&tick)
            .x_desc("block")
            .y_desc(self.axis.as_str())
            .label_style(font(LABEL))
            .axis_desc_style(font(AXIS))
            .light_line_style(s.light())
            .bold_line_style(GRID)
            .draw()?;
        chart.draw_series(s.minor().into_iter().map(|y| {
            PathElement::new(
                vec![(SegmentValue::Exact(0), y), (SegmentValue::Last, y)],
                MINOR,
            )
        }))?;
        // Runs of plottable points (a value the axis cannot show breaks the line).
        let runs = |values: &[f64]| -> Vec<Vec<(SegmentValue<i32>, f64)>> {
            let mut runs = vec![Vec::new()];
            for (i, v) in values.iter().enumerate() {
                match s.pos(*v) {
                    Some(y) => runs
                        .last_mut()
                        .expect("one run")
                        .push((SegmentValue::CenterOf(i as i32), y)),
                    None => runs.push(Vec::new()),
                }
            }
            runs.retain(|r| !r.is_empty());
            runs
        };
        let colour = |k: usize| PALETTE[k % PALETTE.len()];
        for (i, (_, values)) in self.models.iter().enumerate() {
            if self.named.contains(&i) {
                continue;
            }
            for run in runs(values) {
                chart.draw_series(LineSeries::new(run, GREY.mix(0.45).stroke_width(1)))?;
            }
        }
        for (k, &i) in self.named.iter().enumerate() {
            let style = colour(k).stroke_width(2);
            for run in runs(&self.models[i].1) {
                chart.draw_series(LineSeries::new(run.clone(), style))?;
                chart.draw_series(
                    run.into_iter()
                        .map(|p| Circle::new(p, 3, colour(k).filled())),
                )?;
            }
        }
        // The legend, beside the plot so that it hides no line.
        let mut y = 50;
        let header = if self.models.len() <= LEGEND_MAX {
            "models".to_string()
        } else {
            "outliers".to_string()
        };
        legend.draw(&Text::new(header, (10, y), font(AXIS)))?;
        y += 28;
        for (k, &i) in self.named.iter().enumerate() {
            legend.draw(&PathElement::new(
                vec![(10, y + 7), (34, y + 7)],
                colour(k).stroke_width(3),
            ))?;
            legend.draw(&Text::new(self.models[i].0.clone(), (40, y), font(LABEL)))?;
            y += 22;
        }
        if self.models.len() > LEGEND_MAX {
            let others = self.models.len() - self.named.len();
            if self.named.is_empty() {
                legend.draw(&Text::new("(none)", (10, y), font(LABEL)))?;
                y += 22;
            }
            legend.draw(&PathElement::new(
                vec![(10, y + 7), (34, y + 7)],
                GREY.stroke_width(2),
            ))?;
            legend.draw(&Text::new(
                format!("the other {others} models"),
                (40, y),
                font(LABEL),
            ))?;
        }
        Ok(())
    }
}
