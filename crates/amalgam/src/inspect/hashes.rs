//! The hashes model sites and UIs look checkpoints up by, all from one read of the file.
//!
//! Definitions (as AUTOMATIC1111's webui, kohya's sd-scripts and Civitai compute them):
//!
//! - **SHA-256**: of the whole file (webui `modules/hashes.py` `calculate_sha256`).
//! - **AutoV2**: the first 10 hex digits of that SHA-256 (webui's checkpoint `shorthash`, the
//!   "Model hash" written into image infotexts since webui 1.0; Civitai's "AutoV2").
//! - **AutoV3**: the SHA-256 of the bytes after the header: the 8-byte little-endian header
//!   length `n` and the `n` bytes of JSON are skipped, the rest (the tensor data) hashed (kohya's
//!   `addnet_hash_safetensors`, which webui uses for `.safetensors` LoRAs with
//!   `use_addnet_hash`); its short form is the first 12 hex digits (webui's LoRA `shorthash`,
//!   Civitai's "AutoV3"). Editing only the metadata does not change it (as long as the tensor
//!   data bytes stay the same).
//! - **Legacy** ("AutoV1", webui's old `model_hash` in `sd_models.py`): the first 8 hex digits of
//!   the SHA-256 of the 0x10000 (64 KiB) bytes at offset 0x100000 (1 MiB), or of the bytes there
//!   are when the file ends before 0x110000. A file of 0x100000 bytes or fewer has no such bytes
//!   (webui would hash nothing and print `e3b0c442`, the hash of the empty string, for every such
//!   file): it has no legacy hash here.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// Where the legacy hash's bytes start.
pub const LEGACY_OFFSET: u64 = 0x10_0000;
/// How many bytes the legacy hash covers.
pub const LEGACY_LEN: u64 = 0x1_0000;

/// A file's hashes (see the [module](self) for their definitions).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Hashes {
    /// The SHA-256 of the whole file, 64 hex digits.
    pub sha256: String,
    /// The first 10 hex digits of `sha256`.
    pub autov2: String,
    /// The SHA-256 of the bytes after the 8-byte length and the JSON header, 64 hex digits.
    pub autov3_sha256: String,
    /// The first 12 hex digits of `autov3_sha256`.
    pub autov3: String,
    /// The first 8 hex digits of the SHA-256 of the 64 KiB at 1 MiB; `None` when the file has no
    /// bytes past 1 MiB.
    pub legacy: Option<String>,
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Computes every hash of the safetensors file at `path` in one sequential read.
pub fn hash_file(path: &Path) -> Result<Hashes> {
    let io = |e| Error::io(path, e);
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut whole = Sha256::new();
    let mut data = Sha256::new();
    let mut len_bytes = [0u8; 8];
    f.read_exact(&mut len_bytes).map_err(|e| {
        Error::bad_file(
            path,
            format!("reading the 8-byte header length: {e} (not safetensors?)"),
        )
    })?;
    whole.update(len_bytes);
    let data_start = 8u64.saturating_add(u64::from_le_bytes(len_bytes));
    let legacy_end = LEGACY_OFFSET + LEGACY_LEN;
    let mut legacy = Sha256::new();
    let mut legacy_bytes = 0u64;
    let mut pos = 8u64;
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(e)),
        };
        let chunk = &buf[..n];
        let end = pos + n as u64;
        whole.update(chunk);
        // The part of this chunk at or after `from` and before `to` (file positions).
        let part = |from: u64, to: u64| -> &[u8] {
            let a = from.clamp(pos, end) - pos;
            let b = to.clamp(pos, end) - pos;
            &chunk[a as usize..b.max(a) as usize]
        };
        data.update(part(data_start, u64::MAX));
        let l = part(LEGACY_OFFSET, legacy_end);
        legacy.update(l);
        legacy_bytes += l.len() as u64;
        pos = end;
    }
    if pos < data_start {
        return Err(Error::bad_file(
            path,
            format!("header length runs past the end of the file ({pos} bytes)"),
        ));
    }
    let sha256 = hex(&whole.finalize());
    let autov3_sha256 = hex(&data.finalize());
    Ok(Hashes {
        autov2: sha256[..10].to_string(),
        autov3: autov3_sha256[..12].to_string(),
        legacy: (legacy_bytes > 0).then(|| hex(&legacy.finalize())[..8].to_string()),
        sha256,
        autov3_sha256,
    })
}
