//! A model's keys as the engine sees them: other key formats (kohya, diffusers) read as the
//! original layout, and LoRA files read as the deltas they encode.

use super::*;

/// One key of a model as the engine sees it.
pub(super) type ViewedKey = (String, Vec<usize>, Place, Option<Vec<LoraSpec>>);

/// A model's keys as the engine sees them, the layout it counts as, and notes for the report.
pub(super) struct Viewed {
    pub(super) keys: Vec<ViewedKey>,
    pub(super) layout: Option<Layout>,
    pub(super) notes: Vec<String>,
}

/// `shape` with trailing unit dimensions added or removed to match the layout's key `key`
/// (ldm's 1×1 convolutions are diffusers' and LoRA's linear layers).
pub(super) fn unit_dims_like(mut shape: Vec<usize>, to: Layout, key: &str) -> Vec<usize> {
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
pub(super) fn lora_keys(model: &ModelFile, path: &Path) -> Result<Viewed> {
    let tensors = model.tensors();
    let names: Vec<&str> = tensors.keys().map(String::as_str).collect();
    let (layout, modules, unknown) = crate::layout::lora::lora_modules(&names);
    let Some(to) = layout else {
        return Err(Error::Invalid(format!(
            "{}: a LoRA file, but none of its modules names an SD1 or SDXL key (e.g. `{}`)",
            path.display(),
            unknown.first().map_or("", String::as_str)
        )));
    };
    let float = |k: &str| -> Result<(&crate::io::input::TensorEntry, FloatDtype)> {
        let e = &tensors[k];
        let d = e.float_dtype().ok_or_else(|| {
            Error::Invalid(format!("{}: `{k}` is not a float tensor", path.display()))
        })?;
        Ok((e, d))
    };
    // The modules of each target, in row-block order.
    let mut targets: BTreeMap<&str, Vec<&crate::layout::lora::LoraModule>> = BTreeMap::new();
    for m in &modules {
        targets.entry(m.target.as_str()).or_default().push(m);
    }
    let mut keys = Vec::new();
    let mut incomplete = Vec::new();
    for (target, mut parts) in targets {
        parts.sort_by_key(|m| m.part.0);
        if parts.len() != parts[0].part.1 {
            // A fused key needs all its parts (q, k and v) to be one delta.
            incomplete.extend(
                parts
                    .iter()
                    .map(|m| m.up.trim_end_matches(".lora_up.weight")),
            );
            continue;
        }
        let mut specs = Vec::new();
        for m in &parts {
            specs.push(module_spec(model, path, m, &float)?);
        }
        let out: usize = specs.iter().map(|s| s.out).sum();
        let mut shape = vec![out];
        let down = &tensors[&parts[0].down];
        shape.extend_from_slice(&down.shape[1..]);
        let shape = unit_dims_like(shape, to, target);
        let up = &tensors[&parts[0].up];
        let loc = Place {
            offset: up.offset,
            dtype: up.dtype,
            view: View::Plain,
        };
        keys.push((target.to_string(), shape, loc, Some(specs)));
    }
    let modules_read = modules.len() - incomplete.len();
    let mut notes = vec![format!(
        "{}: a LoRA for {to}: {modules_read} modules read as deltas",
        path.display(),
    )];
    if !unknown.is_empty() {
        notes.push(format!(
            "{}: {} LoRA modules left out: they name no key of {to} (e.g. `{}`)",
            path.display(),
            unknown.len(),
            unknown[0]
        ));
    }
    if !incomplete.is_empty() {
        notes.push(format!(
            "{}: {} LoRA modules left out: they are some but not all parts of a fused key (e.g. `{}` without its q/k/v siblings)",
            path.display(),
            incomplete.len(),
            incomplete[0]
        ));
    }
    Ok(Viewed {
        keys,
        layout: Some(to),
        notes,
    })
}

/// One LoRA module's factors, checked.
fn module_spec<'a>(
    model: &ModelFile,
    path: &Path,
    m: &crate::layout::lora::LoraModule,
    float: &impl Fn(&str) -> Result<(&'a crate::io::input::TensorEntry, FloatDtype)>,
) -> Result<LoraSpec> {
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
    Ok(LoraSpec {
        up: up.offset,
        up_dtype,
        down: down.offset,
        down_dtype,
        out,
        rank,
        inner: down.numel() / rank,
        scale: alpha / rank as f64,
    })
}

/// The keys of a model as the engine sees them: its own, or for a file saved in another key
/// format (kohya, diffusers), the original layout's keys read through a [`View`], or for a LoRA
/// file, the deltas it encodes.
pub(super) fn viewed_keys(
    model: &ModelFile,
    layout: Option<Layout>,
    path: &Path,
) -> Result<Viewed> {
    let tensors = model.tensors();
    let names: Vec<&str> = tensors.keys().map(String::as_str).collect();
    if crate::layout::lora::is_lora(&names) {
        return lora_keys(model, path);
    }
    let plain = |e: &crate::io::input::TensorEntry| Place {
        offset: e.offset,
        dtype: e.dtype,
        view: View::Plain,
    };
    let (Some(from), Some(to)) = (layout, layout.and_then(crate::layout::formats::canonical))
    else {
        return Ok(Viewed {
            keys: tensors
                .iter()
                .map(|(k, e)| (k.clone(), e.shape.clone(), plain(e), None))
                .collect(),
            layout,
            notes: Vec::new(),
        });
    };
    let map = crate::layout::formats::to_canonical(from, &names);
    let mut used = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(tensors.len());
    for (key, src) in &map {
        let entries: Vec<&crate::io::input::TensorEntry> =
            src.keys().iter().map(|k| &tensors[*k]).collect();
        used.extend(src.keys().into_iter().map(str::to_string));
        let e = entries[0];
        let (shape, view) = match src {
            crate::layout::formats::Source::Rename(_) => {
                (unit_dims_like(e.shape.clone(), to, key), View::Plain)
            }
            crate::layout::formats::Source::Concat(_) => {
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
            crate::layout::formats::Source::Transpose(_) => {
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
