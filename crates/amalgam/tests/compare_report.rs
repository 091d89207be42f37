//! The charts and the HTML page of a comparison, checked structurally: one bar per model, the
//! names written (escaped), PNGs that are PNGs, a page that needs no other file nor network.
//!
//! `AMALGAM_REPORT_DIR=/some/dir` keeps the reports (`real/`, `pool200/`) there, to look at.

use amalgam::analysis::{
    classical_mds, compare, write_charts, write_html, ChartFile, CompareOptions, Comparison,
    GroupStats, ModelMap, ModelStats, NamedStats, Outlier, OutlierRule, PoolModel,
};
use amalgam::io::dtype::OutputDtype;
use amalgam::synth::{synthesize, Layout, SynthOptions};
use amalgam::NoProgress;
use std::path::{Path, PathBuf};

/// The fills of the bars (`charts/mod.rs`: `BAR`, `OUTLIER`), as the SVG backend writes them.
const BAR_FILLS: [&str; 2] = ["fill=\"#4878D0\"", "fill=\"#D62728\""];
const PNG: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

/// Where a report goes: kept under `AMALGAM_REPORT_DIR` when set.
fn out_dir(tmp: &Path, name: &str) -> PathBuf {
    match std::env::var_os("AMALGAM_REPORT_DIR") {
        Some(d) => Path::new(&d).join(name),
        None => tmp.join(name),
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// The name as the charts write it (cut at 32 characters).
fn shown(name: &str) -> String {
    if name.chars().count() <= 32 {
        name.to_string()
    } else {
        name.chars().take(31).collect::<String>() + "…"
    }
}

fn bar_count(svg: &str) -> usize {
    svg.lines()
        .filter(|l| l.contains("<rect") && BAR_FILLS.iter().any(|f| l.contains(f)))
        .count()
}

/// The checks every report passes.
fn check_report(c: &Comparison, charts: &[ChartFile], html: &Path) {
    let n = c.models.len();
    for ch in charts {
        let svg = std::fs::read_to_string(&ch.svg).unwrap();
        assert!(svg.trim_start().starts_with("<svg"), "{}", ch.name);
        assert!(svg.trim_end().ends_with("</svg>"), "{}", ch.name);
        assert_eq!(
            svg.matches("<text").count(),
            svg.matches("</text>").count(),
            "{}",
            ch.name
        );
        let png = std::fs::read(&ch.png).unwrap();
        assert!(png.len() > 1000 && png[..8] == PNG, "{}", ch.png.display());
    }
    let names: Vec<&str> = charts.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names[0], "bars_total");
    if n >= 2 {
        for want in ["heatmap_l2", "heatmap_cos", "map_all"] {
            assert!(names.contains(&want), "{want} in {names:?}");
        }
    }
    // One bar per model in each bar chart, and each model named.
    for ch in charts.iter().filter(|c| c.name.starts_with("bars_")) {
        let svg = std::fs::read_to_string(&ch.svg).unwrap();
        assert_eq!(bar_count(&svg), n, "{}", ch.name);
        let outlier_bars = svg
            .lines()
            .filter(|l| l.contains("<rect") && l.contains(BAR_FILLS[1]))
            .count();
        let flagged = c
            .models
            .iter()
            .filter(|m| c.outliers.iter().any(|o| o.model == m.name))
            .count();
        assert_eq!(outlier_bars, flagged, "{}", ch.name);
        for m in &c.models {
            let text = format!("\n{}\n</text>", escape(&shown(&m.name)));
            assert!(svg.contains(&text), "{} lacks {text}", ch.name);
        }
    }
    let page = std::fs::read_to_string(html).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(!page.contains("http://") && !page.contains("https://"));
    assert!(!page.contains(" src=") && !page.contains("<link"));
    assert_eq!(page.matches("<svg").count(), charts.len());
    assert!(page.contains(&escape(&c.outlier_rule)));
    for m in &c.models {
        assert!(page.contains(&escape(&m.name)), "the page lacks {}", m.name);
    }
    for o in &c.outliers {
        assert!(page.contains(&format!(
            "<span class=\"flag\">&#9873;</span> {}</td>",
            escape(&o.model)
        )));
    }
    assert!(page.contains("table class=\"sortable\""));
}

/// Four models of seed 0 (one named with HTML's special characters), one of seed 1 (another
/// base, so far from the others), and the base of seed 0: a real comparison.
#[test]
fn real_pool_report() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut o = SynthOptions::new(Layout::Sd1Ldm, 4);
    o.shrink = 32;
    o.dtype = OutputDtype::F32;
    synthesize(&dir.join("pool"), &o).unwrap();
    let mut o = SynthOptions::new(Layout::Sd1Ldm, 1);
    o.shrink = 32;
    o.dtype = OutputDtype::F32;
    o.seed = 1;
    o.base = false;
    synthesize(&dir.join("far"), &o).unwrap();
    let pool = dir.join("pool");
    let odd = pool.join("a&b <x> \"q\".safetensors");
    std::fs::rename(pool.join("m002.safetensors"), &odd).unwrap();
    let far = dir
        .join("far")
        .join("far_away_model_with_a_rather_long_name.safetensors");
    std::fs::rename(dir.join("far").join("m000.safetensors"), &far).unwrap();
    let models = vec![
        pool.join("m000.safetensors"),
        pool.join("m001.safetensors"),
        odd,
        pool.join("m003.safetensors"),
        far,
    ];
    let c = compare(
        &models,
        Some(&pool.join("base.safetensors")),
        &CompareOptions::default(),
        &NoProgress,
    )
    .unwrap();
    assert!(
        c.outliers
            .iter()
            .any(|o| o.model == "far_away_model_with_a_rather_long_name"),
        "{:?}",
        c.outliers
    );
    let out = out_dir(dir, "real");
    let charts = write_charts(&c, &out).unwrap();
    let html = write_html(&c, &charts, &out).unwrap();
    assert_eq!(html, out.join("report.html"));
    check_report(&c, &charts, &html);
    // Per component charts too (SD1: diffuser, clip_l, vae).
    assert!(
        charts.iter().any(|c| c.name == "bars_diffuser"),
        "{charts:?}"
    );
    assert!(charts.iter().any(|c| c.name == "blocks"));
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("a&amp;b &lt;x&gt; &quot;q&quot;"));
    assert!(!page.contains("a&b <x>"));
}

