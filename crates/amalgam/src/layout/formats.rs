//! Key formats: how a checkpoint saved by kohya's scripts or in diffusers names is read as the
//! original (ldm/sgm) layout, so that models saved by different tools merge together.
//!
//! - UNet: diffusers block names (`down_blocks.i.resnets.j`, `mid_block`, `up_blocks.i`) ↔ the
//!   original `input_blocks.n`, `middle_block`, `output_blocks.n`, with the resnet parts renamed.
//! - CLIP-L: the same HF names under another prefix.
//! - CLIP-G (SDXL): HF names ↔ OpenCLIP names; HF's separate `q_proj`, `k_proj`, `v_proj` are the
//!   row blocks of OpenCLIP's fused `in_proj_weight`/`in_proj_bias`, and `text_projection` is
//!   transposed.
//! - VAE (SD1 kohya files): diffusers names ↔ ldm names; the attention projections are linear
//!   `[o, i]` in diffusers and 1×1 convolutions `[o, i, 1, 1]` in ldm (the same elements).

use crate::layout::arch::Layout;
use std::collections::BTreeMap;

/// How one key of the canonical layout is read from a file in another layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The same elements under another name (the shape may differ by unit dimensions).
    Rename(String),
    /// The tensors of these keys stacked along the first dimension.
    Concat(Vec<String>),
    /// The 2-D tensor of this key, transposed.
    Transpose(String),
}

impl Source {
    /// The source keys read.
    pub fn keys(&self) -> Vec<&str> {
        match self {
            Source::Rename(k) | Source::Transpose(k) => vec![k],
            Source::Concat(ks) => ks.iter().map(String::as_str).collect(),
        }
    }
}

/// The original layout a layout is read as: ldm for SD1, sgm for SDXL; `None` for layouts that
/// are already original (or have no conversion).
pub fn canonical(layout: Layout) -> Option<Layout> {
    match layout {
        Layout::Sd1Kohya | Layout::Sd1DiffusersUnet => Some(Layout::Sd1Ldm),
        Layout::SdxlKohya | Layout::SdxlDiffusersUnet => Some(Layout::SdxlSgm),
        _ => None,
    }
}

/// Every key of the canonical layout a file in `from` provides, with how it is read. Keys the
/// mapping does not know are left out (they keep their names).
pub fn to_canonical(from: Layout, keys: &[&str]) -> BTreeMap<String, Source> {
    let mut out: BTreeMap<String, Source> = BTreeMap::new();
    let mut qkv: BTreeMap<String, [Option<String>; 3]> = BTreeMap::new();
    for &k in keys {
        match map_key(from, k) {
            Some(Mapped::Whole(c)) => {
                out.insert(c, Source::Rename(k.to_string()));
            }
            Some(Mapped::Transposed(c)) => {
                out.insert(c, Source::Transpose(k.to_string()));
            }
            Some(Mapped::Part(c, i)) => {
                qkv.entry(c).or_default()[i] = Some(k.to_string());
            }
            None => {}
        }
    }
    for (c, parts) in qkv {
        if let [Some(q), Some(k), Some(v)] = parts {
            out.insert(c, Source::Concat(vec![q, k, v]));
        }
    }
    out
}

enum Mapped {
    Whole(String),
    /// Row block `i` (q, k, v) of a fused key.
    Part(String, usize),
    Transposed(String),
}

fn map_key(from: Layout, key: &str) -> Option<Mapped> {
    if from == Layout::SdxlKohya {
        // kohya keeps the original UNet names under `unet.`.
        if let Some(rest) = key.strip_prefix("unet.") {
            return Some(Mapped::Whole(format!("model.diffusion_model.{rest}")));
        }
    }
    let unet_prefix = if matches!(from, Layout::Sd1DiffusersUnet | Layout::SdxlDiffusersUnet) {
        ""
    } else {
        "unet."
    };
    if let Some(rest) = key.strip_prefix(unet_prefix) {
        if let Some(u) = unet_to_ldm(rest, from) {
            return Some(Mapped::Whole(format!("model.diffusion_model.{u}")));
        }
    }
    if from == Layout::Sd1Kohya {
        if let Some(rest) = key.strip_prefix("te.") {
            return Some(Mapped::Whole(format!(
                "cond_stage_model.transformer.{rest}"
            )));
        }
        if let Some(rest) = key.strip_prefix("vae.") {
            return vae_to_ldm(rest).map(|v| Mapped::Whole(format!("first_stage_model.{v}")));
        }
    }
    if from == Layout::SdxlKohya {
        if let Some(rest) = key.strip_prefix("te1.") {
            return Some(Mapped::Whole(format!(
                "conditioner.embedders.0.transformer.{rest}"
            )));
        }
        if let Some(rest) = key.strip_prefix("te2.") {
            return clip_g_to_openclip(rest);
        }
        if key.starts_with("first_stage_model.") {
            return Some(Mapped::Whole(key.to_string()));
        }
    }
    None
}

