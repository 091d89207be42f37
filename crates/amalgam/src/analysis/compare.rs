//! `compare`: one streamed pass over a pool of models (and its base) that measures how far apart
//! they are, per key, per block and per component (see [`super::stats`] for the figures).
//!
//! Per key, the points' values are read in blocks whose length depends only on the number of
//! points (so the sums, folded in block order, are the same bytes whatever the thread count);
//! each block's inner products are one f64 matrix product. Memory is a few blocks per thread,
//! whatever the number of models (the N × N sums of each group aside).

use super::mds::classical_mds;
use super::outliers::{flag_outliers, Outlier, OutlierRule};
use super::stats::{GroupStats, GroupSums, KeySums, ModelStats};
use crate::error::{Error, Result};
use crate::io::input::ModelFile;
use crate::layout::arch::{block_of, Layout};
use crate::methods::gram::geometric_median::gram_of_rows;
use crate::options::{Cancel, Progress};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How to run a comparison.
#[derive(Clone, Debug, Default)]
pub struct CompareOptions {
    /// Worker threads; 0 = one per core.
    pub threads: usize,
    /// Stops the comparison from another thread.
    pub cancel: Cancel,
    /// Which models are flagged as far from the pool.
    pub outliers: OutlierRule,
}

/// A model of the pool, as the outputs name it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PoolModel {
    /// A short unique name (the file name without `.safetensors`).
    pub name: String,
    /// The file.
    pub path: PathBuf,
}

/// A group's figures with its name (a component such as `unet`, or a block id such as `IN04`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct NamedStats {
    /// The component or block.
    pub name: String,
    /// Its figures.
    pub stats: GroupStats,
}

/// One key's figures, per model.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct KeyStats {
    /// The key.
    pub key: String,
    /// Its component (`other` outside the layout).
    pub component: String,
    /// Its block id (`other` for keys in no block).
    pub block: String,
    /// Its elements.
    pub elements: u64,
    /// Per model, in pool order (the figures of a model lacking the key are `null`).
    pub models: Vec<Option<ModelStats>>,
}

/// A 2-D map of the models (classical MDS of a distance matrix).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ModelMap {
    /// The group mapped (`all`, or a component).
    pub name: String,
    /// Each model's coordinates, in pool order.
    pub points: Vec<[f64; 2]>,
    /// The share of the distances' variance the two axes hold (0 to 1).
    pub explained: f64,
}

/// A key left out, and why.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Skipped {
    /// The key.
    pub key: String,
    /// Why (the base lacks it, another shape, not a float tensor...).
    pub why: String,
}

/// What `compare` found (written as `compare.json`; its schema is in `docs/compare.md`).
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    /// The amalgam version that measured it.
    pub version: String,
    /// The pool, in the order given.
    pub models: Vec<PoolModel>,
    /// The base the task vectors are taken from.
    pub base: Option<PoolModel>,
    /// The layout the keys were grouped by.
    pub layout: Option<String>,
    /// The whole model.
    pub total: GroupStats,
    /// Per component, in layout order (`other`: keys outside the layout).
    pub components: Vec<NamedStats>,
    /// Per block (supermerger's MBW ids), in block order.
    pub blocks: Vec<NamedStats>,
    /// Per key, in name order.
    pub keys: Vec<KeyStats>,
    /// 2-D maps: the whole model, then each component.
    pub maps: Vec<ModelMap>,
    /// The rule models are flagged by.
    pub outlier_rule: String,
    /// The models flagged.
    pub outliers: Vec<Outlier>,
    /// Keys left out.
    pub skipped: Vec<Skipped>,
    /// Things worth knowing about the run (non-finite values read as the reference's).
    pub notes: Vec<String>,
    /// Bytes of tensor data in the inputs.
    pub input_bytes: u64,
    /// Bytes actually read.
    pub bytes_read: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Measures `models` (and their `base`) against each other in one read.
