//! Tools whose output is a kohya LoRA file rather than a merged checkpoint: [`extract`] (a
//! fine-tune's delta as a LoRA) and [`knots`] (LoRAs merged in their shared singular basis,
//! KnOTS). They run outside the merge engine (their output's keys are not the inputs') and write
//! through [`write_lora`].

pub mod extract;
pub mod knots;

use crate::error::Result;
use crate::io::dtype::OutputDtype;
use crate::io::output::{OutputFile, OutputTensor};
use std::collections::HashMap;
use std::path::Path;

/// One module's factors, encoded in the output dtype: `up` `[out, r]` (`[out, r, 1, 1]` for a
/// convolution), `down` `[r, rest...]`, row-major.
pub(crate) struct Factors {
    /// The kohya module name.
    pub(crate) module: String,
    /// `out`, the rank and the key's shape after the first dimension.
    pub(crate) out: usize,
    pub(crate) rank: usize,
    pub(crate) rest: Vec<usize>,
    pub(crate) up: Vec<u8>,
    pub(crate) down: Vec<u8>,
}

/// `values` encoded in `dtype`.
pub(crate) fn encoded(values: &[f64], dtype: OutputDtype) -> Vec<u8> {
    let mut bytes = vec![0u8; values.len() * dtype.size()];
    dtype.encode(values, &mut bytes);
    bytes
}

/// Writes the modules (sorted by name) as a kohya LoRA: each module's `alpha` (= its rank, so the
/// scale is 1), `lora_down.weight` and `lora_up.weight`.
pub(crate) fn write_lora(
    path: &Path,
    mut factors: Vec<Factors>,
    dtype: OutputDtype,
    metadata: HashMap<String, String>,
    overwrite: bool,
) -> Result<()> {
    factors.sort_by(|a, b| a.module.cmp(&b.module));
    let st = dtype.safetensors();
    let mut tensors = Vec::new();
    let mut data: Vec<Vec<u8>> = Vec::new();
    for f in factors {
        let (m, r) = (&f.module, f.rank);
        tensors.push(OutputTensor {
            name: format!("{m}.alpha"),
            dtype: st,
            shape: Vec::new(),
        });
        data.push(encoded(&[r as f64], dtype));
        let mut down = vec![r];
        down.extend(&f.rest);
        tensors.push(OutputTensor {
            name: format!("{m}.lora_down.weight"),
            dtype: st,
            shape: down,
        });
        data.push(f.down);
        let mut up = vec![f.out, r];
        if f.rest.len() > 1 {
            up.extend([1, 1]);
        }
        tensors.push(OutputTensor {
            name: format!("{m}.lora_up.weight"),
            dtype: st,
            shape: up,
        });
        data.push(f.up);
    }
    let mut metadata = metadata;
    metadata.insert("format".to_string(), "pt".to_string());
    metadata.insert("amalgam_version".to_string(), crate::VERSION.to_string());
    let out = OutputFile::create(path, &tensors, metadata, overwrite)?;
    for (i, bytes) in data.iter().enumerate() {
        out.write_at(i, 0, bytes)?;
    }
    out.commit()?;
    Ok(())
}
