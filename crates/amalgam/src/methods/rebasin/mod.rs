//! Whole-model methods of the re-basin family (spec §15). Each needs the whole model before any
//! key is merged: the engine prepares its permutations (`engine::prepare`: weight matching,
//! MergeMany, the SD driver's walk, or seeded random ones), then the method computes each key
//! from its inputs and those permutations.
//!
//! - [`permute`]: `rebasin(a, ref)`, `randperm(a)`, `merge_many(models)`;
//! - [`walk`]: `rebasin_merge(a, b)` (ogkalu2's SD driver) and `basin_sum(a, b)`.

pub(crate) mod permute;
pub(crate) mod walk;

use crate::error::{Error, Result};
use crate::method::*;
use crate::real::Real;
use crate::rebasin::Permutations;
use std::sync::Arc;

/// `rebasin`'s declaration.
pub static REBASIN: MethodInfo = MethodInfo {
    name: "rebasin",
    origins: &[Origin::SdMecha],
    formula: "P(a): a's hidden units permuted, per group, by argmax_P <ref, P(a)> (weight \
              matching, an exact assignment per group)",
    summary: "Git Re-Basin weight matching (sd-mecha's rebasin semantics): a with the hidden \
              units of every attention head, feed-forward and embedding MLP permuted towards \
              ref; the same function as a. SD1 and SDXL. Whole models: a node input is merged \
              once to a temporary file.",
    slots: &[
        Slot {
            name: "a",
            kind: SlotKind::One,
            doc: "the model permuted",
        },
        Slot {
            name: "ref",
            kind: SlotKind::One,
            doc: "the model it is matched to",
        },
    ],
    params: &[],
};

/// `randperm`'s declaration.
pub static RANDPERM: MethodInfo = MethodInfo {
    name: "randperm",
    origins: &[Origin::SdMecha],
    formula: "P(a): every permutation group of a permuted at random (seeded by the run's seed \
              and the group)",
    summary: "a with its hidden units permuted at random: the same function, other weights (for \
              testing re-basin). SD1 and SDXL.",
    slots: &[Slot {
        name: "a",
        kind: SlotKind::One,
        doc: "the model permuted",
    }],
    params: &[],
};

/// `merge_many`'s declaration.
pub static MERGE_MANY: MethodInfo = MethodInfo {
    name: "merge_many",
    origins: &[Origin::Paper],
    formula: "(1/N) sum_t P_t(theta_t), each P_t matching model t to the mean of the others \
              (MergeMany, repeated until no permutation changes; P_1 = identity)",
    summary: "Git Re-Basin's MergeMany: every model's hidden units matched to the mean of the \
              others in turn, then the permuted models averaged (in the first model's unit \
              order). SD1 and SDXL. Whole models: node inputs are merged once to temporary files.",
    slots: &[Slot {
        name: "models",
        kind: SlotKind::Many,
        doc: "the models matched and averaged",
    }],
    params: &[ParamInfo::count(
        "max_rounds",
        10,
        "the most rounds per group (a round matches every model once; it stops earlier when \
         none changes)",
    )],
};

/// The SD driver's parameters, declared once.
const DRIVER_PARAMS: &[ParamInfo] = &[
    ParamInfo::number_in(
        "alpha",
        0.5,
        Domain::UnitInterval,
        "the share of b at the end of the walk",
    ),
    ParamInfo::count(
        "iterations",
        10,
        "steps of the walk from a to b, each followed by a matching towards a (the driver's \
         default)",
    ),
];

/// `rebasin_merge`'s declaration.
pub static REBASIN_MERGE: MethodInfo = MethodInfo {
    name: "rebasin_merge",
    origins: &[Origin::Community],
    formula: "theta_0 = a; per step x: theta <- (1 - a_x) theta + a_x b, theta <- P_x(theta) \
              matched towards a; a_x so that b's share reaches alpha",
    summary: "ogkalu2's SD re-basin driver (Merge-Stable-Diffusion-models-without-distortion): \
              a weighted sum of a and b walked in steps, b's units permuted back towards a's \
              order after each. SD1 and SDXL. Whole models: node inputs are merged once to \
              temporary files.",
    slots: &[
        Slot {
            name: "a",
            kind: SlotKind::One,
            doc: "the model whose unit order is kept",
        },
        Slot {
            name: "b",
            kind: SlotKind::One,
            doc: "the model walked towards",
        },
    ],
    params: DRIVER_PARAMS,
};

