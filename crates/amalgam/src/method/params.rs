//! A method's parameters: the values given in a recipe or on the command line, and their checks.

use super::MethodInfo;
use crate::error::{Error, Result};
use std::collections::BTreeMap;

/// A documented parameter of a method.
#[derive(Clone, Copy, Debug)]
pub struct ParamInfo {
    pub name: &'static str,
    /// The default, as written in a recipe; `None` when the parameter is required.
    pub default: Option<&'static str>,
    pub doc: &'static str,
}

/// A parameter value from a recipe or the command line.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum ParamValue {
    Bool(bool),
    Number(f64),
    List(Vec<f64>),
    Text(String),
    /// A scalar given per block (MBW): block id (`BASE`, `IN00`, ..., or `default`) → value.
    /// The engine resolves it to a `Number` for each key's block before building the method.
    Blocks(BTreeMap<String, f64>),
}

/// The node parameter that picks the key → block mapping of per-block parameters
/// (`supermerger` or `sd_mecha`); the engine reads it, methods never see it.
pub const BLOCK_MAPPING: &str = "blocks";

/// `params` with every per-block value replaced by its value for `block` (or its `default`;
/// without either the parameter is left out, so the method's default applies). With `block =
/// None`, by any one of its values (to check the other parameters).
pub fn params_for_block(
    params: &BTreeMap<String, ParamValue>,
    block: Option<&str>,
) -> BTreeMap<String, ParamValue> {
    params
        .iter()
        .filter(|(k, _)| k.as_str() != BLOCK_MAPPING)
        .filter_map(|(k, v)| match v {
            ParamValue::Blocks(map) => {
                let value = match block {
                    Some(b) => map.get(b).or_else(|| map.get("default")),
                    None => map.values().next(),
                };
                value.map(|x| (k.clone(), ParamValue::Number(*x)))
            }
            other => Some((k.clone(), other.clone())),
        })
        .collect()
}

impl ParamValue {
    pub fn describe(&self) -> &'static str {
        match self {
            ParamValue::Bool(_) => "a boolean",
            ParamValue::Number(_) => "a number",
            ParamValue::List(_) => "a list of numbers",
            ParamValue::Text(_) => "a string",
            ParamValue::Blocks(_) => "a table of per-block values",
        }
    }
}

/// The values a number parameter may take.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Domain {
    /// `x > 0`.
    Positive,
    /// `x >= 0`.
    NonNegative,
}

impl Domain {
    pub fn contains(self, x: f64) -> bool {
        match self {
            Domain::Positive => x > 0.0,
            Domain::NonNegative => x >= 0.0,
        }
    }
    /// The domain in words, e.g. `eps > 0`.
    pub fn describe(self, name: &str) -> String {
        match self {
            Domain::Positive => format!("{name} > 0"),
            Domain::NonNegative => format!("{name} >= 0"),
        }
    }
}

/// A method's parameters as given, consumed by the method's constructor. Every parameter must be
/// taken; [`Params::finish`] reports the ones left over as unknown.
#[derive(Clone, Debug, Default)]
pub struct Params {
    method: String,
    values: BTreeMap<String, ParamValue>,
}

impl Params {
    pub fn new(method: &str, values: BTreeMap<String, ParamValue>) -> Self {
        Params {
            method: method.to_string(),
            values,
        }
    }
    fn err(&self, msg: String) -> Error {
        Error::method(&self.method, msg)
    }
    /// A given number must be finite: NaN or infinity is an error naming the parameter.
    fn finite(&self, name: &str, v: f64) -> Result<f64> {
        if v.is_finite() {
            Ok(v)
        } else {
            Err(self.err(format!(
                "parameter `{name}` is {v}; it must be a finite number"
            )))
        }
    }
    /// A finite number, or `default` when absent.
    pub fn number(&mut self, name: &str, default: f64) -> Result<f64> {
        match self.values.remove(name) {
            None => Ok(default),
            Some(ParamValue::Number(v)) => self.finite(name, v),
            Some(other) => Err(self.err(format!(
                "parameter `{name}` must be a number, got {}",
                other.describe()
            ))),
        }
    }
    /// A boolean, or `default` when absent.
    pub fn boolean(&mut self, name: &str, default: bool) -> Result<bool> {
        match self.values.remove(name) {
            None => Ok(default),
            Some(ParamValue::Bool(v)) => Ok(v),
            Some(other) => Err(self.err(format!(
                "parameter `{name}` must be true or false, got {}",
                other.describe()
            ))),
        }
    }
    /// One number per argument of a `Many` slot: a list of exactly `n` numbers, or one number
    /// repeated, or `default` repeated when absent.
    pub fn per_model(&mut self, name: &str, n: usize, default: f64) -> Result<Vec<f64>> {
        match self.values.remove(name) {
            None => Ok(vec![default; n]),
            Some(ParamValue::Number(v)) => Ok(vec![self.finite(name, v)?; n]),
            Some(ParamValue::List(v)) if v.len() == n => {
                v.iter().try_for_each(|&x| self.finite(name, x).map(drop))?;
                Ok(v)
            }
            Some(ParamValue::List(v)) => Err(self.err(format!(
                "parameter `{name}` has {} values but there are {n} models",
                v.len()
            ))),
            Some(other) => Err(self.err(format!(
                "parameter `{name}` must be a number or a list of {n} numbers, got {}",
                other.describe()
            ))),
        }
    }
    /// One of `options` (a string parameter), or `default` when absent.
    pub fn choice(
        &mut self,
        name: &str,
        options: &[&'static str],
        default: &'static str,
    ) -> Result<&'static str> {
        match self.values.remove(name) {
            None => Ok(default),
            Some(ParamValue::Text(t)) => options
                .iter()
                .find(|o| o.eq_ignore_ascii_case(&t) || o.replace('_', "-") == t)
                .copied()
                .ok_or_else(|| {
                    self.err(format!(
                        "parameter `{name}` is `{t}`; expected one of: {}",
                        options.join(", ")
                    ))
                }),
            Some(other) => Err(self.err(format!(
                "parameter `{name}` must be one of {} (a string), got {}",
                options.join(", "),
                other.describe()
            ))),
        }
    }

    /// A finite number in `domain`, or `default` when absent; the error names the range.
    pub fn number_in(&mut self, name: &str, default: f64, domain: Domain) -> Result<f64> {
        let v = self.number(name, default)?;
        if domain.contains(v) {
            Ok(v)
        } else {
            Err(self.err(format!(
                "parameter `{name}` is {v}; allowed: {}",
                domain.describe(name)
            )))
        }
    }

    /// A non-negative integer, or `default` when absent.
    pub fn count(&mut self, name: &str, default: usize) -> Result<usize> {
        match self.values.remove(name) {
            None => Ok(default),
            Some(ParamValue::Number(v)) if v >= 0.0 && v.fract() == 0.0 => Ok(v as usize),
            Some(other) => Err(self.err(format!(
                "parameter `{name}` must be a non-negative integer, got {other:?}"
            ))),
        }
    }

    /// Fails if any parameter was not consumed.
    pub fn finish(self, info: &MethodInfo) -> Result<()> {
        if let Some(name) = self.values.keys().next() {
            let known: Vec<&str> = info.params.iter().map(|p| p.name).collect();
            return Err(self.err(format!(
                "unknown parameter `{name}` (known: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
        }
        Ok(())
    }
}
