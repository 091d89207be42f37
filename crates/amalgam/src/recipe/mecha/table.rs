//! The sd-mecha methods amalgam reads and writes, each declared once (see [`super::dialect`] for
//! what a declaration holds): the supported list, the parameter and merge-space checks, the
//! translations and the one-node export all read [`METHODS`].

use super::check::{Space, Spaces};
use super::dialect::{Map, Mecha, Param, Scalar, Special, Translation};
use super::{delta, special};
use crate::methods::gram::geometric_median::Weiszfeld;

/// A method with its own translation.
const fn special(
    name: &'static str,
    params: &'static [Param],
    spaces: Spaces,
    translate: Special,
) -> Mecha {
    Mecha {
        name,
        params,
        spaces,
        translation: Translation::Special(translate),
    }
}

/// A method that is one node of amalgam method `method`.
const fn direct(
    name: &'static str,
    params: &'static [Param],
    spaces: Spaces,
    method: &'static str,
) -> Mecha {
    Mecha {
        name,
        params,
        spaces,
        translation: Translation::Direct(method),
    }
}

/// A parameter read by a special translation.
const fn kw(name: &'static str) -> Param {
    Param {
        name,
        default: None,
        map: Map::Read,
    }
}

/// A number read by a special translation, with sd-mecha's default.
const fn num(name: &'static str, default: f64) -> Param {
    Param {
        default: Some(Scalar::Number(default)),
        ..kw(name)
    }
}

/// A bool read by a special translation, with sd-mecha's default.
const fn flag(name: &'static str, default: bool) -> Param {
    Param {
        default: Some(Scalar::Bool(default)),
        ..kw(name)
    }
}

/// A parameter accepted and not used.
const fn unused(name: &'static str) -> Param {
    Param {
        map: Map::Unused,
        ..kw(name)
    }
}

/// A parameter of a direct method, amalgam's `to`.
const fn to(name: &'static str, to: &'static str) -> Param {
    Param {
        map: Map::To(to),
        ..kw(name)
    }
}

/// A parameter of a direct method with the same name in amalgam.
const fn same(name: &'static str) -> Param {
    to(name, name)
}

