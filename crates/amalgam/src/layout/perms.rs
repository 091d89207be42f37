//! Permutation specs for weight matching (Git Re-Basin, spec §15): the groups of hidden units a
//! network can permute without changing its function, as windows (key, axis, offset) of the
//! layout's keys that one permutation of `width` indices acts on together.
//!
//! The groups are those that leave the residual stream and every normalization untouched, so each
//! is local to one block (sd-mecha's choice):
//!
//! - **attention, per head**: the channels of `q` and `k` together (`QKᵀ` sums over them), and
//!   the channels of `v` with the matching input columns of the output projection;
//! - **feed-forward hidden units**: the rows of the first layer (both GEGLU halves of the UNet's
//!   `ff.net.0.proj` alike) with the columns of the second;
//! - the UNet's **time and label embedding** MLPs' hidden units.
//!
//! Convolution channels are not permuted: GroupNorm ties them in groups. Head counts are the real
//! models' (SD1's UNet 8 heads; SDXL's UNet 64 channels a head; CLIP-L 12; CLIP-G 20), so a
//! head's width is the key's rows over its head count, for full-size and shrunk models alike
//! (sd-mecha 1.1.8 takes 64 heads for every SDXL UNet attention, windows that straddle heads).

use crate::layout::arch::{Arch, Layout};

/// Where one permutation acts on one key: `width` indices of `axis` from `offset`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    /// The key.
    pub key: &'static str,
    /// The axis permuted.
    pub axis: usize,
    /// The first index of the window on that axis.
    pub offset: usize,
}

/// One permutation: `width` indices, applied to every window alike.
#[derive(Clone, Debug)]
pub struct PermGroup {
    /// What it permutes, e.g. `…attn1 qk head 3`.
    pub name: String,
    /// The number of indices.
    pub width: usize,
    /// The windows it acts on (a key may have several: CLIP-G's fused q/k).
    pub windows: Vec<Window>,
}

/// Why no spec could be made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpecError {
    /// Re-basin knows SD1 (ldm) and SDXL (sgm) only.
    Unsupported(Layout),
    /// A key the spec needs is missing from the model.
    MissingKey(String),
    /// A key's size is not a multiple of its head count.
    Heads {
        /// The key.
        key: String,
        /// Its rows.
        rows: usize,
        /// The head count.
        heads: usize,
    },
}

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpecError::Unsupported(l) => write!(
                f,
                "re-basin needs SD1 (ldm) or SDXL (sgm) checkpoints; these are {l}"
            ),
            SpecError::MissingKey(k) => write!(f, "the model lacks `{k}`, which re-basin permutes"),
            SpecError::Heads { key, rows, heads } => write!(
                f,
                "`{key}`: {rows} rows are not {heads} attention heads of equal width"
            ),
        }
    }
}

/// The heads of the attention whose query (or fused in-projection) key is `key`, from the
/// full-size model's `rows` (of one of q, k, v).
fn heads_of(arch: Arch, key: &str, rows: usize) -> usize {
    if key.contains("embedders.1.") {
        20
    } else if key.contains("text_model.") {
        12
    } else if arch == Arch::Sdxl {
        rows / 64
    } else {
        8
    }
}

