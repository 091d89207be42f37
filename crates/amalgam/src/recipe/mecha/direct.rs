//! sd-mecha methods that are one amalgam node with the same inputs in the same order
//! ([`Translation::Direct`](super::dialect::Translation::Direct)), each keyword parameter mapped
//! to one of the method's declared parameters (or accepted and not used): read from and written
//! to `.mecha` through their one declaration.

use super::dialect::{Map, Mecha};
use super::translate::{Item, Merge, State};
use crate::error::Result;
use crate::method::{ParamKind, ParamValue, SlotKind};
use std::collections::BTreeMap;

/// Merge line `m` as one node of amalgam method `method`.
pub(super) fn translate(s: &mut State, m: &Merge, method: &'static str) -> Result<Item> {
    // Inputs first, then parameters by position in sd-mecha's signature; a list slot last
    // (`clamp`'s bounds) takes every input after the others, its parameters then keyword-only.
    let declared = crate::methods::info(method)?.slots;
    let listed = declared.last().map(|s| s.kind) == Some(SlotKind::Many);
    let n = if listed { m.args.len() } else { declared.len() };
    let (inputs, values) = m.args.split_at(n.min(m.args.len()));
    let mut slots = inputs
        .iter()
        .map(|a| s.tensors(a, m.c.line).map(|t| vec![t]))
        .collect::<Result<Vec<_>>>()?;
    if listed && slots.len() >= declared.len() {
        let rest = slots.split_off(declared.len() - 1).concat();
        slots.push(rest);
    }
    let at = |name: &str| {
        let i = m.mecha.param_names().position(|p| p == name)?;
        values.get(i).copied()
    };
    let params = m.mecha.read(|name| {
        m.c.keyword(name)
            .or_else(|| at(name))
            .map(|v| s.param(v, m.c.line))
            .transpose()
    })?;
    Ok(s.node(m.c.line, method, slots, params))
}

impl Mecha {
    /// The node's parameters from the recipe's keyword values (`get`: the value of one, if given).
    fn read(
        &self,
        get: impl Fn(&str) -> Result<Option<ParamValue>>,
    ) -> Result<BTreeMap<String, ParamValue>> {
        let mut out = BTreeMap::new();
        for p in self.params {
            let v = get(p.name)?;
            match p.map {
                Map::To(to) => {
                    if let Some(v) = v {
                        out.insert(to.to_string(), v);
                    }
                }
                Map::Flag { to, yes, no } => {
                    let on = match v {
                        Some(ParamValue::Bool(b)) => b,
                        Some(ParamValue::Number(x)) => x != 0.0,
                        _ => self.default(p.name) != 0.0,
                    };
                    out.insert(
                        to.to_string(),
                        ParamValue::Text(if on { yes } else { no }.to_string()),
                    );
                }
                Map::Read | Map::Unused => {}
            }
        }
        Ok(out)
    }

    /// The keyword values to write for the parameters of a node of amalgam method `method`
    /// (declared defaults filled in), as (sd-mecha name, value); counts are integers.
    pub(super) fn write(
        &self,
        method: &str,
        params: &BTreeMap<String, ParamValue>,
    ) -> Vec<(&'static str, super::Value)> {
        use super::Value;
        let info = crate::methods::info(method).expect("a registered method");
        let declared = |name: &str| {
            info.params
                .iter()
                .find(|p| p.name == name)
                .expect("declared")
        };
        let mut out = Vec::new();
        for p in self.params {
            match p.map {
                Map::To(to) => {
                    let value = match (params.get(to), declared(to).kind) {
                        (Some(ParamValue::Number(x)), ParamKind::Count { .. }) => {
                            Value::Int(*x as i64)
                        }
                        (Some(ParamValue::Number(x)), _) => Value::Float(*x),
                        (None, ParamKind::Count { default }) => Value::Int(default as i64),
                        (
                            None,
                            ParamKind::Number {
                                default: Some(d), ..
                            },
                        ) => Value::Float(d),
                        _ => continue,
                    };
                    out.push((p.name, value));
                }
                Map::Flag { to, yes, .. } => {
                    let chosen = match (params.get(to), declared(to).kind) {
                        (Some(ParamValue::Text(t)), _) => t.as_str(),
                        (_, ParamKind::Choice { default, .. }) => default,
                        _ => continue,
                    };
                    out.push((p.name, Value::Bool(chosen == yes)));
                }
                Map::Read | Map::Unused => {}
            }
        }
        out
    }
}
