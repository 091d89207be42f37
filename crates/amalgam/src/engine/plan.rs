//! Planning (headers only): each key's job, from the graph and the key policy.

use super::*;

/// What to do for one output key.
pub(super) enum Job<T: Real> {
    Compute {
        /// One expression per output.
        exprs: Exprs<T>,
        numel: usize,
    },
    CopyRaw {
        model: usize,
        offset: u64,
        len: u64,
    },
    /// Written; the key's state (statistics, masks) is dropped.
    Done,
}

pub(super) struct PlannedKey<T: Real> {
    /// Index into the key table.
    pub(super) row: usize,
    pub(super) job: Job<T>,
}

/// A node's method: one instance, or one per block id when parameters are given per block.
pub(super) struct NodeMethods<T: Real> {
    /// The block id of each instance; empty for a single instance.
    pub(super) blocks: Vec<&'static str>,
    pub(super) instances: Vec<Box<dyn Method<T>>>,
    /// The layout and key → block mapping the blocks are found with.
    pub(super) layout: Option<Layout>,
    pub(super) mapping: crate::layout::arch::BlockMapping,
}

impl<T: Real> NodeMethods<T> {
    pub(super) fn build(
        node: &crate::recipe::graph::Node,
        layout: Option<Layout>,
        prepared: Option<&methods::PreparedNode>,
    ) -> Result<Self> {
        if let Some(prepared) = prepared {
            let method = methods::prepared::<T>(node, prepared)
                .map_err(|e| Error::Invalid(format!("node `{}`: {e}", node.name)))?;
            return Ok(NodeMethods {
                blocks: Vec::new(),
                instances: vec![method],
                layout,
                mapping: crate::layout::arch::BlockMapping::Supermerger,
            });
        }
        let build = |params| {
            methods::build::<T>(
                node.method,
                Params::new(node.method, params),
                &node.counts(),
            )
        };
        let mapping = match node.params.get(crate::method::BLOCK_MAPPING) {
            None => crate::layout::arch::BlockMapping::Supermerger,
            Some(crate::method::ParamValue::Text(t)) if t == "supermerger" => {
                crate::layout::arch::BlockMapping::Supermerger
            }
            Some(crate::method::ParamValue::Text(t)) if t == "sd_mecha" => {
                crate::layout::arch::BlockMapping::SdMecha
            }
            Some(other) => {
                return Err(Error::Invalid(format!(
                    "node `{}`: `blocks` is `supermerger` or `sd_mecha`, got {other:?}",
                    node.name
                )))
            }
        };
        if !node.has_block_params() {
            return Ok(NodeMethods {
                blocks: Vec::new(),
                instances: vec![build(crate::method::params_for_block(&node.params, None))?],
                layout,
                mapping,
            });
        }
        let ids = layout
            .filter(|&l| crate::layout::arch::block_of(l, "").is_some())
            .and_then(|l| crate::layout::arch::block_ids(l.arch()))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "node `{}` has per-block parameters, which need SD1 (ldm) or SDXL (sgm) checkpoints; the inputs are {}",
                    node.name,
                    layout.map_or("of no known architecture".to_string(), |l| l.to_string())
                ))
            })?;
        for v in node.params.values() {
            if let crate::method::ParamValue::Blocks(map) = v {
                if let Some(bad) = map
                    .keys()
                    .find(|k| *k != "default" && !ids.contains(&k.as_str()))
                {
                    return Err(Error::Invalid(format!(
                        "node `{}`: block `{bad}` does not exist in {} (blocks: {})",
                        node.name,
                        layout.unwrap(),
                        ids.join(", ")
                    )));
                }
            }
        }
        Ok(NodeMethods {
            layout,
            mapping,
            blocks: ids.to_vec(),
            instances: ids
                .iter()
                .map(|b| build(crate::method::params_for_block(&node.params, Some(b))))
                .collect::<Result<_>>()
                .map_err(|e| Error::Invalid(format!("node `{}`: {e}", node.name)))?,
        })
    }

    /// The instance for key `key` (the `BASE` one for keys without a block).
    pub(super) fn get(&self, key: Option<&str>) -> &dyn Method<T> {
        if self.blocks.is_empty() {
            return &*self.instances[0];
        }
        let block =
            key.and_then(|k| crate::layout::arch::block_of_with(self.layout?, k, self.mapping));
        let i = block
            .and_then(|b| self.blocks.iter().position(|x| *x == b))
            .unwrap_or(0);
        &*self.instances[i]
    }
}

