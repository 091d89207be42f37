//! The scheduler: keys in name order cut into tasks that run in parallel, keys with statistic
//! passes in groups, keys where an input holds NaN or Inf computed again.

use super::*;

/// Computes every point's output in one pass over the keys (each key's inputs read once for
/// all of them when they fit the budget); a report per point.
pub(super) fn run<T: Real>(
    points: &[OutputPoint],
    inputs: &RunInputs,
    progress: &dyn Progress,
) -> Result<Vec<MergeReport>> {
    let (models, rows) = (inputs.models, inputs.rows);
    // The options the points share (see `check_points`), and the models.
    let (graph, opts) = (&points[0].graph, &points[0].opts);
    let started = Instant::now();
    let mut reports = Vec::with_capacity(points.len());
    let mut methods = Vec::with_capacity(points.len());
    let mut plans = Vec::with_capacity(points.len());
    for p in points {
        let mut report = MergeReport::new(&p.graph);
        report.layouts = inputs
            .layouts
            .iter()
            .map(|l| l.map(|l| l.name().to_string()))
            .collect();
        report.architecture = inputs.layout.map(|l| l.name().to_string());
        report.notes.extend(inputs.notes.iter().cloned());
        let (m, planned) = plan::<T>(&p.graph, rows, inputs, &p.opts, &mut report)?;
        reports.push(report);
        methods.push(m);
        plans.push(planned);
    }
    let mut planned = join_plans(plans, swept_node(points))?;
    let multi = points.len() > 1;

    let sized = sizes(&planned, rows, opts)?;
    let Sizes {
        threads,
        sub,
        chunk,
        sub_bytes_per_elem,
        together,
        out_size,
    } = sized;
    for report in &mut reports {
        report.chunk_elements = chunk;
        report.threads = threads;
        report.working_set_bytes =
            (threads * (sub * sub_bytes_per_elem + chunk * out_size * together)) as u64;
    }

    let (out_tensors, views) = output_views(&planned, rows, inputs.layout, opts)?;
    let metadata = points
        .iter()
        .map(|p| output_metadata(&p.graph, &p.opts, inputs))
        .collect();
    let key_tensors: Vec<Vec<usize>> = views.iter().map(OutView::tensors).collect();
    let (outs, resumed) = Outputs::open(points, &out_tensors, metadata, &key_tensors, progress)?;
    let total_bytes: u64 = out_tensors
        .iter()
        .map(|t| (t.shape.iter().product::<usize>() * t.dtype.bitsize() / 8) as u64)
        .sum::<u64>()
        * outs.len() as u64;
    progress.start(total_bytes, planned.len());

    let input_bytes = bytes_read(&planned, rows);
    let read_before = inputs.bytes_read();
    let workers = Workers::<T>::new(threads, opts.non_finite.cleans());
    let found = crate::io::non_finite::Found::default();
    let out_dtype = opts.output_dtype;
    let written = std::sync::atomic::AtomicU64::new(0);
    let keys_done = std::sync::atomic::AtomicUsize::new(0);
    // Writes outputs `first..first + count` of one task, each sub-chunk's values of all of them
    // computed by one call of `compute` (one buffer per output).
    type Compute<'c, T> = dyn FnMut(&Range<usize>, &mut Scratch<T>) -> Result<Vec<Vec<T>>> + 'c;
    let write_outputs = |task: &Task,
                         row: &KeyRow,
                         first: usize,
                         count: usize,
                         compute: &mut Compute<T>|
     -> Result<()> {
        let len = task.range.len();
        let step = task.step;
        let mut non_finite = vec![0u64; count];
        workers.with(|s| -> Result<()> {
            let mut words = std::mem::take(&mut s.outs);
            if words.len() < count {
                words.resize_with(count, Vec::new);
            }
            let view = &views[task.key];
            let mut bytes: Vec<&mut [u8]> = words[..count]
                .iter_mut()
                .enumerate()
                .map(|(i, w)| {
                    let pos = view.file_pos(outs.file(first + i), task.range.start, out_size);
                    crate::io::input::line_matched_bytes(w, len * out_size, pos, out_size)
                })
                .collect();
            let mut at = task.range.start;
            while at < task.range.end {
                let r = at..(at + step).min(task.range.end);
                let bufs = compute(&r, s)?;
                if !s.bad.is_empty() {
                    // Rare: an input holds NaN or Inf; the key is handled after the others.
                    outs.hold(task.key);
                    if opts.non_finite == NonFinite::Error {
                        let m = s.bad[0] as usize;
                        return Err(Error::NonFinite {
                            path: graph.models[m].path.clone(),
                            key: row.name.clone(),
                            count: row.count_non_finite::<T>(m, models)?,
                        });
                    }
                    found.add(task.key, s.bad.drain(..).map(|m| m as usize));
                }
                let o = (r.start - task.range.start) * out_size;
                for ((buf, dst), nf) in bufs.iter().zip(&mut bytes).zip(&mut non_finite) {
                    let dst = &mut dst[o..o + r.len() * out_size];
                    out_dtype.encode(&buf[..r.len()], dst);
                    *nf += out_dtype.count_non_finite(dst);
                }
                s.free.extend(bufs);
                at = r.end;
            }
            let result = bytes.into_iter().enumerate().try_for_each(|(i, b)| {
                view.write(outs.file(first + i), task.range.start, out_size, b)
            });
            s.outs = words;
            if step > sub {
                // Buffers of a large unit are not kept for the small chunks that follow.
                s.free.retain(|b| b.len() <= sub);
                s.outs = Vec::new();
            }
            result
        })?;
        let bytes = (len * out_size) as u64;
        for (i, nf) in non_finite.into_iter().enumerate() {
            outs.wrote(first + i, task.key, bytes, nf)?;
            written.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    };
    // Computes one task of a key (of `row`: a key computed again without an input is given a
    // row without it).
    let run_task =
        |task: &Task, key: &PlannedKey<T>, row: &KeyRow, cache: Option<&KeyCache>| -> Result<()> {
            if opts.cancel.is_cancelled() {
                return Err(Error::Cancelled);
            }
            let Job::Compute { exprs, numel } = &key.job else {
                unreachable!("only computed keys become tasks")
            };
            match exprs {
                // Each output in turn, from the same inputs (held in memory when several).
                Exprs::Each(each) => {
                    for (k, expr) in each.iter().enumerate() {
                        write_outputs(task, row, k, 1, &mut |r, s| {
                            Ok(vec![eval(expr, row, r, models, cache, s)?])
                        })?;
                    }
                }
                // Every point at once, from the arguments evaluated once.
                Exprs::Points { args, state } => {
                    write_outputs(task, row, 0, state.points(), &mut |r, s| {
                        let bufs = eval_args(args, row, r, models, cache, s)?;
                        let mut outs: Vec<Vec<T>> =
                            (0..state.points()).map(|_| s.take(r.len())).collect();
                        {
                            let refs: Vec<&[T]> = bufs.iter().map(|b| &b[..r.len()]).collect();
                            let mut dst: Vec<&mut [T]> =
                                outs.iter_mut().map(|o| &mut o[..r.len()]).collect();
                            state.merge_chunk(r.clone(), &refs, &mut dst);
                        }
                        s.free.extend(bufs);
                        Ok(outs)
                    })?;
                }
            }
            let bytes = (task.range.len() * out_size * outs.len()) as u64;
            let done = if task.range.end == *numel {
                keys_done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
            } else {
                keys_done.load(std::sync::atomic::Ordering::Relaxed)
            };
            progress.advance(bytes, done, &row.name);
            Ok(())
        };
    // Runs the tasks gathered so far, then drops the state of their keys.
    let run_batch = |tasks: &mut Vec<Task>, planned: &mut [PlannedKey<T>]| -> Result<()> {
        tasks
            .par_iter()
            .try_for_each(|t| run_task(t, &planned[t.key], &rows[planned[t.key].row], None))?;
        for t in tasks.iter() {
            planned[t.key].job = Job::Done;
        }
        tasks.clear();
        Ok(())
    };
    // A key whose unit is larger than a sub-chunk is run on its own, with as many units in
    // flight as half the budget holds (at least one).
    let in_flight = |unit: usize| -> usize {
        let bytes = (unit * sub_bytes_per_elem + unit * out_size * together) as u64;
        ((opts.memory_budget / 2) / bytes.max(1)).max(1) as usize
    };

    // Keys with statistic passes (and units that fit a sub-chunk) run `STAT_KEYS` per thread at
    // once, each its passes and then its output: one key's passes alone leave threads idle
    // (most keys are a few blocks) and its output must wait for them. They share the budget.
    // The unfolded blocks of their passes share a quarter of the budget.
    let stat_keys = STAT_KEYS * threads;
    // Reads a key with statistic passes into memory when its inputs take at most half the
    // budget, so that its passes and its output read each input once; else it is streamed, once
    // per pass, and named in the report. The keys in flight together hold at most half the
    // budget (a key joins a group while the group's inputs fit): whether a key is held depends on
    // its size and the budget only, not on the threads.
    let streamed: std::sync::Mutex<Vec<String>> = Default::default();
    let buffers = Buffers::default();
    let hold_limit = opts.memory_budget / 2;
    let hold_key = |expr: &Exprs<T>, row: &KeyRow| -> Result<Option<KeyCache>> {
        let limit = hold_limit;
        let cache = read_key(expr, row, models, limit, &buffers)?;
        if cache.is_none() {
            streamed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(row.name.clone());
        }
        Ok(cache)
    };
    let run_stat_keys = |keys: &mut Vec<(usize, usize)>,
                         planned: &mut [PlannedKey<T>],
                         key_notes: &mut KeyNotes|
     -> Result<()> {
        let mut jobs: Vec<(usize, usize, PlannedKey<T>)> = keys
            .drain(..)
            .map(|(ki, unit)| {
                let job = std::mem::replace(&mut planned[ki].job, Job::Done);
                let row = planned[ki].row;
                (ki, unit, PlannedKey { row, job })
            })
            .collect();
        let notes: Vec<Vec<Vec<String>>> = jobs
            .par_iter_mut()
            .map(|(ki, unit, key)| -> Result<Vec<Vec<String>>> {
                let row = &rows[key.row];
                let Job::Compute { exprs: expr, numel } = &mut key.job else {
                    unreachable!("only computed keys have statistics")
                };
                let numel = *numel;
                let block = BLOCK.div_ceil(*unit) * *unit;
                let in_flight = (in_flight(block) / stat_keys).max(1);
                let cache = hold_key(expr, row)?;
                let at = StatRun {
                    row,
                    models,
                    cache: cache.as_ref(),
                    workers: &workers,
                    block,
                    in_flight,
                    stats_budget: opts.memory_budget / 4 / stat_keys as u64,
                };
                run_stats(expr, &at)?;
                let notes = expr.notes();
                outs.set_notes(*ki, &notes);
                if numel == 0 {
                    keys_done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                key_tasks(&sized, *ki, numel, *unit, false, true)
                    .par_iter()
                    .try_for_each(|t| run_task(t, key, row, cache.as_ref()))?;
                buffers.give_back(cache);
                Ok(notes)
            })
            .collect::<Result<_>>()?;
        for ((ki, _, key), notes) in jobs.iter().zip(notes) {
            key_notes.push((*ki, rows[key.row].name.clone(), notes));
        }
        Ok(())
    };

    // The elements of a key that are computed together.
    let key_unit = |ki: usize, expr: &Exprs<T>, row: &KeyRow| -> usize {
        let numel = row.numel();
        // A key written transposed, or read from a transposed input, is computed whole (the
        // transpose needs the whole tensor; read in parts, it would be decoded once per part).
        if matches!(views[ki], OutView::Transposed { .. }) || expr.reads_transposed(row) {
            numel.max(1)
        } else {
            expr.unit().min(numel.max(1))
        }
    };
    // Runs key `ki` on its own: its statistic passes, then its tasks, in groups of at most
    // `in_flight` units when its unit is large. Returns its notes.
    let run_alone =
        |ki: usize, key: &mut PlannedKey<T>, row: &KeyRow| -> Result<Vec<Vec<String>>> {
            let Job::Compute { exprs: expr, numel } = &mut key.job else {
                unreachable!("only computed keys run alone")
            };
            let numel = *numel;
            let unit = key_unit(ki, expr, row);
            let (large, has_stats) = (unit > sub, expr.has_stats());
            // Several outputs read a key's inputs once for all (when they fit).
            let cache = if has_stats || multi {
                hold_key(expr, row)?
            } else {
                None
            };
            if has_stats {
                let block = BLOCK.div_ceil(unit) * unit;
                let cache = cache.as_ref();
                let stats_budget = opts.memory_budget / 4;
                let at = StatRun {
                    row,
                    models,
                    cache,
                    workers: &workers,
                    block,
                    in_flight: in_flight(block),
                    stats_budget,
                };
                run_stats(expr, &at)?;
            }
            let notes = expr.notes();
            outs.set_notes(ki, &notes);
            if numel == 0 {
                keys_done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let tasks = key_tasks(&sized, ki, numel, unit, large, has_stats);
            let group = if large { in_flight(unit) } else { tasks.len() };
            for g in tasks.chunks(group.max(1)) {
                g.par_iter()
                    .try_for_each(|t| run_task(t, key, row, cache.as_ref()))?;
            }
            buffers.give_back(cache);
            Ok(notes)
        };

    // Keys are executed in name order. The tasks of keys without statistic passes are gathered
    // into one parallel batch; keys with statistic passes are gathered into groups (above), so
    // per-key statistics never accumulate over many keys.
    let mut tasks: Vec<Task> = Vec::new();
    let mut with_stats: Vec<(usize, usize)> = Vec::new();
    // The input bytes of the keys in `with_stats`.
    let mut group_bytes = 0u64;
    let mut key_notes: KeyNotes = Vec::new();
    let mut raw_buf = Vec::new();
    // Keys a killed run wrote already (see `crate::resume`).
    if !resumed.is_empty() {
        reports[0].notes.push(format!(
            "resumed: {} of {} keys were written by an interrupted run",
            resumed.len(),
            planned.len()
        ));
    }
    // The output bytes of key `ki`.
    let key_bytes = |ki: usize| -> u64 {
        key_tensors[ki]
            .iter()
            .map(|&t| outs.file(0).tensor_range(t))
            .map(|r| r.end - r.start)
            .sum()
    };
    let mut resumed_output_non_finite: BTreeMap<usize, u64> = BTreeMap::new();
    for (ki, record) in resumed {
        let name = &rows[planned[ki].row].name;
        key_notes.push((ki, name.clone(), vec![record.notes]));
        reports[0]
            .inputs_non_finite
            .extend(record.inputs_non_finite);
        if record.output_non_finite > 0 {
            resumed_output_non_finite.insert(ki, record.output_non_finite);
        }
        planned[ki].job = Job::Done;
        let bytes = key_bytes(ki);
        written.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        let done = keys_done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        progress.advance(bytes, done, name);
    }
    for ki in 0..planned.len() {
        if opts.cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        if matches!(planned[ki].job, Job::Done) {
            continue;
        }
        if let Job::CopyRaw { model, offset, len } = planned[ki].job {
            let name = &rows[planned[ki].row].name;
            let mut at = 0u64;
            while at < len {
                let n = (len - at).min(8 << 20) as usize;
                raw_buf.resize(n, 0u8);
                models[model].read_at(offset + at, &mut raw_buf)?;
                // Non-float keys are only renamed (e.g. position_ids).
                let esize = (rows[planned[ki].row].dtype().bitsize() / 8).max(1);
                for k in 0..outs.len() {
                    let mut bytes = raw_buf.clone();
                    views[ki].write(outs.file(k), at as usize / esize, esize, &mut bytes)?;
                }
                at += n as u64;
            }
            for k in 0..outs.len() {
                outs.wrote(k, ki, len, 0)?;
            }
            let len = len * outs.len() as u64;
            written.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
            let done = keys_done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            progress.advance(len, done, name);
            continue;
        }
        let row = &rows[planned[ki].row];
        let Job::Compute { exprs: expr, numel } = &planned[ki].job else {
            unreachable!()
        };
        let numel = *numel;
        let unit = key_unit(ki, expr, row);
        let large = unit > sub;
        let has_stats = expr.has_stats();
        // Keys with statistics, and every key of several outputs, are read once into memory
        // when they fit.
        if (has_stats || multi) && !large {
            let bytes = held_models(expr, row).1;
            if group_bytes + bytes > hold_limit && !with_stats.is_empty() {
                run_stat_keys(&mut with_stats, &mut planned, &mut key_notes)?;
                group_bytes = 0;
            }
            with_stats.push((ki, unit));
            group_bytes += bytes;
            if with_stats.len() == stat_keys {
                run_stat_keys(&mut with_stats, &mut planned, &mut key_notes)?;
                group_bytes = 0;
            }
            continue;
        }
        if large {
            run_batch(&mut tasks, &mut planned)?;
            run_stat_keys(&mut with_stats, &mut planned, &mut key_notes)?;
            group_bytes = 0;
            let job = std::mem::replace(&mut planned[ki].job, Job::Done);
            let mut key = PlannedKey {
                row: planned[ki].row,
                job,
            };
            let notes = run_alone(ki, &mut key, row)?;
            key_notes.push((ki, row.name.clone(), notes));
            continue;
        }
        let notes = expr.notes();
        outs.set_notes(ki, &notes);
        key_notes.push((ki, row.name.clone(), notes));
        if numel == 0 {
            keys_done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        tasks.extend(key_tasks(&sized, ki, numel, unit, false, false));
    }
    run_batch(&mut tasks, &mut planned)?;
    run_stat_keys(&mut with_stats, &mut planned, &mut key_notes)?;

    // Keys where an input holds NaN or Inf: computed again without it, or kept as written (see
    // `crate::io::non_finite`). Only these keys are read again.
    for (ki, mut bad) in found.take() {
        let original = &rows[planned[ki].row];
        let mut row = original.clone();
        let mut found_here: Vec<InputNonFinite> = Vec::new();
        while !bad.is_empty() {
            for m in bad {
                found_here.push(InputNonFinite {
                    key: row.name.clone(),
                    model: m,
                    count: original.count_non_finite::<T>(m, models)?,
                    omitted: opts.non_finite == NonFinite::Omit,
                });
                row.locs[m] = None;
            }
            if opts.non_finite == NonFinite::Keep {
                break;
            }
            // Without the models found so far; when no other model has the key, as it is.
            let first = row.locs.iter().position(Option::is_some);
            let redo = match first {
                Some(f) => {
                    row.first = f;
                    &row
                }
                None => {
                    found_here.iter_mut().for_each(|f| f.omitted = false);
                    workers.set_clean(false);
                    original
                }
            };
            let without: Vec<&str> = found_here
                .iter()
                .filter(|f| f.omitted)
                .map(|f| graph.models[f.model].name.as_str())
                .collect();
            progress.note(&if without.is_empty() {
                format!(
                    "key `{}`: no model has finite values; merged as they are",
                    row.name
                )
            } else {
                format!(
                    "key `{}`: NaN/Inf values; computed again without {}",
                    row.name,
                    without.join(", ")
                )
            });
            let mut jobs = Vec::with_capacity(points.len());
            for ((p, m), report) in points.iter().zip(&methods).zip(&mut reports) {
                let (job, action) = plan_key(&p.graph, redo, inputs.layout, m, &p.opts)?;
                report.actions[ki].1 = action;
                jobs.push(PlannedKey {
                    row: planned[ki].row,
                    job,
                });
            }
            // The key is written again: its bytes and its completion count once.
            written.fetch_sub(
                key_bytes(ki) * outs.len() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            keys_done.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            outs.restart(ki);
            outs.set_inputs_non_finite(ki, &found_here);
            let mut key = join_plans(
                jobs.into_iter().map(|j| vec![j]).collect(),
                swept_node(points),
            )?
            .pop()
            .expect("one key");
            let notes = run_alone(ki, &mut key, redo)?;
            key_notes.retain(|(k, _, _)| *k != ki);
            key_notes.push((ki, row.name.clone(), notes));
            bad = found.take().remove(&ki).unwrap_or_default();
            if first.is_none() {
                workers.set_clean(opts.non_finite.cleans());
                break;
            }
        }
        outs.set_inputs_non_finite(ki, &found_here);
        outs.release(ki);
        for report in &mut reports {
            report.inputs_non_finite.extend(found_here.iter().cloned());
        }
    }
    // Notes in key order, whichever group ran a key.
    key_notes.sort_by_key(|(ki, _, _)| *ki);
    let written = written.load(std::sync::atomic::Ordering::Relaxed) / outs.len() as u64;
    let read = inputs.bytes_read() - read_before;
    let streamed = streamed.into_inner().unwrap_or_else(|e| e.into_inner());
    for (k, report) in reports.iter_mut().enumerate() {
        for ki in 0..planned.len() {
            let n =
                outs.output_non_finite(k, ki) + resumed_output_non_finite.get(&ki).unwrap_or(&0);
            if n > 0 {
                report
                    .outputs_non_finite
                    .push((rows[planned[ki].row].name.clone(), n));
            }
        }
        report
            .inputs_non_finite
            .sort_by(|a, b| (&a.key, a.model).cmp(&(&b.key, b.model)));
        for (_, name, notes) in &key_notes {
            let notes = notes.get(k).or(notes.first()).into_iter().flatten();
            report
                .key_notes
                .extend(notes.map(|n| (name.clone(), n.clone())));
        }
        report.input_bytes = input_bytes;
        report.bytes_written = written;
        // The inputs were read for all outputs together: each report counts the one read.
        report.bytes_read = read;
        if !streamed.is_empty() {
            report.notes.push(format!(
                "{} keys were read once per pass or per output (their inputs take more than half of --memory-budget): {}{}",
                streamed.len(),
                streamed[..streamed.len().min(4)].join(", "),
                if streamed.len() > 4 { ", ..." } else { "" }
            ));
        }
    }
    let paths = outs.commit()?;
    progress.finish();
    for (report, path) in reports.iter_mut().zip(paths) {
        report.output = Some(path);
        report.elapsed = started.elapsed();
        report.peak_rss_bytes = crate::report::peak_rss_bytes();
    }
    Ok(reports)
}

/// Each key's notes, per output.
type KeyNotes = Vec<(usize, String, Vec<Vec<String>>)>;
