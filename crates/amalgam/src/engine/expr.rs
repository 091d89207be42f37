//! The expression that computes one key: methods applied to inputs' tensors.

use super::*;

/// How one key is computed.
pub(super) enum Expr<T: Real> {
    Leaf(Leaf),
    Node(Box<NodeExpr<T>>),
}

/// A method applied to its arguments for one key.
pub(super) struct NodeExpr<T: Real> {
    /// The graph node (its index).
    pub(super) node: usize,
    pub(super) state: Box<dyn KeyMerge<T>>,
    pub(super) args: Vec<Expr<T>>,
}

impl<T: Real> Expr<T> {
    /// Inputs read and intermediate buffers held per element of a chunk.
    pub(super) fn cost(&self) -> (usize, usize) {
        match self {
            Expr::Leaf(_) => (1, 0),
            Expr::Node(node) => node.args.iter().fold((0, 1), |(l, n), a| {
                let (al, an) = a.cost();
                (l + al, n + an)
            }),
        }
    }
    pub(super) fn has_stats(&self) -> bool {
        match self {
            Expr::Leaf(_) => false,
            Expr::Node(node) => {
                node.state.stat_passes() > 0 || node.args.iter().any(|a| a.has_stats())
            }
        }
    }
    /// The elements that must stay together: the least common multiple of the nodes' units.
    pub(super) fn unit(&self) -> usize {
        match self {
            Expr::Leaf(_) => 1,
            Expr::Node(node) => node
                .args
                .iter()
                .fold(node.state.unit().len.max(1), |u, a| lcm(u, a.unit())),
        }
    }
    /// Whether a leaf reads the key transposed from its file.
    pub(super) fn reads_transposed(&self, row: &KeyRow) -> bool {
        match self {
            Expr::Leaf(l) => matches!(row.view(&l.loc(row)), View::Transposed { .. }),
            Expr::Node(node) => node.args.iter().any(|a| a.reads_transposed(row)),
        }
    }
    /// The models its leaves read (with repeats).
    pub(super) fn leaf_models(&self, out: &mut Vec<usize>) {
        match self {
            Expr::Leaf(l) => out.push(l.model as usize),
            Expr::Node(node) => node.args.iter().for_each(|a| a.leaf_models(out)),
        }
    }
    /// The notes of every node, children first.
    pub(super) fn notes(&self, out: &mut Vec<String>) {
        if let Expr::Node(node) = self {
            for a in &node.args {
                a.notes(out);
            }
            out.extend(node.state.notes());
        }
    }
}

pub(super) use crate::method::lcm;

/// Where one input's tensor lies.
#[derive(Clone, Copy, Debug)]
pub(super) struct Leaf {
    pub(super) model: u32,
}

impl Leaf {
    pub(super) fn new(row: &KeyRow, model: usize) -> Self {
        debug_assert!(row.locs[model].is_some());
        Leaf {
            model: model as u32,
        }
    }
    /// Where this leaf's model stores the key of `row`.
    pub(super) fn loc(&self, row: &KeyRow) -> Loc {
        row.locs[self.model as usize].expect("model has the key")
    }
    /// The float dtype it is stored in.
    pub(super) fn dtype(&self, row: &KeyRow) -> FloatDtype {
        FloatDtype::from_safetensors(self.loc(row).dtype).expect("float key")
    }
}

/// How one key is computed for each output of the run (a sweep has several, all reading the
/// same inputs).
pub(super) enum Exprs<T: Real> {
    /// One expression per output, each evaluated on its own.
    Each(Vec<Expr<T>>),
    /// The outputs are the points of one node (a sweep of the output node's parameters): its
    /// arguments, evaluated once for all the points, and the points' joint state.
    Points {
        args: Vec<Expr<T>>,
        state: Box<dyn KeyMergePoints<T>>,
    },
}

impl<T: Real> Exprs<T> {
    /// The outputs a task encodes at once: one at a time, or every point.
    pub(super) fn written_together(&self) -> usize {
        match self {
            Exprs::Each(_) => 1,
            Exprs::Points { state, .. } => state.points(),
        }
    }
    /// The expressions whose leaves are read: every output's, or the points' arguments.
    pub(super) fn read(&self) -> &[Expr<T>] {
        match self {
            Exprs::Each(e) | Exprs::Points { args: e, .. } => e,
        }
    }
    /// Inputs read and intermediate buffers held per element of a chunk: the outputs of `Each`
    /// are computed one after the other, so the most any of them holds; the points hold their
    /// arguments and every point's output at once.
    pub(super) fn cost(&self) -> (usize, usize) {
        match self {
            Exprs::Each(e) => e.iter().fold((1, 0), |(l, n), e| {
                let (el, en) = e.cost();
                (l.max(el), n.max(en))
            }),
            Exprs::Points { args, state } => args.iter().fold((0, state.points()), |(l, n), a| {
                let (al, an) = a.cost();
                (l + al, n + an)
            }),
        }
    }
    pub(super) fn has_stats(&self) -> bool {
        match self {
            Exprs::Points { state, .. } if state.stat_passes() > 0 => true,
            _ => self.read().iter().any(Expr::has_stats),
        }
    }
    /// The least common multiple of every output's unit.
    pub(super) fn unit(&self) -> usize {
        let u = match self {
            Exprs::Each(_) => 1,
            Exprs::Points { state, .. } => state.unit().len.max(1),
        };
        self.read().iter().fold(u, |u, e| lcm(u, e.unit()))
    }
    pub(super) fn reads_transposed(&self, row: &KeyRow) -> bool {
        self.read().iter().any(|e| e.reads_transposed(row))
    }
    pub(super) fn leaf_models(&self, out: &mut Vec<usize>) {
        self.read().iter().for_each(|e| e.leaf_models(out))
    }
    /// Each output's notes.
    pub(super) fn notes(&self) -> Vec<Vec<String>> {
        match self {
            Exprs::Each(e) => e
                .iter()
                .map(|e| {
                    let mut notes = Vec::new();
                    e.notes(&mut notes);
                    notes
                })
                .collect(),
            Exprs::Points { args, state } => {
                let mut shared = Vec::new();
                args.iter().for_each(|a| a.notes(&mut shared));
                state
                    .notes()
                    .into_iter()
                    .map(|own| shared.iter().cloned().chain(own).collect())
                    .collect()
            }
        }
    }
}
