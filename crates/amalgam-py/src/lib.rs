//! `amalgam._native`: the Python bindings of the amalgam library. The Python package
//! (`python/amalgam/__init__.py`) wraps these functions: they take and return plain values and
//! JSON text, so that every piece of logic stays in the library.

use amalgam::method::ParamValue;
use amalgam::recipe::{self, RecipeSettings};
use amalgam::{Graph, MergeOptions};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyByteArray;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

create_exception!(
    _native,
    MergeError,
    PyException,
    "An amalgam merge, read or check failed."
);
create_exception!(
    _native,
    InputError,
    MergeError,
    "An input file is missing, unreadable, not valid safetensors, or holds what cannot be merged."
);
create_exception!(
    _native,
    RecipeError,
    MergeError,
    "A recipe or a parameter is wrong."
);
create_exception!(
    _native,
    OutputError,
    MergeError,
    "An output file cannot be written."
);
create_exception!(
    _native,
    CancelledError,
    MergeError,
    "The run was cancelled."
);

/// A library error as a Python exception, with `path`, `key` and `node` attributes where the
/// error names them (else `None`).
fn py_err(e: amalgam::Error) -> PyErr {
    use amalgam::Error as E;
    let message = e.to_string();
    let (err, path, key): (PyErr, Option<PathBuf>, Option<String>) = match e {
        E::Io { path, .. } | E::BadFile { path, .. } => {
            (InputError::new_err(message), Some(path), None)
        }
        E::UnsupportedDtype { path, key, .. } | E::NonFinite { path, key, .. } => {
            (InputError::new_err(message), Some(path), Some(key))
        }
        E::ShapeMismatch {
            key, second_path, ..
        } => (InputError::new_err(message), Some(second_path), Some(key)),
        E::Recipe { .. } | E::Method { .. } | E::Invalid(_) => {
            (RecipeError::new_err(message), None, None)
        }
        E::Output { path, .. } => (OutputError::new_err(message), Some(path), None),
        E::Cancelled => (CancelledError::new_err(message), None, None),
    };
    let node = node_of(&err.to_string());
    Python::with_gil(|py| {
        let v = err.value(py);
        let _ = v.setattr("path", path.map(|p| p.display().to_string()));
        let _ = v.setattr("key", key);
        let _ = v.setattr("node", node);
    });
    err
}

/// The node an error message names (`node `x``), if any.
fn node_of(message: &str) -> Option<String> {
    let rest = &message[message.find("node `")? + 6..];
    Some(rest[..rest.find('`')?].to_string())
}

/// Progress and cancelling from Python: calls `callback(done_bytes, total_bytes, key)` (in
/// order, never two at once, so `done` only grows); an exception from it, or Ctrl-C (see
/// [`PyProgress::run`]), cancels the run, and is what the run raises.
struct PyProgress {
    callback: Option<Py<PyAny>>,
    cancel: amalgam::options::Cancel,
    state: Mutex<(u64, u64)>,
    error: Mutex<Option<PyErr>>,
}

impl PyProgress {
    fn new(callback: Option<Py<PyAny>>, cancel: amalgam::options::Cancel) -> Self {
        PyProgress {
            callback,
            cancel,
            state: Mutex::new((0, 0)),
            error: Mutex::new(None),
        }
    }
    fn report(&self, bytes: u64, key: &str) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.0 += bytes;
        if self.cancel.is_cancelled() {
            return;
        }
        let (done, total) = *state;
        let result = Python::with_gil(|py| -> PyResult<()> {
            if let Some(cb) = &self.callback {
                cb.call1(py, (done, total, key))?;
            }
            Ok(())
        });
        if let Err(e) = result {
            self.fail(e);
        }
    }
    /// Keeps the first error that cancels the run.
    fn fail(&self, e: PyErr) {
        self.error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(e);
        self.cancel.cancel();
    }
    /// Runs `work` on another thread while this one, Python's main thread, waits with the GIL
    /// released and checks for signals every 50 ms (Python runs signal handlers on its main
    /// thread only): Ctrl-C cancels the run, which then raises KeyboardInterrupt.
    fn run<T: Send>(
        &self,
        py: Python<'_>,
        work: impl FnOnce() -> amalgam::Result<T> + Send,
    ) -> PyResult<T> {
        let result = std::thread::scope(|scope| {
            let (tx, mut rx) = std::sync::mpsc::channel();
            scope.spawn(move || {
                let _ = tx.send(work());
            });
            loop {
                let wait = std::time::Duration::from_millis(50);
                let (got, back) = py.allow_threads(move || (rx.recv_timeout(wait), rx));
                rx = back;
                match got {
                    Ok(r) => break r,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        if let Err(e) = py.check_signals() {
                            self.fail(e);
                        }
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        break Err(amalgam::Error::Invalid("the run's thread ended".into()))
                    }
                }
            }
        });
        result.map_err(|e| self.error(e))
    }
    /// The run's error: the callback's (or Ctrl-C's) when it cancelled the run.
    fn error(&self, e: amalgam::Error) -> PyErr {
        match (
            e,
            self.error.lock().unwrap_or_else(|e| e.into_inner()).take(),
        ) {
            (amalgam::Error::Cancelled, Some(py)) => py,
            (e, _) => py_err(e),
        }
    }
}

