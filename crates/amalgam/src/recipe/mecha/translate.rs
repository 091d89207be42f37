//! A parsed `.mecha` recipe as an amalgam graph: the walk over the commands, each merge handed
//! to its method's translation ([`super::dialect`]: one node, [`super::direct`], or its own, in
//! [`super::special`] and [`super::delta`]).

use super::dialect::{self, Mecha, Translation, SUPPORTED};
use super::{err, Command, Kind, Recipe, Value};
use crate::error::{Error, Result};
use crate::method::ParamValue;
use crate::recipe::graph::{Graph, ModelInput, Node, Ref};
use std::collections::BTreeMap;

/// The result of one command during translation.
#[derive(Clone, Debug)]
pub(super) enum Item {
    /// A `dict`.
    Dict(BTreeMap<String, Value>),
    /// A `literal` over a dict, with its model config.
    Literal {
        /// The dict's entries.
        dict: BTreeMap<String, Value>,
        /// The literal's `model_config`.
        config: Option<String>,
    },
    /// A parameter value (`convert_singleton`, block conversions, `fallback` of parameters).
    Param(ParamValue),
    /// A model or node: something with tensors.
    Tensors(Ref),
    /// `pick_component(model, component)`: the model's keys of one component.
    Component(Ref, String),
    /// `omit_component(model, component)`: the model's keys of the other components.
    Omitted(Ref, String),
}

/// A recipe translated into an amalgam graph, and the seed it asks for.
pub struct Translated {
    /// What to merge.
    pub graph: Graph,
    /// The recipe's seed, if it sets one.
    pub seed: Option<u64>,
    /// The `model_config` each model line declares (see [`super::check::check_model_configs`]).
    pub model_configs: Vec<super::check::ModelConfig>,
}

/// The translation so far.
pub(super) struct State<'r> {
    /// The recipe's name in errors.
    origin: &'r str,
    /// What each command made.
    items: Vec<Item>,
    /// The graph's nodes.
    nodes: Vec<Node>,
    /// Components routed to another model (`fallback(pick_component(..), ..)`).
    pub(super) components: BTreeMap<String, Ref>,
    /// The recipe's seed.
    seed: Option<u64>,
}

/// One merge line being translated.
pub(super) struct Merge<'r> {
    /// The line.
    pub(super) c: &'r Command,
    /// Its method.
    pub(super) mecha: &'static Mecha,
    /// Its positional arguments after the method's name: the inputs, then parameters.
    pub(super) args: Vec<&'r Value>,
}

/// Translates a parsed recipe into a graph. Relative model paths are resolved against
/// `model_dirs` (first match), then against `dir` (the recipe's folder); all missing models are
/// reported at once, with the paths tried. Unsupported methods are an error listing the ones
/// that are supported, before any tensor is read.
pub fn translate(
    recipe: &Recipe,
    origin: &str,
    dir: &std::path::Path,
    model_dirs: &[std::path::PathBuf],
    renames: &[(String, String)],
) -> Result<Translated> {
    refuse_unsupported(recipe, origin)?;
    // Parameters and merge spaces as sd-mecha declares them.
    let model_configs = super::check::check(recipe, origin)?;
    let mut s = State {
        origin,
        items: Vec::new(),
        nodes: Vec::new(),
        components: BTreeMap::new(),
        seed: None,
    };
    let mut models: Vec<ModelInput> = Vec::new();
    let mut missing: Vec<String> = Vec::new();
    for c in &recipe.commands {
        let item = match c.kind {
            Kind::Dict => Item::Dict(
                c.args
                    .iter()
                    .filter_map(|a| Some((a.name.clone()?, a.value.clone())))
                    .collect(),
            ),
            Kind::Literal => s.literal(c)?,
            Kind::Model => {
                let Some(Value::Str(p)) = c.positional().next() else {
                    unreachable!()
                };
                let resolved = match super::models::find(p, renames, model_dirs, dir) {
                    Ok(found) => found,
                    Err((shown, tried, fallback)) => {
                        missing.push(format!("{shown} (line {}; tried {tried})", c.line));
                        fallback
                    }
                };
                models.push(ModelInput {
                    name: format!("m{}", models.len()),
                    path: resolved,
                });
                Item::Tensors(Ref::Model(models.len() - 1))
            }
            Kind::Merge => s.merge(c)?,
        };
        s.items.push(item);
    }
    if !missing.is_empty() {
        return Err(Error::Recipe {
            origin: origin.to_string(),
            message: format!("missing models: {}", missing.join("; ")),
        });
    }
    let last = recipe.commands.last().expect("a recipe has commands");
    let output = match s.items.last() {
        Some(Item::Tensors(r)) => *r,
        _ => {
            return Err(err(
                origin,
                last.line,
                "the recipe's result is not a model or a merge".into(),
            ))
        }
    };
    // Block values from sd-mecha's block conversions follow its key → block mapping.
    for n in s.nodes.iter_mut().filter(|n| n.has_block_params()) {
        n.params.insert(
            crate::method::BLOCK_MAPPING.to_string(),
            ParamValue::Text("sd_mecha".into()),
        );
    }
    let graph = Graph {
        models,
        nodes: s.nodes,
        output,
        fallback: None,
        components: s.components,
        repair: None,
    };
    graph.validate().map_err(|x| Error::Recipe {
        origin: origin.to_string(),
        message: x.to_string(),
    })?;
    Ok(Translated {
        graph,
        seed: s.seed,
        model_configs,
    })
}

