//! One read of each input per key: a key with statistic passes whose inputs fit its share of
//! the memory budget is read into memory once, and its passes and its output are decoded from
//! there. A key whose inputs do not fit is streamed, once per pass, and named in the report.

use super::*;

/// A key's inputs held in memory: per model (by input index), the raw bytes of its tensor.
pub(super) struct KeyCache {
    raw: Vec<Option<crate::io::input::RawTensor>>,
}

impl KeyCache {
    /// The raw bytes of model `m`'s tensor, when held.
    pub(super) fn bytes(&self, m: usize) -> Option<&[u8]> {
        self.raw.get(m)?.as_ref().map(|r| r.bytes())
    }
    /// The raw bytes held, all models together.
    pub(super) fn held_bytes(&self) -> u64 {
        self.raw
            .iter()
            .flatten()
            .map(|r| r.bytes().len() as u64)
            .sum()
    }
}

/// The buffers of keys done, reused for the next keys: allocating fresh memory for every key
/// costs a page fault per 4 KiB page.
#[derive(Default)]
pub(super) struct Buffers(std::sync::Mutex<Vec<Vec<u64>>>);

impl Buffers {
    /// A buffer of at least `words` words where one is free (the smallest such), else the
    /// largest free one (it grows), else a new one.
    fn take(&self, words: usize) -> Vec<u64> {
        let mut free = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let fit = (0..free.len())
            .filter(|&i| free[i].len() >= words)
            .min_by_key(|&i| free[i].len())
            .or_else(|| (0..free.len()).max_by_key(|&i| free[i].len()));
        fit.map(|i| free.swap_remove(i)).unwrap_or_default()
    }
    /// Gives the buffers of a key done back.
    pub(super) fn give_back(&self, cache: Option<KeyCache>) {
        let Some(cache) = cache else { return };
        let mut free = self.0.lock().unwrap_or_else(|e| e.into_inner());
        free.extend(cache.raw.into_iter().flatten().map(|r| r.into_words()));
    }
}

/// The raw bytes the inputs of `expr` take for the key of `row` (each model counted once; only
/// plainly stored keys can be held).
pub(super) fn held_models<T: Real>(expr: &Exprs<T>, row: &KeyRow) -> (Vec<usize>, u64) {
    let mut models = Vec::new();
    expr.leaf_models(&mut models);
    models.sort_unstable();
    models.dedup();
    models.retain(|&m| row.locs[m].is_some_and(|l| row.view(&l) == View::Plain));
    let bytes = models
        .iter()
        .map(|&m| (row.numel() * row.locs[m].map_or(0, |l| l.dtype.bitsize() / 8)) as u64)
        .sum();
    (models, bytes)
}

/// Reads the inputs of the key of `row` into memory when they take at most `limit` bytes;
/// `None` (streamed) otherwise, or when every input is stored in a view that is not plain.
pub(super) fn read_key<T: Real>(
    expr: &Exprs<T>,
    row: &KeyRow,
    models: &[ModelFile],
    limit: u64,
    buffers: &Buffers,
) -> Result<Option<KeyCache>> {
    let (held, bytes) = held_models(expr, row);
    if held.is_empty() || bytes > limit {
        return Ok(None);
    }
    let read: Vec<(usize, crate::io::input::RawTensor)> = held
        .par_iter()
        .map(|&m| {
            let loc = row.locs[m].expect("held models have the key");
            let width = loc.dtype.bitsize() / 8;
            let len = row.numel() * width;
            let words = buffers.take((len + 64).div_ceil(8));
            Ok((m, models[m].read_whole(loc.offset, len, width, words)?))
        })
        .collect::<Result<_>>()?;
    let mut raw: Vec<Option<crate::io::input::RawTensor>> =
        (0..row.locs.len()).map(|_| None).collect();
    for (m, r) in read {
        raw[m] = Some(r);
    }
    Ok(Some(KeyCache { raw }))
}
