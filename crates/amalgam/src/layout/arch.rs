//! Checkpoint architectures: the key layouts amalgam knows (embedded from the project's layout
//! facts), detection of a file's layout from its header, the components its keys belong to, and
//! the supermerger block ids of SD1 and SDXL keys.

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

/// A known key layout: an architecture saved in one tool's naming.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Layout {
    /// Stable Diffusion 1.x, original (ldm) key names.
    Sd1Ldm,
    /// Stable Diffusion 1.x as kohya's scripts save it (diffusers UNet and CLIP names).
    Sd1Kohya,
    /// Only the UNet of SD1, in diffusers names (`diffusion_pytorch_model.safetensors`).
    Sd1DiffusersUnet,
    /// Only the UNet of SDXL, in diffusers names (derived from the sgm layout).
    SdxlDiffusersUnet,
    /// Stable Diffusion XL, original (sgm) key names.
    SdxlSgm,
    /// Stable Diffusion XL as kohya's scripts save it (original UNet names under `unet.`, HF CLIP
    /// names).
    SdxlKohya,
    /// Stable Diffusion 3 as ComfyUI saves it.
    Sd3ComfyUi,
    /// FLUX.1 with its text encoders and VAE (original names).
    Flux,
}

/// The architecture a layout describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Stable Diffusion 1.x.
    Sd1,
    /// Stable Diffusion XL.
    Sdxl,
    /// Stable Diffusion 3.
    Sd3,
    /// FLUX.
    Flux,
}

/// One key of a layout.
#[derive(Clone, Debug)]
pub struct LayoutKey {
    /// The component the key belongs to (`unet`, `te0`, `vae`, ...).
    pub component: String,
    /// The key.
    pub key: String,
    /// Its shape in the full-size model.
    pub shape: Vec<usize>,
    /// Its dtype in the reference checkpoint.
    pub dtype: String,
    /// Whether checkpoints may omit it (EMA, `position_ids`, ...).
    pub optional: bool,
}

impl Layout {
    /// Every known layout, in documentation order.
    pub const ALL: [Layout; 8] = [
        Layout::Sd1Ldm,
        Layout::Sd1Kohya,
        Layout::Sd1DiffusersUnet,
        Layout::SdxlSgm,
        Layout::SdxlKohya,
        Layout::SdxlDiffusersUnet,
        Layout::Sd3ComfyUi,
        Layout::Flux,
    ];

