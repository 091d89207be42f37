//! The presets: one declaration each, differing from the others only in their defaults.

use super::*;

macro_rules! pipeline_info {
    ($name:literal, $summary:literal, $drop:literal, $p:literal, $k:literal, $election:literal, $fuse:literal, $rescale:literal) => {
        pipeline_info!($name, $summary, $drop, $p, "0.0", "tensor", $k, $election, $fuse, $rescale, "false")
    };
    ($name:literal, $summary:literal, $drop:literal, $p:literal, $della_eps:literal, $rank:literal, $k:literal, $election:literal, $fuse:literal, $rescale:literal, $base_point:literal) => {
        MethodInfo {
            name: $name,
            formula: "base + lambda * rescale(fuse(elect(trim(drop(models[t] - base)))))",
            summary: $summary,
            slots: &[
                Slot { name: "base", kind: SlotKind::One, doc: "the pre-trained model" },
                Slot { name: "models", kind: SlotKind::Many, doc: "the fine-tuned models" },
            ],
            params: &[
                ParamInfo { name: "drop", default: Some($drop), doc: "none | dare (uniform) | della (by magnitude rank)" },
                ParamInfo { name: "p", default: Some($p), doc: "mean drop probability of `dare` and `della`, in [0, 1)" },
                ParamInfo { name: "della_eps", default: Some($della_eps), doc: "della: total width of the keep-probability window, kept with 1 - p - della_eps/2 (smallest |delta|) to 1 - p + della_eps/2 (largest); negative drops large deltas more (sd-mecha's della_eps)" },
                ParamInfo { name: "epsilon", default: None, doc: "della: half width of the window instead (mergekit's epsilon); della_eps = 2 * epsilon" },
                ParamInfo { name: "rank", default: Some($rank), doc: "della: rank |delta| over the whole tensor (sd-mecha) | row (official DELLA, mergekit)" },
                ParamInfo { name: "ranks", default: Some("auto"), doc: "della, rank = tensor: auto (exact for tensors up to 65536 elements whose values for all models take at most 4 MiB, estimated from a histogram above) | exact (sorts each tensor of every model; needs the tensor of all models in a quarter of the memory budget) | histogram (estimated wherever auto would); estimates keep each entry within |della_eps| * (fullest 1/128-octave bin) / elements of its exact probability, reported per key" },
                ParamInfo { name: "k", default: Some($k), doc: "fraction kept by magnitude per model and tensor, (0, 1]; entries equal to the threshold are all kept" },
                ParamInfo { name: "election", default: Some($election), doc: "mass (sign of the sum) | count (sign of the sum of signs) | none" },
                ParamInfo { name: "sign_tie", default: Some("zero"), doc: "zero (keep the base) | positive" },
                ParamInfo { name: "fuse", default: Some($fuse), doc: "disjoint_mean | mean | sum | geometric_median" },
                ParamInfo { name: "rescale", default: Some($rescale), doc: "none | inverse_keep (the result divided by 1 - p) | per_element (kept entries divided by their keep probability before the vote) | l1 (each model's kept entries scaled back to its delta's L1 norm)" },
                ParamInfo { name: "lambda", default: Some("1.0"), doc: "scale of the merged delta" },
                ParamInfo { name: "base_point", default: Some($base_point), doc: "geometric median: add the base as a zero-delta point" },
                ParamInfo { name: "stock", default: Some("none"), doc: "none | adjacent_rows: multiply the fused result by the model-stock factor t = N cos / (1 + (N - 1) cos) of the filtered deltas, cos the mean over adjacent models along the last dimension (sd-mecha's ties_sum_extended with its inverted apply_stock = false)" },
                ParamInfo { name: "cos_eps", default: Some("1e-6"), doc: "stock: guard of the norms in the cosines" },
                ParamInfo { name: "eps", default: Some("1e-6"), doc: "geometric median: smallest distance" },
                ParamInfo { name: "maxiter", default: Some("100"), doc: "geometric median: most iterations" },
                ParamInfo { name: "ftol", default: Some("1e-20"), doc: "geometric median: relative objective change to stop at" },
            ],
        }
    };
}

pub static TIES: MethodInfo = pipeline_info!(
    "ties",
    "TIES-Merging (Yadav et al. 2023): trim to the top k, mass election, disjoint mean.",
    "none",
    "0.0",
    "0.2",
    "mass",
    "disjoint_mean",
    "none"
);
pub static TIES_SOUP: MethodInfo =
    pipeline_info!(
    "ties_soup",
    "TIES-SOUP (AstolfoMix): no trim, count election, disjoint mean: a soup of the majority side.",
    "none", "0.0", "1.0", "count", "disjoint_mean", "none"
);
pub static DARE: MethodInfo = pipeline_info!(
    "dare",
    "DARE (Yu et al. 2023) with task arithmetic: drop each delta entry with probability p, sum, rescale by 1/(1-p).",
    "dare", "0.1", "1.0", "none", "sum", "inverse_keep"
);
pub static DELLA: MethodInfo = pipeline_info!(
    "della",
    "DELLA (Deep et al. 2024, official code): drop by per-row magnitude rank (p = 0.3, window 0.28 = mergekit epsilon 0.14), rescale each kept entry by 1/q, mass election, disjoint mean.",
    "della", "0.3", "0.28", "row", "1.0", "mass", "disjoint_mean", "per_element", "false"
);
pub static TSD: MethodInfo =
    pipeline_info!(
    "tsd",
    "TSD, TIES-SOUP with DROP (AstolfoMix x101a): DARE p = 0.1 without rescale, then TIES-SOUP.",
    "dare", "0.1", "1.0", "count", "disjoint_mean", "none"
);
pub static TGMD: MethodInfo = pipeline_info!(
    "tgmd",
    "TGMD, TIES with geometric median and DROP (AstolfoMix x116a): DARE p = 0.1 without rescale, count election, geometric median of the filtered deltas.",
    "dare", "0.1", "1.0", "count", "geometric_median", "none"
);

pub static DGMLA: MethodInfo = pipeline_info!(
    "dgmla",
    "DGMLA (AstolfoMix x215a): DELLA drop by whole-tensor rank, p = 0.1, della_eps = -0.1, no rescale, count election, geometric median with the base as a zero-delta point.",
    "della", "0.1", "-0.1", "tensor", "1.0", "count", "geometric_median", "none", "true"
);