pub fn compare(
    models: &[PathBuf],
    base: Option<&Path>,
    opts: &CompareOptions,
    progress: &dyn Progress,
) -> Result<Comparison> {
    let start = Instant::now();
    if models.is_empty() || (models.len() < 2 && base.is_none()) {
        return Err(Error::Invalid(
            "compare needs two models, or one model and a base".into(),
        ));
    }
    let mut paths: Vec<&Path> = models.iter().map(PathBuf::as_path).collect();
    paths.extend(base);
    let files = paths
        .iter()
        .map(ModelFile::open)
        .collect::<Result<Vec<_>>>()?;
    let n = models.len();
    let base_point = base.map(|_| n);
    let layout = files[base_point.unwrap_or(0)].detected_layout();
    let (plan, skipped) = plan_keys(&files, base_point);
    let input_bytes = plan.iter().map(|k| k.bytes).sum();
    progress.start(input_bytes, plan.len());

    let pool = crate::engine::thread_pool(opts.threads)?;
    let p = files.len();
    let names = group_names(layout);
    let mut components = BTreeMap::<usize, GroupSums>::new();
    let mut blocks = BTreeMap::<usize, GroupSums>::new();
    let mut total = GroupSums::new(p);
    let mut keys = Vec::with_capacity(plan.len());
    let mut notes = Vec::new();
    for (i, key) in plan.iter().enumerate() {
        if opts.cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let (sums, bad) = pool.install(|| key_sums(&files, key))?;
        for t in bad {
            notes.push(format!(
                "`{}` of {} holds NaN or Inf: read as the reference's values there",
                key.key,
                paths[t].display()
            ));
        }
        let mut one = GroupSums::new(p);
        one.add(&sums, base_point);
        let per_model = one.model_stats(n, base_point);
        let (component, block) = names.of(layout, &key.key);
        components
            .entry(component)
            .or_insert_with(|| GroupSums::new(p))
            .merge(&one);
        blocks
            .entry(block)
            .or_insert_with(|| GroupSums::new(p))
            .merge(&one);
        total.merge(&one);
        keys.push(KeyStats {
            key: key.key.clone(),
            component: names.components[component].clone(),
            block: names.blocks[block].clone(),
            elements: sums.elements,
            models: per_model
                .into_iter()
                .enumerate()
                .map(|(m, s)| sums.present.contains(&m).then_some(s))
                .collect(),
        });
        progress.advance(key.bytes, i + 1, &key.key);
    }
    progress.finish();
    let named = |sums: BTreeMap<usize, GroupSums>, list: &[String]| -> Vec<NamedStats> {
        sums.into_iter()
            .map(|(i, s)| NamedStats {
                name: list[i].clone(),
                stats: s.stats(n, base_point),
            })
            .collect()
    };
    let total = total.stats(n, base_point);
    let components = named(components, &names.components);
    let blocks = named(blocks, &names.blocks);
    let mut maps = vec![map_of("all", &total)];
    if components.len() > 1 {
        maps.extend(components.iter().map(|c| map_of(&c.name, &c.stats)));
    }
    let pool_models = pool_names(models);
    let outliers = flag_outliers(&opts.outliers, &total, &pool_models);
    Ok(Comparison {
        version: crate::VERSION.to_string(),
        base: base.map(|b| PoolModel {
            name: display_name(b),
            path: b.to_path_buf(),
        }),
        models: pool_models,
        layout: layout.map(|l| l.name().to_string()),
        total,
        components,
        blocks,
        keys,
        maps,
        outlier_rule: opts.outliers.describe(),
        outliers,
        skipped,
        notes,
        input_bytes,
        bytes_read: files.iter().map(ModelFile::bytes_read).sum(),
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn map_of(name: &str, stats: &GroupStats) -> ModelMap {
    let (points, explained) = classical_mds(&stats.l2);
    ModelMap {
        name: name.to_string(),
        points,
        explained,
    }
}

/// A file's name without its folder and `.safetensors`.
fn display_name(p: &Path) -> String {
    let name = p.file_name().map_or_else(
        || p.display().to_string(),
        |f| f.to_string_lossy().into_owned(),
    );
    name.strip_suffix(".safetensors")
        .map_or(name.clone(), str::to_string)
}

/// The pool's names: file names, with the folder added where two are the same, then a number.
fn pool_names(models: &[PathBuf]) -> Vec<PoolModel> {
    let mut names: Vec<String> = models.iter().map(|p| display_name(p)).collect();
    let mut seen = BTreeMap::<String, usize>::new();
    for name in names.iter_mut() {
        let count = seen.entry(name.clone()).or_insert(0);
        *count += 1;
        if *count > 1 {
            *name = format!("{name} ({count})");
        }
    }
    names
        .into_iter()
        .zip(models)
        .map(|(name, path)| PoolModel {
            name,
            path: path.clone(),
        })
        .collect()
}

/// Component and block names, indexed in layout order.
struct GroupNames {
    components: Vec<String>,
    blocks: Vec<String>,
}

fn group_names(layout: Option<Layout>) -> GroupNames {
    let mut components: Vec<String> = layout
        .map(|l| l.components().iter().map(|s| s.to_string()).collect())
        .unwrap_or_default();
    components.push("other".into());
    let mut blocks: Vec<String> = layout
        .and_then(|l| crate::layout::arch::block_ids(l.arch()))
        .map(|b| b.iter().map(|s| s.to_string()).collect())
        .unwrap_or_default();
    blocks.push("other".into());
    GroupNames { components, blocks }
}

impl GroupNames {
    /// The component and block indices of `key`.
    fn of(&self, layout: Option<Layout>, key: &str) -> (usize, usize) {
        let index = |list: &[String], name: Option<&str>| {
            name.and_then(|n| list.iter().position(|x| x == n))
                .unwrap_or(list.len() - 1)
        };
        let component = layout.and_then(|l| l.component_of(key));
        let block = layout.and_then(|l| block_of(l, key));
        (
            index(&self.components, component),
            index(&self.blocks, block),
        )
    }
}

/// A key to compare: the points having it (the reference first in `present` order is chosen
/// by [`key_sums`]).
struct PlannedKey {
    key: String,
    present: Vec<usize>,
    reference: usize,
    elements: usize,
    bytes: u64,
}

/// The keys to compare, in name order, and those left out.
fn plan_keys(files: &[ModelFile], base: Option<usize>) -> (Vec<PlannedKey>, Vec<Skipped>) {
    let mut all = BTreeMap::<&str, ()>::new();
    for f in files {
        all.extend(f.tensors().keys().map(|k| (k.as_str(), ())));
    }
    let (mut plan, mut skipped) = (Vec::new(), Vec::new());
    let mut skip = |key: &str, why: String| {
        skipped.push(Skipped {
            key: key.to_string(),
            why,
        })
    };
    for key in all.into_keys() {
        let reference = match base {
            Some(b) => b,
            None => (0..files.len())
                .find(|&t| files[t].tensor(key).is_some())
                .expect("a key of some file"),
        };
        let Some(r) = files[reference].tensor(key) else {
            skip(key, "the base lacks it".into());
            continue;
        };
        if r.float_dtype().is_none() {
            skip(key, "not a float tensor".into());
            continue;
        }
        let mut present = Vec::new();
        let mut bytes = 0;
        for (t, f) in files.iter().enumerate() {
            let Some(e) = f.tensor(key) else { continue };
            if e.shape != r.shape || e.float_dtype().is_none() {
                skip(
                    key,
                    format!(
                        "{} has it as {:?} {:?}, the reference as {:?}",
                        f.path().display(),
                        e.dtype,
                        e.shape,
                        r.shape
                    ),
                );
                continue;
            }
            bytes += e.len;
            present.push(t);
        }
        if present.len() < 2 {
            skip(key, "only one model has it".into());
            continue;
        }
        let reference = present.iter().position(|&t| t == reference).unwrap();
        plan.push(PlannedKey {
            key: key.to_string(),
            present,
            reference,
            elements: r.numel(),
            bytes,
        });
    }
    (plan, skipped)
}

/// The elements of one block of a key with `points` points: ~4 MiB of f64 values per block, at
/// least 4096 elements. It depends on nothing else, so neither do the sums.
fn block_len(points: usize) -> usize {
    ((1usize << 19) / points).max(4096)
}

/// One block's inner products (see [`KeySums`]).
struct BlockSums {
    centred: Vec<f64>,
    ref_dot: Vec<f64>,
    ref_norm2: f64,
    non_finite: Vec<usize>,
}

/// A key's inner products over the points that have it, and the points holding NaN or Inf.
fn key_sums(files: &[ModelFile], key: &PlannedKey) -> Result<(KeySums, Vec<usize>)> {
    let m = key.present.len();
    let len = block_len(m);
    let blocks = key.elements.div_ceil(len);
    let window = rayon::current_num_threads() * 2;
    let mut sums = KeySums {
        present: key.present.clone(),
        centred: vec![0.0; m * m],
        ref_dot: vec![0.0; m],
        ref_norm2: 0.0,
        elements: key.elements as u64,
    };
    let mut bad = Vec::new();
    for first in (0..blocks).step_by(window) {
        let results: Vec<Result<BlockSums>> = (first..(first + window).min(blocks))
            .into_par_iter()
            .map(|b| {
                let range = b * len..((b + 1) * len).min(key.elements);
                block_sums(files, key, range)
            })
            .collect();
        for r in results {
            let r = r?;
            sums.centred
                .iter_mut()
                .zip(&r.centred)
                .for_each(|(a, b)| *a += b);
            sums.ref_dot
                .iter_mut()
                .zip(&r.ref_dot)
                .for_each(|(a, b)| *a += b);
            sums.ref_norm2 += r.ref_norm2;
            for t in r.non_finite {
                if !bad.contains(&t) {
                    bad.push(t);
                }
            }
        }
    }
    Ok((sums, bad))
}

thread_local! {
    /// A worker's block of rows, reused from block to block (every value is decoded anew).
    static ROWS: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The inner products of elements `range` of a key: the rows `x_a − r` and, in the reference's
/// place, `r` itself, so that one matrix product gives `C`, `⟨r, x_a − r⟩` and `‖r‖²`.
fn block_sums(
    files: &[ModelFile],
    key: &PlannedKey,
    range: std::ops::Range<usize>,
) -> Result<BlockSums> {
    let (m, len, reference) = (key.present.len(), range.len(), key.reference);
    ROWS.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < m * len {
            buf.resize(m * len, 0.0);
        }
        let rows = &mut buf[..m * len];
        let mut scratch = Vec::new();
        let mut finite = vec![true; m];
        let mut non_finite = Vec::new();
        for (a, &t) in key.present.iter().enumerate() {
            let f = &files[t];
            let e = f.tensor(&key.key).expect("planned");
            let dtype = e.float_dtype().expect("planned");
            let row = &mut rows[a * len..(a + 1) * len];
            if !f.decode_checked(e.offset, dtype, range.start, row, &mut scratch)? {
                finite[a] = false;
                non_finite.push(t);
            }
        }
        let (before, rest) = rows.split_at_mut(reference * len);
        let (r, after) = rest.split_at_mut(len);
        if !finite[reference] {
            r.iter_mut()
                .filter(|v| !v.is_finite())
                .for_each(|v| *v = 0.0);
        }
        let others = before
            .chunks_exact_mut(len)
            .chain(after.chunks_exact_mut(len));
        for (a, row) in others.enumerate() {
            let a = if a < reference { a } else { a + 1 };
            if finite[a] {
                row.iter_mut().zip(r.iter()).for_each(|(x, &rv)| *x -= rv);
            } else {
                // A NaN or Inf value counts as the reference's.
                for (x, &rv) in row.iter_mut().zip(r.iter()) {
                    *x = if x.is_finite() { *x - rv } else { 0.0 };
                }
            }
        }
        let mut gram = vec![0.0; m * m];
        gram_of_rows(rows, m, len, &mut gram);
        let ref_norm2 = gram[reference * m + reference];
        let ref_dot: Vec<f64> = (0..m)
            .map(|a| {
                if a == reference {
                    0.0
                } else {
                    gram[reference * m + a]
                }
            })
            .collect();
        // The reference's own difference is zero.
        for a in 0..m {
            gram[reference * m + a] = 0.0;
            gram[a * m + reference] = 0.0;
        }
        Ok(BlockSums {
            centred: gram,
            ref_dot,
            ref_norm2,
            non_finite,
        })
    })
}