impl amalgam::Progress for PyProgress {
    fn start(&self, total_bytes: u64, _keys: usize) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 = total_bytes;
        self.report(0, "");
    }
    fn advance(&self, bytes: u64, _keys_done: usize, key: &str) {
        self.report(bytes, key);
    }
}

/// A parameter value from JSON: a number, a boolean, a name, a list of numbers, or a table of
/// block ids to numbers.
fn param_value(name: &str, v: &serde_json::Value) -> PyResult<ParamValue> {
    use serde_json::Value as V;
    let bad = || RecipeError::new_err(format!("parameter `{name}`: cannot use {v}"));
    Ok(match v {
        V::Bool(b) => ParamValue::Bool(*b),
        V::Number(n) => ParamValue::Number(n.as_f64().ok_or_else(bad)?),
        V::String(s) => ParamValue::Text(s.clone()),
        V::Array(items) => ParamValue::List(
            items
                .iter()
                .map(|x| x.as_f64().ok_or_else(bad))
                .collect::<PyResult<_>>()?,
        ),
        V::Object(map) => ParamValue::Blocks(
            map.iter()
                .map(|(k, x)| Ok((k.clone(), x.as_f64().ok_or_else(bad)?)))
                .collect::<PyResult<_>>()?,
        ),
        V::Null => return Err(bad()),
    })
}

/// Parses an option with its `FromStr`, naming it in the error.
fn parse_opt<T: std::str::FromStr>(name: &str, v: Option<&str>) -> PyResult<Option<T>>
where
    T::Err: std::fmt::Display,
{
    v.map(|s| {
        s.parse::<T>()
            .map_err(|e| RecipeError::new_err(format!("{name} `{s}`: {e}")))
    })
    .transpose()
}

/// The graph and settings of a recipe (a file path, or recipe text: TOML or `.mecha`), or of
/// the shorthand (a method applied to models).
#[allow(clippy::too_many_arguments)]
fn graph_of(
    recipe: Option<&str>,
    method: Option<&str>,
    models: Option<Vec<PathBuf>>,
    base: Option<PathBuf>,
    fallback: Option<PathBuf>,
    repair: bool,
    params: Option<&str>,
    model_dirs: Vec<PathBuf>,
) -> PyResult<(Graph, RecipeSettings)> {
    match (recipe, method) {
        (Some(r), None) => {
            if models.is_some() || base.is_some() || params.is_some() || repair {
                return Err(RecipeError::new_err(
                    "models, base, params and repair go with method=...; a recipe sets them itself",
                ));
            }
            let loaded = if Path::new(r).is_file() {
                recipe::load_any(Path::new(r), &model_dirs, &[])
            } else {
                recipe::load_text(r, "<recipe text>", Path::new("."), &model_dirs)
            }
            .map_err(py_err)?;
            Ok((loaded.graph, loaded.settings))
        }
        (None, Some(m)) => {
            let mut values = BTreeMap::new();
            if let Some(p) = params {
                let json: serde_json::Value = serde_json::from_str(p)
                    .map_err(|e| RecipeError::new_err(format!("params: {e}")))?;
                for (k, v) in json.as_object().into_iter().flatten() {
                    values.insert(k.clone(), param_value(k, v)?);
                }
            }
            let (graph, _notes) = recipe::graph::Shorthand {
                method: m.to_string(),
                models: models.unwrap_or_default(),
                base,
                fallback,
                repair,
                params: values,
            }
            .build()
            .map_err(py_err)?;
            Ok((graph, RecipeSettings::default()))
        }
        _ => Err(RecipeError::new_err(
            "give either recipe=... (a path or recipe text) or method=... with models=[...]",
        )),
    }
}

