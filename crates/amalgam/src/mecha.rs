//! sd-mecha's `.mecha` recipe text format (version 0.1.0): parsing.
//!
//! A recipe is a version line, then one command per line; each command's result can be referred
//! to by later lines as `&N` (N counts the commands from 0, comments excluded), and the last
//! command is the recipe:
//!
//! ```text
//! version 0.1.0
//! model "base.safetensors" model_config=null merge_space="weight"
//! dict key=0.5
//! literal &1 model_config="singleton-mecha" merge_space=null
//! merge "weighted_sum" &0 &0 alpha=&2
//! ```
//!
//! The parser accepts what sd-mecha writes and more: blank lines, a trailing newline, comment
//! lines (`#`), `inf` and `nan`. Errors name the file, the line and the token.

use crate::error::{Error, Result};

/// A value in a command.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    /// The result of command number `N` (`&N`).
    Ref(usize),
}

/// One argument: positional (`name` is `None`) or keyword.
#[derive(Clone, Debug, PartialEq)]
pub struct Arg {
    pub name: Option<String>,
    pub value: Value,
}

/// What a command line does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `dict k=v ...`: a mapping (literal contents, per-block values).
    Dict,
    /// `literal &D model_config=... merge_space=...`: a literal node over a dict.
    Literal,
    /// `model "path" model_config=... merge_space=...`: a model file.
    Model,
    /// `merge "method" args...`: a merge-method call.
    Merge,
}

/// One command of a recipe.
#[derive(Clone, Debug, PartialEq)]
pub struct Command {
    pub kind: Kind,
    pub args: Vec<Arg>,
    /// The line of the file it is on (1 = the version line).
    pub line: usize,
}

impl Command {
    /// The positional arguments.
    pub fn positional(&self) -> impl Iterator<Item = &Value> {
        self.args
            .iter()
            .filter(|a| a.name.is_none())
            .map(|a| &a.value)
    }
    /// The keyword argument `name`.
    pub fn keyword(&self, name: &str) -> Option<&Value> {
        self.args
            .iter()
            .find(|a| a.name.as_deref() == Some(name))
            .map(|a| &a.value)
    }
}

/// A parsed recipe: its commands in order; the last is the result.
#[derive(Clone, Debug, PartialEq)]
pub struct Recipe {
    pub commands: Vec<Command>,
}

/// The version line sd-mecha writes and reads.
pub const VERSION_LINE: &str = "version 0.1.0";

fn err(origin: &str, line: usize, message: String) -> Error {
    Error::Recipe {
        origin: format!("{origin}:{line}"),
        message,
    }
}

/// Parses a `.mecha` recipe; `origin` names it in errors (e.g. its path).
pub fn parse(text: &str, origin: &str) -> Result<Recipe> {
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim()));
    let first = lines
        .by_ref()
        .find(|(_, l)| !l.is_empty() && !l.starts_with('#'));
    match first {
        Some((_, l)) if l == VERSION_LINE => {}
        Some((n, l)) => {
            return Err(err(
                origin,
                n,
                format!("expected the version line `{VERSION_LINE}`, found `{l}`"),
            ))
        }
        None => return Err(err(origin, 1, "empty recipe".into())),
    }
    let mut commands: Vec<Command> = Vec::new();
    for (n, line) in lines {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let tokens = tokenize(line).map_err(|m| err(origin, n, m))?;
        let (head, rest) = tokens.split_first().expect("a non-empty line has a token");
        let kind = match head.text.as_str() {
            "dict" => Kind::Dict,
            "literal" => Kind::Literal,
            "model" => Kind::Model,
            "merge" => Kind::Merge,
            other => {
                return Err(err(
                    origin,
                    n,
                    format!("unknown command `{other}` (expected dict, literal, model or merge)"),
                ))
            }
        };
        let mut args = Vec::with_capacity(rest.len());
        for t in rest {
            let (name, value) = match t.keyword_split() {
                Some((k, v)) => (Some(k.to_string()), v),
                None => (None, t.text.as_str()),
            };
            let value = parse_value(value, commands.len())
                .map_err(|m| err(origin, n, format!("token `{}`: {m}", t.text)))?;
            args.push(Arg { name, value });
        }
        check_shape(kind, &args).map_err(|m| err(origin, n, m))?;
        commands.push(Command {
            kind,
            args,
            line: n,
        });
    }
    if commands.is_empty() {
        return Err(err(origin, 1, "no commands after the version line".into()));
    }
    Ok(Recipe { commands })
}

