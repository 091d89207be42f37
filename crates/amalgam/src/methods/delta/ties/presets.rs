//! The presets: one declaration of the pipeline's parameters (with `ties`'s defaults), and per
//! preset a table of the defaults it overrides.

use super::*;
use crate::method::PresetDefault::{Bool, Choice, Number};

const FORMULA: &str = "base + lambda * rescale(fuse(elect(trim(drop(models[t] - base)))))";

const SLOTS: &[Slot] = Slot::BASE_AND_MODELS;

/// The number of the pipeline's parameters.
pub const PIPELINE_PARAMS: usize = 28;

/// The pipeline's parameters, with the defaults of `ties`.
#[rustfmt::skip]
const PARAMS: [ParamInfo; PIPELINE_PARAMS] = [
    ParamInfo::per_model("weights", 1.0, "one weight per fine-tune (mergekit's weight), or one number for all: each delta is multiplied by it after drop, trim and rescale, the election sees the weighted deltas, and disjoint_mean / mean divide by the sum of the (kept) weights"),
    ParamInfo::choice("drop", &["none", "dare", "della"], "none", "none | dare (uniform) | della (by magnitude rank)"),
    ParamInfo::number_in("p", 0.0, Domain::Probability, "mean drop probability of `dare` and `della`"),
    ParamInfo::number("della_eps", 0.0, "della: total width of the keep-probability window, kept with 1 - p - della_eps/2 (smallest |delta|) to 1 - p + della_eps/2 (largest); negative drops large deltas more (sd-mecha's della_eps)"),
    ParamInfo::optional("epsilon", Domain::Any, "della: half width of the window instead (mergekit's epsilon); della_eps = 2 * epsilon"),
    ParamInfo::choice("rank", &["tensor", "row"], "tensor", "della: rank |delta| over the whole tensor (sd-mecha) | row (official DELLA, mergekit)"),
    ParamInfo::choice("ranks", &["auto", "exact", "histogram"], "auto", "della, rank = tensor: auto (exact for tensors up to 65536 elements whose values for all models take at most 4 MiB, estimated from a histogram above) | exact (sorts each tensor of every model; needs the tensor of all models in a quarter of the memory budget) | histogram (estimated wherever auto would); estimates keep each entry within |della_eps| * (fullest 1/128-octave bin) / elements of its exact probability, reported per key"),
    ParamInfo::optional("density", Domain::UnitInterval, "mergekit's density, the fraction kept: with a drop, p = 1 - density; without, k = density; give it or p / k"),
    ParamInfo::choice("della_bounds", &["clamp", "strict"], "clamp", "della: clamp (keep probabilities clamped to [0, 1]) | strict (mergekit: p = 0 turns the drop off, and 1 - p - della_eps/2 > 0 and 1 - p + della_eps/2 < 1 are required)"),
    ParamInfo::number_in("k", 0.2, Domain::Fraction, "fraction kept by magnitude per model and tensor (1: no trim)"),
    ParamInfo::choice("trim", &["threshold", "top_k", "outliers"], "threshold", "threshold (keep every |delta| at or above the max(1, floor((1 - k) n))-th smallest: TIES code, sd-mecha) | top_k (the max(1, floor(k n)) largest, none if k = 0: mergekit's magnitude) | outliers (Model Breadcrumbs as mergekit: drop the floor(gamma n) largest, then the smallest, keeping floor(k n)); entries equal to a threshold are all kept"),
    ParamInfo::number_in("gamma", 0.01, Domain::UnitInterval, "outliers: fraction of the largest |delta| dropped (mergekit's gamma)"),
    ParamInfo::choice("election", &["mass", "count", "none"], "mass", "mass (sign of the sum) | count (sign of the sum of signs) | none"),
    ParamInfo::choice("sign_tie", &["zero", "positive"], "zero", "zero (keep the base) | positive"),
    ParamInfo::number_in("min_agreement", 0.0, Domain::UnitInterval, "no sign is elected (the element keeps the base) where fewer than this fraction of the models count (sd-optim's ties_sum_extended)"),
    ParamInfo::choice("agreement", &["participating", "elected"], "participating", "min_agreement: participating (models with a nonzero entry after drop and trim, sd-optim's code) | elected (models of the elected sign, as sd-optim's wiki words it)"),
    ParamInfo::choice("fuse", &["disjoint_mean", "mean", "sum", "geometric_median"], "disjoint_mean", "disjoint_mean | mean | sum | geometric_median"),
    ParamInfo::flag("normalize", true, "mergekit's normalize, read only when given (the default shows the preset's fuse): true sets fuse = disjoint_mean (with an election) or mean (without), false sets fuse = sum; give it or fuse"),
    ParamInfo::flag("int8_mask", false, "mergekit's int8_mask: accepted and changes nothing (mergekit stores its sign mask as int8 instead of the tensor's dtype; the signs -1, 0, 1 and the mask are exact either way)"),
    ParamInfo::choice("rescale", &["none", "inverse_keep", "per_element", "l1"], "none", "none | inverse_keep (the result divided by 1 - p) | per_element (kept entries divided by their keep probability before the vote) | l1 (each model's kept entries scaled back to its delta's L1 norm)"),
    ParamInfo::number("lambda", 1.0, "scale of the merged delta"),
    ParamInfo::number_in("weight_decay", 0.0, Domain::Probability, "every filtered delta multiplied by 1 - weight_decay (sd-optim's ties_sum_extended: a uniform shrink)"),
    ParamInfo::flag("base_point", false, "geometric median: add the base as a zero-delta point"),
    ParamInfo::choice("stock", &["none", "adjacent_rows", "positive_pairs"], "none", "none | adjacent_rows: multiply the fused result by the model-stock factor t = N cos / (1 + (N - 1) cos) of the filtered deltas, cos the mean over adjacent models along the last dimension (sd-mecha's ties_sum_extended with its inverted apply_stock = false) | positive_pairs: by the fraction of the N² pairs of filtered deltas (whole tensors, each with itself) whose cosine is positive (sd-optim's ties_sum_extended with apply_stock > 0)"),
    ParamInfo::number_in("cos_eps", 1e-6, Domain::NonNegative, "stock: guard of the norms in the cosines"),
    Weiszfeld::PARAMS[0],
    Weiszfeld::PARAMS[1],
    Weiszfeld::PARAMS[2],
];