/// A UNet key in diffusers names (without prefix) → the ldm/sgm name (without prefix).
fn unet_to_ldm(k: &str, from: Layout) -> Option<String> {
    let target = canonical(from)?;
    let exists = |name: &str| {
        target
            .get(&format!("model.diffusion_model.{name}"))
            .is_some()
    };
    let parts: Vec<&str> = k.split('.').collect();
    let num = |i: usize| -> Option<usize> { parts.get(i)?.parse().ok() };
    let tail = |from: usize| parts[from..].join(".");
    let simple = [
        ("conv_in.", "input_blocks.0.0."),
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
    ];
    for (d, l) in simple {
        if let Some(rest) = k.strip_prefix(d) {
            return Some(format!("{l}{rest}"));
        }
    }
    let name = match *parts.first()? {
        "down_blocks" => {
            let (i, kind) = (num(1)?, *parts.get(2)?);
            match kind {
                "resnets" => format!(
                    "input_blocks.{}.0.{}",
                    1 + 3 * i + num(3)?,
                    resnet(&tail(4))
                ),
                "attentions" => format!("input_blocks.{}.1.{}", 1 + 3 * i + num(3)?, tail(4)),
                "downsamplers" => format!(
                    "input_blocks.{}.0.op.{}",
                    3 * (i + 1),
                    tail(4).strip_prefix("conv.")?
                ),
                _ => return None,
            }
        }
        "mid_block" => match *parts.get(1)? {
            "resnets" => format!("middle_block.{}.{}", 2 * num(2)?, resnet(&tail(3))),
            "attentions" => format!("middle_block.1.{}", tail(3)),
            _ => return None,
        },
        "up_blocks" => {
            let (i, kind) = (num(1)?, *parts.get(2)?);
            match kind {
                "resnets" => format!("output_blocks.{}.0.{}", 3 * i + num(3)?, resnet(&tail(4))),
                "attentions" => format!("output_blocks.{}.1.{}", 3 * i + num(3)?, tail(4)),
                "upsamplers" => {
                    // The upsampler follows the level's last resnet (and its attention, if any).
                    let n = 3 * i + 2;
                    let rest = tail(4);
                    let with_attention = format!("output_blocks.{n}.2.{rest}");
                    if exists(&with_attention) {
                        with_attention
                    } else {
                        format!("output_blocks.{n}.1.{rest}")
                    }
                }
                _ => return None,
            }
        }
        _ => return None,
    };
    Some(name)
}

