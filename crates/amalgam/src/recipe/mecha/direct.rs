//! sd-mecha methods that are one amalgam node with the same inputs in the same order, each
//! keyword parameter mapped to one of the method's declared parameters (or accepted and not
//! used): read from and written to `.mecha` through this one table.

use crate::error::Result;
use crate::method::{ParamKind, ParamValue};
use std::collections::BTreeMap;

/// How one sd-mecha keyword parameter maps to amalgam.
#[derive(Debug)]
pub(super) enum Map {
    /// The same value under amalgam's name.
    To(&'static str),
    /// An sd-mecha bool choosing between two options of an amalgam choice; `default` is
    /// sd-mecha's, used when the recipe leaves it out.
    Flag {
        to: &'static str,
        yes: &'static str,
        no: &'static str,
        default: bool,
    },
    /// Accepted and not used (see the method's docs for why).
    Unused,
}

/// One sd-mecha method and its amalgam node.
#[derive(Debug)]
pub(super) struct Direct {
    pub(super) mecha: &'static str,
    pub(super) method: &'static str,
    pub(super) params: &'static [(&'static str, Map)],
}

/// The methods mapped one to one.
pub(super) const DIRECT: &[Direct] = &[
    Direct {
        mecha: "truncate_rank",
        method: "truncate_rank",
        params: &[
            ("rank", Map::To("rank")),
            (
                "use_approximate_basis",
                Map::Flag {
                    to: "svd",
                    yes: "randomized",
                    no: "exact",
                    default: true,
                },
            ),
            ("approximate_basis_iters", Map::To("power_iterations")),
            // amalgam seeds the randomized SVD from the run's seed and the key.
            ("approximate_basis_seed", Map::Unused),
        ],
    },
    Direct {
        mecha: "rotate",
        method: "rotate",
        params: &[
            ("alignment", Map::To("alignment")),
            ("alpha", Map::To("alpha")),
            ("centralization", Map::To("centralization")),
            ("stiefel_eps", Map::To("stiefel_eps")),
            ("stiefel_max_iters", Map::To("stiefel_max_iters")),
        ],
    },
    // sd-optim's methods, which its recipes call by these names through sd-mecha.
    Direct {
        mecha: "multi_domain_alignment",
        method: "multi_domain_alignment",
        params: &[
            ("alpha", Map::To("alpha")),
            ("beta", Map::To("beta")),
            ("kernel_size", Map::To("kernel_size")),
            ("centroid_margin_factor", Map::To("centroid_margin_factor")),
            ("frequency_weight", Map::To("frequency_weight")),
            ("use_cross_attention", Map::To("use_cross_attention")),
        ],
    },
    Direct {
        mecha: "clyb_merge",
        method: "clyb_merge",
        params: &[
            ("alpha", Map::To("alpha")),
            ("use_perp", Map::To("use_perp")),
            ("ab_only", Map::To("ab_only")),
        ],
    },
    // sd-mecha's re-basin (SDXL there, SD1 and SDXL here). amalgam's permutation groups do not
    // interact, so one assignment per group is the optimum `iters` sweeps would approach.
    Direct {
        mecha: "rebasin",
        method: "rebasin",
        params: &[("iters", Map::Unused)],
    },
    // The 6DammK9 fork's ISO-Z (`isotropic_overrided(d, z, apply_exp, apply_high_dim)`, the
    // x10a AstolfoKarmix recipes). Its defaults are not published: a recipe leaving a parameter
    // out gets amalgam's `z` (0.8) and the fork's `isotropic` flags (false).
    Direct {
        mecha: "isotropic_overrided",
        method: "iso_z",
        params: &[
            ("z", Map::To("z")),
            (
                "apply_exp",
                Map::Flag {
                    to: "mean",
                    yes: "geometric",
                    no: "arithmetic",
                    default: false,
                },
            ),
            (
                "apply_high_dim",
                Map::Flag {
                    to: "high_dim",
                    yes: "flatten",
                    no: "vector",
                    default: false,
                },
            ),
        ],
    },
    // sd-mecha 1.1.8's element-wise and per-tensor methods (`methods::mecha`), same names.
    Direct {
        mecha: "geometric_sum",
        method: "geometric_sum",
        params: &[("alpha", Map::To("alpha"))],
    },
    Direct {
        mecha: "multiply_quotient",
        method: "multiply_quotient",
        params: &[("alpha", Map::To("alpha"))],
    },
    Direct {
        mecha: "train_difference_mask",
        method: "train_difference_mask",
        params: &[("alpha", Map::To("alpha"))],
    },
    Direct {
        mecha: "add_opposite_mask",
        method: "add_opposite_mask",
        params: &[("alpha", Map::To("alpha"))],
    },
    Direct {
        mecha: "add_strict_opposite_mask",
        method: "add_strict_opposite_mask",
        params: &[("alpha", Map::To("alpha"))],
    },
    // `clamp(a, *bounds)`: the inputs after the first are the bounds.
    Direct {
        mecha: "clamp",
        method: "clamp",
        params: &[("stiffness", Map::To("stiffness"))],
    },
    Direct {
        mecha: "perpendicular_component",
        method: "perpendicular_component",
        params: &[],
    },
    Direct {
        mecha: "add_cosine_a",
        method: "add_cosine_a",
        params: &[("alpha", Map::To("alpha"))],
    },
    Direct {
        mecha: "add_cosine_b",
        method: "add_cosine_b",
        params: &[("alpha", Map::To("alpha"))],
    },
    Direct {
        mecha: "tensor_sum",
        method: "tensor_sum",
        params: &[("width", Map::To("width")), ("offset", Map::To("offset"))],
    },
    Direct {
        mecha: "top_k_tensor_sum",
        method: "top_k_tensor_sum",
        params: &[("width", Map::To("width")), ("offset", Map::To("offset"))],
    },
    Direct {
        mecha: "crossover",
        method: "crossover",
        params: &[("alpha", Map::To("alpha")), ("tilt", Map::To("tilt"))],
    },
    Direct {
        mecha: "truncate_kronecker",
        method: "truncate_kronecker",
        params: &[
            ("kronecker_ratio", Map::To("kronecker_ratio")),
            (
                "use_approximate_basis",
                Map::Flag {
                    to: "svd",
                    yes: "randomized",
                    no: "exact",
                    default: true,
                },
            ),
            ("approximate_basis_iters", Map::To("power_iterations")),
            // amalgam seeds the randomized SVD from the run's seed and the key.
            ("approximate_basis_seed", Map::Unused),
        ],
    },
];