/// The permutation groups of `layout` for a model whose key shapes `shape_of` gives (the
/// layout's own for a full-size model).
pub fn perm_groups(
    layout: Layout,
    shape_of: impl Fn(&str) -> Option<Vec<usize>>,
) -> Result<Vec<PermGroup>, SpecError> {
    if !matches!(layout, Layout::Sd1Ldm | Layout::SdxlSgm) {
        return Err(SpecError::Unsupported(layout));
    }
    let arch = layout.arch();
    let keys = layout.keys();
    let key = |k: &str| -> Result<&'static str, SpecError> {
        keys.iter()
            .find(|l| l.key == k)
            .filter(|l| shape_of(&l.key).is_some())
            .map(|l| l.key.as_str())
            .ok_or_else(|| SpecError::MissingKey(k.to_string()))
    };
    let shape = |k: &str| shape_of(k).ok_or_else(|| SpecError::MissingKey(k.to_string()));
    let win = |key: &'static str, axis, offset| Window { key, axis, offset };
    let mut groups = Vec::new();
    // Per head: `width` channels of each window list, one group per head.
    let per_head = |name: String,
                    anchor: &'static str,
                    full_rows: usize,
                    rows: usize,
                    windows: &[(&'static str, usize, usize)]|
     -> Result<Vec<PermGroup>, SpecError> {
        let heads = heads_of(arch, anchor, full_rows);
        if heads == 0 || rows % heads != 0 {
            return Err(SpecError::Heads {
                key: anchor.to_string(),
                rows,
                heads,
            });
        }
        let width = rows / heads;
        Ok((0..heads)
            .map(|h| PermGroup {
                name: format!("{name} head {h}"),
                width,
                windows: windows
                    .iter()
                    .map(|&(k, axis, base)| win(k, axis, base + h * width))
                    .collect(),
            })
            .collect())
    };
    // A two-layer MLP: `first` (and its bias) rows, `second` columns; `halves` row blocks of the
    // first layer share the permutation (GEGLU).
    let mlp = |name: String,
               first: &str,
               second: &str,
               halves: usize|
     -> Result<Vec<PermGroup>, SpecError> {
        let (w1, b1, w2) = (
            key(first)?,
            key(&first.replace("weight", "bias"))?,
            key(second)?,
        );
        let width = shape(w2)?[1];
        let mut windows = Vec::new();
        for part in 0..halves {
            windows.push(win(w1, 0, part * width));
            windows.push(win(b1, 0, part * width));
        }
        windows.push(win(w2, 1, 0));
        Ok(vec![PermGroup {
            name,
            width,
            windows,
        }])
    };
    for lk in keys {
        let k = lk.key.as_str();
        if shape_of(k).is_none() {
            continue;
        }
        let block = |suffix: &str| k.strip_suffix(suffix);
        if let Some(p) = block(".to_q.weight") {
            let (q, kk) = (key(k)?, key(&format!("{p}.to_k.weight"))?);
            let rows = shape(q)?[0];
            groups.extend(per_head(
                format!("{p} qk"),
                q,
                lk.shape[0],
                rows,
                &[(q, 0, 0), (kk, 0, 0)],
            )?);
        } else if let Some(p) = block(".to_v.weight") {
            let (v, o) = (key(k)?, key(&format!("{p}.to_out.0.weight"))?);
            let rows = shape(v)?[0];
            groups.extend(per_head(
                format!("{p} vo"),
                v,
                lk.shape[0],
                rows,
                &[(v, 0, 0), (o, 1, 0)],
            )?);
        } else if let Some(p) = block(".ff.net.2.weight") {
            groups.extend(mlp(
                format!("{p} ff"),
                &format!("{p}.ff.net.0.proj.weight"),
                k,
                2,
            )?);
        } else if let Some(p) = block(".time_embed.0.weight") {
            groups.extend(mlp(
                format!("{p} time_embed"),
                k,
                &format!("{p}.time_embed.2.weight"),
                1,
            )?);
        } else if let Some(p) = block(".label_emb.0.0.weight") {
            groups.extend(mlp(
                format!("{p} label_emb"),
                k,
                &format!("{p}.label_emb.0.2.weight"),
                1,
            )?);
        } else if let Some(p) = block(".self_attn.q_proj.weight") {
            let q = key(k)?;
            let ws = [
                q,
                key(&format!("{p}.self_attn.q_proj.bias"))?,
                key(&format!("{p}.self_attn.k_proj.weight"))?,
                key(&format!("{p}.self_attn.k_proj.bias"))?,
            ];
            let rows = shape(q)?[0];
            let windows: Vec<_> = ws.iter().map(|&w| (w, 0, 0)).collect();
            groups.extend(per_head(format!("{p} qk"), q, lk.shape[0], rows, &windows)?);
        } else if let Some(p) = block(".self_attn.v_proj.weight") {
            let v = key(k)?;
            let rows = shape(v)?[0];
            let windows = [
                (v, 0, 0),
                (key(&format!("{p}.self_attn.v_proj.bias"))?, 0, 0),
                (key(&format!("{p}.self_attn.out_proj.weight"))?, 1, 0),
            ];
            groups.extend(per_head(format!("{p} vo"), v, lk.shape[0], rows, &windows)?);
        } else if let Some(p) = block(".mlp.fc1.weight") {
            groups.extend(mlp(
                format!("{p} mlp"),
                k,
                &format!("{p}.mlp.fc2.weight"),
                1,
            )?);
        } else if let Some(p) = block(".attn.in_proj_weight") {
            let (w, b) = (key(k)?, key(&format!("{p}.attn.in_proj_bias"))?);
            let o = key(&format!("{p}.attn.out_proj.weight"))?;
            let c = shape(w)?[0] / 3;
            let full = lk.shape[0] / 3;
            groups.extend(per_head(
                format!("{p} qk"),
                w,
                full,
                c,
                &[(w, 0, 0), (w, 0, c), (b, 0, 0), (b, 0, c)],
            )?);
            groups.extend(per_head(
                format!("{p} vo"),
                w,
                full,
                c,
                &[(w, 0, 2 * c), (b, 0, 2 * c), (o, 1, 0)],
            )?);
        } else if let Some(p) = block(".mlp.c_fc.weight") {
            groups.extend(mlp(
                format!("{p} mlp"),
                k,
                &format!("{p}.mlp.c_proj.weight"),
                1,
            )?);
        }
    }
    Ok(groups)
}

/// Applies permutation `perm` (of `group.width` indices: index `i` of each window takes index
/// `perm[i]`'s values) to the row-major tensor `data` of key `key` and shape `shape`, on every
/// window of the group on that key.
pub fn permute_key(
    group: &PermGroup,
    perm: &[usize],
    key: &str,
    shape: &[usize],
    data: &mut [f64],
) {
    debug_assert_eq!(perm.len(), group.width);
    for w in group.windows.iter().filter(|w| w.key == key) {
        let outer: usize = shape[..w.axis].iter().product();
        let inner: usize = shape[w.axis + 1..].iter().product();
        let len = shape[w.axis];
        let mut window = vec![0.0; group.width * inner];
        for o in 0..outer {
            let at = |i: usize| (o * len + w.offset + i) * inner;
            for (i, &p) in perm.iter().enumerate() {
                window[i * inner..(i + 1) * inner].copy_from_slice(&data[at(p)..at(p) + inner]);
            }
            data[at(0)..at(0) + group.width * inner].copy_from_slice(&window);
        }
    }
}