/// The arguments each command needs.
fn check_shape(kind: Kind, args: &[Arg]) -> std::result::Result<(), String> {
    let first = args.iter().find(|a| a.name.is_none()).map(|a| &a.value);
    match (kind, first) {
        (Kind::Model, Some(Value::Str(_))) | (Kind::Merge, Some(Value::Str(_))) => Ok(()),
        (Kind::Model, _) => Err("`model` needs the model's path as a quoted string".into()),
        (Kind::Merge, _) => Err("`merge` needs the method's name as a quoted string".into()),
        (Kind::Literal, Some(Value::Ref(_))) => Ok(()),
        (Kind::Literal, _) => Err("`literal` needs a reference to a dict (`&N`)".into()),
        (Kind::Dict, _) => Ok(()),
    }
}

/// A token and whether (where) a quote opened in it.
struct Token {
    text: String,
    /// Byte position of the first quote in `text`, if any.
    quote_at: Option<usize>,
}

impl Token {
    /// `name=value` when the token has a `=` before any quote (so a quoted positional string
    /// containing `=` stays positional, unlike in sd-mecha).
    fn keyword_split(&self) -> Option<(&str, &str)> {
        let eq = self.text.find('=')?;
        if self.quote_at.is_some_and(|q| q < eq) {
            return None;
        }
        let (k, v) = self.text.split_at(eq);
        Some((k, &v[1..]))
    }
}

/// Splits a line into tokens at spaces outside quotes; a backslash escapes the next character.
/// Quotes stay in the token text, so that values can tell strings from other tokens.
fn tokenize(line: &str) -> std::result::Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut cur = String::new();
    let mut quote_at = None;
    let mut in_quote = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e) => cur.push(e),
                None => return Err("a backslash ends the line".into()),
            },
            '"' => {
                if !in_quote && quote_at.is_none() {
                    quote_at = Some(cur.len());
                }
                in_quote = !in_quote;
                cur.push('"');
            }
            c if c.is_whitespace() && !in_quote => {
                if !cur.is_empty() {
                    tokens.push(Token {
                        text: std::mem::take(&mut cur),
                        quote_at: quote_at.take(),
                    });
                }
            }
            c => cur.push(c),
        }
    }
    if in_quote {
        return Err(format!("unterminated quote in `{cur}`"));
    }
    if !cur.is_empty() {
        tokens.push(Token {
            text: cur,
            quote_at,
        });
    }
    Ok(tokens)
}

