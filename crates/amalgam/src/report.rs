//! What a merge did with every key: the key policy made visible.

use crate::recipe::graph::Graph;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Why a float key was written unchanged from one model.
#[derive(Clone, Debug, serde::Serialize)]
pub enum TakenBecause {
    /// A node passed one of its arguments through (e.g. weighted sum where only one model has it).
    PassedThrough(String),
    /// The output node has no value for the key; it was taken from the fallback model.
    Fallback(String),
}

/// What was done for one key.
#[derive(Clone, Debug, serde::Serialize)]
pub enum KeyAction {
    /// Merged from every input the recipe gives it.
    Merged,
    /// Merged, but some inputs lacked the key and were left out (the note says where).
    MergedPartly(String),
    /// A float key written unchanged (converted to the output dtype) from one model.
    Taken {
        /// The model (input index).
        model: usize,
        /// Why it was taken rather than merged.
        because: TakenBecause,
    },
    /// A non-float key (e.g. int64 `position_ids`) copied byte for byte from the first model that has it.
    CopiedUnchanged {
        /// The model (input index).
        model: usize,
    },
}

/// The summary of a merge.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct MergeReport {
    /// Input names and paths, in input order.
    pub models: Vec<(String, PathBuf)>,
    /// Per input, the keys some other input has and it lacks.
    pub lacking: Vec<Vec<String>>,
    /// Per input, how many of the keys it lacks were completed from the repair model.
    pub repaired: Vec<usize>,
    /// The repair model's name, when the merge completes pruned models.
    pub repair: Option<String>,
    /// Per input, the layout detected from its header (`None`: unknown).
    pub layouts: Vec<Option<String>>,
    /// The layout components were taken from.
    pub architecture: Option<String>,
    /// Per output key, in output order.
    pub actions: Vec<(String, KeyAction)>,
    /// Bytes of tensor data actually read from the inputs.
    pub bytes_read: u64,
    /// Bytes of tensor data the merge uses (each input's tensors once): what a merge reading
    /// every input once reads.
    pub input_bytes: u64,
    /// Bytes written to the output.
    pub bytes_written: u64,
    /// Elements per chunk.
    pub chunk_elements: usize,
    /// Worker threads.
    pub threads: usize,
    /// The working set the chunk size was derived for.
    pub working_set_bytes: u64,
    /// Wall time of the merge.
    pub elapsed: Duration,
    /// The output file (none for a dry run).
    pub output: Option<PathBuf>,
    /// The process's peak resident set size at the end of the merge (Linux only).
    pub peak_rss_bytes: Option<u64>,
    /// What the methods said about their run as configured, one line each.
    pub notes: Vec<String>,
    /// What the methods said about single keys: (key, line).
    pub key_notes: Vec<(String, String)>,
    /// The inputs whose tensor for a key holds NaN or Inf, in key order (see
    /// [`crate::io::non_finite`]).
    pub inputs_non_finite: Vec<crate::io::non_finite::InputNonFinite>,
    /// The output keys holding NaN or Inf, in the output dtype: (key, count).
    pub outputs_non_finite: Vec<(String, u64)>,
    /// When the recipe's output is an `extract_lora` node: the LoRA written (the rest of the
    /// report is the merge of its `model` input, when that is a node).
    pub lora: Option<crate::lora::extract::ExtractReport>,
}

impl MergeReport {
    /// An empty report for the merge of `graph`.
    pub fn new(graph: &Graph) -> Self {
        MergeReport {
            models: graph
                .models
                .iter()
                .map(|m| (m.name.clone(), m.path.clone()))
                .collect(),
            lacking: vec![Vec::new(); graph.models.len()],
            repaired: vec![0; graph.models.len()],
            repair: graph.repair.map(|r| graph.models[r].name.clone()),
            ..Default::default()
        }
    }

    /// Counts of (merged, merged from a subset, taken unchanged, copied non-float).
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        let mut c = (0, 0, 0, 0);
        for (_, a) in &self.actions {
            match a {
                KeyAction::Merged => c.0 += 1,
                KeyAction::MergedPartly(_) => c.1 += 1,
                KeyAction::Taken { .. } => c.2 += 1,
                KeyAction::CopiedUnchanged { .. } => c.3 += 1,
            }
        }
        c
    }
}

impl MergeReport {
    /// The lines on NaN and Inf values: per input, the keys where it holds some and what was
    /// done; then the output's.
    fn fmt_non_finite(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 4;
        for (i, (name, path)) in self.models.iter().enumerate() {
            let found: Vec<_> = self
                .inputs_non_finite
                .iter()
                .filter(|n| n.model == i)
                .collect();
            if found.is_empty() {
                continue;
            }
            let omitted = found.iter().filter(|n| n.omitted).count();
            let what = match omitted {
                0 => "merged as they are".to_string(),
                n if n == found.len() => "left out of those keys".to_string(),
                n => format!("left out of {n} of those keys"),
            };
            let shown: Vec<String> = found
                .iter()
                .take(SHOWN)
                .map(|n| format!("{} ({})", n.key, n.count))
                .collect();
            writeln!(
                f,
                "  {name} ({}) holds NaN/Inf values in {} keys, {what}: {}{}",
                path.display(),
                found.len(),
                shown.join(", "),
                if found.len() > SHOWN { ", ..." } else { "" }
            )?;
        }
        if !self.outputs_non_finite.is_empty() {
            let total: u64 = self.outputs_non_finite.iter().map(|(_, n)| n).sum();
            let shown: Vec<String> = self
                .outputs_non_finite
                .iter()
                .take(SHOWN)
                .map(|(k, n)| format!("{k} ({n})"))
                .collect();
            writeln!(
                f,
                "  warning: the output holds {total} NaN/Inf values in {} keys: {}{}",
                self.outputs_non_finite.len(),
                shown.join(", "),
                if self.outputs_non_finite.len() > SHOWN {
                    ", ... (--report-json lists them all)"
                } else {
                    ""
                }
            )?;
        }
        Ok(())
    }
}

