//! Evaluation: worker buffers, the evaluation of an expression on a sub-chunk, and statistic
//! passes.

use super::*;

/// One unit of parallel work: elements `range` of planned key `key`, computed in cache-sized
/// sub-chunks into one output buffer that is then written with one call.
pub(super) struct Task {
    pub(super) key: usize,
    pub(super) range: Range<usize>,
    /// The sub-chunk length (a multiple of the key's unit).
    pub(super) step: usize,
}

/// Reusable buffers of one worker thread.
pub(super) struct Scratch<T> {
    pub(super) free: Vec<Vec<T>>,
    pub(super) raw: Vec<u64>,
    /// One buffer of encoded output per output written at once.
    pub(super) outs: Vec<Vec<u64>>,
    /// The models whose values read since this was last cleared hold NaN or Inf.
    pub(super) bad: Vec<u32>,
    /// Set those values to zero (see [`NonFinite::cleans`]).
    pub(super) clean: bool,
}

impl<T: Real> Scratch<T> {
    pub(super) fn new(clean: bool) -> Self {
        Scratch {
            free: Vec::new(),
            raw: Vec::new(),
            outs: Vec::new(),
            bad: Vec::new(),
            clean,
        }
    }
    pub(super) fn take(&mut self, len: usize) -> Vec<T> {
        let mut b = self.free.pop().unwrap_or_default();
        if b.len() < len {
            b.resize(len, T::ZERO);
        }
        b
    }
}

/// One `Scratch` per worker thread, kept for the whole merge.
pub(super) struct Workers<T> {
    pub(super) slots: Vec<std::sync::Mutex<Scratch<T>>>,
    /// The `clean` of every slot (for the scratch of a task taken while the slot is in use).
    clean: std::sync::atomic::AtomicBool,
}

impl<T: Real> Workers<T> {
    pub(super) fn new(threads: usize, clean: bool) -> Self {
        Workers {
            slots: (0..threads.max(1))
                .map(|_| std::sync::Mutex::new(Scratch::new(clean)))
                .collect(),
            clean: clean.into(),
        }
    }
    /// Whether non-finite input values are set to zero when found.
    pub(super) fn set_clean(&self, clean: bool) {
        self.clean
            .store(clean, std::sync::atomic::Ordering::Relaxed);
        for slot in &self.slots {
            slot.lock().unwrap_or_else(|e| e.into_inner()).clean = clean;
        }
    }
    /// Runs `f` with this worker thread's scratch; with a scratch of its own when the thread's
    /// is in use already. That happens when a method's own parallel work (DELLA's exact ranks
    /// rank the models in parallel) runs inside `f`: while it waits, rayon lets the thread take
    /// another task, whose `with` would otherwise wait forever on the lock its own thread holds.
    pub(super) fn with<R>(&self, f: impl FnOnce(&mut Scratch<T>) -> R) -> R {
        use std::sync::TryLockError;
        let i = rayon::current_thread_index().unwrap_or(0) % self.slots.len();
        match self.slots[i].try_lock() {
            Ok(mut guard) => f(&mut guard),
            Err(TryLockError::Poisoned(e)) => f(&mut e.into_inner()),
            Err(TryLockError::WouldBlock) => {
                let clean = self.clean.load(std::sync::atomic::Ordering::Relaxed);
                f(&mut Scratch::new(clean))
            }
        }
    }
}

/// Evaluates `expr` on elements `range`; the result is the first `range.len()` elements of the
/// returned buffer (to be given back to `s.free`).
pub(super) fn eval<T: Real>(
    expr: &Expr<T>,
    row: &KeyRow,
    range: &Range<usize>,
    models: &[ModelFile],
    cache: Option<&KeyCache>,
    s: &mut Scratch<T>,
) -> Result<Vec<T>> {
    let len = range.len();
    match expr {
        Expr::Leaf(l) => {
            let mut buf = s.take(len);
            let finite = match cache.and_then(|c| c.bytes(l.model as usize)) {
                // The key's tensor is in memory (see `cache`).
                Some(raw) => {
                    let dtype = l.dtype(row);
                    let w = dtype.size();
                    dtype.decode_checked(&raw[range.start * w..range.end * w], &mut buf[..len])
                }
                None => l.loc(row).read(
                    row,
                    &models[l.model as usize],
                    range.start,
                    &mut buf[..len],
                    &mut s.raw,
                )?,
            };
            if !finite {
                s.bad.push(l.model);
                if s.clean {
                    crate::io::non_finite::clean(&mut buf[..len]);
                }
            }
            Ok(buf)
        }
        Expr::Node(node) => {
            let bufs = eval_args(&node.args, row, range, models, cache, s)?;
            let mut out = s.take(len);
            {
                let refs: Vec<&[T]> = bufs.iter().map(|b| &b[..len]).collect();
                node.state
                    .merge_chunk(range.clone(), &refs, &mut out[..len]);
            }
            s.free.extend(bufs);
            Ok(out)
        }
    }
}