/// A small deterministic generator (the test needs plausible numbers, not good randomness).
struct Lcg(u64);

impl Lcg {
    fn uniform(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (a, b) = (self.uniform(), self.uniform());
        (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()
    }
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn cos(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>() / (norm(a) * norm(b))
}

/// The figures of task vectors `tau` (one per model) scaled by `scale`.
fn group(tau: &[Vec<f64>], scale: f64, base_norm: f64) -> GroupStats {
    let n = tau.len();
    let dim = tau[0].len();
    let t: Vec<Vec<f64>> = tau
        .iter()
        .map(|v| v.iter().map(|x| x * scale).collect())
        .collect();
    let mean: Vec<f64> = (0..dim)
        .map(|k| t.iter().map(|v| v[k]).sum::<f64>() / n as f64)
        .collect();
    let diff = |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x - y).collect() };
    GroupStats {
        keys: 10,
        elements: 1000,
        models: t
            .iter()
            .map(|v| ModelStats {
                dist_base: Some(norm(v)),
                cos_base: Some(1.0 - norm(v).powi(2) / (2.0 * base_norm * base_norm)),
                dist_mean: norm(&diff(v, &mean)),
                cos_mean: cos(v, &mean),
            })
            .collect(),
        l2: t
            .iter()
            .map(|a| t.iter().map(|b| norm(&diff(a, b))).collect())
            .collect(),
        cos: t
            .iter()
            .map(|a| t.iter().map(|b| cos(a, b)).collect())
            .collect(),
    }
}

