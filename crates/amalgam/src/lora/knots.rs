//! KnOTS (Stoica et al. 2024, spec §14): LoRAs merged in the singular basis they share. For each
//! module, with `ΔW_t = (alpha_t / r_t)·up_t·down_t` the update of LoRA `t`:
//!
//! ```text
//! [ΔW_1 | … | ΔW_N] = U Σ Vh           (thin SVD, f64; components with σ ≤ 1e-5 dropped)
//! R_t = Σ·Vh_t                          (so that ΔW_t = U·R_t: LoRA t in the shared basis)
//! R = λ·merge(R_1 … R_N)                (TIES over every module's R_t at once, below)
//! ΔW = U·R                              → lora_up = U, lora_down = R, alpha = rank
//! ```
//!
//! The merge treats each LoRA's `R_t` of all modules as one vector, as the paper: KnOTS-TIES keeps
//! the top `k` = 20 % of each vector by magnitude (a threshold over the whole vector), elects
//! each element's sign by mass (a zero sum takes the majority of the elected signs), and takes the
//! disjoint mean, λ = 0.6; KnOTS-DARE-TIES first drops each element with probability `p` = 0.1
//! and rescales the kept by `1/(1 − p)` (a counter-based mask keyed by the seed, the module and
//! the LoRA), keeps all (`k` = 1), λ = 0.7.
//!
//! The SVD is taken through the LoRAs' factors: `[ΔW_t]` = `Q·[Qᵀ ΔW_t]` with `Q` an orthonormal
//! basis of the `[up_t]` columns, so only a matrix of `Σ r_t` rows is factored. Memory: every
//! module's `R_t` of every LoRA (f32), about N times the LoRAs' parameters.

use super::{encoded, write_lora, Factors};
use crate::error::{Error, Result};
use crate::io::dtype::OutputDtype;
use crate::io::input::ModelFile;
use crate::layout::lora::{lora_modules, LoraModule};
use crate::methods::svd::spectrum::{polar, thin_svd, Factorization};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

/// The merge applied in the shared basis.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Variant {
    /// KnOTS-TIES: top-k trim, mass election, disjoint mean.
    Ties,
    /// KnOTS-DARE-TIES: DARE drop and rescale, then election and disjoint mean.
    DareTies,
}

impl Variant {
    /// The paper's defaults: (k, p, λ).
    pub fn defaults(self) -> (f64, f64, f64) {
        match self {
            Variant::Ties => (0.2, 0.0, 0.6),
            Variant::DareTies => (1.0, 0.1, 0.7),
        }
    }
}

/// What to merge and where.
#[derive(Clone, Debug)]
pub struct KnotsOptions {
    /// The LoRA files (kohya names, SD1 or SDXL).
    pub loras: Vec<PathBuf>,
    /// The LoRA file written.
    pub output: PathBuf,
    /// The merge in the shared basis.
    pub variant: Variant,
    /// The fraction of each LoRA's vector kept by magnitude (1: all).
    pub k: f64,
    /// DARE's drop probability (`DareTies`).
    pub p: f64,
    /// The scaling coefficient λ.
    pub lambda: f64,
    /// The seed of DARE's masks.
    pub seed: u64,
    /// The dtype of the factors written.
    pub dtype: OutputDtype,
    /// Replace an existing output.
    pub overwrite: bool,
}

impl KnotsOptions {
    /// The options of `variant` with the paper's defaults.
    pub fn new(loras: Vec<PathBuf>, output: PathBuf, variant: Variant) -> Self {
        let (k, p, lambda) = variant.defaults();
        KnotsOptions {
            loras,
            output,
            variant,
            k,
            p,
            lambda,
            seed: 0,
            dtype: OutputDtype::F16,
            overwrite: false,
        }
    }
}

/// What a KnOTS merge did.
#[derive(Clone, Debug, Default)]
pub struct KnotsReport {
    /// The modules written with the rank of their shared basis.
    pub modules: Vec<(String, usize)>,
    /// Per LoRA: the magnitude threshold of its top-k (0 when all are kept).
    pub thresholds: Vec<f64>,
    /// Modules some LoRAs have that name no key of the architecture (left out).
    pub unknown: Vec<String>,
    /// The file written.
    pub output: PathBuf,
}

