//! Re-basin's permutation specs (`layout::perms`): every key of SD1 and SDXL covered as the spec
//! says (which axes, fully, by disjoint windows), for full-size and shrunk shapes; and permuting
//! a group leaves the block's function unchanged (a CLIP MLP and a UNet attention, computed).

mod common;
use amalgam::layout::arch::Layout;
use amalgam::layout::perms::{perm_groups, permute_key, PermGroup, SpecError};
use common::*;
use std::collections::BTreeMap;

/// The axes of `key` the spec permutes, and by which kind of group (`qk`, `vo`, or the MLP's).
fn expected(key: &str) -> Vec<(usize, &'static str)> {
    let ends = |s: &str| key.ends_with(s);
    if ends(".to_q.weight")
        || ends(".to_k.weight")
        || ends(".q_proj.weight")
        || ends(".q_proj.bias")
        || ends(".k_proj.weight")
        || ends(".k_proj.bias")
    {
        vec![(0, "qk")]
    } else if ends(".to_v.weight") || ends(".v_proj.weight") || ends(".v_proj.bias") {
        vec![(0, "vo")]
    } else if ends(".to_out.0.weight") || ends(".self_attn.out_proj.weight") {
        vec![(1, "vo")]
    } else if ends(".attn.in_proj_weight") || ends(".attn.in_proj_bias") {
        vec![(0, "qkvo")]
    } else if ends(".attn.out_proj.weight") {
        vec![(1, "vo")]
    } else if ends(".ff.net.0.proj.weight")
        || ends(".ff.net.0.proj.bias")
        || ends(".mlp.fc1.weight")
        || ends(".mlp.fc1.bias")
        || ends(".mlp.c_fc.weight")
        || ends(".mlp.c_fc.bias")
        || ends(".time_embed.0.weight")
        || ends(".time_embed.0.bias")
        || ends(".label_emb.0.0.weight")
        || ends(".label_emb.0.0.bias")
    {
        vec![(0, "mlp")]
    } else if ends(".ff.net.2.weight")
        || ends(".mlp.fc2.weight")
        || ends(".mlp.c_proj.weight")
        || ends(".time_embed.2.weight")
        || ends(".label_emb.0.2.weight")
    {
        vec![(1, "mlp")]
    } else {
        Vec::new()
    }
}

fn kind(g: &PermGroup) -> &'static str {
    if g.name.contains(" qk head") {
        "qk"
    } else if g.name.contains(" vo head") {
        "vo"
    } else {
        "mlp"
    }
}

/// Checks the groups against the shapes: windows in bounds, disjoint, covering each expected
/// axis whole, and nothing else.
fn check_coverage(layout: Layout, shapes: &BTreeMap<String, Vec<usize>>, groups: &[PermGroup]) {
    // (key, axis) → covered intervals and the kinds that cover them.
    type Spans<'a> = (Vec<(usize, usize)>, Vec<&'a str>);
    let mut cover: BTreeMap<(&str, usize), Spans> = BTreeMap::new();
    for g in groups {
        assert!(g.width > 0, "{}", g.name);
        for w in &g.windows {
            let shape = &shapes[w.key];
            assert!(
                w.offset + g.width <= shape[w.axis],
                "{}: {} axis {} [{}, {}) beyond {:?}",
                g.name,
                w.key,
                w.axis,
                w.offset,
                w.offset + g.width,
                shape
            );
            let e = cover.entry((w.key, w.axis)).or_default();
            e.0.push((w.offset, w.offset + g.width));
            e.1.push(kind(g));
        }
    }
    for (key, shape) in shapes {
        let want = expected(key);
        for (axis, &len) in shape.iter().enumerate() {
            let got = cover.get(&(key.as_str(), axis));
            match want.iter().find(|(a, _)| *a == axis) {
                None => assert!(got.is_none(), "{layout}: `{key}` axis {axis} is permuted"),
                Some(&(_, k)) => {
                    let (mut spans, kinds) = got
                        .unwrap_or_else(|| panic!("{layout}: `{key}` axis {axis} not permuted"))
                        .clone();
                    spans.sort();
                    let mut at = 0;
                    for (a, b) in spans {
                        assert_eq!(a, at, "{layout}: `{key}` axis {axis}: a gap or an overlap");
                        at = b;
                    }
                    assert_eq!(at, len, "{layout}: `{key}` axis {axis} not covered");
                    let ok = |x: &&str| if k == "qkvo" { *x != "mlp" } else { *x == k };
                    assert!(kinds.iter().all(ok), "{layout}: `{key}`: {kinds:?}");
                }
            }
        }
    }
}

