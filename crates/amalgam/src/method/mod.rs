//! The interface between the engine and merge methods.
//!
//! A method never does I/O. For each key the engine asks the method for a [`KeyMerge`], hands it the
//! chunks of its arguments (already read and converted to the compute type) and gets back output
//! chunks. Methods that need per-tensor statistics first (norms, dot products, thresholds, Gram
//! matrices) run statistic passes ([`Pass`], in [`KeyMerge::run_passes`]): typed values whose
//! per-block statistics the engine folds in block order, so the statistics do not depend on the
//! chunk size or the thread count. Methods that need rows or whole tensors together (per-row
//! ranks, SVD) declare a [`KeyMerge::unit`].

mod params;
mod pass;
mod points;
mod pointwise;

pub use params::*;
pub(crate) use pass::ErasedPass;
pub use pass::{accumulate, Pass, Passes, Sums};
pub use points::{joint_unit, lcm, AsAny, KeyMergePoints, Separately};
pub(crate) use pointwise::{keep_first, Pointwise, PointwiseMethod};

use crate::error::Result;
use crate::real::Real;
use std::ops::Range;

/// How many arguments of one slot a method takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotKind {
    /// Exactly one argument.
    One,
    /// One or more arguments (a list; a model group expands into it).
    Many,
}

/// A named argument slot, e.g. `base` (one model) or `models` (a list).
#[derive(Clone, Copy, Debug)]
pub struct Slot {
    /// The slot's name (as recipes and `.mecha` files call the input).
    pub name: &'static str,
    /// One model, or a list of them.
    pub kind: SlotKind,
    /// What the input is for.
    pub doc: &'static str,
}

impl Slot {
    /// The inputs of the methods that merge N fine-tunes' deltas from their base.
    pub const BASE_AND_MODELS: &'static [Slot] = &[
        Slot {
            name: "base",
            kind: SlotKind::One,
            doc: "the pre-trained model",
        },
        Slot {
            name: "models",
            kind: SlotKind::Many,
            doc: "the fine-tuned models",
        },
    ];
}

/// What a method is: its name, formula, argument slots and parameters. Used to parse recipes, to
/// print `amalgam methods` and to check the README.
#[derive(Clone, Copy, Debug)]
pub struct MethodInfo {
    /// The name recipes and the command line use.
    pub name: &'static str,
    /// Where users know it from; the first is the implementation whose variant is the default.
    pub origins: &'static [Origin],
    /// The formula, in the notation of `docs/methods.md`.
    pub formula: &'static str,
    /// One line on what it does and where it comes from.
    pub summary: &'static str,
    /// Its inputs.
    pub slots: &'static [Slot],
    /// Its parameters, each declared once (type, default, domain, doc).
    pub params: &'static [ParamInfo],
}

/// Where a method comes from: the implementation (or paper) its math and defaults follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A paper's formula and its official code.
    Paper,
    /// sd-mecha 1.1.8.
    SdMecha,
    /// mergekit 0.1.5.
    Mergekit,
    /// supermerger, A1111's merger extension.
    Supermerger,
    /// sd-optim's merge-method wiki and code.
    SdOptim,
    /// Published community recipes and tools (AstolfoKarmix, 6DammK9's sd-mecha fork, kohya).
    Community,
}

impl Origin {
    /// The name `amalgam methods` and `docs/methods.md` show.
    pub fn name(self) -> &'static str {
        match self {
            Origin::Paper => "paper",
            Origin::SdMecha => "sd-mecha",
            Origin::Mergekit => "mergekit",
            Origin::Supermerger => "supermerger",
            Origin::SdOptim => "sd-optim",
            Origin::Community => "community",
        }
    }
}

/// What a node does for a key some of its arguments lack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OnMissing {
    /// Merge the arguments that have the key (N-way methods leave absent models out).
    MergePresent,
    /// Pass this argument (an index into the flattened arguments) through unchanged.
    PassThrough(usize),
    /// The node has no value for this key; the output policy decides (see the key policy).
    Absent,
}