/// `PARAMS` with the defaults of `overrides` (a name not declared is a compile-time error).
const fn preset(overrides: &[(&str, PresetDefault)]) -> [ParamInfo; PIPELINE_PARAMS] {
    let mut params = PARAMS;
    let mut i = 0;
    while i < overrides.len() {
        let mut j = 0;
        loop {
            assert!(
                j < params.len(),
                "a preset overrides an undeclared parameter"
            );
            if same(params[j].name, overrides[i].0) {
                params[j] = params[j].with_default(overrides[i].1);
                break;
            }
            j += 1;
        }
        i += 1;
    }
    params
}

const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

macro_rules! presets {
    ($($static:ident = $name:literal, [$($source:ident),*], $summary:literal, [$($param:literal => $value:expr),* $(,)?];)*) => {
        $(
            #[doc = concat!("The `", $name, "` preset: ", $summary)]
            pub static $static: MethodInfo = MethodInfo {
                name: $name,
                origins: &[$(Origin::$source),*],
                formula: FORMULA,
                summary: $summary,
                slots: SLOTS,
                params: &const { preset(&[$(($param, $value)),*]) },
            };
        )*
    };
}

presets! {
    TIES = "ties", [Paper, Mergekit, SdMecha], "TIES-Merging (Yadav et al. 2023): trim to the top k, mass election, disjoint mean.", [];
    TIES_SOUP = "ties_soup", [Community], "TIES-SOUP (AstolfoMix): no trim, count election, disjoint mean: a soup of the majority side.", ["k" => Number(1.0), "election" => Choice("count")];
    DARE = "dare", [Paper, Mergekit, SdMecha], "DARE (Yu et al. 2023) with task arithmetic: drop each delta entry with probability p, sum, rescale by 1/(1-p).", [
        "drop" => Choice("dare"), "p" => Number(0.1), "k" => Number(1.0), "election" => Choice("none"),
        "fuse" => Choice("sum"), "normalize" => Bool(false), "rescale" => Choice("inverse_keep"),
    ];
    DELLA = "della", [Paper, Mergekit, SdMecha], "DELLA (Deep et al. 2024, official code): drop by per-row magnitude rank (p = 0.3, window 0.28 = mergekit epsilon 0.14), rescale each kept entry by 1/q, mass election, disjoint mean.", [
        "drop" => Choice("della"), "p" => Number(0.3), "della_eps" => Number(0.28), "rank" => Choice("row"),
        "k" => Number(1.0), "rescale" => Choice("per_element"),
    ];
    TSD = "tsd", [Community], "TSD, TIES-SOUP with DROP (AstolfoMix x101a): DARE p = 0.1 without rescale, then TIES-SOUP.", [
        "drop" => Choice("dare"), "p" => Number(0.1), "k" => Number(1.0), "election" => Choice("count"),
    ];
    TGMD = "tgmd", [Community], "TGMD, TIES with geometric median and DROP (AstolfoMix x116a): DARE p = 0.1 without rescale, count election, geometric median of the filtered deltas.", [
        "drop" => Choice("dare"), "p" => Number(0.1), "k" => Number(1.0), "election" => Choice("count"),
        "fuse" => Choice("geometric_median"), "normalize" => Bool(false),
    ];
    TIES_SUM_EXTENDED = "ties_sum_extended", [SdOptim], "sd-optim's ties_sum_extended (wiki defaults, code 0bbd82a as shipped): trim to the top 0.218, mass election needing 30 % of the models to take part, deltas shrunk by 1 - 0.0218, mean over all models (its geometric median returns its starting mean).", [
        "k" => Number(0.218), "min_agreement" => Number(0.3), "weight_decay" => Number(0.0218), "fuse" => Choice("mean"),
    ];
    DGMLA = "dgmla", [Community], "DGMLA (AstolfoMix x215a): DELLA drop by whole-tensor rank, p = 0.1, della_eps = -0.1, no rescale, count election, geometric median with the base as a zero-delta point.", [
        "drop" => Choice("della"), "p" => Number(0.1), "della_eps" => Number(-0.1), "k" => Number(1.0),
        "election" => Choice("count"), "fuse" => Choice("geometric_median"), "normalize" => Bool(false), "base_point" => Bool(true),
    ];
    DARE_TIES = "dare_ties", [Mergekit], "mergekit's dare_ties: DARE drop (keep fraction density, default 1: none), each model's kept entries rescaled to its delta's L1 norm, weighted, mass election with ties to +, sum of the agreeing entries.", [
        "drop" => Choice("dare"), "p" => Number(0.0), "k" => Number(1.0), "trim" => Choice("top_k"), "sign_tie" => Choice("positive"),
        "fuse" => Choice("sum"), "normalize" => Bool(false), "rescale" => Choice("l1"),
    ];
    DARE_LINEAR = "dare_linear", [Mergekit], "mergekit's dare_linear: DARE drop (keep fraction density, default 1: none), each model's kept entries rescaled to its delta's L1 norm, weighted sum, no election.", [
        "drop" => Choice("dare"), "p" => Number(0.0), "k" => Number(1.0), "trim" => Choice("top_k"), "election" => Choice("none"),
        "sign_tie" => Choice("positive"), "fuse" => Choice("sum"), "normalize" => Bool(false), "rescale" => Choice("l1"),
    ];
    DELLA_LINEAR = "della_linear", [Mergekit], "mergekit's della_linear: DELLA drop by per-row magnitude rank (keep density - epsilon to density + epsilon, epsilon 0.15; density 1, the default, drops nothing), L1 rescale per model, weighted sum, no election.", [
        "drop" => Choice("della"), "p" => Number(0.0), "della_eps" => Number(0.3), "rank" => Choice("row"), "della_bounds" => Choice("strict"),
        "k" => Number(1.0), "trim" => Choice("top_k"), "election" => Choice("none"), "sign_tie" => Choice("positive"),
        "fuse" => Choice("sum"), "normalize" => Bool(false), "rescale" => Choice("l1"),
    ];
    BREADCRUMBS = "breadcrumbs", [Mergekit], "Model Breadcrumbs as mergekit (Davari & Belilovsky 2023): per model, drop the gamma fraction of largest |delta| and the smallest, keeping density (default 1: nothing dropped); weighted sum.", [
        "trim" => Choice("outliers"), "k" => Number(1.0), "election" => Choice("none"), "sign_tie" => Choice("positive"),
        "fuse" => Choice("sum"), "normalize" => Bool(false),
    ];
    BREADCRUMBS_TIES = "breadcrumbs_ties", [Mergekit], "mergekit's breadcrumbs_ties: the breadcrumbs trim, then the TIES mass election (ties to +) and the weighted sum of the agreeing entries.", [
        "trim" => Choice("outliers"), "k" => Number(1.0), "sign_tie" => Choice("positive"),
        "fuse" => Choice("sum"), "normalize" => Bool(false),
    ];
}

/// The pipeline part of the DGMIA / DGMIZ pipelines (spec §13, `methods::svd::dgmiz`): DGMLA with
/// the paper's mass election, which the 2025 AstolfoKarmix recipes' `vote_sgn = true` selects
/// under sd-mecha 1.x's inverted flag (spec §3).
pub(crate) const DGMI_PIPELINE: [ParamInfo; PIPELINE_PARAMS] = preset(&[
    ("drop", Choice("della")),
    ("p", Number(0.1)),
    ("della_eps", Number(-0.1)),
    ("k", Number(1.0)),
    ("election", Choice("mass")),
    ("fuse", Choice("geometric_median")),
    ("normalize", Bool(false)),
    ("base_point", Bool(true)),
]);
