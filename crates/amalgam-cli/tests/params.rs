//! Parameters have a validated domain, checked before any tensor is read: the error names the
//! node, the parameter and the allowed values, and nothing is written.

mod common;
use common::*;

#[test]
fn non_finite_and_out_of_range_parameters_are_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    synth_sd1(d, 4, &["--components", "clip_l"]);
    let base = d.join("base.safetensors");
    let (a, b) = (d.join("m000.safetensors"), d.join("m001.safetensors"));
    let out = d.join("out.safetensors");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--method", "weighted_sum", "--alpha", "nan"],
            "`alpha` is NaN",
        ),
        (
            &["--method", "weighted_sum", "--alpha", "inf"],
            "`alpha` is inf",
        ),
        (&["--method", "slerp", "--alpha=-inf"], "`alpha` is -inf"),
        (
            &[
                "--method",
                "task_arithmetic",
                "--base",
                s(&base),
                "--lambda",
                "nan",
            ],
            "`lambda` is NaN",
        ),
        (
            &["--method", "linear", "--weights", "nan,1"],
            "`weights` is NaN",
        ),
        (
            &[
                "--method",
                "della",
                "--base",
                s(&base),
                "-p",
                "della_eps=nan",
            ],
            "`della_eps` is NaN",
        ),
        (
            &["--method", "ties", "--base", s(&base), "-p", "k=nan"],
            "`k` is NaN",
        ),
        (
            &["--method", "geometric_median", "-p", "eps=nan"],
            "`eps` is NaN",
        ),
        (
            &["--method", "geometric_median", "-p", "eps=0"],
            "allowed: eps > 0",
        ),
        (&["--method", "karcher", "-p", "tol=-1"], "allowed: tol > 0"),
        (
            &[
                "--method",
                "model_stock",
                "--base",
                s(&base),
                "-p",
                "cos_eps=-1e-6",
            ],
            "allowed: cos_eps >= 0",
        ),
    ];
    for (flags, want) in cases {
        let mut args = vec!["merge"];
        args.extend_from_slice(flags);
        args.extend([s(&a), s(&b), "-o", s(&out)]);
        let e = fails(&args);
        assert!(
            e.contains("node `merge`") && e.contains(want),
            "{flags:?}: {e}"
        );
        assert!(!out.exists());
    }

    // A recipe's per-block value and a .mecha parameter: the same rule.
    let recipe = d.join("r.toml");
    std::fs::write(
        &recipe,
        format!(
            "[models]\na = {:?}\nb = {:?}\n[nodes.w]\nmethod = \"weighted_sum\"\na = \"a\"\nb = \"b\"\n\
             alpha = {{ default = 0.5, IN00 = nan }}\n[output]\nnode = \"w\"\n",
            s(&a),
            s(&b)
        ),
    )
    .unwrap();
    let e = fails(&["merge", s(&recipe), "-o", s(&out)]);
    assert!(
        e.contains("node `w`") && e.contains("`alpha` is NaN"),
        "{e}"
    );

    let tgmd = include_str!("../../amalgam/tests/fixtures/mecha/tgmd.mecha");
    let bad = tgmd.replacen("dict key=0.1", "dict key=nan", 1);
    assert_ne!(bad, tgmd);
    let mecha = d.join("r.mecha");
    std::fs::write(&mecha, bad).unwrap();
    let e = fails(&["merge", s(&mecha), "--model-dir", s(d), "-o", s(&out)]);
    assert!(
        e.contains("`probability` is NaN") && e.contains("r.mecha"),
        "{e}"
    );
    assert!(!out.exists());
}
