//! `compare`: distances and cosines against a direct computation on real files, the MDS map,
//! outliers, grouping by block and component, and byte-identical figures for any thread count.

mod common;
use amalgam::analysis::{self, classical_mds, CompareOptions, OutlierRule};
use amalgam::NoProgress;
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Per key, each point's values (`None`: the file lacks the key); points are the models, then
/// the base.
type Pool = BTreeMap<String, Vec<Option<Vec<f64>>>>;

fn write_pool(dir: &Path, pool: &Pool, shapes: &BTreeMap<String, Vec<usize>>) -> Vec<PathBuf> {
    let points = pool.values().next().unwrap().len();
    (0..points)
        .map(|t| {
            let tensors: Vec<T> = pool
                .iter()
                .filter_map(|(k, v)| {
                    v[t].as_ref().map(|x| {
                        let shape = &shapes[k];
                        if shape.iter().product::<usize>() == x.len() {
                            f64t(k, shape, x)
                        } else {
                            f64t(k, &[x.len()], x)
                        }
                    })
                })
                .collect();
            write_file(&dir.join(format!("p{t}.safetensors")), &tensors, true)
        })
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
fn sub(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

/// The figures computed directly from the values, over `keys`.
struct Direct {
    dist_base: Vec<f64>,
    cos_base: Vec<f64>,
    dist_mean: Vec<f64>,
    cos_mean: Vec<f64>,
    l2: Vec<Vec<f64>>,
    cos: Vec<Vec<f64>>,
}

#[allow(clippy::needless_range_loop)] // indices name the models, as the formulas do
fn direct(pool: &Pool, keys: &[&str], n: usize) -> Direct {
    let mut d = Direct {
        dist_base: vec![0.0; n],
        cos_base: vec![0.0; n],
        dist_mean: vec![0.0; n],
        cos_mean: vec![0.0; n],
        l2: vec![vec![0.0; n]; n],
        cos: vec![vec![0.0; n]; n],
    };
    let (mut xb, mut xx, mut bb) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    let (mut tm, mut tt, mut mm) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    let mut pair = vec![vec![[0.0f64; 3]; n]; n];
    for k in keys {
        let v = &pool[*k];
        let base = v[n].as_ref().unwrap();
        let present: Vec<usize> = (0..n).filter(|&i| v[i].is_some()).collect();
        let tau = |i: usize| sub(v[i].as_ref().unwrap(), base);
        let mut mean_tau = vec![0.0; base.len()];
        for &i in &present {
            for (m, t) in mean_tau.iter_mut().zip(tau(i)) {
                *m += t / present.len() as f64;
            }
        }
        for &i in &present {
            let x = v[i].as_ref().unwrap();
            d.dist_base[i] += dot(&tau(i), &tau(i));
            xb[i] += dot(x, base);
            xx[i] += dot(x, x);
            bb[i] += dot(base, base);
            let dm = sub(&tau(i), &mean_tau);
            d.dist_mean[i] += dot(&dm, &dm);
            tm[i] += dot(&tau(i), &mean_tau);
            tt[i] += dot(&tau(i), &tau(i));
            mm[i] += dot(&mean_tau, &mean_tau);
            for &j in &present {
                let diff = sub(x, v[j].as_ref().unwrap());
                d.l2[i][j] += dot(&diff, &diff);
                pair[i][j][0] += dot(&tau(i), &tau(j));
                pair[i][j][1] += dot(&tau(i), &tau(i));
                pair[i][j][2] += dot(&tau(j), &tau(j));
            }
        }
    }
    for i in 0..n {
        d.dist_base[i] = d.dist_base[i].sqrt();
        d.dist_mean[i] = d.dist_mean[i].sqrt();
        d.cos_base[i] = xb[i] / (xx[i] * bb[i]).sqrt();
        d.cos_mean[i] = tm[i] / (tt[i] * mm[i]).sqrt();
        for j in 0..n {
            d.l2[i][j] = d.l2[i][j].sqrt();
            let [ij, ii, jj] = pair[i][j];
            d.cos[i][j] = ij / (ii * jj).sqrt();
        }
    }
    d
}

fn close(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= 1e-9 * want.abs().max(1.0),
        "{what}: got {got}, want {want}"
    );
}

fn check(stats: &analysis::GroupStats, want: &Direct, what: &str) {
    for (i, m) in stats.models.iter().enumerate() {
        close(
            m.dist_base.unwrap(),
            want.dist_base[i],
            &format!("{what} dist_base {i}"),
        );
        close(
            m.cos_base.unwrap(),
            want.cos_base[i],
            &format!("{what} cos_base {i}"),
        );
        close(
            m.dist_mean,
            want.dist_mean[i],
            &format!("{what} dist_mean {i}"),
        );
        close(
            m.cos_mean,
            want.cos_mean[i],
            &format!("{what} cos_mean {i}"),
        );
        for j in 0..want.l2.len() {
            close(stats.l2[i][j], want.l2[i][j], &format!("{what} l2 {i},{j}"));
            close(
                stats.cos[i][j],
                want.cos[i][j],
                &format!("{what} cos {i},{j}"),
            );
        }
    }
}

/// Three models and a base over keys outside any layout: one long key (several blocks), one
/// that model 2 lacks, one the base lacks (left out) and one with another shape in model 1.
fn small_pool() -> (Pool, BTreeMap<String, Vec<usize>>) {
    let mut pool = Pool::new();
    let mut shapes = BTreeMap::new();
    let vals = |seed: u64, len: usize, scale: f64| -> Vec<f64> {
        lcg_values(seed, len).iter().map(|v| v * scale).collect()
    };
    let long = 300_000;
    let base_long = vals(1, long, 1.0);
    pool.insert(
        "a.long".to_string(),
        (0..4)
            .map(|t| {
                Some(if t == 3 {
                    base_long.clone()
                } else {
                    base_long
                        .iter()
                        .zip(vals(10 + t, long, 0.01 * (t + 1) as f64))
                        .map(|(b, d)| b + d)
                        .collect()
                })
            })
            .collect(),
    );
    shapes.insert("a.long".to_string(), vec![600, 500]);
    pool.insert(
        "b.partial".to_string(),
        vec![
            Some(vec![1.0, 2.0, 3.0]),
            Some(vec![0.0, 2.0, 5.0]),
            None,
            Some(vec![1.0, 1.0, 1.0]),
        ],
    );
    shapes.insert("b.partial".to_string(), vec![3]);
    pool.insert(
        "c.no_base".to_string(),
        vec![Some(vec![1.0]), Some(vec![2.0]), Some(vec![3.0]), None],
    );
    shapes.insert("c.no_base".to_string(), vec![1]);
    pool.insert(
        "d.shape".to_string(),
        vec![
            Some(vec![0.5, 0.25, -1.0]),
            Some(vec![7.0, 7.0]),
            Some(vec![0.0, 0.5, -2.0]),
            Some(vec![0.0, 0.0, 0.0]),
        ],
    );
    shapes.insert("d.shape".to_string(), vec![3]);
    (pool, shapes)
}

#[test]
fn distances_and_cosines_equal_a_direct_computation() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, shapes) = small_pool();
    let paths = write_pool(dir.path(), &pool, &shapes);
    // Model 1 has `d.shape` as [2] where the base has [3]: left out for model 1 only.
    let c = analysis::compare(
        &paths[..3],
        Some(&paths[3]),
        &CompareOptions::default(),
        &NoProgress,
    )
    .unwrap();
    assert_eq!(c.keys.len(), 3);
    assert_eq!(c.skipped.len(), 2);
    assert_eq!(c.skipped[0].key, "c.no_base");
    assert_eq!(c.skipped[0].why, "the base lacks it");
    let mut seen = pool.clone();
    seen.get_mut("d.shape").unwrap()[1] = None;
    let want = direct(&seen, &["a.long", "b.partial", "d.shape"], 3);
    check(&c.total, &want, "total");
    // The keys are outside any layout: one component and one block, `other`, equal to the total.
    assert_eq!(c.components.len(), 1);
    assert_eq!(c.components[0].name, "other");
    check(&c.components[0].stats, &want, "other");
    // Per key.
    let partial = &c.keys[1];
    assert_eq!(partial.key, "b.partial");
    assert!(partial.models[2].is_none());
    let want_key = direct(&pool, &["b.partial"], 3);
    close(
        partial.models[1].as_ref().unwrap().dist_base.unwrap(),
        want_key.dist_base[1],
        "key dist_base",
    );
    // Hand-computed: model 1 vs the base on b.partial: (-1, 1, 4) → √18; model 0 vs 1: (1, 0, -2) → √5.
    close(want_key.dist_base[1], 18f64.sqrt(), "hand");
    close(want_key.l2[0][1], 5f64.sqrt(), "hand");
    // The mean of models 0 and 1 is (0.5, 2, 4): model 0 is √1.25 from it.
    close(
        partial.models[0].as_ref().unwrap().dist_mean,
        1.25f64.sqrt(),
        "hand mean",
    );
    // `d.shape`: model 1's has another shape, so it is left out of that key only.
    let shaped = &c.keys[2];
    assert_eq!(shaped.key, "d.shape");
    assert!(shaped.models[1].is_none() && shaped.models[0].is_some());
    assert!(
        c.skipped[1].why.contains("p1.safetensors"),
        "{:?}",
        c.skipped
    );
    assert_eq!(c.total.elements, 300_006);
    assert_eq!(c.bytes_read, c.input_bytes, "one read of each tensor");
}

