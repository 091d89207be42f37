//! What sd-mecha (1.1.8) declares of each method amalgam translates: its keyword parameters and
//! the merge spaces of its inputs and result. A recipe sd-mecha would refuse, or that amalgam
//! would read differently (an unknown parameter silently ignored, a weight model given to a
//! delta method, a model whose `model_config` is not its file's), is refused, naming the line.

use super::{err, Command, Kind, Recipe, Value};
use crate::error::Result;

/// The space a model or a merge result is in (sd-mecha's `merge_space`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    /// Model weights.
    Weight,
    /// A difference of weights (a task vector).
    Delta,
    /// A parameter value (a literal, a block conversion).
    Param,
}

impl Space {
    fn name(self) -> &'static str {
        match self {
            Space::Weight => "weight",
            Space::Delta => "delta",
            Space::Param => "param",
        }
    }
    fn parse(s: &str) -> Option<Space> {
        [Space::Weight, Space::Delta, Space::Param]
            .into_iter()
            .find(|x| x.name() == s)
    }
}

/// How a method's tensor inputs and result relate to merge spaces.
#[derive(Clone, Copy, Debug)]
pub enum Spaces {
    /// Every input in one space, which is the result's (sd-mecha's symbol `X`).
    Same,
    /// Every input in `input`; the result in `output`.
    Fixed {
        /// The inputs' space.
        input: Space,
        /// The result's space.
        output: Space,
    },
    /// The first input in any space `X`, the others deltas; the result in `X` (`add_difference`).
    FirstThenDeltas,
    /// A parameter made from a literal (`convert_singleton`, block conversions).
    ToParam,
    /// Every input in one space; the result a parameter (the masks).
    SameToParam,
}

/// One method as sd-mecha declares it.
#[derive(Debug)]
pub struct Declared {
    /// The sd-mecha method name.
    pub method: &'static str,
    /// Its keyword parameters (inputs are positional).
    pub params: &'static [&'static str],
    /// Its merge spaces.
    pub spaces: Spaces,
}

const DELTAS: Spaces = Spaces::Fixed {
    input: Space::Delta,
    output: Space::Delta,
};

const WEIGHTS: Spaces = Spaces::Fixed {
    input: Space::Weight,
    output: Space::Weight,
};

