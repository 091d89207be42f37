//! Synthetic checkpoints with a real Stable Diffusion key layout, for demos, tests and benchmarks.
//!
//! The layouts (`data/*.tsv`, copied from the project's layout facts) list every key with its
//! component, shape and dtype. Weights follow `shared/tools/synth_models.py`: the base is
//! `N(0, 0.02²)`; model `i` is `base + 1e-3·s_{i mod 8}·c + 5e-4·t`, where `c` is a direction shared
//! by every model (scaled per model group by `s`, so signs conflict between groups) and `t` is a
//! heavy-tailed (Student t, 2 degrees of freedom) individual part. Random numbers come from ChaCha8
//! keyed by (seed, key index) and model index, so files are identical whatever the thread count.

use crate::error::{Error, Result};
use crate::io::dtype::OutputDtype;
use crate::io::output::{OutputFile, OutputTensor};
use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use crate::layout::arch::{Layout, LayoutKey};

/// What to synthesise.
#[derive(Clone, Debug)]
pub struct SynthOptions {
    /// The key layout of the models.
    pub layout: Layout,
    /// Number of fine-tuned models (`m000`, `m001`, ...).
    pub n: usize,
    /// Divide every dimension larger than 16 by this (to at least 16). 1 = full size.
    pub shrink: usize,
    /// The dtype of their tensors.
    pub dtype: OutputDtype,
    /// The seed their values are drawn from.
    pub seed: u64,
    /// Also write `base.safetensors`.
    pub base: bool,
    /// Only these components (empty = all but the scheduler).
    pub components: Vec<String>,
    /// The first `prune_vae` fine-tunes lack the VAE keys, as pruned SDXL files do.
    pub prune_vae: usize,
    /// Include the optional integer keys (e.g. `position_ids`), copied through by merges.
    pub int_keys: bool,
    /// Replace files that already exist.
    pub overwrite: bool,
}

impl SynthOptions {
    /// The options for `n` models of `layout`.
    pub fn new(layout: Layout, n: usize) -> Self {
        SynthOptions {
            layout,
            n,
            shrink: 1,
            dtype: OutputDtype::F16,
            seed: 0,
            base: true,
            components: Vec::new(),
            prune_vae: 0,
            int_keys: false,
            overwrite: false,
        }
    }
}

fn shrink_shape(shape: &[usize], s: usize) -> Vec<usize> {
    shape
        .iter()
        .map(|&d| {
            if s <= 1 || d <= 16 {
                d
            } else {
                (d / s).max(16)
            }
        })
        .collect()
}

fn rng(seed: u64, key: usize, stream: u64) -> ChaCha8Rng {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&seed.to_le_bytes());
    k[8..16].copy_from_slice(&(key as u64).to_le_bytes());
    k[16..24].copy_from_slice(b"amalgSYN");
    let mut r = ChaCha8Rng::from_seed(k);
    r.set_stream(stream);
    r
}

/// A uniform in (0, 1], nearly always below 1: see [`student_t2`].
fn uniform(r: &mut ChaCha8Rng) -> f32 {
    uniform_of(r.next_u32())
}

fn uniform_of(word: u32) -> f32 {
    ((word >> 8) as f32 + 0.5) * (1.0 / 16_777_216.0)
}

/// The Student t (2 degrees of freedom) quantile of `u`. `uniform`'s largest draw rounds to
/// exactly 1.0 in f32 (2^24 - 0.5 has no f32), where the quantile is +Inf (about 150 values of a
/// full-size SDXL model): that draw is read as the largest f32 below 1.
fn student_t2(u: f32) -> f32 {
    let u = u.min(1.0 - f32::EPSILON / 2.0);
    (2.0 * u - 1.0) / (2.0 * u * (1.0 - u)).sqrt()
}

fn normals(r: &mut ChaCha8Rng, out: &mut [f32]) {
    for pair in out.chunks_mut(2) {
        let (u1, u2) = (uniform(r), uniform(r));
        let rad = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f32::consts::TAU * u2).sin_cos();
        pair[0] = rad * c;
        if pair.len() > 1 {
            pair[1] = rad * s;
        }
    }
}

