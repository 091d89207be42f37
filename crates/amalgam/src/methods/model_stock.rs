//! Model Stock (Jang et al. 2024; spec §10): with θ the angle between the fine-tunes' task
//! vectors, `t = N cos θ / (1 + (N − 1) cos θ)` and `θ = base + t · mean_t(models[t] − base)`
//! (= `t · average + (1 − t) · base`).
//!
//! How cos θ is measured for N > 2 differs: mergekit averages the cosines of **all pairs** over the
//! whole tensor (`pairs = "all"`, `unit = "tensor"`, the default); sd-mecha averages the cosines of
//! **adjacent pairs** (1-2, 2-3, ...) along the last dimension, one `t` per row (`pairs =
//! "adjacent"`, `unit = "row"`). Both need one statistic pass of dot products.

use super::geometric_median::add_raw_gram;
use crate::error::{Error, Result};
use crate::method::*;
use crate::real::Real;
use std::ops::Range;

pub static INFO: MethodInfo = MethodInfo {
    name: "model_stock",
    formula: "base + t * mean_t(models[t] - base),  t = N cos / (1 + (N - 1) cos)",
    summary: "Model Stock: moves from the base towards the average by a factor set by the angle \
              between the task vectors. With one fine-tune present for a key, t = 1.",
    slots: &[
        Slot { name: "base", kind: SlotKind::One, doc: "the pre-trained model" },
        Slot { name: "models", kind: SlotKind::Many, doc: "the fine-tuned models" },
    ],
    params: &[
        ParamInfo { name: "pairs", default: Some("all"), doc: "all (mergekit) | adjacent (sd-mecha): which pairs' cosines are averaged" },
        ParamInfo { name: "unit", default: Some("tensor"), doc: "tensor (mergekit) | row (sd-mecha: along the last dimension, one t per row; needs pairs = adjacent)" },
        ParamInfo { name: "cos_eps", default: Some("1e-6"), doc: "guard of the norms in the cosine" },
    ],
};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Pairs {
    All,
    Adjacent,
}

pub struct ModelStock {
    pairs: Pairs,
    by_row: bool,
    cos_eps: f64,
}

impl ModelStock {
    pub fn new(mut params: Params, _counts: &[usize]) -> Result<Self> {
        let pairs = match params.choice("pairs", &["all", "adjacent"], "all")? {
            "adjacent" => Pairs::Adjacent,
            _ => Pairs::All,
        };
        let by_row = params.choice("unit", &["tensor", "row"], "tensor")? == "row";
        let cos_eps = params.number_in("cos_eps", 1e-6, Domain::NonNegative)?;
        params.finish(&INFO)?;
        if by_row && pairs == Pairs::All {
            return Err(Error::method(
                INFO.name,
                "`unit = \"row\"` with `pairs = \"all\"` is not implemented (use pairs = \"adjacent\", as sd-mecha)",
            ));
        }
        Ok(ModelStock {
            pairs,
            by_row,
            cos_eps,
        })
    }
}

impl<T: Real> Method<T> for ModelStock {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        OnMissing::base_and_models(present)
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        let row_len = if self.by_row {
            ctx.shape.last().copied().unwrap_or(1).max(1)
        } else {
            ctx.numel().max(1)
        };
        Ok(Box::new(StockOfKey {
            n: ctx.present.len() - 1,
            pairs: self.pairs,
            by_row: self.by_row,
            cos_eps: self.cos_eps,
            row_len,
            stats: Vec::new(),
            t: Vec::new(),
        }))
    }
}

struct StockOfKey<T> {
    n: usize,
    pairs: Pairs,
    by_row: bool,
    cos_eps: f64,
    row_len: usize,
    /// Tensor unit: the N×N Gram matrix of the task vectors. Row unit: per row, the N squared
    /// norms and the N − 1 adjacent dot products.
    stats: Vec<f64>,
    /// The factor t (one, or one per row).
    t: Vec<T>,
}

