//! Engine unit tests: statistic passes, blocks and chunking.

use super::*;
use crate::method::Pass;
use std::sync::Mutex;

/// A method with one statistic pass: the L2 norm of each argument, then `out = a / ‖a‖`.
/// Records the block ranges it was given.
struct Normalize {
    norm: f64,
    seen: std::sync::Arc<Mutex<Vec<Range<usize>>>>,
}

/// The pass: a block's squared norm, tagged with where the block starts.
struct SquaredNorm<'a> {
    seen: &'a Mutex<Vec<Range<usize>>>,
    total: f64,
    next: usize,
}

impl Pass<f32> for SquaredNorm<'_> {
    type Block = (usize, f64);
    fn block_bytes(&self, _len: usize) -> usize {
        16
    }
    fn block(&self, range: Range<usize>, args: &[&[f32]]) -> (usize, f64) {
        self.seen.lock().unwrap().push(range.clone());
        let s = args[0].iter().map(|&x| x as f64 * x as f64).sum();
        (range.start, s)
    }
    fn fold(&mut self, (start, s): (usize, f64)) {
        assert_eq!(start, self.next, "blocks arrive in order");
        self.next += BLOCK;
        self.total += s;
    }
}

impl KeyMerge<f32> for Normalize {
    fn stat_passes(&self) -> usize {
        1
    }
    fn run_passes(&mut self, passes: &mut Passes<f32>) -> Result<()> {
        let seen = self.seen.clone();
        let pass = passes.run(SquaredNorm {
            seen: &seen,
            total: 0.0,
            next: 0,
        })?;
        self.norm = pass.total.sqrt();
        Ok(())
    }
    fn merge_chunk(&self, _range: Range<usize>, args: &[&[f32]], out: &mut [f32]) {
        for (o, &x) in out.iter_mut().zip(args[0]) {
            *o = (x as f64 / self.norm) as f32;
        }
    }
}

#[test]
fn statistic_passes_see_every_block_in_order_whatever_the_threads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.safetensors");
    let n = 40 * BLOCK + 123;
    let values: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
        .collect();
    let out = OutputFile::create(
        &path,
        &[OutputTensor {
            name: "w".into(),
            dtype: safetensors::Dtype::F32,
            shape: vec![n],
        }],
        HashMap::new(),
        false,
    )
    .unwrap();
    let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
    out.write_at(0, 0, &bytes).unwrap();
    out.commit().unwrap();

    let mut model = ModelFile::open(&path).unwrap();
    let mut table = KeyTable {
        rows: BTreeMap::new(),
        n: 1,
        layouts: Vec::new(),
        notes: Vec::new(),
    };
    table
        .add(0, &model, None, &[path.as_path()], false)
        .unwrap();
    model.forget_index();
    let rows: Vec<KeyRow> = table.rows.into_values().collect();
    let models = vec![model];

    // Per-block sums, added in block order.
    let want_norm = values
        .chunks(BLOCK)
        .map(|b| b.iter().map(|&x| x as f64 * x as f64).sum::<f64>())
        .fold(0.0, |a, b| a + b)
        .sqrt();
    let mut results = Vec::new();
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let mut expr = Expr::Node(Box::new(NodeExpr {
            node: 0,
            state: Box::new(Normalize {
                norm: 0.0,
                seen: seen.clone(),
            }),
            args: vec![Expr::Leaf(Leaf::new(&rows[0], 0))],
        }));
        let workers = Workers::new(threads, true);
        pool.install(|| {
            let at = StatRun {
                row: &rows[0],
                models: &models,
                cache: None,
                workers: &workers,
                block: BLOCK,
                in_flight: usize::MAX,
                stats_budget: u64::MAX,
            };
            run_expr_stats(&mut expr, &at)
        })
        .unwrap();
        // Sub-chunks of two different lengths give the same values.
        for step in [1000, 4 * BLOCK] {
            let mut got = Vec::new();
            let mut s = Scratch::new(true);
            for start in (0..n).step_by(step) {
                let r = start..(start + step).min(n);
                let buf = eval(&expr, &rows[0], &r, &models, None, &mut s).unwrap();
                got.extend_from_slice(&buf[..r.len()]);
            }
            results.push(got);
        }
        let mut seen = std::mem::take(&mut *seen.lock().unwrap());
        seen.sort_by_key(|r| r.start);
        let want: Vec<Range<usize>> = (0..n)
            .step_by(BLOCK)
            .map(|s| s..(s + BLOCK).min(n))
            .collect();
        assert_eq!(seen, want);
    }
    let want: Vec<f32> = values
        .iter()
        .map(|&x| (x as f64 / want_norm) as f32)
        .collect();
    for r in &results {
        assert_eq!(r, &want);
    }
}
