//! LoRA / LoCon baking: a kohya LoRA file is read as the delta it encodes, and `add` bakes it.

mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::io::input::ModelFile;
use amalgam::layout::arch::Layout;
use amalgam::method::ParamValue;
use amalgam::{merge, Graph, MergeOptions, NoProgress};
use common::*;
use std::collections::BTreeMap;

/// A deterministic pseudo-random value.
fn v(i: usize, salt: usize) -> f32 {
    ((((i + 1) * 2_654_435_761 + salt * 97) % 1000) as f32 / 1000.0 - 0.5) * 0.1
}

#[test]
fn a_baked_lora_changes_exactly_its_targets_by_s_up_down_alpha_over_rank() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ckpt = f32_pool(d, Layout::Sd1Ldm, 0, 32).remove(0);
    let m = ModelFile::open(&ckpt).unwrap();
    let shape = |k: &str| m.tensors()[k].shape.clone();
    // (LoRA module, target key, rank, alpha): a linear attention layer, a 3×3 convolution
    // (LoCon), a 1×1 convolution (proj_in, linear in the LoRA) and a text-encoder layer.
    let targets = [
        (
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
            4,
            Some(2.0f32),
        ),
        (
            "lora_unet_down_blocks_0_resnets_0_conv1",
            "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
            2,
            Some(1.0),
        ),
        (
            "lora_unet_mid_block_attentions_0_proj_in",
            "model.diffusion_model.middle_block.1.proj_in.weight",
            3,
            None,
        ),
        (
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
            "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
            8,
            Some(4.0),
        ),
    ];
    let mut lora = Vec::new();
    let mut expected: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let strength = 0.6;
    for (t, (module, key, rank, alpha)) in targets.iter().enumerate() {
        let s = shape(key);
        let out = s[0];
        let inner: usize = s[1..].iter().product();
        let up: Vec<f32> = (0..out * rank).map(|i| v(i, 2 * t)).collect();
        let down: Vec<f32> = (0..rank * inner).map(|i| v(i, 2 * t + 1)).collect();
        let mut down_shape = vec![*rank];
        // LoCon keeps the kernel; linear LoRAs on 1×1 convolutions are 2-D.
        down_shape.extend(
            s[1..]
                .iter()
                .copied()
                .filter(|&x| s.len() == 4 && s[2] > 1 || x != 1),
        );
        let up_shape = if s.len() == 4 && s[2] > 1 {
            vec![out, *rank, 1, 1]
        } else {
            vec![out, *rank]
        };
        lora.push(f32t(&format!("{module}.lora_up.weight"), &up_shape, &up));
        lora.push(f32t(
            &format!("{module}.lora_down.weight"),
            &down_shape,
            &down,
        ));
        if let Some(a) = alpha {
            lora.push(f32t(&format!("{module}.alpha"), &[], &[*a]));
        }
        let scale = alpha.map_or(1.0, |a| a as f64 / *rank as f64);
        let w = read_f32(&ckpt, key);
        let mut want = vec![0f64; out * inner];
        for o in 0..out {
            for c in 0..inner {
                let delta: f64 = (0..*rank)
                    .map(|r| up[o * rank + r] as f64 * down[r * inner + c] as f64)
                    .sum();
                want[o * inner + c] = w[o * inner + c] as f64 + strength * scale * delta;
            }
        }
        expected.insert(key, want);
    }
    // A module of no SD1 key is left out, and said so.
    lora.push(f32t(
        "lora_unet_not_a_layer.lora_up.weight",
        &[4, 1],
        &[1.0; 4],
    ));
    lora.push(f32t(
        "lora_unet_not_a_layer.lora_down.weight",
        &[1, 4],
        &[1.0; 4],
    ));
    let lora_path = write_file(&d.join("style.safetensors"), &lora, true);

    let mut params = BTreeMap::new();
    params.insert("alpha".to_string(), ParamValue::Number(strength));
    let g = Graph::single("add", None, vec![ckpt.clone(), lora_path], params).unwrap();
    let out = d.join("baked.safetensors");
    let mut o = MergeOptions::new(&out);
    o.output_dtype = OutputDtype::F32;
    o.compute_dtype = amalgam::real::ComputeDtype::F64;
    let report = merge(&g, &o, &NoProgress).unwrap();
    let notes = report.notes.join("\n");
    assert!(notes.contains("a LoRA for sd1-ldm: 4 modules"), "{notes}");
    assert!(
        notes.contains("1 LoRA modules left out") && notes.contains("lora_unet_not_a_layer"),
        "{notes}"
    );

    let baked = ModelFile::open(&out).unwrap();
    for (key, e) in baked.tensors() {
        if e.float_dtype().is_none() {
            continue;
        }
        let got = read_f32(&out, key);
        match expected.get(key.as_str()) {
            Some(want) => {
                for (i, (g, w)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (*g as f64 - w).abs() <= 1e-6 * w.abs().max(1e-3),
                        "{key}[{i}]: {g} vs {w}"
                    );
                }
                assert_ne!(got, read_f32(&ckpt, key), "{key} changed");
            }
            None => assert_eq!(got, read_f32(&ckpt, key), "{key} untouched"),
        }
    }
    // The shapes are the checkpoint's (1×1 convolutions stay 4-D).
    assert_eq!(
        baked.tensors()["model.diffusion_model.middle_block.1.proj_in.weight"].shape,
        shape("model.diffusion_model.middle_block.1.proj_in.weight")
    );
}