/// A bool of a direct method choosing `yes` or `no` of amalgam's choice `to`.
const fn choice(
    name: &'static str,
    default: bool,
    to: &'static str,
    [yes, no]: [&'static str; 2],
) -> Param {
    Param {
        name,
        default: Some(Scalar::Bool(default)),
        map: Map::Flag { to, yes, no },
    }
}

/// Deltas in, a delta out.
const DELTAS: Spaces = Spaces::Fixed {
    input: Space::Delta,
    output: Space::Delta,
};

/// Weights in, weights out.
const WEIGHTS: Spaces = Spaces::Fixed {
    input: Space::Weight,
    output: Space::Weight,
};

/// Weiszfeld's smallest distance, with sd-mecha's default (amalgam's, declared once there).
const EPS: Param = num("eps", Weiszfeld::DEFAULT.eps);
/// Weiszfeld's most iterations.
const MAXITER: Param = num("maxiter", Weiszfeld::DEFAULT.maxiter as f64);
/// Weiszfeld's relative objective change to stop at.
const FTOL: Param = num("ftol", Weiszfeld::DEFAULT.ftol);

/// `truncate_rank`'s and `truncate_kronecker`'s choice of SVD: true is the randomized one.
const APPROXIMATE_BASIS: Param = choice(
    "use_approximate_basis",
    true,
    "svd",
    ["randomized", "exact"],
);
/// The randomized SVD's power iterations.
const APPROXIMATE_BASIS_ITERS: Param = to("approximate_basis_iters", "power_iterations");
/// The randomized SVD's seed: amalgam seeds it from the run's seed and the key.
const APPROXIMATE_BASIS_SEED: Param = unused("approximate_basis_seed");

/// The sd-mecha (1.1.8) methods amalgam runs, as sd-mecha declares them.
pub(super) const METHODS: &[Mecha] = &[
    special("n_average", &[], Spaces::Same, special::n_average),
    special(
        "weighted_sum",
        &[kw("alpha")],
        Spaces::Same,
        special::two_models,
    ),
    special("slerp", &[kw("alpha")], Spaces::Same, special::two_models),
    special(
        "subtract",
        &[],
        Spaces::Fixed {
            input: Space::Weight,
            output: Space::Delta,
        },
        special::subtract,
    ),
    special(
        "add_difference",
        &[kw("alpha")],
        Spaces::FirstThenDeltas,
        special::two_models,
    ),
    special(
        "ties_sum",
        &[num("k", 1.0), flag("vote_sgn", false)],
        DELTAS,
        delta::ties,
    ),
    special(
        "ties_sum_extended",
        &[
            num("k", 0.2),
            flag("vote_sgn", false),
            flag("apply_stock", false),
            flag("apply_median", false),
            num("cos_eps", 1e-6),
            EPS,
            MAXITER,
            FTOL,
            // sd-optim's version.
            kw("weight_decay"),
            kw("min_agreement"),
        ],
        DELTAS,
        delta::ties,
    ),
    special(
        "ties_sum_with_dropout",
        &[
            num("probability", 0.9),
            num("della_eps", 0.0),
            num("rescale", 1.0),
            num("k", 0.2),
            flag("vote_sgn", false),
            flag("apply_stock", false),
            num("cos_eps", 1e-6),
            flag("apply_median", false),
            EPS,
            MAXITER,
            FTOL,
            kw("seed"),
        ],
        DELTAS,
        delta::ties,
    ),
    special(
        "model_stock",
        &[num("cos_eps", 1e-6)],
        DELTAS,
        delta::model_stock,
    ),
    special(
        "geometric_median",
        &[EPS, MAXITER, FTOL],
        Spaces::Same,
        special::geometric_median,
    ),
    special(
        "dropout",
        &[
            num("probability", 0.9),
            num("rescale", 1.0),
            num("overlap", 1.0),
            // Only overlap 1 is read, where the emphasis has no effect.
            unused("overlap_emphasis"),
            kw("seed"),
        ],
        DELTAS,
        delta::dropout,
    ),
    special("fallback", &[], Spaces::Same, special::fallback),
    special(
        "pick_component",
        &[kw("component")],
        Spaces::Same,
        special::component,
    ),
    special(
        "omit_component",
        &[kw("component")],
        Spaces::Same,
        special::component,
    ),
    // The output dtype is the run's (`--dtype`); computing is in f32/f64.
    special(
        "cast",
        &[unused("device"), unused("dtype")],
        Spaces::Same,
        special::cast,
    ),
    special(
        "convert_singleton",
        &[],
        Spaces::ToParam,
        special::convert_singleton,
    ),
    special(
        "convert_sdxl_blocks_to_sgm",
        &[],
        Spaces::ToParam,
        special::convert_blocks,
    ),
    special(
        "convert_sd1_blocks_to_ldm",
        &[],
        Spaces::ToParam,
        special::convert_blocks,
    ),
    direct(
        "truncate_rank",
        &[
            same("rank"),
            APPROXIMATE_BASIS,
            APPROXIMATE_BASIS_ITERS,
            APPROXIMATE_BASIS_SEED,
        ],
        DELTAS,
        "truncate_rank",
    ),
    direct(
        "rotate",
        &[
            same("alignment"),
            same("alpha"),
            same("centralization"),
            same("stiefel_eps"),
            same("stiefel_max_iters"),
        ],
        Spaces::Same,
        "rotate",
    ),
    // The 6DammK9 fork (`isotropic` branch): ISO-C of deltas (tested there against the paper's
    // σ̄·U Vᵀ of their sum).
    special(
        "isotropic",
        &[flag("apply_exp", false), flag("apply_high_dim", false)],
        DELTAS,
        delta::isotropic,
    ),
    // The fork's ISO-Z (`isotropic_overrided(d, z, apply_exp, apply_high_dim)`, the x10a
    // AstolfoKarmix recipes). Its defaults are not published: a recipe leaving a parameter out
    // gets amalgam's `z` (0.8) and the fork's `isotropic` flags (false).
    direct(
        "isotropic_overrided",
        &[
            same("z"),
            choice("apply_exp", false, "mean", ["geometric", "arithmetic"]),
            choice("apply_high_dim", false, "high_dim", ["flatten", "vector"]),
        ],
        DELTAS,
        "iso_z",
    ),
    // sd-mecha's re-basin (SDXL there, SD1 and SDXL here). amalgam's permutation groups do not
    // interact, so one assignment per group is the optimum `iters` sweeps would approach.
    direct("rebasin", &[unused("iters")], Spaces::Same, "rebasin"),
    special("randperm", &[kw("seed")], Spaces::Same, special::randperm),
    // sd-mecha's structural methods (sd1-ldm and sdxl-sgm there and here); amalgam's options
    // take their sd-mecha defaults.
    direct("exchange_ema", &[], Spaces::Same, "exchange_ema"),
    direct("balance_attention", &[], Spaces::Same, "balance_attention"),
    // sd-mecha 1.1.8's element-wise and per-tensor methods (`methods::mecha`), same names.
    direct(
        "geometric_sum",
        &[same("alpha")],
        Spaces::Same,
        "geometric_sum",
    ),
    direct(
        "multiply_quotient",
        &[same("alpha")],
        Spaces::Same,
        "multiply_quotient",
    ),
    direct(
        "train_difference_mask",
        &[same("alpha")],
        Spaces::SameToParam,
        "train_difference_mask",
    ),
    direct(
        "add_opposite_mask",
        &[same("alpha")],
        Spaces::SameToParam,
        "add_opposite_mask",
    ),
    direct(
        "add_strict_opposite_mask",
        &[same("alpha")],
        Spaces::SameToParam,
        "add_strict_opposite_mask",
    ),
    // `clamp(a, *bounds)`: the inputs after the first are the bounds.
    direct("clamp", &[same("stiffness")], Spaces::Same, "clamp"),
    direct(
        "perpendicular_component",
        &[],
        Spaces::Same,
        "perpendicular_component",
    ),
    direct("add_cosine_a", &[same("alpha")], WEIGHTS, "add_cosine_a"),
    direct("add_cosine_b", &[same("alpha")], WEIGHTS, "add_cosine_b"),
    // sd-optim's methods, which its recipes call by these names through sd-mecha (declared
    // there with `SameMergeSpace` inputs).
    direct(
        "multi_domain_alignment",
        &[
            same("alpha"),
            same("beta"),
            same("kernel_size"),
            same("centroid_margin_factor"),
            same("frequency_weight"),
            same("use_cross_attention"),
        ],
        Spaces::Same,
        "multi_domain_alignment",
    ),
    direct(
        "clyb_merge",
        &[same("alpha"), same("use_perp"), same("ab_only")],
        Spaces::Same,
        "clyb_merge",
    ),
    direct(
        "tensor_sum",
        &[same("width"), same("offset")],
        Spaces::Same,
        "tensor_sum",
    ),
    direct(
        "top_k_tensor_sum",
        &[same("width"), same("offset")],
        Spaces::Same,
        "top_k_tensor_sum",
    ),
    direct(
        "crossover",
        &[same("alpha"), same("tilt")],
        Spaces::Same,
        "crossover",
    ),
    direct(
        "truncate_kronecker",
        &[
            same("kronecker_ratio"),
            APPROXIMATE_BASIS,
            APPROXIMATE_BASIS_ITERS,
            APPROXIMATE_BASIS_SEED,
        ],
        DELTAS,
        "truncate_kronecker",
    ),
];
