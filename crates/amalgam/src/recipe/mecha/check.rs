//! Checks a recipe against what sd-mecha (1.1.8) declares of each method amalgam translates
//! ([`super::dialect`]): its keyword parameters and the merge spaces of its inputs and result.
//! A recipe sd-mecha would refuse, or that amalgam would read differently (an unknown parameter
//! silently ignored, a weight model given to a delta method, a model whose `model_config` is not
//! its file's), is refused, naming the line.

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
    let Some(d) = super::dialect::by_name(method) else {
        return Ok(None);
    };
    for a in &c.args {
        if let Some(name) = &a.name {
            if !d.param_names().any(|p| p == name) {
                return Err(format!(
                    "`{method}` has no parameter `{name}` (its parameters: {})",
                    if d.params.is_empty() {
                        "none".to_string()
                    } else {
                        d.param_names().collect::<Vec<_>>().join(", ")
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