/// A comparison of `n` models built from random task vectors, the last three far from the pool.
fn constructed(n: usize) -> Comparison {
    let mut r = Lcg(17);
    let dim = 8;
    let centre: Vec<f64> = (0..dim).map(|_| r.normal()).collect();
    let tau: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            let far = n >= 10 && i >= n - 3;
            let spread = if far { 6.0 } else { 0.4 + 0.3 * r.uniform() };
            centre
                .iter()
                .map(|c| c + spread * r.normal() + if far { 4.0 } else { 0.0 })
                .collect()
        })
        .collect();
    let models: Vec<PoolModel> = (0..n)
        .map(|i| {
            let name = match i % 7 {
                0 => format!("sd15_finetune_{i:03}"),
                3 => format!("merged_anime_realistic_style_blend_v{i}_final_pruned_fp16"),
                5 => format!("m{i}"),
                _ => format!("model-{i:03}-ema"),
            };
            PoolModel {
                path: PathBuf::from(format!("/models/{name}.safetensors")),
                name,
            }
        })
        .collect();
    let total = group(&tau, 1.0, 30.0);
    let components = vec![
        NamedStats {
            name: "unet".into(),
            stats: group(&tau, 0.95, 28.0),
        },
        NamedStats {
            name: "clip_l".into(),
            stats: group(&tau, 0.05, 5.0),
        },
        NamedStats {
            name: "vae".into(),
            stats: group(&tau, 1e-4, 3.0),
        },
    ];
    let mut blocks = vec!["BASE".to_string()];
    blocks.extend((0..12).map(|i| format!("IN{i:02}")));
    blocks.push("M00".into());
    blocks.extend((0..12).map(|i| format!("OUT{i:02}")));
    blocks.push("VAE".into());
    let blocks: Vec<NamedStats> = blocks
        .into_iter()
        .enumerate()
        .map(|(k, name)| {
            let scale = match name.as_str() {
                "BASE" => 0.05,
                "VAE" => 1e-4,
                _ => 0.1 + 0.3 * (k as f64 * 0.7).sin().abs(),
            };
            NamedStats {
                stats: group(&tau, scale, 10.0),
                name,
            }
        })
        .collect();
    let mut maps = vec![map("all", &total)];
    maps.extend(components.iter().map(|c| map(&c.name, &c.stats)));
    let rule = OutlierRule::default();
    let values: Vec<f64> = total.models.iter().map(|m| m.dist_base.unwrap()).collect();
    let threshold = rule.threshold(&values);
    let outliers = models
        .iter()
        .zip(&values)
        .filter(|(_, &v)| n >= 3 && v > threshold)
        .map(|(m, &v)| Outlier {
            model: m.name.clone(),
            measure: "dist_base".into(),
            value: v,
            threshold,
        })
        .collect();
    Comparison {
        version: "test".into(),
        models,
        base: Some(PoolModel {
            name: "v1-5-pruned-emaonly".into(),
            path: PathBuf::from("/models/v1-5-pruned-emaonly.safetensors"),
        }),
        layout: Some("sd1_ldm".into()),
        total,
        components,
        blocks,
        keys: Vec::new(),
        maps,
        outlier_rule: rule.describe(),
        outliers,
        skipped: (0..14)
            .map(|i| amalgam::analysis::Skipped {
                key: format!("cond_stage_model.extra.{i}"),
                why: "the base lacks it".into(),
            })
            .collect(),
        notes: vec!["`x` of <a & b> holds NaN or Inf".into()],
        input_bytes: 200 * 2_132_000_000,
        bytes_read: 200 * 2_132_000_000,
        seconds: 1234.5,
    }
}

fn map(name: &str, s: &GroupStats) -> ModelMap {
    let (points, explained) = classical_mds(&s.l2);
    ModelMap {
        name: name.into(),
        points,
        explained,
    }
}

/// 200 models: the page and charts a large pool gets (and the three far ones flagged).
#[test]
fn two_hundred_models() {
    let tmp = tempfile::tempdir().unwrap();
    let c = constructed(200);
    let flagged: Vec<&str> = c.outliers.iter().map(|o| o.model.as_str()).collect();
    for m in &c.models[197..] {
        assert!(flagged.contains(&m.name.as_str()), "{flagged:?}");
    }
    let out = out_dir(tmp.path(), "pool200");
    let charts = write_charts(&c, &out).unwrap();
    let html = write_html(&c, &charts, &out).unwrap();
    check_report(&c, &charts, &html);
    // Long names are cut with an ellipsis.
    let bars = std::fs::read_to_string(&charts[0].svg).unwrap();
    assert!(bars.contains("merged_anime_realistic_style_bl…"));
    // 14 keys left out: folded.
    assert!(std::fs::read_to_string(&html)
        .unwrap()
        .contains("<details><summary>14 keys left out"));
}

/// One model and NaN values: bars and lines without them, no heatmap nor map.
#[test]
fn one_model_and_nan() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = constructed(2);
    c.models.truncate(1);
    let cut = |g: &mut GroupStats| {
        g.models.truncate(1);
        g.l2 = vec![vec![0.0]];
        g.cos = vec![vec![f64::NAN]];
    };
    cut(&mut c.total);
    c.components.iter_mut().for_each(|x| cut(&mut x.stats));
    c.blocks.iter_mut().for_each(|x| cut(&mut x.stats));
    c.components[0].stats.models[0].dist_base = None;
    c.blocks[3].stats.models[0].dist_base = Some(f64::NAN);
    c.maps.iter_mut().for_each(|m| m.points.truncate(1));
    let out = out_dir(tmp.path(), "one");
    let charts = write_charts(&c, &out).unwrap();
    assert!(charts.iter().all(|c| !c.name.starts_with("heatmap")));
    let html = write_html(&c, &charts, &out).unwrap();
    // The unet bar is missing (no value): said so rather than drawn.
    let unet = charts.iter().find(|c| c.name == "bars_unet").unwrap();
    let svg = std::fs::read_to_string(&unet.svg).unwrap();
    assert_eq!(bar_count(&svg), 0);
    assert!(svg.contains("\nn/a\n</text>"));
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains(">n/a</td>"));
    assert!(page.contains("&lt;a &amp; b&gt;"));
}
