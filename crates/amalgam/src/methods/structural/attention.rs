//! The attention layers of an SDXL (sgm) checkpoint as `balance_attention` groups them (sd-mecha
//! 1.1.8's key patterns), and the per-head maps that balance them.
//!
//! A layer's q, k, v and o are cut into heads of [`HEAD`] rows (o along its columns: the rows of
//! `oᵀ`); a q, k or v bias is one more column of its weight. Per head, with `A = q qᵀ + εI` and
//! `B = k kᵀ + εI`, `S = A^{-½} (A^{½} B A^{½})^{½} A^{-½}` (eigenvalues clamped at ε: sd-mecha's
//! `balance_head_energy`) solves `S A S = B`; `q ← S q`, `k ← S⁻¹ k` keep every logit `qᵀk`.
//! v and o are balanced the same way (`o`'s heads as the rows of `oᵀ`, so `o ← o S⁻ᵀ`).

use crate::error::{Error, Result};
use crate::methods::svd::stiefel::{mm, spectral, sym_evd};
use faer::Mat;
use std::collections::BTreeMap;

/// The rows of a head.
pub const HEAD: usize = 64;

/// The projection a key (or a part of a fused key) holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proj {
    /// The queries.
    Q,
    /// The keys.
    K,
    /// The values.
    V,
    /// The output projection.
    O,
}

/// What one key of a layer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A weight `[rows, cols, ...]` of one projection (o: its columns are the heads).
    Weight(Proj),
    /// The bias of q, k or v.
    Bias(Proj),
    /// CLIP-G's `in_proj_weight`: q, k and v stacked along the rows.
    FusedWeight,
    /// CLIP-G's `in_proj_bias`.
    FusedBias,
}

/// One attention layer: its keys and what each holds.
#[derive(Clone, Debug)]
pub struct Layer {
    /// `clip_l 3`, `unet input 4 1 attn1`, ...
    pub name: String,
    /// Its keys, each with what it holds.
    pub keys: Vec<(String, Role)>,
}

/// The layer key `key` belongs to, and its role (`None`: not an attention key sd-mecha balances;
/// the output projection's bias and the VAE's attention are left as they are, as in sd-mecha).
fn classify(key: &str) -> Option<(String, Role)> {
    use Proj::*;
    let proj = |p: &str| match p {
        "q" => Some(Q),
        "k" => Some(K),
        "v" => Some(V),
        _ => None,
    };
    if let Some(rest) = key.strip_prefix("conditioner.embedders.0.") {
        // CLIP-L: `...layers.N.self_attn.{q,k,v,out}_proj.{weight,bias}`.
        let (_, tail) = rest.split_once("layers.")?;
        let (layer, tail) = tail.split_once(".self_attn.")?;
        layer.parse::<usize>().ok()?;
        let (p, what) = tail.split_once("_proj.")?;
        let role = match (p, what) {
            ("out", "weight") => Role::Weight(O),
            (p, "weight") => Role::Weight(proj(p)?),
            (p, "bias") => Role::Bias(proj(p)?),
            _ => return None,
        };
        return Some((format!("clip_l {layer}"), role));
    }
    if let Some(rest) = key.strip_prefix("conditioner.embedders.1.") {
        // CLIP-G: `...resblocks.N.attn.{in_proj_weight,in_proj_bias,out_proj.weight}`.
        let (_, tail) = rest.split_once("resblocks.")?;
        let (layer, what) = tail.split_once(".attn.")?;
        layer.parse::<usize>().ok()?;
        let role = match what {
            "in_proj_weight" => Role::FusedWeight,
            "in_proj_bias" => Role::FusedBias,
            "out_proj.weight" => Role::Weight(O),
            _ => return None,
        };
        return Some((format!("clip_g {layer}"), role));
    }
    if let Some(rest) = key.strip_prefix("model.diffusion_model.") {
        // UNet: `{input_blocks.I.J,middle_block.J,output_blocks.I.J}.transformer_blocks.T.attn{1,2}.
        // {to_q,to_k,to_v,to_out.0}.weight`.
        let (block, tail) = rest.split_once(".transformer_blocks.")?;
        let (t, tail) = tail.split_once('.')?;
        t.parse::<usize>().ok()?;
        let (attn, what) = tail.split_once('.')?;
        if attn != "attn1" && attn != "attn2" {
            return None;
        }
        let role = match what {
            "to_q.weight" => Role::Weight(Q),
            "to_k.weight" => Role::Weight(K),
            "to_v.weight" => Role::Weight(V),
            "to_out.0.weight" => Role::Weight(O),
            _ => return None,
        };
        return Some((format!("unet {block} {t} {attn}"), role));
    }
    None
}