/// Groups keys by their first two dotted segments, e.g. `first_stage_model.decoder`.
fn group_keys(keys: &[String]) -> Vec<(String, usize)> {
    let mut groups: BTreeMap<String, usize> = BTreeMap::new();
    for k in keys {
        let prefix: Vec<&str> = k.split('.').take(2).collect();
        *groups.entry(prefix.join(".")).or_default() += 1;
    }
    let mut v: Vec<_> = groups.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

impl fmt::Display for MergeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(lora) = &self.lora {
            if !self.actions.is_empty() {
                self.fmt_merge(f)?;
                writeln!(f)?;
            } else {
                for note in &self.notes {
                    writeln!(f, "  {note}")?;
                }
            }
            return write!(f, "{lora}");
        }
        self.fmt_merge(f)
    }
}

impl MergeReport {
    /// The merge's summary: keys, what was done with those not merged from every input, notes,
    /// NaN/Inf, bytes and time.
    fn fmt_merge(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (merged, partly, taken, copied) = self.counts();
        if let Some(a) = &self.architecture {
            let other: Vec<String> = self
                .models
                .iter()
                .zip(&self.layouts)
                .filter(|(_, l)| l.as_deref() != Some(a.as_str()))
                .map(|((n, _), l)| format!("{n}: {}", l.as_deref().unwrap_or("unknown")))
                .collect();
            if other.is_empty() {
                writeln!(f, "architecture {a} (every input)")?;
            } else {
                writeln!(f, "architecture {a} (but {})", other.join(", "))?;
            }
        }
        writeln!(
            f,
            "{} keys: {merged} merged from all their inputs, {partly} merged from the inputs that have them, {taken} taken unchanged from one model, {copied} non-float copied",
            self.actions.len()
        )?;
        for (i, keys) in self.lacking.iter().enumerate() {
            if keys.is_empty() {
                continue;
            }
            let (name, path) = &self.models[i];
            let groups = group_keys(keys);
            let shown: Vec<String> = groups
                .iter()
                .take(4)
                .map(|(g, n)| format!("{g}.* ({n})"))
                .collect();
            writeln!(
                f,
                "  {name} ({}) lacks {} keys: {}{}{}",
                path.display(),
                keys.len(),
                shown.join(", "),
                if groups.len() > 4 { ", ..." } else { "" },
                match (&self.repair, self.repaired[i]) {
                    (Some(r), n) if n > 0 => format!("; repaired: {n} completed from {r}"),
                    _ => String::new(),
                }
            )?;
        }
        // Keys not merged from all their inputs, grouped by what was done.
        let mut groups: BTreeMap<String, (usize, &str)> = BTreeMap::new();
        for (key, action) in &self.actions {
            let line = match action {
                KeyAction::MergedPartly(note) => format!("merged partly: {note}"),
                KeyAction::Taken { model, because } => {
                    let (why, note) = match because {
                        TakenBecause::PassedThrough(n) => ("passed through", n),
                        TakenBecause::Fallback(n) => ("fallback", n),
                    };
                    let note = if note.is_empty() {
                        String::new()
                    } else {
                        format!(": {note}")
                    };
                    format!(
                        "taken unchanged from {} ({why}{note})",
                        self.models[*model].0
                    )
                }
                _ => continue,
            };
            groups.entry(line).or_insert((0, key)).0 += 1;
        }
        for (line, (count, example)) in &groups {
            writeln!(f, "  {count} keys {line} (e.g. {example})")?;
        }
        for note in &self.notes {
            writeln!(f, "  {note}")?;
        }
        self.fmt_non_finite(f)?;
        const SHOWN: usize = 4;
        for (key, note) in self.key_notes.iter().take(SHOWN) {
            writeln!(f, "  {key}: {note}")?;
        }
        if self.key_notes.len() > SHOWN {
            writeln!(
                f,
                "  ... and {} more key notes (--report-json lists them all)",
                self.key_notes.len() - SHOWN
            )?;
        }
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        write!(
            f,
            "read {} ({:.2}x the inputs' {}), wrote {} in {:.2} s ({}/s read); {} threads, chunks of {} elements",
            crate::size::format_bytes(self.bytes_read),
            self.bytes_read as f64 / self.input_bytes.max(1) as f64,
            crate::size::format_bytes(self.input_bytes),
            crate::size::format_bytes(self.bytes_written),
            secs,
            crate::size::format_bytes((self.bytes_read as f64 / secs) as u64),
            self.threads,
            self.chunk_elements
        )?;
        if let Some(rss) = self.peak_rss_bytes {
            write!(f, "; peak RSS {}", crate::size::format_bytes(rss))?;
        }
        Ok(())
    }
}

/// The peak resident set size of this process (`VmHWM`), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
