//! A TOML recipe's values as what they name: the references in an argument, a parameter value
//! (numbers, booleans, option names, lists, per-block tables).

use super::*;

/// The names an argument refers to (a name, or a list of them).
pub(super) fn refs_in(v: &toml::Value) -> Vec<&str> {
    match v {
        toml::Value::String(s) => vec![s.as_str()],
        toml::Value::Array(a) => a.iter().filter_map(|x| x.as_str()).collect(),
        _ => Vec::new(),
    }
}

pub(super) fn to_param(v: &toml::Value) -> std::result::Result<ParamValue, String> {
    if let toml::Value::Table(t) = v {
        return block_param(t);
    }
    simple_param(v).ok_or_else(|| {
        format!(
            "must be a number, a boolean, a string, a list of numbers or a table of per-block values, got {}",
            v.type_str()
        )
    })
}

/// A per-block parameter: `{ IN00 = 0.1, M00 = 0.5, default = 0.3 }`, or a supermerger list
/// `{ list = "0.1,0.2,...", BASE = 0.5 }` (25/26 values for SD1, 19/20 for SDXL).
pub(super) fn block_param(t: &toml::Table) -> std::result::Result<ParamValue, String> {
    let mut map = BTreeMap::new();
    if let Some(list) = t.get("list") {
        let list = list
            .as_str()
            .ok_or("`list` must be a string of comma-separated values")?;
        for (id, v) in crate::layout::arch::expand_block_list(list)? {
            map.insert(id.to_string(), v);
        }
    }
    let known: Vec<&str> = [
        crate::layout::arch::Arch::Sd1,
        crate::layout::arch::Arch::Sdxl,
    ]
    .iter()
    .flat_map(|a| crate::layout::arch::block_ids(*a).unwrap().iter().copied())
    .collect();
    for (k, v) in t {
        if k == "list" {
            continue;
        }
        if k != "default" && !known.contains(&k.as_str()) {
            return Err(format!(
                "`{k}` is not a block id (BASE, IN00..IN11, M00, OUT00..OUT11, VAE, default, list)"
            ));
        }
        let x = match v {
            toml::Value::Integer(i) => *i as f64,
            toml::Value::Float(f) => *f,
            other => {
                return Err(format!(
                    "block `{k}` must be a number, got {}",
                    other.type_str()
                ))
            }
        };
        map.insert(k.clone(), x);
    }
    if map.is_empty() {
        return Err("a per-block table needs block values or a `list`".into());
    }
    Ok(ParamValue::Blocks(map))
}

pub(super) fn simple_param(v: &toml::Value) -> Option<ParamValue> {
    Some(match v {
        toml::Value::Boolean(b) => ParamValue::Bool(*b),
        toml::Value::Integer(i) => ParamValue::Number(*i as f64),
        toml::Value::Float(f) => ParamValue::Number(*f),
        toml::Value::String(s) => ParamValue::Text(s.clone()),
        toml::Value::Array(a) => ParamValue::List(
            a.iter()
                .map(|x| match x {
                    toml::Value::Integer(i) => Some(*i as f64),
                    toml::Value::Float(f) => Some(*f),
                    _ => None,
                })
                .collect::<Option<Vec<f64>>>()?,
        ),
        _ => return None,
    })
}
