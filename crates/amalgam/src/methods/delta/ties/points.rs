//! Several points of the pipeline computed together: the outputs of a sweep of its parameters.
//!
//! Each statistic pass runs once for all the points, on the arguments decoded once. What does
//! not depend on the swept parameters is computed once: the rank histograms of DELLA's estimated
//! ranks (they count |δ|, whatever `p` and `della_eps`), and each trim digit's dropped deltas
//! once per drop setting, its histogram once per distinct selection (the first digit of every
//! `k` is the same histogram). The output computes every point's merge from the same chunk.
//! Each point's bytes are those of its merge alone: the points run the single pipeline's
//! stages, only fewer times.

use super::*;

/// The pipeline's states of one key, one per point.
pub(super) struct PipelinePoints<T> {
    pub(super) points: Vec<KeyPipeline<T>>,
}

/// A key's states, one per point.
type States<T> = Vec<Box<dyn KeyMerge<T>>>;

/// Joins the states of a key's points into a [`PipelinePoints`] when they are all the pipeline's
/// (they are the points of one node, so they are all of one method); gives them back otherwise.
pub(crate) fn merge_points<T: Real>(
    states: States<T>,
) -> std::result::Result<Box<dyn KeyMergePoints<T>>, States<T>> {
    // `(**s)`: the state's own type, not the box's.
    if !states.iter().all(|s| (**s).as_any().is::<KeyPipeline<T>>()) {
        return Err(states);
    }
    let points = states
        .into_iter()
        .map(|s| *s.into_any().downcast::<KeyPipeline<T>>().expect("checked"))
        .collect();
    Ok(Box::new(PipelinePoints { points }))
}

/// The statistics of several points' pipelines over the same blocks: one pass.
struct Joint<'a, T, S> {
    members: Vec<PipelinePass<'a, T, S>>,
}

impl<T: Real, S: Stat<T>> Joint<'_, T, S> {
    /// Whether the members draw the same random numbers more than once: they are then drawn
    /// once per block (the points of a key share the seed, the key and the models' streams).
    fn shares_draws(&self) -> bool {
        self.members
            .iter()
            .filter(|m| m.key.draws_randomly())
            .count()
            > 1
    }
    /// The members that compute DELLA's exact masks in this pass.
    fn ranking(&self) -> impl Iterator<Item = &PipelinePass<'_, T, S>> {
        self.members
            .iter()
            .filter(|m| m.masks.is_some() && m.key.della.as_ref().is_some_and(|d| d.exact))
    }
    /// Whether several members rank the same units exactly: the ranks and draws are then
    /// computed once per block.
    fn shares_ranks(&self) -> bool {
        let mut units = self.ranking().map(|m| m.key.della.as_ref().map(|d| d.unit));
        match units.next() {
            Some(first) => {
                let rest: Vec<_> = units.collect();
                !rest.is_empty() && rest.iter().all(|u| *u == first)
            }
            None => false,
        }
    }
}

impl<T: Real, S: Stat<T>> Pass<T> for Joint<'_, T, S> {
    type Block = Vec<(Option<KeepBits>, S::Block)>;
    fn block_bytes(&self, len: usize) -> usize {
        let n = self.members[0].key.streams.len();
        let draws = if self.shares_draws() { n * len * 2 } else { 0 };
        let ranks = if self.shares_ranks() { n * len * 6 } else { 0 };
        draws
            + ranks
            + self
                .members
                .iter()
                .map(|m| Pass::<T>::block_bytes(m, len))
                .sum::<usize>()
    }
    fn block(&self, range: Range<usize>, args: &[&[T]]) -> Self::Block {
        let draws = self
            .shares_draws()
            .then(|| self.members[0].key.draws(&range));
        let ranks = self.shares_ranks().then(|| {
            let m = self.ranking().next().expect("a member ranks");
            let d = m.key.della.as_ref().expect("DELLA");
            m.key.exact_ranks(d, &range, args)
        });
        self.members
            .iter()
            .map(|m| {
                let shared = Shared {
                    draws: draws.as_deref().filter(|_| m.key.draws_randomly()),
                    ranks: ranks.as_ref().filter(|_| {
                        m.masks.is_some() && m.key.della.as_ref().is_some_and(|d| d.exact)
                    }),
                };
                m.block_with(range.clone(), args, shared)
            })
            .collect()
    }
    fn fold(&mut self, block: Self::Block) {
        for (m, b) in self.members.iter_mut().zip(block) {
            Pass::<T>::fold(m, b);
        }
    }
}

/// Whether two points' deltas are the same after the drop (the trim's histograms count those):
/// the same drop, the same DELLA ranking, the same per-element rescale.
fn same_drop<T: Real>(a: &KeyPipeline<T>, b: &KeyPipeline<T>) -> bool {
    let della = |k: &KeyPipeline<T>| k.della.as_ref().map(|d| (d.exact, d.unit, d.cache_masks));
    let per_element = |k: &KeyPipeline<T>| k.config.rescale == Rescale::PerElement;
    a.config.drop == b.config.drop && della(a) == della(b) && per_element(a) == per_element(b)
}

impl<T: Real> PipelinePoints<T> {
    /// Runs statistic `stats[i]` of point `who[i]`, all in one pass (a point's first pass with
    /// cached DELLA masks computes them).
    fn run_joint<S: Stat<T>>(
        &mut self,
        passes: &mut Passes<T>,
        who: &[usize],
        stats: Vec<S>,
    ) -> Result<Vec<S>> {
        let members = who
            .iter()
            .zip(stats)
            .map(|(&i, stat)| {
                let key = &self.points[i];
                PipelinePass {
                    key,
                    stat,
                    masks: key.mask_buffers(),
                }
            })
            .collect();
        let Joint { members } = passes.run(Joint { members })?;
        let done: Vec<(S, Option<Vec<Vec<u64>>>)> =
            members.into_iter().map(|m| (m.stat, m.masks)).collect();
        Ok(who
            .iter()
            .zip(done)
            .map(|(&i, (stat, masks))| {
                if let Some(masks) = masks {
                    self.points[i].della.as_mut().expect("DELLA").masks = masks;
                }
                stat
            })
            .collect())
    }