/// The methods of [`super::SUPPORTED`], as sd-mecha 1.1.8 declares them.
pub const DECLARED: &[Declared] = &[
    Declared {
        method: "n_average",
        params: &[],
        spaces: Spaces::Same,
    },
    Declared {
        method: "weighted_sum",
        params: &["alpha"],
        spaces: Spaces::Same,
    },
    Declared {
        method: "slerp",
        params: &["alpha"],
        spaces: Spaces::Same,
    },
    Declared {
        method: "subtract",
        params: &[],
        spaces: Spaces::Fixed {
            input: Space::Weight,
            output: Space::Delta,
        },
    },
    Declared {
        method: "add_difference",
        params: &["alpha"],
        spaces: Spaces::FirstThenDeltas,
    },
    Declared {
        method: "ties_sum",
        params: &["k", "vote_sgn"],
        spaces: DELTAS,
    },
    Declared {
        method: "ties_sum_extended",
        params: &[
            "k",
            "vote_sgn",
            "apply_stock",
            "apply_median",
            "cos_eps",
            "eps",
            "maxiter",
            "ftol",
            // sd-optim's version.
            "weight_decay",
            "min_agreement",
        ],
        spaces: DELTAS,
    },
    Declared {
        method: "ties_sum_with_dropout",
        params: &[
            "probability",
            "della_eps",
            "rescale",
            "k",
            "vote_sgn",
            "apply_stock",
            "cos_eps",
            "apply_median",
            "eps",
            "maxiter",
            "ftol",
            "seed",
        ],
        spaces: DELTAS,
    },
    Declared {
        method: "model_stock",
        params: &["cos_eps"],
        spaces: DELTAS,
    },
    Declared {
        method: "geometric_median",
        params: &["eps", "maxiter", "ftol"],
        spaces: Spaces::Same,
    },
    Declared {
        method: "dropout",
        params: &[
            "probability",
            "rescale",
            "overlap",
            "overlap_emphasis",
            "seed",
        ],
        spaces: DELTAS,
    },
    Declared {
        method: "truncate_rank",
        params: &[
            "rank",
            "use_approximate_basis",
            "approximate_basis_iters",
            "approximate_basis_seed",
        ],
        spaces: DELTAS,
    },
    Declared {
        method: "rotate",
        params: &[
            "alignment",
            "alpha",
            "centralization",
            "stiefel_eps",
            "stiefel_max_iters",
        ],
        spaces: Spaces::Same,
    },
    Declared {
        method: "rebasin",
        params: &["iters"],
        spaces: Spaces::Same,
    },
    Declared {
        method: "randperm",
        params: &["seed"],
        spaces: Spaces::Same,
    },
    // The 6DammK9 fork (`isotropic` branch): parameters in signature order (they may be given
    // by position after the inputs).
    Declared {
        method: "isotropic",
        params: &["apply_exp", "apply_high_dim"],
        spaces: DELTAS,
    },
    Declared {
        method: "isotropic_overrided",
        params: &["z", "apply_exp", "apply_high_dim"],
        spaces: DELTAS,
    },
    Declared {
        method: "fallback",
        params: &[],
        spaces: Spaces::Same,
    },
    Declared {
        method: "pick_component",
        params: &["component"],
        spaces: Spaces::Same,
    },
    Declared {
        method: "omit_component",
        params: &["component"],
        spaces: Spaces::Same,
    },
    Declared {
        method: "cast",
        params: &["device", "dtype"],
        spaces: Spaces::Same,
    },
    Declared {
        method: "geometric_sum",
        params: &["alpha"],
        spaces: Spaces::Same,
    },
    Declared {
        method: "multiply_quotient",
        params: &["alpha"],
        spaces: Spaces::Same,
    },
    Declared {
        method: "train_difference_mask",
        params: &["alpha"],
        spaces: Spaces::SameToParam,
    },
    Declared {
        method: "add_opposite_mask",
        params: &["alpha"],
        spaces: Spaces::SameToParam,
    },
    Declared {
        method: "add_strict_opposite_mask",
        params: &["alpha"],
        spaces: Spaces::SameToParam,
    },
    Declared {
        method: "clamp",
        params: &["stiffness"],
        spaces: Spaces::Same,
    },
    Declared {
        method: "perpendicular_component",
        params: &[],
        spaces: Spaces::Same,
    },
    Declared {
        method: "add_cosine_a",
        params: &["alpha"],
        spaces: WEIGHTS,
    },
    Declared {
        method: "add_cosine_b",
        params: &["alpha"],
        spaces: WEIGHTS,
    },
    // sd-optim's, declared through sd-mecha with `SameMergeSpace` inputs.
    Declared {
        method: "multi_domain_alignment",
        params: &[
            "alpha",
            "beta",
            "kernel_size",
            "centroid_margin_factor",
            "frequency_weight",
            "use_cross_attention",
        ],
        spaces: Spaces::Same,
    },
    Declared {
        method: "clyb_merge",
        params: &["alpha", "use_perp", "ab_only"],
        spaces: Spaces::Same,
    },
    Declared {
        method: "tensor_sum",
        params: &["width", "offset"],
        spaces: Spaces::Same,
    },
    Declared {
        method: "top_k_tensor_sum",
        params: &["width", "offset"],
        spaces: Spaces::Same,
    },
    Declared {
        method: "crossover",
        params: &["alpha", "tilt"],
        spaces: Spaces::Same,
    },
    Declared {
        method: "truncate_kronecker",
        params: &[
            "kronecker_ratio",
            "use_approximate_basis",
            "approximate_basis_iters",
            "approximate_basis_seed",
        ],
        spaces: DELTAS,
    },
    Declared {
        method: "convert_singleton",
        params: &[],
        spaces: Spaces::ToParam,
    },
    Declared {
        method: "convert_sdxl_blocks_to_sgm",
        params: &[],
        spaces: Spaces::ToParam,
    },
    Declared {
        method: "convert_sd1_blocks_to_ldm",
        params: &[],
        spaces: Spaces::ToParam,
    },
];

/// The declaration of `method`.
pub fn declared(method: &str) -> Option<&'static Declared> {
    DECLARED.iter().find(|d| d.method == method)
}