/// Where and how a key's statistic passes run: its row, the inputs, the held raw bytes, the
/// workers, the block length, and the bounds on blocks in flight and on their bytes.
pub(super) struct StatRun<'a, T: Real> {
    pub(super) row: &'a KeyRow,
    pub(super) models: &'a [ModelFile],
    pub(super) cache: Option<&'a KeyCache>,
    pub(super) workers: &'a Workers<T>,
    pub(super) block: usize,
    pub(super) in_flight: usize,
    pub(super) stats_budget: u64,
}

/// Runs the statistic passes of every output's expression (see [`run_expr_stats`]), or of the
/// points' arguments and then the points'.
pub(super) fn run_stats<T: Real>(exprs: &mut Exprs<T>, at: &StatRun<T>) -> Result<()> {
    match exprs {
        Exprs::Each(each) => each.iter_mut().try_for_each(|e| run_expr_stats(e, at)),
        Exprs::Points { args, state } => {
            args.iter_mut().try_for_each(|a| run_expr_stats(a, at))?;
            if state.stat_passes() > 0 {
                let declared = state.stat_passes();
                // Each point may keep an eighth of the held bytes (at most four eighths in all).
                let shares = state.points().min(MAX_SHARES) as u64;
                let ran = drive_passes(&mut |p| state.run_passes(p), args, at, shares)?;
                debug_assert_eq!(ran, declared, "the passes declared run");
            }
            Ok(())
        }
    }
}

/// Runs the statistic passes of every node of `expr`, children first.
pub(super) fn run_expr_stats<T: Real>(expr: &mut Expr<T>, at: &StatRun<T>) -> Result<()> {
    let Expr::Node(node) = expr else {
        return Ok(());
    };
    let NodeExpr { state, args, .. } = &mut **node;
    args.iter_mut().try_for_each(|a| run_expr_stats(a, at))?;
    if state.stat_passes() > 0 {
        let ran = drive_passes(&mut |p| state.run_passes(p), args, at, 1)?;
        debug_assert_eq!(ran, state.stat_passes(), "the passes declared run");
    }
    Ok(())
}

/// The most eighths of a key's held bytes the points of a node may keep from their passes.
const MAX_SHARES: usize = 4;

/// Has `run_passes` run its passes over the key, each on the values of `args`; returns how many
/// ran. The state may keep `shares` eighths of the held bytes from its passes.
///
/// Blocks are `at.block` elements (whole units of the expression); `at.in_flight` bounds how
/// many are computed at once (large units are memory-bound), and so does `at.stats_budget`, the
/// bytes the unfolded blocks of a pass may take (from the pass's declared block size).
fn drive_passes<T: Real>(
    run_passes: &mut dyn FnMut(&mut Passes<T>) -> Result<()>,
    args: &[Expr<T>],
    at: &StatRun<T>,
    shares: u64,
) -> Result<usize> {
    let StatRun {
        row,
        models,
        cache,
        workers,
        block,
        in_flight,
        stats_budget,
    } = *at;
    let numel = row.numel();
    // A zero-element tensor is one empty block, so every statistic has its identity value
    // (zero sums, an all-zero Gram matrix) rather than no value at all.
    #[allow(clippy::single_range_in_vec_init)] // one empty block, not a range of blocks
    let blocks: Vec<Range<usize>> = if numel == 0 {
        vec![0..0]
    } else {
        (0..numel)
            .step_by(block)
            .map(|s| s..(s + block).min(numel))
            .collect()
    };
    let threads = rayon::current_num_threads().max(1);
    let mut run = |pass: &mut dyn ErasedPass<T>| -> Result<()> {
        // Blocks are computed in parallel a group at a time and folded in block order, so at
        // most one group of block statistics is held at once.
        let fits = stats_budget / pass.block_bytes(block).max(1) as u64;
        // At least a block per thread.
        let group = (16 * threads)
            .min(in_flight)
            .min(fits.max(threads as u64) as usize);
        for chunk in blocks.chunks(group) {
            let computing: &dyn ErasedPass<T> = &*pass;
            let results: Vec<Box<dyn std::any::Any + Send>> = chunk
                .par_iter()
                .map(|range| {
                    workers.with(|s| {
                        let len = range.len();
                        let bufs = eval_args(args, row, range, models, cache, s)?;
                        let refs: Vec<&[T]> = bufs.iter().map(|b| &b[..len]).collect();
                        let r = computing.block(range.clone(), &refs);
                        s.free.extend(bufs);
                        // The output pass reads every value again and reports them.
                        s.bad.clear();
                        Ok(r)
                    })
                })
                .collect::<Result<_>>()?;
            for r in results {
                pass.fold(r);
            }
        }
        Ok(())
    };
    // Held inputs leave room for a method to keep an eighth of their size for its output.
    let allowance = cache.map_or(0, |c| c.held_bytes() / 8 * shares);
    let mut passes = Passes::new(&mut run, allowance);
    run_passes(&mut passes)?;
    Ok(passes.ran())
}

