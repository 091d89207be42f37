//! Key layouts: the known model architectures (SD1, SDXL, SD3, FLUX in their tools' namings),
//! detection, components and block ids ([`arch`]), and reading kohya and diffusers key names as
//! the ldm/sgm layout ([`formats`]), and kohya LoRA module names ([`lora`]).

pub mod arch;
pub mod formats;
pub mod lora;
pub mod perms;
