//! The streaming merge engine.
//!
//! 1. **Plan** (headers only): open every input, take the union of their keys, check shapes, and
//!    resolve for each key the expression that computes it: which node applies to which inputs,
//!    with the inputs lacking the key left out or the key taken from a fallback model (the key
//!    policy, see [`KeyAction`]). Every error here comes before any tensor is read.
//! 2. **Statistics** (only for methods that declare passes): per key, every fixed-size block
//!    ([`BLOCK`], rounded up to whole units when a method declares a unit) is fed to the method
//!    and the per-block results are folded in block order.
//! 3. **Execute**: keys in name order are cut into tasks (a run of elements whose encoded output
//!    fits one buffer) and tasks into sub-chunks whose buffers, one per input and per node, fit in
//!    the CPU cache; both sizes follow from the memory budget, the number of inputs and the thread
//!    count, so memory does not grow with the number of models or the size of a tensor. Tasks run
//!    in parallel; each reads its inputs with positioned reads into reused buffers, evaluates the
//!    node expression, encodes the output dtype and writes the result at its fixed offset in the
//!    output. Per element the summation order over models is fixed by the methods, so the bytes
//!    do not depend on threads, task or sub-chunk size.

use crate::arch::Layout;
use crate::dtype::{dtype_name, FloatDtype, OutputDtype};
use crate::error::{Error, Result};
use crate::graph::{Graph, Ref};
use crate::input::ModelFile;
use crate::method::{KeyCtx, KeyMerge, Method, OnMissing, Params};
use crate::methods;
use crate::non_finite::{InputNonFinite, NonFinite};
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
    /// Replace an existing output file (and report file); only regular files are replaced.
    pub overwrite: bool,
    /// Also write the report as JSON here, after the output (checked with it, before any
    /// tensor is read, by the same rules: see [`crate::dest`]).
    pub report_json: Option<PathBuf>,
    /// Resume an interrupted merge into the same output, when its partial file's fingerprint
    /// matches (see [`crate::resume`]).
    pub resume: bool,
    /// Keep the partial file when the merge fails or is cancelled, for a later resume.
    pub keep_partial: bool,
    /// Stops the merge from another thread (a signal handler, a UI).
    pub cancel: crate::resume::Cancel,
    /// Extra `__metadata__` entries (the recipe, for instance).
    pub metadata: BTreeMap<String, String>,
    /// Force this chunk length (elements, rounded to [`BLOCK`]) instead of deriving it from the
    /// budget. For tests of chunk-size invariance.
    pub chunk_override: Option<usize>,
    /// Write the output in this layout (e.g. `sdxl-kohya`) instead of the original one the
    /// merge is computed in.
    pub output_layout: Option<Layout>,
    /// What to do with an input whose tensor for a key holds NaN or Inf.
    pub non_finite: NonFinite,
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
            report_json: None,
            resume: true,
            keep_partial: false,
            cancel: crate::resume::Cancel::default(),
            metadata: BTreeMap::new(),
            chunk_override: None,
            output_layout: None,
            non_finite: NonFinite::Omit,
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
    /// A message for the log (resuming, stale partial files removed).
    fn note(&self, _message: &str) {}
}

/// A progress sink that ignores everything.
pub struct NoProgress;
impl Progress for NoProgress {}

/// Merges the graph's inputs into `opts.output`.
///
/// Model paths are made absolute (links resolved) first, so that the recipe embedded in the
/// output, and so the output's bytes, do not depend on the folder the merge was started from or
/// on the links it was given.
pub fn merge(graph: &Graph, opts: &MergeOptions, progress: &dyn Progress) -> Result<MergeReport> {
    graph.validate()?;
    let input_paths: Vec<&Path> = graph.models.iter().map(|m| m.path.as_path()).collect();
    let mut outputs = vec![opts.output.as_path()];
    outputs.extend(opts.report_json.as_deref());
    crate::dest::check_outputs(&outputs, &input_paths, opts.overwrite)?;
    let graph = &canonical_paths(graph);
    let (models, rows, layouts, notes) = open_inputs(graph, &opts.output)?;
    let layout = graph_layout(graph, &layouts)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads)
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start worker threads: {e}")))?;
    let inputs = RunInputs {
        models: &models,
        rows: &rows,
        layouts: &layouts,
        layout,
        notes: &notes,
    };
    let report = pool.install(|| match opts.compute_dtype {
        ComputeDtype::F32 => run::<f32>(graph, &inputs, opts, progress),
        ComputeDtype::F64 => run::<f64>(graph, &inputs, opts, progress),
    })?;
    if let Some(path) = &opts.report_json {
        let json = serde_json::to_string_pretty(&report).map_err(|e| Error::Output {
            path: path.clone(),
            message: format!("cannot encode the report: {e}"),
        })?;
        crate::dest::write_atomic(path, json.as_bytes(), &input_paths, opts.overwrite)?;
    }
    Ok(report)
}

/// `graph` with every model path that exists made canonical (the others are kept, for the error
/// that names them).
fn canonical_paths(graph: &Graph) -> Graph {
    let mut g = graph.clone();
    for m in &mut g.models {
        if let Ok(p) = std::fs::canonicalize(&m.path) {
            m.path = p;
        }
    }
    g
}

/// What `run` works on.
struct RunInputs<'a> {
    models: &'a [ModelFile],
    rows: &'a [KeyRow],
    layouts: &'a [Option<Layout>],
    /// The layout components are taken from.
    layout: Option<Layout>,
    /// How inputs were read (other key formats, LoRA files).
    notes: &'a [String],
}