impl OnMissing {
    /// The policy of methods that need every argument: a key one of them lacks has no value here.
    pub fn all_or_absent(present: &[bool]) -> OnMissing {
        if present.iter().all(|&p| p) {
            OnMissing::MergePresent
        } else {
            OnMissing::Absent
        }
    }

    /// The policy of methods that transform their first argument (the others only guide them):
    /// without it the node has no value; with it, it passes through where another is missing.
    pub fn first_or_absent(present: &[bool]) -> OnMissing {
        if present[0] {
            OnMissing::PassThrough(0)
        } else {
            OnMissing::Absent
        }
    }

    /// The policy of methods whose first argument is a base and whose others are N models: a key
    /// the base lacks has no value here; models lacking it are left out; with none left, the
    /// base passes through.
    pub fn base_and_models(present: &[bool]) -> OnMissing {
        if !present[0] {
            OnMissing::Absent
        } else if present[1..].iter().any(|&p| p) {
            OnMissing::MergePresent
        } else {
            OnMissing::PassThrough(0)
        }
    }
}

/// Per-key facts given to a method.
#[derive(Clone, Debug)]
pub struct KeyCtx<'a> {
    /// The key being merged.
    pub key: &'a str,
    /// Its shape.
    pub shape: &'a [usize],
    /// Indices (into the node's flattened arguments) of the arguments present for this key, in
    /// order; the chunks passed to [`KeyMerge`] follow this order.
    pub present: &'a [usize],
    /// The node's flattened argument count.
    pub n_args: usize,
    /// The run's seed, for methods with random masks.
    pub seed: u64,
}

impl KeyCtx<'_> {
    /// The number of elements of the key.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A merge method, constructed from its parameters, generic over the compute type.
pub trait Method<T: Real>: Send + Sync {
    /// The method's declaration.
    fn info(&self) -> &'static MethodInfo;

    /// What to do for a key when the arguments marked `false` lack it (at least one is `true`).
    fn on_missing(&self, present: &[bool]) -> OnMissing;

    /// Starts merging one key. `ctx.present` lists the arguments that will be supplied.
    ///
    /// The engine plans every key before reading any tensor, so the state of every key exists at
    /// once: keep it small here and allocate statistics buffers when the passes run.
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>>;

    /// Lines for the log about this node's run as configured (e.g. an effective probability
    /// range), printed once.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Elements a method computes together (see [`KeyMerge::unit`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unit {
    /// Consecutive elements that must be in the same chunk and the same statistic block (a row
    /// for per-row methods, the element count for whole-tensor methods); it divides the element
    /// count.
    pub len: usize,
    /// The working memory the method needs for one unit of every argument, in bytes. The engine
    /// refuses a key whose unit needs more than a quarter of the memory budget, naming the key
    /// and the budget it needs, whatever the thread count (a method never picks a computation
    /// by the budget, so the output bytes do not depend on it).
    pub bytes: u64,
    /// What the unit is, for that error (e.g. `DELLA's exact ranks of a row`).
    pub what: &'static str,
}

impl Unit {
    /// Element by element: no unit.
    pub const ELEMENT: Unit = Unit {
        len: 1,
        bytes: 0,
        what: "an element",
    };
}

/// The merge of one key.
pub trait KeyMerge<T: Real>: AsAny + Send + Sync {
    /// The number of statistic passes [`KeyMerge::run_passes`] runs (known when the key is
    /// planned: the engine reads a key's inputs once for all of them when they fit the budget).
    fn stat_passes(&self) -> usize {
        0
    }
    /// Runs the statistic passes, each with [`Passes::run`], before the first
    /// [`KeyMerge::merge_chunk`].
    fn run_passes(&mut self, _passes: &mut Passes<T>) -> Result<()> {
        Ok(())
    }
    /// The elements computed together: chunks and statistic blocks start at multiples of
    /// `unit().len` and span whole units.
    fn unit(&self) -> Unit {
        Unit::ELEMENT
    }
    /// Lines for the log about this key (e.g. an approximation used), asked after the
    /// statistic passes.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
    /// Computes `out` for elements `range` of the flattened tensor from the arguments' chunks
    /// (in `KeyCtx::present` order, each `range.len()` long).
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]);
}
