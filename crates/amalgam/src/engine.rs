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

use crate::dtype::{dtype_name, FloatDtype, OutputDtype};
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

/// Receives progress of a merge, from any of its threads.
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
    Leaf(Leaf),
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
    fn has_stats(&self) -> bool {
        match self {
            Expr::Leaf(_) => false,
            Expr::Node { state, args } => {
                state.stat_passes() > 0 || args.iter().any(|a| a.has_stats())
            }
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

/// Where one input's tensor lies.
#[derive(Clone, Copy, Debug)]
struct Leaf {
    model: usize,
    offset: u64,
    dtype: FloatDtype,
}

impl Leaf {
    fn new(models: &[ModelFile], model: usize, key: &str) -> Self {
        let e = models[model].tensor(key).expect("planned key");
        Leaf {
            model,
            offset: e.offset,
            dtype: e.float_dtype().expect("float key"),
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
    models: &[ModelFile],
    graph: &Graph,
    methods: &[Box<dyn Method<T>>],
    seed: u64,
    notes: &mut Vec<String>,
) -> Result<Option<Expr<T>>> {
    match r {
        Ref::Model(m) => Ok(has[m].then(|| Expr::Leaf(Leaf::new(models, m, key)))),
        Ref::Node(n) => {
            let node = &graph.nodes[n];
            let mut args = Vec::new();
            for a in node.flat_args() {
                args.push(resolve(
                    a, key, shape, has, models, graph, methods, seed, notes,
                )?);
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
            models,
            graph,
            &methods,
            opts.seed,
            &mut notes,
        )?;
        let (expr, action) = match expr {
            Some(Expr::Leaf(leaf)) => (
                Expr::Leaf(leaf),
                KeyAction::Taken {
                    model: leaf.model,
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
                    Expr::Leaf(Leaf::new(models, m, key)),
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

/// One unit of parallel work: elements `range` of planned key `key`, computed in cache-sized
/// sub-chunks into one output buffer that is then written with one call.
struct Task {
    key: usize,
    range: Range<usize>,
}

/// Reusable buffers of one worker thread, and the input pages it has finished with.
struct Scratch<T> {
    free: Vec<Vec<T>>,
    raw: Vec<u64>,
    out: Vec<u64>,
    releaser: Releaser,
}

/// Input bytes a worker may leave mapped before handing them back, over all models.
const PENDING_RELEASE: u64 = 32 << 20;

impl<T: Real> Scratch<T> {
    fn new(models: usize) -> Self {
        Scratch {
            free: Vec::new(),
            raw: Vec::new(),
            out: Vec::new(),
            releaser: Releaser::new(
                models,
                (PENDING_RELEASE / models.max(1) as u64).max(256 << 10),
            ),
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

/// One `Scratch` per worker thread, kept for the whole merge.
struct Workers<T> {
    slots: Vec<std::sync::Mutex<Scratch<T>>>,
}

impl<T: Real> Workers<T> {
    fn new(threads: usize, models: usize) -> Self {
        Workers {
            slots: (0..threads.max(1))
                .map(|_| std::sync::Mutex::new(Scratch::new(models)))
                .collect(),
        }
    }
    fn release_all(&self, models: &[ModelFile]) {
        for slot in &self.slots {
            slot.lock()
                .unwrap_or_else(|e| e.into_inner())
                .releaser
                .flush_all(models);
        }
    }
    fn with<R>(&self, f: impl FnOnce(&mut Scratch<T>) -> R) -> R {
        let i = rayon::current_thread_index().unwrap_or(0) % self.slots.len();
        let mut guard = self.slots[i].lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }
}

/// Evaluates `expr` on elements `range`; the result is the first `range.len()` elements of the
/// returned buffer (to be given back to `s.free`).
fn eval<T: Real>(
    expr: &Expr<T>,
    range: &Range<usize>,
    models: &[ModelFile],
    s: &mut Scratch<T>,
) -> Vec<T> {
    let len = range.len();
    match expr {
        Expr::Leaf(l) => {
            let mut buf = s.take(len);
            models[l.model].decode(l.offset, l.dtype, range.start, &mut buf[..len], &mut s.raw);
            buf
        }
        Expr::Node { state, args } => {
            let mut bufs = Vec::with_capacity(args.len());
            for a in args {
                bufs.push(eval(a, range, models, s));
            }
            let mut out = s.take(len);
            {
                let refs: Vec<&[T]> = bufs.iter().map(|b| &b[..len]).collect();
                state.merge_chunk(range.clone(), &refs, &mut out[..len]);
            }
            s.free.extend(bufs);
            out
        }
    }
}

/// Hands input pages back to the kernel once they are merged, coalescing adjacent byte ranges of
/// each model and releasing a model's range when it reaches `limit` bytes or stops growing.
struct Releaser {
    pending: Vec<Option<(u64, u64)>>,
    limit: u64,
}

impl Releaser {
    fn new(models: usize, limit: u64) -> Self {
        Releaser {
            pending: vec![None; models],
            limit,
        }
    }
    /// Adds the bytes `range` of every leaf of `expr` read.
    fn add<T: Real>(&mut self, expr: &Expr<T>, range: &Range<usize>, models: &[ModelFile]) {
        match expr {
            Expr::Leaf(l) => {
                let w = l.dtype.size() as u64;
                let lo = l.offset + range.start as u64 * w;
                let hi = l.offset + range.end as u64 * w;
                let slot = &mut self.pending[l.model];
                match slot {
                    Some((plo, phi)) if lo >= *plo && lo <= *phi + 4096 => *phi = (*phi).max(hi),
                    _ => {
                        if let Some((plo, phi)) = slot.take() {
                            models[l.model].release(plo, phi - plo);
                        }
                        *slot = Some((lo, hi));
                    }
                }
                if let Some((plo, phi)) = *slot {
                    if phi - plo >= self.limit {
                        models[l.model].release(plo, phi - plo);
                        *slot = None;
                    }
                }
            }
            Expr::Node { args, .. } => args.iter().for_each(|a| self.add(a, range, models)),
        }
    }
    fn flush_all(&mut self, models: &[ModelFile]) {
        for (m, slot) in self.pending.iter_mut().enumerate() {
            if let Some((lo, hi)) = slot.take() {
                models[m].release(lo, hi - lo);
            }
        }
    }
}

/// Runs the statistic passes of every node of `expr`, children first.
fn run_stats<T: Real>(
    expr: &mut Expr<T>,
    numel: usize,
    models: &[ModelFile],
    workers: &Workers<T>,
) -> Result<()> {
    if let Expr::Node { state, args } = expr {
        for a in args.iter_mut() {
            run_stats(a, numel, models, workers)?;
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
                .map(|range| {
                    let r = workers.with(|s| {
                        let len = range.len();
                        let bufs: Vec<Vec<T>> = args_ref
                            .iter()
                            .map(|a| eval(a, &range, models, s))
                            .collect();
                        let refs: Vec<&[T]> = bufs.iter().map(|b| &b[..len]).collect();
                        let r = st.stat_block(pass, range.clone(), &refs);
                        s.free.extend(bufs);
                        r
                    });
                    r
                })
                .collect();
            let limit = (BLOCK as u64 * 64).max(1 << 20);
            let mut releaser = Releaser::new(models.len(), limit);
            for start in (0..numel).step_by(BLOCK) {
                for a in args.iter() {
                    releaser.add(a, &(start..(start + BLOCK).min(numel)), models);
                }
            }
            releaser.flush_all(models);
            state.absorb_stats(pass, results)?;
        }
    }
    Ok(())
}

/// Elements of a sub-chunk whose buffers (one per input and node) fit in about this many bytes,
/// so that a sub-chunk is computed in the CPU cache.
const CACHE_TARGET: usize = 256 << 10;

/// A task's input and output bytes are capped at this (below the budget when the budget is
/// large): bigger tasks do not merge faster, they only hold more pages.
const TASK_BYTES_MAX: u64 = 16 << 20;

fn run<T: Real>(
    graph: &Graph,
    models: &[ModelFile],
    opts: &MergeOptions,
    progress: &dyn Progress,
) -> Result<MergeReport> {
    let started = Instant::now();
    let mut report = MergeReport::new(graph);
    let mut planned = plan::<T>(graph, models, opts, &mut report)?;

    // Task length from the budget. Per element of a task, a worker holds the mapped input bytes
    // of every input read (released when the task ends) and the encoded output; the compute
    // buffers are per sub-chunk and small.
    let threads = rayon::current_num_threads().max(1);
    let tsize = std::mem::size_of::<T>();
    let (mut leaves, mut nodes) = (1, 0);
    for p in &planned {
        if let Job::Compute { expr, .. } = &p.job {
            let (l, n) = expr.cost();
            leaves = leaves.max(l);
            nodes = nodes.max(n);
        }
    }
    let in_max = models
        .iter()
        .flat_map(|m| m.tensors().values())
        .filter_map(|t| t.float_dtype())
        .map(|d| d.size())
        .max()
        .unwrap_or(2);
    let sub = (CACHE_TARGET / ((leaves + nodes) * tsize)).max(256) / 256 * 256;
    let per_elem = (leaves * in_max + opts.output_dtype.size()) as u64;
    let fixed = (threads * sub * (leaves + nodes) * tsize) as u64;
    let chunk = match opts.chunk_override {
        Some(c) => c.max(1).div_ceil(BLOCK) * BLOCK,
        None => {
            let per_thread =
                (opts.memory_budget.saturating_sub(fixed) / threads as u64).min(TASK_BYTES_MAX);
            let c = (per_thread / per_elem) as usize / BLOCK * BLOCK;
            if c == 0 {
                return Err(Error::Invalid(format!(
                    "memory budget of {} is too small for this merge: {} inputs per key on {} threads need at least {}",
                    crate::size::format_bytes(opts.memory_budget),
                    leaves,
                    threads,
                    crate::size::format_bytes(fixed + per_elem * (threads * BLOCK) as u64)
                )));
            }
            c
        }
    };
    let sub = sub.min(chunk);
    report.chunk_elements = chunk;
    report.threads = threads;
    report.working_set_bytes = fixed + per_elem * (threads * chunk) as u64;

    let out_tensors: Vec<OutputTensor> = planned
        .iter()
        .map(|p| {
            let dtype = match &p.job {
                Job::CopyRaw { model, .. } => models[*model].tensor(&p.name).unwrap().dtype,
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

    let workers = Workers::<T>::new(threads, models.len());
    let out_dtype = opts.output_dtype;
    let out_size = out_dtype.size();
    let written = std::sync::atomic::AtomicU64::new(0);
    let keys_done = std::sync::atomic::AtomicUsize::new(0);
    let run_task = |task: &Task, planned: &[PlannedKey<T>]| -> Result<()> {
        let Job::Compute { expr, numel } = &planned[task.key].job else {
            unreachable!("only computed keys become tasks")
        };
        let len = task.range.len();
        let step = if expr.whole_tensor() { *numel } else { sub };
        workers.with(|s| -> Result<()> {
            let mut out_words = std::mem::take(&mut s.out);
            let bytes = crate::input::aligned_bytes(&mut out_words, len * out_size);
            let mut at = task.range.start;
            while at < task.range.end {
                let r = at..(at + step).min(task.range.end);
                let buf = eval(expr, &r, models, s);
                let o = (r.start - task.range.start) * out_size;
                out_dtype.encode(&buf[..r.len()], &mut bytes[o..o + r.len() * out_size]);
                s.free.push(buf);
                at = r.end;
            }
            let result = out.write_at(task.key, (task.range.start * out_size) as u64, bytes);
            s.out = out_words;
            s.releaser.add(expr, &task.range, models);
            result
        })?;
        let bytes = (len * out_size) as u64;
        written.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        let done = if task.range.end == *numel {
            keys_done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
        } else {
            keys_done.load(std::sync::atomic::Ordering::Relaxed)
        };
        progress.advance(bytes, done, &planned[task.key].name);
        Ok(())
    };
    let run_batch = |tasks: &mut Vec<Task>, planned: &[PlannedKey<T>]| -> Result<()> {
        tasks.par_iter().try_for_each(|t| run_task(t, planned))?;
        tasks.clear();
        Ok(())
    };

    // Keys are executed in name order. The tasks of keys without statistic passes are gathered
    // into one parallel batch; a key with statistic passes first runs the batch so far, then its
    // passes, so per-key statistics never accumulate over many keys.
    let mut tasks: Vec<Task> = Vec::new();
    let mut raw_buf = Vec::new();
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
            written.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
            let done = keys_done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            progress.advance(len, done, name);
            continue;
        }
        let Job::Compute { expr, numel } = &mut planned[ki].job else {
            unreachable!()
        };
        let numel = *numel;
        if expr.has_stats() {
            run_batch(&mut tasks, &planned)?;
            let Job::Compute { expr, .. } = &mut planned[ki].job else {
                unreachable!()
            };
            run_stats(expr, numel, models, &workers)?;
        }
        let Job::Compute { expr, .. } = &planned[ki].job else {
            unreachable!()
        };
        let step = if expr.whole_tensor() {
            numel.max(1)
        } else {
            chunk
        };
        if numel == 0 {
            keys_done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let mut start = 0;
        while start < numel {
            let end = (start + step).min(numel);
            tasks.push(Task {
                key: ki,
                range: start..end,
            });
            start = end;
        }
    }
    let t_exec = Instant::now();
    run_batch(&mut tasks, &planned)?;
    workers.release_all(models);
    if std::env::var_os("AMALGAM_TIMING").is_some() {
        eprintln!(
            "plan+create {:?}, execute {:?}",
            t_exec - started,
            t_exec.elapsed()
        );
    }
    report.bytes_written = written.load(std::sync::atomic::Ordering::Relaxed);
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
            Expr::Leaf(l) => out.push(l.model),
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
