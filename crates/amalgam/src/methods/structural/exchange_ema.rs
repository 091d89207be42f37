//! `exchange_ema(model)` (sd-mecha, sd1-ldm): the model with each weight and its EMA copy
//! exchanged. An sd1-ldm checkpoint may keep, beside each UNet key `model.X`, the exponential
//! moving average of that weight under `model_ema.` + X with its dots removed
//! (`model.diffusion_model.out.2.bias` → `model_ema.diffusion_modelout2bias`).
//!
//! Nothing is computed: the engine reads the input under exchanged names (see
//! `engine::prepare`), so a model input costs no more than reading it; a node input is merged
//! once to a temporary file first.

use crate::error::{Error, Result};
use crate::method::*;
use std::collections::BTreeMap;

/// `exchange_ema`'s declaration.
pub static INFO: MethodInfo = MethodInfo {
    name: "exchange_ema",
    origins: &[Origin::SdMecha],
    formula: "out[model.X] = model[model_ema.X'] and out[model_ema.X'] = model[model.X], X' = X \
              without its dots; every other key as it is",
    summary: "sd-mecha's exchange_ema: an SD1 (ldm) checkpoint with its UNet weights and their \
              EMA copies (model_ema.*) exchanged, so a merge reads the EMA weights as the model. \
              A key without an EMA copy is kept. No computation: the model is read under the \
              exchanged names (a node input is merged once to a temporary file first).",
    slots: &[Slot {
        name: "model",
        kind: SlotKind::One,
        doc: "the checkpoint whose weights and EMA copies are exchanged",
    }],
    params: &[],
};

/// The EMA copy's key of `key` in an sd1-ldm checkpoint: `model.X` → `model_ema.` + X without its
/// dots (`None` for a key outside `model.`).
pub fn ema_key(key: &str) -> Option<String> {
    key.strip_prefix("model.")
        .map(|rest| format!("model_ema.{}", rest.replace('.', "")))
}

/// The new name of each key that has a partner among `keys` (name → shape): a weight and its EMA
/// copy swap names. Keys without a partner keep theirs (absent from the map). A weight whose copy
/// has another shape is an error naming both keys.
pub fn exchanged_names<'a>(
    keys: impl IntoIterator<Item = (&'a str, &'a [usize])>,
) -> Result<BTreeMap<String, String>> {
    let shapes: BTreeMap<&str, &[usize]> = keys.into_iter().collect();
    let mut names = BTreeMap::new();
    for (&key, &shape) in &shapes {
        let Some(ema) = ema_key(key) else { continue };
        let Some(&ema_shape) = shapes.get(ema.as_str()) else {
            continue;
        };
        if ema_shape != shape {
            return Err(Error::Invalid(format!(
                "`{key}` is {shape:?} but its EMA copy `{ema}` is {ema_shape:?}: they cannot be \
                 exchanged"
            )));
        }
        names.insert(key.to_string(), ema.clone());
        names.insert(ema, key.to_string());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_keys_drop_the_dots_after_model() {
        assert_eq!(
            ema_key("model.diffusion_model.input_blocks.0.0.weight").as_deref(),
            Some("model_ema.diffusion_modelinput_blocks00weight")
        );
        assert_eq!(ema_key("model_ema.decay"), None);
        assert_eq!(ema_key("cond_stage_model.transformer.x"), None);
    }

    #[test]
    fn a_weight_and_its_copy_swap_names_and_the_rest_stay() {
        let s: &[usize] = &[2, 3];
        let keys = [
            ("model.diffusion_model.out.2.bias", s),
            ("model_ema.diffusion_modelout2bias", s),
            ("model.diffusion_model.time_embed.0.weight", s),
            ("model_ema.decay", &[][..]),
        ];
        let names = exchanged_names(keys).unwrap();
        assert_eq!(names.len(), 2);
        assert_eq!(
            names["model.diffusion_model.out.2.bias"],
            "model_ema.diffusion_modelout2bias"
        );
        assert_eq!(
            names["model_ema.diffusion_modelout2bias"],
            "model.diffusion_model.out.2.bias"
        );
        let bad = [
            ("model.a.b", &[2usize][..]),
            ("model_ema.ab", &[3usize][..]),
        ];
        let e = exchanged_names(bad).unwrap_err().to_string();
        assert!(
            e.contains("`model.a.b`") && e.contains("`model_ema.ab`"),
            "{e}"
        );
    }
}
