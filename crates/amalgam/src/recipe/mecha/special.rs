//! The sd-mecha methods with their own translation, other than the delta-space ones
//! ([`super::delta`]): model lists and pairs, parameter literals and block conversions, component
//! routing, `fallback`, `cast` and `randperm`.

use super::translate::{Item, Merge, State};
use super::Value;
use crate::error::Result;
use crate::method::ParamValue;
use crate::methods::gram::geometric_median::Weiszfeld;
use std::collections::BTreeMap;

/// `n_average(*models)`: amalgam's `soup`.
pub(super) fn n_average(s: &mut State, m: &Merge) -> Result<Item> {
    let ms = m.inputs(s)?;
    Ok(s.node(m.c.line, "soup", vec![ms], BTreeMap::new()))
}

/// `subtract(a, b)`: a delta.
pub(super) fn subtract(s: &mut State, m: &Merge) -> Result<Item> {
    let ms = m.inputs(s)?;
    if ms.len() != 2 {
        return Err(m.err(s, "`subtract` takes two models".into()));
    }
    Ok(s.node(
        m.c.line,
        "subtract",
        vec![vec![ms[0]], vec![ms[1]]],
        BTreeMap::new(),
    ))
}

/// `weighted_sum`, `slerp` and `add_difference` of `(a, b, alpha)`: the amalgam method of the
/// same name, and `add` for `add_difference` (sd-mecha's registered one adds a delta:
/// a + alpha·b).
pub(super) fn two_models(s: &mut State, m: &Merge) -> Result<Item> {
    let a = m.input(s, 0)?;
    let b = m.input(s, 1)?;
    let mut params = BTreeMap::new();
    if let Some(v) = m.keyword_or_at(s, "alpha", 2)? {
        params.insert("alpha".to_string(), v);
    }
    let method = match m.name() {
        "weighted_sum" => "weighted_sum",
        "slerp" => "slerp",
        _ => "add",
    };
    Ok(s.node(m.c.line, method, vec![vec![a], vec![b]], params))
}

/// `geometric_median(*models)`, with sd-mecha's Weiszfeld parameters.
pub(super) fn geometric_median(s: &mut State, m: &Merge) -> Result<Item> {
    let ms = m.some_inputs(s)?;
    let mut params = BTreeMap::new();
    for (k, _) in Weiszfeld::DEFAULT.params() {
        params.insert(k.to_string(), ParamValue::Number(m.number(s, k)?));
    }
    Ok(s.node(m.c.line, "geometric_median", vec![ms], params))
}

/// `randperm(a, seed)`: its seed is the run's.
pub(super) fn randperm(s: &mut State, m: &Merge) -> Result<Item> {
    let a = m.input(s, 0)?;
    let given = m.keyword_or_at(s, "seed", 1)?;
    s.seed(m.c.line, given)?;
    Ok(s.node(m.c.line, "randperm", vec![vec![a]], BTreeMap::new()))
}

/// `cast(a, device, dtype)`: `a` itself (the output dtype is the run's, `--dtype`; computing is
/// in f32/f64).
pub(super) fn cast(s: &mut State, m: &Merge) -> Result<Item> {
    Ok(Item::Tensors(m.input(s, 0)?))
}

/// `pick_component(model, component)` and `omit_component(model, component)`, read by the
/// `fallback` they are given to.
pub(super) fn component(s: &mut State, m: &Merge) -> Result<Item> {
    let model = m.input(s, 0)?;
    let component = match m.keyword_or_at(s, "component", 1)? {
        Some(ParamValue::Text(t)) => t,
        Some(other) => return Err(m.err(s, format!("component must be a string, got {other:?}"))),
        None => return Err(m.err(s, "`pick_component` needs a component".into())),
    };
    Ok(if m.name() == "pick_component" {
        Item::Component(model, component)
    } else {
        Item::Omitted(model, component)
    })
}

/// `fallback(a, b)`: each key from `a`, else from `b`; block values with a default; component
/// routing.
pub(super) fn fallback(s: &mut State, m: &Merge) -> Result<Item> {
    let (Some(a), Some(b)) = (m.args.first(), m.args.get(1)) else {
        return Err(m.err(s, "`fallback` takes two arguments".into()));
    };
    let (Value::Ref(a), Value::Ref(b)) = (a, b) else {
        return Err(m.err(s, "`fallback` takes two references".into()));
    };
    Ok(match (s.item(*a).clone(), s.item(*b).clone()) {
        // Block values with a default for the other blocks.
        (Item::Param(ParamValue::Blocks(mut map)), Item::Param(ParamValue::Number(d))) => {
            map.insert("default".into(), d);
            Item::Param(ParamValue::Blocks(map))
        }
        // One component from a model, everything else from the merge.
        (Item::Component(model, component), Item::Tensors(rest)) => {
            s.components.insert(component, model);
            Item::Tensors(rest)
        }
        // Everything but one component from a model, that one from another.
        (Item::Omitted(model, component), Item::Tensors(other)) => {
            s.components.insert(component, other);
            Item::Tensors(model)
        }
        // Each key from a, else from the other: a node.
        (Item::Tensors(x), Item::Tensors(y)) => {
            s.node(m.c.line, "fallback", vec![vec![x], vec![y]], BTreeMap::new())
        }
        (x, y) => return Err(m.err(s, format!("`fallback` of {x:?} and {y:?} is not supported (supported: two models or merges, a component with a merge, block values with a default)"))),
    })
}

/// `convert_singleton(literal)`: the literal's one value, a parameter.
pub(super) fn convert_singleton(s: &mut State, m: &Merge) -> Result<Item> {
    let Some(Value::Ref(l)) = m.args.first() else {
        return Err(m.err(s, "`convert_singleton` takes a literal".into()));
    };
    let Item::Literal { dict, config } = s.item(*l) else {
        return Err(m.err(s, format!("&{l} is not a literal")));
    };
    if config.as_deref().is_some_and(|c| c != "singleton-mecha") {
        return Err(m.err(
            s,
            format!(
                "`convert_singleton` of a `{}` literal",
                config.as_deref().unwrap_or("")
            ),
        ));
    }
    let v = dict
        .get("key")
        .ok_or_else(|| m.err(s, "the singleton has no `key`".into()))?;
    Ok(Item::Param(s.param(v, m.c.line)?))
}

/// `convert_sdxl_blocks_to_sgm` and `convert_sd1_blocks_to_ldm` of a block literal: per-block
/// values, a parameter.
pub(super) fn convert_blocks(s: &mut State, m: &Merge) -> Result<Item> {
    let method = m.name();
    let Some(Value::Ref(l)) = m.args.first() else {
        return Err(m.err(s, format!("`{method}` takes a literal")));
    };
    let Item::Literal { dict, config } = s.item(*l) else {
        return Err(m.err(s, format!("&{l} is not a literal")));
    };
    let want = if method == "convert_sdxl_blocks_to_sgm" {
        "sdxl-supermerger_blocks"
    } else {
        "sd1-supermerger_blocks"
    };
    if config.as_deref().is_some_and(|c| c != want) {
        return Err(m.err(s, format!("`{method}` expects a `{want}` literal")));
    }
    let mut map = BTreeMap::new();
    for (k, v) in dict {
        let x = match v {
            Value::Int(i) => *i as f64,
            Value::Float(f) => *f,
            other => return Err(m.err(s, format!("block `{k}` is {other:?}, not a number"))),
        };
        map.insert(k.clone(), x);
    }
    Ok(Item::Param(ParamValue::Blocks(map)))
}
