//! Helpers shared by the integration tests: write real safetensors files (including deliberately
//! broken ones) and read tensors back.
#![allow(dead_code)]

use amalgam::io::input::ModelFile;
use amalgam::method::ParamValue;
use amalgam::recipe::graph::{Graph, ModelInput, Node, Ref};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A tensor to write: name, safetensors dtype string, shape, raw little-endian bytes.
pub struct T {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

pub fn f32t(name: &str, shape: &[usize], v: &[f32]) -> T {
    assert_eq!(shape.iter().product::<usize>(), v.len());
    T {
        name: name.into(),
        dtype: "F32",
        shape: shape.to_vec(),
        bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

pub fn f16t(name: &str, shape: &[usize], v: &[f32]) -> T {
    T {
        name: name.into(),
        dtype: "F16",
        shape: shape.to_vec(),
        bytes: v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
    }
}

pub fn bf16t(name: &str, shape: &[usize], v: &[f32]) -> T {
    T {
        name: name.into(),
        dtype: "BF16",
        shape: shape.to_vec(),
        bytes: v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
    }
}

pub fn f64t(name: &str, shape: &[usize], v: &[f64]) -> T {
    T {
        name: name.into(),
        dtype: "F64",
        shape: shape.to_vec(),
        bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

pub fn raw(name: &str, dtype: &'static str, shape: &[usize], bytes: Vec<u8>) -> T {
    T {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
        bytes,
    }
}

/// The header JSON and data of a safetensors file, tensors in the given order.
pub fn encode(tensors: &[T]) -> (String, Vec<u8>) {
    let mut header = String::from("{");
    let mut data = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let start = data.len();
        data.extend_from_slice(&t.bytes);
        if i > 0 {
            header.push(',');
        }
        header += &format!(
            "\"{}\":{{\"dtype\":\"{}\",\"shape\":{:?},\"data_offsets\":[{},{}]}}",
            t.name,
            t.dtype,
            t.shape,
            start,
            data.len()
        );
    }
    header.push('}');
    (header, data)
}

/// Writes a safetensors file; `pad` pads the header to 8 bytes as the reference writers do
/// (without it, tensor data may start misaligned).
pub fn write_file(path: &Path, tensors: &[T], pad: bool) -> PathBuf {
    let (mut header, data) = encode(tensors);
    if pad {
        while header.len() % 8 != 0 {
            header.push(' ');
        }
    }
    write_raw(path, header.as_bytes(), &data)
}

pub fn write_raw(path: &Path, header: &[u8], data: &[u8]) -> PathBuf {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
    path.to_path_buf()
}

pub fn read_f32(path: &Path, key: &str) -> Vec<f32> {
    let m = ModelFile::open(path).unwrap();
    let n = m
        .tensor(key)
        .unwrap_or_else(|| panic!("{key} missing"))
        .numel();
    let mut v = vec![0f32; n];
    m.read_chunk(key, 0, &mut v, &mut Vec::new()).unwrap();
    v
}

pub fn read_f64(path: &Path, key: &str) -> Vec<f64> {
    let m = ModelFile::open(path).unwrap();
    let n = m.tensor(key).unwrap().numel();
    let mut v = vec![0f64; n];
    m.read_chunk(key, 0, &mut v, &mut Vec::new()).unwrap();
    v
}

/// A one-node graph over `models` (paths), with `slots` given as model indices.
pub fn one_node(
    models: &[&Path],
    method: &str,
    slots: Vec<Vec<usize>>,
    params: &[(&str, ParamValue)],
) -> Graph {
    let graph = Graph {
        models: models
            .iter()
            .enumerate()
            .map(|(i, p)| ModelInput {
                name: format!("m{i}"),
                path: p.to_path_buf(),
            })
            .collect(),
        nodes: vec![Node {
            name: "n".into(),
            method: amalgam::methods::canonical_name(method).unwrap(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
            slots: slots
                .into_iter()
                .map(|s| s.into_iter().map(Ref::Model).collect())
                .collect(),
        }],
        output: Ref::Node(0),
        fallback: None,
        components: Default::default(),
        repair: None,
    };
    graph.validate().unwrap();
    graph
}

pub fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol,
            "element {i}: got {g}, want {w} (all: {got:?})"
        );
    }
}

/// Files in `dir` whose name contains `part`.
pub fn files_containing(dir: &Path, part: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(part))
        .collect()
}

/// Every f32 tensor of a file, read at once: name → values.
pub fn all_f32(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(_, v)| v.dtype() == safetensors::Dtype::F32)
        .map(|(k, v)| {
            let x = v
                .data()
                .chunks(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (k, x)
        })
        .collect()
}

/// Writes `base.safetensors` and `n` fine-tunes `m000...` of `layout` in f32 into `dir`, every
/// dimension above 16 divided by `shrink`; returns their paths (base first).
pub fn f32_pool(
    dir: &Path,
    layout: amalgam::layout::arch::Layout,
    n: usize,
    shrink: usize,
) -> Vec<PathBuf> {
    let mut o = amalgam::synth::SynthOptions::new(layout, n);
    o.shrink = shrink;
    o.dtype = amalgam::io::dtype::OutputDtype::F32;
    amalgam::synth::synthesize(dir, &o).unwrap()
}

/// The slots of `method` over a pool: one-model slots take models 0, 1, ... in order, list slots
/// the models `many`.
pub fn slots_for(method: &str, many: std::ops::Range<usize>) -> Vec<Vec<usize>> {
    let info = amalgam::methods::info(method).unwrap();
    let mut next = 0;
    info.slots
        .iter()
        .map(|s| match s.kind {
            amalgam::method::SlotKind::One => {
                next += 1;
                vec![next - 1]
            }
            amalgam::method::SlotKind::Many => many.clone().collect(),
        })
        .collect()
}

/// Merges f64 `inputs` (key `key`, all of `shape`, one file each) with `method` in f64 under
/// `seed`, through a real merge of safetensors files: one input per one-model slot in order, the
/// rest to a list slot. Returns the output's values, or the merge's error.
pub fn try_merge_f64(
    dir: &Path,
    key: &str,
    shape: &[usize],
    inputs: &[Vec<f64>],
    method: &str,
    params: &[(&str, ParamValue)],
    seed: u64,
) -> Result<Vec<f64>, String> {
    let paths: Vec<PathBuf> = inputs
        .iter()
        .enumerate()
        .map(|(i, x)| {
            write_file(
                &dir.join(format!("m{i}.safetensors")),
                &[f64t(key, shape, x)],
                true,
            )
        })
        .collect();
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let ones = amalgam::methods::info(method)
        .unwrap()
        .slots
        .iter()
        .filter(|s| s.kind == amalgam::method::SlotKind::One)
        .count();
    let g = one_node(&refs, method, slots_for(method, ones..inputs.len()), params);
    let out = dir.join("out.safetensors");
    let _ = std::fs::remove_file(&out);
    let mut o = amalgam::MergeOptions::new(&out);
    o.output_dtype = amalgam::io::dtype::OutputDtype::F64;
    o.compute_dtype = amalgam::real::ComputeDtype::F64;
    o.seed = seed;
    amalgam::merge(&g, &o, &amalgam::NoProgress).map_err(|e| e.to_string())?;
    Ok(read_f64(&out, key))
}

/// [`try_merge_f64`] under seed 0, which must succeed.
pub fn merge_f64_key(
    dir: &Path,
    key: &str,
    shape: &[usize],
    inputs: &[Vec<f64>],
    method: &str,
    params: &[(&str, ParamValue)],
) -> Vec<f64> {
    try_merge_f64(dir, key, shape, inputs, method, params, 0).unwrap()
}

/// [`merge_f64_key`] of key `w`.
pub fn merge_f64(
    dir: &Path,
    shape: &[usize],
    inputs: &[Vec<f64>],
    method: &str,
    params: &[(&str, ParamValue)],
) -> Vec<f64> {
    merge_f64_key(dir, "w", shape, inputs, method, params)
}

/// Pseudo-random values in [-1, 1) (a fixed LCG: the test's data, not the method's).
pub fn lcg_values(seed: u64, n: usize) -> Vec<f64> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect()
}

