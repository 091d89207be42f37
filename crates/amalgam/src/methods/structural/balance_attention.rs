//! `balance_attention(a)` (sd-mecha, SDXL): every attention layer's q and k (and v and o)
//! rescaled against each other head by head, the function unchanged (see [`attention`] for the
//! maps). A key's output depends on the other keys of its layer, so the engine prepares the node
//! (`engine::prepare`: a node input is merged once to a temporary file) and each key reads its
//! layer's keys from that file to find the layer's maps; a layer's maps are found once, by the
//! first of its keys merged, and dropped after the last.

use super::attention::{self, Balance, EpsAt, Layer, LayerMaps, Role, Settings};
use crate::error::{Error, Result};
use crate::io::input::ModelFile;
use crate::method::*;
use crate::methods::svd::shared::{computed_or, Source, WholeMatrix};
use crate::real::Real;
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

/// `balance_attention`'s declaration.
pub static INFO: MethodInfo = MethodInfo {
    name: "balance_attention",
    origins: &[Origin::SdMecha],
    formula:
        "per attention head: S = A^-1/2 (A^1/2 B A^1/2)^1/2 A^-1/2, A = q q^T + eps I, B = k k^T \
              + eps I (bias as a column); q <- S q, k <- S^-1 k; the same for v and o^T",
    summary: "sd-mecha's balance_attention: each attention head's q and k (and v and o) rescaled \
              against each other so that every logit, and so the model's function, is unchanged. \
              SDXL (sgm) checkpoints: CLIP-L, CLIP-G and UNet attention; the VAE's attention and \
              the output biases are kept, as in sd-mecha. A node input is merged once to a \
              temporary file.",
    slots: &[Slot {
        name: "a",
        kind: SlotKind::One,
        doc: "the SDXL checkpoint balanced",
    }],
    params: &[
        ParamInfo::choice(
            "balance",
            &["swap", "equalize"],
            "swap",
            "swap: S with S A S = B, which exchanges q's and k's Gram matrices (sd-mecha 1.1.8's \
             result) | equalize: S^1/2, which makes them equal (what the name intends)",
        ),
        ParamInfo::number_in(
            "eps",
            1e-6,
            Domain::Positive,
            "added to the Gram matrices, and the least eigenvalue kept (sd-mecha's \
             balance_head_energy)",
        ),
        ParamInfo::choice(
            "eps_at",
            &["sd_mecha", "diagonal"],
            "sd_mecha",
            "sd_mecha: where sd-mecha 1.1.8 adds eps (its batched diagonal() puts it on row h of \
             head h's Gram matrices, heads 0-63) | diagonal: on every Gram matrix's diagonal",
        ),
    ],
};

/// A layer's maps, found once by the first of its keys merged (or the error found).
type Found = Arc<OnceLock<std::result::Result<Arc<LayerMaps>, String>>>;

/// A prepared `balance_attention` node: its input file, the layers of its keys, and the maps
/// of the layers being merged.
pub struct Balancer {
    file: ModelFile,
    layers: Vec<Layer>,
    /// Per attention key: its layer (index in `layers`) and role.
    of_key: BTreeMap<String, (usize, Role)>,
    settings: Settings,
    /// Per layer being merged: its maps (found once) and how many of its keys still need them.
    cache: Mutex<BTreeMap<usize, (Found, usize)>>,
}