/// The attention layers among `keys`, in key order.
pub fn layers<'a>(keys: impl IntoIterator<Item = &'a str>) -> Vec<Layer> {
    let mut by_name: BTreeMap<String, Vec<(String, Role)>> = BTreeMap::new();
    for key in keys {
        if let Some((layer, role)) = classify(key) {
            by_name
                .entry(layer)
                .or_default()
                .push((key.to_string(), role));
        }
    }
    by_name
        .into_iter()
        .map(|(name, keys)| Layer { name, keys })
        .collect()
}

/// How q's and k's (v's and o's) energies are balanced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Balance {
    /// sd-mecha 1.1.8: `S` with `S A S = B`, so that q's Gram matrix becomes k's and k's q's.
    Swap,
    /// `T = S^{½}`: q's and k's Gram matrices made equal (`T A T = T⁻¹ B T⁻¹`).
    Equalize,
}

/// Where ε goes in each head's Gram matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpsAt {
    /// Where sd-mecha 1.1.8 puts it: its `a.diagonal()[:] += eps` on the `[heads, 64, 64]` batch
    /// takes the diagonal of the first two dimensions, so head `h` gets ε on every entry of its
    /// row `h` (heads 0 to 63); the eigendecompositions then read the lower triangle.
    SdMecha,
    /// On each Gram matrix's diagonal, as the formula says.
    Diagonal,
}

/// A matrix's lower triangle mirrored (what a symmetric eigensolver reading `L` sees).
fn lower(m: &Mat<f64>) -> Mat<f64> {
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i.max(j), i.min(j))])
}

/// One head's map and its inverse, row-major `HEAD × HEAD`.
pub struct HeadMap {
    /// `S` (or `S^{½}`): q's and v's heads are multiplied by it.
    pub map: Vec<f64>,
    /// Its inverse: k's and o's heads are multiplied by it.
    pub inverse: Vec<f64>,
}

/// A layer's maps: per head, one for q and k, one for v and o.
pub struct LayerMaps {
    /// Per head, q's and k's map.
    pub qk: Vec<HeadMap>,
    /// Per head, v's and o's map.
    pub vo: Vec<HeadMap>,
}

/// The heads of a projection: `HEAD` rows each, with the bias as one more column when given.
/// `o` is given as its transpose.
fn heads(weight: &[f64], cols: usize, bias: Option<&[f64]>) -> Vec<Mat<f64>> {
    let rows = weight.len() / cols;
    let width = cols + usize::from(bias.is_some());
    (0..rows / HEAD)
        .map(|h| {
            Mat::from_fn(HEAD, width, |i, j| {
                let r = h * HEAD + i;
                if j < cols {
                    weight[r * cols + j]
                } else {
                    bias.unwrap()[r]
                }
            })
        })
        .collect()
}

/// How a layer is balanced.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Which map.
    pub balance: Balance,
    /// Added to the Gram matrices; the least eigenvalue kept.
    pub eps: f64,
    /// Where ε is added.
    pub eps_at: EpsAt,
}

