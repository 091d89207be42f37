//! kohya LoRA (and LoCon) module names: which original-layout (ldm/sgm) key a module of a LoRA
//! file changes (for baking), and which module names a model's keys get (for extraction).

use crate::layout::arch::Layout;
use crate::layout::formats::{canonical, to_canonical, Source};
use std::collections::BTreeMap;

/// The kohya LoRA module name of a key of the kohya checkpoint layout (`unet.a.b.weight` →
/// `lora_unet_a_b`, `te.`, `te1.`, `te2.` → `lora_te_`, `lora_te1_`, `lora_te2_`); `None` for keys
/// that are not weights of those parts.
fn module_name(kohya_key: &str) -> Option<String> {
    let module = kohya_key.strip_suffix(".weight")?;
    [
        ("unet.", "lora_unet_"),
        ("te.", "lora_te_"),
        ("te1.", "lora_te1_"),
        ("te2.", "lora_te2_"),
    ]
    .iter()
    .find_map(|(p, l)| {
        module
            .strip_prefix(p)
            .map(|r| format!("{l}{}", r.replace('.', "_")))
    })
}

/// The kohya layout whose module names a model of the original layout `layout` gets (SD1 ldm,
/// SDXL sgm), or `None`.
pub fn kohya_of(layout: Layout) -> Option<Layout> {
    [Layout::Sd1Kohya, Layout::SdxlKohya]
        .into_iter()
        .find(|&k| canonical(k) == Some(layout))
}

/// For each key of the original layout `layout` that LoRA modules can change, their names:
/// one module for most keys, several for a fused key (CLIP-G's `in_proj_weight` is the row
/// blocks of the `q_proj`, `k_proj` and `v_proj` modules, in that order). Keys without a module
/// (biases, norms, embeddings, transposed projections) are not listed.
pub fn module_names(layout: Layout) -> BTreeMap<String, Vec<String>> {
    let Some(kohya) = kohya_of(layout) else {
        return BTreeMap::new();
    };
    let names: Vec<&str> = kohya.keys().iter().map(|k| k.key.as_str()).collect();
    to_canonical(kohya, &names)
        .into_iter()
        .filter_map(|(c, s)| {
            let modules: Option<Vec<String>> = match &s {
                Source::Rename(k) => module_name(k).map(|m| vec![m]),
                Source::Concat(ks) => ks.iter().map(|k| module_name(k)).collect(),
                Source::Transpose(_) => None,
            };
            Some((c, modules?))
        })
        .collect()
}

/// One module of a kohya LoRA (or LoCon) file and the original-layout key it changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoraModule {
    /// The key of the original layout (ldm/sgm) the module's delta applies to.
    pub target: String,
    /// `<module>.lora_up.weight`, `[out, rank]` (or `[out, rank, 1, 1]`).
    pub up: String,
    /// `<module>.lora_down.weight`, `[rank, in]` (or `[rank, in, kh, kw]`).
    pub down: String,
    /// `<module>.alpha`, a scalar; without it the scale is 1.
    pub alpha: Option<String>,
    /// Which row block of the target the module changes, of how many (`(0, 1)` for a whole key;
    /// CLIP-G's q, k and v are blocks 0, 1 and 2 of its fused `in_proj_weight`).
    pub part: (usize, usize),
}

/// Whether the keys are those of a kohya LoRA file.
pub fn is_lora(keys: &[&str]) -> bool {
    keys.iter().any(|k| k.ends_with(".lora_up.weight"))
}

/// The modules of a kohya LoRA file mapped to original-layout keys (and row blocks of fused
/// keys), trying the SD1 and SDXL module names (`lora_unet_...`, `lora_te_...`, `lora_te1_...`,
/// `lora_te2_...`); returns the layout that names the most modules, its modules, and the module
/// names it does not know.
pub fn lora_modules(keys: &[&str]) -> (Option<Layout>, Vec<LoraModule>, Vec<String>) {
    let modules: Vec<&str> = keys
        .iter()
        .filter_map(|k| k.strip_suffix(".lora_up.weight"))
        .collect();
    let present: std::collections::HashSet<&str> = keys.iter().copied().collect();
    let mut best: (Option<Layout>, Vec<LoraModule>, Vec<String>) = (
        None,
        Vec::new(),
        modules.iter().map(|m| m.to_string()).collect(),
    );
    for kohya in [Layout::Sd1Kohya, Layout::SdxlKohya] {
        // LoRA module → (original key, row block), from the names of extraction.
        let mut table = std::collections::HashMap::new();
        if let Some(original) = canonical(kohya) {
            for (c, modules) in module_names(original) {
                let parts = modules.len();
                for (i, m) in modules.into_iter().enumerate() {
                    table.insert(m, (c.clone(), (i, parts)));
                }
            }
        }
        let mut found = Vec::new();
        let mut unknown = Vec::new();
        for m in &modules {
            match table.get(*m) {
                Some((target, part)) => {
                    let alpha = format!("{m}.alpha");
                    found.push(LoraModule {
                        target: target.clone(),
                        part: *part,
                        up: format!("{m}.lora_up.weight"),
                        down: format!("{m}.lora_down.weight"),
                        alpha: present.contains(alpha.as_str()).then_some(alpha),
                    })
                }
                None => unknown.push(m.to_string()),
            }
        }
        if found.len() > best.1.len() {
            best = (canonical(kohya), found, unknown);
        }
    }
    best
}
