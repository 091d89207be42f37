//! Parameter sweeps: one recipe, several values of some of its parameters, one output per
//! point, all written from one read of the inputs (see [`crate::merge_outputs`]).
//!
//! An axis is `param=v1,v2,...` (every node that declares `param`) or `node.param=...` (that
//! node only). Axes combine as a cartesian product (the last axis varies fastest) or, zipped,
//! point by point. The output name is a template: `{param}` (or `{node.param}`) becomes that
//! point's value as written, `{i}` the point's number.

use crate::error::{Error, Result};
use crate::method::ParamValue;
use crate::recipe::graph::Graph;
use serde::Serialize;
use std::path::PathBuf;

/// How a sweep's axes combine into points.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Combine {
    /// Every combination of the axes' values (the last axis varies fastest).
    #[default]
    Product,
    /// The axes' i-th values together (the axes have as many values).
    Zip,
}

/// One swept parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepAxis {
    /// `param` (every node declaring it) or `node.param`.
    pub target: String,
    /// Its values, each with its text as written (for output names).
    pub values: Vec<(String, ParamValue)>,
}

/// A sweep: its axes and how they combine.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sweep {
    /// The swept parameters, in the order given.
    pub axes: Vec<SweepAxis>,
    /// Product or zip.
    pub combine: Combine,
}

/// One point of a sweep: its values, its recipe and its output file.
#[derive(Clone, Debug)]
pub struct SweepPoint {
    /// The point's number (from 0, in sweep order).
    pub index: usize,
    /// `(target, value as written)` per axis.
    pub values: Vec<(String, String)>,
    /// The recipe with the point's values.
    pub graph: Graph,
    /// Its output file.
    pub output: PathBuf,
}

/// A value as written on the command line or in a recipe: `true`/`false`, a number, or text
/// (a named option).
pub fn parse_value(text: &str) -> ParamValue {
    match text {
        "true" => ParamValue::Bool(true),
        "false" => ParamValue::Bool(false),
        t => t
            .parse::<f64>()
            .map(ParamValue::Number)
            .unwrap_or_else(|_| ParamValue::Text(t.to_string())),
    }
}

impl SweepAxis {
    /// Parses `param=v1,v2,...` or `node.param=v1,...`.
    pub fn parse(spec: &str) -> Result<SweepAxis> {
        let bad = |why: &str| Error::Invalid(format!("--sweep `{spec}`: {why}"));
        let (target, list) = spec
            .split_once('=')
            .ok_or_else(|| bad("expected PARAM=V1,V2,... (or NODE.PARAM=...)"))?;
        let target = target.trim();
        if target.is_empty()
            || target.split('.').any(str::is_empty)
            || target.split('.').count() > 2
        {
            return Err(bad("the parameter name is empty or has more than one dot"));
        }
        let values: Vec<(String, ParamValue)> = list
            .split(',')
            .map(str::trim)
            .map(|t| (t.to_string(), parse_value(t)))
            .collect();
        if values.iter().any(|(t, _)| t.is_empty()) {
            return Err(bad("a value is empty"));
        }
        Ok(SweepAxis {
            target: target.to_string(),
            values,
        })
    }
}

impl Sweep {
    /// The value indices of every point, in sweep order.
    fn combinations(&self) -> Result<Vec<Vec<usize>>> {
        let lens: Vec<usize> = self.axes.iter().map(|a| a.values.len()).collect();
        match self.combine {
            Combine::Zip => {
                if lens.windows(2).any(|w| w[0] != w[1]) {
                    return Err(Error::Invalid(format!(
                        "a zipped sweep needs as many values on every axis; got {}",
                        self.axes
                            .iter()
                            .map(|a| format!("{} ({})", a.target, a.values.len()))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
                let n = lens.first().copied().unwrap_or(0);
                Ok((0..n).map(|i| vec![i; lens.len()]).collect())
            }
            Combine::Product => {
                let mut points = vec![Vec::new()];
                for &len in &lens {
                    points = points
                        .into_iter()
                        .flat_map(|p| {
                            (0..len).map(move |i| {
                                let mut q = p.clone();
                                q.push(i);
                                q
                            })
                        })
                        .collect();
                }
                Ok(points)
            }
        }
    }

    /// The points of the sweep over `graph`, each writing to `template` with its values put in.
    /// Errors name an axis no node declares, and output names that two points share.
    pub fn points(&self, graph: &Graph, template: &str) -> Result<Vec<SweepPoint>> {
        if self.axes.is_empty() {
            return Err(Error::Invalid(
                "a sweep needs at least one parameter".into(),
            ));
        }
        let targets: Vec<Vec<usize>> = self
            .axes
            .iter()
            .map(|a| nodes_declaring(graph, &a.target))
            .collect::<Result<_>>()?;
        let mut points = Vec::new();
        for (index, combo) in self.combinations()?.into_iter().enumerate() {
            let mut g = graph.clone();
            let mut values = Vec::new();
            let mut output = template.replace("{i}", &index.to_string());
            for ((axis, nodes), &v) in self.axes.iter().zip(&targets).zip(&combo) {
                let (text, value) = &axis.values[v];
                let param = axis.target.rsplit('.').next().expect("a name");
                for &n in nodes {
                    g.nodes[n].params.insert(param.to_string(), value.clone());
                }
                output = output.replace(&format!("{{{}}}", axis.target), text);
                values.push((axis.target.clone(), text.clone()));
            }
            points.push(SweepPoint {
                index,
                values,
                graph: g,
                output: PathBuf::from(output),
            });
        }
        let mut seen = std::collections::BTreeMap::new();
        for p in &points {
            if let Some(other) = seen.insert(p.output.clone(), p.index) {
                return Err(Error::Invalid(format!(
                    "points {other} and {} of the sweep would both write {}: put the swept \
                     parameters in the output name, e.g. out/merge_{}.safetensors ({{i}} is the \
                     point's number)",
                    p.index,
                    p.output.display(),
                    self.axes
                        .iter()
                        .map(|a| format!("{{{}}}", a.target))
                        .collect::<Vec<_>>()
                        .join("_")
                )));
            }
        }
        Ok(points)
    }
}

/// The nodes `target` (`param` or `node.param`) sets: those declaring the parameter.
fn nodes_declaring(graph: &Graph, target: &str) -> Result<Vec<usize>> {
    let (node, param) = match target.split_once('.') {
        Some((n, p)) => (Some(n), p),
        None => (None, target),
    };
    let declares = |i: usize| {
        crate::methods::info(graph.nodes[i].method)
            .map(|info| info.params.iter().any(|p| p.name == param))
            .unwrap_or(false)
    };
    let found: Vec<usize> = (0..graph.nodes.len())
        .filter(|&i| node.is_none_or(|n| graph.nodes[i].name == n))
        .filter(|&i| declares(i))
        .collect();
    if found.is_empty() {
        let nodes: Vec<String> = graph
            .nodes
            .iter()
            .map(|n| format!("`{}` ({})", n.name, n.method))
            .collect();
        return Err(Error::Invalid(format!(
            "sweep `{target}`: no node of the recipe has a parameter `{param}`{} (nodes: {}; \
             `amalgam methods NAME` lists a method's parameters)",
            node.map(|n| format!(" named `{n}`")).unwrap_or_default(),
            nodes.join(", ")
        )));
    }
    Ok(found)
}