/// Resolves `r` for the key of `row` (`key` is its name, for per-block methods): `None` when
/// it has no value for the key.
#[allow(clippy::too_many_arguments)]
pub(super) fn resolve<T: Real>(
    r: Ref,
    row: &KeyRow,
    key: Option<&str>,
    graph: &Graph,
    methods: &[NodeMethods<T>],
    seed: u64,
    unit_budget: u64,
    notes: &mut Vec<String>,
) -> Result<Option<Expr<T>>> {
    match r {
        Ref::Model(m) => Ok(if row.locs[m].is_some() {
            Some(Expr::Leaf(Leaf::new(row, m)))
        } else {
            // A pruned model completed from the repair model.
            graph
                .repair
                .filter(|&r| row.locs[r].is_some())
                .map(|r| Expr::Leaf(Leaf::new(row, r)))
        }),
        Ref::Node(n) => {
            let node = &graph.nodes[n];
            let mut args = Vec::new();
            for a in node.flat_args() {
                args.push(resolve(
                    a,
                    row,
                    key,
                    graph,
                    methods,
                    seed,
                    unit_budget,
                    notes,
                )?);
            }
            let present: Vec<bool> = args.iter().map(Option::is_some).collect();
            if !present.iter().any(|&p| p) {
                return Ok(None);
            }
            let all = present.iter().all(|&p| p);
            let decision = if all {
                OnMissing::MergePresent
            } else {
                methods[n].get(key).on_missing(&present)
            };
            match decision {
                OnMissing::Absent => {
                    notes.push(format!("node `{}` has no value", node.name));
                    Ok(None)
                }
                OnMissing::PassThrough(i) => {
                    notes.push(format!(
                        "node `{}` passes argument {} through unchanged",
                        node.name,
                        i + 1
                    ));
                    Ok(args.swap_remove(i))
                }
                OnMissing::MergePresent => {
                    if !all {
                        notes.push(format!(
                            "node `{}` merges {} of its {} arguments",
                            node.name,
                            present.iter().filter(|&&p| p).count(),
                            present.len()
                        ));
                    }
                    let idx: Vec<usize> = (0..present.len()).filter(|&i| present[i]).collect();
                    let ctx = KeyCtx {
                        key: &row.name,
                        shape: &row.shape,
                        present: &idx,
                        n_args: present.len(),
                        seed,
                    };
                    let at = |e: String| {
                        Error::Invalid(format!("node `{}`, key `{}`: {e}", node.name, row.name))
                    };
                    let state = methods[n]
                        .get(key)
                        .begin_key(&ctx)
                        .map_err(|e| at(e.to_string()))?;
                    let unit = state.unit();
                    if unit.bytes > unit_budget {
                        return Err(at(format!(
                            "{} ({}{} arguments) needs a memory budget of {}; raise it",
                            unit.what,
                            if unit.len > 1 {
                                format!("{} elements of ", unit.len)
                            } else {
                                String::new()
                            },
                            idx.len(),
                            crate::size::format_bytes(unit.bytes.saturating_mul(4))
                        )));
                    }
                    Ok(Some(Expr::Node(Box::new(NodeExpr {
                        node: n,
                        state,
                        args: args.into_iter().flatten().collect(),
                    }))))
                }
            }
        }
    }
}

/// The node methods of a graph and the job of every key.
pub(super) type Plan<T> = (Vec<NodeMethods<T>>, Vec<PlannedKey<T>>);

/// The node methods of `graph` and the job of every key.
pub(super) fn plan<T: Real>(
    graph: &Graph,
    rows: &[KeyRow],
    inputs: &RunInputs,
    opts: &MergeOptions,
    report: &mut MergeReport,
) -> Result<Plan<T>> {
    let layout = inputs.layout;
    let methods: Vec<NodeMethods<T>> = graph
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| NodeMethods::build(n, layout, inputs.prepared.get(&i)))
        .collect::<Result<_>>()?;
    for (node, method) in graph.nodes.iter().zip(&methods) {
        for note in method.get(None).notes() {
            report
                .notes
                .push(format!("node `{}` ({}): {note}", node.name, node.method));
        }
    }

    let mut planned = Vec::with_capacity(rows.len());
    for (ri, row) in rows.iter().enumerate() {
        for (i, loc) in row.locs.iter().enumerate() {
            if loc.is_none() {
                report.lacking[i].push(row.name.clone());
                if graph.repair.is_some_and(|r| row.locs[r].is_some()) {
                    report.repaired[i] += 1;
                }
            }
        }
        let (job, action) = plan_key(graph, row, layout, &methods, opts)?;
        report.actions.push((row.name.clone(), action));
        planned.push(PlannedKey { row: ri, job });
    }
    Ok((methods, planned))
}

