//! The engine: input dtypes, determinism, key policy, output safety and bad inputs.

mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::method::ParamValue::{List, Number};
use amalgam::real::ComputeDtype;
use amalgam::report::{KeyAction, TakenBecause};
use amalgam::{merge, Graph, MergeOptions, NoProgress};
use common::*;
use std::path::{Path, PathBuf};

/// Deterministic pseudo-random values (a hash of the index), in [-0.05, 0.05).
fn values(seed: u32, n: usize) -> Vec<f32> {
    (0..n as u32)
        .map(|i| {
            let mut x = i.wrapping_mul(0x9E37_79B9) ^ seed.wrapping_mul(0x85EB_CA6B);
            x ^= x >> 15;
            x = x.wrapping_mul(0x2C1B_3C6D);
            x ^= x >> 12;
            (x as f32 / u32::MAX as f32 - 0.5) * 0.1
        })
        .collect()
}

/// Five models with several keys, some larger than many chunks, in f16 and bf16.
fn pool(dir: &Path) -> Vec<PathBuf> {
    (0..5)
        .map(|m| {
            let tensors = vec![
                f16t("big.weight", &[300, 1000], &values(m, 300_000)),
                bf16t("mid.weight", &[70_001], &values(100 + m, 70_001)),
                f16t("small.bias", &[7], &values(200 + m, 7)),
                f32t("z.scale", &[3, 3], &values(300 + m, 9)),
            ];
            write_file(&dir.join(format!("p{m}.safetensors")), &tensors, true)
        })
        .collect()
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[test]
fn output_bytes_do_not_depend_on_threads_chunks_or_budget() {
    let dir = tempfile::tempdir().unwrap();
    let paths = pool(dir.path());
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let graphs: Vec<(&str, Graph)> = vec![
        ("soup", one_node(&refs, "soup", vec![(0..5).collect()], &[])),
        (
            "task_arithmetic",
            one_node(
                &refs,
                "task_arithmetic",
                vec![vec![0], (1..5).collect()],
                &[
                    ("weights", List(vec![0.3, 1.7, -0.4, 1.1])),
                    ("lambda", Number(0.9)),
                ],
            ),
        ),
        (
            "linear",
            one_node(
                &refs,
                "linear",
                vec![(0..5).collect()],
                &[("weights", List(vec![0.1, 0.2, 0.3, 0.25, 0.15]))],
            ),
        ),
    ];
    for (name, g) in &graphs {
        for compute in [ComputeDtype::F32, ComputeDtype::F64] {
            let mut reference: Option<Vec<u8>> = None;
            let variants: [(usize, Option<usize>, u64); 5] = [
                (1, None, 2 << 30),
                (2, None, 2 << 30),
                (2, None, 1 << 20),
                (2, Some(16_384), 2 << 30),
                (1, Some(49_152), 2 << 30),
            ];
            for (i, (threads, chunk, budget)) in variants.into_iter().enumerate() {
                let out = dir
                    .path()
                    .join(format!("{name}-{compute:?}-{i}.safetensors"));
                let mut o = MergeOptions::new(&out);
                o.threads = threads;
                o.chunk_override = chunk;
                o.memory_budget = budget;
                o.compute_dtype = compute;
                let report =
                    merge(g, &o, &NoProgress).unwrap_or_else(|e| panic!("{name} {i}: {e}"));
                if chunk.is_none() && budget == 1 << 20 {
                    assert!(
                        report.chunk_elements < 300_000,
                        "budget must force several chunks"
                    );
                }
                let b = bytes(&out);
                match &reference {
                    None => reference = Some(b),
                    Some(r) => assert!(
                        *r == b,
                        "{name} {compute:?}: variant {i} (threads {threads}, chunk {chunk:?}, budget {budget}) differs"
                    ),
                }
            }
        }
    }
}

#[test]
fn merged_values_match_a_direct_computation_across_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let paths = pool(dir.path());
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let g = one_node(&refs, "soup", vec![(0..5).collect()], &[]);
    let out = dir.path().join("soup.safetensors");
    let mut o = MergeOptions::new(&out);
    o.output_dtype = OutputDtype::F32;
    o.chunk_override = Some(16_384);
    merge(&g, &o, &NoProgress).unwrap();
    for key in ["big.weight", "mid.weight", "small.bias", "z.scale"] {
        let inputs: Vec<Vec<f32>> = paths.iter().map(|p| read_f32(p, key)).collect();
        let want: Vec<f32> = (0..inputs[0].len())
            .map(|i| (inputs.iter().map(|v| v[i] as f64).sum::<f64>() / 5.0) as f32)
            .collect();
        assert_close(&read_f32(&out, key), &want, 1e-7);
    }
}

