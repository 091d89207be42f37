//! A method's parameters: each declared once ([`ParamInfo`]: name, type, default, domain, doc),
//! and the values given in a recipe or on the command line, read and checked against that
//! declaration ([`Params`]). Parsing, validation, `amalgam methods`, the documentation checks and
//! the presets' overrides all come from the declaration.

use super::{MethodInfo, SlotKind};
use crate::error::{Error, Result};
use std::collections::BTreeMap;

/// A parameter of a method, declared once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParamInfo {
    /// The name recipes and `--param` use.
    pub name: &'static str,
    /// Its type, with its default and domain.
    pub kind: ParamKind,
    /// What it does, for `amalgam methods` and the docs.
    pub doc: &'static str,
}

/// The type of a parameter, with its default and the values it may take.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ParamKind {
    /// A finite number in `domain`. `default: None`: the parameter is optional and its absence
    /// means something of its own (documented in `doc`).
    Number {
        /// The default; `None`: optional.
        default: Option<f64>,
        /// The values it accepts.
        domain: Domain,
    },
    /// One number per model of the method's list slot: a list of as many numbers, or one number
    /// for every model.
    PerModel {
        /// The default for every model.
        default: f64,
    },
    /// A non-negative integer.
    Count {
        /// The default.
        default: usize,
    },
    /// `true` or `false`.
    Bool {
        /// The default.
        default: bool,
    },
    /// One of `options` (a string; `-` for `_` and any case are accepted).
    Choice {
        /// The accepted values.
        options: &'static [&'static str],
        /// The default value.
        default: &'static str,
    },
}

impl ParamInfo {
    /// Any finite number.
    pub const fn number(name: &'static str, default: f64, doc: &'static str) -> Self {
        Self::number_in(name, default, Domain::Any, doc)
    }
    /// A finite number in `domain`.
    pub const fn number_in(
        name: &'static str,
        default: f64,
        domain: Domain,
        doc: &'static str,
    ) -> Self {
        ParamInfo {
            name,
            kind: ParamKind::Number {
                default: Some(default),
                domain,
            },
            doc,
        }
    }
    /// A number in `domain` without a default.
    pub const fn optional(name: &'static str, domain: Domain, doc: &'static str) -> Self {
        ParamInfo {
            name,
            kind: ParamKind::Number {
                default: None,
                domain,
            },
            doc,
        }
    }
    /// One number per model.
    pub const fn per_model(name: &'static str, default: f64, doc: &'static str) -> Self {
        ParamInfo {
            name,
            kind: ParamKind::PerModel { default },
            doc,
        }
    }
    /// A non-negative integer.
    pub const fn count(name: &'static str, default: usize, doc: &'static str) -> Self {
        ParamInfo {
            name,
            kind: ParamKind::Count { default },
            doc,
        }
    }
    /// A boolean.
    pub const fn flag(name: &'static str, default: bool, doc: &'static str) -> Self {
        ParamInfo {
            name,
            kind: ParamKind::Bool { default },
            doc,
        }
    }
    /// One of `options`.
    pub const fn choice(
        name: &'static str,
        options: &'static [&'static str],
        default: &'static str,
        doc: &'static str,
    ) -> Self {
        ParamInfo {
            name,
            kind: ParamKind::Choice { options, default },
            doc,
        }
    }
    /// This parameter with another default (for presets).
    pub const fn with_default(mut self, default: PresetDefault) -> Self {
        self.kind = match (self.kind, default) {
            (ParamKind::Number { domain, .. }, PresetDefault::Number(d)) => ParamKind::Number {
                default: Some(d),
                domain,
            },
            (ParamKind::Choice { options, .. }, PresetDefault::Choice(d)) => ParamKind::Choice {
                options,
                default: d,
            },
            (ParamKind::Bool { .. }, PresetDefault::Bool(d)) => ParamKind::Bool { default: d },
            _ => panic!("a default of another type than the parameter's"),
        };
        self
    }

    /// The default as written in a recipe (`None`: the parameter has none).
    pub fn default_text(&self) -> Option<String> {
        match self.kind {
            ParamKind::Number { default, .. } => default.map(format_number),
            ParamKind::PerModel { default } => Some(format_number(default)),
            ParamKind::Count { default } => Some(default.to_string()),
            ParamKind::Bool { default } => Some(default.to_string()),
            ParamKind::Choice { default, .. } => Some(default.to_string()),
        }
    }

    /// The type and the values allowed, in words (e.g. `a number in [0, 1)`).
    pub fn type_text(&self) -> String {
        match self.kind {
            ParamKind::Number { domain, .. } => match domain {
                Domain::Any => "a number".to_string(),
                d => format!("a number {}", d.describe("").trim_start()),
            },
            ParamKind::PerModel { .. } => "a number, or a list of one per model".to_string(),
            ParamKind::Count { .. } => "an integer >= 0".to_string(),
            ParamKind::Bool { .. } => "true | false".to_string(),
            ParamKind::Choice { options, .. } => options.join(" | "),
        }
    }
}