/// Refuses the recipe's first merge of a method amalgam does not run (with why, for the methods
/// refused on purpose, or the list of those it runs).
fn refuse_unsupported(recipe: &Recipe, origin: &str) -> Result<()> {
    let first = recipe
        .commands
        .iter()
        .filter(|c| c.kind == Kind::Merge)
        .find_map(|c| match c.positional().next() {
            Some(Value::Str(m)) if dialect::by_name(m).is_none() => Some((c.line, m)),
            _ => None,
        });
    let Some((line, m)) = first else {
        return Ok(());
    };
    if let Some((_, why)) = crate::methods::REFUSED.iter().find(|(n, _)| n == m) {
        return Err(err(
            origin,
            line,
            format!("method `{m}` is not supported: {why}"),
        ));
    }
    Err(err(
        origin,
        line,
        format!(
            "method `{m}` is not supported (amalgam runs: {})",
            SUPPORTED.join(", ")
        ),
    ))
}

impl State<'_> {
    /// An error at recipe line `line`.
    pub(super) fn err(&self, line: usize, message: String) -> Error {
        err(self.origin, line, message)
    }

    /// What command `r` made.
    pub(super) fn item(&self, r: usize) -> &Item {
        &self.items[r]
    }

    /// A `literal` line.
    fn literal(&self, c: &Command) -> Result<Item> {
        let Some(Value::Ref(d)) = c.positional().next() else {
            unreachable!()
        };
        let Item::Dict(dict) = &self.items[*d] else {
            return Err(self.err(
                c.line,
                format!("`literal` refers to &{d}, which is not a dict"),
            ));
        };
        let config = match c.keyword("model_config") {
            Some(Value::Str(s)) => Some(s.clone()),
            _ => None,
        };
        Ok(Item::Literal {
            dict: dict.clone(),
            config,
        })
    }

    /// A `merge` line, by its method's translation.
    fn merge(&mut self, c: &Command) -> Result<Item> {
        let mut pos = c.positional();
        let Some(Value::Str(method)) = pos.next() else {
            unreachable!()
        };
        let mecha = dialect::by_name(method)
            .unwrap_or_else(|| unreachable!("{method} is refused before translating"));
        let m = Merge {
            c,
            mecha,
            args: pos.collect(),
        };
        match mecha.translation {
            Translation::Direct(method) => super::direct::translate(self, &m, method),
            Translation::Special(translate) => translate(self, &m),
        }
    }

    /// Argument `v` as a parameter value (a literal or a reference to one).
    pub(super) fn param(&self, v: &Value, line: usize) -> Result<ParamValue> {
        Ok(match v {
            Value::Bool(b) => ParamValue::Bool(*b),
            Value::Int(i) => ParamValue::Number(*i as f64),
            Value::Float(f) => ParamValue::Number(*f),
            Value::Str(s) => ParamValue::Text(s.clone()),
            Value::Ref(r) => match &self.items[*r] {
                Item::Param(p) => p.clone(),
                other => {
                    return Err(self.err(line, format!("&{r} is not a parameter value ({other:?})")))
                }
            },
            Value::Null => return Err(self.err(line, "a parameter is null".into())),
        })
    }

    /// Argument `v` as tensors: a reference to a model or a merge of models.
    pub(super) fn tensors(&self, v: &Value, line: usize) -> Result<Ref> {
        match v {
            Value::Ref(r) => match &self.items[*r] {
                Item::Tensors(t) => Ok(*t),
                Item::Component(..) | Item::Omitted(..) => Err(self.err(
                    line,
                    format!(
                        "&{r} is a `pick_component` or `omit_component`, which amalgam reads only \
                         as `fallback(pick_component(model, component), merge)` (or \
                         `fallback(omit_component(...), model)`): the recipe's component routing"
                    ),
                )),
                _ => Err(self.err(line, format!("&{r} is not a model or a merge of models"))),
            },
            other => Err(self.err(line, format!("expected a model reference, got {other:?}"))),
        }
    }

    /// A node of `method` made by recipe line `line`.
    pub(super) fn node(
        &mut self,
        line: usize,
        method: &'static str,
        slots: Vec<Vec<Ref>>,
        params: BTreeMap<String, ParamValue>,
    ) -> Item {
        // One line can make two nodes (a zero base and the merge): names stay unique.
        let base = format!("line{line}");
        let taken = self
            .nodes
            .iter()
            .filter(|n| n.name == base || n.name.starts_with(&format!("{base}_")))
            .count();
        self.nodes.push(Node {
            name: if taken == 0 {
                base
            } else {
                format!("{base}_{taken}")
            },
            method,
            params,
            slots,
        });
        Item::Tensors(Ref::Node(self.nodes.len() - 1))
    }

    /// Records a merge's `seed` (a number; anything else is no seed) as the recipe's: amalgam
    /// runs with one seed, so two different ones are an error.
    pub(super) fn seed(&mut self, line: usize, given: Option<ParamValue>) -> Result<()> {
        if let Some(ParamValue::Number(x)) = given {
            if self.seed.is_some_and(|s| s != x as u64) {
                return Err(self.err(
                    line,
                    "the recipe uses several seeds; amalgam runs with one".into(),
                ));
            }
            self.seed = Some(x as u64);
        }
        Ok(())
    }
}