/// The figures as JSON, without the wall time.
fn figures(c: &analysis::Comparison) -> String {
    let mut v = serde_json::to_value(c).unwrap();
    v.as_object_mut().unwrap().remove("seconds");
    v.to_string()
}

#[test]
fn without_a_base_cosines_are_of_the_weights_and_distances_do_not_change() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, shapes) = small_pool();
    let paths = write_pool(dir.path(), &pool, &shapes);
    let opts = CompareOptions::default();
    let with = analysis::compare(&paths[..3], Some(&paths[3]), &opts, &NoProgress).unwrap();
    let without = analysis::compare(&paths[..3], None, &opts, &NoProgress).unwrap();
    // `c.no_base` is compared now (all three have it).
    assert_eq!(without.keys.len(), 4);
    assert_eq!(without.keys[2].key, "c.no_base");
    let ab = |k: &str, i: usize, j: usize| {
        let (x, y) = (pool[k][i].as_ref().unwrap(), pool[k][j].as_ref().unwrap());
        dot(x, y) / (dot(x, x) * dot(y, y)).sqrt()
    };
    // Raw cosine on one key: through a one-key pool file set.
    let one = tempfile::tempdir().unwrap();
    let mut only = Pool::new();
    only.insert("a.long".into(), pool["a.long"].clone());
    let p1 = write_pool(one.path(), &only, &shapes);
    let c1 = analysis::compare(&p1[..3], None, &opts, &NoProgress).unwrap();
    close(c1.total.cos[0][2], ab("a.long", 0, 2), "raw cos");
    assert!(c1.total.models[0].dist_base.is_none());
    // Without a base the distances within the pool are the same, the cosines of the weights.
    let w = direct(&only, &["a.long"], 3);
    for i in 0..3 {
        for j in 0..3 {
            close(c1.total.l2[i][j], w.l2[i][j], "l2 without base");
        }
        close(
            c1.total.models[i].dist_mean,
            w.dist_mean[i],
            "dist_mean without base",
        );
    }
    assert!(with.total.models[0].dist_base.is_some());
}

