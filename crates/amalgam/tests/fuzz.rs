//! Bounded fuzzing on stable Rust: mutated safetensors files, TOML recipes and `.mecha` texts give
//! a clean error or a parse, never a panic or a hang.
mod common;
use amalgam::io::input::ModelFile;
use common::*;
use proptest::prelude::*;

/// A valid two-tensor file's bytes.
fn valid_file() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = write_file(
        &dir.path().join("v.safetensors"),
        &[
            f32t("a.weight", &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
            f16t("b", &[4], &[0.5, -1.0, 2.0, 0.0]),
        ],
        true,
    );
    std::fs::read(p).unwrap()
}

/// Opens `bytes` as a model and, if it opens, reads every tensor: any outcome but a panic is fine.
fn open_and_read(bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.safetensors");
    std::fs::write(&p, bytes).unwrap();
    if let Ok(m) = ModelFile::open(&p) {
        for (name, t) in m.tensors() {
            if t.float_dtype().is_some() && t.numel() < 1 << 20 {
                let mut v = vec![0f32; t.numel()];
                let _ = m.read_chunk(name, 0, &mut v, &mut Vec::new());
            }
        }
    }
}

const RECIPE: &str = "[models]\nbase = \"base.safetensors\"\npool = \"m*.safetensors\"\n\
[nodes.t]\nmethod = \"ties\"\nbase = \"base\"\nmodels = [\"pool\"]\nk = 0.2\nlambda = 1.0\n\
[nodes.w]\nmethod = \"weighted_sum\"\na = \"t\"\nb = \"base\"\nalpha = { default = 0.5, IN00 = 0.1 }\n\
[output]\nnode = \"w\"\nfallback = \"base\"\ndtype = \"f16\"\nseed = 3\n";

const MECHA: &str = include_str!("fixtures/mecha/tgmd.mecha");

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_header_bytes(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut bytes = valid_file();
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        for (i, b) in edits {
            let at = 8 + i.index(header_end - 8);
            bytes[at] = b;
        }
        open_and_read(&bytes);
    }

    #[test]
    fn mutated_header_length_and_truncation(len in any::<u64>(), cut in any::<prop::sample::Index>(), small in 0u64..512) {
        let mut bytes = valid_file();
        let n = bytes.len();
        let mut b2 = bytes.clone();
        b2.truncate(cut.index(n));
        open_and_read(&b2);
        bytes[..8].copy_from_slice(&(if len % 2 == 0 { small } else { len }).to_le_bytes());
        open_and_read(&bytes);
    }

    #[test]
    fn mutated_header_json_tokens(pos in any::<prop::sample::Index>(), insert in "[\\[\\]{}\",:0-9a-zA-Z_ .-]{0,12}", del in 0usize..8) {
        // Text-level edits keep the file's length field in step with the header.
        let bytes = valid_file();
        let hl = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut header = String::from_utf8(bytes[8..8 + hl].to_vec()).unwrap();
        let at = pos.index(header.len() + 1);
        let end = (at + del).min(header.len());
        header.replace_range(at..end, &insert);
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&bytes[8 + hl..]);
        open_and_read(&out);
    }

    #[test]
    fn mutated_toml_recipes(pos in any::<prop::sample::Index>(), insert in "[\\[\\]{}\"=,.\\n a-z0-9_*-]{0,16}", del in 0usize..12) {
        let mut text = RECIPE.to_string();
        let at = pos.index(text.len() + 1);
        let end = (at + del).min(text.len());
        text.replace_range(at..end, &insert);
        let dir = tempfile::tempdir().unwrap();
        let _ = amalgam::recipe::parse(&text, "fuzz.toml", dir.path());
    }

    #[test]
    fn mutated_mecha_texts(pos in any::<prop::sample::Index>(), insert in "[&\"=.\\n a-z0-9_#-]{0,16}", del in 0usize..12) {
        let mut text = MECHA.to_string();
        let at = pos.index(text.len() + 1);
        let end = (at + del).min(text.len());
        text.replace_range(at..end, &insert);
        let _ = amalgam::recipe::mecha::parse(&text, "fuzz.mecha");
        // Through translation too (models that do not exist are an error, not a panic).
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fuzz.mecha");
        std::fs::write(&p, &text).unwrap();
        let _ = amalgam::recipe::mecha::load(&p, &[]);
    }
}
