//! A parsed `.mecha` recipe as an amalgam graph.

pub use super::supported::SUPPORTED;
use super::{err, Kind, Recipe, Value};
use crate::error::{Error, Result};
use crate::method::SlotKind;
use crate::methods::gram::geometric_median::Weiszfeld;

/// The result of one command during translation.
#[derive(Clone, Debug)]
enum Item {
    /// A `dict`.
    Dict(std::collections::BTreeMap<String, Value>),
    /// A `literal` over a dict, with its model config.
    Literal {
        dict: std::collections::BTreeMap<String, Value>,
        config: Option<String>,
    },
    /// A parameter value (`convert_singleton`, block conversions, `fallback` of parameters).
    Param(crate::method::ParamValue),
    /// A model or node: something with tensors.
    Tensors(crate::recipe::graph::Ref),
    /// `pick_component(model, component)`: the model's keys of one component.
    Component(crate::recipe::graph::Ref, String),
    /// `omit_component(model, component)`: the model's keys of the other components.
    Omitted(crate::recipe::graph::Ref, String),
}

/// Records a merge's `seed` (a number; anything else is no seed) as the recipe's: amalgam runs
/// with one seed, so two different ones are an error.
fn one_seed(
    seed: &mut Option<u64>,
    given: Option<crate::method::ParamValue>,
) -> std::result::Result<(), String> {
    if let Some(crate::method::ParamValue::Number(x)) = given {
        if seed.is_some_and(|s| s != x as u64) {
            return Err("the recipe uses several seeds; amalgam runs with one".into());
        }
        *seed = Some(x as u64);
    }
    Ok(())
}

/// A recipe translated into an amalgam graph, and the seed it asks for.
pub struct Translated {
    /// What to merge.
    pub graph: crate::recipe::graph::Graph,
    /// The recipe's seed, if it sets one.
    pub seed: Option<u64>,
    /// The `model_config` each model line declares (see [`super::check::check_model_configs`]).
    pub model_configs: Vec<super::check::ModelConfig>,
}