impl<T: Real> StockOfKey<T> {
    fn factor(&self, mean_cos: f64) -> f64 {
        let n = self.n as f64;
        n * mean_cos / (1.0 + (n - 1.0) * mean_cos)
    }
    fn cos(&self, dot: f64, nn_a: f64, nn_b: f64) -> f64 {
        (dot / (nn_a.sqrt().max(self.cos_eps) * nn_b.sqrt().max(self.cos_eps))).clamp(-1.0, 1.0)
    }
    fn per_row(&self) -> usize {
        2 * self.n - 1
    }
}

impl<T: Real> KeyMerge<T> for StockOfKey<T> {
    fn stat_passes(&self) -> usize {
        usize::from(self.n >= 2)
    }

    fn stat_block(&self, _pass: usize, range: Range<usize>, args: &[&[T]]) -> Vec<f64> {
        let n = self.n;
        let base = args[0];
        let deltas: Vec<Vec<T>> = args[1..]
            .iter()
            .map(|x| x.iter().zip(base).map(|(&v, &b)| v - b).collect())
            .collect();
        if !self.by_row {
            let mut g = vec![0.0; n * n];
            let refs: Vec<&[T]> = deltas.iter().map(|d| d.as_slice()).collect();
            add_raw_gram(&refs, &mut g, &mut Vec::new());
            return g;
        }
        // [first row, then per row touched: n squared norms, n - 1 adjacent dots]
        let first = range.start / self.row_len;
        let last = (range.end - 1) / self.row_len;
        let k = self.per_row();
        let mut out = vec![0.0; 1 + (last - first + 1) * k];
        out[0] = first as f64;
        for (i, e) in range.clone().enumerate() {
            let r = 1 + (e / self.row_len - first) * k;
            for t in 0..n {
                let v = deltas[t][i].to_f64();
                out[r + t] += v * v;
                if t + 1 < n {
                    out[r + n + t] += v * deltas[t + 1][i].to_f64();
                }
            }
        }
        out
    }

    fn absorb_block(&mut self, _pass: usize, _block: usize, stats: Vec<f64>) {
        if !self.by_row {
            accumulate(&mut self.stats, stats);
            return;
        }
        let k = self.per_row();
        let first = stats[0] as usize;
        let need = (first + (stats.len() - 1) / k) * k;
        if self.stats.len() < need {
            self.stats.resize(need, 0.0);
        }
        for (a, &b) in self.stats[first * k..].iter_mut().zip(&stats[1..]) {
            *a += b;
        }
    }

    fn finish_pass(&mut self, _pass: usize) -> Result<()> {
        let n = self.n;
        let stats = std::mem::take(&mut self.stats);
        if !self.by_row {
            let mut total = 0.0;
            let mut pairs = 0usize;
            for i in 0..n {
                for j in (i + 1)..n {
                    if self.pairs == Pairs::Adjacent && j != i + 1 {
                        continue;
                    }
                    total += self.cos(stats[i * n + j], stats[i * n + i], stats[j * n + j]);
                    pairs += 1;
                }
            }
            self.t = vec![T::from_f64(self.factor(total / pairs as f64))];
        } else {
            let k = self.per_row();
            self.t = stats
                .chunks(k)
                .map(|row| {
                    let mean = (0..n - 1)
                        .map(|i| self.cos(row[n + i], row[i], row[i + 1]))
                        .sum::<f64>()
                        / (n - 1) as f64;
                    T::from_f64(self.factor(mean))
                })
                .collect();
        }
        Ok(())
    }

    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        let base = args[0];
        let inv = T::ONE / T::from_f64(self.n as f64);
        out.fill(T::ZERO);
        for x in &args[1..] {
            for ((o, &v), &b) in out.iter_mut().zip(x.iter()).zip(base) {
                *o += v - b;
            }
        }
        for (i, (o, &b)) in out.iter_mut().zip(base).enumerate() {
            let t = if self.n < 2 {
                T::ONE
            } else if self.by_row {
                self.t[(range.start + i) / self.row_len]
            } else {
                self.t[0]
            };
            *o = b + t * (*o * inv);
        }
    }
}