#[test]
fn the_figures_do_not_depend_on_the_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, shapes) = small_pool();
    let paths = write_pool(dir.path(), &pool, &shapes);
    let run = |threads| {
        let opts = CompareOptions {
            threads,
            ..CompareOptions::default()
        };
        figures(&analysis::compare(&paths[..3], Some(&paths[3]), &opts, &NoProgress).unwrap())
    };
    assert_eq!(run(1), run(2));
    assert_eq!(run(1), run(3));
}

#[test]
fn mds_puts_points_on_a_line_on_a_line() {
    let t = [0.0, 1.0, 3.0, 7.0, 7.5];
    let d: Vec<Vec<f64>> = t
        .iter()
        .map(|a| t.iter().map(|b| f64::abs(a - b)).collect())
        .collect();
    let (p, explained) = classical_mds(&d);
    close(explained, 1.0, "explained");
    for i in 0..t.len() {
        assert!(p[i][1].abs() < 1e-9, "off the line: {:?}", p[i]);
        for j in 0..t.len() {
            close((p[i][0] - p[j][0]).abs(), d[i][j], "distance kept");
        }
    }
    // The mean is at the origin and the largest coordinate positive.
    close(p.iter().map(|x| x[0]).sum::<f64>(), 0.0, "centred");
    assert!(p[0][0] < 0.0 && p[4][0] > 0.0);
}

