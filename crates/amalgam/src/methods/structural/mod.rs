//! sd-mecha's structural methods: each writes a key from other keys of its input, so the engine
//! prepares its node before the streamed pass (see `engine::prepare`).
//!
//! - [`exchange_ema`]: an SD1 checkpoint's weights and their EMA copies exchanged (a renaming
//!   of the input's keys, nothing computed);
//! - [`balance_attention`]: an SDXL checkpoint's attention heads balanced, q against k and v
//!   against o ([`attention`]: the layers and the per-head maps).

pub(crate) mod attention;
pub mod balance_attention;
pub mod exchange_ema;
