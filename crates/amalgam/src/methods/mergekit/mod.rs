//! mergekit 0.1.5's methods that are not the TIES pipeline (its generalized task arithmetic
//! family is `methods::delta::ties`' presets), under mergekit's names (issue #18). Each follows
//! mergekit's formula, epsilons and tie rules, and is checked against mergekit's own functions
//! (`tests/mergekit_methods.rs`, fixtures made by `tools/mergekit_methods_fixtures.py`).
//!
//! - [`passthrough`]: the single input, optionally scaled;
//! - [`nearswap`]: the base, swapped to the model where they are within `t`;
//! - [`ram`]: `ram` and `ramplus_tl` (Reinforced Agent Merging: unique deltas kept, shared ones
//!   averaged; `ramplus_tl` counts them per tensor in one `Sums` pass);
//! - [`sce`]: Select, Calculate, Erase (FuseChat);
//! - [`nuslerp`]: SLERP of two models or task vectors, by weights, per tensor, row or column;
//! - [`multislerp`]: the weighted spherical mean of N models or task vectors;
//! - [`arcee_fusion`]: the model's deltas whose importance is an upper outlier (each key whole).

pub mod arcee_fusion;
pub mod multislerp;
pub mod nearswap;
pub mod nuslerp;
pub mod passthrough;
pub mod ram;
pub mod sce;