/// The entry of sd-mecha method `mecha`.
pub(super) fn by_mecha(mecha: &str) -> Option<&'static Direct> {
    DIRECT.iter().find(|d| d.mecha == mecha)
}

/// The entry of amalgam method `method`.
pub(super) fn by_method(method: &str) -> Option<&'static Direct> {
    DIRECT.iter().find(|d| d.method == method)
}

impl Direct {
    /// The node's parameters from the recipe's keyword values (`get`: the value of one, if given).
    pub(super) fn read(
        &self,
        get: impl Fn(&str) -> Result<Option<ParamValue>>,
    ) -> Result<BTreeMap<String, ParamValue>> {
        let mut out = BTreeMap::new();
        for (name, map) in self.params {
            let v = get(name)?;
            match map {
                Map::To(to) => {
                    if let Some(v) = v {
                        out.insert(to.to_string(), v);
                    }
                }
                Map::Flag {
                    to,
                    yes,
                    no,
                    default,
                } => {
                    let on = match v {
                        Some(ParamValue::Bool(b)) => b,
                        Some(ParamValue::Number(x)) => x != 0.0,
                        _ => *default,
                    };
                    out.insert(
                        to.to_string(),
                        ParamValue::Text(if on { yes } else { no }.to_string()),
                    );
                }
                Map::Unused => {}
            }
        }
        Ok(out)
    }

    /// The keyword values to write for a node's parameters (declared defaults filled in), as
    /// (sd-mecha name, value); counts are integers.
    pub(super) fn write(
        &self,
        params: &BTreeMap<String, ParamValue>,
    ) -> Vec<(&'static str, super::Value)> {
        use super::Value;
        let info = crate::methods::info(self.method).expect("a registered method");
        let declared = |name: &str| {
            info.params
                .iter()
                .find(|p| p.name == name)
                .expect("declared")
        };
        let mut out = Vec::new();
        for (mecha, map) in self.params {
            match map {
                Map::To(to) => {
                    let p = declared(to);
                    let value = match (params.get(*to), p.kind) {
                        (Some(ParamValue::Number(x)), ParamKind::Count { .. }) => {
                            Value::Int(*x as i64)
                        }
                        (Some(ParamValue::Number(x)), _) => Value::Float(*x),
                        (None, ParamKind::Count { default }) => Value::Int(default as i64),
                        (
                            None,
                            ParamKind::Number {
                                default: Some(d), ..
                            },
                        ) => Value::Float(d),
                        _ => continue,
                    };
                    out.push((*mecha, value));
                }
                Map::Flag { to, yes, .. } => {
                    let chosen = match (params.get(*to), declared(to).kind) {
                        (Some(ParamValue::Text(t)), _) => t.as_str(),
                        (_, ParamKind::Choice { default, .. }) => default,
                        _ => continue,
                    };
                    out.push((*mecha, Value::Bool(chosen == *yes)));
                }
                Map::Unused => {}
            }
        }
        out
    }
}
