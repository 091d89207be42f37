//! The toolkit-style report of `inspect`: what a checkpoint carries that inference does not use
//! (EMA weights, scheduler buffers, unknown keys), broken CLIP `position_ids`, bytes spent on
//! wider floats than the rest of the file, and its `modelspec.*` metadata. Modelled on what
//! arenasys' stable-diffusion-webui-model-toolkit reports (junk and EMA data, "wastes ... on
//! precision", broken CLIP position ids, unknown keys).

use crate::error::Result;
use crate::io::dtype::dtype_name;
use crate::io::input::ModelFile;
use crate::layout::arch::Detection;
use safetensors::Dtype;
use std::collections::BTreeMap;

/// How many key names a [`KeyGroup`] keeps as examples.
pub const EXAMPLES: usize = 5;

/// The prefix of the EMA copy of the UNet in original-layout checkpoints.
pub const EMA_PREFIX: &str = "model_ema.";

/// The layout components no inference component uses: the EMA copy of the UNet and the noise
/// scheduler's buffers (UIs recompute them from the model config).
const JUNK_COMPONENTS: [&str; 2] = ["ema", "scheduler"];

/// A set of keys, counted with their bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KeyGroup {
    /// How many keys.
    pub keys: usize,
    /// Their tensor data, in bytes.
    pub bytes: u64,
    /// The first few of them, in name order (at most [`EXAMPLES`]).
    pub examples: Vec<String>,
}

impl KeyGroup {
    fn add(&mut self, key: &str, bytes: u64) {
        self.keys += 1;
        self.bytes += bytes;
        if self.examples.len() < EXAMPLES {
            self.examples.push(key.to_string());
        }
    }
    /// Whether the group is empty.
    pub fn is_empty(&self) -> bool {
        self.keys == 0
    }
}

/// One position of a `position_ids` tensor that does not hold its index.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct WrongPosition {
    /// The position (0-based, in the flattened tensor).
    pub index: usize,
    /// The value found there (should equal `index`).
    pub value: f64,
}

/// The check of one CLIP text encoder's `position_ids` tensor (`[1, 77]`, int64, values
/// `0..77`; a float tensor, or values off by rounding, break or shift the token positions).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PositionIds {
    /// The key checked.
    pub key: String,
    /// Its stored dtype (safetensors spelling).
    pub dtype: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Whether the dtype is `I64`, as CLIP's buffer is. A float dtype is the usual damage (a
    /// merge or an fp16 conversion cast it) and is fixable by rewriting `0..n` as int64.
    pub dtype_ok: bool,
    /// Positions whose value is not exactly their index.
    pub wrong: Vec<WrongPosition>,
    /// Why the values were not read (a dtype that holds no numbers, a tensor too large for a
    /// position id buffer); `None` when they were.
    pub unreadable: Option<String>,
}

impl PositionIds {
    /// Whether the tensor is as CLIP expects: int64 and exactly `0..n`.
    pub fn is_ok(&self) -> bool {
        self.dtype_ok && self.wrong.is_empty() && self.unreadable.is_none()
    }
}

/// The bytes of float tensors wider than the file's main dtype.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Precision {
    /// The dtype most of the file's float parameters are stored in, EMA and junk keys aside
    /// (`F16` or `BF16`; the report has no `precision` entry otherwise).
    pub main_dtype: String,
    /// F32 and F64 tensors (EMA and junk keys aside: they are counted there; float
    /// `position_ids` aside: they are reported as broken).
    pub tensors: usize,
    /// Their bytes.
    pub bytes: u64,
    /// What converting them to the main dtype would save: their bytes minus 2 bytes per element.
    pub wasted_bytes: u64,
    /// `wasted_bytes` per component of the detected layout (`unknown` for keys when no layout
    /// is detected): tensors and wasted bytes.
    pub by_component: BTreeMap<String, (usize, u64)>,
}

/// The toolkit-style report.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Report {
    /// EMA keys (`model_ema.*`).
    pub ema: KeyGroup,
    /// Other keys no inference component uses: the layout's scheduler buffers and the keys not
    /// in the detected layout (`unknown` below). Empty when no layout is detected.
    pub junk: KeyGroup,
    /// Keys not in the detected layout, EMA keys aside (also counted in `junk`). Empty when no
    /// layout is detected.
    pub unknown: KeyGroup,
    /// Every CLIP `*text_model.embeddings.position_ids` tensor, checked.
    pub position_ids: Vec<PositionIds>,
    /// Float tensors wider than the main dtype, when that is F16 or BF16 and there are some.
    pub precision: Option<Precision>,
    /// The `modelspec.*` metadata entries (Stability AI's model metadata specification).
    pub modelspec: BTreeMap<String, String>,
}

impl Report {
    /// Whether there is nothing to report: no EMA, junk or unknown keys, all `position_ids`
    /// correct, no wider floats than the main dtype (modelspec metadata is information, not a
    /// problem).
    pub fn is_clean(&self) -> bool {
        self.ema.is_empty()
            && self.junk.is_empty()
            && self.unknown.is_empty()
            && self.position_ids.iter().all(PositionIds::is_ok)
            && self.precision.is_none()
    }
}