    /// The layout's name, as in sd-mecha's model configs (`arch-format`).
    pub fn name(self) -> &'static str {
        match self {
            Layout::Sd1Ldm => "sd1-ldm",
            Layout::Sd1Kohya => "sd1-kohya",
            Layout::Sd1DiffusersUnet => "sd1-diffusers_unet",
            Layout::SdxlSgm => "sdxl-sgm",
            Layout::SdxlKohya => "sdxl-kohya",
            Layout::SdxlDiffusersUnet => "sdxl-diffusers_unet",
            Layout::Sd3ComfyUi => "sd3-comfyui",
            Layout::Flux => "flux-flux",
        }
    }

    /// The architecture this layout is a naming of.
    pub fn arch(self) -> Arch {
        match self {
            Layout::Sd1Ldm | Layout::Sd1Kohya | Layout::Sd1DiffusersUnet => Arch::Sd1,
            Layout::SdxlSgm | Layout::SdxlKohya | Layout::SdxlDiffusersUnet => Arch::Sdxl,
            Layout::Sd3ComfyUi => Arch::Sd3,
            Layout::Flux => Arch::Flux,
        }
    }

    /// The layout data and the key prefix it is derived with (diffusers UNet files are the
    /// kohya UNet keys without `unet.`).
    fn source(self) -> (&'static str, Option<&'static str>) {
        match self {
            Layout::Sd1Ldm => (include_str!("../../data/sd1-ldm.tsv"), None),
            Layout::Sd1Kohya => (include_str!("../../data/sd1-kohya.tsv"), None),
            Layout::Sd1DiffusersUnet => (include_str!("../../data/sd1-kohya.tsv"), Some("unet.")),
            Layout::SdxlSgm => (include_str!("../../data/sdxl-sgm.tsv"), None),
            Layout::SdxlKohya => (include_str!("../../data/sdxl-kohya.tsv"), None),
            // Derived below from the sgm UNet keys.
            Layout::SdxlDiffusersUnet => (include_str!("../../data/sdxl-sgm.tsv"), None),
            Layout::Sd3ComfyUi => (include_str!("../../data/sd3-comfyui.tsv"), None),
            Layout::Flux => (include_str!("../../data/flux-flux.tsv"), None),
        }
    }

    /// Every key of the layout, in file order.
    pub fn keys(self) -> &'static [LayoutKey] {
        static CACHE: OnceLock<HashMap<Layout, Vec<LayoutKey>>> = OnceLock::new();
        &CACHE.get_or_init(|| Layout::ALL.iter().map(|&l| (l, l.parse_keys())).collect())[&self]
    }

    fn parse_keys(self) -> Vec<LayoutKey> {
        if self == Layout::SdxlDiffusersUnet {
            return Layout::SdxlSgm
                .parse_keys()
                .into_iter()
                .filter(|k| k.component == "diffuser")
                .filter_map(|k| {
                    let ldm = k.key.strip_prefix("model.diffusion_model.")?;
                    Some(LayoutKey {
                        key: crate::layout::formats::ldm_to_unet(ldm)?,
                        ..k
                    })
                })
                .collect();
        }
        let (text, prefix) = self.source();
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                let key = match prefix {
                    Some(p) => f[1].strip_prefix(p)?.to_string(),
                    None => f[1].to_string(),
                };
                let shape = if f[2] == "scalar" {
                    Vec::new()
                } else {
                    f[2].split('x')
                        .map(|d| d.parse().expect("layout shape"))
                        .collect()
                };
                Some(LayoutKey {
                    component: f[0].to_string(),
                    key,
                    shape,
                    dtype: f[3].to_string(),
                    optional: f[4] == "1",
                })
            })
            .collect()
    }

    /// The index of every key of the layout.
    fn index(self) -> &'static HashMap<&'static str, usize> {
        static CACHE: OnceLock<HashMap<Layout, HashMap<&'static str, usize>>> = OnceLock::new();
        &CACHE.get_or_init(|| {
            Layout::ALL
                .iter()
                .map(|&l| {
                    let idx = l
                        .keys()
                        .iter()
                        .enumerate()
                        .map(|(i, k)| (k.key.as_str(), i))
                        .collect();
                    (l, idx)
                })
                .collect()
        })[&self]
    }

    /// The layout entry of `key`, if the layout has it.
    pub fn get(self, key: &str) -> Option<&'static LayoutKey> {
        self.index().get(key).map(|&i| &self.keys()[i])
    }

    /// The component `key` belongs to in this layout.
    pub fn component_of(self, key: &str) -> Option<&'static str> {
        self.get(key).map(|k| k.component.as_str())
    }

    /// The components of the layout, in the order they first appear.
    pub fn components(self) -> Vec<&'static str> {
        let mut out: Vec<&'static str> = Vec::new();
        for k in self.keys() {
            if !out.contains(&k.component.as_str()) {
                out.push(&k.component);
            }
        }
        out
    }
}

impl std::str::FromStr for Layout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.to_ascii_lowercase();
        let alias = match s.as_str() {
            "sd1" | "sd15" => "sd1-ldm",
            "sdxl" => "sdxl-sgm",
            "sd3" => "sd3-comfyui",
            "flux" => "flux-flux",
            other => other,
        };
        Layout::ALL
            .iter()
            .copied()
            .find(|l| l.name() == alias)
            .ok_or_else(|| {
                format!(
                    "unknown layout `{s}` (known: {})",
                    Layout::ALL.map(|l| l.name()).join(", ")
                )
            })
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How much of one component a file has.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ComponentStatus {
    /// The component's name.
    pub name: String,
    /// Required keys of the component the file has.
    pub present: usize,
    /// Optional keys of the component the file has.
    pub optional_present: usize,
    /// Required (non-optional) keys of the component in the layout.
    pub required: usize,
    /// Required keys the file lacks.
    pub missing: Vec<String>,
    /// Parameters (elements) of the keys the file has.
    pub parameters: usize,
}

impl ComponentStatus {
    /// Whether the file lacks the whole component (one with required keys).
    pub fn is_absent(&self) -> bool {
        self.required > 0 && self.present == 0
    }
}