/// Merges and writes `output`; returns the report as JSON.
#[pyfunction]
#[pyo3(signature = (output, *, recipe=None, method=None, models=None, base=None, fallback=None,
    params=None, dtype=None, compute_dtype=None, memory_budget=None, threads=0, seed=None,
    non_finite=None, layout=None, repair=false, overwrite=false, model_dirs=Vec::new(),
    progress=None))]
#[allow(clippy::too_many_arguments)]
fn merge(
    py: Python<'_>,
    output: PathBuf,
    recipe: Option<String>,
    method: Option<String>,
    models: Option<Vec<PathBuf>>,
    base: Option<PathBuf>,
    fallback: Option<PathBuf>,
    params: Option<String>,
    dtype: Option<String>,
    compute_dtype: Option<String>,
    memory_budget: Option<String>,
    threads: usize,
    seed: Option<u64>,
    non_finite: Option<String>,
    layout: Option<String>,
    repair: bool,
    overwrite: bool,
    model_dirs: Vec<PathBuf>,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    let (graph, settings) = graph_of(
        recipe.as_deref(),
        method.as_deref(),
        models,
        base,
        fallback,
        repair,
        params.as_deref(),
        model_dirs,
    )?;
    let given = RecipeSettings {
        dtype: parse_opt("dtype", dtype.as_deref())?,
        compute_dtype: parse_opt("compute_dtype", compute_dtype.as_deref())?,
        seed,
        layout: parse_opt("layout", layout.as_deref())?,
        non_finite: parse_opt("non_finite", non_finite.as_deref())?,
    };
    let mut opts = MergeOptions::new(output);
    given.over(&settings).apply(&mut opts);
    if let Some(b) = memory_budget {
        opts.memory_budget = amalgam::size::parse_bytes(&b)
            .map_err(|e| RecipeError::new_err(format!("memory_budget `{b}`: {e}")))?;
    }
    opts.threads = threads;
    opts.overwrite = overwrite;
    // A run cancelled from Python leaves nothing behind (no partial file to resume).
    opts.resume = false;
    let sink = PyProgress::new(progress, opts.cancel.clone());
    let report = sink.run(py, || amalgam::merge(&graph, &opts, &sink))?;
    serde_json::to_string(&report).map_err(|e| MergeError::new_err(e.to_string()))
}

/// One tensor of a file: name, safetensors dtype, shape, raw bytes.
type RawTensor = (String, String, Vec<usize>, Py<PyByteArray>);

/// The tensors of a safetensors file: `(name, dtype, shape, bytearray)` each, in file order of
/// names; the bytes are read straight into the bytearrays (one copy of the data in memory).
#[pyfunction]
fn read_tensors(py: Python<'_>, path: PathBuf) -> PyResult<Vec<RawTensor>> {
    let m = amalgam::io::input::ModelFile::open(&path).map_err(py_err)?;
    let mut out = Vec::with_capacity(m.tensors().len());
    for (name, t) in m.tensors() {
        let len = t.len as usize;
        let mut failed = None;
        let buf = PyByteArray::new_with(py, len, |dst| {
            if let Err(e) = m.read_raw(name, 0, dst) {
                failed = Some(e);
            }
            Ok(())
        })?;
        if let Some(e) = failed {
            return Err(py_err(e));
        }
        let dtype = amalgam::io::dtype::dtype_name(t.dtype);
        out.push((name.clone(), dtype, t.shape.clone(), buf.unbind()));
    }
    Ok(out)
}

/// `amalgam inspect` as JSON.
#[pyfunction]
#[pyo3(signature = (path, hashes=true))]
fn inspect(py: Python<'_>, path: PathBuf, hashes: bool) -> PyResult<String> {
    let opts = amalgam::inspect::InspectOptions { hashes };
    let i = py
        .allow_threads(|| amalgam::inspect::inspect(&path, opts))
        .map_err(py_err)?;
    serde_json::to_string(&i).map_err(|e| MergeError::new_err(e.to_string()))
}

