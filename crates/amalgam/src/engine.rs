//! The streaming merge engine.
//!
//! 1. **Plan** (headers only): open every input, take the union of their keys, check shapes, and
//!    resolve for each key the expression that computes it: which node applies to which inputs,
//!    with the inputs lacking the key left out or the key taken from a fallback model (the key
//!    policy, see [`KeyAction`]). Every error here comes before any tensor is read.
//! 2. **Execute**: keys in name order are cut into element chunks whose size follows from the
//!    memory budget, the number of inputs and the thread count. A wave of chunks (one per thread,
//!    or many small keys) is computed in parallel, each chunk reading its inputs with positioned
//!    reads into reused buffers, evaluating the node expression, and encoding the output dtype;
//!    then the wave is written at the chunks' fixed offsets. Per element the summation order over
//!    models is fixed by the methods, so the bytes do not depend on threads or chunk size.

use crate::dtype::{dtype_name, OutputDtype};
use crate::error::{Error, Result};
use crate::graph::{Graph, Ref};
use crate::input::ModelFile;
use crate::method::{KeyCtx, KeyMerge, Method, OnMissing, Params};
use crate::methods;
use crate::output::{OutputFile, OutputTensor};
use crate::real::{ComputeDtype, Real};
use crate::report::{KeyAction, MergeReport, TakenBecause};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Chunks are multiples of this many elements (and statistic passes work on blocks of it), so the
/// statistics a method computes do not depend on the chunk size.
pub const BLOCK: usize = 1 << 14;

/// Options of one merge run.
#[derive(Clone, Debug)]
pub struct MergeOptions {
    pub output: PathBuf,
    pub output_dtype: OutputDtype,
    pub compute_dtype: ComputeDtype,
    /// Bytes the working set may use (buffers for inputs, intermediate nodes and output chunks).
    pub memory_budget: u64,
    /// Worker threads; 0 = one per core.
    pub threads: usize,
    pub seed: u64,
    /// Replace an existing output file.
    pub overwrite: bool,
    /// Extra `__metadata__` entries (the recipe, for instance).
    pub metadata: BTreeMap<String, String>,
    /// Force this chunk length (elements, rounded to [`BLOCK`]) instead of deriving it from the
    /// budget. For tests of chunk-size invariance.
    pub chunk_override: Option<usize>,
}

impl MergeOptions {
    pub fn new(output: impl Into<PathBuf>) -> Self {
        MergeOptions {
            output: output.into(),
            output_dtype: OutputDtype::F16,
            compute_dtype: ComputeDtype::F32,
            memory_budget: 2 << 30,
            threads: 0,
            seed: 0,
            overwrite: false,
            metadata: BTreeMap::new(),
            chunk_override: None,
        }
    }
}

/// Receives progress of a merge. All methods are called from the thread that runs the merge.
pub trait Progress: Sync {
    /// Called once when planning is done.
    fn start(&self, _total_bytes: u64, _keys: usize) {}
    /// `bytes` more output bytes were written; `key` is the last key touched.
    fn advance(&self, _bytes: u64, _keys_done: usize, _key: &str) {}
    fn finish(&self) {}
}

/// A progress sink that ignores everything.
pub struct NoProgress;
impl Progress for NoProgress {}

/// Merges the graph's inputs into `opts.output`.
pub fn merge(graph: &Graph, opts: &MergeOptions, progress: &dyn Progress) -> Result<MergeReport> {
    graph.validate()?;
    let models = open_models(graph, &opts.output)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads)
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start worker threads: {e}")))?;
    pool.install(|| match opts.compute_dtype {
        ComputeDtype::F32 => run::<f32>(graph, &models, opts, progress),
        ComputeDtype::F64 => run::<f64>(graph, &models, opts, progress),
    })
}

/// Opens every input and refuses an output path that is one of them.
pub fn open_models(graph: &Graph, output: &Path) -> Result<Vec<ModelFile>> {
    let out_id = file_identity(output);
    let mut models = Vec::with_capacity(graph.models.len());
    for m in &graph.models {
        if out_id.is_some() && file_identity(&m.path) == out_id {
            return Err(Error::Output {
                path: output.to_path_buf(),
                message: format!("is the input `{}`; refusing to overwrite an input", m.name),
            });
        }
        models.push(ModelFile::open(&m.path)?);
    }
    Ok(models)
}

