//! The `.mecha` recipes sd-mecha 1.1.8 writes (`tests/fixtures/mecha/`, copied from the project's
//! spec examples) parse, with the structure they have.

use amalgam::mecha::{parse, Kind, Value};
use std::path::Path;

fn example(name: &str) -> amalgam::mecha::Recipe {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mecha")
        .join(name);
    parse(
        &std::fs::read_to_string(&p).unwrap(),
        &p.display().to_string(),
    )
    .unwrap()
}

#[test]
fn every_example_recipe_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mecha");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let text = std::fs::read_to_string(&p).unwrap();
        let r = parse(&text, &p.display().to_string()).unwrap();
        // The result is the last command, a merge; every model names a file.
        assert_eq!(
            r.commands.last().unwrap().kind,
            Kind::Merge,
            "{}",
            p.display()
        );
        for c in r.commands.iter().filter(|c| c.kind == Kind::Model) {
            assert!(
                matches!(c.positional().next(), Some(Value::Str(s)) if s.ends_with(".safetensors"))
            );
        }
        // sd-mecha writes no trailing newline; one (and blank lines) are accepted too.
        let relaxed = format!("\n{}\n\n", text.replace('\n', "\n\n"));
        assert_eq!(
            parse(&relaxed, "relaxed").unwrap().commands.len(),
            r.commands.len()
        );
        n += 1;
    }
    assert_eq!(n, 8);
}

#[test]
fn dgmla_recipe_has_the_published_parameters() {
    let r = example("dgmla.mecha");
    let merge = r
        .commands
        .iter()
        .find(|c| {
            c.kind == Kind::Merge
                && c.positional().next() == Some(&Value::Str("ties_sum_with_dropout".into()))
        })
        .unwrap();
    // Keyword values are references to `convert_singleton` merges of `literal`s of `dict`s.
    let scalar = |name: &str| -> Value {
        let Some(Value::Ref(m)) = merge.keyword(name) else {
            panic!("{name}")
        };
        let conv = &r.commands[*m];
        assert_eq!(
            conv.positional().next(),
            Some(&Value::Str("convert_singleton".into()))
        );
        let Some(Value::Ref(l)) = conv.positional().nth(1) else {
            panic!()
        };
        let Some(Value::Ref(d)) = r.commands[*l].positional().next() else {
            panic!()
        };
        r.commands[*d].keyword("key").unwrap().clone()
    };
    assert_eq!(scalar("probability"), Value::Float(0.1));
    assert_eq!(scalar("della_eps"), Value::Float(-0.1));
    // In sd-mecha 1.1.x `vote_sgn = false` is the count vote (the meaning flipped in 0.1.0; the
    // 2024 fork recipes wrote 1.0 for the same vote).
    assert_eq!(scalar("vote_sgn"), Value::Bool(false));
    assert_eq!(scalar("apply_median"), Value::Bool(true));
    assert_eq!(scalar("k"), Value::Float(1.0));
    assert_eq!(scalar("seed"), Value::Int(241011));
    // Five deltas, the last the base minus itself (the zero point of DGMLA).
    let deltas: Vec<&Value> = merge.positional().skip(1).collect();
    assert_eq!(deltas.len(), 5);
    let Value::Ref(z) = deltas[4] else { panic!() };
    let zero: Vec<&Value> = r.commands[*z].positional().collect();
    assert_eq!(
        zero,
        [
            &Value::Str("subtract".into()),
            &Value::Ref(0),
            &Value::Ref(0)
        ]
    );
}