/// A value token; `defined` is the number of commands before this line.
fn parse_value(t: &str, defined: usize) -> std::result::Result<Value, String> {
    if t.len() >= 2 && t.starts_with('"') && t.ends_with('"') {
        return Ok(Value::Str(t[1..t.len() - 1].to_string()));
    }
    match t {
        "null" => return Ok(Value::Null),
        "true" => return Ok(Value::Bool(true)),
        "false" => return Ok(Value::Bool(false)),
        _ => {}
    }
    if let Some(r) = t.strip_prefix('&') {
        let n: usize = r
            .parse()
            .map_err(|_| "a reference is `&` and a command number".to_string())?;
        if n >= defined {
            return Err(format!(
                "refers to command {n}, but only {defined} command(s) come before it (numbered from 0)"
            ));
        }
        return Ok(Value::Ref(n));
    }
    let numeric = !t.contains(['.', 'e', 'E']) || t.eq_ignore_ascii_case("inf");
    if numeric {
        if let Ok(i) = t.parse::<i64>() {
            return Ok(Value::Int(i));
        }
    }
    t.parse::<f64>()
        .map(Value::Float)
        .map_err(|_| "not a value (null, true, false, &N, a quoted string or a number)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_values_and_keywords() {
        let r = parse(
            "version 0.1.0\n\
             model \"a b.safetensors\" model_config=null merge_space=\"weight\"\n\
             # a comment\n\
             \n\
             dict key=-1e-06 IN00=2 s=\"x=y\" q=\"say \\\"hi\\\"\" big=inf n=nan\n\
             merge \"weighted_sum\" &0 &0 \"k=v\" alpha=&1\n",
            "t.mecha",
        )
        .unwrap();
        assert_eq!(r.commands.len(), 3);
        let m = &r.commands[0];
        assert_eq!(m.kind, Kind::Model);
        assert_eq!(m.line, 2);
        assert_eq!(
            m.positional().next(),
            Some(&Value::Str("a b.safetensors".into()))
        );
        assert_eq!(m.keyword("model_config"), Some(&Value::Null));
        assert_eq!(m.keyword("merge_space"), Some(&Value::Str("weight".into())));
        let d = &r.commands[1];
        assert_eq!(d.line, 5);
        assert_eq!(d.keyword("key"), Some(&Value::Float(-1e-6)));
        assert_eq!(d.keyword("IN00"), Some(&Value::Int(2)));
        assert_eq!(d.keyword("s"), Some(&Value::Str("x=y".into())));
        assert_eq!(d.keyword("q"), Some(&Value::Str("say \"hi\"".into())));
        assert_eq!(d.keyword("big"), Some(&Value::Float(f64::INFINITY)));
        assert!(matches!(d.keyword("n"), Some(Value::Float(x)) if x.is_nan()));
        let g = &r.commands[2];
        let pos: Vec<&Value> = g.positional().collect();
        // A quoted positional string with `=` stays positional.
        assert_eq!(
            pos,
            [
                &Value::Str("weighted_sum".into()),
                &Value::Ref(0),
                &Value::Ref(0),
                &Value::Str("k=v".into())
            ]
        );
        assert_eq!(g.keyword("alpha"), Some(&Value::Ref(1)));
    }

    #[test]
    fn errors_name_the_line_and_the_token() {
        let e = |text: &str| parse(text, "r.mecha").unwrap_err().to_string();
        let m = e("version 0.2.0\nmodel \"a\"");
        assert!(
            m.contains("r.mecha:1") && m.contains("`version 0.2.0`"),
            "{m}"
        );
        let m = e("version 0.1.0\nmodel \"a\"\nmerge \"n_average\" &0 &99");
        assert!(
            m.contains("r.mecha:3") && m.contains("`&99`") && m.contains("command 99"),
            "{m}"
        );
        let m = e("version 0.1.0\nmodel \"a.safetensors");
        assert!(
            m.contains("r.mecha:2") && m.contains("unterminated quote"),
            "{m}"
        );
        let m = e("version 0.1.0\nmodel \"a\"\nblend &0");
        assert!(
            m.contains("r.mecha:3") && m.contains("unknown command `blend`"),
            "{m}"
        );
        let m = e("version 0.1.0\nmerge n_average &0");
        assert!(
            m.contains("r.mecha:2") && m.contains("quoted string"),
            "{m}"
        );
        let m = e("version 0.1.0\ndict key=0.5x");
        assert!(m.contains("token `key=0.5x`"), "{m}");
        let m = e("version 0.1.0\n");
        assert!(m.contains("no commands"), "{m}");
    }
}

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
    Tensors(crate::graph::Ref),
    /// `pick_component(model, component)`: the model's keys of one component.
    Component(crate::graph::Ref, String),
    /// `omit_component(model, component)`: the model's keys of the other components.
    Omitted(crate::graph::Ref, String),
}

/// The sd-mecha methods amalgam runs, as they appear in `.mecha` files.
pub const SUPPORTED: &[&str] = &[
    "n_average",
    "weighted_sum",
    "slerp",
    "subtract",
    "add_difference",
    "ties_sum",
    "ties_sum_extended",
    "ties_sum_with_dropout",
    "model_stock",
    "geometric_median",
    "dropout",
    "fallback",
    "pick_component",
    "omit_component",
    "cast",
    "convert_singleton",
    "convert_sdxl_blocks_to_sgm",
    "convert_sd1_blocks_to_ldm",
];

