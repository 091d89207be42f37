//! Synthetic checkpoints: real layouts, shrinking, pruning, determinism.

use amalgam::io::input::ModelFile;
use amalgam::synth::{synthesize, Layout, SynthOptions};

#[test]
fn layouts_have_the_real_keys() {
    let sd1 = Layout::Sd1Ldm.keys();
    let sdxl = Layout::SdxlSgm.keys();
    let find = |keys: &[amalgam::synth::LayoutKey], k: &str| {
        keys.iter()
            .find(|x| x.key == k)
            .unwrap_or_else(|| panic!("{k}"))
            .clone()
    };
    let emb = find(sdxl, "conditioner.embedders.1.model.token_embedding.weight");
    assert_eq!(
        (emb.component.as_str(), emb.shape.clone()),
        ("clip_g", vec![49408, 1280])
    );
    let conv = find(sd1, "model.diffusion_model.input_blocks.0.0.weight");
    assert_eq!(conv.shape, vec![320, 4, 3, 3]);
    assert!(sd1.iter().any(|k| k.component == "vae"));
    assert!(
        find(
            sd1,
            "cond_stage_model.transformer.text_model.embeddings.position_ids"
        )
        .optional
    );
}

#[test]
fn synth_is_shrunk_pruned_and_identical_whatever_the_threads() {
    let mut outputs = Vec::new();
    for threads in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let mut o = SynthOptions::new(Layout::Sd1Ldm, 2);
        o.shrink = 8;
        o.prune_vae = 1;
        o.int_keys = true;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let paths = pool.install(|| synthesize(dir.path(), &o)).unwrap();
        assert_eq!(paths.len(), 3);
        let base = ModelFile::open(&paths[0]).unwrap();
        let pruned = ModelFile::open(&paths[1]).unwrap();
        let full = ModelFile::open(&paths[2]).unwrap();
        let vae = |m: &ModelFile| {
            m.tensors()
                .keys()
                .filter(|k| k.starts_with("first_stage_model."))
                .count()
        };
        assert!(vae(&base) > 200);
        assert_eq!(vae(&pruned), 0);
        assert_eq!(vae(&full), vae(&base));
        // Every dimension above 16 divided by 8, to at least 16.
        let conv = base
            .tensor("model.diffusion_model.input_blocks.0.0.weight")
            .unwrap();
        assert_eq!(conv.shape, vec![40, 4, 3, 3]);
        let emb = base
            .tensor("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")
            .unwrap();
        assert_eq!(emb.shape, vec![6176, 96]);
        let ids = base
            .tensor("cond_stage_model.transformer.text_model.embeddings.position_ids")
            .unwrap();
        assert_eq!(format!("{:?}", ids.dtype), "I64");
        // Fine-tunes differ from the base by small deltas.
        let key = "model.diffusion_model.out.2.weight";
        let mut b = vec![0f32; base.tensor(key).unwrap().numel()];
        let mut f = b.clone();
        base.read_chunk(key, 0, &mut b, &mut Vec::new()).unwrap();
        full.read_chunk(key, 0, &mut f, &mut Vec::new()).unwrap();
        let sd = (b.iter().map(|x| x * x).sum::<f32>() / b.len() as f32).sqrt();
        assert!((sd - 0.02).abs() < 0.004, "base std {sd}");
        let d: f32 = b.iter().zip(&f).map(|(x, y)| (x - y).abs()).sum::<f32>() / b.len() as f32;
        assert!(d > 1e-4 && d < 1e-2, "mean |delta| {d}");
        outputs.push(
            paths
                .iter()
                .map(|p| std::fs::read(p).unwrap())
                .collect::<Vec<_>>(),
        );
    }
    assert!(
        outputs[0] == outputs[1],
        "synth output depends on the thread count"
    );
}

/// The demo's pool (SD1, 1/64 size, 4 fine-tunes) had +Inf values: the heavy-tailed part of a
/// fine-tune divided by zero on the largest uniform draw.
#[test]
fn synthetic_models_are_finite() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = SynthOptions::new(Layout::Sd1Ldm, 4);
    o.shrink = 8;
    o.dtype = amalgam::io::dtype::OutputDtype::F32;
    let mut bad = Vec::new();
    for p in synthesize(dir.path(), &o).unwrap() {
        let m = ModelFile::open(&p).unwrap();
        let mut scratch = Vec::new();
        for (k, t) in m.tensors() {
            if t.float_dtype().is_none() {
                continue;
            }
            let mut v = vec![0f32; t.numel()];
            m.read_chunk(k, 0, &mut v, &mut scratch).unwrap();
            let n = v.iter().filter(|x| !x.is_finite()).count();
            if n > 0 {
                bad.push(format!("{}: {k}: {n}", p.display()));
            }
        }
    }
    assert!(bad.is_empty(), "non-finite values:\n{}", bad.join("\n"));
}
