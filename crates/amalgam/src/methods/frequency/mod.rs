//! Methods that work on a tensor's Fourier spectrum (each tensor whole): sd-optim's
//! multi-domain alignment and its wiki presets.

pub mod multi_domain_alignment;
