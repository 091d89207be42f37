//! The merge methods, one file each in a folder per family, and the registry that names them.
//!
//! - [`linear`]: weighted sums of models and task vectors;
//! - [`delta`]: task-vector filtering (the TIES pipeline and its presets, DELLA, dropout);
//! - [`svd`]: methods on the singular values of each matrix (ISO-C, ISO-Z);
//! - [`gram`]: combinations through the models' Gram matrix (geometric median, Karcher, model
//!   stock, SLERP);
//! - [`frequency`]: methods on a tensor's Fourier spectrum (sd-optim's multi-domain alignment);
//! - [`mecha`]: sd-mecha's element-wise and per-tensor methods under their sd-mecha names
//!   (geometric sum, masks, clamp, perpendicular components, cosine merges);
//! - [`mergekit`]: mergekit's methods outside the TIES pipeline (passthrough, nearswap, RAM, SCE,
//!   NuSLERP, Multi-SLERP, Arcee Fusion).
//! - [`supermerger`]: supermerger's merge and calculation modes (triple sum, sum twice,
//!   trainDifference, smoothAdd, extract, tensor, self, plus random, cosineA/B).
//!
//! Adding a method: write `methods/FAMILY/NAME.rs` with an `INFO` and a type implementing
//! [`Method`] (for a formula applied element by element, `Pointwise`: the declaration, the
//! parameters read and the formula over a chunk), then list it in `registry!` below. The engine
//! is not touched.

use crate::error::{Error, Result};
use crate::method::{Method, MethodInfo, Origin, Params, PointwiseMethod};
use crate::real::Real;

pub mod delta;
pub mod frequency;
pub mod gram;
pub mod linear;
pub mod mecha;
pub mod mergekit;
pub mod rebasin;
pub mod structural;
pub mod supermerger;
pub mod svd;

use delta::{dropout, ties};
use gram::{geometric_median, karcher, model_stock, slerp};
use linear::{add, add_difference, soup, subtract, task_arithmetic, weighted_sum};

macro_rules! registry {
    ($($info:path => $ctor:path),* $(,)?) => {
        /// Every method amalgam implements, in documentation order.
        pub static ALL: &[&MethodInfo] = &[$(&$info),*];

        /// Builds method `name` from its parameters; `counts[i]` is the number of arguments given
        /// to slot `i` of the method's [`MethodInfo::slots`].
        pub fn build<T: Real>(name: &str, params: Params, counts: &[usize]) -> Result<Box<dyn Method<T>>> {
            let name = canonical_name(name)?;
            if let Some(whole) = WHOLE_MODEL.iter().find(|s| s.name == name) {
                return Err(Error::method(
                    whole.name,
                    "it needs the whole model: the engine prepares it before merging",
                ));
            }
            if let Some(stage) = STAGES.iter().find(|s| s.name == name) {
                return Err(Error::method(
                    stage.name,
                    "it writes a LoRA file, not a model's keys: it can only be a recipe's output \
                     node, not an argument of another node",
                ));
            }
            $(
                if name == $info.name {
                    return Ok(Box::new($ctor(params.bind(&$info, counts))?));
                }
            )*
            unreachable!("canonical_name returned an unregistered method")
        }
    };
}