fn layout_shapes(layout: Layout) -> BTreeMap<String, Vec<usize>> {
    layout
        .keys()
        .iter()
        .map(|k| (k.key.clone(), k.shape.clone()))
        .collect()
}

#[test]
fn full_size_specs_cover_every_key_as_documented() {
    for layout in [Layout::Sd1Ldm, Layout::SdxlSgm] {
        let shapes = layout_shapes(layout);
        let groups = perm_groups(layout, |k| shapes.get(k).cloned()).unwrap();
        check_coverage(layout, &shapes, &groups);
        let keys: std::collections::BTreeSet<&str> = groups
            .iter()
            .flat_map(|g| g.windows.iter().map(|w| w.key))
            .collect();
        eprintln!("{layout}: {} groups over {} keys", groups.len(), keys.len());
        // Head widths: SD1's UNet 8 heads, SDXL's 64 channels a head, CLIP-L 12, CLIP-G 20.
        let width = |part: &str| {
            groups
                .iter()
                .find(|g| g.name.contains(part))
                .unwrap_or_else(|| panic!("{part}"))
                .width
        };
        match layout {
            Layout::Sd1Ldm => {
                assert_eq!(width("input_blocks.1.1.transformer_blocks.0.attn1 qk"), 40);
                assert_eq!(
                    width("output_blocks.11.1.transformer_blocks.0.attn2 vo"),
                    40
                );
                assert_eq!(width("middle_block.1.transformer_blocks.0.attn1 qk"), 160);
                assert_eq!(width("encoder.layers.0 qk"), 64);
                assert_eq!(width("time_embed"), 1280);
            }
            _ => {
                assert_eq!(width("input_blocks.4.1.transformer_blocks.0.attn1 qk"), 64);
                assert_eq!(width("middle_block.1.transformer_blocks.9.attn2 vo"), 64);
                assert_eq!(
                    width("embedders.0.transformer.text_model.encoder.layers.3 qk"),
                    64
                );
                assert_eq!(width("resblocks.0 qk"), 64);
                assert_eq!(width("resblocks.31 mlp"), 5120);
                assert_eq!(width("label_emb"), 1280);
            }
        }
    }
}

#[test]
fn shrunk_models_keep_the_head_counts() {
    for (layout, shrink) in [(Layout::Sd1Ldm, 8), (Layout::SdxlSgm, 32)] {
        let dir = tempfile::tempdir().unwrap();
        let pool = f32_pool(dir.path(), layout, 0, shrink);
        let file = amalgam::io::input::ModelFile::open(&pool[0]).unwrap();
        let shapes: BTreeMap<String, Vec<usize>> = file
            .tensors()
            .iter()
            .map(|(k, t)| (k.clone(), t.shape.clone()))
            .collect();
        let groups = perm_groups(layout, |k| shapes.get(k).cloned()).unwrap();
        check_coverage(layout, &shapes, &groups);
        let full = perm_groups(layout, |k| layout.get(k).map(|l| l.shape.clone())).unwrap();
        // The same groups as the full-size model's, but for the optional layers the file omits
        // (SDXL's last CLIP layers).
        let present: Vec<&str> = full
            .iter()
            .filter(|g| g.windows.iter().all(|w| shapes.contains_key(w.key)))
            .map(|g| g.name.as_str())
            .collect();
        let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, present, "{layout}");
    }
}

#[test]
fn other_layouts_and_missing_keys_are_errors() {
    let e = perm_groups(Layout::Flux, |_| None).unwrap_err();
    assert_eq!(e, SpecError::Unsupported(Layout::Flux));
    assert!(e.to_string().contains("SD1"), "{e}");
    let shapes = layout_shapes(Layout::Sd1Ldm);
    let gone = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight";
    let e = perm_groups(Layout::Sd1Ldm, |k| {
        (k != gone).then(|| shapes.get(k).cloned()).flatten()
    })
    .unwrap_err();
    assert_eq!(e, SpecError::MissingKey(gone.to_string()));
}

/// `y = W x + b` for a row-major `[rows, cols]` W.
fn affine(w: &[f64], b: Option<&[f64]>, x: &[f64], rows: usize) -> Vec<f64> {
    let cols = x.len();
    (0..rows)
        .map(|r| {
            let dot: f64 = (0..cols).map(|c| w[r * cols + c] * x[c]).sum();
            dot + b.map_or(0.0, |b| b[r])
        })
        .collect()
}

