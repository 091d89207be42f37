//! Model Stock (Jang et al. 2024; spec §10): with θ the angle between the fine-tunes' task
//! vectors, `t = N cos θ / (1 + (N − 1) cos θ)` and `θ = base + t · mean_t(models[t] − base)`
//! (= `t · average + (1 − t) · base`).
//!
//! How cos θ is measured for N > 2 differs: mergekit averages the cosines of **all pairs** over the
//! whole tensor (`pairs = "all"`, `unit = "tensor"`, the default); sd-mecha averages the cosines of
//! **adjacent pairs** (1-2, 2-3, ...) along the last dimension, one `t` per row (`pairs =
//! "adjacent"`, `unit = "row"`, where `t · mean` is sd-mecha's `nan_to_num`'d: a row whose cosine
//! makes t infinite gives the type's extremes, not ±inf; `n_model_stock` is this variant's
//! preset). Both need one statistic pass of dot products.

use super::geometric_median::add_raw_gram;
use crate::error::{Error, Result};
use crate::method::*;
use crate::real::Real;
use std::ops::Range;

/// The method's declaration: its name, inputs, parameters and documentation.
pub static INFO: MethodInfo = MethodInfo {
    name: "model_stock",
    origins: &[Origin::Paper, Origin::SdMecha, Origin::Mergekit],
    formula: FORMULA,
    summary: "Model Stock: moves from the base towards the average by a factor set by the angle \
              between the task vectors. With one fine-tune present for a key, t = 1.",
    slots: Slot::BASE_AND_MODELS,
    params: &[PAIRS, UNIT, COS_EPS],
};

/// `n_model_stock`'s declaration: sd-mecha's wrapper (`base + model_stock(models − base)`), the
/// preset of `model_stock` with sd-mecha's cosines.
pub static N_MODEL_STOCK: MethodInfo = MethodInfo {
    name: "n_model_stock",
    origins: &[Origin::SdMecha],
    formula: FORMULA,
    summary: "sd-mecha's n_model_stock: model_stock with sd-mecha's cosines (adjacent pairs, one \
              t per row of the last dimension).",
    slots: Slot::BASE_AND_MODELS,
    params: &[
        PAIRS.with_default(PresetDefault::Choice("adjacent")),
        UNIT.with_default(PresetDefault::Choice("row")),
        COS_EPS,
    ],
};

const FORMULA: &str = "base + t * mean_t(models[t] - base),  t = N cos / (1 + (N - 1) cos)";
const PAIRS: ParamInfo = ParamInfo::choice(
    "pairs",
    &["all", "adjacent"],
    "all",
    "all (mergekit) | adjacent (sd-mecha): which pairs' cosines are averaged",
);
const UNIT: ParamInfo = ParamInfo::choice("unit", &["tensor", "row"], "tensor", "tensor (mergekit) | row (sd-mecha: along the last dimension, one t per row; needs pairs = adjacent)");
const COS_EPS: ParamInfo = ParamInfo::number_in(
    "cos_eps",
    1e-6,
    Domain::NonNegative,
    "guard of the norms in the cosine",
);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Pairs {
    All,
    Adjacent,
}

pub(crate) struct ModelStock {
    info: &'static MethodInfo,
    pairs: Pairs,
    by_row: bool,
    cos_eps: f64,
}

impl ModelStock {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let info = params.info().expect("bound");
        let pairs = match params.choice("pairs")? {
            "adjacent" => Pairs::Adjacent,
            _ => Pairs::All,
        };
        let by_row = params.choice("unit")? == "row";
        let cos_eps = params.number("cos_eps")?;
        params.finish()?;
        if by_row && pairs == Pairs::All {
            return Err(Error::method(
                INFO.name,
                "`unit = \"row\"` with `pairs = \"all\"` is not implemented (use pairs = \"adjacent\", as sd-mecha)",
            ));
        }
        Ok(ModelStock {
            info,
            pairs,
            by_row,
            cos_eps,
        })
    }
}

impl<T: Real> Method<T> for ModelStock {
    fn info(&self) -> &'static MethodInfo {
        self.info
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

/// Per row of the last dimension: the N squared norms and the N − 1 adjacent dot products of the
/// task vectors (`2N − 1` sums a row).
struct RowSums<'a, T> {
    key: &'a StockOfKey<T>,
    /// Per row folded so far, its sums.
    total: Vec<f64>,
}

/// The sums of the rows a block touches, from its first row on.
struct RowBlock {
    first: usize,
    sums: Vec<f64>,
}