registry!(
    weighted_sum::INFO => PointwiseMethod::<weighted_sum::WeightedSum>::new,
    soup::INFO => soup::Soup::new,
    linear::linear::INFO => linear::linear::Linear::new,
    add_difference::INFO => PointwiseMethod::<add_difference::AddDifference>::new,
    add::INFO => PointwiseMethod::<add::Add>::new,
    subtract::INFO => PointwiseMethod::<subtract::Subtract>::new,
    task_arithmetic::INFO => task_arithmetic::TaskArithmetic::new,
    ties::TIES => ties::Pipeline::new,
    ties::TIES_SOUP => ties::Pipeline::new,
    ties::DARE => ties::Pipeline::new,
    ties::DELLA => ties::Pipeline::new,
    ties::TSD => ties::Pipeline::new,
    ties::TGMD => ties::Pipeline::new,
    ties::DGMLA => ties::Pipeline::new,
    ties::TIES_SUM_EXTENDED => ties::Pipeline::new,
    ties::DARE_TIES => ties::Pipeline::new,
    ties::DARE_LINEAR => ties::Pipeline::new,
    ties::DELLA_LINEAR => ties::Pipeline::new,
    ties::BREADCRUMBS => ties::Pipeline::new,
    ties::BREADCRUMBS_TIES => ties::Pipeline::new,
    dropout::INFO => dropout::Dropout::new,
    geometric_median::INFO => geometric_median::GeometricMedian::new,
    model_stock::INFO => model_stock::ModelStock::new,
    model_stock::N_MODEL_STOCK => model_stock::ModelStock::new,
    karcher::INFO => karcher::Karcher::new,
    slerp::INFO => slerp::Slerp::new,
    svd::iso_c::INFO => svd::iso_c::IsoC::new,
    svd::iso_cts::INFO => svd::iso_cts::IsoCts::new,
    svd::iso_z::INFO => svd::iso_z::IsoZ::new,
    svd::truncate_rank::INFO => svd::truncate_rank::TruncateRank::new,
    svd::truncate_kronecker::INFO => svd::truncate_kronecker::TruncateKronecker::new,
    svd::rotate::INFO => svd::rotate::Rotate::new,
    svd::clyb_merge::INFO => svd::clyb_merge::ClybMerge::new,
    svd::dgmiz::DGMIZ => svd::dgmiz::Dgmiz::new,
    svd::dgmiz::DGMIA => svd::dgmiz::Dgmiz::new,
    mecha::powers::GEOMETRIC_SUM => PointwiseMethod::<mecha::powers::GeometricSum>::new,
    mecha::powers::MULTIPLY_QUOTIENT => PointwiseMethod::<mecha::powers::MultiplyQuotient>::new,
    mecha::masks::TRAIN_DIFFERENCE_MASK => PointwiseMethod::<mecha::masks::TrainDifferenceMask>::new,
    mecha::masks::ADD_OPPOSITE_MASK => PointwiseMethod::<mecha::masks::AddOppositeMask>::new,
    mecha::masks::ADD_STRICT_OPPOSITE_MASK => PointwiseMethod::<mecha::masks::AddStrictOppositeMask>::new,
    mecha::clamp::INFO => PointwiseMethod::<mecha::clamp::Clamp>::new,
    mecha::perpendicular::PERPENDICULAR_COMPONENT => mecha::perpendicular::Perpendicular::component,
    mecha::perpendicular::ADD_PERPENDICULAR => mecha::perpendicular::Perpendicular::add,
    mecha::cosine::ADD_COSINE_A => mecha::cosine::AddCosine::<false>::new,
    mecha::cosine::ADD_COSINE_B => mecha::cosine::AddCosine::<true>::new,
    frequency::multi_domain_alignment::INFO => frequency::multi_domain_alignment::MultiDomainAlignment::new,
    frequency::multi_domain_alignment::CONSERVATIVE => frequency::multi_domain_alignment::MultiDomainAlignment::new,
    frequency::multi_domain_alignment::DETAIL => frequency::multi_domain_alignment::MultiDomainAlignment::new,
    frequency::multi_domain_alignment::SMOOTH => frequency::multi_domain_alignment::MultiDomainAlignment::new,
    mergekit::passthrough::INFO => PointwiseMethod::<mergekit::passthrough::Passthrough>::new,
    mergekit::nearswap::INFO => PointwiseMethod::<mergekit::nearswap::Nearswap>::new,
    mergekit::ram::RAM => mergekit::ram::Ram::new,
    mergekit::ram::RAMPLUS_TL => mergekit::ram::Ram::plus,
    mergekit::sce::INFO => mergekit::sce::Sce::new,
    mergekit::nuslerp::INFO => mergekit::nuslerp::Nuslerp::new,
    mergekit::multislerp::INFO => mergekit::multislerp::Multislerp::new,
    mergekit::arcee_fusion::INFO => mergekit::arcee_fusion::ArceeFusion::new,
    mecha::slicing::TENSOR_SUM => mecha::slicing::Slicing::new,
    mecha::slicing::TOP_K_TENSOR_SUM => mecha::slicing::Slicing::new,
    mecha::slicing::COPY_REGION => mecha::slicing::Slicing::new,
    mecha::crossover::INFO => mecha::crossover::Crossover::new,
    mecha::logistics::FALLBACK => mecha::logistics::Fallback::new,
    supermerger::sums::TRIPLE_SUM => PointwiseMethod::<supermerger::sums::TripleSum>::new,
    supermerger::sums::SUM_TWICE => PointwiseMethod::<supermerger::sums::SumTwice>::new,
    supermerger::train_difference::INFO => PointwiseMethod::<supermerger::train_difference::TrainDifference>::new,
    supermerger::smooth_add::INFO => supermerger::smooth_add::SmoothAdd::new,
    supermerger::extract::INFO => supermerger::extract::Extract::new,
    supermerger::tensor::TENSOR_SWAP => supermerger::tensor::TensorSwap::<false>::new,
    supermerger::tensor::TENSOR_SWAP_DIM1 => supermerger::tensor::TensorSwap::<true>::new,
    supermerger::scale::SCALE => supermerger::scale::Scale::<false>::new,
    supermerger::scale::ADD_NOISE => supermerger::scale::Scale::<true>::new,
    supermerger::cosine::COSINE_A => supermerger::cosine::Cosine::<false>::new,
    supermerger::cosine::COSINE_B => supermerger::cosine::Cosine::<true>::new,
);