/// A preset's default for a parameter (see [`ParamInfo::with_default`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PresetDefault {
    /// A number.
    Number(f64),
    /// One of a choice's options.
    Choice(&'static str),
    /// A flag.
    Bool(bool),
}

/// A number as a recipe writes it: the shortest form that reads back to the same value, with a
/// decimal point or an exponent (`0.5`, `1.0`, `1e-6`).
pub fn format_number(x: f64) -> String {
    format!("{x:?}")
}

/// A parameter value from a recipe or the command line.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum ParamValue {
    /// `true` or `false`.
    Bool(bool),
    /// A number.
    Number(f64),
    /// A list of numbers (one per model).
    List(Vec<f64>),
    /// A string (a choice).
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
    /// The domain in words (`>= 0`, `(0, 1]`, ...).
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
    /// Any finite number.
    Any,
    /// `x > 0`.
    Positive,
    /// `x >= 0`.
    NonNegative,
    /// `0 <= x < 1` (a drop probability).
    Probability,
    /// `0 <= x <= 1`.
    UnitInterval,
    /// `0 < x <= 1` (a fraction kept).
    Fraction,
}

impl Domain {
    /// Whether `x` is in the domain.
    pub fn contains(self, x: f64) -> bool {
        match self {
            Domain::Any => true,
            Domain::Positive => x > 0.0,
            Domain::NonNegative => x >= 0.0,
            Domain::Probability => (0.0..1.0).contains(&x),
            Domain::UnitInterval => (0.0..=1.0).contains(&x),
            Domain::Fraction => x > 0.0 && x <= 1.0,
        }
    }
    /// The domain in words, e.g. `eps > 0`, `p in [0, 1)`.
    pub fn describe(self, name: &str) -> String {
        match self {
            Domain::Any => format!("{name} any finite number"),
            Domain::Positive => format!("{name} > 0"),
            Domain::NonNegative => format!("{name} >= 0"),
            Domain::Probability => format!("{name} in [0, 1)"),
            Domain::UnitInterval => format!("{name} in [0, 1]"),
            Domain::Fraction => format!("{name} in (0, 1]"),
        }
    }
}

/// A method's parameters as given, read by the method's constructor by name and checked against
/// the method's declaration. Every parameter given must be read; [`Params::finish`] reports the
/// ones left over as unknown.
#[derive(Clone, Debug, Default)]
pub struct Params {
    method: String,
    values: BTreeMap<String, ParamValue>,
    /// The declaration the values are read against (set by the registry before the
    /// constructor runs).
    info: Option<&'static MethodInfo>,
    /// The number of models given to the method's list slot.
    models: usize,
}