/// Builds the report of `m`, whose header `detection` describes.
pub fn report(m: &ModelFile, detection: &Detection) -> Result<Report> {
    let mut r = Report::default();
    let layout = detection.layout;
    let component = |k: &str| layout.and_then(|l| l.component_of(k));
    // EMA and junk keys first; the rest are the model's keys.
    let mut model_keys = Vec::new();
    for (k, t) in m.tensors() {
        let c = component(k);
        if k.starts_with(EMA_PREFIX) {
            r.ema.add(k, t.len);
            continue;
        }
        if layout.is_some() && c.is_none() {
            r.unknown.add(k, t.len);
        }
        if layout.is_some() && c.is_none_or(|c| JUNK_COMPONENTS.contains(&c)) {
            r.junk.add(k, t.len);
            continue;
        }
        model_keys.push((k, t, c));
    }
    // The main float dtype of the model's keys, by parameters.
    let mut by_dtype: BTreeMap<String, usize> = BTreeMap::new();
    for (_, t, _) in &model_keys {
        if t.float_dtype().is_some() {
            *by_dtype.entry(dtype_name(t.dtype)).or_default() += t.numel();
        }
    }
    let main = by_dtype
        .iter()
        .max_by_key(|&(d, n)| (*n, d.clone()))
        .map(|(d, _)| d.clone())
        .unwrap_or_default();
    let mut precision = Precision {
        main_dtype: main,
        tensors: 0,
        bytes: 0,
        wasted_bytes: 0,
        by_component: BTreeMap::new(),
    };
    if matches!(precision.main_dtype.as_str(), "F16" | "BF16") {
        for (k, t, c) in &model_keys {
            if !matches!(t.dtype, Dtype::F32 | Dtype::F64) || k.ends_with("position_ids") {
                continue;
            }
            let wasted = t.len.saturating_sub(2 * t.numel() as u64);
            precision.tensors += 1;
            precision.bytes += t.len;
            precision.wasted_bytes += wasted;
            let e = precision
                .by_component
                .entry(c.unwrap_or("unknown").to_string())
                .or_default();
            e.0 += 1;
            e.1 += wasted;
        }
    }
    if precision.tensors > 0 {
        r.precision = Some(precision);
    }
    for (k, t) in m.tensors() {
        if k.ends_with("text_model.embeddings.position_ids") {
            r.position_ids.push(check_position_ids(m, k, t)?);
        }
    }
    r.modelspec = m
        .metadata()
        .iter()
        .filter(|(k, _)| k.starts_with("modelspec."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(r)
}

/// The largest `position_ids` tensor whose values are read (CLIP's has 77 elements).
const MAX_POSITIONS: usize = 4096;

fn check_position_ids(
    m: &ModelFile,
    key: &str,
    t: &crate::io::input::TensorEntry,
) -> Result<PositionIds> {
    let mut out = PositionIds {
        key: key.to_string(),
        dtype: dtype_name(t.dtype),
        shape: t.shape.clone(),
        dtype_ok: t.dtype == Dtype::I64,
        wrong: Vec::new(),
        unreadable: None,
    };
    let n = t.numel();
    let width = match t.dtype {
        Dtype::I64 | Dtype::F64 | Dtype::U64 => 8,
        Dtype::I32 | Dtype::F32 | Dtype::U32 => 4,
        Dtype::I16 | Dtype::F16 | Dtype::BF16 | Dtype::U16 => 2,
        Dtype::I8 | Dtype::U8 => 1,
        d => {
            out.unreadable = Some(format!("{} holds no position ids", dtype_name(d)));
            return Ok(out);
        }
    };
    if n > MAX_POSITIONS || t.len != (n * width) as u64 {
        out.unreadable = Some(format!(
            "{n} elements in {} bytes: not a position id buffer",
            t.len
        ));
        return Ok(out);
    }
    let mut raw = vec![0u8; t.len as usize];
    m.read_raw(key, 0, &mut raw)?;
    for (i, b) in raw.chunks_exact(width).enumerate() {
        let v = decode(t.dtype, b);
        if v != i as f64 {
            out.wrong.push(WrongPosition { index: i, value: v });
        }
    }
    Ok(out)
}

/// One little-endian element of `dtype` as f64 (integers up to 2^53 exactly; NaN stays NaN and
/// so never equals an index).
fn decode(dtype: Dtype, b: &[u8]) -> f64 {
    let w8 = || -> [u8; 8] { b[..8].try_into().expect("8 bytes") };
    match dtype {
        Dtype::I64 => i64::from_le_bytes(w8()) as f64,
        Dtype::U64 => u64::from_le_bytes(w8()) as f64,
        Dtype::F64 => f64::from_le_bytes(w8()),
        Dtype::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
        Dtype::U32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
        Dtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
        Dtype::I16 => i16::from_le_bytes([b[0], b[1]]) as f64,
        Dtype::U16 => u16::from_le_bytes([b[0], b[1]]) as f64,
        Dtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f64(),
        Dtype::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f64(),
        Dtype::I8 => b[0] as i8 as f64,
        _ => b[0] as f64,
    }
}
