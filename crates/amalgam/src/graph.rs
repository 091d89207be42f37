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
    Model(usize),
    Node(usize),
}

/// One model file.
#[derive(Clone, Debug)]
pub struct ModelInput {
    /// The name it has in the recipe (for a glob group, `group[i]`).
    pub name: String,
    pub path: PathBuf,
}

/// One method application.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    /// The method's registered name.
    pub method: &'static str,
    pub params: BTreeMap<String, ParamValue>,
    /// Arguments per slot of the method (`MethodInfo::slots` order).
    pub slots: Vec<Vec<Ref>>,
}

impl Node {
    /// The arguments of all slots, in slot order.
    pub fn flat_args(&self) -> Vec<Ref> {
        self.slots.iter().flatten().copied().collect()
    }
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
#[derive(Clone, Debug)]
pub struct Graph {
    pub models: Vec<ModelInput>,
    pub nodes: Vec<Node>,
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
    /// A graph with one node applying `method` to `models` (CLI shorthand). For methods with a
    /// `base` slot, `base` fills it; otherwise the models fill the slots in order, and a `Many`
    /// slot takes all the remaining models.
    pub fn single(
        method: &str,
        base: Option<PathBuf>,
        models: Vec<PathBuf>,
        params: BTreeMap<String, ParamValue>,
    ) -> Result<Graph> {
        let info = methods::info(method)?;
        let mut inputs = Vec::new();
        let mut base_index = None;
        if let Some(b) = base {
            base_index = Some(inputs.len());
            inputs.push(ModelInput {
                name: "base".into(),
                path: b,
            });
        }
        for (i, p) in models.into_iter().enumerate() {
            inputs.push(ModelInput {
                name: format!("model{i}"),
                path: p,
            });
        }
        let has_base_slot = info.slots.first().map(|s| s.name) == Some("base");
        if has_base_slot && base_index.is_none() {
            return Err(Error::Invalid(format!(
                "method `{}` needs a base model: pass --base FILE",
                info.name
            )));
        }
        if !has_base_slot && base_index.is_some() {
            return Err(Error::Invalid(format!(
                "method `{}` takes no base model; drop --base (or use --fallback to name the model missing keys are taken from)",
                info.name
            )));
        }
        let mut rest: Vec<Ref> = (0..inputs.len())
            .filter(|&i| Some(i) != base_index)
            .map(Ref::Model)
            .collect();
        let mut slots = Vec::new();
        for (si, slot) in info.slots.iter().enumerate() {
            if si == 0 && has_base_slot {
                slots.push(vec![Ref::Model(base_index.unwrap())]);
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
            fallback: base_index,
            models: inputs,
            nodes: vec![Node {
                name: "merge".into(),
                method: info.name,
                params,
                slots,
            }],
            output: Ref::Node(0),
            components: BTreeMap::new(),
            repair: None,
        };
        graph.validate()?;
        Ok(graph)
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
                    _ => {}
                }
            }
            crate::methods::build::<f32>(
                node.method,
                crate::method::Params::new(
                    node.method,
                    crate::method::params_for_block(&node.params, None),
                ),
                &node.counts(),
            )
            .map_err(|e| Error::Invalid(format!("node `{}`: {e}", node.name)))?;
        }
        Ok(())
    }
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
