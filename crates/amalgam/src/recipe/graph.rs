//! A merge as a DAG: model inputs, method nodes, one output. Built from a recipe file or from the
//! command line's shorthand; the engine executes it.

use crate::error::{Error, Result};
use crate::method::ParamValue;
use crate::methods;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A reference to a model input or to a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ref {
    /// The model at this index of [`Graph::models`].
    Model(usize),
    /// The node at this index of [`Graph::nodes`].
    Node(usize),
}

/// One model file.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInput {
    /// The name it has in the recipe (for a glob group, `group[i]`).
    pub name: String,
    /// The model file.
    pub path: PathBuf,
}

/// One method application.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// The method's registered name.
    pub name: String,
    /// The method's registered name.
    pub method: &'static str,
    /// Its parameters, by name.
    pub params: BTreeMap<String, ParamValue>,
    /// Arguments per slot of the method (`MethodInfo::slots` order).
    pub slots: Vec<Vec<Ref>>,
}

impl Node {
    /// The arguments of all slots, in slot order.
    pub fn flat_args(&self) -> Vec<Ref> {
        self.slots.iter().flatten().copied().collect()
    }
    /// The number of arguments given to each of the method's slots.
    pub fn counts(&self) -> Vec<usize> {
        self.slots.iter().map(Vec::len).collect()
    }
    /// Whether any parameter is given per block.
    pub fn has_block_params(&self) -> bool {
        self.params
            .values()
            .any(|v| matches!(v, ParamValue::Blocks(_)))
    }
}

/// A validated merge graph. Nodes only refer to models and to earlier nodes.
#[derive(Clone, Debug, PartialEq)]
pub struct Graph {
    /// The models read.
    pub models: Vec<ModelInput>,
    /// The method nodes, each after the nodes it takes as arguments.
    pub nodes: Vec<Node>,
    /// What is written.
    pub output: Ref,
    /// The model keys are taken from when the output node has no value for them (see the key
    /// policy); `None` means the first model (in input order) that has the key.
    pub fallback: Option<usize>,
    /// Per component (`vae`, `clip_l`, ...): the node or model its keys come from instead of
    /// `output`. Components follow the architecture detected from the inputs' headers.
    pub components: BTreeMap<String, Ref>,
    /// Complete models that lack keys (pruned files) from this model: where a model lacks a key
    /// this one has, the key is read from this one instead of leaving the model out.
    pub repair: Option<usize>,
}

impl Graph {
    /// The graph of `amalgam repair`: `model` completed with every key it lacks from `base`
    /// (e.g. the VAE of a pruned file); no node, nothing merged.
    pub fn repair(model: &std::path::Path, base: &std::path::Path) -> Graph {
        Graph {
            models: vec![
                ModelInput {
                    name: "model".into(),
                    path: model.to_path_buf(),
                },
                ModelInput {
                    name: "base".into(),
                    path: base.to_path_buf(),
                },
            ],
            nodes: Vec::new(),
            output: Ref::Model(0),
            fallback: Some(0),
            components: Default::default(),
            repair: Some(1),
        }
    }

    /// A graph with one node applying `method` to `models`, with `base` filling the method's
    /// `base` slot (see [`Shorthand`] for the fallback and repair options).
    pub fn single(
        method: &str,
        base: Option<PathBuf>,
        models: Vec<PathBuf>,
        params: BTreeMap<String, ParamValue>,
    ) -> Result<Graph> {
        Shorthand {
            method: method.to_string(),
            base,
            models,
            params,
            ..Default::default()
        }
        .build()
        .map(|(g, _)| g)
    }