/// The map of head `h`'s pair: `S` (or `S^{½}`) and its inverse, from the heads `x` (q or v) and
/// `y` (k or o).
fn head_map(x: &Mat<f64>, y: &Mat<f64>, h: usize, set: Settings, at: &str) -> Result<HeadMap> {
    let eps = set.eps;
    let gram = |m: &Mat<f64>| {
        let mut g = mm(m.as_ref(), m.transpose());
        match set.eps_at {
            EpsAt::Diagonal => (0..HEAD).for_each(|i| g[(i, i)] += eps),
            EpsAt::SdMecha if h < HEAD => (0..HEAD).for_each(|j| g[(h, j)] += eps),
            EpsAt::SdMecha => {}
        }
        g
    };
    let (a, b) = (gram(x), gram(y));
    let (la, pa) = sym_evd(lower(&a).as_ref(), at)?;
    let la: Vec<f64> = la.iter().map(|&l| l.max(eps)).collect();
    let a_half = spectral(&pa, |i| la[i].sqrt());
    let a_neg_half = spectral(&pa, |i| 1.0 / la[i].sqrt());
    let c = mm(mm(a_half.as_ref(), b.as_ref()).as_ref(), a_half.as_ref());
    let (lc, pc) = sym_evd(lower(&c).as_ref(), at)?;
    let lc: Vec<f64> = lc.iter().map(|&l| l.max(eps)).collect();
    let c_half = spectral(&pc, |i| lc[i].sqrt());
    let three = |x: &Mat<f64>, y: &Mat<f64>| mm(mm(x.as_ref(), y.as_ref()).as_ref(), x.as_ref());
    // S and its inverse `A^{½} C^{-½} A^{½}`, from the same clamped eigenvalues: symmetric
    // positive definite.
    let s = three(&a_neg_half, &c_half);
    let s_inv = || three(&a_half, &spectral(&pc, |i| 1.0 / lc[i].sqrt()));
    let (map, inverse) = match set.balance {
        Balance::Swap => (s, s_inv()),
        Balance::Equalize => {
            // S^{±½} from the eigendecomposition of its symmetric part.
            let sym = Mat::from_fn(HEAD, HEAD, |i, j| 0.5 * (s[(i, j)] + s[(j, i)]));
            let (ls, ps) = sym_evd(sym.as_ref(), at)?;
            if ls.iter().any(|&l| l.is_nan() || l <= 0.0) {
                return Err(Error::Invalid(format!(
                    "{at}: a head's balancing map is not positive definite"
                )));
            }
            (
                spectral(&ps, |i| ls[i].sqrt()),
                spectral(&ps, |i| 1.0 / ls[i].sqrt()),
            )
        }
    };
    let flat = |m: &Mat<f64>| {
        (0..HEAD)
            .flat_map(|i| (0..HEAD).map(move |j| (i, j)))
            .map(|(i, j)| m[(i, j)])
            .collect()
    };
    Ok(HeadMap {
        map: flat(&map),
        inverse: flat(&inverse),
    })
}

/// A layer's tensors, read by key: the values (row-major) and shape.
pub type Read<'a> = dyn Fn(&str) -> Result<(Vec<f64>, Vec<usize>)> + 'a;

/// A projection's weight (row-major, o transposed), its column count and its bias.
type Projection = (Vec<f64>, usize, Option<Vec<f64>>);

