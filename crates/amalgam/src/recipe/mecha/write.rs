//! A graph as a `.mecha` recipe.

use super::{Value, VERSION_LINE};

/// Writes `graph` as a `.mecha` recipe, the way sd-mecha does (scalars as `convert_singleton`
/// literals, deltas as `subtract` nodes, identical lines written once), or `None` when it uses
/// something sd-mecha cannot express (a method or option it lacks). `layouts` gives each model's
/// `model_config`; `arch` decides the block conversions of per-block parameters.
pub fn to_mecha(
    graph: &crate::recipe::graph::Graph,
    layouts: &[Option<crate::layout::arch::Layout>],
    arch: Option<crate::layout::arch::Arch>,
    seed: u64,
) -> Option<String> {
    use crate::method::ParamValue;
    use crate::methods::delta::ties::{
        Drop, Election, Fuse, Pipeline, Rescale, SignTie, Stock, Trim,
    };
    use crate::recipe::graph::Ref;

    struct W {
        lines: Vec<String>,
        index: std::collections::HashMap<String, usize>,
    }
    impl W {
        fn emit(&mut self, line: String) -> usize {
            if let Some(&i) = self.index.get(&line) {
                return i;
            }
            self.lines.push(line.clone());
            self.index.insert(line, self.lines.len() - 1);
            self.lines.len() - 1
        }
        fn value(v: &Value) -> String {
            match v {
                Value::Null => "null".into(),
                Value::Bool(b) => b.to_string(),
                Value::Int(i) => i.to_string(),
                Value::Float(f) => format!("{f:?}"),
                Value::Str(s) => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
                Value::Ref(r) => format!("&{r}"),
            }
        }
        fn scalar(&mut self, v: Value) -> usize {
            let d = self.emit(format!("dict key={}", W::value(&v)));
            let l = self.emit(format!(
                "literal &{d} model_config=\"singleton-mecha\" merge_space=null"
            ));
            self.emit(format!("merge \"convert_singleton\" &{l}"))
        }
        fn merge(&mut self, method: &str, args: &[usize], kw: &[(&str, usize)]) -> usize {
            let mut line = format!("merge \"{method}\"");
            for a in args {
                line += &format!(" &{a}");
            }
            for (k, v) in kw {
                line += &format!(" {k}=&{v}");
            }
            self.emit(line)
        }
    }
    let mut w = W {
        lines: Vec::new(),
        index: Default::default(),
    };
    let mut model_line = Vec::new();
    for (i, m) in graph.models.iter().enumerate() {
        let config = layouts
            .get(i)
            .copied()
            .flatten()
            .map_or("null".to_string(), |l| format!("\"{}\"", l.name()));
        let path = m.path.display().to_string();
        model_line.push(w.emit(format!(
            "model {} model_config={config} merge_space=\"weight\"",
            W::value(&Value::Str(path))
        )));
    }
    let param_line = |w: &mut W, v: &ParamValue| -> Option<usize> {
        Some(match v {
            ParamValue::Number(x) => w.scalar(Value::Float(*x)),
            ParamValue::Bool(b) => w.scalar(Value::Bool(*b)),
            ParamValue::Text(t) => w.scalar(Value::Str(t.clone())),
            ParamValue::List(_) => return None,
            ParamValue::Blocks(map) => {
                let (config, convert) = match arch? {
                    crate::layout::arch::Arch::Sdxl => {
                        ("sdxl-supermerger_blocks", "convert_sdxl_blocks_to_sgm")
                    }
                    crate::layout::arch::Arch::Sd1 => {
                        ("sd1-supermerger_blocks", "convert_sd1_blocks_to_ldm")
                    }
                    _ => return None,
                };
                let entries: Vec<String> = map
                    .iter()
                    .filter(|(k, _)| *k != "default")
                    .map(|(k, x)| format!("{k}={}", W::value(&Value::Float(*x))))
                    .collect();
                let d = w.emit(format!("dict {}", entries.join(" ")));
                let l = w.emit(format!(
                    "literal &{d} model_config=\"{config}\" merge_space=null"
                ));
                let c = w.merge(convert, &[l], &[]);
                match map.get("default") {
                    Some(x) => {
                        let s = w.scalar(Value::Float(*x));
                        w.merge("fallback", &[c, s], &[])
                    }
                    None => c,
                }
            }
        })
    };
    // The translation of sd-mecha's delta-space methods gives amalgam's method a zero base,
    // `x - x` of a delta `x`, a node (see `translate`): written back, that method's inputs are deltas
    // already and its result is a delta. The zero node has no line of its own.
    const ZERO: usize = usize::MAX;
    let mut node_line: Vec<usize> = Vec::new();
    for node in &graph.nodes {
        if node.method == "subtract"
            && node.slots[0] == node.slots[1]
            && matches!(node.slots[0][..], [Ref::Node(_)])
        {
            node_line.push(ZERO);
            continue;
        }
        let r = |x: &Ref| -> usize {
            match *x {
                Ref::Model(m) => model_line[m],
                Ref::Node(n) => node_line[n],
            }
        };
        let args: Vec<Vec<usize>> = node
            .slots
            .iter()
            .map(|s| s.iter().map(r).collect())
            .collect();
        let delta_method = DELTA_METHODS.contains(&node.method);
        // A zero node is only ever a delta method's base.
        let zero_base = delta_method && args[0][0] == ZERO;
        if args
            .iter()
            .flatten()
            .skip(usize::from(zero_base))
            .any(|&l| l == ZERO)
        {
            return None;
        }
        let p = |name: &str| node.params.get(name);
        let line = match node.method {
            "soup" => w.merge("n_average", &args[0], &[]),
            "subtract" => w.merge("subtract", &[args[0][0], args[1][0]], &[]),
            "weighted_sum" | "add" | "slerp" => {
                if node.method == "slerp"
                    && p("variant").is_some_and(|v| *v != ParamValue::Text("sd_mecha".into()))
                {
                    return None;
                }
                let default = ParamValue::Number(default_of(node.method, "alpha"));
                let alpha = param_line(&mut w, p("alpha").unwrap_or(&default))?;
                let method = if node.method == "add" {
                    "add_difference"
                } else {
                    node.method
                };
                w.merge(method, &[args[0][0], args[1][0]], &[("alpha", alpha)])
            }
            m if super::dialect::by_method(m).is_some() => {
                let direct = super::dialect::by_method(m).expect("checked");
                let kw: Vec<(&str, usize)> = direct
                    .write(m, &node.params)
                    .into_iter()
                    .map(|(k, v)| (k, w.scalar(v)))
                    .collect();
                // A slot left empty (a prepared re-basin's used-up reference) has no form here; a
                // list slot (`clamp`'s bounds) gives each of its inputs.
                if args.iter().any(|a| a.is_empty()) {
                    return None;
                }
                let inputs: Vec<usize> = args.concat();
                w.merge(direct.name, &inputs, &kw)
            }
            // sd-mecha's Python wrapper `add_perpendicular`, as the methods it builds.
            "add_perpendicular" => {
                let (a, b, c) = (args[0][0], args[1][0], args[2][0]);
                let da = w.merge("subtract", &[a, c], &[]);
                let db = w.merge("subtract", &[b, c], &[]);
                let perp = w.merge("perpendicular_component", &[da, db], &[]);
                let default = ParamValue::Number(default_of("add_perpendicular", "alpha"));
                let alpha = param_line(&mut w, p("alpha").unwrap_or(&default))?;
                w.merge("add_difference", &[a, perp], &[("alpha", alpha)])
            }
            "geometric_median" => {
                let mut kw = Vec::new();
                for (k, d) in crate::methods::gram::geometric_median::Weiszfeld::DEFAULT.params() {
                    let v = p(k).cloned().unwrap_or(ParamValue::Number(d));
                    let v = match (k, v) {
                        ("maxiter", ParamValue::Number(x)) => w.scalar(Value::Int(x as i64)),
                        (_, v) => param_line(&mut w, &v)?,
                    };
                    kw.push((k, v));
                }
                w.merge("geometric_median", &args[0], &kw)
            }
            "fallback" => w.merge("fallback", &[args[0][0], args[1][0]], &[]),
            // sd-mecha's wrapper `copy_region` with its c, as the methods it builds there.
            "copy_region" => {
                let (a, b, c) = (args[0][0], args[1][0], args[2][0]);
                let da = w.merge("subtract", &[a, c], &[]);
                let db = w.merge("subtract", &[b, c], &[]);
                let num = |k: &str| match p(k) {
                    Some(ParamValue::Number(x)) => *x,
                    _ => default_of("copy_region", k),
                };
                let top_k = matches!(p("top_k"), Some(ParamValue::Bool(true)));
                let width = w.scalar(Value::Float(num("width")));
                let offset = w.scalar(Value::Float(num("offset")));
                let method = if top_k {
                    "top_k_tensor_sum"
                } else {
                    "tensor_sum"
                };
                let res = w.merge(method, &[da, db], &[("width", width), ("offset", offset)]);
                let one = w.scalar(Value::Float(1.0));
                w.merge("add_difference", &[c, res], &[("alpha", one)])
            }
            _ if delta_method => {
                let base = args[0][0];
                let mut deltas: Vec<usize> = if zero_base {
                    args[1].clone()
                } else {
                    args[1]
                        .iter()
                        .map(|&m| w.merge("subtract", &[m, base], &[]))
                        .collect()
                };
                let (method, kw, alpha): (&str, Vec<(&str, usize)>, f64) = match node.method {
                    "model_stock" | "n_model_stock" => {
                        // A parameter left out has its declared default (n_model_stock's are
                        // sd-mecha's).
                        let text = |k: &str| {
                            p(k).and_then(|v| match v {
                                ParamValue::Text(t) => Some(t.as_str()),
                                _ => None,
                            })
                            .or_else(|| {
                                crate::methods::info(node.method)
                                    .ok()?
                                    .params
                                    .iter()
                                    .find(|x| x.name == k)
                                    .and_then(|x| match x.kind {
                                        crate::method::ParamKind::Choice { default, .. } => {
                                            Some(default)
                                        }
                                        _ => None,
                                    })
                            })
                        };
                        if text("pairs") != Some("adjacent") || text("unit") != Some("row") {
                            return None;
                        }
                        let default = ParamValue::Number(default_of("model_stock", "cos_eps"));
                        let cos = param_line(&mut w, p("cos_eps").unwrap_or(&default))?;
                        ("model_stock", vec![("cos_eps", cos)], 1.0)
                    }
                    "dropout" => {
                        let num = |k: &str| match p(k) {
                            Some(ParamValue::Number(x)) => *x,
                            _ => default_of("dropout", k),
                        };
                        let prob = w.scalar(Value::Float(num("p")));
                        let rescale = w.scalar(Value::Float(num("rescale")));
                        let one = w.scalar(Value::Float(1.0));
                        let zero = w.scalar(Value::Float(0.0));
                        let s = w.scalar(Value::Int(seed as i64));
                        (
                            "dropout",
                            vec![
                                ("probability", prob),
                                ("rescale", rescale),
                                ("overlap", one),
                                ("overlap_emphasis", zero),
                                ("seed", s),
                            ],
                            num("lambda"),
                        )
                    }
                    name => {
                        let pipeline = Pipeline::named(
                            name,
                            crate::method::Params::new(
                                name,
                                crate::method::params_for_block(&node.params, None),
                            ),
                        )?
                        .ok()?;
                        if node.has_block_params() {
                            return None;
                        }
                        let c = *pipeline.config();
                        // sd-mecha has no sign tie rule, election-less TIES, agreement, other
                        // trims or weights.
                        if c.sign_tie != SignTie::Zero
                            || c.election == Election::None
                            || c.agreement.is_some()
                            || c.trim != Trim::Threshold
                            || !pipeline.unit_weights()
                        {
                            return None;
                        }
                        let (prob, eps) = match c.drop {
                            Drop::None => (0.0, 0.0),
                            Drop::Dare { p } => (p, 0.0),
                            Drop::Della(d)
                                if d.rank == crate::methods::delta::della::Rank::Tensor
                                    && d.eps != 0.0 =>
                            {
                                (d.p, d.eps)
                            }
                            Drop::Della(_) => return None,
                        };
                        let rescale = match c.rescale {
                            Rescale::None => false,
                            Rescale::InverseKeep => true,
                            _ => return None,
                        };
                        let (median, weiszfeld) = match c.fuse {
                            Fuse::DisjointMean => (false, None),
                            Fuse::GeometricMedian(wz) => (true, Some(wz)),
                            _ => return None,
                        };
                        if c.base_point {
                            if zero_base {
                                return None;
                            }
                            deltas.push(w.merge("subtract", &[base, base], &[]));
                        }
                        let wz = weiszfeld
                            .unwrap_or(crate::methods::gram::geometric_median::Weiszfeld::DEFAULT);
                        // sd-mecha has the adjacent rows' factor only.
                        let stock = match c.stock {
                            Stock::None => None,
                            Stock::AdjacentRows(cos_eps) => Some(cos_eps),
                            Stock::PositivePairs => return None,
                        };
                        let kw = vec![
                            ("probability", w.scalar(Value::Float(prob))),
                            ("della_eps", w.scalar(Value::Float(eps))),
                            ("rescale", w.scalar(Value::Bool(rescale))),
                            ("k", w.scalar(Value::Float(c.k))),
                            (
                                "vote_sgn",
                                w.scalar(Value::Bool(c.election == Election::Mass)),
                            ),
                            // sd-mecha's inverted flag: true is the plain mean.
                            ("apply_stock", w.scalar(Value::Bool(stock.is_none()))),
                            (
                                "cos_eps",
                                w.scalar(Value::Float(stock.unwrap_or_else(|| {
                                    super::dialect::by_name("ties_sum_with_dropout")
                                        .expect("declared")
                                        .default("cos_eps")
                                }))),
                            ),
                            ("apply_median", w.scalar(Value::Bool(median))),
                            ("eps", w.scalar(Value::Float(wz.eps))),
                            ("maxiter", w.scalar(Value::Int(wz.maxiter as i64))),
                            ("ftol", w.scalar(Value::Float(wz.ftol))),
                            ("seed", w.scalar(Value::Int(seed as i64))),
                        ];
                        ("ties_sum_with_dropout", kw, c.lambda)
                    }
                };
                let merged = w.merge(method, &deltas, &kw);
                if zero_base {
                    // The delta itself (sd-mecha has no scaling here).
                    if alpha != 1.0 {
                        return None;
                    }
                    merged
                } else {
                    let a = w.scalar(Value::Float(alpha));
                    w.merge("add_difference", &[base, merged], &[("alpha", a)])
                }
            }
            _ => return None,
        };
        node_line.push(line);
    }
    let mut out = match graph.output {
        Ref::Model(m) => model_line[m],
        Ref::Node(n) => node_line[n],
    };
    for (component, source) in &graph.components {
        let src = match *source {
            Ref::Model(m) => model_line[m],
            Ref::Node(n) => node_line[n],
        };
        let c = w.scalar(Value::Str(component.clone()));
        let picked = w.merge("pick_component", &[src, c], &[]);
        out = w.merge("fallback", &[picked, out], &[]);
    }
    // sd-mecha has no pruned-model repair.
    if graph.repair.is_some() {
        return None;
    }
    // The result must be the last line.
    if out != w.lines.len() - 1 {
        return None;
    }
    Some(format!("{VERSION_LINE}\n{}", w.lines.join("\n")))
}

/// amalgam's methods of a base and models written as sd-mecha's methods over deltas (the
/// models minus the base, or the deltas a zero base was given by the translation), their result
/// added to the base.
const DELTA_METHODS: &[&str] = &[
    "model_stock",
    "n_model_stock",
    "dropout",
    "ties",
    "ties_soup",
    "dare",
    "della",
    "tsd",
    "tgmd",
    "dgmla",
];

/// The declared default of number parameter `name` of `method` (see [`crate::method::ParamInfo`]).
fn default_of(method: &str, name: &str) -> f64 {
    crate::methods::info(method)
        .ok()
        .and_then(|i| i.params.iter().find(|p| p.name == name))
        .and_then(|p| match p.kind {
            crate::method::ParamKind::Number { default, .. } => default,
            _ => None,
        })
        .unwrap_or_else(|| panic!("`{method}` declares a number `{name}` with a default"))
}
