//! Models far from the pool: a robust rule on the distances (median and MAD), so that the
//! outliers themselves do not hide the outliers.

use super::compare::PoolModel;
use super::stats::GroupStats;
use serde::Serialize;

/// Flags a model whose distance is above `median + k · 1.4826 · MAD` of the pool's (the MAD
/// scaled to a standard deviation for normal data).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OutlierRule {
    /// `k`: how many (scaled) MADs above the median.
    pub k: f64,
}

impl Default for OutlierRule {
    /// `k = 3`.
    fn default() -> Self {
        OutlierRule { k: 3.0 }
    }
}

impl OutlierRule {
    /// The rule in words, for the outputs.
    pub fn describe(&self) -> String {
        format!(
            "distance > median + {} x 1.4826 x MAD of the pool's distances (to the pool mean; \
             to the base when there is one)",
            self.k
        )
    }

    /// The threshold of `values`: `median + k · 1.4826 · MAD`.
    pub fn threshold(&self, values: &[f64]) -> f64 {
        let med = median(values);
        let dev: Vec<f64> = values.iter().map(|v| (v - med).abs()).collect();
        med + self.k * 1.4826 * median(&dev)
    }
}

/// A model flagged as far from the pool.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Outlier {
    /// The model's name.
    pub model: String,
    /// The distance it is far by: `dist_mean` or `dist_base`.
    pub measure: String,
    /// Its distance.
    pub value: f64,
    /// The rule's threshold.
    pub threshold: f64,
}

/// The median (the mean of the two middle values for an even count; 0 for none).
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let h = v.len() / 2;
    if v.len() % 2 == 1 {
        v[h]
    } else {
        0.5 * (v[h - 1] + v[h])
    }
}

/// The models of `stats` whose distance to the pool mean, or to the base, breaks `rule`. Pools of
/// fewer than three models flag none.
pub(crate) fn flag_outliers(
    rule: &OutlierRule,
    stats: &GroupStats,
    models: &[PoolModel],
) -> Vec<Outlier> {
    if models.len() < 3 {
        return Vec::new();
    }
    let mut out = Vec::new();
    let measures: [(&str, Vec<f64>); 2] = [
        (
            "dist_mean",
            stats.models.iter().map(|m| m.dist_mean).collect(),
        ),
        (
            "dist_base",
            stats
                .models
                .iter()
                .map(|m| m.dist_base.unwrap_or(f64::NAN))
                .collect(),
        ),
    ];
    for (measure, values) in measures {
        if values.iter().all(|v| v.is_nan()) {
            continue;
        }
        let threshold = rule.threshold(&values);
        for (m, &v) in models.iter().zip(&values) {
            if v > threshold {
                out.push(Outlier {
                    model: m.name.clone(),
                    measure: measure.to_string(),
                    value: v,
                    threshold,
                });
            }
        }
    }
    out
}
