//! The TOML recipe text, parsed and checked into a graph, with errors naming the line.

use super::values::*;
use super::*;

pub(super) type Table = BTreeMap<String, Spanned<toml::Value>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRecipe {
    #[serde(default)]
    models: BTreeMap<String, Spanned<toml::Value>>,
    #[serde(default)]
    nodes: BTreeMap<String, Spanned<Table>>,
    output: Spanned<RawOutput>,
    /// `param = [values]` per swept parameter, and `combine = "product" | "zip"`.
    #[serde(default)]
    sweep: BTreeMap<String, Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutput {
    node: Spanned<String>,
    dtype: Option<Spanned<String>>,
    compute_dtype: Option<Spanned<String>>,
    fallback: Option<Spanned<String>>,
    seed: Option<Spanned<i64>>,
    layout: Option<Spanned<String>>,
    non_finite: Option<Spanned<String>>,
    repair: Option<Spanned<String>>,
    #[serde(default)]
    components: BTreeMap<String, Spanned<String>>,
}

pub(super) struct Ctx<'a> {
    origin: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
    fn line(&self, span: std::ops::Range<usize>) -> usize {
        self.text[..span.start.min(self.text.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
            + 1
    }
    fn err(&self, span: std::ops::Range<usize>, what: &str, message: impl Into<String>) -> Error {
        let what = if what.is_empty() {
            String::new()
        } else {
            format!(" ({what})")
        };
        Error::Recipe {
            origin: format!("{}:{}{what}", self.origin, self.line(span)),
            message: message.into(),
        }
    }
}

/// What a name in the recipe stands for.
#[derive(Clone, Debug)]
pub(super) enum Named {
    Models(Vec<usize>),
    Node(String),
}
/// Parses recipe `text`; `origin` names it in errors, `dir` anchors relative paths.
pub fn parse(text: &str, origin: &str, dir: &Path) -> Result<Recipe> {
    let cx = Ctx { origin, text };
    let raw: RawRecipe = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        cx.err(span, "", e.message().to_string())
    })?;

    // Models: a path, a list of paths, or a glob.
    let mut models: Vec<ModelInput> = Vec::new();
    let mut names: BTreeMap<String, Named> = BTreeMap::new();
    let mut missing: Vec<String> = Vec::new();
    for (name, value) in &raw.models {
        let span = value.span();
        let what = format!("model `{name}`");
        let paths: Vec<(String, bool)> = match value.get_ref() {
            toml::Value::String(s) => vec![(s.clone(), true)],
            toml::Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok((s.clone(), false)),
                    other => Err(cx.err(
                        span.clone(),
                        &what,
                        format!("expected a path, got {}", other.type_str()),
                    )),
                })
                .collect::<Result<_>>()?,
            other => {
                return Err(cx.err(
                    span,
                    &what,
                    format!(
                        "expected a path, a list of paths or a glob, got {}",
                        other.type_str()
                    ),
                ))
            }
        };
        let mut indices = Vec::new();
        let single = paths.len() == 1 && paths[0].1;
        for (p, _) in paths {
            let full = dir.join(&p);
            if p.contains(['*', '?', '[']) {
                let pattern = full.to_string_lossy().into_owned();
                let mut found: Vec<PathBuf> = glob::glob(&pattern)
                    .map_err(|e| cx.err(span.clone(), &what, format!("bad glob `{p}`: {e}")))?
                    .filter_map(|r| r.ok())
                    .filter(|p| p.is_file())
                    .collect();
                found.sort();
                if found.is_empty() {
                    missing.push(format!(
                        "{}: glob `{}` matches no file",
                        cx.line(span.clone()),
                        pattern
                    ));
                }
                for f in found {
                    indices.push(models.len());
                    models.push(ModelInput {
                        name: format!("{name}[{}]", indices.len() - 1),
                        path: f,
                    });
                }
            } else {
                if !full.is_file() {
                    missing.push(format!(
                        "{}: `{}` does not exist",
                        cx.line(span.clone()),
                        full.display()
                    ));
                }
                indices.push(models.len());
                models.push(ModelInput {
                    name: if single {
                        name.clone()
                    } else {
                        format!("{name}[{}]", indices.len() - 1)
                    },
                    path: full,
                });
            }
        }
        names.insert(name.clone(), Named::Models(indices));
    }
    if !missing.is_empty() {
        return Err(Error::Recipe {
            origin: origin.to_string(),
            message: format!("missing model files:\n  line {}", missing.join("\n  line ")),
        });
    }
    for (name, node) in &raw.nodes {
        if names.contains_key(name) {
            return Err(cx.err(
                node.span(),
                &format!("node `{name}`"),
                "a model has the same name; names must be unique",
            ));
        }
        names.insert(name.clone(), Named::Node(name.clone()));
    }

    // Nodes, in dependency order (depth first from each node in name order).
    let mut order: Vec<String> = Vec::new();
    let mut state: BTreeMap<String, u8> = BTreeMap::new(); // 1 = visiting, 2 = done
    fn visit(
        name: &str,
        raw: &RawRecipe,
        names: &BTreeMap<String, Named>,
        state: &mut BTreeMap<String, u8>,
        order: &mut Vec<String>,
        cx: &Ctx,
    ) -> Result<()> {
        match state.get(name) {
            Some(2) => return Ok(()),
            Some(1) => {
                return Err(cx.err(
                    raw.nodes[name].span(),
                    &format!("node `{name}`"),
                    "the nodes form a cycle",
                ))
            }
            _ => {}
        }
        state.insert(name.to_string(), 1);
        for (field, value) in raw.nodes[name].get_ref() {
            if field == "method" {
                continue;
            }
            for dep in refs_in(value.get_ref()) {
                if let Some(Named::Node(n)) = names.get(dep) {
                    visit(n, raw, names, state, order, cx)?;
                }
            }
        }
        state.insert(name.to_string(), 2);
        order.push(name.to_string());
        Ok(())
    }
    for name in raw.nodes.keys() {
        visit(name, &raw, &names, &mut state, &mut order, &cx)?;
    }
    let node_index: BTreeMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();

    let mut nodes = Vec::new();
    for name in &order {
        let table = &raw.nodes[name];
        let what = format!("node `{name}`");
        let t = table.get_ref();
        let method = match t.get("method") {
            Some(v) => match v.get_ref() {
                toml::Value::String(s) => {
                    methods::info(s).map_err(|e| cx.err(v.span(), &what, e.to_string()))?
                }
                other => {
                    return Err(cx.err(
                        v.span(),
                        &what,
                        format!("`method` must be a string, got {}", other.type_str()),
                    ))
                }
            },
            None => {
                return Err(cx.err(
                    table.span(),
                    &what,
                    format!(
                        "no `method`; one of: {}",
                        methods::ALL
                            .iter()
                            .map(|i| i.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ))
            }
        };
        let mut slots = Vec::new();
        for slot in method.slots {
            let Some(v) = t.get(slot.name) else {
                return Err(cx.err(
                    table.span(),
                    &what,
                    format!(
                        "method `{}` needs `{}` ({})",
                        method.name,
                        slot.name,
                        match slot.kind {
                            SlotKind::One => "one model or node name",
                            SlotKind::Many => "a list of model, group or node names",
                        }
                    ),
                ));
            };
            let mut refs = Vec::new();
            let items: Vec<&toml::Value> = match v.get_ref() {
                toml::Value::Array(a) => a.iter().collect(),
                other => vec![other],
            };
            for item in items {
                let toml::Value::String(n) = item else {
                    return Err(cx.err(
                        v.span(),
                        &what,
                        format!(
                            "`{}` must name models or nodes, got {}",
                            slot.name,
                            item.type_str()
                        ),
                    ));
                };
                match names.get(n) {
                    Some(Named::Models(ix)) => refs.extend(ix.iter().map(|&i| Ref::Model(i))),
                    Some(Named::Node(nn)) => refs.push(Ref::Node(node_index[nn.as_str()])),
                    None => {
                        return Err(cx.err(
                            v.span(),
                            &what,
                            format!(
                            "`{}` refers to `{n}`, which is neither a model nor a node (known: {})",
                            slot.name,
                            names.keys().cloned().collect::<Vec<_>>().join(", ")
                        ),
                        ))
                    }
                }
            }
            if slot.kind == SlotKind::One && refs.len() != 1 {
                return Err(cx.err(
                    v.span(),
                    &what,
                    format!(
                        "`{}` takes exactly one model or node, got {}",
                        slot.name,
                        refs.len()
                    ),
                ));
            }
            if refs.is_empty() {
                return Err(cx.err(v.span(), &what, format!("`{}` is empty", slot.name)));
            }
            slots.push(refs);
        }
        let mut params = BTreeMap::new();
        for (k, v) in t {
            if k == "method" || method.slots.iter().any(|s| s.name == k) {
                continue;
            }
            let pv = to_param(v.get_ref())
                .map_err(|e| cx.err(v.span(), &what, format!("parameter `{k}` {e}")))?;
            params.insert(k.clone(), pv);
        }
        let counts: Vec<usize> = slots.iter().map(Vec::len).collect();
        methods::check(
            method.name,
            Params::new(method.name, crate::method::params_for_block(&params, None)),
            &counts,
        )
        .map_err(|e| cx.err(table.span(), &what, e.to_string()))?;
        nodes.push(Node {
            name: name.clone(),
            method: method.name,
            params,
            slots,
        });
    }

    let out = raw.output.get_ref();
    let output = match names.get(out.node.get_ref()) {
        Some(Named::Node(n)) => Ref::Node(node_index[n.as_str()]),
        Some(Named::Models(ix)) if ix.len() == 1 => Ref::Model(ix[0]),
        Some(Named::Models(_)) => {
            return Err(cx.err(
                out.node.span(),
                "output",
                "`node` names a group of models; name one node or one model",
            ))
        }
        None => {
            return Err(cx.err(
                out.node.span(),
                "output",
                format!(
                    "`node` refers to `{}`, which is not defined",
                    out.node.get_ref()
                ),
            ))
        }
    };
    let fallback = match &out.fallback {
        None => None,
        Some(f) => match names.get(f.get_ref()) {
            Some(Named::Models(ix)) if ix.len() == 1 => Some(ix[0]),
            _ => {
                return Err(cx.err(
                    f.span(),
                    "output",
                    format!("`fallback` must name one model, got `{}`", f.get_ref()),
                ))
            }
        },
    };
    let one_model = |f: &Spanned<String>, what: &str| -> Result<usize> {
        match names.get(f.get_ref()) {
            Some(Named::Models(ix)) if ix.len() == 1 => Ok(ix[0]),
            _ => Err(cx.err(
                f.span(),
                "output",
                format!("`{what}` must name one model, got `{}`", f.get_ref()),
            )),
        }
    };
    let repair = out
        .repair
        .as_ref()
        .map(|r| one_model(r, "repair"))
        .transpose()?;
    let mut components = BTreeMap::new();
    for (c, target) in &out.components {
        let r = match names.get(target.get_ref()) {
            Some(Named::Node(n)) => Ref::Node(node_index[n.as_str()]),
            Some(Named::Models(ix)) if ix.len() == 1 => Ref::Model(ix[0]),
            _ => {
                return Err(cx.err(
                    target.span(),
                    "output.components",
                    format!(
                        "component `{c}` must name one node or one model, got `{}`",
                        target.get_ref()
                    ),
                ))
            }
        };
        components.insert(c.clone(), r);
    }
    let mut settings = RecipeSettings::default();
    if let Some(d) = &out.dtype {
        settings.dtype = Some(
            d.get_ref()
                .parse()
                .map_err(|e: String| cx.err(d.span(), "output", e))?,
        );
    }
    if let Some(d) = &out.compute_dtype {
        settings.compute_dtype = Some(
            d.get_ref()
                .parse()
                .map_err(|e: String| cx.err(d.span(), "output", e))?,
        );
    }
    if let Some(l) = &out.layout {
        settings.layout = Some(
            l.get_ref()
                .parse()
                .map_err(|e: String| cx.err(l.span(), "output", e))?,
        );
    }
    if let Some(p) = &out.non_finite {
        settings.non_finite = Some(
            p.get_ref()
                .parse()
                .map_err(|e: String| cx.err(p.span(), "output", e))?,
        );
    }
    if let Some(s) = &out.seed {
        settings.seed =
            Some(u64::try_from(*s.get_ref()).map_err(|_| {
                cx.err(s.span(), "output", "`seed` must be a non-negative integer")
            })?);
    }
    if models.is_empty() {
        return Err(Error::Recipe {
            origin: origin.to_string(),
            message: "no models: add a [models] table".into(),
        });
    }
    let graph = Graph {
        models,
        nodes,
        output,
        fallback,
        components,
        repair,
    };
    graph.validate().map_err(|e| Error::Recipe {
        origin: origin.to_string(),
        message: e.to_string(),
    })?;
    let sweep = parse_sweep(&cx, &raw.sweep)?;
    Ok(Recipe {
        graph,
        settings,
        sweep,
    })
}

/// The `[sweep]` table: each parameter's list of values, and how they combine.
fn parse_sweep(
    cx: &Ctx,
    table: &BTreeMap<String, Spanned<toml::Value>>,
) -> Result<Option<super::sweep::Sweep>> {
    use super::sweep::{Combine, Sweep, SweepAxis};
    use crate::method::ParamValue;
    if table.is_empty() {
        return Ok(None);
    }
    let mut sweep = Sweep::default();
    for (name, value) in table {
        let span = value.span();
        let what = format!("sweep `{name}`");
        if name == "combine" {
            sweep.combine = match value.get_ref().as_str() {
                Some("product") => Combine::Product,
                Some("zip") => Combine::Zip,
                _ => {
                    return Err(cx.err(span, &what, "expected \"product\" or \"zip\""));
                }
            };
            continue;
        }
        let Some(items) = value.get_ref().as_array() else {
            return Err(cx.err(span, &what, "expected a list of values"));
        };
        let values = items
            .iter()
            .map(|v| match v {
                toml::Value::Float(x) => Ok((x.to_string(), ParamValue::Number(*x))),
                toml::Value::Integer(i) => Ok((i.to_string(), ParamValue::Number(*i as f64))),
                toml::Value::Boolean(b) => Ok((b.to_string(), ParamValue::Bool(*b))),
                toml::Value::String(t) => Ok((t.clone(), ParamValue::Text(t.clone()))),
                other => Err(cx.err(
                    span.clone(),
                    &what,
                    format!(
                        "expected numbers, booleans or names, got {}",
                        other.type_str()
                    ),
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        if values.is_empty() {
            return Err(cx.err(span, &what, "the list is empty"));
        }
        sweep.axes.push(SweepAxis {
            target: name.clone(),
            values,
        });
    }
    Ok(Some(sweep))
}