impl std::fmt::Display for KnotsReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let max = self.modules.iter().map(|m| m.1).max().unwrap_or(0);
        writeln!(
            f,
            "KnOTS of {} LoRAs: {} modules, shared rank up to {max}",
            self.thresholds.len(),
            self.modules.len()
        )?;
        if !self.unknown.is_empty() {
            writeln!(
                f,
                "{} modules left out (no key of the architecture), e.g. `{}`",
                self.unknown.len(),
                self.unknown[0]
            )?;
        }
        write!(f, "wrote {}", self.output.display())
    }
}

/// One module of one LoRA: `scale·up·down`.
struct Update {
    up: Mat<f64>,
    down: Mat<f64>,
}

/// A module in the shared basis: `U` (`out × r`), and per LoRA its `R_t` (`r × in`, f32; empty
/// for a LoRA without the module).
struct Shared {
    u: Mat<f64>,
    r: Vec<Vec<f32>>,
    cols: usize,
    rest: Vec<usize>,
}

/// Reads a tensor of `file` whole as the `rows × (len / rows)` matrix.
fn matrix(file: &ModelFile, key: &str, rows: usize) -> Result<Mat<f64>> {
    let v = file.read_tensor::<f64>(key)?;
    Ok(MatRef::from_row_major_slice(&v, rows, v.len() / rows.max(1)).to_owned())
}

/// One LoRA's update of module `m`, checked: `up` `[out, r]` and `down` `[r, ...]` share a rank.
fn update(file: &ModelFile, m: &LoraModule) -> Result<(Update, Vec<usize>)> {
    let down = file.tensor(&m.down).expect("listed");
    let up = file.tensor(&m.up).expect("listed");
    let (rank, out) = (
        down.shape.first().copied().unwrap_or(0),
        up.shape.first().copied().unwrap_or(0),
    );
    if rank == 0 || up.shape.get(1) != Some(&rank) || up.numel() != out * rank {
        return Err(Error::bad_file(
            file.path(),
            format!(
                "LoRA module `{}`: up {:?} and down {:?} do not share a rank",
                m.up.trim_end_matches(".lora_up.weight"),
                up.shape,
                down.shape
            ),
        ));
    }
    let rest = down.shape[1..].to_vec();
    let scale = match &m.alpha {
        Some(a) => matrix(file, a, 1)?[(0, 0)] / rank as f64,
        None => 1.0,
    };
    let up = matrix(file, &m.up, out)?;
    Ok((
        Update {
            up: Mat::from_fn(out, up.ncols(), |i, j| up[(i, j)] * scale),
            down: matrix(file, &m.down, rank)?,
        },
        rest,
    ))
}

/// The shared basis of one module's updates (`None` for a LoRA without it).
fn share(module: &str, updates: &[Option<Update>], rest: Vec<usize>) -> Result<Shared> {
    let present: Vec<&Update> = updates.iter().flatten().collect();
    let out = present[0].up.nrows();
    let cols = present[0].down.ncols();
    // Q: an orthonormal basis of the columns of [up_1 … up_N] (the identity when they span all).
    let ranks: usize = present.iter().map(|u| u.up.ncols()).sum();
    let q = if ranks < out {
        let mut cat = vec![0.0; out * ranks];
        let mut at = 0;
        for u in &present {
            for i in 0..out {
                for j in 0..u.up.ncols() {
                    cat[i * ranks + at + j] = u.up[(i, j)];
                }
            }
            at += u.up.ncols();
        }
        let p = polar(&cat, out, ranks, Factorization::Auto, module)?.factor;
        MatRef::from_row_major_slice(&p, out, ranks).to_owned()
    } else {
        Mat::<f64>::identity(out, out)
    };
    let k = q.ncols();
    // S = [Qᵀ ΔW_1 | … | Qᵀ ΔW_N] (zero blocks for absent LoRAs), k × N·cols, row-major.
    let n = updates.len();
    let mut s = vec![0.0; k * n * cols];
    for (t, u) in updates.iter().enumerate() {
        let Some(u) = u else { continue };
        let mut qu = Mat::<f64>::zeros(k, u.up.ncols());
        matmul(
            qu.as_mut(),
            Accum::Replace,
            q.transpose(),
            u.up.as_ref(),
            1.0,
            Par::Seq,
        );
        let mut block = Mat::<f64>::zeros(k, cols);
        matmul(
            block.as_mut(),
            Accum::Replace,
            qu.as_ref(),
            u.down.as_ref(),
            1.0,
            Par::Seq,
        );
        for i in 0..k {
            for j in 0..cols {
                s[i * n * cols + t * cols + j] = block[(i, j)];
            }
        }
    }
    let (us, sigma, vh) = thin_svd(&s, k, n * cols, module)?;
    let r = sigma.iter().take_while(|&&x| x > 1e-5).count();
    let mut u = Mat::<f64>::zeros(out, r);
    matmul(
        u.as_mut(),
        Accum::Replace,
        q.as_ref(),
        us.subcols(0, r),
        1.0,
        Par::Seq,
    );
    // R_t = diag(σ) Vh_t: rows i < r, the columns of block t.
    let r_t = (0..n)
        .map(|t| {
            if updates[t].is_none() {
                return Vec::new();
            }
            let mut v = Vec::with_capacity(r * cols);
            for i in 0..r {
                for j in 0..cols {
                    v.push((sigma[i] * vh[(t * cols + j, i)]) as f32);
                }
            }
            v
        })
        .collect();
    Ok(Shared {
        u,
        r: r_t,
        cols,
        rest,
    })
}