/// Evaluates each of `args` on elements `range` (see [`eval`]).
pub(super) fn eval_args<T: Real>(
    args: &[Expr<T>],
    row: &KeyRow,
    range: &Range<usize>,
    models: &[ModelFile],
    cache: Option<&KeyCache>,
    s: &mut Scratch<T>,
) -> Result<Vec<Vec<T>>> {
    let mut bufs = Vec::with_capacity(args.len());
    for a in args {
        bufs.push(eval(a, row, range, models, cache, s)?);
    }
    Ok(bufs)
}

/// How a run cuts its keys: the worker threads, the sub-chunk and task (chunk) lengths, the
/// compute bytes per element of a sub-chunk, the outputs a task encodes at once and the output's
/// bytes per element.
pub(super) struct Sizes {
    pub(super) threads: usize,
    pub(super) sub: usize,
    pub(super) chunk: usize,
    pub(super) sub_bytes_per_elem: usize,
    pub(super) together: usize,
    pub(super) out_size: usize,
}

/// The sizes of a run of `planned` within the budget (an error naming the budget needed when it
/// is too small).
pub(super) fn sizes<T: Real>(
    planned: &[PlannedKey<T>],
    rows: &[KeyRow],
    opts: &MergeOptions,
) -> Result<Sizes> {
    // The working set of a worker is one sub-chunk's buffers plus one task's encoded output.
    // Sub-chunks get shorter as the number of inputs grows, so the memory used does not grow
    // with the number of models; half the budget goes to each part at most.
    let threads = rayon::current_num_threads().max(1);
    let tsize = std::mem::size_of::<T>();
    let (mut leaves, mut nodes, mut together) = (1, 0, 1);
    for p in planned {
        if let Job::Compute { exprs, .. } = &p.job {
            let (l, n) = exprs.cost();
            leaves = leaves.max(l);
            nodes = nodes.max(n);
            together = together.max(exprs.written_together());
        }
    }
    let in_max = rows
        .iter()
        .flat_map(|r| r.locs.iter().flatten())
        .filter_map(|l| FloatDtype::from_safetensors(l.dtype))
        .map(|d| d.size())
        .max()
        .unwrap_or(2);
    // One compute buffer per input and per node; the raw bytes of one input at a time.
    let sub_bytes_per_elem = (leaves + nodes) * tsize + in_max;
    let per_thread = opts.memory_budget / 2 / threads as u64;
    let sub = (CACHE_TARGET.min(per_thread as usize) / sub_bytes_per_elem) / 256 * 256;
    let out_size = opts.output_dtype.size();
    let chunk = match opts.chunk_override {
        Some(c) => c.max(1).div_ceil(BLOCK) * BLOCK,
        // The encoded outputs of a task (every point's, for a swept node) fit the other half.
        None => (per_thread.min(TASK_OUTPUT_MAX) as usize / out_size / together) / BLOCK * BLOCK,
    };
    if sub == 0 || chunk == 0 {
        return Err(Error::Invalid(format!(
            "memory budget of {} is too small for this merge: {} inputs per key on {} threads need at least {}",
            crate::size::format_bytes(opts.memory_budget),
            leaves,
            threads,
            crate::size::format_bytes(
                2 * threads as u64 * (256 * sub_bytes_per_elem).max(BLOCK * out_size) as u64
            )
        )));
    }
    Ok(Sizes {
        threads,
        sub: sub.min(chunk),
        chunk,
        sub_bytes_per_elem,
        together,
        out_size,
    })
}

/// The tasks of key `ki` (of `numel` elements), spanning whole units; those of a key with
/// statistics are cut so that every thread has a part of it (its passes end before its output
/// starts). A `large` unit (over a sub-chunk) is a task of its own.
pub(super) fn key_tasks(
    sizes: &Sizes,
    ki: usize,
    numel: usize,
    unit: usize,
    large: bool,
    stats: bool,
) -> Vec<Task> {
    let (mut task_len, step) = if large {
        (unit, unit)
    } else {
        (sizes.chunk.div_ceil(unit) * unit, sizes.sub / unit * unit)
    };
    if stats && !large {
        let share = numel.div_ceil(2 * sizes.threads).div_ceil(step) * step;
        task_len = task_len.min(share.max(step));
    }
    (0..numel)
        .step_by(task_len.max(1))
        .map(|start| Task {
            key: ki,
            range: start..(start + task_len).min(numel),
            step,
        })
        .collect()
}

/// A sub-chunk is sized so that its buffers (the compute values of every input and node, and the
/// raw bytes of one input) take about this many bytes: small enough to stay in the CPU caches, large
/// enough that each read of an input is tens of KiB even for hundreds of inputs per key.
pub(super) const CACHE_TARGET: usize = 2 << 20;

/// The output buffer of one task (a run of sub-chunks written with one call) is at most this
/// large, within the budget.
pub(super) const TASK_OUTPUT_MAX: u64 = 16 << 20;

/// Keys with statistic passes in flight per thread.
pub(super) const STAT_KEYS: usize = 2;