impl Balancer {
    /// The node's preparation: its parameters and the attention layers of `file` (its input).
    pub fn new(file: ModelFile, params: Params) -> Result<Self> {
        let mut params = params.bind(&INFO, &[1]);
        let balance = match params.choice("balance")? {
            "equalize" => Balance::Equalize,
            _ => Balance::Swap,
        };
        let eps = params.number("eps")?;
        let eps_at = match params.choice("eps_at")? {
            "diagonal" => EpsAt::Diagonal,
            _ => EpsAt::SdMecha,
        };
        params.finish()?;
        use crate::layout::arch::{Arch, Layout};
        let at = file.path().display();
        match file.detected_layout() {
            Some(l) if l.arch() != Arch::Sdxl => {
                return Err(Error::Invalid(format!(
                    "{at}: balance_attention is sd-mecha's SDXL method (heads of 64 rows); this \
                     checkpoint is {l}"
                )))
            }
            Some(l) if l != Layout::SdxlSgm => {
                return Err(Error::Invalid(format!(
                    "{at}: balance_attention reads SDXL's sgm key names, and this file is {l}; \
                     write it as sgm first (`amalgam merge --method soup FILE -o OUT` reads \
                     other key formats as sgm)"
                )))
            }
            _ => {}
        }
        let layers = attention::layers(file.tensors().keys().map(String::as_str));
        if layers.is_empty() {
            return Err(Error::Invalid(format!(
                "{at}: no attention layer under SDXL's sgm key names (CLIP-L \
                 `conditioner.embedders.0.*.self_attn.*`, CLIP-G `conditioner.embedders.1.*.attn.*`, \
                 UNet `model.diffusion_model.*.attn1/attn2.*`): nothing to balance"
            )));
        }
        let of_key = layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| l.keys.iter().map(move |(k, r)| (k.clone(), (i, *r))))
            .collect();
        Ok(Balancer {
            file,
            layers,
            of_key,
            settings: Settings {
                balance,
                eps,
                eps_at,
            },
            cache: Mutex::new(BTreeMap::new()),
        })
    }

    /// The bytes read from the input file to find the layers' maps.
    pub fn bytes_read(&self) -> u64 {
        self.file.bytes_read()
    }

    /// The number of attention layers found.
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// The maps of layer `i`, found now if no other key of the layer has; a key calls this once.
    fn maps(&self, i: usize) -> Result<Arc<LayerMaps>> {
        let cell = {
            let mut cache = self.cache.lock().unwrap();
            let entry = cache
                .entry(i)
                .or_insert_with(|| (Arc::new(OnceLock::new()), self.layers[i].keys.len()));
            entry.1 -= 1;
            let cell = entry.0.clone();
            if entry.1 == 0 {
                cache.remove(&i);
            }
            cell
        };
        let read = |key: &str| -> Result<(Vec<f64>, Vec<usize>)> {
            let shape = self
                .file
                .tensor(key)
                .map(|t| t.shape.clone())
                .unwrap_or_default();
            Ok((self.file.read_tensor::<f64>(key)?, shape))
        };
        cell.get_or_init(|| {
            attention::layer_maps(&self.layers[i], &read, self.settings)
                .map(Arc::new)
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(Error::Invalid)
    }
}

/// The method of a prepared node.
pub(crate) struct BalanceAttention(pub(crate) Arc<Balancer>);

impl<T: Real> Method<T> for BalanceAttention {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        OnMissing::first_or_absent(present)
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        Ok(Box::new(BalanceKey {
            balancer: self.0.clone(),
            layer: self.0.of_key.get(ctx.key).copied(),
            shape: ctx.shape.to_vec(),
            out: Vec::new(),
        }))
    }
    fn notes(&self) -> Vec<String> {
        vec![format!(
            "{} attention layers balanced ({})",
            self.0.layers.len(),
            match self.0.settings.balance {
                Balance::Swap => "swap",
                Balance::Equalize => "equalize",
            }
        )]
    }
}

struct BalanceKey {
    balancer: Arc<Balancer>,
    /// For an attention key: its layer and role.
    layer: Option<(usize, Role)>,
    shape: Vec<usize>,
    /// After the passes: the balanced key.
    out: Vec<f64>,
}

impl<T: Real> KeyMerge<T> for BalanceKey {
    fn stat_passes(&self) -> usize {
        usize::from(self.layer.is_some())
    }
    fn unit(&self) -> Unit {
        match self.layer {
            Some(_) => Unit {
                len: 1,
                bytes: 16 * self.shape.iter().product::<usize>() as u64,
                what: "an attention key, whole",
            },
            None => Unit::ELEMENT,
        }
    }
    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()> {
        let Some((layer, role)) = self.layer else {
            return Ok(());
        };
        let maps = self.balancer.maps(layer)?;
        let mut data = passes.run(WholeMatrix::new(Source::Arg(0)))?.sum;
        attention::apply(&maps, role, &self.shape, &mut data);
        self.out = data;
        Ok(())
    }
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        let computed = self.layer.map(|_| &self.out[range]);
        computed_or(computed, args[0], out)
    }
}