    /// Checks the graph's structure and builds every method once, so that parameter errors are
    /// reported before any tensor is read.
    pub fn validate(&self) -> Result<()> {
        let check = |r: &Ref, what: &str| match *r {
            Ref::Model(m) if m >= self.models.len() => Err(Error::Invalid(format!(
                "{what} refers to model #{m}, which does not exist"
            ))),
            Ref::Node(n) if n >= self.nodes.len() => Err(Error::Invalid(format!(
                "{what} refers to node #{n}, which does not exist"
            ))),
            _ => Ok(()),
        };
        check(&self.output, "the output")?;
        for (c, r) in &self.components {
            check(r, &format!("component `{c}`"))?;
        }
        if let Some(m) = self.repair {
            check(&Ref::Model(m), "repair")?;
        }
        for (ni, node) in self.nodes.iter().enumerate() {
            let info = methods::info(node.method)?;
            let stage = methods::is_stage(node.method);
            if stage && self.output != Ref::Node(ni) {
                return Err(Error::Invalid(format!(
                    "node `{}`: `{}` writes a LoRA file, not a model: it can only be the output node",
                    node.name, node.method
                )));
            }
            if node.slots.len() != info.slots.len() {
                return Err(Error::Invalid(format!(
                    "node `{}`: method `{}` has slots {} but {} were given",
                    node.name,
                    info.name,
                    slot_names(info),
                    node.slots.len()
                )));
            }
            for r in node.flat_args() {
                match r {
                    Ref::Model(m) if m >= self.models.len() => {
                        return Err(Error::Invalid(format!(
                            "node `{}` refers to model #{m}, which does not exist",
                            node.name
                        )))
                    }
                    Ref::Node(n) if n >= ni => {
                        return Err(Error::Invalid(format!(
                            "node `{}` refers to a node that is not computed before it (a cycle?)",
                            node.name
                        )))
                    }
                    Ref::Node(n) if methods::is_stage(self.nodes[n].method) => {
                        return Err(Error::Invalid(format!(
                            "node `{}` takes `{}` as an input, but `{}` writes a LoRA file, not a model: it can only be the output node",
                            node.name, self.nodes[n].name, self.nodes[n].method
                        )))
                    }
                    _ => {}
                }
            }
            // Per-block values are resolved per key; check them all here, before any tensor.
            for (name, v) in &node.params {
                if let ParamValue::Blocks(b) = v {
                    if let Some((block, x)) = b.iter().find(|(_, x)| !x.is_finite()) {
                        return Err(Error::Invalid(format!(
                            "node `{}`: parameter `{name}` is {x} for block {block}; it must be a finite number",
                            node.name
                        )));
                    }
                }
            }
            let params = crate::method::Params::new(
                node.method,
                crate::method::params_for_block(&node.params, None),
            );
            if stage && node.has_block_params() {
                return Err(Error::Invalid(format!(
                    "node `{}`: `{}` takes no per-block parameters",
                    node.name, node.method
                )));
            }
            crate::methods::check(node.method, params, &node.counts())
                .map_err(|e| Error::Invalid(format!("node `{}`: {e}", node.name)))?;
        }
        for (c, r) in &self.components {
            if let Ref::Node(n) = *r {
                if methods::is_stage(self.nodes[n].method) {
                    return Err(Error::Invalid(format!(
                        "component `{c}` is routed to `{}`, which writes a LoRA file, not a model",
                        self.nodes[n].name
                    )));
                }
            }
        }
        Ok(())
    }

    /// The output node when it is an output stage (e.g. `extract_lora`): its index.
    pub fn output_stage(&self) -> Option<usize> {
        match self.output {
            Ref::Node(n) if methods::is_stage(self.nodes[n].method) => Some(n),
            _ => None,
        }
    }

    /// This graph writing `output` instead, with only the nodes it and the components need
    /// (in the same order): the graph that materialises a node's result.
    pub fn with_output(&self, output: Ref) -> Graph {
        let mut needed = vec![false; self.nodes.len()];
        let mut stack: Vec<Ref> = vec![output];
        stack.extend(self.components.values().copied());
        while let Some(r) = stack.pop() {
            if let Ref::Node(n) = r {
                if !needed[n] {
                    needed[n] = true;
                    stack.extend(self.nodes[n].flat_args());
                }
            }
        }
        let mut index = vec![usize::MAX; self.nodes.len()];
        let mut nodes = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if needed[i] {
                index[i] = nodes.len();
                nodes.push(node.clone());
            }
        }
        let remap = |r: Ref| match r {
            Ref::Node(n) => Ref::Node(index[n]),
            m => m,
        };
        for node in &mut nodes {
            for slot in &mut node.slots {
                for r in slot.iter_mut() {
                    *r = remap(*r);
                }
            }
        }
        Graph {
            models: self.models.clone(),
            nodes,
            output: remap(output),
            fallback: self.fallback,
            components: self
                .components
                .iter()
                .map(|(c, r)| (c.clone(), remap(*r)))
                .collect(),
            repair: self.repair,
        }
    }
}

/// The command line's shorthand for a one-node merge: `method` applied to `models`, with the
/// options of `amalgam merge --method`.
///
/// - `base`: for a method with a `base` slot, fills it. For a method without one (a soup, a
///   weighted sum), the base is not merged: it is the model keys are taken from when the merge
///   has no value for them (the fallback) and the model pruned models are completed from.
/// - `fallback`: the model keys the merge has no value for come from (default: the base; else
///   the first model that has the key). It may be one of `models` or another file.
/// - `repair`: complete models that lack keys (pruned files) from the base, else the fallback.
#[derive(Clone, Debug, Default)]
pub struct Shorthand {
    /// The method.
    pub method: String,
    /// The models, in order.
    pub models: Vec<PathBuf>,
    /// The base model, for methods that take one (and the fallback).
    pub base: Option<PathBuf>,
    /// Where keys the merge has no value for come from.
    pub fallback: Option<PathBuf>,
    /// Whether models that lack keys are completed from the base or fallback.
    pub repair: bool,
    /// The method's parameters.
    pub params: BTreeMap<String, ParamValue>,
}