/// Output stages: nodes declared like methods (inputs, parameters, docs) whose output is a file
/// of another kind than a checkpoint. One may only be a recipe's output node; the engine
/// materialises its inputs, then runs it (see `engine::stages`).
pub static STAGES: &[&MethodInfo] = &[&crate::lora::extract::INFO];

/// Whole-model methods: each key of their output depends on other keys of their inputs (re-basin's
/// permutations), so the engine prepares them from whole models before the streamed pass (see
/// `engine::prepare`).
pub static WHOLE_MODEL: &[&MethodInfo] = &[
    &rebasin::REBASIN,
    &rebasin::RANDPERM,
    &rebasin::MERGE_MANY,
    &rebasin::REBASIN_MERGE,
    &rebasin::BASIN_SUM,
    &structural::exchange_ema::INFO,
    &structural::balance_attention::INFO,
];

/// What the engine prepared for a whole-model node from whole models (see `engine::prepare`).
pub(crate) enum PreparedNode {
    /// Re-basin's permutations: one set per permuted input, or one per step of the driver's walk.
    Permutations(Vec<std::sync::Arc<crate::rebasin::Permutations>>),
    /// `balance_attention`'s input file and its attention layers.
    Balance(std::sync::Arc<structural::balance_attention::Balancer>),
}

impl PreparedNode {
    /// The bytes the node's method reads itself, beside its arguments (so far).
    pub(crate) fn bytes_read(&self) -> u64 {
        match self {
            PreparedNode::Permutations(_) => 0,
            PreparedNode::Balance(b) => b.bytes_read(),
        }
    }
}

/// The method of whole-model node `node`, from what was prepared for it.
pub(crate) fn prepared<T: Real>(
    node: &crate::recipe::graph::Node,
    prepared: &PreparedNode,
) -> Result<Box<dyn Method<T>>> {
    match prepared {
        PreparedNode::Permutations(perms) => {
            rebasin::prepared::<T>(node.method, &node.params, &node.counts(), perms.clone())
        }
        PreparedNode::Balance(b) => Ok(Box::new(structural::balance_attention::BalanceAttention(
            b.clone(),
        ))),
    }
}

/// Whether `name` (a registered name) is a whole-model method.
pub fn is_whole_model(name: &str) -> bool {
    WHOLE_MODEL.iter().any(|s| s.name == name)
}

