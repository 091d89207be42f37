//! The key table: the union of the inputs' keys, where each model stores each key, and how
//! (plain, stacked, transposed, a LoRA module's delta); decoding a key's elements.

use super::*;

/// Where one model stores one key, and how (as a model's keys are listed).
#[derive(Clone, Copy, Debug)]
pub(super) struct Place {
    pub(super) offset: u64,
    pub(super) dtype: safetensors::Dtype,
    pub(super) view: View,
}

/// Where one model stores one key, as the key table holds it: 16 bytes, since the table has one
/// per key and model. A view other than [`View::Plain`] is in the row's `views`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Loc {
    pub(super) offset: u64,
    /// Index in [`KeyRow::views`], or [`PLAIN`].
    pub(super) view: u32,
    pub(super) dtype: safetensors::Dtype,
}

/// [`Loc::view`] of a key stored as is.
pub(super) const PLAIN: u32 = u32::MAX;

const _: () = assert!(std::mem::size_of::<Option<Loc>>() == 16);

/// How a key's elements are laid out in a file saved in another key format (see [`formats`](crate::layout::formats)).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum View {
    /// Stored as is.
    Plain,
    /// Three tensors of `part` elements each, stacked (the first at `offset`).
    Concat3 { part: u64, second: u64, third: u64 },
    /// Stored transposed: the file's tensor is `[rows, cols]`.
    Transposed { rows: u64, cols: u64 },
    /// The delta of LoRA modules: `scale · up · down` of each module of entry `i` of the row's
    /// `lora`, stacked along the rows (one module for most keys; q, k and v for a fused one).
    Lora(u32),
}

/// Where the two factors of a LoRA module are and how they combine.
#[derive(Clone, Debug)]
pub(super) struct LoraSpec {
    pub(super) up: u64,
    pub(super) up_dtype: FloatDtype,
    pub(super) down: u64,
    pub(super) down_dtype: FloatDtype,
    /// `up` is `[out, rank]`, `down` is `[rank, inner]` (inner = in · kh · kw).
    pub(super) out: usize,
    pub(super) rank: usize,
    pub(super) inner: usize,
    /// `alpha / rank`.
    pub(super) scale: f64,
}

impl LoraSpec {
    /// Elements `start..start + dst.len()` of `scale · up · down`.
    fn delta<T: Real>(
        &self,
        model: &ModelFile,
        start: usize,
        dst: &mut [T],
        scratch: &mut Vec<u64>,
    ) -> Result<()> {
        let mut up = vec![T::ZERO; self.out * self.rank];
        let mut down = vec![T::ZERO; self.rank * self.inner];
        model.decode(self.up, self.up_dtype, 0, &mut up, scratch)?;
        model.decode(self.down, self.down_dtype, 0, &mut down, scratch)?;
        let scale = T::from_f64(self.scale);
        for (k, d) in dst.iter_mut().enumerate() {
            let e = start + k;
            let (o, c) = (e / self.inner, e % self.inner);
            let mut sum = T::ZERO;
            for r in 0..self.rank {
                sum += up[o * self.rank + r] * down[r * self.inner + c];
            }
            *d = sum * scale;
        }
        Ok(())
    }
}