/// The job of the key of `row`, and what the report says of it.
pub(super) fn plan_key<T: Real>(
    graph: &Graph,
    row: &KeyRow,
    layout: Option<Layout>,
    methods: &[NodeMethods<T>],
    opts: &MergeOptions,
) -> Result<(Job<T>, KeyAction)> {
    // The node (or model) this key's component is routed to.
    let target = layout
        .and_then(|l| l.component_of(&row.name))
        .and_then(|c| graph.components.get(c))
        .copied()
        .unwrap_or(graph.output);
    if !row.is_float() {
        return Ok((
            Job::CopyRaw {
                model: row.first,
                offset: row.locs[row.first].unwrap().offset,
                len: (row.numel() * row.dtype().bitsize() / 8) as u64,
            },
            KeyAction::CopiedUnchanged { model: row.first },
        ));
    }
    let mut notes = Vec::new();
    let expr = resolve(
        target,
        row,
        Some(row.name.as_str()),
        graph,
        methods,
        opts.seed,
        opts.memory_budget / 4,
        &mut notes,
    )?;
    let (expr, action) = match expr {
        Some(Expr::Leaf(leaf)) => (
            Expr::Leaf(leaf),
            KeyAction::Taken {
                model: leaf.model as usize,
                because: TakenBecause::PassedThrough(notes.join("; ")),
            },
        ),
        Some(e) => {
            let action = if notes.is_empty() {
                KeyAction::Merged
            } else {
                KeyAction::MergedPartly(notes.join("; "))
            };
            (e, action)
        }
        None => {
            let m = match graph.fallback {
                Some(f) if row.locs[f].is_some() => f,
                _ => row.first,
            };
            (
                Expr::Leaf(Leaf::new(row, m)),
                KeyAction::Taken {
                    model: m,
                    because: TakenBecause::Fallback(notes.join("; ")),
                },
            )
        }
    };
    Ok((
        Job::Compute {
            exprs: Exprs::Each(vec![expr]),
            numel: row.numel(),
        },
        action,
    ))
}

/// One plan per output joined into one: each key's expressions, one per output (the keys and
/// copies are the same in every plan: they follow the inputs, not the recipe). With `points`
/// (the outputs are points of that node: their graphs differ in its parameters only), a key
/// computed by that node is computed for all the points together, from its arguments evaluated
/// once (see [`methods::merge_points`]).
pub(super) fn join_plans<T: Real>(
    plans: Vec<Vec<PlannedKey<T>>>,
    points: Option<usize>,
) -> Result<Vec<PlannedKey<T>>> {
    let mut plans = plans.into_iter();
    let mut joined = plans.next().unwrap_or_default();
    for plan in plans {
        for (key, other) in joined.iter_mut().zip(plan) {
            if let (Job::Compute { exprs, .. }, Job::Compute { exprs: more, .. }) =
                (&mut key.job, other.job)
            {
                if let (Exprs::Each(e), Exprs::Each(more)) = (exprs, more) {
                    e.extend(more);
                }
            }
        }
    }
    let Some(node) = points else {
        return Ok(joined);
    };
    for key in &mut joined {
        let Job::Compute { exprs, .. } = &mut key.job else {
            continue;
        };
        let Exprs::Each(each) = exprs else { continue };
        if !each
            .iter()
            .all(|e| matches!(e, Expr::Node(n) if n.node == node))
        {
            continue;
        }
        let mut args = None;
        let states = std::mem::take(each)
            .into_iter()
            .map(|e| {
                let Expr::Node(n) = e else { unreachable!() };
                let NodeExpr { state, args: a, .. } = *n;
                // The points' arguments are the same expressions: the first point's are kept.
                args.get_or_insert(a);
                state
            })
            .collect();
        *exprs = Exprs::Points {
            args: args.unwrap_or_default(),
            state: methods::merge_points(states)?,
        };
    }
    Ok(joined)
}

/// The input bytes the planned keys read (the first output's expressions, or the points'
/// arguments).
pub(super) fn bytes_read<T: Real>(planned: &[PlannedKey<T>], rows: &[KeyRow]) -> u64 {
    fn leaves<T: Real>(e: &Expr<T>, row: &KeyRow) -> u64 {
        match e {
            Expr::Leaf(l) => (row.numel() * l.dtype(row).size()) as u64,
            Expr::Node(node) => node.args.iter().map(|a| leaves(a, row)).sum(),
        }
    }
    planned
        .iter()
        .map(|p| match &p.job {
            Job::CopyRaw { len, .. } => *len,
            Job::Compute { exprs, .. } => match exprs {
                Exprs::Each(e) => leaves(&e[0], &rows[p.row]),
                Exprs::Points { args, .. } => args.iter().map(|a| leaves(a, &rows[p.row])).sum(),
            },
            Job::Done => 0,
        })
        .sum()
}
