//! Methods that combine the models through their Gram matrix (accumulated in f64 in a streamed
//! pass): geometric median, Karcher mean, model stock and SLERP.

pub mod geometric_median;
pub mod karcher;
pub mod model_stock;
pub mod slerp;
