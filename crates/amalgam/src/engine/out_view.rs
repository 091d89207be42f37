//! Where each computed key goes in the output file, in the output layout.

use super::*;

/// Where a computed key goes in the output file.
pub(super) enum OutView {
    /// Output tensor `i`, as computed.
    Same(usize),
    /// Split in three row blocks (q, k, v) of `part` elements into output tensors `ids`.
    Split3 { ids: [usize; 3], part: usize },
    /// Output tensor `i` is the computed `[rows, cols]` tensor transposed.
    Transposed { i: usize, rows: usize, cols: usize },
}

impl OutView {
    /// The output tensors this key is written to.
    pub(super) fn tensors(&self) -> Vec<usize> {
        match *self {
            OutView::Same(i) | OutView::Transposed { i, .. } => vec![i],
            OutView::Split3 { ids, .. } => ids.to_vec(),
        }
    }

    /// The file position the first of the encoded elements from element `start` on goes to.
    pub(super) fn file_pos(&self, out: &OutputFile, start: usize, size: usize) -> u64 {
        match *self {
            OutView::Same(i) => out.file_pos(i, (start * size) as u64),
            OutView::Split3 { ids, part } => {
                out.file_pos(ids[start / part], ((start % part) * size) as u64)
            }
            OutView::Transposed { i, .. } => out.file_pos(i, 0),
        }
    }

    /// Writes the encoded elements starting at element `start` (`size` bytes each).
    pub(super) fn write(
        &self,
        out: &OutputFile,
        start: usize,
        size: usize,
        bytes: &mut [u8],
    ) -> Result<()> {
        match *self {
            OutView::Same(i) => out.write_at(i, (start * size) as u64, bytes),
            OutView::Split3 { ids, part } => {
                let total = bytes.len() / size;
                let mut at = 0;
                while at < total {
                    let e = start + at;
                    let within = e % part;
                    let n = (part - within).min(total - at);
                    out.write_at(
                        ids[e / part],
                        (within * size) as u64,
                        &bytes[at * size..(at + n) * size],
                    )?;
                    at += n;
                }
                Ok(())
            }
            OutView::Transposed { i, rows, cols } => {
                debug_assert_eq!((start, bytes.len()), (0, rows * cols * size));
                let mut t = vec![0u8; bytes.len()];
                for r in 0..rows {
                    for c in 0..cols {
                        let (from, to) = ((r * cols + c) * size, (c * rows + r) * size);
                        t[to..to + size].copy_from_slice(&bytes[from..from + size]);
                    }
                }
                out.write_at(i, 0, &t)
            }
        }
    }
}

/// The output tensors and where each planned key goes: the keys as computed, or with
/// `opts.output_layout`, the names, shapes and splits of that layout.
pub(super) fn output_views<T: Real>(
    planned: &[PlannedKey<T>],
    rows: &[KeyRow],
    layout: Option<Layout>,
    opts: &MergeOptions,
) -> Result<(Vec<OutputTensor>, Vec<OutView>)> {
    let dtype_of = |p: &PlannedKey<T>| match &p.job {
        Job::CopyRaw { .. } => rows[p.row].dtype(),
        Job::Compute { .. } | Job::Done => opts.output_dtype.safetensors(),
    };
    let mut tensors = Vec::with_capacity(planned.len());
    let mut views = Vec::with_capacity(planned.len());
    let map = match opts.output_layout {
        None => None,
        Some(target) => {
            let canonical = crate::layout::formats::canonical(target).unwrap_or(target);
            if Some(canonical) != layout {
                return Err(Error::Invalid(format!(
                    "cannot write the output as {target}: the merge is {}",
                    layout.map_or("of no known architecture".to_string(), |l| l.to_string())
                )));
            }
            let names: Vec<&str> = target.keys().iter().map(|k| k.key.as_str()).collect();
            Some((target, crate::layout::formats::to_canonical(target, &names)))
        }
    };
    for p in planned {
        let row = &rows[p.row];
        let dtype = dtype_of(p);
        let source = map
            .as_ref()
            .and_then(|(t, m)| Some((*t, m.get(&row.name)?)));
        let float = matches!(p.job, Job::Compute { .. } | Job::Done);
        match source {
            Some((target, crate::layout::formats::Source::Rename(k))) => {
                views.push(OutView::Same(tensors.len()));
                tensors.push(OutputTensor {
                    name: k.clone(),
                    dtype,
                    shape: unit_dims_like(row.shape.clone(), target, k),
                });
            }
            Some((_, crate::layout::formats::Source::Concat(ks)))
                if float && row.shape[0] % 3 == 0 =>
            {
                let mut shape = row.shape.clone();
                shape[0] /= 3;
                let first = tensors.len();
                for k in ks {
                    tensors.push(OutputTensor {
                        name: k.clone(),
                        dtype,
                        shape: shape.clone(),
                    });
                }
                views.push(OutView::Split3 {
                    ids: [first, first + 1, first + 2],
                    part: row.numel() / 3,
                });
            }
            Some((_, crate::layout::formats::Source::Transpose(k)))
                if float && row.shape.len() == 2 =>
            {
                views.push(OutView::Transposed {
                    i: tensors.len(),
                    rows: row.shape[0],
                    cols: row.shape[1],
                });
                tensors.push(OutputTensor {
                    name: k.clone(),
                    dtype,
                    shape: vec![row.shape[1], row.shape[0]],
                });
            }
            _ => {
                views.push(OutView::Same(tensors.len()));
                tensors.push(OutputTensor {
                    name: row.name.clone(),
                    dtype,
                    shape: row.shape.clone(),
                });
            }
        }
    }
    Ok((tensors, views))
}