    /// The points for which `wanted` holds.
    fn which(&self, wanted: impl Fn(&KeyPipeline<T>) -> bool) -> Vec<usize> {
        (0..self.points.len())
            .filter(|&i| wanted(&self.points[i]))
            .collect()
    }

    /// Trim digit `digit` of the points that trim: per group of points with the same drop, the
    /// dropped deltas once and each distinct selection's histogram once.
    fn trim_digit(&mut self, passes: &mut Passes<T>, digit: usize) -> Result<()> {
        let trimming = self.which(|p| p.trim_passes > digit);
        // Groups of points with the same drop: (representative, members).
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for &i in &trimming {
            match groups
                .iter_mut()
                .find(|(r, _)| same_drop(&self.points[*r], &self.points[i]))
            {
                Some((_, members)) => members.push(i),
                None => groups.push((i, vec![i])),
            }
        }
        // Per group, its distinct selections and which one each member has.
        let mut stats = Vec::with_capacity(groups.len());
        let mut chosen: Vec<Vec<usize>> = Vec::with_capacity(groups.len());
        for (_, members) in &groups {
            let mut distinct: Vec<Vec<u64>> = Vec::new();
            let mut of = Vec::with_capacity(members.len());
            for &i in members {
                let prefixes = self.points[i].prefixes();
                let at = distinct.iter().position(|d| *d == prefixes);
                of.push(at.unwrap_or_else(|| {
                    distinct.push(prefixes);
                    distinct.len() - 1
                }));
            }
            stats.push(TrimDigits::new(digit, distinct));
            chosen.push(of);
        }
        let heads: Vec<usize> = groups.iter().map(|(r, _)| *r).collect();
        let done = self.run_joint(passes, &heads, stats)?;
        for (((head, members), of), stat) in groups.iter().zip(chosen).zip(done) {
            for (&i, j) in members.iter().zip(of) {
                self.share_masks(*head, i);
                self.points[i].resolve_digit(digit, &stat.counts[j]);
            }
        }
        Ok(())
    }

    /// Gives point `to` the DELLA masks `from` computed, when `to` caches masks it has not
    /// computed (their drops are the same).
    fn share_masks(&mut self, from: usize, to: usize) {
        let wants = self.points[to]
            .della
            .as_ref()
            .is_some_and(|d| d.cache_masks && d.masks.is_empty());
        if from != to && wants {
            let masks = self.points[from].della.as_ref().map(|d| d.masks.clone());
            if let (Some(d), Some(masks)) = (self.points[to].della.as_mut(), masks) {
                d.masks = masks;
            }
        }
    }
}

impl<T: Real> KeyMergePoints<T> for PipelinePoints<T> {
    fn points(&self) -> usize {
        self.points.len()
    }

    fn stat_passes(&self) -> usize {
        let any = |f: &dyn Fn(&KeyPipeline<T>) -> bool| usize::from(self.points.iter().any(f));
        any(&|p| p.histogram_passes() > 0)
            + self.points.iter().map(|p| p.trim_passes).max().unwrap_or(0)
            + any(&|p| p.config.rescale == Rescale::L1)
            + any(&|p| p.config.gram_pass())
    }

    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()> {
        // The rank histograms count |δ| (the same for every point): once, then each point
        // finishes its own with its `della_eps`.
        let ranking = self.which(|p| p.histogram_passes() > 0);
        if let Some(&first) = ranking.first() {
            let n = self.points[first].streams.len();
            let hist = (0..n).map(|_| RankHistogram::new()).collect();
            let counted = self.run_joint(passes, &[first], vec![RankCounts { hist }])?;
            let hist = counted.into_iter().next().expect("one").hist;
            for &i in &ranking {
                self.points[i].take_histograms(hist.clone());
            }
        }
        let digits = self.points.iter().map(|p| p.trim_passes).max().unwrap_or(0);
        for digit in 0..digits {
            self.trim_digit(passes, digit)?;
        }
        let l1 = self.which(|p| p.config.rescale == Rescale::L1);
        if !l1.is_empty() {
            let stats = l1.iter().map(|_| L1Sums { sums: Vec::new() }).collect();
            for (&i, s) in l1.iter().zip(self.run_joint(passes, &l1, stats)?) {
                self.points[i].take_l1_sums(&s.sums);
            }
        }
        let gram = self.which(|p| p.config.gram_pass());
        if !gram.is_empty() {
            // The points share what the engine allows for kept bits.
            let allowance = passes.allowance() / gram.len() as u64;
            let stats = gram
                .iter()
                .map(|&i| self.points[i].gram_stat(allowance))
                .collect();
            for (&i, g) in gram.iter().zip(self.run_joint(passes, &gram, stats)?) {
                self.points[i].take_gram(g);
            }
        }
        Ok(())
    }

    fn unit(&self) -> Unit {
        joint_unit(self.points.iter().map(|p| p.unit()))
    }

    fn notes(&self) -> Vec<Vec<String>> {
        self.points.iter().map(|p| p.notes()).collect()
    }

    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], outs: &mut [&mut [T]]) {
        for (p, out) in self.points.iter().zip(outs) {
            p.merge_chunk(range.clone(), args, out);
        }
    }
}
