//! A graph written as a self-contained TOML recipe.

use super::*;

/// Writes `graph` as a self-contained recipe (every model listed with its path), the form stored
/// in outputs' `__metadata__["amalgam_recipe"]`.
pub fn to_toml(graph: &Graph, settings: &RecipeSettings) -> String {
    use toml::Value;
    let quote = |s: &str| Value::String(s.to_string()).to_string();
    let model_key = |i: usize| graph.models[i].name.clone();
    let node_key = |i: usize| graph.nodes[i].name.clone();
    let name_of = |r: &Ref| match r {
        Ref::Model(m) => model_key(*m),
        Ref::Node(n) => node_key(*n),
    };
    let mut s = String::from("# amalgam recipe\n[models]\n");
    for (i, m) in graph.models.iter().enumerate() {
        let path = std::fs::canonicalize(&m.path).unwrap_or_else(|_| m.path.clone());
        s += &format!(
            "{} = {}\n",
            quote(&model_key(i)),
            quote(&path.to_string_lossy())
        );
    }
    for (i, n) in graph.nodes.iter().enumerate() {
        s += &format!(
            "\n[nodes.{}]\nmethod = {}\n",
            quote(&node_key(i)),
            quote(n.method)
        );
        let info = methods::info(n.method).expect("registered");
        for (slot, refs) in info.slots.iter().zip(&n.slots) {
            let names: Vec<String> = refs.iter().map(|r| quote(&name_of(r))).collect();
            match slot.kind {
                SlotKind::One => s += &format!("{} = {}\n", slot.name, names[0]),
                SlotKind::Many => s += &format!("{} = [{}]\n", slot.name, names.join(", ")),
            }
        }
        for (k, v) in &n.params {
            let value = match v {
                ParamValue::Bool(b) => b.to_string(),
                ParamValue::Number(x) => Value::Float(*x).to_string(),
                ParamValue::List(xs) => format!(
                    "[{}]",
                    xs.iter()
                        .map(|x| Value::Float(*x).to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                ParamValue::Text(t) => quote(t),
                ParamValue::Blocks(map) => format!(
                    "{{ {} }}",
                    map.iter()
                        .map(|(b, x)| format!("{} = {}", quote(b), Value::Float(*x)))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            s += &format!("{} = {value}\n", quote(k));
        }
    }
    s += &format!("\n[output]\nnode = {}\n", quote(&name_of(&graph.output)));
    if let Some(f) = graph.fallback {
        s += &format!("fallback = {}\n", quote(&model_key(f)));
    }
    if let Some(r) = graph.repair {
        s += &format!("repair = {}\n", quote(&model_key(r)));
    }
    if let Some(d) = settings.dtype {
        s += &format!("dtype = {}\n", quote(d.name()));
    }
    if let Some(d) = settings.compute_dtype {
        s += &format!("compute_dtype = {}\n", quote(d.name()));
    }
    if let Some(l) = settings.layout {
        s += &format!("layout = {}\n", quote(l.name()));
    }
    if let Some(seed) = settings.seed {
        s += &format!("seed = {seed}\n");
    }
    // The default is left out, so that recipes stay short.
    if let Some(p) = settings.non_finite.filter(|p| *p != Default::default()) {
        s += &format!("non_finite = {}\n", quote(p.name()));
    }
    if !graph.components.is_empty() {
        s += "\n[output.components]\n";
        for (c, r) in &graph.components {
            s += &format!("{} = {}\n", quote(c), quote(&name_of(r)));
        }
    }
    s
}