/// Translates a parsed recipe into a graph. Relative model paths are resolved against
/// `model_dirs` (first match), then against `dir` (the recipe's folder); all missing models are
/// reported at once, with the paths tried. Unsupported methods are an error listing the ones
/// that are supported, before any tensor is read.
pub fn translate(
    recipe: &Recipe,
    origin: &str,
    dir: &std::path::Path,
    model_dirs: &[std::path::PathBuf],
    renames: &[(String, String)],
) -> Result<Translated> {
    use crate::method::ParamValue;
    use crate::recipe::graph::{Graph, ModelInput, Node, Ref};
    use std::collections::BTreeMap;

    let e = |line: usize, m: String| err(origin, line, m);
    // Unsupported methods first, all of them.
    let unsupported: Vec<(usize, String)> = recipe
        .commands
        .iter()
        .filter(|c| c.kind == Kind::Merge)
        .filter_map(|c| match c.positional().next() {
            Some(Value::Str(m)) if !SUPPORTED.contains(&m.as_str()) => Some((c.line, m.clone())),
            _ => None,
        })
        .collect();
    if let Some((line, m)) = unsupported.first() {
        if let Some((_, why)) = crate::methods::REFUSED.iter().find(|(n, _)| n == m) {
            return Err(e(*line, format!("method `{m}` is not supported: {why}")));
        }
        return Err(e(
            *line,
            format!(
                "method `{m}` is not supported (amalgam runs: {})",
                SUPPORTED.join(", ")
            ),
        ));
    }
    // Parameters and merge spaces as sd-mecha declares them.
    let model_configs = super::check::check(recipe, origin)?;
    let mut models: Vec<ModelInput> = Vec::new();
    let mut missing: Vec<String> = Vec::new();
    let mut nodes: Vec<Node> = Vec::new();
    let mut items: Vec<Item> = Vec::new();
    let mut components: BTreeMap<String, Ref> = BTreeMap::new();
    let mut seed: Option<u64> = None;

    let param = |v: &Value, items: &[Item], line: usize| -> Result<ParamValue> {
        Ok(match v {
            Value::Bool(b) => ParamValue::Bool(*b),
            Value::Int(i) => ParamValue::Number(*i as f64),
            Value::Float(f) => ParamValue::Number(*f),
            Value::Str(s) => ParamValue::Text(s.clone()),
            Value::Ref(r) => match &items[*r] {
                Item::Param(p) => p.clone(),
                other => {
                    return Err(e(
                        line,
                        format!("&{r} is not a parameter value ({other:?})"),
                    ))
                }
            },
            Value::Null => return Err(e(line, "a parameter is null".into())),
        })
    };
    let tensors = |v: &Value, items: &[Item], line: usize| -> Result<Ref> {
        match v {
            Value::Ref(r) => match &items[*r] {
                Item::Tensors(t) => Ok(*t),
                Item::Component(..) | Item::Omitted(..) => Err(e(
                    line,
                    format!(
                        "&{r} is a `pick_component` or `omit_component`, which amalgam reads only \
                         as `fallback(pick_component(model, component), merge)` (or \
                         `fallback(omit_component(...), model)`): the recipe's component routing"
                    ),
                )),
                _ => Err(e(line, format!("&{r} is not a model or a merge of models"))),
            },
            other => Err(e(
                line,
                format!("expected a model reference, got {other:?}"),
            )),
        }
    };

    for c in &recipe.commands {
        let item = match c.kind {
            Kind::Dict => Item::Dict(
                c.args
                    .iter()
                    .filter_map(|a| Some((a.name.clone()?, a.value.clone())))
                    .collect(),
            ),
            Kind::Literal => {
                let Some(Value::Ref(d)) = c.positional().next() else {
                    unreachable!()
                };
                let Item::Dict(dict) = &items[*d] else {
                    return Err(e(
                        c.line,
                        format!("`literal` refers to &{d}, which is not a dict"),
                    ));
                };
                let config = match c.keyword("model_config") {
                    Some(Value::Str(s)) => Some(s.clone()),
                    _ => None,
                };
                Item::Literal {
                    dict: dict.clone(),
                    config,
                }
            }
            Kind::Model => {
                let Some(Value::Str(p)) = c.positional().next() else {
                    unreachable!()
                };
                let resolved = match super::models::find(p, renames, model_dirs, dir) {
                    Ok(found) => found,
                    Err((shown, tried, fallback)) => {
                        missing.push(format!("{shown} (line {}; tried {tried})", c.line));
                        fallback
                    }
                };
                models.push(ModelInput {
                    name: format!("m{}", models.len()),
                    path: resolved,
                });
                Item::Tensors(Ref::Model(models.len() - 1))
            }
            Kind::Merge => {
                let mut pos = c.positional();
                let Some(Value::Str(method)) = pos.next() else {
                    unreachable!()
                };
                let args: Vec<&Value> = pos.collect();
                let kw = |name: &str| c.keyword(name);
                let mut node =
                    |method: &'static str,
                     slots: Vec<Vec<Ref>>,
                     params: BTreeMap<String, ParamValue>| {
                        // One line can make two nodes (a zero base and the merge): names stay
                        // unique.
                        let base = format!("line{}", c.line);
                        let taken = nodes
                            .iter()
                            .filter(|n| n.name == base || n.name.starts_with(&format!("{base}_")))
                            .count();
                        nodes.push(Node {
                            name: if taken == 0 {
                                base
                            } else {
                                format!("{base}_{taken}")
                            },
                            method,
                            params,
                            slots,
                        });
                        Item::Tensors(Ref::Node(nodes.len() - 1))
                    };
                match method.as_str() {
                    "convert_singleton" => {
                        let Some(Value::Ref(l)) = args.first() else {
                            return Err(e(c.line, "`convert_singleton` takes a literal".into()));
                        };
                        let Item::Literal { dict, config } = &items[*l] else {
                            return Err(e(c.line, format!("&{l} is not a literal")));
                        };
                        if config.as_deref().is_some_and(|c| c != "singleton-mecha") {
                            return Err(e(
                                c.line,
                                format!(
                                    "`convert_singleton` of a `{}` literal",
                                    config.as_deref().unwrap_or("")
                                ),
                            ));
                        }
                        let v = dict
                            .get("key")
                            .ok_or_else(|| e(c.line, "the singleton has no `key`".into()))?;
                        Item::Param(param(v, &items, c.line)?)
                    }
                    "convert_sdxl_blocks_to_sgm" | "convert_sd1_blocks_to_ldm" => {
                        let Some(Value::Ref(l)) = args.first() else {
                            return Err(e(c.line, format!("`{method}` takes a literal")));
                        };
                        let Item::Literal { dict, config } = &items[*l] else {
                            return Err(e(c.line, format!("&{l} is not a literal")));
                        };
                        let want = if method == "convert_sdxl_blocks_to_sgm" {
                            "sdxl-supermerger_blocks"
                        } else {
                            "sd1-supermerger_blocks"
                        };
                        if config.as_deref().is_some_and(|c| c != want) {
                            return Err(e(
                                c.line,
                                format!("`{method}` expects a `{want}` literal"),
                            ));
                        }
                        let mut map = BTreeMap::new();
                        for (k, v) in dict {
                            let x = match v {
                                Value::Int(i) => *i as f64,
                                Value::Float(f) => *f,
                                other => {
                                    return Err(e(
                                        c.line,
                                        format!("block `{k}` is {other:?}, not a number"),
                                    ))
                                }
                            };
                            map.insert(k.clone(), x);
                        }
                        Item::Param(ParamValue::Blocks(map))
                    }
                    "randperm" => {
                        let a = tensors(
                            args.first().copied().unwrap_or(&Value::Null),
                            &items,
                            c.line,
                        )?;
                        let given = kw("seed").or(args.get(1).copied());
                        let given = given.map(|v| param(v, &items, c.line)).transpose()?;
                        one_seed(&mut seed, given).map_err(|m| e(c.line, m))?;
                        node("randperm", vec![vec![a]], BTreeMap::new())
                    }
                    "cast" => {
                        // The output dtype is the run's (`--dtype`); computing is in f32/f64.
                        Item::Tensors(tensors(
                            args.first().copied().unwrap_or(&Value::Null),
                            &items,
                            c.line,
                        )?)
                    }
                    "pick_component" | "omit_component" => {
                        let m = tensors(
                            args.first().copied().unwrap_or(&Value::Null),
                            &items,
                            c.line,
                        )?;
                        let comp = match kw("component").or(args.get(1).copied()) {
                            Some(v) => match param(v, &items, c.line)? {
                                ParamValue::Text(t) => t,
                                other => {
                                    return Err(e(
                                        c.line,
                                        format!("component must be a string, got {other:?}"),
                                    ))
                                }
                            },
                            None => {
                                return Err(e(c.line, "`pick_component` needs a component".into()))
                            }
                        };
                        if method == "pick_component" {
                            Item::Component(m, comp)
                        } else {
                            Item::Omitted(m, comp)
                        }
                    }
                    "fallback" => {
                        let (Some(a), Some(b)) = (args.first(), args.get(1)) else {
                            return Err(e(c.line, "`fallback` takes two arguments".into()));
                        };
                        let (Value::Ref(a), Value::Ref(b)) = (a, b) else {
                            return Err(e(c.line, "`fallback` takes two references".into()));
                        };
                        match (&items[*a], &items[*b]) {
                            // Block values with a default for the other blocks.
                            (Item::Param(ParamValue::Blocks(map)), Item::Param(ParamValue::Number(d))) => {
                                let mut map = map.clone();
                                map.insert("default".into(), *d);
                                Item::Param(ParamValue::Blocks(map))
                            }
                            // One component from a model, everything else from the merge.
                            (Item::Component(m, comp), Item::Tensors(rest)) => {
                                components.insert(comp.clone(), *m);
                                Item::Tensors(*rest)
                            }
                            // Everything but one component from a model, that one from another.
                            (Item::Omitted(m, comp), Item::Tensors(other)) => {
                                components.insert(comp.clone(), *other);
                                Item::Tensors(*m)
                            }
                            // Each key from a, else from the other: a node.
                            (Item::Tensors(x), Item::Tensors(y)) => {
                                node("fallback", vec![vec![*x], vec![*y]], BTreeMap::new())
                            }
                            (x, y) => {
                                return Err(e(
                                    c.line,
                                    format!("`fallback` of {x:?} and {y:?} is not supported (supported: two models or merges, a component with a merge, block values with a default)"),
                                ))
                            }
                        }
                    }
                    "n_average" => {
                        let ms = args
                            .iter()
                            .map(|a| tensors(a, &items, c.line))
                            .collect::<Result<Vec<_>>>()?;
                        node("soup", vec![ms], BTreeMap::new())
                    }
                    "subtract" => {
                        let ms = args
                            .iter()
                            .map(|a| tensors(a, &items, c.line))
                            .collect::<Result<Vec<_>>>()?;
                        if ms.len() != 2 {
                            return Err(e(c.line, "`subtract` takes two models".into()));
                        }
                        node("subtract", vec![vec![ms[0]], vec![ms[1]]], BTreeMap::new())
                    }
                    "weighted_sum" | "add_difference" | "slerp" => {
                        let a = tensors(
                            args.first().copied().unwrap_or(&Value::Null),
                            &items,
                            c.line,
                        )?;
                        let b =
                            tensors(args.get(1).copied().unwrap_or(&Value::Null), &items, c.line)?;
                        let mut params = BTreeMap::new();
                        if let Some(v) = kw("alpha").or(args.get(2).copied()) {
                            params.insert("alpha".to_string(), param(v, &items, c.line)?);
                        }
                        // sd-mecha's registered add_difference adds a delta: a + alpha·b.
                        let method = match method.as_str() {
                            "weighted_sum" => "weighted_sum",
                            "slerp" => "slerp",
                            _ => "add",
                        };
                        node(method, vec![vec![a], vec![b]], params)
                    }
                    "model_stock"
                    | "geometric_median"
                    | "ties_sum"
                    | "ties_sum_extended"
                    | "ties_sum_with_dropout"
                    | "dropout"
                    | "isotropic" => {
                        let ms = args
                            .iter()
                            .map(|a| tensors(a, &items, c.line))
                            .collect::<Result<Vec<_>>>()?;
                        if ms.is_empty() {
                            return Err(e(c.line, format!("`{method}` needs at least one input")));
                        }
                        let get = |name: &str| -> Result<Option<ParamValue>> {
                            kw(name).map(|v| param(v, &items, c.line)).transpose()
                        };
                        let number = |name: &str, default: f64| -> Result<f64> {
                            Ok(match get(name)? {
                                Some(ParamValue::Number(x)) if !x.is_finite() => {
                                    return Err(e(
                                        c.line,
                                        format!("`{name}` is {x}; it must be a finite number"),
                                    ))
                                }
                                Some(ParamValue::Number(x)) => x,
                                Some(ParamValue::Bool(b)) => f64::from(u8::from(b)),
                                None => default,
                                Some(other) => {
                                    return Err(e(c.line, format!("`{name}` is {other:?}")))
                                }
                            })
                        };
                        let flag = |name: &str, default: bool| -> Result<bool> {
                            Ok(number(name, f64::from(u8::from(default)))? > 0.0)
                        };
                        let mut params: BTreeMap<String, ParamValue> = BTreeMap::new();
                        let mut set = |k: &str, v: ParamValue| {
                            params.insert(k.to_string(), v);
                        };
                        if method == "geometric_median" {
                            for (k, d) in Weiszfeld::DEFAULT.params() {
                                set(k, ParamValue::Number(number(k, d)?));
                            }
                            node("geometric_median", vec![ms], params)
                        } else {
                            // Delta-space methods: amalgam's take a base, here a zero tensor
                            // (the first input minus itself), and return base + result.
                            let zero =
                                node("subtract", vec![vec![ms[0]], vec![ms[0]]], BTreeMap::new());
                            let Item::Tensors(zero) = zero else {
                                unreachable!()
                            };
                            if method == "dropout" {
                                if number("overlap", 1.0)? != 1.0 {
                                    return Err(e(c.line, "`dropout` with overlap other than 1 is not supported (it is broken in sd-mecha itself)".into()));
                                }
                                set("p", ParamValue::Number(number("probability", 0.9)?));
                                set("rescale", ParamValue::Number(number("rescale", 1.0)?));
                                one_seed(&mut seed, get("seed")?).map_err(|m| e(c.line, m))?;
                                node("dropout", vec![vec![zero], ms], params)
                            } else if method == "isotropic" {
                                // The 6DammK9 fork's ISO-C of deltas (tested there against the
                                // paper's σ̄·U Vᵀ of their sum).
                                let mean = flag("apply_exp", false)?;
                                let high = flag("apply_high_dim", false)?;
                                set(
                                    "mean",
                                    ParamValue::Text(
                                        if mean { "geometric" } else { "arithmetic" }.into(),
                                    ),
                                );
                                set(
                                    "high_dim",
                                    ParamValue::Text(
                                        if high { "flatten" } else { "vector" }.into(),
                                    ),
                                );
                                node("iso_c", vec![vec![zero], ms], params)
                            } else if method == "model_stock" {
                                set("pairs", ParamValue::Text("adjacent".into()));
                                set("unit", ParamValue::Text("row".into()));
                                set("cos_eps", ParamValue::Number(number("cos_eps", 1e-6)?));
                                node("model_stock", vec![vec![zero], ms], params)
                            } else {
                                let default_k = if method == "ties_sum" { 1.0 } else { 0.2 };
                                set("k", ParamValue::Number(number("k", default_k)?));
                                // sd-mecha 1.1.x: vote_sgn = false is the count vote.
                                let election = if flag("vote_sgn", false)? {
                                    "mass"
                                } else {
                                    "count"
                                };
                                set("election", ParamValue::Text(election.into()));
                                if method != "ties_sum" {
                                    // sd-optim's ties_sum_extended (sd-mecha's has neither).
                                    for k in ["weight_decay", "min_agreement"] {
                                        if let Some(v) = get(k)? {
                                            set(k, v);
                                        }
                                    }
                                    if flag("apply_median", false)? {
                                        set("fuse", ParamValue::Text("geometric_median".into()));
                                        for (k, d) in Weiszfeld::DEFAULT.params() {
                                            set(k, ParamValue::Number(number(k, d)?));
                                        }
                                    } else if !flag("apply_stock", false)? {
                                        // The inverted flag: false multiplies the TIES mean by
                                        // the model-stock factor of the filtered deltas.
                                        set("stock", ParamValue::Text("adjacent_rows".into()));
                                        set(
                                            "cos_eps",
                                            ParamValue::Number(number("cos_eps", 1e-6)?),
                                        );
                                    }
                                }
                                if method == "ties_sum_with_dropout" {
                                    let p = number("probability", 0.9)?;
                                    let eps = number("della_eps", 0.0)?;
                                    if p > 0.0 {
                                        if eps != 0.0 {
                                            set("drop", ParamValue::Text("della".into()));
                                            set("della_eps", ParamValue::Number(eps));
                                            set("rank", ParamValue::Text("tensor".into()));
                                        } else {
                                            set("drop", ParamValue::Text("dare".into()));
                                        }
                                        set("p", ParamValue::Number(p));
                                        // `rescale` is a bool, or in older recipes the exponent
                                        // of 1 / (1 - p): 0 and 1 are those two.
                                        let exponent = number("rescale", 1.0)?;
                                        if exponent != 0.0 && exponent != 1.0 {
                                            return Err(e(c.line, format!("`rescale = {exponent}` (an exponent of 1 / (1 - p) other than 0 or 1) is not supported")));
                                        }
                                        let rescale = if exponent == 1.0 {
                                            "inverse_keep"
                                        } else {
                                            "none"
                                        };
                                        set("rescale", ParamValue::Text(rescale.into()));
                                    }
                                    one_seed(&mut seed, get("seed")?).map_err(|m| e(c.line, m))?;
                                }
                                node("ties", vec![vec![zero], ms], params)
                            }
                        }
                    }
                    other => {
                        let direct = super::direct::by_mecha(other)
                            .unwrap_or_else(|| unreachable!("{other} is in SUPPORTED"));
                        // Inputs first, then parameters by position in sd-mecha's signature;
                        // a list slot last (`clamp`'s bounds) takes every input after the others,
                        // its parameters then keyword-only.
                        let declared = crate::methods::info(direct.method)?.slots;
                        let listed = declared.last().map(|s| s.kind) == Some(SlotKind::Many);
                        let n = if listed { args.len() } else { declared.len() };
                        let (inputs, values) = args.split_at(n.min(args.len()));
                        let mut slots = inputs
                            .iter()
                            .map(|a| tensors(a, &items, c.line).map(|t| vec![t]))
                            .collect::<Result<Vec<_>>>()?;
                        if listed && slots.len() >= declared.len() {
                            let rest = slots.split_off(declared.len() - 1).concat();
                            slots.push(rest);
                        }
                        let order = super::check::declared(other).map_or(&[][..], |d| d.params);
                        let at = |name: &str| {
                            let i = order.iter().position(|p| *p == name)?;
                            values.get(i).copied()
                        };
                        let params = direct.read(|name| {
                            kw(name)
                                .or_else(|| at(name))
                                .map(|v| param(v, &items, c.line))
                                .transpose()
                        })?;
                        node(direct.method, slots, params)
                    }
                }
            }
        };
        items.push(item);
    }
    if !missing.is_empty() {
        return Err(Error::Recipe {
            origin: origin.to_string(),
            message: format!("missing models: {}", missing.join("; ")),
        });
    }
    let last = recipe.commands.last().expect("a recipe has commands");
    let output = match items.last() {
        Some(Item::Tensors(r)) => *r,
        _ => {
            return Err(e(
                last.line,
                "the recipe's result is not a model or a merge".into(),
            ))
        }
    };
    // Block values from sd-mecha's block conversions follow its key → block mapping.
    for n in nodes.iter_mut().filter(|n| n.has_block_params()) {
        n.params.insert(
            crate::method::BLOCK_MAPPING.to_string(),
            ParamValue::Text("sd_mecha".into()),
        );
    }
    let graph = Graph {
        models,
        nodes,
        output,
        fallback: None,
        components,
        repair: None,
    };
    graph.validate().map_err(|x| Error::Recipe {
        origin: origin.to_string(),
        message: x.to_string(),
    })?;
    Ok(Translated {
        graph,
        seed,
        model_configs,
    })
}
