//! The interface between the engine and merge methods.
//!
//! A method never does I/O. For each key the engine asks the method for a [`KeyMerge`], hands it the
//! chunks of its arguments (already read and converted to the compute type) and gets back output
//! chunks. Methods that need per-tensor statistics first (norms, dot products, thresholds, Gram
//! matrices) declare statistic passes: the engine feeds every fixed-size block of the tensor to
//! [`KeyMerge::stat_block`] and folds the per-block results in block order, so the statistics do not
//! depend on the chunk size or the thread count. Methods that need rows or whole tensors together
//! (per-row ranks, SVD) declare a [`KeyMerge::unit`].

use crate::error::{Error, Result};
use crate::real::Real;
use std::collections::BTreeMap;
use std::ops::Range;

/// How many arguments of one slot a method takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotKind {
    /// Exactly one argument.
    One,
    /// One or more arguments (a list; a model group expands into it).
    Many,
}

/// A named argument slot, e.g. `base` (one model) or `models` (a list).
#[derive(Clone, Copy, Debug)]
pub struct Slot {
    pub name: &'static str,
    pub kind: SlotKind,
    pub doc: &'static str,
}

/// A documented parameter of a method.
#[derive(Clone, Copy, Debug)]
pub struct ParamInfo {
    pub name: &'static str,
    /// The default, as written in a recipe; `None` when the parameter is required.
    pub default: Option<&'static str>,
    pub doc: &'static str,
}

/// What a method is: its name, formula, argument slots and parameters. Used to parse recipes, to
/// print `amalgam methods` and to check the README.
#[derive(Clone, Copy, Debug)]
pub struct MethodInfo {
    pub name: &'static str,
    pub formula: &'static str,
    pub summary: &'static str,
    pub slots: &'static [Slot],
    pub params: &'static [ParamInfo],
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

/// What a node does for a key some of its arguments lack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnMissing {
    /// Merge the arguments that have the key (N-way methods leave absent models out).
    MergePresent,
    /// Pass this argument (an index into the flattened arguments) through unchanged.
    PassThrough(usize),
    /// The node has no value for this key; the output policy decides (see the key policy).
    Absent,
}

impl OnMissing {
    /// The policy of methods whose first argument is a base and whose others are N models: a key
    /// the base lacks has no value here; models lacking it are left out; with none left, the
    /// base passes through.
    pub fn base_and_models(present: &[bool]) -> OnMissing {
        if !present[0] {
            OnMissing::Absent
        } else if present[1..].iter().any(|&p| p) {
            OnMissing::MergePresent
        } else {
            OnMissing::PassThrough(0)
        }
    }
}

/// Adds per-block statistics into a running total, sized on first use.
pub fn accumulate(total: &mut Vec<f64>, block: Vec<f64>) {
    if total.is_empty() {
        *total = block;
    } else {
        total.iter_mut().zip(block).for_each(|(a, b)| *a += b);
    }
}

/// Per-key facts given to a method.
#[derive(Clone, Debug)]
pub struct KeyCtx<'a> {
    pub key: &'a str,
    pub shape: &'a [usize],
    /// Indices (into the node's flattened arguments) of the arguments present for this key, in
    /// order; the chunks passed to [`KeyMerge`] follow this order.
    pub present: &'a [usize],
    /// The node's flattened argument count.
    pub n_args: usize,
    /// The run's seed, for methods with random masks.
    pub seed: u64,
    /// Bytes a method may plan for the buffers of one unit (see [`KeyMerge::unit`]): a quarter of
    /// the memory budget, whatever the thread count, so that a method's choice between an exact
    /// and an approximate computation does not depend on the threads.
    pub unit_budget: u64,
}

impl KeyCtx<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A merge method, constructed from its parameters, generic over the compute type.
pub trait Method<T: Real>: Send + Sync {
    fn info(&self) -> &'static MethodInfo;

    /// What to do for a key when the arguments marked `false` lack it (at least one is `true`).
    fn on_missing(&self, present: &[bool]) -> OnMissing;

    /// Starts merging one key. `ctx.present` lists the arguments that will be supplied.
    ///
    /// The engine plans every key before reading any tensor, so the state of every key exists at
    /// once: keep it small here and allocate statistics buffers when the passes run.
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>>;

    /// Lines for the log about this node's run as configured (e.g. an effective probability
    /// range), printed once.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
}

/// The merge of one key.
pub trait KeyMerge<T: Real>: Send + Sync {
    /// Number of statistic passes before [`KeyMerge::merge_chunk`] may be called.
    fn stat_passes(&self) -> usize {
        0
    }
    /// Statistics of one block (`range` of the flattened tensor) for pass `pass`. Blocks are
    /// [`BLOCK`](crate::engine::BLOCK) elements long (the last may be shorter), computed in
    /// parallel.
    fn stat_block(&self, _pass: usize, _range: Range<usize>, _args: &[&[T]]) -> Vec<f64> {
        Vec::new()
    }
    /// Receives the statistics of block `block` of pass `pass`. Called in block order, one
    /// block at a time, so that sums folded here do not depend on the thread count.
    fn absorb_block(&mut self, _pass: usize, _block: usize, _stats: Vec<f64>) {}
    /// Called after the last block of pass `pass`, before the next pass or the merge.
    fn finish_pass(&mut self, _pass: usize) -> Result<()> {
        Ok(())
    }
    /// The number of consecutive elements that must be in the same chunk and the same statistic
    /// block (a row for per-row methods, the element count for whole-tensor methods); it divides
    /// the element count. Chunks and blocks start at multiples of it and span whole units.
    fn unit(&self) -> usize {
        1
    }
    /// Lines for the log about this key (e.g. an approximation used), asked after the
    /// statistic passes.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
    /// Computes `out` for elements `range` of the flattened tensor from the arguments' chunks
    /// (in `KeyCtx::present` order, each `range.len()` long).
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]);
}