/// Writes the models into `dir` and returns their paths (base first when written).
pub fn synthesize(dir: &Path, opts: &SynthOptions) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let keys: Vec<LayoutKey> = opts
        .layout
        .keys()
        .iter()
        .filter(|k| k.component != "scheduler")
        .filter(|k| opts.components.is_empty() || opts.components.contains(&k.component))
        .filter(|k| {
            let int = k.dtype.starts_with("int");
            if int {
                opts.int_keys
            } else {
                !k.optional
            }
        })
        .map(|k| LayoutKey {
            shape: shrink_shape(&k.shape, opts.shrink),
            ..k.clone()
        })
        .collect();
    if keys.is_empty() {
        return Err(Error::Invalid(format!(
            "no keys selected (components {:?})",
            opts.components
        )));
    }
    let mut names = Vec::new();
    if opts.base {
        names.push("base".to_string());
    }
    names.extend((0..opts.n).map(|i| format!("m{i:03}")));
    let shared: Vec<f32> = {
        let mut v = vec![0f32; 8];
        normals(&mut rng(opts.seed, usize::MAX, 0), &mut v);
        v
    };
    let mut files = Vec::new();
    let mut paths = Vec::new();
    for (mi, name) in names.iter().enumerate() {
        let fine = if opts.base {
            mi.checked_sub(1)
        } else {
            Some(mi)
        };
        let tensors: Vec<OutputTensor> = keys
            .iter()
            .filter(|k| !(k.component == "vae" && fine.is_some_and(|i| i < opts.prune_vae)))
            .map(|k| OutputTensor {
                name: k.key.clone(),
                dtype: if k.dtype.starts_with("int") {
                    Dtype::I64
                } else {
                    opts.dtype.safetensors()
                },
                shape: k.shape.clone(),
            })
            .collect::<Vec<_>>();
        let mut tensors = tensors;
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        let index: HashMap<String, usize> = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        let path = dir.join(format!("{name}.safetensors"));
        let mut meta = HashMap::new();
        meta.insert(
            "amalgam_synth".into(),
            format!("{:?} seed {} model {name}", opts.layout, opts.seed),
        );
        files.push((
            OutputFile::create(&path, &tensors, meta, opts.overwrite)?,
            index,
            fine,
        ));
        paths.push(path);
    }
    keys.par_iter()
        .enumerate()
        .try_for_each(|(ki, k)| -> Result<()> {
            let numel: usize = k.shape.iter().product();
            if k.dtype.starts_with("int") {
                let bytes: Vec<u8> = (0..numel as i64).flat_map(|v| v.to_le_bytes()).collect();
                for (f, index, _) in &files {
                    f.write_at(index[&k.key], 0, &bytes)?;
                }
                return Ok(());
            }
            let mut base = vec![0f32; numel];
            let mut common = vec![0f32; numel];
            let mut r = rng(opts.seed, ki, 0);
            normals(&mut r, &mut base);
            normals(&mut r, &mut common);
            base.iter_mut().for_each(|x| *x *= 0.02);
            let mut w = vec![0f32; numel];
            let mut bytes = vec![0u8; numel * opts.dtype.size()];
            for (f, index, fine) in &files {
                let Some(&ti) = index.get(&k.key) else {
                    continue;
                };
                match fine {
                    None => w.copy_from_slice(&base),
                    Some(i) => {
                        let s = 1e-3 * shared[i % 8];
                        let mut r = rng(opts.seed, ki, 1 + *i as u64);
                        for ((o, &b), &c) in w.iter_mut().zip(&base).zip(&common) {
                            *o = b + s * c + 5e-4 * student_t2(uniform(&mut r));
                        }
                    }
                }
                opts.dtype.encode(&w, &mut bytes);
                f.write_at(ti, 0, &bytes)?;
            }
            Ok(())
        })?;
    for (f, _, _) in files {
        f.commit()?;
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_draw_has_a_finite_heavy_tail() {
        // 2^24 - 0.5 rounds to 2^24: the top draw is exactly 1, where the quantile is +Inf.
        assert_eq!(uniform_of(u32::MAX), 1.0);
        let top = student_t2(uniform_of(u32::MAX));
        assert!(top.is_finite() && top > 1000.0, "{top}");
        let bottom = student_t2(uniform_of(0));
        assert!(bottom.is_finite() && bottom < -1000.0, "{bottom}");
        // Every other draw keeps its value: only the draw that was +Inf changes.
        for w in [1u32 << 8, 1 << 31, u32::MAX - 256, u32::MAX - 512] {
            let u = uniform_of(w);
            assert!(u < 1.0);
            assert_eq!(
                student_t2(u).to_bits(),
                ((2.0 * u - 1.0) / (2.0 * u * (1.0 - u)).sqrt()).to_bits()
            );
        }
    }
}