/// Checks parameters given to method or output stage `name` (building the method once, with
/// `counts[i]` arguments in slot `i`), so that recipes report them before any tensor is read.
pub fn check(name: &str, params: Params, counts: &[usize]) -> Result<()> {
    let name = canonical_name(name)?;
    if name == crate::lora::extract::INFO.name {
        return crate::lora::extract::rank_params(params).map(drop);
    }
    if let Some(info) = WHOLE_MODEL.iter().find(|s| s.name == name) {
        let mut params = params.bind(info, counts);
        params.read_declared()?;
        return params.finish();
    }
    build::<f32>(name, params, counts).map(drop)
}

/// Whether `name` (a registered name) is an output stage.
pub fn is_stage(name: &str) -> bool {
    STAGES.iter().any(|s| s.name == name)
}

/// The methods whose output depends on the run's seed (random masks, randomized SVDs): with their default
/// parameters. Other methods use the seed only where a parameter asks for a random drop (e.g.
/// `ties` with `drop = "dare"`). A test checks this list against the methods' outputs.
pub const SEEDED: &[&str] = &[
    "dare",
    "della",
    "tsd",
    "tgmd",
    "dgmla",
    "dropout",
    "truncate_kronecker",
    "clyb_merge",
    "dgmiz",
    "dgmia",
    "add_noise",
];

/// sd-mecha methods that are not nodes here, each with why: `(name, reason)`. A recipe naming
/// one gets the reason, not an unknown-method error.
pub const REFUSED: &[(&str, &str)] = &[
    (
        "stack",
        "sd-mecha's `stack` makes one tensor with an extra dimension out of several, which only \
         sd-mecha's own methods read; amalgam's nodes take several models directly (a list slot \
         such as `models`), so give the models to the method instead",
    ),
    (
        "pick_component",
        "a node's value is every key its inputs give; routing one component (unet, clip_l, ...) \
         from another model is the recipe's `[output.components]` table here (in a `.mecha` \
         recipe, `fallback(pick_component(m, c), merge)` is read as that routing)",
    ),
];

/// Other names users know the methods by, and where: `(alias, method, origin)`, spelled as
/// there (supermerger's UI names: `Triple sum`, `cosineA`, ...). Names and aliases match
/// whatever their case, with `-` or a space for `_`.
pub const ALIASES: &[(&str, &str, Origin)] = &[
    ("n_average", "soup", Origin::SdMecha),
    ("uniform_soup", "soup", Origin::Paper),
    ("average", "soup", Origin::Community),
    ("weighted_linear", "linear", Origin::Community),
    ("sum", "linear", Origin::Community),
    ("fermat_point", "geometric_median", Origin::SdMecha),
    ("karcher_mean", "karcher", Origin::Community),
    ("magprune", "della", Origin::Paper),
    ("Weight sum", "weighted_sum", Origin::Supermerger),
    ("Triple sum", "triple_sum", Origin::Supermerger),
    ("sum Twice", "sum_twice", Origin::Supermerger),
    ("trainDifference", "train_difference", Origin::Supermerger),
    ("smoothAdd", "smooth_add", Origin::Supermerger),
    ("smoothAdd MT", "smooth_add", Origin::Supermerger),
    ("extract", "extract_features", Origin::Supermerger),
    ("tensor", "tensor_swap", Origin::Supermerger),
    ("tensor2", "tensor_swap_dim1", Origin::Supermerger),
    ("self", "scale", Origin::Supermerger),
    ("plus random", "add_noise", Origin::Supermerger),
    ("cosineA", "cosine_a", Origin::Supermerger),
    ("cosineB", "cosine_b", Origin::Supermerger),
];