/// A model's f64 tensors by key.
fn tensors(path: &std::path::Path) -> BTreeMap<String, (Vec<usize>, Vec<f64>)> {
    let file = amalgam::io::input::ModelFile::open(path).unwrap();
    file.tensors()
        .iter()
        .filter(|(_, t)| t.float_dtype().is_some())
        .map(|(k, t)| (k.clone(), (t.shape.clone(), read_f64(path, k))))
        .collect()
}

/// Every group permuted by a reversal with a twist (deterministic, not the identity).
fn permuted(
    groups: &[PermGroup],
    model: &BTreeMap<String, (Vec<usize>, Vec<f64>)>,
) -> BTreeMap<String, (Vec<usize>, Vec<f64>)> {
    let mut out = model.clone();
    for g in groups {
        let perm: Vec<usize> = (0..g.width).map(|i| (3 * i + 1) % g.width).collect();
        let perm = if (0..g.width).all(|i| perm.contains(&i)) {
            perm
        } else {
            (0..g.width).rev().collect()
        };
        for w in &g.windows {
            let (shape, data) = out.get_mut(w.key).unwrap();
            permute_key(g, &perm, w.key, &shape.clone(), data);
        }
    }
    out
}

#[test]
fn permuting_keeps_the_function() {
    let dir = tempfile::tempdir().unwrap();
    let pool = f32_pool(dir.path(), Layout::Sd1Ldm, 0, 8);
    let model = tensors(&pool[0]);
    let shapes: BTreeMap<String, Vec<usize>> = model
        .iter()
        .map(|(k, (s, _))| (k.clone(), s.clone()))
        .collect();
    let groups = perm_groups(Layout::Sd1Ldm, |k| shapes.get(k).cloned()).unwrap();
    let perm = permuted(&groups, &model);
    assert_ne!(perm, model);
    let x: Vec<f64> = lcg_values(7, 4 * 48);

    // CLIP-L's MLP of layer 0: fc2(gelu(fc1 x + b1)) + b2.
    let p = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp";
    let mlp = |m: &BTreeMap<String, (Vec<usize>, Vec<f64>)>| {
        let (s1, w1) = &m[&format!("{p}.fc1.weight")];
        let (_, b1) = &m[&format!("{p}.fc1.bias")];
        let (s2, w2) = &m[&format!("{p}.fc2.weight")];
        let (_, b2) = &m[&format!("{p}.fc2.bias")];
        let h: Vec<f64> = affine(w1, Some(b1), &x[..s1[1]], s1[0])
            .iter()
            .map(|v| v * (1.0 / (1.0 + (-1.702 * v).exp())))
            .collect();
        affine(w2, Some(b2), &h, s2[0])
    };
    assert_close_f64(&mlp(&perm), &mlp(&model));

    // A UNet self-attention: tokens X → Σ_heads softmax(Q_h K_hᵀ/√d) V_h, then to_out.
    let p = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1";
    let attn = |m: &BTreeMap<String, (Vec<usize>, Vec<f64>)>| {
        let (s, wq) = &m[&format!("{p}.to_q.weight")];
        let (_, wk) = &m[&format!("{p}.to_k.weight")];
        let (_, wv) = &m[&format!("{p}.to_v.weight")];
        let (so, wo) = &m[&format!("{p}.to_out.0.weight")];
        let (c, tokens, heads) = (s[0], 4, 8);
        let d = c / heads;
        let xs: Vec<&[f64]> = (0..tokens).map(|t| &x[t * s[1]..(t + 1) * s[1]]).collect();
        let q: Vec<Vec<f64>> = xs.iter().map(|t| affine(wq, None, t, c)).collect();
        let k: Vec<Vec<f64>> = xs.iter().map(|t| affine(wk, None, t, c)).collect();
        let v: Vec<Vec<f64>> = xs.iter().map(|t| affine(wv, None, t, c)).collect();
        let mut out = Vec::new();
        for qt in &q {
            let mut mixed = vec![0.0; c];
            for h in 0..heads {
                let r = h * d..(h + 1) * d;
                let scores: Vec<f64> = (0..tokens)
                    .map(|u| {
                        let dot: f64 = r.clone().map(|i| qt[i] * k[u][i]).sum();
                        (dot / (d as f64).sqrt()).exp()
                    })
                    .collect();
                let total: f64 = scores.iter().sum();
                for i in r.clone() {
                    mixed[i] = (0..tokens).map(|u| scores[u] * v[u][i]).sum::<f64>() / total;
                }
            }
            out.extend(affine(wo, None, &mixed, so[0]));
        }
        out
    };
    assert_close_f64(&attn(&perm), &attn(&model));
}

fn assert_close_f64(a: &[f64], b: &[f64]) {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1e-30f64, |m, x| m.max(x.abs()));
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-12 * scale, "{x} vs {y}");
    }
}