/// The maps of `layer`, from its tensors.
pub fn layer_maps(layer: &Layer, read: &Read, set: Settings) -> Result<LayerMaps> {
    let at = |e: String| Error::Invalid(format!("attention layer `{}`: {e}", layer.name));
    let find = |role: Role| layer.keys.iter().find(|(_, r)| *r == role).map(|(k, _)| k);
    let need = |role: Role| {
        find(role).ok_or_else(|| {
            at(format!(
                "its {role:?} key is missing (keys: {})",
                layer
                    .keys
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    };
    // (weight rows, cols, bias) of each projection, o transposed.
    let mut proj: BTreeMap<Proj, Projection> = BTreeMap::new();
    // A weight `[rows, cols...]` as a matrix; its rows are heads unless it is o.
    let matrix = |key: &str, heads_on_rows: bool| -> Result<(Vec<f64>, usize, usize)> {
        let (v, shape) = read(key)?;
        let rows = *shape.first().unwrap_or(&0);
        let cols = shape.get(1..).map_or(0, |s| s.iter().product::<usize>());
        if shape.len() < 2 || (heads_on_rows && rows % HEAD != 0) {
            return Err(at(format!(
                "`{key}` is {shape:?}: its rows are not heads of {HEAD}"
            )));
        }
        Ok((v, rows, cols))
    };
    if let Some(fused) = find(Role::FusedWeight) {
        let (w, rows, cols) = matrix(fused, true)?;
        let (b, _) = read(need(Role::FusedBias)?)?;
        if rows % (3 * HEAD) != 0 || b.len() != rows {
            return Err(at(format!("`{fused}` is not q, k and v of whole heads")));
        }
        let dim = rows / 3;
        for (i, p) in [Proj::Q, Proj::K, Proj::V].into_iter().enumerate() {
            let part = w[i * dim * cols..(i + 1) * dim * cols].to_vec();
            proj.insert(p, (part, cols, Some(b[i * dim..(i + 1) * dim].to_vec())));
        }
    } else {
        for p in [Proj::Q, Proj::K, Proj::V] {
            let (w, rows, cols) = matrix(need(Role::Weight(p))?, true)?;
            let bias = find(Role::Bias(p))
                .map(|k| read(k).map(|r| r.0))
                .transpose()?;
            if bias.as_ref().is_some_and(|b| b.len() != rows) {
                return Err(at(format!("{p:?}'s bias is not one value per row")));
            }
            proj.insert(p, (w, cols, bias));
        }
    }
    let (o, rows, cols) = matrix(need(Role::Weight(Proj::O))?, false)?;
    if cols % HEAD != 0 {
        return Err(at(format!(
            "the output projection's {cols} columns are not heads of {HEAD}"
        )));
    }
    // oᵀ: `cols` rows (the heads) of `rows` values.
    let ot: Vec<f64> = (0..cols)
        .flat_map(|j| (0..rows).map(move |i| (i, j)))
        .map(|(i, j)| o[i * cols + j])
        .collect();
    proj.insert(Proj::O, (ot, rows, None));
    let heads_of = |p: Proj| {
        let (w, cols, b) = &proj[&p];
        heads(w, *cols, b.as_deref())
    };
    let pair = |x: Proj, y: Proj| -> Result<Vec<HeadMap>> {
        let (hx, hy) = (heads_of(x), heads_of(y));
        if hx.len() != hy.len() {
            return Err(at(format!(
                "{x:?} has {} heads of {HEAD} but {y:?} {}",
                hx.len(),
                hy.len()
            )));
        }
        hx.iter()
            .zip(&hy)
            .enumerate()
            .map(|(h, (a, b))| head_map(a, b, h, set, &format!("{} head {h}", layer.name)))
            .collect()
    };
    Ok(LayerMaps {
        qk: pair(Proj::Q, Proj::K)?,
        vo: pair(Proj::V, Proj::O)?,
    })
}

/// Applies `layer`'s maps to the tensor of its key with role `role` (row-major, `shape`).
pub fn apply(maps: &LayerMaps, role: Role, shape: &[usize], data: &mut [f64]) {
    use faer::linalg::matmul::matmul;
    use faer::{Accum, MatMut, MatRef, Par};
    let rows = shape.first().copied().unwrap_or(1);
    let cols = data.len() / rows.max(1);
    // `x ← M x` on rows `first..` of a `[_, cols]` matrix, head by head.
    let left = |data: &mut [f64], first: usize, heads: &[HeadMap], inverse: bool| {
        for (h, m) in heads.iter().enumerate() {
            let m = if inverse { &m.inverse } else { &m.map };
            let at = (first + h * HEAD) * cols..(first + (h + 1) * HEAD) * cols;
            let x = MatRef::from_row_major_slice(&data[at.clone()], HEAD, cols).to_owned();
            let out = MatMut::from_row_major_slice_mut(&mut data[at], HEAD, cols);
            let m = MatRef::from_row_major_slice(m, HEAD, HEAD);
            matmul(out, Accum::Replace, m, x.as_ref(), 1.0, Par::Seq);
        }
    };
    let by = |p: Proj| match p {
        Proj::Q => (&maps.qk, false),
        Proj::K => (&maps.qk, true),
        Proj::V => (&maps.vo, false),
        Proj::O => (&maps.vo, true),
    };
    match role {
        Role::Weight(Proj::O) => {
            // o ← o (S⁻¹)ᵀ on each head's columns.
            let (heads, _) = by(Proj::O);
            for (h, m) in heads.iter().enumerate() {
                let x = MatRef::from_row_major_slice(data, rows, cols)
                    .subcols(h * HEAD, HEAD)
                    .to_owned();
                let out =
                    MatMut::from_row_major_slice_mut(data, rows, cols).subcols_mut(h * HEAD, HEAD);
                let inv = MatRef::from_row_major_slice(&m.inverse, HEAD, HEAD);
                matmul(
                    out,
                    Accum::Replace,
                    x.as_ref(),
                    inv.transpose(),
                    1.0,
                    Par::Seq,
                );
            }
        }
        Role::Weight(p) | Role::Bias(p) => {
            let (heads, inverse) = by(p);
            left(data, 0, heads, inverse);
        }
        Role::FusedWeight | Role::FusedBias => {
            let dim = rows / 3;
            for (i, p) in [Proj::Q, Proj::K, Proj::V].into_iter().enumerate() {
                let (heads, inverse) = by(p);
                left(data, i * dim, heads, inverse);
            }
        }
    }
}