/// The layout that decides the components of keys: the fallback model's, else the one most
/// inputs have (the first such in input order). Checks the recipe's component names against it.
fn graph_layout(graph: &Graph, layouts: &[Option<Layout>]) -> Result<Option<Layout>> {
    // Files in another key format are read as the original layout.
    let layouts: Vec<Option<Layout>> = layouts
        .iter()
        .map(|l| l.map(|l| crate::formats::canonical(l).unwrap_or(l)))
        .collect();
    let layouts = layouts.as_slice();
    let layout = match graph.fallback.and_then(|f| layouts[f]) {
        Some(l) => Some(l),
        None => {
            let mut best: Option<(Layout, usize)> = None;
            for l in layouts.iter().flatten() {
                let n = layouts.iter().filter(|x| **x == Some(*l)).count();
                if best.is_none_or(|(_, bn)| n > bn) {
                    best = Some((*l, n));
                }
            }
            best.map(|(l, _)| l)
        }
    };
    if graph.components.is_empty() {
        return Ok(layout);
    }
    let Some(layout) = layout else {
        return Err(Error::Invalid(format!(
            "the recipe routes components ({}) but no input has a known architecture",
            graph
                .components
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let known = layout.components();
    for c in graph.components.keys() {
        if !known.contains(&c.as_str()) {
            return Err(Error::Invalid(format!(
                "component `{c}` is not a component of {layout} (its components: {})",
                known.join(", ")
            )));
        }
    }
    Ok(Some(layout))
}

/// Opens every input, refusing an output path that is one of them, and builds the key table.
/// The inputs, the key table, and each input's detected layout.
type Inputs = (
    Vec<ModelFile>,
    Vec<KeyRow>,
    Vec<Option<Layout>>,
    Vec<String>,
);

fn open_inputs(graph: &Graph, output: &Path) -> Result<Inputs> {
    let out_id = file_identity(output);
    let paths: Vec<&Path> = graph.models.iter().map(|m| m.path.as_path()).collect();
    let mut table = KeyTable {
        rows: BTreeMap::new(),
        n: paths.len(),
        layouts: Vec::new(),
        notes: Vec::new(),
    };
    let mut models = Vec::with_capacity(graph.models.len());
    for (i, m) in graph.models.iter().enumerate() {
        if out_id.is_some() && file_identity(&m.path) == out_id {
            return Err(Error::Output {
                path: output.to_path_buf(),
                message: format!("is the input `{}`; refusing to overwrite an input", m.name),
            });
        }
        let mut model = ModelFile::open(&m.path)?;
        let layout = crate::arch::detect(
            model
                .tensors()
                .iter()
                .map(|(k, t)| (k.as_str(), t.shape.as_slice(), t.numel())),
        )
        .layout;
        table.add(i, &model, layout, &paths)?;
        model.forget_index();
        models.push(model);
    }
    Ok((
        models,
        table.rows.into_values().collect(),
        table.layouts,
        table.notes,
    ))
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
    Node(Box<NodeExpr<T>>),
}

/// A method applied to its arguments for one key.
struct NodeExpr<T: Real> {
    state: Box<dyn KeyMerge<T>>,
    args: Vec<Expr<T>>,
}

impl<T: Real> Expr<T> {
    /// Inputs read and intermediate buffers held per element of a chunk.
    fn cost(&self) -> (usize, usize) {
        match self {
            Expr::Leaf(_) => (1, 0),
            Expr::Node(node) => node.args.iter().fold((0, 1), |(l, n), a| {
                let (al, an) = a.cost();
                (l + al, n + an)
            }),
        }
    }
    fn has_stats(&self) -> bool {
        match self {
            Expr::Leaf(_) => false,
            Expr::Node(node) => {
                node.state.stat_passes() > 0 || node.args.iter().any(|a| a.has_stats())
            }
        }
    }
    /// The elements that must stay together: the least common multiple of the nodes' units.
    fn unit(&self) -> usize {
        match self {
            Expr::Leaf(_) => 1,
            Expr::Node(node) => node
                .args
                .iter()
                .fold(node.state.unit().max(1), |u, a| lcm(u, a.unit())),
        }
    }
    /// Whether a leaf reads the key transposed from its file.
    fn reads_transposed(&self, row: &KeyRow) -> bool {
        match self {
            Expr::Leaf(l) => matches!(row.view(&l.loc(row)), View::Transposed { .. }),
            Expr::Node(node) => node.args.iter().any(|a| a.reads_transposed(row)),
        }
    }
    /// The notes of every node, children first.
    fn notes(&self, out: &mut Vec<String>) {
        if let Expr::Node(node) = self {
            for a in &node.args {
                a.notes(out);
            }
            out.extend(node.state.notes());
        }
    }
}

fn lcm(a: usize, b: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    a / gcd(a, b) * b
}

/// Where one input's tensor lies.
#[derive(Clone, Copy, Debug)]
struct Leaf {
    model: u32,
}

impl Leaf {
    fn new(row: &KeyRow, model: usize) -> Self {
        debug_assert!(row.locs[model].is_some());
        Leaf {
            model: model as u32,
        }
    }
    /// Where this leaf's model stores the key of `row`.
    fn loc(&self, row: &KeyRow) -> Loc {
        row.locs[self.model as usize].expect("model has the key")
    }
    /// The float dtype it is stored in.
    fn dtype(&self, row: &KeyRow) -> FloatDtype {
        FloatDtype::from_safetensors(self.loc(row).dtype).expect("float key")
    }
}

/// Where one model stores one key, and how (as a model's keys are listed).
#[derive(Clone, Copy, Debug)]
struct Place {
    offset: u64,
    dtype: safetensors::Dtype,
    view: View,
}

/// Where one model stores one key, as the key table holds it: 16 bytes, since the table has one
/// per key and model. A view other than [`View::Plain`] is in the row's `views`.
#[derive(Clone, Copy, Debug)]
struct Loc {
    offset: u64,
    /// Index in [`KeyRow::views`], or [`PLAIN`].
    view: u32,
    dtype: safetensors::Dtype,
}

/// [`Loc::view`] of a key stored as is.
const PLAIN: u32 = u32::MAX;

const _: () = assert!(std::mem::size_of::<Option<Loc>>() == 16);

/// How a key's elements are laid out in a file saved in another key format (see [`formats`](crate::formats)).
#[derive(Clone, Copy, Debug, PartialEq)]
enum View {
    /// Stored as is.
    Plain,
    /// Three tensors of `part` elements each, stacked (the first at `offset`).
    Concat3 { part: u64, second: u64, third: u64 },
    /// Stored transposed: the file's tensor is `[rows, cols]`.
    Transposed { rows: u64, cols: u64 },
    /// The delta of a LoRA module: `scale · up · down`, spec `i` of the row's `lora`.
    Lora(u32),
}

/// Where the two factors of a LoRA module are and how they combine.
#[derive(Clone, Debug)]
struct LoraSpec {
    up: u64,
    up_dtype: FloatDtype,
    down: u64,
    down_dtype: FloatDtype,
    /// `up` is `[out, rank]`, `down` is `[rank, inner]` (inner = in · kh · kw).
    out: usize,
    rank: usize,
    inner: usize,
    /// `alpha / rank`.
    scale: f64,
}

impl Loc {
    /// Decodes elements `start..start + dst.len()` of the key of `row`; returns whether they
    /// are all finite (checked as they are decoded, see [`crate::non_finite`]).
    fn read<T: Real>(
        &self,
        row: &KeyRow,
        model: &ModelFile,
        start: usize,
        dst: &mut [T],
        scratch: &mut Vec<u64>,
    ) -> Result<bool> {
        let dtype = FloatDtype::from_safetensors(self.dtype).expect("float key");
        match row.view(self) {
            View::Lora(i) => {
                let sp = &row.lora[i as usize];
                let mut up = vec![T::ZERO; sp.out * sp.rank];
                let mut down = vec![T::ZERO; sp.rank * sp.inner];
                model.decode(sp.up, sp.up_dtype, 0, &mut up, scratch)?;
                model.decode(sp.down, sp.down_dtype, 0, &mut down, scratch)?;
                let scale = T::from_f64(sp.scale);
                for (k, d) in dst.iter_mut().enumerate() {
                    let e = start + k;
                    let (o, c) = (e / sp.inner, e % sp.inner);
                    let mut sum = T::ZERO;
                    for r in 0..sp.rank {
                        sum += up[o * sp.rank + r] * down[r * sp.inner + c];
                    }
                    *d = sum * scale;
                }
                Ok(crate::non_finite::all_finite(dst))
            }
            View::Plain => model.decode_checked(self.offset, dtype, start, dst, scratch),
            View::Concat3 {
                part,
                second,
                third,
            } => {
                let part = part as usize;
                let offsets = [self.offset, second, third];
                let (mut at, mut finite) = (0, true);
                while at < dst.len() {
                    let e = start + at;
                    let within = e % part;
                    let n = (part - within).min(dst.len() - at);
                    finite &= model.decode_checked(
                        offsets[e / part],
                        dtype,
                        within,
                        &mut dst[at..at + n],
                        scratch,
                    )?;
                    at += n;
                }
                Ok(finite)
            }
            View::Transposed { rows, cols } => {
                let (rows, cols) = (rows as usize, cols as usize);
                let mut full = vec![T::ZERO; rows * cols];
                model.decode(self.offset, dtype, 0, &mut full, scratch)?;
                for (k, d) in dst.iter_mut().enumerate() {
                    let e = start + k;
                    *d = full[(e % rows) * cols + e / rows];
                }
                Ok(crate::non_finite::all_finite(dst))
            }
        }
    }
}

/// One key of the union of the inputs' keys.
#[derive(Clone)]
struct KeyRow {
    name: String,
    shape: Vec<usize>,
    /// The first model (in input order) that has the key.
    first: usize,
    /// Per model, where it stores the key.
    locs: Vec<Option<Loc>>,
    /// The LoRA modules of the inputs that are LoRA files (see [`View::Lora`]).
    lora: Vec<LoraSpec>,
    /// The views of the locations that are not plain.
    views: Vec<View>,
}

impl KeyRow {
    fn view(&self, loc: &Loc) -> View {
        if loc.view == PLAIN {
            View::Plain
        } else {
            self.views[loc.view as usize]
        }
    }
    /// Files `place` as input `i`'s location of the key.
    fn locate(&mut self, i: usize, place: Place) {
        let view = if place.view == View::Plain {
            PLAIN
        } else {
            self.views.push(place.view);
            (self.views.len() - 1) as u32
        };
        self.locs[i] = Some(Loc {
            offset: place.offset,
            view,
            dtype: place.dtype,
        });
    }
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    fn dtype(&self) -> safetensors::Dtype {
        self.locs[self.first].unwrap().dtype
    }
    fn is_float(&self) -> bool {
        FloatDtype::from_safetensors(self.dtype()).is_some()
    }
}

/// Builds the union of the inputs' keys, in name order, from each header as the input is
/// opened; the header is then dropped, so memory per input is 16 bytes per key.
struct KeyTable {
    rows: BTreeMap<String, KeyRow>,
    n: usize,
    layouts: Vec<Option<Layout>>,
    /// Lines for the report about how inputs were read.
    notes: Vec<String>,
}

impl KeyTable {
    /// Adds the keys of input `i`, read as the original layout when it was saved in another key
    /// format (`layout`).
    fn add(
        &mut self,
        i: usize,
        model: &ModelFile,
        layout: Option<Layout>,
        paths: &[&Path],
    ) -> Result<()> {
        let viewed = viewed_keys(model, layout, paths[i])?;
        self.notes.extend(viewed.notes);
        for (name, shape, loc, lora) in viewed.keys {
            let inserted = self.insert(i, &name, shape, loc, lora, paths);
            if let Err(Error::ShapeMismatch { .. }) = &inserted {
                let first = self.rows[&name].first;
                if let Some(e) =
                    mixed_archs(paths, (first, self.layouts[first]), (i, viewed.layout))
                {
                    return Err(e);
                }
            }
            inserted?;
        }
        self.layouts.push(viewed.layout);
        Ok(())
    }

    fn insert(
        &mut self,
        i: usize,
        name: &str,
        shape: Vec<usize>,
        mut loc: Place,
        lora: Option<LoraSpec>,
        paths: &[&Path],
    ) -> Result<()> {
        {
            let e_dtype = loc.dtype;
            if let Some(why) = crate::dtype::unsupported_float(e_dtype) {
                return Err(Error::UnsupportedDtype {
                    path: paths[i].to_path_buf(),
                    key: name.to_string(),
                    dtype: format!("{} ({why})", dtype_name(e_dtype)),
                });
            }
            let float = FloatDtype::from_safetensors(e_dtype).is_some();
            match self.rows.get_mut(name) {
                None => {
                    let mut specs = Vec::new();
                    if let Some(spec) = lora {
                        loc.view = View::Lora(0);
                        specs.push(spec);
                    }
                    let mut row = KeyRow {
                        name: name.to_string(),
                        shape,
                        first: i,
                        locs: vec![None; self.n],
                        lora: specs,
                        views: Vec::new(),
                    };
                    row.locate(i, loc);
                    self.rows.insert(name.to_string(), row);
                }
                Some(row) => {
                    if let Some(spec) = lora {
                        loc.view = View::Lora(row.lora.len() as u32);
                        row.lora.push(spec);
                    }
                    if row.shape != shape {
                        return Err(Error::ShapeMismatch {
                            key: name.to_string(),
                            first_path: paths[row.first].to_path_buf(),
                            first_shape: row.shape.clone(),
                            second_path: paths[i].to_path_buf(),
                            second_shape: shape,
                        });
                    }
                    if float != row.is_float() {
                        return Err(Error::Invalid(format!(
                            "key `{name}` is {} in {} but {} in {}",
                            dtype_name(row.dtype()),
                            paths[row.first].display(),
                            dtype_name(e_dtype),
                            paths[i].display()
                        )));
                    }
                    row.locate(i, loc);
                }
            }
        }
        Ok(())
    }
}

/// The error for a shape mismatch between inputs `a` and `b` (index, detected layout) when
/// their architectures differ: that, not the first key's shape, is what is wrong.
fn mixed_archs(
    paths: &[&Path],
    a: (usize, Option<Layout>),
    b: (usize, Option<Layout>),
) -> Option<Error> {
    let (Some(la), Some(lb)) = (a.1, b.1) else {
        return None;
    };
    let name = |l: Layout| match l.arch() {
        crate::arch::Arch::Sd1 => "SD1",
        crate::arch::Arch::Sdxl => "SDXL",
        crate::arch::Arch::Sd3 => "SD3",
        crate::arch::Arch::Flux => "FLUX",
    };
    (la.arch() != lb.arch()).then(|| {
        Error::Invalid(format!(
            "{} is {} ({la}) but {} is {} ({lb}): models of different architectures cannot be merged",
            paths[a.0].display(),
            name(la),
            paths[b.0].display(),
            name(lb)
        ))
    })
}

/// One key of a model as the engine sees it.
type ViewedKey = (String, Vec<usize>, Place, Option<LoraSpec>);

/// A model's keys as the engine sees them, the layout it counts as, and notes for the report.
struct Viewed {
    keys: Vec<ViewedKey>,
    layout: Option<Layout>,
    notes: Vec<String>,
}

/// `shape` with trailing unit dimensions added or removed to match the layout's key `key`
/// (ldm's 1×1 convolutions are diffusers' and LoRA's linear layers).
fn unit_dims_like(mut shape: Vec<usize>, to: Layout, key: &str) -> Vec<usize> {
    if let Some(lk) = to.get(key) {
        let ones = |s: &[usize]| s.iter().rev().take_while(|&&d| d == 1).count();
        while shape.len() < lk.shape.len() && ones(&lk.shape) > ones(&shape) {
            shape.push(1);
        }
        while shape.len() > lk.shape.len() && shape.last() == Some(&1) {
            shape.pop();
        }
    }
    shape
}

/// A kohya LoRA file read as a delta model of the original layout.
fn lora_keys(model: &ModelFile, path: &Path) -> Result<Viewed> {
    let tensors = model.tensors();
    let names: Vec<&str> = tensors.keys().map(String::as_str).collect();
    let (layout, modules, unknown) = crate::formats::lora_modules(&names);
    let Some(to) = layout else {
        return Err(Error::Invalid(format!(
            "{}: a LoRA file, but none of its modules names an SD1 or SDXL key (e.g. `{}`)",
            path.display(),
            unknown.first().map_or("", String::as_str)
        )));
    };
    let float = |k: &str| -> Result<(&crate::input::TensorEntry, FloatDtype)> {
        let e = &tensors[k];
        let d = e.float_dtype().ok_or_else(|| {
            Error::Invalid(format!("{}: `{k}` is not a float tensor", path.display()))
        })?;
        Ok((e, d))
    };
    let mut keys = Vec::new();
    for m in &modules {
        let (up, up_dtype) = float(&m.up)?;
        let (down, down_dtype) = float(&m.down)?;
        let rank = *down.shape.first().unwrap_or(&0);
        let out = *up.shape.first().unwrap_or(&0);
        if rank == 0 || up.shape.get(1) != Some(&rank) || up.numel() != out * rank {
            return Err(Error::Invalid(format!(
                "{}: LoRA module `{}`: up {:?} and down {:?} do not share a rank",
                path.display(),
                m.up.trim_end_matches(".lora_up.weight"),
                up.shape,
                down.shape
            )));
        }
        let alpha = match &m.alpha {
            Some(a) => {
                let (e, d) = float(a)?;
                let mut v = [0f64];
                model.decode(e.offset, d, 0, &mut v, &mut Vec::new())?;
                v[0]
            }
            None => rank as f64,
        };
        let mut shape = vec![out];
        shape.extend_from_slice(&down.shape[1..]);
        let shape = unit_dims_like(shape, to, &m.target);
        let spec = LoraSpec {
            up: up.offset,
            up_dtype,
            down: down.offset,
            down_dtype,
            out,
            rank,
            inner: down.numel() / rank,
            scale: alpha / rank as f64,
        };
        let loc = Place {
            offset: up.offset,
            dtype: up.dtype,
            view: View::Plain,
        };
        keys.push((m.target.clone(), shape, loc, Some(spec)));
    }
    let mut notes = vec![format!(
        "{}: a LoRA for {to}: {} modules read as deltas",
        path.display(),
        modules.len()
    )];
    if !unknown.is_empty() {
        notes.push(format!(
            "{}: {} LoRA modules left out: they name no whole key of {to} (e.g. `{}`; CLIP-G q/k/v are parts of a fused key)",
            path.display(),
            unknown.len(),
            unknown[0]
        ));
    }
    Ok(Viewed {
        keys,
        layout: Some(to),
        notes,
    })
}

/// The keys of a model as the engine sees them: its own, or for a file saved in another key
/// format (kohya, diffusers), the original layout's keys read through a [`View`], or for a LoRA
/// file, the deltas it encodes.
fn viewed_keys(model: &ModelFile, layout: Option<Layout>, path: &Path) -> Result<Viewed> {
    let tensors = model.tensors();
    let names: Vec<&str> = tensors.keys().map(String::as_str).collect();
    if crate::formats::is_lora(&names) {
        return lora_keys(model, path);
    }
    let plain = |e: &crate::input::TensorEntry| Place {
        offset: e.offset,
        dtype: e.dtype,
        view: View::Plain,
    };
    let (Some(from), Some(to)) = (layout, layout.and_then(crate::formats::canonical)) else {
        return Ok(Viewed {
            keys: tensors
                .iter()
                .map(|(k, e)| (k.clone(), e.shape.clone(), plain(e), None))
                .collect(),
            layout,
            notes: Vec::new(),
        });
    };
    let map = crate::formats::to_canonical(from, &names);
    let mut used = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(tensors.len());
    for (key, src) in &map {
        let entries: Vec<&crate::input::TensorEntry> =
            src.keys().iter().map(|k| &tensors[*k]).collect();
        used.extend(src.keys().into_iter().map(str::to_string));
        let e = entries[0];
        let (shape, view) = match src {
            crate::formats::Source::Rename(_) => {
                (unit_dims_like(e.shape.clone(), to, key), View::Plain)
            }
            crate::formats::Source::Concat(_) => {
                let same = entries
                    .iter()
                    .all(|x| x.shape == e.shape && x.dtype == e.dtype);
                if !same {
                    return Err(Error::Invalid(format!(
                        "{}: the q/k/v parts of `{key}` ({}) differ in shape or dtype",
                        path.display(),
                        src.keys().join(", ")
                    )));
                }
                let mut shape = e.shape.clone();
                shape[0] *= 3;
                let view = View::Concat3 {
                    part: e.numel() as u64,
                    second: entries[1].offset,
                    third: entries[2].offset,
                };
                (shape, view)
            }
            crate::formats::Source::Transpose(_) => {
                let [rows, cols] = e.shape[..] else {
                    return Err(Error::Invalid(format!(
                        "{}: `{}` should be 2-D to be transposed into `{key}`",
                        path.display(),
                        src.keys()[0]
                    )));
                };
                (
                    vec![cols, rows],
                    View::Transposed {
                        rows: rows as u64,
                        cols: cols as u64,
                    },
                )
            }
        };
        out.push((
            key.clone(),
            shape,
            Place {
                offset: e.offset,
                dtype: e.dtype,
                view,
            },
            None,
        ));
    }
    for (k, e) in tensors {
        if !used.contains(k) {
            out.push((k.clone(), e.shape.clone(), plain(e), None));
        }
    }
    Ok(Viewed {
        keys: out,
        layout: Some(from),
        notes: vec![format!(
            "{}: {from} key names, read as {to}",
            path.display()
        )],
    })
}

/// Where a computed key goes in the output file.
enum OutView {
    /// Output tensor `i`, as computed.
    Same(usize),
    /// Split in three row blocks (q, k, v) of `part` elements into output tensors `ids`.
    Split3 { ids: [usize; 3], part: usize },
    /// Output tensor `i` is the computed `[rows, cols]` tensor transposed.
    Transposed { i: usize, rows: usize, cols: usize },
}

impl OutView {
    /// The output tensors this key is written to.
    fn tensors(&self) -> Vec<usize> {
        match *self {
            OutView::Same(i) | OutView::Transposed { i, .. } => vec![i],
            OutView::Split3 { ids, .. } => ids.to_vec(),
        }
    }

    /// The file position the first of the encoded elements from element `start` on goes to.
    fn file_pos(&self, out: &OutputFile, start: usize, size: usize) -> u64 {
        match *self {
            OutView::Same(i) => out.file_pos(i, (start * size) as u64),
            OutView::Split3 { ids, part } => {
                out.file_pos(ids[start / part], ((start % part) * size) as u64)
            }
            OutView::Transposed { i, .. } => out.file_pos(i, 0),
        }
    }

    /// Writes the encoded elements starting at element `start` (`size` bytes each).
    fn write(&self, out: &OutputFile, start: usize, size: usize, bytes: &mut [u8]) -> Result<()> {
        match *self {
            OutView::Same(i) => out.write_at(i, (start * size) as u64, bytes),
            OutView::Split3 { ids, part } => {
                let total = bytes.len() / size;
                let mut at = 0;
                while at < total {
                    let e = start + at;
                    let within = e % part;
                    let n = (part - within).min(total - at);
                    out.write_at(
                        ids[e / part],
                        (within * size) as u64,
                        &bytes[at * size..(at + n) * size],
                    )?;
                    at += n;
                }
                Ok(())
            }
            OutView::Transposed { i, rows, cols } => {
                debug_assert_eq!((start, bytes.len()), (0, rows * cols * size));
                let mut t = vec![0u8; bytes.len()];
                for r in 0..rows {
                    for c in 0..cols {
                        let (from, to) = ((r * cols + c) * size, (c * rows + r) * size);
                        t[to..to + size].copy_from_slice(&bytes[from..from + size]);
                    }
                }
                out.write_at(i, 0, &t)
            }
        }
    }
}

/// The output tensors and where each planned key goes: the keys as computed, or with
/// `opts.output_layout`, the names, shapes and splits of that layout.
fn output_views<T: Real>(
    planned: &[PlannedKey<T>],
    rows: &[KeyRow],
    layout: Option<Layout>,
    opts: &MergeOptions,
) -> Result<(Vec<OutputTensor>, Vec<OutView>)> {
    let dtype_of = |p: &PlannedKey<T>| match &p.job {
        Job::CopyRaw { .. } => rows[p.row].dtype(),
        Job::Compute { .. } | Job::Done => opts.output_dtype.safetensors(),
    };
    let mut tensors = Vec::with_capacity(planned.len());
    let mut views = Vec::with_capacity(planned.len());
    let map = match opts.output_layout {
        None => None,
        Some(target) => {
            let canonical = crate::formats::canonical(target).unwrap_or(target);
            if Some(canonical) != layout {
                return Err(Error::Invalid(format!(
                    "cannot write the output as {target}: the merge is {}",
                    layout.map_or("of no known architecture".to_string(), |l| l.to_string())
                )));
            }
            let names: Vec<&str> = target.keys().iter().map(|k| k.key.as_str()).collect();
            Some((target, crate::formats::to_canonical(target, &names)))
        }
    };
    for p in planned {
        let row = &rows[p.row];
        let dtype = dtype_of(p);
        let source = map
            .as_ref()
            .and_then(|(t, m)| Some((*t, m.get(&row.name)?)));
        let float = matches!(p.job, Job::Compute { .. } | Job::Done);
        match source {
            Some((target, crate::formats::Source::Rename(k))) => {
                views.push(OutView::Same(tensors.len()));
                tensors.push(OutputTensor {
                    name: k.clone(),
                    dtype,
                    shape: unit_dims_like(row.shape.clone(), target, k),
                });
            }
            Some((_, crate::formats::Source::Concat(ks))) if float && row.shape[0] % 3 == 0 => {
                let mut shape = row.shape.clone();
                shape[0] /= 3;
                let first = tensors.len();
                for k in ks {
                    tensors.push(OutputTensor {
                        name: k.clone(),
                        dtype,
                        shape: shape.clone(),
                    });
                }
                views.push(OutView::Split3 {
                    ids: [first, first + 1, first + 2],
                    part: row.numel() / 3,
                });
            }
            Some((_, crate::formats::Source::Transpose(k))) if float && row.shape.len() == 2 => {
                views.push(OutView::Transposed {
                    i: tensors.len(),
                    rows: row.shape[0],
                    cols: row.shape[1],
                });
                tensors.push(OutputTensor {
                    name: k.clone(),
                    dtype,
                    shape: vec![row.shape[1], row.shape[0]],
                });
            }
            _ => {
                views.push(OutView::Same(tensors.len()));
                tensors.push(OutputTensor {
                    name: row.name.clone(),
                    dtype,
                    shape: row.shape.clone(),
                });
            }
        }
    }
    Ok((tensors, views))
}

/// What to do for one output key.
enum Job<T: Real> {
    Compute {
        expr: Expr<T>,
        numel: usize,
    },
    CopyRaw {
        model: usize,
        offset: u64,
        len: u64,
    },
    /// Written; the key's state (statistics, masks) is dropped.
    Done,
}

struct PlannedKey<T: Real> {
    /// Index into the key table.
    row: usize,
    job: Job<T>,
}

/// A node's method: one instance, or one per block id when parameters are given per block.
struct NodeMethods<T: Real> {
    /// The block id of each instance; empty for a single instance.
    blocks: Vec<&'static str>,
    instances: Vec<Box<dyn Method<T>>>,
    /// The layout and key → block mapping the blocks are found with.
    layout: Option<Layout>,
    mapping: crate::arch::BlockMapping,
}

impl<T: Real> NodeMethods<T> {
    fn build(node: &crate::graph::Node, layout: Option<Layout>) -> Result<Self> {
        let build = |params| {
            methods::build::<T>(
                node.method,
                Params::new(node.method, params),
                &node.counts(),
            )
        };
        let mapping = match node.params.get(crate::method::BLOCK_MAPPING) {
            None => crate::arch::BlockMapping::Supermerger,
            Some(crate::method::ParamValue::Text(t)) if t == "supermerger" => {
                crate::arch::BlockMapping::Supermerger
            }
            Some(crate::method::ParamValue::Text(t)) if t == "sd_mecha" => {
                crate::arch::BlockMapping::SdMecha
            }
            Some(other) => {
                return Err(Error::Invalid(format!(
                    "node `{}`: `blocks` is `supermerger` or `sd_mecha`, got {other:?}",
                    node.name
                )))
            }
        };
        if !node.has_block_params() {
            return Ok(NodeMethods {
                blocks: Vec::new(),
                instances: vec![build(crate::method::params_for_block(&node.params, None))?],
                layout,
                mapping,
            });
        }
        let ids = layout
            .filter(|&l| crate::arch::block_of(l, "").is_some())
            .and_then(|l| crate::arch::block_ids(l.arch()))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "node `{}` has per-block parameters, which need SD1 (ldm) or SDXL (sgm) checkpoints; the inputs are {}",
                    node.name,
                    layout.map_or("of no known architecture".to_string(), |l| l.to_string())
                ))
            })?;
        for v in node.params.values() {
            if let crate::method::ParamValue::Blocks(map) = v {
                if let Some(bad) = map
                    .keys()
                    .find(|k| *k != "default" && !ids.contains(&k.as_str()))
                {
                    return Err(Error::Invalid(format!(
                        "node `{}`: block `{bad}` does not exist in {} (blocks: {})",
                        node.name,
                        layout.unwrap(),
                        ids.join(", ")
                    )));
                }
            }
        }
        Ok(NodeMethods {
            layout,
            mapping,
            blocks: ids.to_vec(),
            instances: ids
                .iter()
                .map(|b| build(crate::method::params_for_block(&node.params, Some(b))))
                .collect::<Result<_>>()
                .map_err(|e| Error::Invalid(format!("node `{}`: {e}", node.name)))?,
        })
    }

    /// The instance for key `key` (the `BASE` one for keys without a block).
    fn get(&self, key: Option<&str>) -> &dyn Method<T> {
        if self.blocks.is_empty() {
            return &*self.instances[0];
        }
        let block = key.and_then(|k| crate::arch::block_of_with(self.layout?, k, self.mapping));
        let i = block
            .and_then(|b| self.blocks.iter().position(|x| *x == b))
            .unwrap_or(0);
        &*self.instances[i]
    }
}