/// Every method's declaration as JSON: name, formula, summary, sources, aliases, inputs, parameters (type,
/// default, domain in words, doc), and the preset it is of.
#[pyfunction]
fn methods() -> String {
    use serde_json::json;
    let list: Vec<serde_json::Value> = amalgam::methods::all_infos()
        .map(|info| {
            let preset = amalgam::methods::preset_of(info).map(|p| p.of.name);
            json!({
                "name": info.name,
                "formula": info.formula,
                "summary": info.summary,
                "sources": info.origins.iter().map(|o| o.name()).collect::<Vec<_>>(),
                "aliases": amalgam::methods::aliases_of(info.name).map(|(a, _)| a).collect::<Vec<_>>(),
                "inputs": info.slots.iter().map(|s| json!({
                    "name": s.name,
                    "many": s.kind == amalgam::method::SlotKind::Many,
                    "doc": s.doc,
                })).collect::<Vec<_>>(),
                "params": info.params.iter().map(|p| json!({
                    "name": p.name,
                    "default": p.default_text(),
                    "type": p.type_text(),
                    "doc": p.doc,
                })).collect::<Vec<_>>(),
                "preset_of": preset,
            })
        })
        .collect();
    serde_json::Value::Array(list).to_string()
}

/// `amalgam extract-lora`: `model − base` as a kohya LoRA file; the report as JSON.
#[pyfunction]
#[pyo3(signature = (model, base, output, *, rank, ratio=None, energy=None, dtype="f16", threads=0, overwrite=false, progress=None))]
#[allow(clippy::too_many_arguments)]
fn extract_lora(
    py: Python<'_>,
    model: PathBuf,
    base: PathBuf,
    output: PathBuf,
    rank: usize,
    ratio: Option<f64>,
    energy: Option<f64>,
    dtype: &str,
    threads: usize,
    overwrite: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    use amalgam::lora::extract::{ExtractOptions, RankRule};
    let rule = match (ratio, energy) {
        (None, None) => RankRule::Fixed,
        (Some(f), None) => RankRule::Ratio(f),
        (None, Some(f)) => RankRule::Energy(f),
        _ => return Err(RecipeError::new_err("give ratio or energy, not both")),
    };
    let opts = ExtractOptions {
        tuned: model,
        base,
        output,
        rank,
        rule,
        dtype: parse_opt("dtype", Some(dtype))?.expect("given"),
        threads,
        overwrite,
        metadata: BTreeMap::new(),
        cancel: Default::default(),
    };
    let sink = PyProgress::new(progress, opts.cancel.clone());
    let report = sink.run(py, || amalgam::lora::extract::extract_lora(&opts, &sink))?;
    serde_json::to_string(&report).map_err(|e| MergeError::new_err(e.to_string()))
}

/// `amalgam compare` as JSON; with `output_dir`, also its report files.
#[pyfunction]
#[pyo3(signature = (models, base=None, output_dir=None, overwrite=false, outlier_k=3.0, threads=0, progress=None))]
#[allow(clippy::too_many_arguments)]
fn compare(
    py: Python<'_>,
    models: Vec<PathBuf>,
    base: Option<PathBuf>,
    output_dir: Option<PathBuf>,
    overwrite: bool,
    outlier_k: f64,
    threads: usize,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    let opts = amalgam::analysis::CompareOptions {
        threads,
        outliers: amalgam::analysis::OutlierRule { k: outlier_k },
        ..Default::default()
    };
    let sink = PyProgress::new(progress, opts.cancel.clone());
    let c = sink.run(py, || {
        amalgam::analysis::compare(&models, base.as_deref(), &opts, &sink)
    })?;
    if let Some(dir) = output_dir {
        amalgam::analysis::write_report(&c, &dir, overwrite).map_err(py_err)?;
    }
    serde_json::to_string(&c).map_err(|e| MergeError::new_err(e.to_string()))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(merge, m)?)?;
    m.add_function(wrap_pyfunction!(read_tensors, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(methods, m)?)?;
    m.add_function(wrap_pyfunction!(compare, m)?)?;
    m.add_function(wrap_pyfunction!(extract_lora, m)?)?;
    let py = m.py();
    m.add("MergeError", py.get_type::<MergeError>())?;
    m.add("InputError", py.get_type::<InputError>())?;
    m.add("RecipeError", py.get_type::<RecipeError>())?;
    m.add("OutputError", py.get_type::<OutputError>())?;
    m.add("CancelledError", py.get_type::<CancelledError>())?;
    m.add("__version__", amalgam::VERSION)?;
    Ok(())
}