#[test]
fn every_input_dtype_is_read_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let v = [1.0f32, -2.5, 0.15625, 1024.0, -0.0, 3.0e-5];
    let p = write_file(
        &dir.path().join("dtypes.safetensors"),
        &[
            f16t("f16", &[6], &v),
            bf16t("bf16", &[6], &v),
            f32t("f32", &[6], &v),
            f64t("f64", &[6], &v.map(|x| x as f64)),
            // FP8 E4M3FN: 0x38 = 1, 0xC4 = -3, 0x7E = 448, 0x01 = 2^-9, 0x7F = NaN, 0x00 = 0.
            raw(
                "e4m3",
                "F8_E4M3",
                &[6],
                vec![0x38, 0xC4, 0x7E, 0x01, 0x7F, 0x00],
            ),
            // FP8 E5M2: 0x3C = 1, 0xC2 = -3, 0x7B = 57344, 0x01 = 2^-16, 0x7C = inf, 0x80 = -0.
            raw(
                "e5m2",
                "F8_E5M2",
                &[6],
                vec![0x3C, 0xC2, 0x7B, 0x01, 0x7C, 0x80],
            ),
        ],
        true,
    );
    let f16_want: Vec<f32> = v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect();
    let bf16_want: Vec<f32> = v
        .iter()
        .map(|x| half::bf16::from_f32(*x).to_f32())
        .collect();
    assert_eq!(read_f32(&p, "f16"), f16_want);
    assert_eq!(read_f32(&p, "bf16"), bf16_want);
    assert_eq!(read_f32(&p, "f32"), v);
    assert_eq!(read_f64(&p, "f64"), v.map(|x| x as f64));
    assert_eq!(
        read_f64(&p, "f16"),
        f16_want.iter().map(|&x| x as f64).collect::<Vec<_>>()
    );
    let e4 = read_f32(&p, "e4m3");
    assert_eq!(&e4[..4], &[1.0, -3.0, 448.0, 2f32.powi(-9)]);
    assert!(e4[4].is_nan());
    assert_eq!(e4[5], 0.0);
    let e5 = read_f32(&p, "e5m2");
    assert_eq!(&e5[..4], &[1.0, -3.0, 57344.0, 2f32.powi(-16)]);
    assert_eq!(e5[4], f32::INFINITY);
    assert!(e5[5] == 0.0 && e5[5].is_sign_negative());
}

#[test]
fn misaligned_data_offsets_are_read_correctly() {
    let dir = tempfile::tempdir().unwrap();
    let a: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
    let b: Vec<f32> = (0..1000).map(|i| i as f32 * -0.25).collect();
    // Unpadded header: its odd length leaves the data at an odd address in the mapping.
    let (header, data) = encode(&[f32t("a", &[1000], &a), f16t("b", &[1000], &b)]);
    let header = format!("{header} ");
    let header = if header.len() % 2 == 0 {
        format!("{header} ")
    } else {
        header
    };
    let p = write_raw(
        &dir.path().join("odd.safetensors"),
        header.as_bytes(),
        &data,
    );
    assert_eq!(read_f32(&p, "a"), a);
    assert_eq!(read_f32(&p, "b"), b);
    // And through a merge.
    let aligned = write_file(
        &dir.path().join("even.safetensors"),
        &[f32t("a", &[1000], &a), f16t("b", &[1000], &b)],
        true,
    );
    let g = one_node(&[&p, &aligned], "soup", vec![vec![0, 1]], &[]);
    let out = dir.path().join("out.safetensors");
    let mut o = MergeOptions::new(&out);
    o.output_dtype = OutputDtype::F32;
    merge(&g, &o, &NoProgress).unwrap();
    assert_eq!(read_f32(&out, "a"), a);
    assert_eq!(read_f32(&out, "b"), b);
}

