//! Methods on the singular values of a key's matrix (spec §12-§13): ISO-C flattens the spectrum
//! of the summed task vectors, ISO-CTS flattens it over a common subspace joined with
//! task-specific ones, ISO-Z shrinks the spectrum of a delta towards its mean, `truncate_rank`
//! keeps its top singular triplets, `truncate_kronecker` its nearest Kronecker product, `rotate` aligns one model to another by an orthogonal
//! rotation, `clyb_merge` projects one model's detail onto another's column space. They need
//! the whole matrix of a key at once: a statistic pass accumulates it (one tensor in f64,
//! whatever the number of models), the factors are computed from it, and the output pass writes
//! from them.

pub mod clyb_merge;
pub mod dgmiz;
pub mod iso_c;
pub mod iso_cts;
pub mod iso_z;
pub mod rotate;
pub(crate) mod shared;
pub(crate) mod spectrum;
pub(crate) mod stiefel;
pub mod truncate_kronecker;
pub mod truncate_rank;