impl Loc {
    /// Decodes elements `start..start + dst.len()` of the key of `row`; returns whether they
    /// are all finite (checked as they are decoded, see [`crate::io::non_finite`]).
    pub(super) fn read<T: Real>(
        &self,
        row: &KeyRow,
        model: &ModelFile,
        start: usize,
        dst: &mut [T],
        scratch: &mut Vec<u64>,
    ) -> Result<bool> {
        let dtype = FloatDtype::from_safetensors(self.dtype).expect("float key");
        match row.view(self) {
            View::Lora(i) => {
                // The modules' elements in order: module `p` covers its `out · inner` elements.
                let (mut first, mut at) = (0, 0);
                for sp in &row.lora[i as usize] {
                    let len = sp.out * sp.inner;
                    let (lo, hi) = (start.max(first), (start + dst.len()).min(first + len));
                    if lo < hi {
                        let part = &mut dst[at..at + (hi - lo)];
                        sp.delta(model, lo - first, part, scratch)?;
                        at += hi - lo;
                    }
                    first += len;
                }
                Ok(crate::io::non_finite::all_finite(dst))
            }
            View::Plain => model.decode_checked(self.offset, dtype, start, dst, scratch),
            View::Concat3 {
                part,
                second,
                third,
            } => {
                let part = part as usize;
                let offsets = [self.offset, second, third];
                let (mut at, mut finite) = (0, true);
                while at < dst.len() {
                    let e = start + at;
                    let within = e % part;
                    let n = (part - within).min(dst.len() - at);
                    finite &= model.decode_checked(
                        offsets[e / part],
                        dtype,
                        within,
                        &mut dst[at..at + n],
                        scratch,
                    )?;
                    at += n;
                }
                Ok(finite)
            }
            View::Transposed { rows, cols } => {
                let (rows, cols) = (rows as usize, cols as usize);
                let mut full = vec![T::ZERO; rows * cols];
                model.decode(self.offset, dtype, 0, &mut full, scratch)?;
                for (k, d) in dst.iter_mut().enumerate() {
                    let e = start + k;
                    *d = full[(e % rows) * cols + e / rows];
                }
                Ok(crate::io::non_finite::all_finite(dst))
            }
        }
    }
}

/// One key of the union of the inputs' keys.
#[derive(Clone)]
pub(super) struct KeyRow {
    pub(super) name: String,
    pub(super) shape: Vec<usize>,
    /// The first model (in input order) that has the key.
    pub(super) first: usize,
    /// Per model, where it stores the key.
    pub(super) locs: Vec<Option<Loc>>,
    /// The LoRA modules of the inputs that are LoRA files (see [`View::Lora`]).
    pub(super) lora: Vec<Vec<LoraSpec>>,
    /// The views of the locations that are not plain.
    pub(super) views: Vec<View>,
}

impl KeyRow {
    /// The number of NaN and Inf values in model `m`'s tensor for the key of `row` (one read of it).
    pub(super) fn count_non_finite<T: Real>(&self, m: usize, models: &[ModelFile]) -> Result<u64> {
        let row = self;
        let loc = row.locs[m].expect("model has the key");
        let numel = row.numel();
        // Views that decode the whole tensor for any part are read whole.
        let step = match row.view(&loc) {
            View::Plain | View::Concat3 { .. } => BLOCK.min(numel).max(1),
            _ => numel.max(1),
        };
        let (mut buf, mut raw) = (vec![T::ZERO; step], Vec::new());
        let mut n = 0;
        for start in (0..numel).step_by(step) {
            let len = step.min(numel - start);
            loc.read(row, &models[m], start, &mut buf[..len], &mut raw)?;
            n += crate::io::non_finite::count(&buf[..len]);
        }
        Ok(n)
    }

    pub(super) fn view(&self, loc: &Loc) -> View {
        if loc.view == PLAIN {
            View::Plain
        } else {
            self.views[loc.view as usize]
        }
    }
    /// Files `place` as input `i`'s location of the key.
    pub(super) fn locate(&mut self, i: usize, place: Place) {
        let view = if place.view == View::Plain {
            PLAIN
        } else {
            self.views.push(place.view);
            (self.views.len() - 1) as u32
        };
        self.locs[i] = Some(Loc {
            offset: place.offset,
            view,
            dtype: place.dtype,
        });
    }
    pub(super) fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub(super) fn dtype(&self) -> safetensors::Dtype {
        self.locs[self.first].unwrap().dtype
    }
    pub(super) fn is_float(&self) -> bool {
        FloatDtype::from_safetensors(self.dtype()).is_some()
    }
}

/// Builds the union of the inputs' keys, in name order, from each header as the input is
/// opened; the header is then dropped, so memory per input is 16 bytes per key.
pub(super) struct KeyTable {
    pub(super) rows: BTreeMap<String, KeyRow>,
    pub(super) n: usize,
    pub(super) layouts: Vec<Option<Layout>>,
    /// Lines for the report about how inputs were read.
    pub(super) notes: Vec<String>,
}