/// Resolves `r` for the key of `row` (`key` is its name, for per-block methods): `None` when
/// it has no value for the key.
#[allow(clippy::too_many_arguments)]
fn resolve<T: Real>(
    r: Ref,
    row: &KeyRow,
    key: Option<&str>,
    graph: &Graph,
    methods: &[NodeMethods<T>],
    seed: u64,
    unit_budget: u64,
    notes: &mut Vec<String>,
) -> Result<Option<Expr<T>>> {
    match r {
        Ref::Model(m) => Ok(if row.locs[m].is_some() {
            Some(Expr::Leaf(Leaf::new(row, m)))
        } else {
            // A pruned model completed from the repair model.
            graph
                .repair
                .filter(|&r| row.locs[r].is_some())
                .map(|r| Expr::Leaf(Leaf::new(row, r)))
        }),
        Ref::Node(n) => {
            let node = &graph.nodes[n];
            let mut args = Vec::new();
            for a in node.flat_args() {
                args.push(resolve(
                    a,
                    row,
                    key,
                    graph,
                    methods,
                    seed,
                    unit_budget,
                    notes,
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
                methods[n].get(key).on_missing(&present)
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
                        key: &row.name,
                        shape: &row.shape,
                        present: &idx,
                        n_args: present.len(),
                        seed,
                        unit_budget,
                    };
                    let state = methods[n].get(key).begin_key(&ctx).map_err(|e| {
                        Error::Invalid(format!("node `{}`, key `{}`: {e}", node.name, row.name))
                    })?;
                    Ok(Some(Expr::Node(Box::new(NodeExpr {
                        state,
                        args: args.into_iter().flatten().collect(),
                    }))))
                }
            }
        }
    }
}