impl Merge<'_> {
    /// The method's name in the recipe.
    pub(super) fn name(&self) -> &'static str {
        self.mecha.name
    }

    /// An error at this line.
    pub(super) fn err(&self, s: &State, message: String) -> Error {
        s.err(self.c.line, message)
    }

    /// Input `i` as tensors (a missing one is an error).
    pub(super) fn input(&self, s: &State, i: usize) -> Result<Ref> {
        s.tensors(
            self.args.get(i).copied().unwrap_or(&Value::Null),
            self.c.line,
        )
    }

    /// Every positional argument as tensors.
    pub(super) fn inputs(&self, s: &State) -> Result<Vec<Ref>> {
        self.args
            .iter()
            .map(|a| s.tensors(a, self.c.line))
            .collect()
    }

    /// Every positional argument as tensors, at least one.
    pub(super) fn some_inputs(&self, s: &State) -> Result<Vec<Ref>> {
        let ms = self.inputs(s)?;
        if ms.is_empty() {
            return Err(self.err(s, format!("`{}` needs at least one input", self.name())));
        }
        Ok(ms)
    }

    /// Keyword parameter `name`, if given.
    pub(super) fn keyword(&self, s: &State, name: &str) -> Result<Option<ParamValue>> {
        self.c
            .keyword(name)
            .map(|v| s.param(v, self.c.line))
            .transpose()
    }

    /// Parameter `name` by keyword, or else positional argument `at`, if given.
    pub(super) fn keyword_or_at(
        &self,
        s: &State,
        name: &str,
        at: usize,
    ) -> Result<Option<ParamValue>> {
        self.c
            .keyword(name)
            .or(self.args.get(at).copied())
            .map(|v| s.param(v, self.c.line))
            .transpose()
    }

    /// Keyword number `name` (a bool is 0 or 1), or sd-mecha's default; it must be finite.
    pub(super) fn number(&self, s: &State, name: &str) -> Result<f64> {
        Ok(match self.keyword(s, name)? {
            Some(ParamValue::Number(x)) if !x.is_finite() => {
                return Err(self.err(s, format!("`{name}` is {x}; it must be a finite number")))
            }
            Some(ParamValue::Number(x)) => x,
            Some(ParamValue::Bool(b)) => f64::from(u8::from(b)),
            None => self.mecha.default(name),
            Some(other) => return Err(self.err(s, format!("`{name}` is {other:?}"))),
        })
    }

    /// Keyword flag `name` (a positive number is true), or sd-mecha's default.
    pub(super) fn flag(&self, s: &State, name: &str) -> Result<bool> {
        Ok(self.number(s, name)? > 0.0)
    }
}