#[test]
fn output_dtypes_are_written_as_asked() {
    let dir = tempfile::tempdir().unwrap();
    let v = [0.1f32, -7.3, 1.0e-3, 60000.0];
    let p = write_file(
        &dir.path().join("a.safetensors"),
        &[f32t("w", &[4], &v)],
        true,
    );
    for (dtype, name, want) in [
        (
            OutputDtype::F16,
            "F16",
            v.map(|x| half::f16::from_f32(x).to_f32()),
        ),
        (
            OutputDtype::BF16,
            "BF16",
            v.map(|x| half::bf16::from_f32(x).to_f32()),
        ),
        (OutputDtype::F32, "F32", v),
    ] {
        let g = one_node(&[&p], "soup", vec![vec![0]], &[]);
        let out = dir.path().join(format!("out-{name}.safetensors"));
        let mut o = MergeOptions::new(&out);
        o.output_dtype = dtype;
        merge(&g, &o, &NoProgress).unwrap();
        let m = amalgam::io::input::ModelFile::open(&out).unwrap();
        assert_eq!(format!("{:?}", m.tensor("w").unwrap().dtype), name);
        assert_eq!(read_f32(&out, "w"), want);
    }
}

#[test]
fn key_policy_missing_keys_fallback_and_non_float_keys() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ids: Vec<u8> = (0..4i64).flat_map(|v| v.to_le_bytes()).collect();
    let base = write_file(
        &d.join("base.safetensors"),
        &[
            f32t("unet.w", &[2], &[1.0, 1.0]),
            f32t("vae.w", &[2], &[10.0, 10.0]),
            raw("te.position_ids", "I64", &[1, 4], ids.clone()),
        ],
        true,
    );
    let a = write_file(
        &d.join("a.safetensors"),
        &[
            f32t("unet.w", &[2], &[3.0, 1.0]),
            f32t("vae.w", &[2], &[12.0, 10.0]),
            f32t("only_a.w", &[1], &[5.0]),
        ],
        true,
    );
    // b is pruned: no VAE.
    let b = write_file(
        &d.join("b.safetensors"),
        &[f32t("unet.w", &[2], &[1.0, 5.0])],
        true,
    );
    let g = one_node(
        &[&base, &a, &b],
        "task_arithmetic",
        vec![vec![0], vec![1, 2]],
        &[],
    );
    let out = d.join("out.safetensors");
    let mut o = MergeOptions::new(&out);
    o.output_dtype = OutputDtype::F32;
    let report = merge(&g, &o, &NoProgress).unwrap();

    assert_eq!(read_f32(&out, "unet.w"), [3.0, 5.0]); // 1 + (2,0) + (0,4)
    assert_eq!(read_f32(&out, "vae.w"), [12.0, 10.0]); // b left out
    assert_eq!(read_f32(&out, "only_a.w"), [5.0]); // base lacks it: taken from a
    let m = amalgam::io::input::ModelFile::open(&out).unwrap();
    let ids_out = m.tensor("te.position_ids").unwrap();
    assert_eq!(format!("{:?}", ids_out.dtype), "I64");
    let mut got = vec![0u8; 32];
    m.read_raw("te.position_ids", 0, &mut got).unwrap();
    assert_eq!(got, ids);

    let action = |k: &str| {
        report
            .actions
            .iter()
            .find(|(key, _)| key == k)
            .unwrap()
            .1
            .clone()
    };
    assert!(matches!(action("unet.w"), KeyAction::Merged));
    assert!(matches!(action("vae.w"), KeyAction::MergedPartly(_)));
    assert!(matches!(
        action("only_a.w"),
        KeyAction::Taken {
            model: 1,
            because: TakenBecause::Fallback(_)
        }
    ));
    assert!(matches!(
        action("te.position_ids"),
        KeyAction::CopiedUnchanged { model: 0 }
    ));
    assert_eq!(
        report.lacking[2],
        vec!["only_a.w", "te.position_ids", "vae.w"]
    );
    let text = report.to_string();
    assert!(
        text.contains("m2 (") && text.contains("lacks 3 keys"),
        "{text}"
    );
    assert!(
        text.contains("1 keys taken unchanged from m1 (fallback"),
        "{text}"
    );
    assert_eq!(m.tensors().len(), 4, "no key dropped");
}