/// What the header of a file says about its architecture.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Detection {
    /// The best-matching layout; `None` when no layout covers most of the file's keys (any
    /// other safetensors, e.g. an LLM: still mergeable key by key).
    #[serde(serialize_with = "layout_name")]
    pub layout: Option<Layout>,
    /// The file's keys the layout has.
    pub matched: usize,
    /// The file's keys the layout does not have.
    pub extra: Vec<String>,
    /// Per component of the layout.
    pub components: Vec<ComponentStatus>,
    /// Optional keys of the layout the file lacks (EMA, position ids, ...).
    pub missing_optional: usize,
    /// Keys whose shape differs from the layout's (shrunk test models have them all).
    pub reshaped: usize,
}

fn layout_name<S: serde::Serializer>(l: &Option<Layout>, s: S) -> Result<S::Ok, S::Error> {
    match l {
        Some(l) => s.serialize_str(l.name()),
        None => s.serialize_str("unknown"),
    }
}

/// Detects the layout of a file from its keys and their shapes (the header alone).
///
/// The layout with the most of the file's keys wins (ties go to the one whose keys the file
/// covers best); it must hold at least half of the file's keys.
pub fn detect<'a>(keys: impl IntoIterator<Item = (&'a str, &'a [usize], usize)>) -> Detection {
    let keys: Vec<(&str, &[usize], usize)> = keys.into_iter().collect();
    let mut best: Option<(Layout, usize)> = None;
    for l in Layout::ALL {
        let idx = l.index();
        let m = keys.iter().filter(|(k, _, _)| idx.contains_key(k)).count();
        let better = match best {
            None => m > 0,
            Some((b, bm)) => m > bm || (m == bm && l.keys().len() < b.keys().len()),
        };
        if better {
            best = Some((l, m));
        }
    }
    let layout = best
        .filter(|&(_, m)| m * 2 >= keys.len() && m > 0)
        .map(|(l, _)| l);
    let Some(layout) = layout else {
        return Detection {
            layout: None,
            matched: 0,
            extra: keys.iter().map(|(k, _, _)| k.to_string()).collect(),
            components: Vec::new(),
            missing_optional: 0,
            reshaped: 0,
        };
    };
    let present: HashMap<&str, (&[usize], usize)> =
        keys.iter().map(|&(k, s, n)| (k, (s, n))).collect();
    let mut components: BTreeMap<&str, ComponentStatus> = BTreeMap::new();
    let order = layout.components();
    let mut missing_optional = 0;
    let mut reshaped = 0;
    for lk in layout.keys() {
        let c = components
            .entry(lk.component.as_str())
            .or_insert_with(|| ComponentStatus {
                name: lk.component.clone(),
                present: 0,
                optional_present: 0,
                required: 0,
                missing: Vec::new(),
                parameters: 0,
            });
        if !lk.optional {
            c.required += 1;
        }
        match present.get(lk.key.as_str()) {
            Some(&(shape, numel)) => {
                if lk.optional {
                    c.optional_present += 1;
                } else {
                    c.present += 1;
                }
                c.parameters += numel;
                if shape != lk.shape.as_slice() {
                    reshaped += 1;
                }
            }
            None if lk.optional => missing_optional += 1,
            None => c.missing.push(lk.key.clone()),
        }
    }
    let idx = layout.index();
    Detection {
        layout: Some(layout),
        matched: keys.iter().filter(|(k, _, _)| idx.contains_key(k)).count(),
        extra: keys
            .iter()
            .filter(|(k, _, _)| !idx.contains_key(k))
            .map(|(k, _, _)| k.to_string())
            .collect(),
        components: order
            .iter()
            .map(|c| components.remove(c).expect("component"))
            .collect(),
        missing_optional,
        reshaped,
    }
}

impl Detection {
    /// The status of component `name`, if the layout has it.
    pub fn component(&self, name: &str) -> Option<&ComponentStatus> {
        self.components.iter().find(|c| c.name == name)
    }
}

/// The A1111 "AutoV2" hash users look models up by: the first 10 hex digits of the SHA-256 of
/// the whole file.
pub fn autov2_hash(path: &std::path::Path) -> crate::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| crate::Error::io(path, e))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| crate::Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let digest = h.finalize();
    Ok(digest.iter().take(5).map(|b| format!("{b:02x}")).collect())
}