impl Shorthand {
    /// The graph, and lines for the log that say how the options were read (e.g. a `base` that is
    /// not merged).
    pub fn build(self) -> Result<(Graph, Vec<String>)> {
        let info = methods::info(&self.method)?;
        let has_base_slot = info.slots.first().map(|s| s.name) == Some("base");
        let mut notes = Vec::new();
        let mut inputs = Vec::new();
        let mut base_index = None;
        if let Some(b) = &self.base {
            base_index = Some(inputs.len());
            inputs.push(ModelInput {
                name: "base".into(),
                path: b.clone(),
            });
        }
        if has_base_slot && base_index.is_none() {
            return Err(Error::Invalid(format!(
                "method `{}` needs a base model: pass --base FILE",
                info.name
            )));
        }
        if !has_base_slot && self.base.is_some() {
            notes.push(format!(
                "method `{}` has no base input: the base is not merged; it is the fallback{}",
                info.name,
                if self.repair {
                    " and pruned models are completed from it"
                } else {
                    " (keys the merge has no value for come from it)"
                }
            ));
        }
        for (i, p) in self.models.iter().enumerate() {
            inputs.push(ModelInput {
                name: format!("model{i}"),
                path: p.clone(),
            });
        }
        let mut rest: Vec<Ref> = (0..inputs.len())
            .filter(|&i| Some(i) != base_index)
            .map(Ref::Model)
            .collect();
        // The fallback: a model already given (the same file), or one more input not merged.
        let fallback = match &self.fallback {
            None => base_index,
            Some(f) => Some(
                inputs
                    .iter()
                    .position(|m| same_file(&m.path, f))
                    .unwrap_or_else(|| {
                        inputs.push(ModelInput {
                            name: "fallback".into(),
                            path: f.clone(),
                        });
                        inputs.len() - 1
                    }),
            ),
        };
        let repair = match (self.repair, base_index.or(fallback)) {
            (false, _) => None,
            (true, Some(r)) => Some(r),
            (true, None) => {
                return Err(Error::Invalid(
                    "--repair completes pruned models from a complete model: give --base FILE or --fallback FILE"
                        .into(),
                ))
            }
        };
        let mut slots = Vec::new();
        for (si, slot) in info.slots.iter().enumerate() {
            if si == 0 && has_base_slot {
                slots.push(vec![Ref::Model(base_index.expect("checked above"))]);
                continue;
            }
            match slot.kind {
                crate::method::SlotKind::One => {
                    if rest.is_empty() {
                        return Err(Error::Invalid(format!(
                            "method `{}` takes {} model(s) ({}), got fewer",
                            info.name,
                            info.slots.len() - usize::from(has_base_slot),
                            slot_names(info)
                        )));
                    }
                    slots.push(vec![rest.remove(0)]);
                }
                crate::method::SlotKind::Many => {
                    if rest.is_empty() {
                        return Err(Error::Invalid(format!(
                            "method `{}` needs at least one model for `{}`",
                            info.name, slot.name
                        )));
                    }
                    slots.push(std::mem::take(&mut rest));
                }
            }
        }
        if !rest.is_empty() {
            return Err(Error::Invalid(format!(
                "method `{}` takes {} model(s) ({}), got {} more",
                info.name,
                info.slots.len() - usize::from(has_base_slot),
                slot_names(info),
                rest.len()
            )));
        }
        let graph = Graph {
            fallback,
            models: inputs,
            nodes: vec![Node {
                name: "merge".into(),
                method: info.name,
                params: self.params,
                slots,
            }],
            output: Ref::Node(0),
            components: BTreeMap::new(),
            repair,
        };
        graph.validate()?;
        Ok((graph, notes))
    }
}

/// Whether two paths name the same file (the same path, or the same file through links).
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    a == b
        || matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(x), Ok(y)) if x == y
        )
}

fn slot_names(info: &crate::method::MethodInfo) -> String {
    info.slots
        .iter()
        .map(|s| match s.kind {
            crate::method::SlotKind::One => s.name.to_string(),
            crate::method::SlotKind::Many => format!("{}...", s.name),
        })
        .collect::<Vec<_>>()
        .join(", ")
}