/// The aliases of method `name`, with where each is used.
pub fn aliases_of(name: &str) -> impl Iterator<Item = (&'static str, Origin)> + '_ {
    ALIASES
        .iter()
        .filter(move |(_, to, _)| *to == name)
        .map(|(from, _, origin)| (*from, *origin))
}

/// The index of `docs/methods.md`: one row per method (output stages and whole-model methods
/// included) with its sources and aliases, in registration order. A test checks the document
/// holds it verbatim; `amalgam methods --markdown` prints it.
pub fn markdown_index() -> String {
    let mut s = String::from("| method | source | aliases |\n|---|---|---|\n");
    for info in all_infos() {
        let origins: Vec<&str> = info.origins.iter().map(|o| o.name()).collect();
        let aliases: Vec<String> = aliases_of(info.name)
            .map(|(a, o)| format!("`{a}` ({})", o.name()))
            .collect();
        s += &format!(
            "| **`{0}`** | {1} | {2} |\n",
            info.name,
            origins.join(", "),
            aliases.join(", ")
        );
    }
    s
}

/// The states of one key for every point of a node (a sweep of its parameters; one state per
/// point, all of one method) joined for their joint evaluation: the TIES pipeline shares its
/// deltas, rank histograms, draws and trim selections between its points; every other method
/// computes its points one after the other on the arguments evaluated once.
pub fn merge_points<T: crate::real::Real>(
    states: Vec<Box<dyn crate::method::KeyMerge<T>>>,
) -> Result<Box<dyn crate::method::KeyMergePoints<T>>> {
    Ok(match delta::ties::merge_points(states) {
        Ok(points) => points,
        Err(states) => Box::new(crate::method::Separately(states)),
    })
}

/// Every method, output stage and whole-model method, in registration order.
pub fn all_infos() -> impl Iterator<Item = &'static MethodInfo> {
    ALL.iter().chain(WHOLE_MODEL).chain(STAGES).copied()
}

/// `name` lowercased, with `-` and spaces as `_` (how names and aliases are compared).
fn normalized(name: &str) -> String {
    name.replace(['-', ' '], "_").to_ascii_lowercase()
}

/// The registered name for `name` (an exact name or an alias), or an error listing the methods.
pub fn canonical_name(name: &str) -> Result<&'static str> {
    let norm = normalized(name);
    if let Some(info) = ALL
        .iter()
        .chain(STAGES)
        .chain(WHOLE_MODEL)
        .find(|i| i.name == norm)
    {
        return Ok(info.name);
    }
    if let Some((_, to, _)) = ALIASES.iter().find(|(from, _, _)| normalized(from) == norm) {
        return Ok(to);
    }
    if let Some((name, why)) = REFUSED.iter().find(|(n, _)| *n == norm) {
        return Err(Error::method(name, format!("not a node in amalgam: {why}")));
    }
    Err(Error::Invalid(format!(
        "unknown method `{name}`; amalgam implements: {}",
        ALL.iter()
            .chain(WHOLE_MODEL)
            .chain(STAGES)
            .map(|i| i.name)
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// The description of method `name` (or alias).
pub fn info(name: &str) -> Result<&'static MethodInfo> {
    let name = canonical_name(name)?;
    Ok(ALL
        .iter()
        .chain(STAGES)
        .chain(WHOLE_MODEL)
        .find(|i| i.name == name)
        .expect("registered"))
}

/// A preset: a method declared as another one with other defaults (the TIES family's `ties_soup`,
/// `dare`, ... are `ties` with other stages).
pub struct Preset {
    /// The method it is a preset of (the first registered of its family).
    pub of: &'static MethodInfo,
    /// The parameters whose defaults differ: (name, this preset's default).
    pub overrides: Vec<(&'static str, Option<String>)>,
}

/// `info` as a preset of an earlier registered method with the same formula, inputs and
/// parameters, or `None` when it is a method of its own.
pub fn preset_of(info: &MethodInfo) -> Option<Preset> {
    let same = |a: &MethodInfo| {
        a.formula == info.formula
            && a.slots.len() == info.slots.len()
            && a.slots
                .iter()
                .zip(info.slots)
                .all(|(x, y)| x.name == y.name)
            && a.params.len() == info.params.len()
            && a.params
                .iter()
                .zip(info.params)
                .all(|(x, y)| x.name == y.name)
    };
    let of = ALL
        .iter()
        .take_while(|a| a.name != info.name)
        .find(|a| same(a))?;
    let overrides = of
        .params
        .iter()
        .zip(info.params)
        .filter(|(a, b)| a.kind != b.kind)
        .map(|(_, b)| (b.name, b.default_text()))
        .collect();
    Some(Preset { of, overrides })
}