#[test]
fn sdxl_lora_modules_map_to_unet_clip_l_and_clip_g_keys() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ckpt = f32_pool(d, Layout::SdxlSgm, 0, 64).remove(0);
    let m = ModelFile::open(&ckpt).unwrap();
    // kohya's SDXL module names: the UNet in original names, TE1 (CLIP-L) and TE2 (CLIP-G) in HF
    // names; the CLIP-G out_proj is a whole OpenCLIP key.
    let targets = [
        (
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
            "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
        ),
        (
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        ),
        (
            "lora_te2_text_model_encoder_layers_0_self_attn_out_proj",
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.out_proj.weight",
        ),
        (
            "lora_te2_text_model_encoder_layers_0_mlp_fc1",
            "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight",
        ),
    ];
    let rank = 2;
    let mut lora = Vec::new();
    let mut expected = BTreeMap::new();
    for (t, (module, key)) in targets.iter().enumerate() {
        let s = m.tensors()[*key].shape.clone();
        let (out, inner) = (s[0], s[1..].iter().product::<usize>());
        let up: Vec<f32> = (0..out * rank).map(|i| v(i, 2 * t)).collect();
        let down: Vec<f32> = (0..rank * inner).map(|i| v(i, 2 * t + 1)).collect();
        lora.push(f32t(&format!("{module}.lora_up.weight"), &[out, rank], &up));
        lora.push(f32t(
            &format!("{module}.lora_down.weight"),
            &[rank, inner],
            &down,
        ));
        let w = read_f32(&ckpt, key);
        let want: Vec<f64> = (0..out * inner)
            .map(|e| {
                let (o, c) = (e / inner, e % inner);
                let delta: f64 = (0..rank)
                    .map(|r| up[o * rank + r] as f64 * down[r * inner + c] as f64)
                    .sum();
                w[e] as f64 + delta
            })
            .collect();
        expected.insert(*key, want);
    }
    // A CLIP-G q/k/v module is part of a fused key: left out, and said so.
    lora.push(f32t(
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
        &[4, 1],
        &[1.0; 4],
    ));
    lora.push(f32t(
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        &[1, 4],
        &[1.0; 4],
    ));
    let lora_path = write_file(&d.join("xl.safetensors"), &lora, true);
    let g = Graph::single("add", None, vec![ckpt.clone(), lora_path], BTreeMap::new()).unwrap();
    let out = d.join("baked.safetensors");
    let mut o = MergeOptions::new(&out);
    o.output_dtype = OutputDtype::F32;
    o.compute_dtype = amalgam::real::ComputeDtype::F64;
    let report = merge(&g, &o, &NoProgress).unwrap();
    let notes = report.notes.join("\n");
    assert!(notes.contains("a LoRA for sdxl-sgm: 4 modules"), "{notes}");
    assert!(notes.contains("self_attn_q_proj"), "{notes}");
    for (key, want) in &expected {
        let got = read_f32(&out, key);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (*g as f64 - w).abs() <= 1e-6 * w.abs().max(1e-3),
                "{key}[{i}]: {g} vs {w}"
            );
        }
    }
    // A key no module targets is untouched.
    let other = "model.diffusion_model.out.2.weight";
    assert_eq!(read_f32(&out, other), read_f32(&ckpt, other));
}