/// `basin_sum`'s declaration.
pub static BASIN_SUM: MethodInfo = MethodInfo {
    name: "basin_sum",
    origins: &[Origin::Community],
    formula: "alpha (alpha a + (1 - alpha) b) + (1 - alpha) rebasin_merge(a, b, alpha)",
    summary: "The AstolfoMix author's BasinSum (README_AK): the driver's result mixed back with \
              the plain weighted sum; with a = X and b = 2X - base, the 215c `fermat` recipe. \
              SD1 and SDXL. Whole models.",
    slots: REBASIN_MERGE.slots,
    params: DRIVER_PARAMS,
};

/// `fermat`'s declaration: a preset the engine expands into its recipe before merging.
pub static FERMAT: MethodInfo = MethodInfo {
    name: "fermat",
    origins: &[Origin::Community],
    formula: "X = dgmla(base, models); amp = 2X - base; basin_sum(base, amp, alpha) = \
              alpha X + (1 - alpha) rebasin_merge(base, amp, alpha) at alpha 0.5",
    summary: "AstolfoMix 215c, re-basin around the Fermat point (spec §15.4): the DGMLA merge X \
              amplified to amp = 2X - base, re-based from the base (215b: the driver's midpoint \
              is X), and BasinSum, which at 0.5 is the mean of X (215a) and 215b. Expanded into \
              its nodes (DGMLA at its defaults, merged once). SD1 and SDXL.",
    slots: crate::method::Slot::BASE_AND_MODELS,
    params: DRIVER_PARAMS,
};

/// `graph` with every `fermat` node replaced by its recipe: `dgmla` (X), `subtract` (X − base),
/// `add` (amp = base + 2(X − base)) and `basin_sum(base, amp)` in its place.
pub(crate) fn expand_presets(graph: &crate::recipe::graph::Graph) -> crate::recipe::graph::Graph {
    use crate::recipe::graph::{Node, Ref};
    use std::collections::BTreeMap;
    if !graph.nodes.iter().any(|n| n.method == FERMAT.name) {
        return graph.clone();
    }
    let mut nodes: Vec<Node> = Vec::new();
    let mut index = vec![0; graph.nodes.len()];
    let remap = |r: Ref, index: &[usize]| match r {
        Ref::Node(n) => Ref::Node(index[n]),
        m => m,
    };
    for (i, node) in graph.nodes.iter().enumerate() {
        let mut node = node.clone();
        for slot in &mut node.slots {
            for r in slot.iter_mut() {
                *r = remap(*r, &index);
            }
        }
        if node.method == FERMAT.name {
            let (base, models) = (node.slots[0].clone(), node.slots[1].clone());
            let at = nodes.len();
            let named = |part: &str| format!("{}.{part}", node.name);
            nodes.push(Node {
                name: named("x"),
                method: "dgmla",
                params: BTreeMap::new(),
                slots: vec![base.clone(), models],
            });
            nodes.push(Node {
                name: named("delta"),
                method: "subtract",
                params: BTreeMap::new(),
                slots: vec![vec![Ref::Node(at)], base.clone()],
            });
            nodes.push(Node {
                name: named("amp"),
                method: "add",
                params: [("alpha".to_string(), ParamValue::Number(2.0))].into(),
                slots: vec![base, vec![Ref::Node(at + 1)]],
            });
            node.method = BASIN_SUM.name;
            node.slots = vec![node.slots[0].clone(), vec![Ref::Node(at + 2)]];
        }
        index[i] = nodes.len();
        nodes.push(node);
    }
    crate::recipe::graph::Graph {
        models: graph.models.clone(),
        nodes,
        output: remap(graph.output, &index),
        fallback: graph.fallback,
        components: graph
            .components
            .iter()
            .map(|(c, r)| (c.clone(), remap(*r, &index)))
            .collect(),
        repair: graph.repair,
    }
}

/// The method of prepared node `node` (`method` with its parameters), from its permutations:
/// one set per permuted input, or one per step of the driver's walk.
pub(crate) fn prepared<T: Real>(
    method: &str,
    params: &std::collections::BTreeMap<String, ParamValue>,
    counts: &[usize],
    perms: Vec<Arc<Permutations>>,
) -> Result<Box<dyn Method<T>>> {
    let info = crate::methods::info(method)?;
    Ok(match info.name {
        "rebasin_merge" | "basin_sum" => {
            let mut p = Params::new(method, params.clone()).bind(info, counts);
            let alpha = p.number("alpha")?;
            let _ = p.count("iterations")?;
            p.finish()?;
            Box::new(walk::Walk::new(
                info,
                perms,
                alpha,
                info.name == "basin_sum",
            ))
        }
        "rebasin" | "randperm" | "merge_many" => Box::new(permute::Permute::new(info, perms)),
        other => {
            return Err(Error::Invalid(format!(
                "`{other}` is not a whole-model method"
            )))
        }
    })
}
