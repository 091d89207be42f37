//! `amalgam inspect`: a file's keys, dtypes, parameters, metadata, architecture and hash.

use crate::*;

#[derive(Args)]
pub(crate) struct InspectArgs {
    file: PathBuf,
    /// List every key with dtype and shape
    #[arg(long)]
    keys: bool,
    /// Print the `__metadata__` values in full (e.g. the recipe an amalgam output was made with)
    #[arg(long)]
    metadata: bool,
    /// Skip the AutoV2 hash (it reads the whole file)
    #[arg(long)]
    no_hash: bool,
}

pub(crate) fn cmd_inspect(a: InspectArgs) -> Result<()> {
    let m = ModelFile::open(&a.file)?;
    let mut params = 0usize;
    let mut by_dtype: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for t in m.tensors().values() {
        params += t.numel();
        let e = by_dtype.entry(dtype_name(t.dtype)).or_default();
        e.0 += 1;
        e.1 += t.numel();
    }
    println!("file:       {}", a.file.display());
    println!(
        "size:       {} ({} bytes)",
        format_bytes(m.file_size()),
        m.file_size()
    );
    println!("tensors:    {}", m.tensors().len());
    println!("parameters: {params}");
    for (d, (n, p)) in &by_dtype {
        println!("  {d:<8} {n} tensors, {p} parameters");
    }
    let recipes: Vec<&str> = [
        ("amalgam_recipe", "amalgam (TOML)"),
        ("mecha_recipe", "sd-mecha (.mecha)"),
    ]
    .iter()
    .filter(|(k, _)| m.metadata().contains_key(*k))
    .map(|(_, what)| *what)
    .collect();
    if !recipes.is_empty() {
        println!(
            "recipe:     embedded as {} (--metadata prints it; `amalgam merge` runs it once saved to a file)",
            recipes.join(" and ")
        );
    }
    if !m.metadata().is_empty() {
        println!("metadata:");
        for (k, v) in m.metadata() {
            if a.metadata || v.len() <= 80 && !v.contains('\n') {
                println!("  {k}: {v}");
            } else {
                println!("  {k}: ({} bytes; --metadata shows it)", v.len());
            }
        }
    }
    let detection = amalgam::layout::arch::detect(
        m.tensors()
            .iter()
            .map(|(k, t)| (k.as_str(), t.shape.as_slice(), t.numel())),
    );
    let names: Vec<&str> = m.tensors().keys().map(String::as_str).collect();
    if amalgam::layout::lora::is_lora(&names) {
        let (layout, modules, unknown) = amalgam::layout::lora::lora_modules(&names);
        match layout {
            Some(l) => println!(
                "architecture: a kohya LoRA for {l}: {} modules map to its keys{}",
                modules.len(),
                if unknown.is_empty() {
                    String::new()
                } else {
                    format!(", {} do not (e.g. {})", unknown.len(), unknown[0])
                }
            ),
            None => println!("architecture: a kohya LoRA whose modules name no SD1 or SDXL key"),
        }
    } else {
        print_detection(&detection, m.tensors().len());
    }
    if !a.no_hash {
        println!(
            "AutoV2:     {}",
            amalgam::layout::arch::autov2_hash(&a.file)?
        );
    }
    if a.keys {
        println!("keys:");
        for (k, t) in m.tensors() {
            println!("  {k}\t{}\t{:?}", dtype_name(t.dtype), t.shape);
        }
    }
    Ok(())
}

/// The architecture part of `inspect`.
pub(crate) fn print_detection(d: &amalgam::layout::arch::Detection, keys: usize) {
    let Some(layout) = d.layout else {
        println!(
            "architecture: unknown (no known layout has most of its keys; it merges key by key)"
        );
        return;
    };
    println!(
        "architecture: {layout} ({:?}; {} of its {keys} keys are in the layout)",
        layout.arch(),
        d.matched
    );
    println!("components:");
    for c in &d.components {
        if c.required == 0 {
            // All-optional components (EMA, scheduler buffers): shown when present.
            if c.optional_present > 0 {
                println!(
                    "  {:<10} {:>5} optional keys {:>10} parameters",
                    c.name, c.optional_present, c.parameters
                );
            }
            continue;
        }
        let state = if c.is_absent() {
            "MISSING (pruned)".to_string()
        } else if c.missing.is_empty() {
            "complete".to_string()
        } else {
            format!("{} keys missing, e.g. {}", c.missing.len(), c.missing[0])
        };
        println!(
            "  {:<10} {:>5}/{:<5} keys {:>14} parameters  {state}",
            c.name, c.present, c.required, c.parameters
        );
    }
    if d.missing_optional > 0 {
        println!(
            "optional keys missing: {} (EMA, position ids, scheduler buffers and the like)",
            d.missing_optional
        );
    }
    if d.reshaped > 0 {
        println!("keys with other shapes than the layout's: {}", d.reshaped);
    }
    if !d.extra.is_empty() {
        println!(
            "keys not in the layout: {} (e.g. {})",
            d.extra.len(),
            d.extra[0]
        );
    }
}