#[test]
fn shape_mismatch_names_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_file(
        &dir.path().join("a.safetensors"),
        &[f32t("w", &[2, 2], &[0.0; 4])],
        true,
    );
    let b = write_file(
        &dir.path().join("b.safetensors"),
        &[f32t("w", &[4], &[0.0; 4])],
        true,
    );
    let out = dir.path().join("out.safetensors");
    let e = merge(
        &one_node(&[&a, &b], "soup", vec![vec![0, 1]], &[]),
        &MergeOptions::new(&out),
        &NoProgress,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("a.safetensors") && e.contains("b.safetensors"),
        "{e}"
    );
    assert!(
        e.contains("[2, 2]") && e.contains("[4]") && e.contains("`w`"),
        "{e}"
    );
    assert!(!out.exists());
    assert!(files_containing(dir.path(), "amalgam-partial").is_empty());
}

/// A file made of an 8-byte length, `header` and `data_len` zero bytes.
fn with_header(header: &[u8], data_len: usize) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header);
    b.extend(std::iter::repeat_n(0u8, data_len));
    b
}

/// Each corrupt file gives an error naming it, from opening and from a merge.
#[test]
fn corrupt_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = write_file(
        &d.join("good.safetensors"),
        &[f32t("w", &[4], &[1.0; 4])],
        true,
    );
    let full = std::fs::read(&good).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", full[..full.len() - 3].to_vec(), "truncated"),
        (
            "tiny",
            vec![1, 2, 3],
            "shorter than the 8-byte header length",
        ),
        (
            "header_past_eof",
            {
                let mut b = (1_000_000u64).to_le_bytes().to_vec();
                b.extend_from_slice(b"{}");
                b
            },
            "runs past the end of the file",
        ),
        (
            "overlapping",
            with_header(br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#, 12),
            "invalid offset",
        ),
        (
            "out_of_range",
            with_header(br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 4),
            "truncated",
        ),
        (
            "unknown_dtype",
            with_header(br#"{"a":{"dtype":"F7","shape":[2],"data_offsets":[0,8]}}"#, 8),
            "unknown dtype",
        ),
        (
            "bad_json",
            with_header(br#"{"a":{"dtype":"F32","#, 0),
            "invalid header",
        ),
        (
            "shape_vs_size",
            with_header(br#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, 8),
            "invalid header",
        ),
    ];
    for (name, content, expect) in cases {
        let p = d.join(format!("{name}.safetensors"));
        std::fs::write(&p, content).unwrap();
        let e = amalgam::io::input::ModelFile::open(&p)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("{name}.safetensors")), "{name}: {e}");
        assert!(e.contains(expect), "{name}: expected `{expect}` in: {e}");
        let out = d.join(format!("out-{name}.safetensors"));
        let g = one_node(&[&good, &p], "soup", vec![vec![0, 1]], &[]);
        let e = merge(&g, &MergeOptions::new(&out), &NoProgress)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("{name}.safetensors")), "{name}: {e}");
        assert!(!out.exists(), "{name}: no output after a failed merge");
    }
    assert!(files_containing(d, "amalgam-partial").is_empty());
}