/// The node methods of `graph` and the job of every key.
fn plan<T: Real>(
    graph: &Graph,
    rows: &[KeyRow],
    layout: Option<Layout>,
    opts: &MergeOptions,
    report: &mut MergeReport,
) -> Result<(Vec<NodeMethods<T>>, Vec<PlannedKey<T>>)> {
    let methods: Vec<NodeMethods<T>> = graph
        .nodes
        .iter()
        .map(|n| NodeMethods::build(n, layout))
        .collect::<Result<_>>()?;
    for (node, method) in graph.nodes.iter().zip(&methods) {
        for note in method.get(None).notes() {
            report
                .notes
                .push(format!("node `{}` ({}): {note}", node.name, node.method));
        }
    }

    let mut planned = Vec::with_capacity(rows.len());
    for (ri, row) in rows.iter().enumerate() {
        for (i, loc) in row.locs.iter().enumerate() {
            if loc.is_none() {
                report.lacking[i].push(row.name.clone());
                if graph.repair.is_some_and(|r| row.locs[r].is_some()) {
                    report.repaired[i] += 1;
                }
            }
        }
        let (job, action) = plan_key(graph, row, layout, &methods, opts)?;
        report.actions.push((row.name.clone(), action));
        planned.push(PlannedKey { row: ri, job });
    }
    Ok((methods, planned))
}