#[cfg(unix)]
fn file_identity(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_identity(p: &Path) -> Option<(u64, u64)> {
    use std::hash::{Hash, Hasher};
    let c = std::fs::canonicalize(p).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    c.hash(&mut h);
    Some((0, h.finish()))
}

/// How one key is computed.
enum Expr<T: Real> {
    Leaf(usize),
    Node {
        state: Box<dyn KeyMerge<T>>,
        args: Vec<Expr<T>>,
    },
}

impl<T: Real> Expr<T> {
    /// Inputs read and intermediate buffers held per element of a chunk.
    fn cost(&self) -> (usize, usize) {
        match self {
            Expr::Leaf(_) => (1, 0),
            Expr::Node { args, .. } => args.iter().fold((0, 1), |(l, n), a| {
                let (al, an) = a.cost();
                (l + al, n + an)
            }),
        }
    }
    fn whole_tensor(&self) -> bool {
        match self {
            Expr::Leaf(_) => false,
            Expr::Node { state, args } => {
                state.whole_tensor() || args.iter().any(|a| a.whole_tensor())
            }
        }
    }
}

/// What to do for one output key.
enum Job<T: Real> {
    Compute { expr: Expr<T>, numel: usize },
    CopyRaw { model: usize, len: u64 },
}

struct PlannedKey<T: Real> {
    name: String,
    job: Job<T>,
}

/// Resolves `r` for `key`: `None` when it has no value for the key.
#[allow(clippy::too_many_arguments)]
fn resolve<T: Real>(
    r: Ref,
    key: &str,
    shape: &[usize],
    has: &[bool],
    graph: &Graph,
    methods: &[Box<dyn Method<T>>],
    seed: u64,
    notes: &mut Vec<String>,
) -> Result<Option<Expr<T>>> {
    match r {
        Ref::Model(m) => Ok(has[m].then_some(Expr::Leaf(m))),
        Ref::Node(n) => {
            let node = &graph.nodes[n];
            let mut args = Vec::new();
            for a in node.flat_args() {
                args.push(resolve(a, key, shape, has, graph, methods, seed, notes)?);
            }
            let present: Vec<bool> = args.iter().map(Option::is_some).collect();
            if !present.iter().any(|&p| p) {
                return Ok(None);
            }
            let all = present.iter().all(|&p| p);
            let decision = if all {
                OnMissing::MergePresent
            } else {
                methods[n].on_missing(&present)
            };
            match decision {
                OnMissing::Absent => {
                    notes.push(format!("node `{}` has no value", node.name));
                    Ok(None)
                }
                OnMissing::PassThrough(i) => {
                    notes.push(format!(
                        "node `{}` passes argument {} through unchanged",
                        node.name,
                        i + 1
                    ));
                    Ok(args.swap_remove(i))
                }
                OnMissing::MergePresent => {
                    if !all {
                        notes.push(format!(
                            "node `{}` merges {} of its {} arguments",
                            node.name,
                            present.iter().filter(|&&p| p).count(),
                            present.len()
                        ));
                    }
                    let idx: Vec<usize> = (0..present.len()).filter(|&i| present[i]).collect();
                    let ctx = KeyCtx {
                        key,
                        shape,
                        present: &idx,
                        n_args: present.len(),
                        seed,
                    };
                    let state = methods[n].begin_key(&ctx).map_err(|e| {
                        Error::Invalid(format!("node `{}`, key `{key}`: {e}", node.name))
                    })?;
                    Ok(Some(Expr::Node {
                        state,
                        args: args.into_iter().flatten().collect(),
                    }))
                }
            }
        }
    }
}

fn plan<T: Real>(
    graph: &Graph,
    models: &[ModelFile],
    opts: &MergeOptions,
    report: &mut MergeReport,
) -> Result<Vec<PlannedKey<T>>> {
    let methods: Vec<Box<dyn Method<T>>> = graph
        .nodes
        .iter()
        .map(|n| {
            methods::build::<T>(
                n.method,
                Params::new(n.method, n.params.clone()),
                &n.counts(),
            )
        })
        .collect::<Result<_>>()?;

    let mut keys: BTreeMap<&str, ()> = BTreeMap::new();
    for m in models {
        for k in m.tensors().keys() {
            keys.insert(k, ());
        }
    }
    let mut planned = Vec::with_capacity(keys.len());
    for &key in keys.keys() {
        let has: Vec<bool> = models.iter().map(|m| m.tensor(key).is_some()).collect();
        let first = has.iter().position(|&h| h).expect("key comes from a model");
        let entry = models[first].tensor(key).unwrap();
        for (i, m) in models.iter().enumerate().skip(first + 1) {
            if let Some(e) = m.tensor(key) {
                if e.shape != entry.shape {
                    return Err(Error::ShapeMismatch {
                        key: key.to_string(),
                        first_path: models[first].path().to_path_buf(),
                        first_shape: entry.shape.clone(),
                        second_path: m.path().to_path_buf(),
                        second_shape: e.shape.clone(),
                    });
                }
                if e.float_dtype().is_some() != entry.float_dtype().is_some() {
                    return Err(Error::Invalid(format!(
                        "key `{key}` is {} in {} but {} in {}",
                        dtype_name(entry.dtype),
                        models[first].path().display(),
                        dtype_name(e.dtype),
                        models[i].path().display()
                    )));
                }
            }
        }
        for (i, h) in has.iter().enumerate() {
            if !h {
                report.lacking[i].push(key.to_string());
            }
        }
        if entry.float_dtype().is_none() {
            report
                .actions
                .push((key.to_string(), KeyAction::CopiedUnchanged { model: first }));
            planned.push(PlannedKey {
                name: key.to_string(),
                job: Job::CopyRaw {
                    model: first,
                    len: entry.len,
                },
            });
            continue;
        }
        let mut notes = Vec::new();
        let expr = resolve(
            graph.output,
            key,
            &entry.shape,
            &has,
            graph,
            &methods,
            opts.seed,
            &mut notes,
        )?;
        let (expr, action) = match expr {
            Some(Expr::Leaf(m)) => (
                Expr::Leaf(m),
                KeyAction::Taken {
                    model: m,
                    because: TakenBecause::PassedThrough(notes.join("; ")),
                },
            ),
            Some(e) => {
                let action = if notes.is_empty() {
                    KeyAction::Merged
                } else {
                    KeyAction::MergedPartly(notes.join("; "))
                };
                (e, action)
            }
            None => {
                let m = match graph.fallback {
                    Some(f) if has[f] => f,
                    _ => first,
                };
                (
                    Expr::Leaf(m),
                    KeyAction::Taken {
                        model: m,
                        because: TakenBecause::Fallback(notes.join("; ")),
                    },
                )
            }
        };
        report.actions.push((key.to_string(), action));
        planned.push(PlannedKey {
            name: key.to_string(),
            job: Job::Compute {
                expr,
                numel: entry.numel(),
            },
        });
    }
    Ok(planned)
}

/// One unit of parallel work: elements `range` of planned key `key`.
struct Item {
    key: usize,
    range: Range<usize>,
}

/// Reusable buffers of one worker.
struct Scratch<T> {
    free: Vec<Vec<T>>,
    raw: Vec<u64>,
}

impl<T: Real> Scratch<T> {
    fn new() -> Self {
        Scratch {
            free: Vec::new(),
            raw: Vec::new(),
        }
    }
    fn take(&mut self, len: usize) -> Vec<T> {
        let mut b = self.free.pop().unwrap_or_default();
        if b.len() < len {
            b.resize(len, T::ZERO);
        }
        b
    }
}

/// Evaluates `expr` on elements `range`; the result is the first `range.len()` elements of the
/// returned buffer (to be given back to `scratch.free`).
fn eval<T: Real>(
    expr: &Expr<T>,
    key: &str,
    range: &Range<usize>,
    models: &[ModelFile],
    s: &mut Scratch<T>,
) -> Result<Vec<T>> {
    let len = range.len();
    match expr {
        Expr::Leaf(m) => {
            let mut buf = s.take(len);
            models[*m].read_chunk(key, range.start, &mut buf[..len], &mut s.raw)?;
            Ok(buf)
        }
        Expr::Node { state, args } => {
            let mut bufs = Vec::with_capacity(args.len());
            for a in args {
                bufs.push(eval(a, key, range, models, s)?);
            }
            let mut out = s.take(len);
            {
                let refs: Vec<&[T]> = bufs.iter().map(|b| &b[..len]).collect();
                state.merge_chunk(range.clone(), &refs, &mut out[..len]);
            }
            s.free.extend(bufs);
            Ok(out)
        }
    }
}

/// Runs the statistic passes of every node of `expr`, children first.
fn run_stats<T: Real>(
    expr: &mut Expr<T>,
    key: &str,
    numel: usize,
    models: &[ModelFile],
) -> Result<()> {
    if let Expr::Node { state, args } = expr {
        for a in args.iter_mut() {
            run_stats(a, key, numel, models)?;
        }
        for pass in 0..state.stat_passes() {
            let blocks: Vec<Range<usize>> = (0..numel)
                .step_by(BLOCK)
                .map(|s| s..(s + BLOCK).min(numel))
                .collect();
            let st: &dyn KeyMerge<T> = &**state;
            let args_ref: &[Expr<T>] = args;
            let results: Vec<Vec<f64>> = blocks
                .into_par_iter()
                .map_init(Scratch::new, |s, range| {
                    let len = range.len();
                    let mut bufs = Vec::with_capacity(args_ref.len());
                    for a in args_ref {
                        bufs.push(eval(a, key, &range, models, s)?);
                    }
                    let refs: Vec<&[T]> = bufs.iter().map(|b| &b[..len]).collect();
                    let r = st.stat_block(pass, range.clone(), &refs);
                    s.free.extend(bufs);
                    Ok(r)
                })
                .collect::<Result<_>>()?;
            state.absorb_stats(pass, results)?;
        }
    }
    Ok(())
}

fn run<T: Real>(
    graph: &Graph,
    models: &[ModelFile],
    opts: &MergeOptions,
    progress: &dyn Progress,
) -> Result<MergeReport> {
    let started = Instant::now();
    let mut report = MergeReport::new(graph);
    let mut planned = plan::<T>(graph, models, opts, &mut report)?;

    // Chunk length from the budget: per element, every worker holds the raw bytes and compute
    // value of each input read, one compute value per node, and the encoded output.
    let threads = rayon::current_num_threads().max(1);
    let tsize = std::mem::size_of::<T>();
    let raw_max = 8;
    let (mut leaves, mut nodes) = (1, 0);
    for p in &planned {
        if let Job::Compute { expr, .. } = &p.job {
            let (l, n) = expr.cost();
            leaves = leaves.max(l);
            nodes = nodes.max(n);
        }
    }
    let per_elem =
        (leaves * tsize + raw_max.min(tsize) + nodes * tsize + 2 * opts.output_dtype.size()) as u64;
    let chunk = match opts.chunk_override {
        Some(c) => c.max(1).div_ceil(BLOCK) * BLOCK,
        None => {
            let c = (opts.memory_budget / (per_elem * threads as u64)) as usize / BLOCK * BLOCK;
            if c == 0 {
                return Err(Error::Invalid(format!(
                    "memory budget of {} is too small for this merge: {} inputs per key on {} threads need at least {}",
                    crate::size::format_bytes(opts.memory_budget),
                    leaves,
                    threads,
                    crate::size::format_bytes(per_elem * (threads * BLOCK) as u64)
                )));
            }
            c
        }
    };
    report.chunk_elements = chunk;
    report.threads = threads;
    report.working_set_bytes = per_elem * (threads * chunk) as u64;

    let out_tensors: Vec<OutputTensor> = planned
        .iter()
        .map(|p| {
            let src = match &p.job {
                Job::CopyRaw { model, .. } => *model,
                Job::Compute { .. } => 0,
            };
            let dtype = match &p.job {
                Job::CopyRaw { .. } => models[src].tensor(&p.name).unwrap().dtype,
                Job::Compute { .. } => opts.output_dtype.safetensors(),
            };
            let shape = models
                .iter()
                .find_map(|m| m.tensor(&p.name))
                .unwrap()
                .shape
                .clone();
            OutputTensor {
                name: p.name.clone(),
                dtype,
                shape,
            }
        })
        .collect();
    let mut metadata: HashMap<String, String> = opts.metadata.clone().into_iter().collect();
    metadata.insert("amalgam_version".into(), crate::VERSION.into());
    metadata.insert("format".into(), "pt".into());
    let out = OutputFile::create(&opts.output, &out_tensors, metadata, opts.overwrite)?;
    let total_bytes: u64 = out_tensors
        .iter()
        .map(|t| (t.shape.iter().product::<usize>() * t.dtype.bitsize() / 8) as u64)
        .sum();
    progress.start(total_bytes, planned.len());

    let out_size = opts.output_dtype.size();
    let wave_elems = threads * chunk;
    let mut items: Vec<Item> = Vec::new();
    let mut wave_fill = 0usize;
    let mut keys_done = 0usize;
    let mut raw_buf = Vec::new();

    let flush = |items: &mut Vec<Item>, planned: &[PlannedKey<T>]| -> Result<u64> {
        if items.is_empty() {
            return Ok(0);
        }
        let encoded: Vec<(usize, u64, Vec<u8>)> = items
            .par_iter()
            .map_init(Scratch::new, |s, item| {
                let p = &planned[item.key];
                let Job::Compute { expr, .. } = &p.job else {
                    unreachable!("only computed keys are queued")
                };
                let len = item.range.len();
                let buf = eval(expr, &p.name, &item.range, models, s)?;
                let mut bytes = vec![0u8; len * out_size];
                opts.output_dtype.encode(&buf[..len], &mut bytes);
                s.free.push(buf);
                Ok((item.key, (item.range.start * out_size) as u64, bytes))
            })
            .collect::<Result<_>>()?;
        let mut written = 0;
        for (key, start, bytes) in &encoded {
            out.write_at(*key, *start, bytes)?;
            written += bytes.len() as u64;
        }
        items.clear();
        Ok(written)
    };

    for ki in 0..planned.len() {
        if let Job::CopyRaw { model, len } = planned[ki].job {
            let name = &planned[ki].name;
            let mut at = 0u64;
            while at < len {
                let n = (len - at).min(8 << 20) as usize;
                raw_buf.resize(n, 0u8);
                models[model].read_raw(name, at, &mut raw_buf)?;
                out.write_at(ki, at, &raw_buf)?;
                at += n as u64;
            }
            report.bytes_written += len;
            keys_done += 1;
            progress.advance(len, keys_done, name);
            continue;
        }
        let p = &mut planned[ki];
        let Job::Compute { expr, numel } = &mut p.job else {
            unreachable!()
        };
        let numel = *numel;
        run_stats(expr, &p.name, numel, models)?;
        let step = if expr.whole_tensor() {
            numel.max(1)
        } else {
            chunk
        };
        let mut start = 0;
        while start < numel {
            let end = (start + step).min(numel);
            items.push(Item {
                key: ki,
                range: start..end,
            });
            wave_fill += end - start;
            start = end;
            if wave_fill >= wave_elems || items.len() >= 4096 {
                let w = flush(&mut items, &planned)?;
                report.bytes_written += w;
                wave_fill = 0;
                progress.advance(w, keys_done, &planned[ki].name);
            }
        }
        keys_done += 1;
    }
    let w = flush(&mut items, &planned)?;
    report.bytes_written += w;
    progress.advance(w, keys_done, "");
    report.bytes_read = bytes_read(&planned, models);
    report.output = Some(out.commit()?);
    progress.finish();
    report.elapsed = started.elapsed();
    report.peak_rss_bytes = crate::report::peak_rss_bytes();
    Ok(report)
}

fn bytes_read<T: Real>(planned: &[PlannedKey<T>], models: &[ModelFile]) -> u64 {
    fn leaves<T: Real>(e: &Expr<T>, out: &mut Vec<usize>) {
        match e {
            Expr::Leaf(m) => out.push(*m),
            Expr::Node { args, .. } => args.iter().for_each(|a| leaves(a, out)),
        }
    }
    let mut total = 0;
    for p in planned {
        match &p.job {
            Job::CopyRaw { len, .. } => total += len,
            Job::Compute { expr, .. } => {
                let mut l = Vec::new();
                leaves(expr, &mut l);
                for m in l {
                    total += models[m].tensor(&p.name).unwrap().len;
                }
            }
        }
    }
    total
}