/// A JSON fixture file of `tests/fixtures/`.
pub fn json_fixture(name: &str) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A fixture tensor `{shape, values}` (nested, row-major) as (shape, flat values).
pub fn json_tensor(v: &serde_json::Value) -> (Vec<usize>, Vec<f64>) {
    fn flatten(v: &serde_json::Value, out: &mut Vec<f64>) {
        match v {
            serde_json::Value::Array(a) => a.iter().for_each(|x| flatten(x, out)),
            x => out.push(x.as_f64().unwrap()),
        }
    }
    let shape = v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let mut values = Vec::new();
    flatten(&v["values"], &mut values);
    (shape, values)
}

/// The values of a fixture's list of tensors (their shapes are the output's).
pub fn json_tensors(v: &serde_json::Value) -> Vec<Vec<f64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| json_tensor(t).1)
        .collect()
}

/// A fixture's parameter: a flag, a number, a text or a list of numbers.
pub fn json_param(v: &serde_json::Value) -> amalgam::method::ParamValue {
    use amalgam::method::ParamValue;
    match v {
        serde_json::Value::Bool(b) => ParamValue::Bool(*b),
        serde_json::Value::Number(x) => ParamValue::Number(x.as_f64().unwrap()),
        serde_json::Value::String(s) => ParamValue::Text(s.clone()),
        serde_json::Value::Array(a) => {
            ParamValue::List(a.iter().map(|x| x.as_f64().unwrap()).collect())
        }
        other => panic!("parameter {other}"),
    }
}

/// A fixture's parameters object, by name.
pub fn json_params(v: &serde_json::Value) -> Vec<(&str, amalgam::method::ParamValue)> {
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str(), json_param(v)))
        .collect()
}

/// `text` written to `dir/name` and loaded as a `.mecha` recipe (its models relative to `dir`).
pub fn load_mecha_text(dir: &Path, name: &str, text: &str) -> Graph {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    amalgam::recipe::mecha::load(&p, &[]).unwrap().graph
}

/// `g` merged in f64 to `dir/out` (written f64): the values of its key `w`.
pub fn run_graph_f64(dir: &Path, g: &Graph, out: &str) -> Vec<f64> {
    let out = dir.join(out);
    let mut o = amalgam::MergeOptions::new(&out);
    o.output_dtype = amalgam::io::dtype::OutputDtype::F64;
    o.compute_dtype = amalgam::real::ComputeDtype::F64;
    amalgam::merge(g, &o, &amalgam::NoProgress).unwrap();
    read_f64(&out, "w")
}
