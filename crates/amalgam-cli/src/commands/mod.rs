//! One module per command: its arguments and what it does, over the library.

pub mod compare;
pub mod extract_lora;
pub mod inspect;
pub mod knots;
pub mod merge;
pub mod methods;
pub mod rebasin;
pub mod recipe;
pub mod repair;
pub mod synth;