/// A model line's declared `model_config` (when not null), for checking against its file.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// The model's index among the recipe's model lines.
    pub model: usize,
    /// The recipe line.
    pub line: usize,
    /// The model config the line declares.
    pub config: String,
}

/// Checks every merge's keyword parameters and merge spaces (of methods amalgam supports; the
/// others are refused by the translation), and returns the model lines' declared configs.
pub fn check(recipe: &Recipe, origin: &str) -> Result<Vec<ModelConfig>> {
    // The space of each command's result; `None`: any (a model with `merge_space=null`).
    let mut spaces: Vec<Option<Space>> = Vec::with_capacity(recipe.commands.len());
    let mut configs = Vec::new();
    let mut models = 0;
    for c in &recipe.commands {
        let e = |m: String| err(origin, c.line, m);
        let space = match c.kind {
            Kind::Dict | Kind::Literal => Some(Space::Param),
            Kind::Model => {
                if let Some(Value::Str(cfg)) = c.keyword("model_config") {
                    configs.push(ModelConfig {
                        model: models,
                        line: c.line,
                        config: cfg.clone(),
                    });
                }
                models += 1;
                match c.keyword("merge_space") {
                    None | Some(Value::Null) => None,
                    Some(Value::Str(s)) => Some(Space::parse(s).ok_or_else(|| {
                        e(format!(
                            "merge_space `{s}` is none of weight, delta and param"
                        ))
                    })?),
                    Some(other) => return Err(e(format!("merge_space is {other:?}"))),
                }
            }
            Kind::Merge => merge_space(c, &spaces).map_err(e)?,
        };
        spaces.push(space);
    }
    Ok(configs)
}

/// The space of merge `c`'s result, or why its inputs contradict its declaration.
fn merge_space(
    c: &Command,
    spaces: &[Option<Space>],
) -> std::result::Result<Option<Space>, String> {
    let Some(Value::Str(method)) = c.positional().next() else {
        return Ok(None);
    };
    let Some(d) = declared(method) else {
        return Ok(None);
    };
    for a in &c.args {
        if let Some(name) = &a.name {
            if !d.params.contains(&name.as_str()) {
                return Err(format!(
                    "`{method}` has no parameter `{name}` (its parameters: {})",
                    if d.params.is_empty() {
                        "none".to_string()
                    } else {
                        d.params.join(", ")
                    }
                ));
            }
        }
    }
    // The tensor inputs: references to models and merges (parameters are references too).
    let inputs: Vec<(usize, Option<Space>)> = c
        .positional()
        .skip(1)
        .filter_map(|v| match v {
            Value::Ref(r) => Some((*r, spaces.get(*r).copied().flatten())),
            _ => None,
        })
        .filter(|(_, s)| *s != Some(Space::Param))
        .collect();
    let wrong = |r: usize, got: Space, want: &str| {
        format!(
            "`{method}` takes {want}, but &{r} is in merge space `{}`{}",
            got.name(),
            if got == Space::Weight && want.contains("delta") {
                " (subtract a base model from it first)"
            } else {
                ""
            }
        )
    };
    match d.spaces {
        Spaces::ToParam => Ok(Some(Space::Param)),
        Spaces::Fixed { input, output } => {
            for &(r, s) in &inputs {
                if let Some(s) = s.filter(|s| *s != input) {
                    return Err(wrong(
                        r,
                        s,
                        &format!("inputs in merge space `{}`", input.name()),
                    ));
                }
            }
            Ok(Some(output))
        }
        Spaces::Same | Spaces::SameToParam => {
            let mut common: Option<(usize, Space)> = None;
            for &(r, s) in &inputs {
                let Some(s) = s else { continue };
                match common {
                    Some((first, c)) if c != s => {
                        return Err(format!(
                            "`{method}` takes inputs in one merge space, but &{first} is `{}` and &{r} is `{}`",
                            c.name(),
                            s.name()
                        ))
                    }
                    _ => common = common.or(Some((r, s))),
                }
            }
            Ok(match d.spaces {
                Spaces::SameToParam => Some(Space::Param),
                _ => common.map(|(_, s)| s),
            })
        }
        Spaces::FirstThenDeltas => {
            for &(r, s) in inputs.iter().skip(1) {
                if let Some(s) = s.filter(|s| *s != Space::Delta) {
                    return Err(wrong(r, s, "a delta as its second input"));
                }
            }
            Ok(inputs.first().and_then(|(_, s)| *s))
        }
    }
}

