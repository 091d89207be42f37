//! Task-vector filtering: the TIES pipeline (drop, trim, elect, fuse, rescale) with its presets,
//! DELLA's magnitude-ranked drop, and plain random dropout.

pub mod della;
pub mod dropout;
pub mod ties;