/// The job of the key of `row`, and what the report says of it.
fn plan_key<T: Real>(
    graph: &Graph,
    row: &KeyRow,
    layout: Option<Layout>,
    methods: &[NodeMethods<T>],
    opts: &MergeOptions,
) -> Result<(Job<T>, KeyAction)> {
    // The node (or model) this key's component is routed to.
    let target = layout
        .and_then(|l| l.component_of(&row.name))
        .and_then(|c| graph.components.get(c))
        .copied()
        .unwrap_or(graph.output);
    if !row.is_float() {
        return Ok((
            Job::CopyRaw {
                model: row.first,
                offset: row.locs[row.first].unwrap().offset,
                len: (row.numel() * row.dtype().bitsize() / 8) as u64,
            },
            KeyAction::CopiedUnchanged { model: row.first },
        ));
    }
    let mut notes = Vec::new();
    let expr = resolve(
        target,
        row,
        Some(row.name.as_str()),
        graph,
        methods,
        opts.seed,
        opts.memory_budget / 4,
        &mut notes,
    )?;
    let (expr, action) = match expr {
        Some(Expr::Leaf(leaf)) => (
            Expr::Leaf(leaf),
            KeyAction::Taken {
                model: leaf.model as usize,
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
                Some(f) if row.locs[f].is_some() => f,
                _ => row.first,
            };
            (
                Expr::Leaf(Leaf::new(row, m)),
                KeyAction::Taken {
                    model: m,
                    because: TakenBecause::Fallback(notes.join("; ")),
                },
            )
        }
    };
    Ok((
        Job::Compute {
            expr,
            numel: row.numel(),
        },
        action,
    ))
}

/// The number of NaN and Inf values in model `m`'s tensor for the key of `row` (one read of it).
fn count_non_finite<T: Real>(row: &KeyRow, m: usize, models: &[ModelFile]) -> Result<u64> {
    let loc = row.locs[m].expect("model has the key");
    let numel = row.numel();
    // Views that decode the whole tensor for any part are read whole.
    let step = match row.view(&loc) {
        View::Plain | View::Concat3 { .. } => BLOCK.min(numel).max(1),
        _ => numel.max(1),
    };
    let (mut buf, mut raw) = (vec![T::ZERO; step], Vec::new());
    let mut n = 0;
    for start in (0..numel).step_by(step) {
        let len = step.min(numel - start);
        loc.read(row, &models[m], start, &mut buf[..len], &mut raw)?;
        n += crate::non_finite::count(&buf[..len]);
    }
    Ok(n)
}

/// One unit of parallel work: elements `range` of planned key `key`, computed in cache-sized
/// sub-chunks into one output buffer that is then written with one call.
struct Task {
    key: usize,
    range: Range<usize>,
    /// The sub-chunk length (a multiple of the key's unit).
    step: usize,
}

/// Reusable buffers of one worker thread.
struct Scratch<T> {
    free: Vec<Vec<T>>,
    raw: Vec<u64>,
    out: Vec<u64>,
    /// The models whose values read since this was last cleared hold NaN or Inf.
    bad: Vec<u32>,
    /// Set those values to zero (see [`NonFinite::cleans`]).
    clean: bool,
}