/// Checks each model's declared `model_config` against the layout detected from its file's
/// header (configs amalgam does not know, and files it cannot detect, are let through).
pub fn check_model_configs(
    configs: &[ModelConfig],
    paths: &[std::path::PathBuf],
    origin: &str,
) -> Result<()> {
    for c in configs {
        let Ok(declared) = c.config.parse::<crate::layout::arch::Layout>() else {
            continue;
        };
        let Some(path) = paths.get(c.model).filter(|p| p.is_file()) else {
            continue;
        };
        let detected = crate::io::input::ModelFile::open(path)?.detected_layout();
        if let Some(found) = detected.filter(|l| *l != declared) {
            return Err(err(
                origin,
                c.line,
                format!(
                    "model {} declares model_config `{}`, but the file is {}",
                    path.display(),
                    c.config,
                    found.name()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_text(body: &str) -> std::result::Result<Vec<ModelConfig>, String> {
        let text = format!("version 0.1.0\n{body}");
        let recipe = super::super::parse(&text, "r.mecha").unwrap();
        check(&recipe, "r.mecha").map_err(|e| e.to_string())
    }

    #[test]
    fn every_supported_method_is_declared() {
        for m in super::super::SUPPORTED {
            assert!(declared(m).is_some(), "{m}");
        }
        assert_eq!(DECLARED.len(), super::super::SUPPORTED.len());
    }

    #[test]
    fn unknown_parameters_are_refused_naming_the_known_ones() {
        let err = check_text(
            "model \"a\" model_config=null merge_space=\"weight\"\n\
             model \"b\" model_config=null merge_space=\"weight\"\n\
             merge \"subtract\" &0 &1\n\
             merge \"ties_sum\" &2 &2 k=0.5 vote_sign=true\n",
        )
        .unwrap_err();
        assert!(
            err.contains("r.mecha:5")
                && err.contains(
                    "`ties_sum` has no parameter `vote_sign` (its parameters: k, vote_sgn)"
                ),
            "{err}"
        );
    }

    #[test]
    fn merge_spaces_must_agree() {
        let models = "model \"a\" model_config=\"sdxl-sgm\" merge_space=\"weight\"\n\
                      model \"d\" model_config=null merge_space=\"delta\"\n";
        let err = check_text(&format!("{models}merge \"ties_sum\" &0 &1\n")).unwrap_err();
        assert!(err.contains("`ties_sum` takes inputs in merge space `delta`, but &0 is in merge space `weight` (subtract a base model from it first)"), "{err}");
        let err = check_text(&format!("{models}merge \"weighted_sum\" &0 &1\n")).unwrap_err();
        assert!(err.contains("&0 is `weight` and &1 is `delta`"), "{err}");
        let err = check_text(&format!("{models}merge \"subtract\" &1 &0\n")).unwrap_err();
        assert!(err.contains("&1 is in merge space `delta`"), "{err}");
        // A delta model where a delta belongs, a parameter literal beside the inputs, and a
        // result space carried on.
        let ok = check_text(&format!(
            "{models}merge \"ties_sum\" &1 &1\n\
             dict key=0.5\n\
             literal &3 model_config=\"singleton-mecha\" merge_space=null\n\
             merge \"convert_singleton\" &4\n\
             merge \"add_difference\" &0 &2 alpha=&5\n\
             merge \"weighted_sum\" &6 &0\n"
        ))
        .unwrap();
        assert_eq!(
            ok,
            vec![ModelConfig {
                model: 0,
                line: 2,
                config: "sdxl-sgm".into()
            }]
        );
        let err = check_text(&format!("{models}merge \"add_difference\" &0 &0\n")).unwrap_err();
        assert!(err.contains("a delta as its second input"), "{err}");
        let err = check_text("model \"a\" merge_space=\"weights\"\n").unwrap_err();
        assert!(err.contains("none of weight, delta and param"), "{err}");
    }
}