impl<T: Real> Pass<T> for RowSums<'_, T> {
    type Block = RowBlock;
    fn block_bytes(&self, len: usize) -> usize {
        (len / self.key.row_len + 2) * self.key.per_row() * std::mem::size_of::<f64>()
    }
    fn block(&self, range: Range<usize>, args: &[&[T]]) -> RowBlock {
        let (n, row_len) = (self.key.n, self.key.row_len);
        let deltas = self.key.deltas(args);
        let first = range.start / row_len;
        let last = range.end.saturating_sub(1).max(range.start) / row_len;
        let k = self.key.per_row();
        let mut sums = vec![0.0; (last - first + 1) * k];
        for (i, e) in range.enumerate() {
            let r = (e / row_len - first) * k;
            for t in 0..n {
                let v = deltas[t][i].to_f64();
                sums[r + t] += v * v;
                if t + 1 < n {
                    sums[r + n + t] += v * deltas[t + 1][i].to_f64();
                }
            }
        }
        RowBlock { first, sums }
    }
    fn fold(&mut self, block: RowBlock) {
        let k = self.key.per_row();
        let need = block.first * k + block.sums.len();
        if self.total.len() < need {
            self.total.resize(need, 0.0);
        }
        for (a, b) in self.total[block.first * k..].iter_mut().zip(block.sums) {
            *a += b;
        }
    }
}

impl<T: Real> StockOfKey<T> {
    /// The task vectors `models[t] − base` of a block.
    fn deltas(&self, args: &[&[T]]) -> Vec<Vec<T>> {
        let base = args[0];
        args[1..]
            .iter()
            .map(|x| x.iter().zip(base).map(|(&v, &b)| v - b).collect())
            .collect()
    }
    /// `t` from the task vectors' Gram matrix: the mean cosine of the pairs used.
    fn t_of_gram(&self, gram: &[f64]) -> T {
        let n = self.n;
        let mut total = 0.0;
        let mut pairs = 0usize;
        for i in 0..n {
            for j in (i + 1)..n {
                if self.pairs == Pairs::Adjacent && j != i + 1 {
                    continue;
                }
                total += self.cos(gram[i * n + j], gram[i * n + i], gram[j * n + j]);
                pairs += 1;
            }
        }
        T::from_f64(self.factor(total / pairs as f64))
    }
    /// `t` of one row from its sums (see [`RowSums`]).
    fn t_of_row(&self, row: &[f64]) -> T {
        let n = self.n;
        let mean = (0..n - 1)
            .map(|i| self.cos(row[n + i], row[i], row[i + 1]))
            .sum::<f64>()
            / (n - 1) as f64;
        T::from_f64(self.factor(mean))
    }
}

/// `torch.nan_to_num`: NaN to 0, ±∞ to the type's extremes.
fn nan_to_num<T: Real>(x: T) -> T {
    let v = x.to_f64();
    if v.is_nan() {
        T::ZERO
    } else if v.is_infinite() {
        let max = match T::DTYPE {
            crate::real::ComputeDtype::F32 => f32::MAX as f64,
            crate::real::ComputeDtype::F64 => f64::MAX,
        };
        T::from_f64(v.signum() * max)
    } else {
        x
    }
}

impl<T: Real> KeyMerge<T> for StockOfKey<T> {
    fn stat_passes(&self) -> usize {
        usize::from(self.n >= 2)
    }

    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()> {
        if self.n < 2 {
            return Ok(());
        }
        self.t = if self.by_row {
            let rows = passes.run(RowSums {
                key: self,
                total: Vec::new(),
            })?;
            let k = self.per_row();
            rows.total.chunks(k).map(|row| self.t_of_row(row)).collect()
        } else {
            let n = self.n;
            let key = &*self;
            let gram = passes.run(Sums::new(n * n, |_, args: &[&[T]]| {
                let deltas = key.deltas(args);
                let refs: Vec<&[T]> = deltas.iter().map(|d| d.as_slice()).collect();
                let mut g = vec![0.0; n * n];
                add_raw_gram(&refs, &mut g, &mut Vec::new());
                g
            }))?;
            vec![self.t_of_gram(&gram.total)]
        };
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
            let d = t * (*o * inv);
            // sd-mecha's `nan_to_num(t · mean)` (a row whose cosine makes t infinite or NaN).
            *o = b + if self.by_row { nan_to_num(d) } else { d };
        }
    }
}