/// The supermerger block ids of an architecture (MBW), in list order: SD1 has 26 (`BASE`,
/// `IN00`-`IN11`, `M00`, `OUT00`-`OUT11`), SDXL 20 (`BASE`, `IN00`-`IN08`, `M00`,
/// `OUT00`-`OUT08`, `VAE`).
pub fn block_ids(arch: Arch) -> Option<&'static [&'static str]> {
    const SD1: [&str; 26] = [
        "BASE", "IN00", "IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07", "IN08", "IN09",
        "IN10", "IN11", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05", "OUT06",
        "OUT07", "OUT08", "OUT09", "OUT10", "OUT11",
    ];
    const SDXL: [&str; 21] = [
        "BASE", "IN00", "IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07", "IN08", "M00",
        "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "VAE",
    ];
    match arch {
        Arch::Sd1 => Some(&SD1),
        Arch::Sdxl => Some(&SDXL),
        _ => None,
    }
}

/// The block id of `key` in `layout` (SD1 ldm and SDXL sgm names), following supermerger:
/// `input_blocks.i` → `IN{i}`, `middle_block` → `M00`, `output_blocks.j` → `OUT{j}`, the UNet's
/// final `out.` → the last OUT block, `time_embed` and `label_emb` → `IN00` (sd-mecha puts them
/// in BASE), the text encoders → `BASE`, the VAE → `VAE` on SDXL (supermerger: BASE; sd-mecha:
/// VAE) and `BASE` on SD1. `None` for layouts without block ids.
pub fn block_of(layout: Layout, key: &str) -> Option<&'static str> {
    block_of_with(layout, key, BlockMapping::Supermerger)
}

/// Which tool's key → block assignment to follow where they disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockMapping {
    /// `time_embed` and `label_emb` in `IN00` (supermerger; amalgam's default).
    Supermerger,
    /// `time_embed` and `label_emb` in `BASE` (sd-mecha's block conversions).
    SdMecha,
}

/// [`block_of`] with the given mapping.
pub fn block_of_with(layout: Layout, key: &str, mapping: BlockMapping) -> Option<&'static str> {
    let ids = block_ids(layout.arch())?;
    if !matches!(layout, Layout::Sd1Ldm | Layout::SdxlSgm) {
        return None;
    }
    let find = |name: String| ids.iter().copied().find(|&i| i == name);
    let Some(rest) = key.strip_prefix("model.diffusion_model.") else {
        return Some(
            if layout == Layout::SdxlSgm && key.starts_with("first_stage_model.") {
                "VAE"
            } else {
                "BASE"
            },
        );
    };
    let index = |s: &str| -> Option<usize> { s.split('.').next()?.parse().ok() };
    let last_out = if layout == Layout::Sd1Ldm {
        "OUT11"
    } else {
        "OUT08"
    };
    if let Some(r) = rest.strip_prefix("input_blocks.") {
        find(format!("IN{:02}", index(r)?))
    } else if rest.starts_with("middle_block.") {
        Some("M00")
    } else if let Some(r) = rest.strip_prefix("output_blocks.") {
        find(format!("OUT{:02}", index(r)?))
    } else if rest.starts_with("out.") {
        Some(last_out)
    } else if rest.starts_with("time_embed.") || rest.starts_with("label_emb.") {
        Some(match mapping {
            BlockMapping::Supermerger => "IN00",
            BlockMapping::SdMecha => "BASE",
        })
    } else {
        Some("BASE")
    }
}

/// Expands a supermerger list (the comma-separated values users paste) into block ids: 25 values
/// (SD1: `IN00`-`OUT11`), 26 (SD1 with `BASE` first), 19 (SDXL: `IN00`-`OUT08`) or 20 (SDXL with
/// `BASE` first).
pub fn expand_block_list(list: &str) -> Result<Vec<(&'static str, f64)>, String> {
    let values: Vec<f64> = list
        .split(',')
        .map(|v| {
            v.trim()
                .parse::<f64>()
                .map_err(|_| format!("`{}` in the block list is not a number", v.trim()))
        })
        .collect::<Result<_, _>>()?;
    let (ids, with_base) = match values.len() {
        25 => (block_ids(Arch::Sd1).unwrap(), false),
        26 => (block_ids(Arch::Sd1).unwrap(), true),
        19 => (block_ids(Arch::Sdxl).unwrap(), false),
        20 => (block_ids(Arch::Sdxl).unwrap(), true),
        n => {
            return Err(format!(
                "a block list has 25 or 26 values (SD1) or 19 or 20 (SDXL), got {n}"
            ))
        }
    };
    let ids = if with_base { ids } else { &ids[1..] };
    Ok(ids.iter().copied().zip(values).collect())
}
