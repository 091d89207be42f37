//! `amalgam inspect`: prints what `amalgam::inspect` finds (a file's dtypes, parameters,
//! metadata, architecture, hashes and report), as text or JSON.

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
    /// Skip the hashes (AutoV2, AutoV3, legacy: they read the whole file)
    #[arg(long)]
    no_hash: bool,
    /// Print everything as JSON (the library's `Inspection`)
    #[arg(long)]
    json: bool,
}

pub(crate) fn cmd_inspect(a: InspectArgs) -> Result<()> {
    let opts = amalgam::inspect::InspectOptions { hashes: !a.no_hash };
    let i = amalgam::inspect::inspect(&a.file, opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&i)?);
        return Ok(());
    }
    println!("file:       {}", a.file.display());
    println!("size:       {} ({} bytes)", format_bytes(i.size), i.size);
    println!("tensors:    {}", i.tensors);
    println!("parameters: {}", i.parameters);
    for (d, c) in &i.dtypes {
        println!(
            "  {d:<8} {} tensors, {} parameters",
            c.tensors, c.parameters
        );
    }
    if !i.recipes.is_empty() {
        println!(
            "recipe:     embedded as {} (--metadata prints it; `amalgam merge` runs it once saved to a file)",
            i.recipes.join(" and ")
        );
    }
    if !i.metadata.is_empty() {
        println!("metadata:");
        for (k, v) in &i.metadata {
            if a.metadata || v.len() <= 80 && !v.contains('\n') {
                println!("  {k}: {v}");
            } else {
                println!("  {k}: ({} bytes; --metadata shows it)", v.len());
            }
        }
    }
    match &i.lora {
        Some(l) => match &l.layout {
            Some(layout) => println!(
                "architecture: a kohya LoRA for {layout}: {} modules map to its keys{}",
                l.modules,
                if l.unknown.is_empty() {
                    String::new()
                } else {
                    format!(", {} do not (e.g. {})", l.unknown.len(), l.unknown[0])
                }
            ),
            None => println!("architecture: a kohya LoRA whose modules name no SD1 or SDXL key"),
        },
        None => print_detection(&i.detection, i.tensors),
    }
    if let Some(h) = &i.hashes {
        println!("Hashes:");
        println!("  AutoV2:  {}", h.autov2);
        println!("  AutoV3:  {}", h.autov3);
        match &h.legacy {
            Some(l) => println!("  legacy:  {l}"),
            None => {
                println!("  legacy:  none (the file has no bytes past 1 MiB, where it starts)")
            }
        }
        println!("  SHA-256: {}", h.sha256);
    }
    print_report(&i, a.metadata);
    if a.keys {
        println!("keys:");
        for (k, t) in ModelFile::open(&a.file)?.tensors() {
            println!("  {k}\t{}\t{:?}", dtype_name(t.dtype), t.shape);
        }
    }
    Ok(())
}

/// The `Report:` section: one line per finding, or one saying there are none.
fn print_report(i: &amalgam::inspect::Inspection, full_values: bool) {
    let r = &i.report;
    let eg = |g: &amalgam::inspect::KeyGroup| match g.examples.first() {
        Some(k) => format!(" (e.g. {k})"),
        None => String::new(),
    };
    println!("Report:");
    if !r.ema.is_empty() {
        println!(
            "  EMA:          {} keys, {}{}",
            r.ema.keys,
            format_bytes(r.ema.bytes),
            eg(&r.ema)
        );
    }
    if !r.junk.is_empty() {
        println!(
            "  junk:         {} keys no component uses (scheduler buffers, unknown keys), {}{}",
            r.junk.keys,
            format_bytes(r.junk.bytes),
            eg(&r.junk)
        );
    }
    if !r.unknown.is_empty() {
        println!(
            "  unknown:      {} keys not in the layout: {}{}",
            r.unknown.keys,
            r.unknown.examples.join(", "),
            if r.unknown.keys > r.unknown.examples.len() {
                ", ..."
            } else {
                ""
            }
        );
    }
    for p in r.position_ids.iter().filter(|p| !p.is_ok()) {
        let mut what = Vec::new();
        if !p.dtype_ok {
            what.push(format!("stored as {} (should be I64; fixable)", p.dtype));
        }
        if let Some(why) = &p.unreadable {
            what.push(why.clone());
        }
        if !p.wrong.is_empty() {
            let shown: Vec<String> = p
                .wrong
                .iter()
                .take(8)
                .map(|w| format!("[{}] = {}", w.index, w.value))
                .collect();
            what.push(format!(
                "{} values are not their index: {}{}",
                p.wrong.len(),
                shown.join(", "),
                if p.wrong.len() > 8 { ", ..." } else { "" }
            ));
        }
        println!("  position_ids: {}: {}", p.key, what.join("; "));
    }
    if let Some(p) = &r.precision {
        let parts: Vec<String> = p
            .by_component
            .iter()
            .map(|(c, (_, w))| format!("{c} {}", format_bytes(*w)))
            .collect();
        println!(
            "  precision:    {} F32/F64 tensors in a file otherwise {}: {} wasted ({})",
            p.tensors,
            p.main_dtype,
            format_bytes(p.wasted_bytes),
            parts.join(", ")
        );
    }
    for (k, v) in &r.modelspec {
        if full_values || v.len() <= 80 && !v.contains('\n') {
            println!("  modelspec:    {k} = {v}");
        } else {
            println!(
                "  modelspec:    {k} = ({} bytes; --metadata shows it)",
                v.len()
            );
        }
    }
    if r.is_clean() {
        println!("  no problems found");
    }
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