impl Params {
    /// The values given to `method`, by parameter name.
    pub fn new(method: &str, values: BTreeMap<String, ParamValue>) -> Self {
        Params {
            method: method.to_string(),
            values,
            info: None,
            models: 0,
        }
    }
    /// Reads the values against `info`; `counts[i]` is the number of arguments of slot `i`.
    pub(crate) fn bind(mut self, info: &'static MethodInfo, counts: &[usize]) -> Self {
        self.method = info.name.to_string();
        self.models = info
            .slots
            .iter()
            .zip(counts)
            .find(|(s, _)| s.kind == SlotKind::Many)
            .map_or(0, |(_, &n)| n);
        self.info = Some(info);
        self
    }
    /// The declaration the values are read against, once bound.
    pub(crate) fn info(&self) -> Option<&'static MethodInfo> {
        self.info
    }
    fn err(&self, msg: String) -> Error {
        Error::method(&self.method, msg)
    }
    /// The declaration of `name`: a method reads only the parameters it declares.
    fn kind(&self, name: &str) -> ParamKind {
        let info = self
            .info
            .expect("parameters read before the registry bound them");
        info.params
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| {
                panic!(
                    "method `{}` reads `{name}`, which it does not declare",
                    info.name
                )
            })
            .kind
    }
    /// A given number must be finite and in its domain: the error names the parameter.
    fn checked(&self, name: &str, v: f64, domain: Domain) -> Result<f64> {
        if !v.is_finite() {
            Err(self.err(format!(
                "parameter `{name}` is {v}; it must be a finite number"
            )))
        } else if !domain.contains(v) {
            Err(self.err(format!(
                "parameter `{name}` is {v}; allowed: {}",
                domain.describe(name)
            )))
        } else {
            Ok(v)
        }
    }
    /// Whether a value was given for `name` (still unread).
    pub fn is_given(&self, name: &str) -> bool {
        self.values.contains_key(name)
    }
    /// A number parameter: the value given, or the declared default.
    pub fn number(&mut self, name: &str) -> Result<f64> {
        match self.optional_number(name)? {
            Some(v) => Ok(v),
            None => panic!("`{name}` has no default: read it with `optional_number`"),
        }
    }
    /// A number parameter: the value given, or the declared default (`None` when it has none).
    pub fn optional_number(&mut self, name: &str) -> Result<Option<f64>> {
        let ParamKind::Number { default, domain } = self.kind(name) else {
            panic!("`{name}` is not declared as a number");
        };
        match self.values.remove(name) {
            None => Ok(default),
            Some(ParamValue::Number(v)) => self.checked(name, v, domain).map(Some),
            Some(other) => Err(self.err(format!(
                "parameter `{name}` must be a number, got {}",
                other.describe()
            ))),
        }
    }
    /// A boolean parameter.
    pub fn boolean(&mut self, name: &str) -> Result<bool> {
        let ParamKind::Bool { default } = self.kind(name) else {
            panic!("`{name}` is not declared as a boolean");
        };
        match self.values.remove(name) {
            None => Ok(default),
            Some(ParamValue::Bool(v)) => Ok(v),
            Some(other) => Err(self.err(format!(
                "parameter `{name}` must be true or false, got {}",
                other.describe()
            ))),
        }
    }
    /// One number per model of the list slot: a list of exactly that many numbers, or one
    /// number repeated, or the default repeated.
    pub fn per_model(&mut self, name: &str) -> Result<Vec<f64>> {
        let ParamKind::PerModel { default } = self.kind(name) else {
            panic!("`{name}` is not declared per model");
        };
        let n = self.models;
        let any = Domain::Any;
        match self.values.remove(name) {
            None => Ok(vec![default; n]),
            Some(ParamValue::Number(v)) => Ok(vec![self.checked(name, v, any)?; n]),
            Some(ParamValue::List(v)) if v.len() == n => {
                v.iter()
                    .try_for_each(|&x| self.checked(name, x, any).map(drop))?;
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
    /// A choice parameter: one of its declared options.
    pub fn choice(&mut self, name: &str) -> Result<&'static str> {
        let ParamKind::Choice { options, default } = self.kind(name) else {
            panic!("`{name}` is not declared as a choice");
        };
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
    /// A non-negative integer parameter.
    pub fn count(&mut self, name: &str) -> Result<usize> {
        let ParamKind::Count { default } = self.kind(name) else {
            panic!("`{name}` is not declared as a count");
        };
        match self.values.remove(name) {
            None => Ok(default),
            Some(ParamValue::Number(v)) if v >= 0.0 && v.fract() == 0.0 => Ok(v as usize),
            Some(other) => Err(self.err(format!(
                "parameter `{name}` must be a non-negative integer, got {other:?}"
            ))),
        }
    }

    /// Reads every declared parameter (checking each value given against its declaration), for
    /// methods whose parameters are checked before they are built.
    pub(crate) fn read_declared(&mut self) -> Result<()> {
        let info = self
            .info
            .expect("parameters read before the registry bound them");
        for p in info.params {
            match p.kind {
                ParamKind::Number { .. } => drop(self.optional_number(p.name)?),
                ParamKind::PerModel { .. } => drop(self.per_model(p.name)?),
                ParamKind::Count { .. } => drop(self.count(p.name)?),
                ParamKind::Bool { .. } => drop(self.boolean(p.name)?),
                ParamKind::Choice { .. } => drop(self.choice(p.name)?),
            }
        }
        Ok(())
    }

    /// Fails if any parameter given was not read.
    pub fn finish(self) -> Result<()> {
        if let Some(name) = self.values.keys().next() {
            let known: Vec<&str> = self
                .info
                .map(|i| i.params.iter().map(|p| p.name).collect())
                .unwrap_or_default();
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
