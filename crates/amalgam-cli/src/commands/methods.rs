//! `amalgam methods [NAME]`: the methods, their inputs and parameters.

use crate::*;

#[derive(Args)]
pub(crate) struct MethodsArgs {
    /// One method (or alias) to show whole
    name: Option<String>,
    /// Print the index of docs/methods.md (each method's sources and aliases) as Markdown
    #[arg(long, conflicts_with = "name")]
    markdown: bool,
}

pub(crate) fn cmd_methods(a: MethodsArgs) -> Result<()> {
    if a.markdown {
        print!("{}", amalgam::methods::markdown_index());
        return Ok(());
    }
    let one = a.name.as_deref().map(amalgam::methods::info).transpose()?;
    let all = amalgam::methods::ALL.iter();
    for info in all
        .chain(amalgam::methods::WHOLE_MODEL)
        .chain(amalgam::methods::STAGES)
    {
        if one.is_some_and(|o| o.name != info.name) {
            continue;
        }
        let stage = if amalgam::methods::is_stage(info.name) {
            " (output stage: a recipe's output node only)"
        } else if amalgam::methods::is_whole_model(info.name) {
            " (whole model: prepared before the merge)"
        } else {
            ""
        };
        let origins: Vec<&str> = info.origins.iter().map(|o| o.name()).collect();
        let aliases: Vec<String> = amalgam::methods::aliases_of(info.name)
            .map(|(a, o)| format!("{a} ({})", o.name()))
            .collect();
        let aliases = if aliases.is_empty() {
            String::new()
        } else {
            format!("; also known as {}", aliases.join(", "))
        };
        println!(
            "{}{stage}  [{}{aliases}]\n  {}",
            info.name,
            origins.join(", "),
            info.summary
        );
        // A preset is shown as its overrides, unless it is asked for by name.
        if let Some(p) = amalgam::methods::preset_of(info).filter(|_| one.is_none()) {
            let o: Vec<String> = p
                .overrides
                .iter()
                .map(|(k, v)| format!("{k} = {}", v.as_deref().unwrap_or("(not set)")))
                .collect();
            println!(
                "  `{}` with {} (`amalgam methods {}` shows it whole)\n",
                p.of.name,
                o.join(", "),
                info.name
            );
            continue;
        }
        println!("  {}", info.formula);
        let slots: Vec<String> = info
            .slots
            .iter()
            .map(|s| match s.kind {
                amalgam::method::SlotKind::One => format!("{} ({})", s.name, s.doc),
                amalgam::method::SlotKind::Many => format!("{} = [...] ({})", s.name, s.doc),
            })
            .collect();
        println!("  inputs: {}", slots.join("; "));
        for p in info.params {
            let default = p.default_text().unwrap_or_else(|| "(not set)".into());
            // A choice's options are in its doc, with what each does.
            let kind = match p.kind {
                amalgam::method::ParamKind::Choice { .. } => String::new(),
                _ => format!(" ({})", p.type_text()),
            };
            println!("  {} = {default}{kind}: {}", p.name, p.doc);
        }
        println!();
    }
    Ok(())
}
