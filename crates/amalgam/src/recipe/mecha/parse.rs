//! The `.mecha` text: lines, tokens and values.

use super::err;
use crate::error::Result;

/// A value in a command.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string.
    Str(String),
    /// The result of command number `N` (`&N`).
    Ref(usize),
}

/// One argument: positional (`name` is `None`) or keyword.
#[derive(Clone, Debug, PartialEq)]
pub struct Arg {
    /// The argument's name, for a keyword argument.
    pub name: Option<String>,
    /// Its value.
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
    /// What the line does.
    pub kind: Kind,
    /// Its arguments.
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
    /// The recipe's lines, in order.
    pub commands: Vec<Command>,
}

/// The version line sd-mecha writes and reads.
pub const VERSION_LINE: &str = "version 0.1.0";

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