/// A UNet key in ldm/sgm names (without `model.diffusion_model.`) → the diffusers name: the
/// inverse of `unet_to_ldm`.
pub fn ldm_to_unet(k: &str) -> Option<String> {
    let simple = [
        ("input_blocks.0.0.", "conv_in."),
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ];
    for (l, d) in simple {
        if let Some(rest) = k.strip_prefix(l) {
            return Some(format!("{d}{rest}"));
        }
    }
    let parts: Vec<&str> = k.split('.').collect();
    let num = |i: usize| -> Option<usize> { parts.get(i)?.parse().ok() };
    let tail = |from: usize| parts[from..].join(".");
    match *parts.first()? {
        "input_blocks" => {
            let (n, sub) = (num(1)?, num(2)?);
            if n == 0 {
                return None;
            }
            if parts.get(3) == Some(&"op") {
                return Some(format!(
                    "down_blocks.{}.downsamplers.0.conv.{}",
                    n / 3 - 1,
                    tail(4)
                ));
            }
            let (i, j) = ((n - 1) / 3, (n - 1) % 3);
            match sub {
                0 => Some(format!(
                    "down_blocks.{i}.resnets.{j}.{}",
                    resnet_inv(&tail(3))
                )),
                1 => Some(format!("down_blocks.{i}.attentions.{j}.{}", tail(3))),
                _ => None,
            }
        }
        "middle_block" => match num(1)? {
            0 | 2 => Some(format!(
                "mid_block.resnets.{}.{}",
                num(1)? / 2,
                resnet_inv(&tail(2))
            )),
            1 => Some(format!("mid_block.attentions.0.{}", tail(2))),
            _ => None,
        },
        "output_blocks" => {
            let (n, sub) = (num(1)?, num(2)?);
            let (i, j) = (n / 3, n % 3);
            if parts.get(3) == Some(&"conv") && sub >= 1 {
                return Some(format!("up_blocks.{i}.upsamplers.0.conv.{}", tail(4)));
            }
            match sub {
                0 => Some(format!(
                    "up_blocks.{i}.resnets.{j}.{}",
                    resnet_inv(&tail(3))
                )),
                1 => Some(format!("up_blocks.{i}.attentions.{j}.{}", tail(3))),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Resnet part names, ldm → diffusers.
fn resnet_inv(rest: &str) -> String {
    let map = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ];
    for (l, d) in map {
        if let Some(r) = rest.strip_prefix(l) {
            return format!("{d}{r}");
        }
    }
    rest.to_string()
}

/// Resnet part names, diffusers → ldm.
fn resnet(rest: &str) -> String {
    let map = [
        ("norm1.", "in_layers.0."),
        ("conv1.", "in_layers.2."),
        ("time_emb_proj.", "emb_layers.1."),
        ("norm2.", "out_layers.0."),
        ("conv2.", "out_layers.3."),
        ("conv_shortcut.", "skip_connection."),
    ];
    for (d, l) in map {
        if let Some(r) = rest.strip_prefix(d) {
            return format!("{l}{r}");
        }
    }
    rest.to_string()
}

/// A VAE key in diffusers names (without `vae.`) → the ldm name (without `first_stage_model.`).
fn vae_to_ldm(k: &str) -> Option<String> {
    if k.starts_with("quant_conv.") || k.starts_with("post_quant_conv.") {
        return Some(k.to_string());
    }
    let (side, rest) = k.split_once('.')?;
    let parts: Vec<&str> = rest.split('.').collect();
    let num = |i: usize| -> Option<usize> { parts.get(i)?.parse().ok() };
    let tail = |from: usize| parts[from..].join(".");
    let block = |r: &str| r.replace("conv_shortcut.", "nin_shortcut.");
    let name = match *parts.first()? {
        "conv_in" | "conv_out" => rest.to_string(),
        "conv_norm_out" => format!("norm_out.{}", tail(1)),
        "mid_block" => match *parts.get(1)? {
            "resnets" => format!("mid.block_{}.{}", num(2)? + 1, block(&tail(3))),
            "attentions" => {
                let p = match tail(3).as_str() {
                    t if t.starts_with("group_norm.") => t.replacen("group_norm.", "norm.", 1),
                    t if t.starts_with("to_q.") => t.replacen("to_q.", "q.", 1),
                    t if t.starts_with("to_k.") => t.replacen("to_k.", "k.", 1),
                    t if t.starts_with("to_v.") => t.replacen("to_v.", "v.", 1),
                    t if t.starts_with("to_out.0.") => t.replacen("to_out.0.", "proj_out.", 1),
                    _ => return None,
                };
                format!("mid.attn_1.{p}")
            }
            _ => return None,
        },
        "down_blocks" => match *parts.get(2)? {
            "resnets" => format!("down.{}.block.{}.{}", num(1)?, num(3)?, block(&tail(4))),
            "downsamplers" => format!("down.{}.downsample.{}", num(1)?, tail(4)),
            _ => return None,
        },
        "up_blocks" => {
            // diffusers counts up blocks from the lowest resolution, ldm from the highest.
            let level = 3usize.checked_sub(num(1)?)?;
            match *parts.get(2)? {
                "resnets" => format!("up.{level}.block.{}.{}", num(3)?, block(&tail(4))),
                "upsamplers" => format!("up.{level}.upsample.{}", tail(4)),
                _ => return None,
            }
        }
        _ => return None,
    };
    Some(format!("{side}.{name}"))
}

/// A CLIP-G key in HF names (without `te2.`) → the OpenCLIP name in sgm.
fn clip_g_to_openclip(k: &str) -> Option<Mapped> {
    const P: &str = "conditioner.embedders.1.model.";
    let whole = |s: String| Some(Mapped::Whole(format!("{P}{s}")));
    match k {
        "text_model.embeddings.token_embedding.weight" => {
            return whole("token_embedding.weight".into())
        }
        "text_model.embeddings.position_embedding.weight" => {
            return whole("positional_embedding".into())
        }
        "text_projection.weight" => return Some(Mapped::Transposed(format!("{P}text_projection"))),
        _ => {}
    }
    if let Some(r) = k.strip_prefix("text_model.final_layer_norm.") {
        return whole(format!("ln_final.{r}"));
    }
    let r = k.strip_prefix("text_model.encoder.layers.")?;
    let (n, rest) = r.split_once('.')?;
    let block = format!("transformer.resblocks.{n}.");
    for (i, part) in ["q_proj.", "k_proj.", "v_proj."].iter().enumerate() {
        if let Some(wb) = rest
            .strip_prefix("self_attn.")
            .and_then(|s| s.strip_prefix(part))
        {
            return Some(Mapped::Part(format!("{P}{block}attn.in_proj_{wb}"), i));
        }
    }
    let map = [
        ("self_attn.out_proj.", "attn.out_proj."),
        ("layer_norm1.", "ln_1."),
        ("layer_norm2.", "ln_2."),
        ("mlp.fc1.", "mlp.c_fc."),
        ("mlp.fc2.", "mlp.c_proj."),
    ];
    for (h, o) in map {
        if let Some(x) = rest.strip_prefix(h) {
            return whole(format!("{block}{o}{x}"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn numel(s: &[usize]) -> usize {
        s.iter().product()
    }

    /// Maps every key of `from`'s layout and checks the result against the canonical layout:
    /// every canonical key exists there with a consistent shape, every source key is used once,
    /// and every required canonical key of the components `from` has is produced.
    fn check(from: Layout) {
        let to = canonical(from).unwrap();
        let keys: Vec<&str> = from.keys().iter().map(|k| k.key.as_str()).collect();
        let map = to_canonical(from, &keys);
        let mut used = BTreeSet::new();
        for (c, src) in &map {
            let target = to
                .get(c)
                .unwrap_or_else(|| panic!("{from}: {c} (from {src:?}) is not in {to}"));
            let shapes: Vec<&Vec<usize>> = src
                .keys()
                .iter()
                .map(|k| &from.get(k).unwrap().shape)
                .collect();
            match src {
                Source::Rename(_) => {
                    assert_eq!(numel(shapes[0]), numel(&target.shape), "{c}");
                    let squeeze =
                        |s: &[usize]| s.iter().copied().filter(|&d| d != 1).collect::<Vec<_>>();
                    assert_eq!(squeeze(shapes[0]), squeeze(&target.shape), "{c}");
                }
                Source::Concat(_) => {
                    let rows: usize = shapes.iter().map(|s| s[0]).sum();
                    assert_eq!(rows, target.shape[0], "{c}");
                    for s in &shapes {
                        assert_eq!(s[1..], target.shape[1..], "{c}");
                    }
                }
                Source::Transpose(_) => {
                    assert_eq!(shapes[0].len(), 2);
                    assert_eq!(vec![shapes[0][1], shapes[0][0]], target.shape, "{c}");
                }
            }
            for k in src.keys() {
                assert!(used.insert(k.to_string()), "{from}: {k} used twice");
            }
        }
        let unused: Vec<&&str> = keys.iter().filter(|k| !used.contains(**k)).collect();
        assert!(
            unused.is_empty(),
            "{from}: unmapped keys {:?}",
            &unused[..unused.len().min(5)]
        );
        let components: BTreeSet<&str> = from.keys().iter().map(|k| k.component.as_str()).collect();
        let missing: Vec<&str> = to
            .keys()
            .iter()
            .filter(|k| !k.optional && components.contains(k.component.as_str()))
            .filter(|k| !map.contains_key(&k.key))
            .map(|k| k.key.as_str())
            .collect();
        assert!(
            missing.is_empty(),
            "{from}: {} not produced, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
    }

    #[test]
    fn kohya_and_diffusers_layouts_map_onto_the_original_ones() {
        for from in [
            Layout::Sd1Kohya,
            Layout::Sd1DiffusersUnet,
            Layout::SdxlKohya,
            Layout::SdxlDiffusersUnet,
        ] {
            check(from);
        }
    }

    #[test]
    fn the_inverse_unet_names_are_the_real_diffusers_names() {
        // SD1: the original names map onto kohya's real diffusers names, one to one.
        let kohya: BTreeSet<String> = Layout::Sd1Kohya
            .keys()
            .iter()
            .filter_map(|k| k.key.strip_prefix("unet.").map(str::to_string))
            .collect();
        let mapped: BTreeSet<String> = Layout::Sd1Ldm
            .keys()
            .iter()
            .filter(|k| k.component == "diffuser")
            .filter_map(|k| k.key.strip_prefix("model.diffusion_model."))
            .map(|k| ldm_to_unet(k).unwrap())
            .collect();
        assert_eq!(mapped, kohya);
        // Both architectures: there and back again.
        for (layout, diffusers) in [
            (Layout::Sd1Ldm, Layout::Sd1DiffusersUnet),
            (Layout::SdxlSgm, Layout::SdxlDiffusersUnet),
        ] {
            for k in layout.keys().iter().filter(|k| k.component == "diffuser") {
                // (SDXL's optional prediction-type markers are not UNet weights.)
                let Some(ldm) = k.key.strip_prefix("model.diffusion_model.") else {
                    assert!(k.optional, "{}", k.key);
                    continue;
                };
                let d = ldm_to_unet(ldm).unwrap_or_else(|| panic!("{ldm}"));
                assert_eq!(unet_to_ldm(&d, diffusers).as_deref(), Some(ldm), "{d}");
            }
        }
    }
}