/// A recipe translated into an amalgam graph, and the seed it asks for.
pub struct Translated {
    pub graph: crate::graph::Graph,
    pub seed: Option<u64>,
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
    use crate::graph::{Graph, ModelInput, Node, Ref};
    use crate::method::ParamValue;
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
        return Err(e(
            *line,
            format!(
                "method `{m}` is not supported (amalgam runs: {})",
                SUPPORTED.join(", ")
            ),
        ));
    }
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
                // `--rename old=new`: a whole path or a file name.
                let renamed = renames.iter().find_map(|(old, new)| {
                    let name = std::path::Path::new(p).file_name()?.to_str()?;
                    (p == old || name == old).then(|| {
                        if p == old {
                            new.clone()
                        } else {
                            p[..p.len() - name.len()].to_string() + new
                        }
                    })
                });
                let p = renamed.as_ref().unwrap_or(p);
                let path = std::path::Path::new(p);
                let mut tried = Vec::new();
                let candidates: Vec<std::path::PathBuf> = if path.is_absolute() {
                    std::iter::once(path.to_path_buf())
                        .chain(
                            model_dirs
                                .iter()
                                .filter_map(|d| path.file_name().map(|f| d.join(f))),
                        )
                        .collect()
                } else {
                    model_dirs
                        .iter()
                        .map(|d| d.join(path))
                        .chain(std::iter::once(dir.join(path)))
                        .collect()
                };
                let found = candidates.iter().find(|c| {
                    tried.push(c.display().to_string());
                    c.is_file()
                });
                let resolved = match found {
                    Some(f) => f.clone(),
                    None => {
                        missing.push(format!("{p} (line {}; tried {})", c.line, tried.join(", ")));
                        candidates.last().cloned().unwrap_or_default()
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
                            (x, y) => {
                                return Err(e(
                                    c.line,
                                    format!("`fallback` of {x:?} and {y:?} is not supported (supported: a component with a merge, block values with a default)"),
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
                    | "dropout" => {
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
                            for (k, d) in [("eps", 1e-6), ("maxiter", 100.0), ("ftol", 1e-20)] {
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
                                if let Some(ParamValue::Number(s)) = get("seed")? {
                                    if seed.is_some_and(|x| x != s as u64) {
                                        return Err(e(
                                            c.line,
                                            "the recipe uses several seeds; amalgam runs with one"
                                                .into(),
                                        ));
                                    }
                                    seed = Some(s as u64);
                                }
                                node("dropout", vec![vec![zero], ms], params)
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
                                    if flag("apply_median", false)? {
                                        set("fuse", ParamValue::Text("geometric_median".into()));
                                        for (k, d) in
                                            [("eps", 1e-6), ("maxiter", 100.0), ("ftol", 1e-20)]
                                        {
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
                                    if let Some(ParamValue::Number(s)) = get("seed")? {
                                        if seed.is_some_and(|x| x != s as u64) {
                                            return Err(e(c.line, "the recipe uses several seeds; amalgam runs with one".into()));
                                        }
                                        seed = Some(s as u64);
                                    }
                                }
                                node("ties", vec![vec![zero], ms], params)
                            }
                        }
                    }
                    other => unreachable!("{other} is in SUPPORTED"),
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
    Ok(Translated { graph, seed })
}

/// Reads and translates a `.mecha` file.
pub fn load(path: &std::path::Path, model_dirs: &[std::path::PathBuf]) -> Result<Translated> {
    load_with(path, model_dirs, &[])
}

/// [`load`], with model paths or file names renamed first (`(old, new)` pairs).
pub fn load_with(
    path: &std::path::Path,
    model_dirs: &[std::path::PathBuf],
    renames: &[(String, String)],
) -> Result<Translated> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let origin = path.display().to_string();
    let recipe = parse(&text, &origin)?;
    translate(
        &recipe,
        &origin,
        path.parent().unwrap_or(std::path::Path::new(".")),
        model_dirs,
        renames,
    )
}

/// Writes `graph` as a `.mecha` recipe, the way sd-mecha does (scalars as `convert_singleton`
/// literals, deltas as `subtract` nodes, identical lines written once), or `None` when it uses
/// something sd-mecha cannot express (a method or option it lacks). `layouts` gives each model's
/// `model_config`; `arch` decides the block conversions of per-block parameters.
pub fn to_mecha(
    graph: &crate::graph::Graph,
    layouts: &[Option<crate::arch::Layout>],
    arch: Option<crate::arch::Arch>,
    seed: u64,
) -> Option<String> {
    use crate::graph::Ref;
    use crate::method::ParamValue;
    use crate::methods::ties::{Drop, Election, Fuse, Pipeline, Rescale, SignTie};

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
                    crate::arch::Arch::Sdxl => {
                        ("sdxl-supermerger_blocks", "convert_sdxl_blocks_to_sgm")
                    }
                    crate::arch::Arch::Sd1 => {
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
    let mut node_line: Vec<usize> = Vec::new();
    for node in &graph.nodes {
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
                let default = if node.method == "add" { 1.0 } else { 0.5 };
                let alpha = param_line(&mut w, p("alpha").unwrap_or(&ParamValue::Number(default)))?;
                let method = if node.method == "add" {
                    "add_difference"
                } else {
                    node.method
                };
                w.merge(method, &[args[0][0], args[1][0]], &[("alpha", alpha)])
            }
            "geometric_median" => {
                let mut kw = Vec::new();
                for (k, d) in [("eps", 1e-6), ("maxiter", 100.0), ("ftol", 1e-20)] {
                    let v = p(k).cloned().unwrap_or(ParamValue::Number(d));
                    let v = match (k, v) {
                        ("maxiter", ParamValue::Number(x)) => w.scalar(Value::Int(x as i64)),
                        (_, v) => param_line(&mut w, &v)?,
                    };
                    kw.push((k, v));
                }
                w.merge("geometric_median", &args[0], &kw)
            }
            "model_stock" | "dropout" | "ties" | "ties_soup" | "dare" | "della" | "tsd"
            | "tgmd" | "dgmla" => {
                let base = args[0][0];
                let mut deltas: Vec<usize> = args[1]
                    .iter()
                    .map(|&m| w.merge("subtract", &[m, base], &[]))
                    .collect();
                let (method, kw, alpha): (&str, Vec<(&str, usize)>, f64) = match node.method {
                    "model_stock" => {
                        let text = |k: &str| {
                            p(k).and_then(|v| match v {
                                ParamValue::Text(t) => Some(t.as_str()),
                                _ => None,
                            })
                        };
                        if text("pairs") != Some("adjacent") || text("unit") != Some("row") {
                            return None;
                        }
                        let cos =
                            param_line(&mut w, p("cos_eps").unwrap_or(&ParamValue::Number(1e-6)))?;
                        ("model_stock", vec![("cos_eps", cos)], 1.0)
                    }
                    "dropout" => {
                        let num = |k: &str, d: f64| match p(k) {
                            Some(ParamValue::Number(x)) => *x,
                            _ => d,
                        };
                        let prob = w.scalar(Value::Float(num("p", 0.9)));
                        let rescale = w.scalar(Value::Float(num("rescale", 1.0)));
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
                            num("lambda", 1.0),
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
                        if c.sign_tie != SignTie::Zero || c.election == Election::None {
                            return None;
                        }
                        let (prob, eps) = match c.drop {
                            Drop::None => (0.0, 0.0),
                            Drop::Dare { p } => (p, 0.0),
                            Drop::Della(d)
                                if d.rank == crate::methods::della::Rank::Tensor
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
                            deltas.push(w.merge("subtract", &[base, base], &[]));
                        }
                        let wz = weiszfeld.unwrap_or(crate::methods::geometric_median::Weiszfeld {
                            eps: 1e-6,
                            maxiter: 100,
                            ftol: 1e-20,
                        });
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
                            ("apply_stock", w.scalar(Value::Bool(c.stock.is_none()))),
                            ("cos_eps", w.scalar(Value::Float(c.stock.unwrap_or(1e-6)))),
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
                let a = w.scalar(Value::Float(alpha));
                w.merge("add_difference", &[base, merged], &[("alpha", a)])
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