impl<T: Real> Scratch<T> {
    fn new(clean: bool) -> Self {
        Scratch {
            free: Vec::new(),
            raw: Vec::new(),
            out: Vec::new(),
            bad: Vec::new(),
            clean,
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
    fn new(threads: usize, clean: bool) -> Self {
        Workers {
            slots: (0..threads.max(1))
                .map(|_| std::sync::Mutex::new(Scratch::new(clean)))
                .collect(),
        }
    }
    /// Whether non-finite input values are set to zero when found.
    fn set_clean(&self, clean: bool) {
        for slot in &self.slots {
            slot.lock().unwrap_or_else(|e| e.into_inner()).clean = clean;
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
    row: &KeyRow,
    range: &Range<usize>,
    models: &[ModelFile],
    s: &mut Scratch<T>,
) -> Result<Vec<T>> {
    let len = range.len();
    match expr {
        Expr::Leaf(l) => {
            let mut buf = s.take(len);
            let finite = l.loc(row).read(
                row,
                &models[l.model as usize],
                range.start,
                &mut buf[..len],
                &mut s.raw,
            )?;
            if !finite {
                s.bad.push(l.model);
                if s.clean {
                    crate::non_finite::clean(&mut buf[..len]);
                }
            }
            Ok(buf)
        }
        Expr::Node(node) => {
            let mut bufs = Vec::with_capacity(node.args.len());
            for a in &node.args {
                bufs.push(eval(a, row, range, models, s)?);
            }
            let mut out = s.take(len);
            {
                let refs: Vec<&[T]> = bufs.iter().map(|b| &b[..len]).collect();
                node.state
                    .merge_chunk(range.clone(), &refs, &mut out[..len]);
            }
            s.free.extend(bufs);
            Ok(out)
        }
    }
}

/// Runs the statistic passes of every node of `expr`, children first.
///
/// Blocks are [`BLOCK`] elements rounded up to whole units of the expression; `in_flight` bounds
/// how many are computed at once (large units are memory-bound).
fn run_stats<T: Real>(
    expr: &mut Expr<T>,
    row: &KeyRow,
    models: &[ModelFile],
    workers: &Workers<T>,
    block: usize,
    in_flight: usize,
) -> Result<()> {
    let numel = row.numel();
    if let Expr::Node(node) = expr {
        let NodeExpr { state, args } = &mut **node;
        for a in args.iter_mut() {
            run_stats(a, row, models, workers, block, in_flight)?;
        }
        for pass in 0..state.stat_passes() {
            // A zero-element tensor is one empty block, so every statistic has its identity
            // value (zero sums, an all-zero Gram matrix) rather than no value at all.
            let blocks: Vec<Range<usize>> = if numel == 0 {
                vec![0..0]
            } else {
                (0..numel)
                    .step_by(block)
                    .map(|s| s..(s + block).min(numel))
                    .collect()
            };
            // Blocks are computed in parallel a group at a time and absorbed in block order, so
            // at most one group of block results is held at once.
            let group = (16 * rayon::current_num_threads().max(1)).min(in_flight);
            for (g, chunk) in blocks.chunks(group).enumerate() {
                let st: &dyn KeyMerge<T> = &**state;
                let args_ref: &[Expr<T>] = args;
                let results: Vec<Vec<f64>> = chunk
                    .par_iter()
                    .map(|range| {
                        workers.with(|s| {
                            let len = range.len();
                            let bufs: Vec<Vec<T>> = args_ref
                                .iter()
                                .map(|a| eval(a, row, range, models, s))
                                .collect::<Result<_>>()?;
                            let refs: Vec<&[T]> = bufs.iter().map(|b| &b[..len]).collect();
                            let r = st.stat_block(pass, range.clone(), &refs);
                            s.free.extend(bufs);
                            // The output pass reads every value again and reports them.
                            s.bad.clear();
                            Ok(r)
                        })
                    })
                    .collect::<Result<_>>()?;
                for (i, r) in results.into_iter().enumerate() {
                    state.absorb_block(pass, g * group + i, r);
                }
            }
            state.finish_pass(pass)?;
        }
    }
    Ok(())
}

/// A sub-chunk is sized so that its buffers (the compute values of every input and node, and the
/// raw bytes of one input) take about this many bytes: small enough to stay in the CPU caches, large
/// enough that each read of an input is tens of KiB even for hundreds of inputs per key.
const CACHE_TARGET: usize = 2 << 20;

/// The output buffer of one task (a run of sub-chunks written with one call) is at most this
/// large, within the budget.
const TASK_OUTPUT_MAX: u64 = 16 << 20;

/// Keys with statistic passes in flight per thread...
const STAT_KEYS: usize = 2;
/// ... and at most this many inputs' statistics in flight over all threads (one key per thread
/// at least): the per-input statistics of four keys of 33 inputs made DGMLA's peak RSS 10 %
/// larger at N = 32 than at N = 8.
const STAT_INPUTS: usize = 64;

fn run<T: Real>(
    graph: &Graph,
    inputs: &RunInputs,
    opts: &MergeOptions,
    progress: &dyn Progress,
) -> Result<MergeReport> {
    let (models, rows) = (inputs.models, inputs.rows);
    let started = Instant::now();
    let mut report = MergeReport::new(graph);
    report.layouts = inputs
        .layouts
        .iter()
        .map(|l| l.map(|l| l.name().to_string()))
        .collect();
    report.architecture = inputs.layout.map(|l| l.name().to_string());
    report.notes.extend(inputs.notes.iter().cloned());
    let (methods, mut planned) = plan::<T>(graph, rows, inputs.layout, opts, &mut report)?;

    // The working set of a worker is one sub-chunk's buffers plus one task's encoded output.
    // Sub-chunks get shorter as the number of inputs grows, so the memory used does not grow
    // with the number of models; half the budget goes to each part at most.
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
    let in_max = rows
        .iter()
        .flat_map(|r| r.locs.iter().flatten())
        .filter_map(|l| FloatDtype::from_safetensors(l.dtype))
        .map(|d| d.size())
        .max()
        .unwrap_or(2);
    // One compute buffer per input and per node; the raw bytes of one input at a time.
    let sub_bytes_per_elem = (leaves + nodes) * tsize + in_max;
    let per_thread = opts.memory_budget / 2 / threads as u64;
    let sub = (CACHE_TARGET.min(per_thread as usize) / sub_bytes_per_elem) / 256 * 256;
    let out_size = opts.output_dtype.size();
    let chunk = match opts.chunk_override {
        Some(c) => c.max(1).div_ceil(BLOCK) * BLOCK,
        None => (per_thread.min(TASK_OUTPUT_MAX) as usize / out_size) / BLOCK * BLOCK,
    };
    if sub == 0 || chunk == 0 {
        return Err(Error::Invalid(format!(
            "memory budget of {} is too small for this merge: {} inputs per key on {} threads need at least {}",
            crate::size::format_bytes(opts.memory_budget),
            leaves,
            threads,
            crate::size::format_bytes(
                2 * threads as u64 * (256 * sub_bytes_per_elem).max(BLOCK * out_size) as u64
            )
        )));
    }
    let sub = sub.min(chunk);
    report.chunk_elements = chunk;
    report.threads = threads;
    report.working_set_bytes = (threads * (sub * sub_bytes_per_elem + chunk * out_size)) as u64;

    let (out_tensors, views) = output_views(&planned, rows, inputs.layout, opts)?;
    let mut metadata: HashMap<String, String> = opts.metadata.clone().into_iter().collect();
    // The recipe that made the output (unless the caller recorded its own), with the settings it
    // ran with: running it again gives the same bytes.
    if !metadata.contains_key("amalgam_recipe") {
        let settings = crate::recipe::RecipeSettings::of(opts);
        metadata.insert(
            "amalgam_recipe".into(),
            crate::recipe::to_toml(graph, &settings),
        );
    }
    // The recipe in sd-mecha's format too, where it can express it, so that sd-mecha and
    // ComfyUI-mecha users can read where the model came from.
    if !metadata.contains_key("mecha_recipe") {
        let arch = inputs.layout.map(|l| l.arch());
        if let Some(text) = crate::mecha::to_mecha(graph, inputs.layouts, arch, opts.seed) {
            metadata.insert("mecha_recipe".into(), text);
        }
    }
    metadata.insert("amalgam_version".into(), crate::VERSION.into());
    metadata.insert("format".into(), "pt".into());
    let key_tensors: Vec<Vec<usize>> = views.iter().map(OutView::tensors).collect();
    let crate::resume::Opened {
        out,
        journal,
        done: resumed,
    } = crate::resume::open(graph, opts, &out_tensors, metadata, &key_tensors, progress)?;
    let total_bytes: u64 = out_tensors
        .iter()
        .map(|t| (t.shape.iter().product::<usize>() * t.dtype.bitsize() / 8) as u64)
        .sum();
    progress.start(total_bytes, planned.len());

    report.bytes_read = bytes_read(&planned, rows);
    let workers = Workers::<T>::new(threads, opts.non_finite.cleans());
    let found = crate::non_finite::Found::default();
    let out_dtype = opts.output_dtype;
    let written = std::sync::atomic::AtomicU64::new(0);
    let keys_done = std::sync::atomic::AtomicUsize::new(0);
    // Computes one task of a key (of `row`: a key computed again without an input is given a
    // row without it).
    let run_task = |task: &Task, key: &PlannedKey<T>, row: &KeyRow| -> Result<()> {
        if opts.cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let Job::Compute { expr, numel } = &key.job else {
            unreachable!("only computed keys become tasks")
        };
        let len = task.range.len();
        let step = task.step;
        let mut non_finite = 0;
        workers.with(|s| -> Result<()> {
            let mut out_words = std::mem::take(&mut s.out);
            let view = &views[task.key];
            let pos = view.file_pos(&out, task.range.start, out_size);
            let bytes =
                crate::input::line_matched_bytes(&mut out_words, len * out_size, pos, out_size);
            let mut at = task.range.start;
            while at < task.range.end {
                let r = at..(at + step).min(task.range.end);
                let buf = eval(expr, row, &r, models, s)?;
                if !s.bad.is_empty() {
                    // Rare: an input holds NaN or Inf; the key is handled after the others.
                    journal.hold(task.key);
                    if opts.non_finite == NonFinite::Error {
                        let m = s.bad[0] as usize;
                        return Err(Error::NonFinite {
                            path: graph.models[m].path.clone(),
                            key: row.name.clone(),
                            count: count_non_finite::<T>(row, m, models)?,
                        });
                    }
                    found.add(task.key, s.bad.drain(..).map(|m| m as usize));
                }
                let o = (r.start - task.range.start) * out_size;
                let dst = &mut bytes[o..o + r.len() * out_size];
                out_dtype.encode(&buf[..r.len()], dst);
                non_finite += crate::non_finite::count_encoded(out_dtype, dst);
                s.free.push(buf);
                at = r.end;
            }
            let result = view.write(&out, task.range.start, out_size, bytes);
            s.out = out_words;
            if step > sub {
                // Buffers of a large unit are not kept for the small chunks that follow.
                s.free.retain(|b| b.len() <= sub);
                s.out = Vec::new();
            }
            result
        })?;
        let bytes = (len * out_size) as u64;
        journal.wrote(task.key, bytes, non_finite)?;
        written.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        let done = if task.range.end == *numel {
            keys_done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
        } else {
            keys_done.load(std::sync::atomic::Ordering::Relaxed)
        };
        progress.advance(bytes, done, &row.name);
        Ok(())
    };
    // Runs the tasks gathered so far, then drops the state of their keys.
    let run_batch = |tasks: &mut Vec<Task>, planned: &mut [PlannedKey<T>]| -> Result<()> {
        tasks
            .par_iter()
            .try_for_each(|t| run_task(t, &planned[t.key], &rows[planned[t.key].row]))?;
        for t in tasks.iter() {
            planned[t.key].job = Job::Done;
        }
        tasks.clear();
        Ok(())
    };
    // A key whose unit is larger than a sub-chunk is run on its own, with as many units in
    // flight as half the budget holds (at least one).
    let in_flight = |unit: usize| -> usize {
        let bytes = (unit * sub_bytes_per_elem + unit * out_size) as u64;
        ((opts.memory_budget / 2) / bytes.max(1)).max(1) as usize
    };

    // The tasks of a key, spanning whole units; those of a key with statistics are cut so that
    // every thread has a part of it (its passes end before its output starts).
    let key_tasks = |ki: usize, numel: usize, unit: usize, large: bool, stats: bool| {
        let (mut task_len, step) = if large {
            (unit, unit)
        } else {
            (chunk.div_ceil(unit) * unit, sub / unit * unit)
        };
        if stats && !large {
            let share = numel.div_ceil(2 * threads).div_ceil(step) * step;
            task_len = task_len.min(share.max(step));
        }
        (0..numel)
            .step_by(task_len.max(1))
            .map(|start| Task {
                key: ki,
                range: start..(start + task_len).min(numel),
                step,
            })
            .collect::<Vec<_>>()
    };
    // Keys with statistic passes (and units that fit a sub-chunk) run `STAT_KEYS` per thread at
    // once, each its passes and then its output: one key's passes alone leave threads idle
    // (most keys are a few blocks) and its output must wait for them. They share the budget.
    // A key's statistics are mostly per input (a rank histogram, sums, a row of the Gram
    // matrix): with many inputs, fewer keys are in flight (`STAT_INPUTS`).
    let stat_keys = (STAT_KEYS * threads).min((STAT_INPUTS / leaves).max(threads));
    let run_stat_keys = |keys: &mut Vec<(usize, usize)>,
                         planned: &mut [PlannedKey<T>],
                         key_notes: &mut Vec<(usize, (String, String))>|
     -> Result<()> {
        let mut jobs: Vec<(usize, usize, PlannedKey<T>)> = keys
            .drain(..)
            .map(|(ki, unit)| {
                let job = std::mem::replace(&mut planned[ki].job, Job::Done);
                let row = planned[ki].row;
                (ki, unit, PlannedKey { row, job })
            })
            .collect();
        let notes: Vec<Vec<String>> = jobs
            .par_iter_mut()
            .map(|(ki, unit, key)| -> Result<Vec<String>> {
                let row = &rows[key.row];
                let Job::Compute { expr, numel } = &mut key.job else {
                    unreachable!("only computed keys have statistics")
                };
                let numel = *numel;
                let block = BLOCK.div_ceil(*unit) * *unit;
                let in_flight = (in_flight(block) / stat_keys).max(1);
                run_stats(expr, row, models, &workers, block, in_flight)?;
                let mut notes = Vec::new();
                expr.notes(&mut notes);
                journal.set_notes(*ki, &notes);
                if numel == 0 {
                    keys_done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                key_tasks(*ki, numel, *unit, false, true)
                    .par_iter()
                    .try_for_each(|t| run_task(t, key, row))?;
                Ok(notes)
            })
            .collect::<Result<_>>()?;
        for ((ki, _, key), notes) in jobs.iter().zip(notes) {
            let name = &rows[key.row].name;
            key_notes.extend(notes.into_iter().map(|n| (*ki, (name.clone(), n))));
        }
        Ok(())
    };

    // The elements of a key that are computed together.
    let key_unit = |ki: usize, expr: &Expr<T>, row: &KeyRow| -> usize {
        let numel = row.numel();
        // A key written transposed, or read from a transposed input, is computed whole (the
        // transpose needs the whole tensor; read in parts, it would be decoded once per part).
        if matches!(views[ki], OutView::Transposed { .. }) || expr.reads_transposed(row) {
            numel.max(1)
        } else {
            expr.unit().min(numel.max(1))
        }
    };
    // Runs key `ki` on its own: its statistic passes, then its tasks, in groups of at most
    // `in_flight` units when its unit is large. Returns its notes.
    let run_alone = |ki: usize, key: &mut PlannedKey<T>, row: &KeyRow| -> Result<Vec<String>> {
        let Job::Compute { expr, numel } = &mut key.job else {
            unreachable!("only computed keys run alone")
        };
        let numel = *numel;
        let unit = key_unit(ki, expr, row);
        let (large, has_stats) = (unit > sub, expr.has_stats());
        if has_stats {
            let block = BLOCK.div_ceil(unit) * unit;
            run_stats(expr, row, models, &workers, block, in_flight(block))?;
        }
        let mut notes = Vec::new();
        expr.notes(&mut notes);
        journal.set_notes(ki, &notes);
        if numel == 0 {
            keys_done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let tasks = key_tasks(ki, numel, unit, large, has_stats);
        let group = if large { in_flight(unit) } else { tasks.len() };
        for g in tasks.chunks(group.max(1)) {
            g.par_iter().try_for_each(|t| run_task(t, key, row))?;
        }
        Ok(notes)
    };

    // Keys are executed in name order. The tasks of keys without statistic passes are gathered
    // into one parallel batch; keys with statistic passes are gathered into groups (above), so
    // per-key statistics never accumulate over many keys.
    let mut tasks: Vec<Task> = Vec::new();
    let mut with_stats: Vec<(usize, usize)> = Vec::new();
    let mut key_notes: Vec<(usize, (String, String))> = Vec::new();
    let mut raw_buf = Vec::new();
    // Keys a killed run wrote already (see `crate::resume`).
    if !resumed.is_empty() {
        report.notes.push(format!(
            "resumed: {} of {} keys were written by an interrupted run",
            resumed.len(),
            planned.len()
        ));
    }
    let mut resumed_output_non_finite: BTreeMap<usize, u64> = BTreeMap::new();
    for (ki, record) in resumed {
        let name = &rows[planned[ki].row].name;
        key_notes.extend(record.notes.into_iter().map(|n| (ki, (name.clone(), n))));
        report.inputs_non_finite.extend(record.inputs_non_finite);
        if record.output_non_finite > 0 {
            resumed_output_non_finite.insert(ki, record.output_non_finite);
        }
        planned[ki].job = Job::Done;
        let bytes: u64 = key_tensors[ki]
            .iter()
            .map(|&t| out.tensor_range(t))
            .map(|r| r.end - r.start)
            .sum();
        written.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        let done = keys_done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        progress.advance(bytes, done, name);
    }
    for ki in 0..planned.len() {
        if opts.cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        if matches!(planned[ki].job, Job::Done) {
            continue;
        }
        if let Job::CopyRaw { model, offset, len } = planned[ki].job {
            let name = &rows[planned[ki].row].name;
            let mut at = 0u64;
            while at < len {
                let n = (len - at).min(8 << 20) as usize;
                raw_buf.resize(n, 0u8);
                models[model].read_at(offset + at, &mut raw_buf)?;
                // Non-float keys are only renamed (e.g. position_ids).
                let esize = (rows[planned[ki].row].dtype().bitsize() / 8).max(1);
                views[ki].write(&out, at as usize / esize, esize, &mut raw_buf)?;
                at += n as u64;
            }
            journal.wrote(ki, len, 0)?;
            written.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
            let done = keys_done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            progress.advance(len, done, name);
            continue;
        }
        let row = &rows[planned[ki].row];
        let Job::Compute { expr, numel } = &planned[ki].job else {
            unreachable!()
        };
        let numel = *numel;
        let unit = key_unit(ki, expr, row);
        let large = unit > sub;
        let has_stats = expr.has_stats();
        if has_stats && !large {
            with_stats.push((ki, unit));
            if with_stats.len() == stat_keys {
                run_stat_keys(&mut with_stats, &mut planned, &mut key_notes)?;
            }
            continue;
        }
        if large {
            run_batch(&mut tasks, &mut planned)?;
            run_stat_keys(&mut with_stats, &mut planned, &mut key_notes)?;
            let job = std::mem::replace(&mut planned[ki].job, Job::Done);
            let mut key = PlannedKey {
                row: planned[ki].row,
                job,
            };
            let notes = run_alone(ki, &mut key, row)?;
            key_notes.extend(notes.into_iter().map(|n| (ki, (row.name.clone(), n))));
            continue;
        }
        let mut notes = Vec::new();
        expr.notes(&mut notes);
        journal.set_notes(ki, &notes);
        key_notes.extend(notes.into_iter().map(|n| (ki, (row.name.clone(), n))));
        if numel == 0 {
            keys_done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        tasks.extend(key_tasks(ki, numel, unit, false, false));
    }
    run_batch(&mut tasks, &mut planned)?;
    run_stat_keys(&mut with_stats, &mut planned, &mut key_notes)?;

    // Keys where an input holds NaN or Inf: computed again without it, or kept as written (see
    // `crate::non_finite`). Only these keys are read again.
    for (ki, mut bad) in found.take() {
        let original = &rows[planned[ki].row];
        let mut row = original.clone();
        let mut found_here: Vec<InputNonFinite> = Vec::new();
        while !bad.is_empty() {
            for m in bad {
                found_here.push(InputNonFinite {
                    key: row.name.clone(),
                    model: m,
                    count: count_non_finite::<T>(original, m, models)?,
                    omitted: opts.non_finite == NonFinite::Omit,
                });
                row.locs[m] = None;
            }
            if opts.non_finite == NonFinite::Keep {
                break;
            }
            // Without the models found so far; when no other model has the key, as it is.
            let first = row.locs.iter().position(Option::is_some);
            let redo = match first {
                Some(f) => {
                    row.first = f;
                    &row
                }
                None => {
                    found_here.iter_mut().for_each(|f| f.omitted = false);
                    workers.set_clean(false);
                    original
                }
            };
            let without: Vec<&str> = found_here
                .iter()
                .filter(|f| f.omitted)
                .map(|f| graph.models[f.model].name.as_str())
                .collect();
            progress.note(&if without.is_empty() {
                format!(
                    "key `{}`: no model has finite values; merged as they are",
                    row.name
                )
            } else {
                format!(
                    "key `{}`: NaN/Inf values; computed again without {}",
                    row.name,
                    without.join(", ")
                )
            });
            let (job, action) = plan_key(graph, redo, inputs.layout, &methods, opts)?;
            report.actions[ki].1 = action;
            // The key is written again: its bytes and its completion count once.
            let bytes: u64 = key_tensors[ki]
                .iter()
                .map(|&t| out.tensor_range(t))
                .map(|r| r.end - r.start)
                .sum();
            written.fetch_sub(bytes, std::sync::atomic::Ordering::Relaxed);
            keys_done.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            journal.restart(ki);
            journal.set_inputs_non_finite(ki, &found_here);
            let mut key = PlannedKey {
                row: planned[ki].row,
                job,
            };
            let notes = run_alone(ki, &mut key, redo)?;
            key_notes.retain(|(k, _)| *k != ki);
            key_notes.extend(notes.into_iter().map(|n| (ki, (row.name.clone(), n))));
            bad = found.take().remove(&ki).unwrap_or_default();
            if first.is_none() {
                workers.set_clean(opts.non_finite.cleans());
                break;
            }
        }
        journal.set_inputs_non_finite(ki, &found_here);
        journal.release(ki);
        report.inputs_non_finite.extend(found_here);
    }
    for ki in 0..planned.len() {
        let n = journal.output_non_finite(ki) + resumed_output_non_finite.get(&ki).unwrap_or(&0);
        if n > 0 {
            report
                .outputs_non_finite
                .push((rows[planned[ki].row].name.clone(), n));
        }
    }
    report
        .inputs_non_finite
        .sort_by(|a, b| (&a.key, a.model).cmp(&(&b.key, b.model)));

    // Notes in key order, whichever group ran a key.
    key_notes.sort_by_key(|&(ki, _)| ki);
    report
        .key_notes
        .extend(key_notes.into_iter().map(|(_, n)| n));
    report.bytes_written = written.load(std::sync::atomic::Ordering::Relaxed);
    report.output = Some(journal.commit(out)?);
    progress.finish();
    report.elapsed = started.elapsed();
    report.peak_rss_bytes = crate::report::peak_rss_bytes();
    Ok(report)
}

fn bytes_read<T: Real>(planned: &[PlannedKey<T>], rows: &[KeyRow]) -> u64 {
    fn leaves<T: Real>(e: &Expr<T>, row: &KeyRow) -> u64 {
        match e {
            Expr::Leaf(l) => (row.numel() * l.dtype(row).size()) as u64,
            Expr::Node(node) => node.args.iter().map(|a| leaves(a, row)).sum(),
        }
    }
    planned
        .iter()
        .map(|p| match &p.job {
            Job::CopyRaw { len, .. } => *len,
            Job::Compute { expr, .. } => leaves(expr, &rows[p.row]),
            Job::Done => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A method with one statistic pass: the L2 norm of each argument, then `out = a / ‖a‖`.
    /// Records the block ranges it was given.
    struct Normalize {
        norm: f64,
        absorbed: usize,
        seen: std::sync::Arc<Mutex<Vec<Range<usize>>>>,
    }

    impl KeyMerge<f32> for Normalize {
        fn stat_passes(&self) -> usize {
            1
        }
        fn stat_block(&self, pass: usize, range: Range<usize>, args: &[&[f32]]) -> Vec<f64> {
            assert_eq!(pass, 0);
            self.seen.lock().unwrap().push(range);
            vec![args[0].iter().map(|&x| x as f64 * x as f64).sum()]
        }
        fn absorb_block(&mut self, _pass: usize, block: usize, stats: Vec<f64>) {
            assert_eq!(block, self.absorbed, "blocks arrive in order");
            self.absorbed += 1;
            self.norm += stats[0];
        }
        fn finish_pass(&mut self, _pass: usize) -> Result<()> {
            self.norm = self.norm.sqrt();
            Ok(())
        }
        fn merge_chunk(&self, _range: Range<usize>, args: &[&[f32]], out: &mut [f32]) {
            for (o, &x) in out.iter_mut().zip(args[0]) {
                *o = (x as f64 / self.norm) as f32;
            }
        }
    }

    #[test]
    fn statistic_passes_see_every_block_in_order_whatever_the_threads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        let n = 40 * BLOCK + 123;
        let values: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        let out = OutputFile::create(
            &path,
            &[OutputTensor {
                name: "w".into(),
                dtype: safetensors::Dtype::F32,
                shape: vec![n],
            }],
            HashMap::new(),
            false,
        )
        .unwrap();
        let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        out.write_at(0, 0, &bytes).unwrap();
        out.commit().unwrap();

        let mut model = ModelFile::open(&path).unwrap();
        let mut table = KeyTable {
            rows: BTreeMap::new(),
            n: 1,
            layouts: Vec::new(),
            notes: Vec::new(),
        };
        table.add(0, &model, None, &[path.as_path()]).unwrap();
        model.forget_index();
        let rows: Vec<KeyRow> = table.rows.into_values().collect();
        let models = vec![model];

        // Per-block sums, added in block order.
        let want_norm = values
            .chunks(BLOCK)
            .map(|b| b.iter().map(|&x| x as f64 * x as f64).sum::<f64>())
            .fold(0.0, |a, b| a + b)
            .sqrt();
        let mut results = Vec::new();
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
            let mut expr = Expr::Node(Box::new(NodeExpr {
                state: Box::new(Normalize {
                    norm: 0.0,
                    absorbed: 0,
                    seen: seen.clone(),
                }),
                args: vec![Expr::Leaf(Leaf::new(&rows[0], 0))],
            }));
            let workers = Workers::new(threads, true);
            pool.install(|| run_stats(&mut expr, &rows[0], &models, &workers, BLOCK, usize::MAX))
                .unwrap();
            // Sub-chunks of two different lengths give the same values.
            for step in [1000, 4 * BLOCK] {
                let mut got = Vec::new();
                let mut s = Scratch::new(true);
                for start in (0..n).step_by(step) {
                    let r = start..(start + step).min(n);
                    let buf = eval(&expr, &rows[0], &r, &models, &mut s).unwrap();
                    got.extend_from_slice(&buf[..r.len()]);
                }
                results.push(got);
            }
            let mut seen = std::mem::take(&mut *seen.lock().unwrap());
            seen.sort_by_key(|r| r.start);
            let want: Vec<Range<usize>> = (0..n)
                .step_by(BLOCK)
                .map(|s| s..(s + BLOCK).min(n))
                .collect();
            assert_eq!(seen, want);
        }
        let want: Vec<f32> = values
            .iter()
            .map(|&x| (x as f64 / want_norm) as f32)
            .collect();
        for r in &results {
            assert_eq!(r, &want);
        }
    }
}
