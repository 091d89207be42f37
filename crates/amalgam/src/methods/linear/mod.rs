//! Weighted sums of the models and of their task vectors: one streamed pass, memory independent
//! of the number of models.

pub mod add;
pub mod add_difference;
// The `linear` method (mergekit's name) in the family of linear methods.
#[allow(clippy::module_inception)]
pub mod linear;
pub mod soup;
pub mod subtract;
pub mod task_arithmetic;
pub mod weighted_sum;