#[test]
fn models_along_one_direction_map_onto_a_line_and_the_far_one_is_flagged() {
    let dir = tempfile::tempdir().unwrap();
    let len = 5000;
    let base = lcg_values(3, len);
    let v = lcg_values(4, len);
    let t = [0.1, 0.2, 0.3, 0.25, 0.15, 3.0];
    let mut pool = Pool::new();
    let mut points: Vec<Option<Vec<f64>>> = t
        .iter()
        .map(|s| Some(base.iter().zip(&v).map(|(b, d)| b + s * d).collect()))
        .collect();
    points.push(Some(base.clone()));
    pool.insert("w".into(), points);
    let shapes = BTreeMap::from([("w".to_string(), vec![len])]);
    let paths = write_pool(dir.path(), &pool, &shapes);
    let c = analysis::compare(
        &paths[..6],
        Some(&paths[6]),
        &CompareOptions::default(),
        &NoProgress,
    )
    .unwrap();
    let map = &c.maps[0];
    assert_eq!(map.name, "all");
    close(map.explained, 1.0, "one axis explains all");
    let norm = dot(&v, &v).sqrt();
    for i in 0..6 {
        assert!(map.points[i][1].abs() < 1e-6 * norm, "{:?}", map.points[i]);
        close(
            (map.points[i][0] - map.points[5][0]).abs(),
            (t[5] - t[i]) * norm,
            "position",
        );
        close(
            c.total.models[i].dist_base.unwrap(),
            t[i] * norm,
            "dist_base",
        );
        close(
            c.total.models[i].cos_mean,
            1.0,
            "all task vectors point one way",
        );
    }
    // median + 3 · 1.4826 · MAD of the distances to the base: only model 5 is above.
    let d: Vec<f64> = t.iter().map(|s| s * norm).collect();
    let rule = OutlierRule::default();
    let med = analysis::median(&d);
    close(med, 0.225 * norm, "median");
    let dev: Vec<f64> = d.iter().map(|x| (x - med).abs()).collect();
    let threshold = med + 3.0 * 1.4826 * analysis::median(&dev);
    close(rule.threshold(&d), threshold, "threshold");
    let flagged: Vec<(&str, &str)> = c
        .outliers
        .iter()
        .map(|o| (o.model.as_str(), o.measure.as_str()))
        .collect();
    assert_eq!(flagged, [("p5", "dist_mean"), ("p5", "dist_base")]);
}

#[test]
fn sdxl_keys_fall_into_components_and_blocks_that_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let paths = f32_pool(dir.path(), amalgam::layout::arch::Layout::SdxlSgm, 3, 16);
    let c = analysis::compare(
        &paths[1..],
        Some(&paths[0]),
        &CompareOptions::default(),
        &NoProgress,
    )
    .unwrap();
    assert_eq!(c.layout.as_deref(), Some("sdxl-sgm"));
    let names: Vec<&str> = c.components.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["clip_l", "clip_g", "vae", "diffuser"]);
    let sum = |g: &[analysis::NamedStats]| g.iter().map(|x| x.stats.elements).sum::<u64>();
    assert_eq!(sum(&c.components), c.total.elements);
    assert_eq!(sum(&c.blocks), c.total.elements);
    let ids = amalgam::layout::arch::block_ids(amalgam::layout::arch::Arch::Sdxl).unwrap();
    for b in &c.blocks {
        assert!(
            ids.contains(&b.name.as_str()) || b.name == "other",
            "{}",
            b.name
        );
    }
    // Squared distances add up over the components (and the blocks).
    for i in 0..3 {
        let total = c.total.models[i].dist_base.unwrap().powi(2);
        let parts: f64 = c
            .components
            .iter()
            .map(|g| g.stats.models[i].dist_base.unwrap().powi(2))
            .sum();
        close(parts, total, "components add up");
        let blocks: f64 = c
            .blocks
            .iter()
            .map(|g| g.stats.models[i].dist_base.unwrap().powi(2))
            .sum();
        close(blocks, total, "blocks add up");
    }
    let key = c
        .keys
        .iter()
        .find(|k| k.key.starts_with("conditioner.embedders.0."))
        .unwrap();
    assert_eq!(key.component, "clip_l");
    let key = c
        .keys
        .iter()
        .find(|k| k.key.starts_with("model.diffusion_model.input_blocks.4."))
        .unwrap();
    assert_eq!(key.block, "IN04");
    assert_eq!(c.maps.len(), 5, "all, then each component");
}

#[test]
fn non_finite_values_count_as_the_reference_and_are_noted() {
    let dir = tempfile::tempdir().unwrap();
    let mut pool = Pool::new();
    pool.insert(
        "k".into(),
        vec![
            Some(vec![1.0, f64::NAN, 3.0]),
            Some(vec![1.0, 2.0, 2.0]),
            Some(vec![0.0, 5.0, 3.0]),
        ],
    );
    let shapes = BTreeMap::from([("k".to_string(), vec![3])]);
    let paths = write_pool(dir.path(), &pool, &shapes);
    let c = analysis::compare(
        &paths[..2],
        Some(&paths[2]),
        &CompareOptions::default(),
        &NoProgress,
    )
    .unwrap();
    // Model 0 reads as (1, 5, 3): 1 from the base.
    close(
        c.total.models[0].dist_base.unwrap(),
        1.0,
        "NaN read as the base's value",
    );
    assert_eq!(c.notes.len(), 1);
    assert!(c.notes[0].contains("p0.safetensors") && c.notes[0].contains("`k`"));
}