impl KeyTable {
    /// Adds the keys of input `i`, read as the original layout when it was saved in another key
    /// format (`layout`); with `exchange_ema`, each weight under its EMA copy's name and the
    /// copy under the weight's.
    pub(super) fn add(
        &mut self,
        i: usize,
        model: &ModelFile,
        layout: Option<Layout>,
        paths: &[&Path],
        exchange_ema: bool,
    ) -> Result<()> {
        let mut viewed = viewed_keys(model, layout, paths[i])?;
        if exchange_ema {
            let names = crate::methods::structural::exchange_ema::exchanged_names(
                viewed.keys.iter().map(|k| (k.0.as_str(), k.1.as_slice())),
            )
            .map_err(|e| Error::Invalid(format!("{}: {e}", paths[i].display())))?;
            for key in &mut viewed.keys {
                if let Some(to) = names.get(&key.0) {
                    key.0 = to.clone();
                }
            }
        }
        self.notes.extend(viewed.notes);
        for (name, shape, loc, lora) in viewed.keys {
            let inserted = self.insert(i, &name, shape, loc, lora, paths);
            if let Err(Error::ShapeMismatch { .. }) = &inserted {
                let first = self.rows[&name].first;
                if let Some(e) =
                    mixed_archs(paths, (first, self.layouts[first]), (i, viewed.layout))
                {
                    return Err(e);
                }
            }
            inserted?;
        }
        self.layouts.push(viewed.layout);
        Ok(())
    }

    pub(super) fn insert(
        &mut self,
        i: usize,
        name: &str,
        shape: Vec<usize>,
        mut loc: Place,
        lora: Option<Vec<LoraSpec>>,
        paths: &[&Path],
    ) -> Result<()> {
        {
            let e_dtype = loc.dtype;
            if let Some(why) = crate::io::dtype::unsupported_float(e_dtype) {
                return Err(Error::UnsupportedDtype {
                    path: paths[i].to_path_buf(),
                    key: name.to_string(),
                    dtype: format!("{} ({why})", dtype_name(e_dtype)),
                });
            }
            let float = FloatDtype::from_safetensors(e_dtype).is_some();
            match self.rows.get_mut(name) {
                None => {
                    let mut specs = Vec::new();
                    if let Some(spec) = lora {
                        loc.view = View::Lora(0);
                        specs.push(spec);
                    }
                    let mut row = KeyRow {
                        name: name.to_string(),
                        shape,
                        first: i,
                        locs: vec![None; self.n],
                        lora: specs,
                        views: Vec::new(),
                    };
                    row.locate(i, loc);
                    self.rows.insert(name.to_string(), row);
                }
                Some(row) => {
                    if let Some(spec) = lora {
                        loc.view = View::Lora(row.lora.len() as u32);
                        row.lora.push(spec);
                    }
                    if row.shape != shape {
                        return Err(Error::ShapeMismatch {
                            key: name.to_string(),
                            first_path: paths[row.first].to_path_buf(),
                            first_shape: row.shape.clone(),
                            second_path: paths[i].to_path_buf(),
                            second_shape: shape,
                        });
                    }
                    if float != row.is_float() {
                        return Err(Error::Invalid(format!(
                            "key `{name}` is {} in {} but {} in {}",
                            dtype_name(row.dtype()),
                            paths[row.first].display(),
                            dtype_name(e_dtype),
                            paths[i].display()
                        )));
                    }
                    row.locate(i, loc);
                }
            }
        }
        Ok(())
    }
}

/// The error for a shape mismatch between inputs `a` and `b` (index, detected layout) when
/// their architectures differ: that, not the first key's shape, is what is wrong.
pub(super) fn mixed_archs(
    paths: &[&Path],
    a: (usize, Option<Layout>),
    b: (usize, Option<Layout>),
) -> Option<Error> {
    let (Some(la), Some(lb)) = (a.1, b.1) else {
        return None;
    };
    let name = |l: Layout| match l.arch() {
        crate::layout::arch::Arch::Sd1 => "SD1",
        crate::layout::arch::Arch::Sdxl => "SDXL",
        crate::layout::arch::Arch::Sd3 => "SD3",
        crate::layout::arch::Arch::Flux => "FLUX",
    };
    (la.arch() != lb.arch()).then(|| {
        Error::Invalid(format!(
            "{} is {} ({la}) but {} is {} ({lb}): models of different architectures cannot be merged",
            paths[a.0].display(),
            name(la),
            paths[b.0].display(),
            name(lb)
        ))
    })
}