/// The magnitude at or above which a fraction `k` of `values` is kept (TIES's `topk_values_mask`:
/// the `(len − ⌊len·k⌋)`-th smallest magnitude); 0 keeps all.
fn top_k_threshold(values: impl Iterator<Item = f32>, k: f64) -> f64 {
    if k >= 1.0 {
        return 0.0;
    }
    let mut mags: Vec<f32> = values.map(f32::abs).collect();
    if mags.is_empty() {
        return 0.0;
    }
    let d = mags.len();
    let kept = (d as f64 * k) as usize;
    let at = (d - kept).max(1) - 1;
    let (_, kth, _) = mags.select_nth_unstable_by(at, f32::total_cmp);
    *kth as f64
}

/// Merges the LoRAs of `opts` with KnOTS and writes the merged LoRA.
pub fn knots(opts: &KnotsOptions) -> Result<KnotsReport> {
    if opts.loras.is_empty() {
        return Err(Error::Invalid("KnOTS needs at least one LoRA".into()));
    }
    let inputs: Vec<&std::path::Path> = opts.loras.iter().map(|p| p.as_path()).collect();
    crate::io::dest::check_output(&opts.output, &inputs, opts.overwrite)?;
    let files = opts
        .loras
        .iter()
        .map(ModelFile::open)
        .collect::<Result<Vec<_>>>()?;
    // Every module of every LoRA, by name.
    let mut modules: BTreeMap<String, Vec<Option<LoraModule>>> = BTreeMap::new();
    let mut report = KnotsReport {
        output: opts.output.clone(),
        ..Default::default()
    };
    let mut layout = None;
    for (t, file) in files.iter().enumerate() {
        let names: Vec<&str> = file.tensors().keys().map(String::as_str).collect();
        let (l, found, unknown) = lora_modules(&names);
        let Some(l) = l else {
            return Err(Error::Invalid(format!(
                "{}: not a kohya LoRA of SD1 or SDXL",
                opts.loras[t].display()
            )));
        };
        if layout.is_some_and(|x| x != l) {
            return Err(Error::Invalid(format!(
                "{}: a LoRA for {l}, the others are for {}",
                opts.loras[t].display(),
                layout.expect("checked")
            )));
        }
        layout = Some(l);
        report.unknown.extend(unknown);
        for m in found {
            let name = m.up.trim_end_matches(".lora_up.weight").to_string();
            modules
                .entry(name)
                .or_insert_with(|| vec![None; files.len()])[t] = Some(m);
        }
    }
    report.unknown.sort();
    report.unknown.dedup();
    // Each module in its shared basis.
    let mut shared = Vec::new();
    for (name, per_lora) in &modules {
        let mut rest = Vec::new();
        let mut updates: Vec<Option<Update>> = Vec::new();
        for (file, m) in files.iter().zip(per_lora) {
            updates.push(match m {
                Some(m) => {
                    let (u, r) = update(file, m)?;
                    // The same module of every LoRA changes a tensor of the same shape.
                    if let Some(first) = updates.iter().flatten().next() {
                        let shape = |u: &Update| (u.up.nrows(), u.down.ncols());
                        if shape(first) != shape(&u) {
                            return Err(Error::bad_file(
                                file.path(),
                                format!(
                                    "LoRA module `{name}` changes a {:?} tensor, the other LoRAs' a {:?} one",
                                    shape(&u),
                                    shape(first)
                                ),
                            ));
                        }
                    }
                    rest = r;
                    Some(u)
                }
                None => None,
            });
        }
        shared.push((name, share(name, &updates, rest)?));
    }
    // DARE: each element kept with probability 1 − p, rescaled by 1/(1 − p).
    if opts.variant == Variant::DareTies && opts.p > 0.0 {
        let keep = crate::rng::threshold(1.0 - opts.p);
        let rescale = (1.0 / (1.0 - opts.p)) as f32;
        for (name, s) in &mut shared {
            for (t, r) in s.r.iter_mut().enumerate() {
                let mut draws = vec![0u16; r.len()];
                crate::rng::draws(opts.seed, name, t as u64, 0, &mut draws);
                for (x, &d) in r.iter_mut().zip(&draws) {
                    *x = if u32::from(d) < keep {
                        *x * rescale
                    } else {
                        0.0
                    };
                }
            }
        }
    }
    // Top-k of each LoRA's whole vector.
    report.thresholds = (0..files.len())
        .map(|t| {
            top_k_threshold(
                shared.iter().flat_map(|(_, s)| s.r[t].iter().copied()),
                opts.k,
            )
        })
        .collect();
    // Mass election per element; a zero sum takes the majority of the elected signs.
    let mut signs: Vec<Vec<f32>> = Vec::new();
    let mut majority = 0f64;
    for (_, s) in &shared {
        let len = s.u.ncols() * s.cols;
        let mut sum = vec![0f64; len];
        for (t, r) in s.r.iter().enumerate() {
            for (acc, &x) in sum.iter_mut().zip(r) {
                if f64::from(x.abs()) >= report.thresholds[t] {
                    *acc += f64::from(x);
                }
            }
        }
        let sign: Vec<f32> = sum
            .iter()
            .map(|&x| x.signum() as f32 * f32::from(x != 0.0))
            .collect();
        majority += sign.iter().map(|&x| f64::from(x)).sum::<f64>();
        signs.push(sign);
    }
    let majority = if majority >= 0.0 { 1.0 } else { -1.0 };
    // The disjoint mean of the kept values of the elected sign, times λ: the down factors.
    let mut out = Vec::new();
    for ((name, s), sign) in shared.iter().zip(signs) {
        let rank = s.u.ncols();
        if rank == 0 {
            continue;
        }
        let mut down = vec![0f64; rank * s.cols];
        for (e, d) in down.iter_mut().enumerate() {
            let g = if sign[e] == 0.0 { majority } else { sign[e] };
            let (mut total, mut count) = (0f64, 0usize);
            for (t, r) in s.r.iter().enumerate() {
                let Some(&x) = r.get(e) else { continue };
                if f64::from(x.abs()) >= report.thresholds[t] && x != 0.0 && (x > 0.0) == (g > 0.0)
                {
                    total += f64::from(x);
                    count += 1;
                }
            }
            *d = opts.lambda * total / count.max(1) as f64;
        }
        let mut up = vec![0f64; s.u.nrows() * rank];
        for i in 0..s.u.nrows() {
            for j in 0..rank {
                up[i * rank + j] = s.u[(i, j)];
            }
        }
        report.modules.push((name.to_string(), rank));
        out.push(Factors {
            module: name.to_string(),
            out: s.u.nrows(),
            rank,
            rest: s.rest.clone(),
            up: encoded(&up, opts.dtype),
            down: encoded(&down, opts.dtype),
        });
    }
    let mut metadata = HashMap::new();
    metadata.insert(
        "amalgam_knots".to_string(),
        format!(
            "{:?} of {} LoRAs, k = {}, p = {}, lambda = {}, seed = {}",
            opts.variant,
            files.len(),
            opts.k,
            opts.p,
            opts.lambda,
            opts.seed
        ),
    );
    write_lora(&opts.output, out, opts.dtype, metadata, opts.overwrite)?;
    Ok(report)
}