#[test]
fn output_never_replaces_an_input_or_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_file(
        &dir.path().join("a.safetensors"),
        &[f32t("w", &[2], &[1.0, 2.0])],
        true,
    );
    let b = write_file(
        &dir.path().join("b.safetensors"),
        &[f32t("w", &[2], &[3.0, 4.0])],
        true,
    );
    let before = std::fs::read(&a).unwrap();
    let g = one_node(&[&a, &b], "soup", vec![vec![0, 1]], &[]);
    for overwrite in [false, true] {
        let mut o = MergeOptions::new(&a);
        o.overwrite = overwrite;
        let e = merge(&g, &o, &NoProgress).unwrap_err().to_string();
        assert!(e.contains("refusing to overwrite an input"), "{e}");
        // Also through another spelling of the same path.
        let mut o = MergeOptions::new(dir.path().join(".").join("a.safetensors"));
        o.overwrite = overwrite;
        assert!(merge(&g, &o, &NoProgress).is_err());
    }
    assert_eq!(std::fs::read(&a).unwrap(), before);

    let existing = dir.path().join("existing.safetensors");
    std::fs::write(&existing, b"keep me").unwrap();
    let e = merge(&g, &MergeOptions::new(&existing), &NoProgress)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");
    let mut o = MergeOptions::new(&existing);
    o.overwrite = true;
    merge(&g, &o, &NoProgress).unwrap();
    assert_eq!(read_f32(&existing, "w").len(), 2);
}

/// A failure after the output was started (here: another program creates the output file while
/// the merge runs) leaves neither a partial file nor a changed destination.
#[test]
fn failed_merge_leaves_no_partial_output() {
    struct Saboteur(PathBuf);
    impl amalgam::Progress for Saboteur {
        fn start(&self, _: u64, _: usize) {
            std::fs::write(&self.0, b"someone else's file").unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let paths = pool(dir.path());
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let out = dir.path().join("out.safetensors");
    let e = merge(
        &one_node(&refs, "soup", vec![(0..5).collect()], &[]),
        &MergeOptions::new(&out),
        &Saboteur(out.clone()),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("out.safetensors"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"someone else's file");
    assert!(files_containing(dir.path(), "amalgam-partial").is_empty());
}

#[test]
fn metadata_records_version_and_options_and_header_is_sorted() {
    let dir = tempfile::tempdir().unwrap();
    let paths = pool(dir.path());
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let out = dir.path().join("out.safetensors");
    let mut o = MergeOptions::new(&out);
    o.metadata
        .insert("amalgam_recipe".into(), "# recipe text".into());
    merge(
        &one_node(&refs, "soup", vec![(0..5).collect()], &[]),
        &o,
        &NoProgress,
    )
    .unwrap();
    let m = amalgam::io::input::ModelFile::open(&out).unwrap();
    assert_eq!(m.metadata()["amalgam_version"], amalgam::VERSION);
    assert_eq!(m.metadata()["amalgam_recipe"], "# recipe text");
    // Tensor data is laid out in name order.
    let mut by_offset: Vec<(&String, u64)> =
        m.tensors().iter().map(|(k, t)| (k, t.offset)).collect();
    by_offset.sort_by_key(|x| x.1);
    let names: Vec<&String> = by_offset.iter().map(|x| x.0).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    // The header is padded so that tensor data starts 8-byte aligned.
    assert_eq!(by_offset[0].1 % 8, 0);
}

#[test]
fn tiny_budget_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let paths = pool(dir.path());
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let out = dir.path().join("out.safetensors");
    let mut o = MergeOptions::new(&out);
    o.memory_budget = 1000;
    let e = merge(
        &one_node(&refs, "soup", vec![(0..5).collect()], &[]),
        &o,
        &NoProgress,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("too small"), "{e}");
    assert!(!out.exists());
}
