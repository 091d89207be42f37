//! sd-mecha's methods over deltas (`dropout`, `model_stock`, the fork's `isotropic`, the TIES
//! family): amalgam's take a base, here a zero tensor (the first input minus itself), and
//! return base + result, the delta itself.

use super::translate::{Item, Merge, State};
use crate::error::Result;
use crate::method::ParamValue;
use crate::methods::gram::geometric_median::Weiszfeld;
use crate::recipe::graph::Ref;
use std::collections::BTreeMap;

/// The deltas (at least one) and the zero base of merge line `m`.
fn deltas_and_zero(s: &mut State, m: &Merge) -> Result<(Vec<Ref>, Ref)> {
    let ms = m.some_inputs(s)?;
    let Item::Tensors(zero) = s.node(
        m.c.line,
        "subtract",
        vec![vec![ms[0]], vec![ms[0]]],
        BTreeMap::new(),
    ) else {
        unreachable!()
    };
    Ok((ms, zero))
}

/// Sets parameter `k` to `v`.
fn set(params: &mut BTreeMap<String, ParamValue>, k: &str, v: ParamValue) {
    params.insert(k.to_string(), v);
}

/// Sets choice `k` to option `v`.
fn choose(params: &mut BTreeMap<String, ParamValue>, k: &str, v: &str) {
    set(params, k, ParamValue::Text(v.into()));
}

/// `dropout(*deltas, probability, rescale, overlap, overlap_emphasis, seed)`: amalgam's
/// `dropout` (overlap 1 only; sd-mecha's others are broken there).
pub(super) fn dropout(s: &mut State, m: &Merge) -> Result<Item> {
    let (ms, zero) = deltas_and_zero(s, m)?;
    let mut params = BTreeMap::new();
    if m.number(s, "overlap")? != 1.0 {
        return Err(m.err(s, "`dropout` with overlap other than 1 is not supported (it is broken in sd-mecha itself)".into()));
    }
    set(
        &mut params,
        "p",
        ParamValue::Number(m.number(s, "probability")?),
    );
    set(
        &mut params,
        "rescale",
        ParamValue::Number(m.number(s, "rescale")?),
    );
    let seed = m.keyword(s, "seed")?;
    s.seed(m.c.line, seed)?;
    Ok(s.node(m.c.line, "dropout", vec![vec![zero], ms], params))
}

/// The 6DammK9 fork's `isotropic(*deltas, apply_exp, apply_high_dim)`: amalgam's `iso_c`.
pub(super) fn isotropic(s: &mut State, m: &Merge) -> Result<Item> {
    let (ms, zero) = deltas_and_zero(s, m)?;
    let mut params = BTreeMap::new();
    let mean = m.flag(s, "apply_exp")?;
    let high = m.flag(s, "apply_high_dim")?;
    choose(
        &mut params,
        "mean",
        if mean { "geometric" } else { "arithmetic" },
    );
    choose(
        &mut params,
        "high_dim",
        if high { "flatten" } else { "vector" },
    );
    Ok(s.node(m.c.line, "iso_c", vec![vec![zero], ms], params))
}

/// `model_stock(*deltas, cos_eps)`: amalgam's `model_stock` of adjacent pairs, by rows.
pub(super) fn model_stock(s: &mut State, m: &Merge) -> Result<Item> {
    let (ms, zero) = deltas_and_zero(s, m)?;
    let mut params = BTreeMap::new();
    choose(&mut params, "pairs", "adjacent");
    choose(&mut params, "unit", "row");
    set(
        &mut params,
        "cos_eps",
        ParamValue::Number(m.number(s, "cos_eps")?),
    );
    Ok(s.node(m.c.line, "model_stock", vec![vec![zero], ms], params))
}

/// `ties_sum`, `ties_sum_extended` (sd-mecha's, or sd-optim's with `weight_decay` and
/// `min_agreement`) and `ties_sum_with_dropout`: amalgam's TIES pipeline.
pub(super) fn ties(s: &mut State, m: &Merge) -> Result<Item> {
    let (ms, zero) = deltas_and_zero(s, m)?;
    let method = m.name();
    let mut params = BTreeMap::new();
    set(&mut params, "k", ParamValue::Number(m.number(s, "k")?));
    // sd-mecha 1.1.x: vote_sgn = false is the count vote.
    let election = if m.flag(s, "vote_sgn")? {
        "mass"
    } else {
        "count"
    };
    choose(&mut params, "election", election);
    if method != "ties_sum" {
        // sd-optim's ties_sum_extended (sd-mecha's has neither).
        let mut sd_optim = false;
        for k in ["weight_decay", "min_agreement"] {
            if let Some(v) = m.keyword(s, k)? {
                set(&mut params, k, v);
                sd_optim = true;
            }
        }
        if m.flag(s, "apply_median")? {
            choose(&mut params, "fuse", "geometric_median");
            for (k, _) in Weiszfeld::DEFAULT.params() {
                set(&mut params, k, ParamValue::Number(m.number(s, k)?));
            }
        } else if sd_optim {
            // sd-optim's flag is not inverted: above 0, the mean times the fraction of positive
            // cosines between the filtered deltas.
            if m.flag(s, "apply_stock")? {
                choose(&mut params, "stock", "positive_pairs");
            }
        } else if !m.flag(s, "apply_stock")? {
            // The inverted flag: false multiplies the TIES mean by the model-stock factor of
            // the filtered deltas.
            choose(&mut params, "stock", "adjacent_rows");
            set(
                &mut params,
                "cos_eps",
                ParamValue::Number(m.number(s, "cos_eps")?),
            );
        }
    }
    if method == "ties_sum_with_dropout" {
        della_or_dare(s, m, &mut params)?;
    }
    Ok(s.node(m.c.line, "ties", vec![vec![zero], ms], params))
}

/// `ties_sum_with_dropout`'s drop: DARE, or with `della_eps ≠ 0` DELLA by whole-tensor rank.
fn della_or_dare(
    s: &mut State,
    m: &Merge,
    params: &mut BTreeMap<String, ParamValue>,
) -> Result<()> {
    let p = m.number(s, "probability")?;
    let eps = m.number(s, "della_eps")?;
    if p > 0.0 {
        if eps != 0.0 {
            choose(params, "drop", "della");
            set(params, "della_eps", ParamValue::Number(eps));
            choose(params, "rank", "tensor");
        } else {
            choose(params, "drop", "dare");
        }
        set(params, "p", ParamValue::Number(p));
        // `rescale` is a bool, or in older recipes the exponent of 1 / (1 - p): 0 and 1 are
        // those two.
        let exponent = m.number(s, "rescale")?;
        if exponent != 0.0 && exponent != 1.0 {
            return Err(m.err(s, format!("`rescale = {exponent}` (an exponent of 1 / (1 - p) other than 0 or 1) is not supported")));
        }
        let rescale = if exponent == 1.0 {
            "inverse_keep"
        } else {
            "none"
        };
        choose(params, "rescale", rescale);
    }
    let seed = m.keyword(s, "seed")?;
    s.seed(m.c.line, seed)
}
