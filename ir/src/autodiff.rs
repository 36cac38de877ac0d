//! Reverse-mode differentiation as a graph transformation.
//!
//! `differentiate` copies a forward graph and appends its backward pass as
//! ordinary IR: one vector-Jacobian rule per primitive op (`vjp`). The result
//! computes the loss and, as outputs named `grad:<param>`, the gradient of
//! the loss for each requested parameter. Only nodes on a path from a
//! requested parameter to the loss get backward work, so frozen parameters
//! (a teacher, a frozen subset) cost nothing.
//!
//! Differentiation runs on the lowered graph of primitives, before fusion:
//! the e-graph optimizer then fuses forward and backward together. The one
//! exception is `attention`, which training pipelines form first (see
//! `caramba_compiler::fuse_for_training`): its rule emits the flash-style
//! backward (`attention_lse`, `attention_grad`), which recomputes the
//! probabilities instead of keeping a `T × S` matrix alive from the forward
//! pass to the backward (training pipelines then take the log-sum-exp from
//! the forward kernel: `caramba_compiler::reuse_attention_lse`).
//! `rms_norm`, formed there too, has its own rule as well (`rms_norm_grad`,
//! one fused pass per operand that recomputes the row statistics from x,
//! where the primitive chain's backward kept its f32 intermediates alive
//! and took eight passes). The other fused ops (`elementwise`,
//! `kv_attention`) are refused, and so are the backward ops
//! (`attention_lse`, `attention_with_lse`, `attention_grad`,
//! `rms_norm_grad`: no second derivatives).

use crate::graph::{Graph, IrError, NodeId};
use crate::op::{AttnArg, BinaryOp, NormArg, Op, ReduceOp, RopeSpec, Scalar, UnaryOp};
use crate::types::{DType, Dim, Shape, TensorType};
use std::collections::{BTreeSet, HashMap};

/// The output name of the gradient of `param`.
pub fn grad_name(param: &str) -> String {
    format!("grad:{param}")
}

/// A graph computing the outputs of `g` and the gradient of the scalar
/// output `loss` with respect to each parameter in `wrt`.
pub fn differentiate(g: &Graph, loss: &str, wrt: &[String]) -> Result<Graph, IrError> {
    let err = |message: String| IrError {
        scope: g.name.clone(),
        message,
    };
    let loss_id = g
        .output(loss)
        .ok_or_else(|| err(format!("the graph has no output {loss:?}")))?;
    if g.node(loss_id).ty.shape.rank() != 0 {
        return Err(err(format!(
            "the loss must be a scalar, but {loss:?} is {}",
            g.node(loss_id).ty
        )));
    }
    let mut b = Backward {
        ng: Graph::new(g.name.clone()),
        map: HashMap::new(),
        attn_kv: HashMap::new(),
    };
    let order = g.topo_order();
    for &id in &order {
        let n = g.node(id);
        let xs: Vec<NodeId> = g.operands(id).iter().map(|o| b.map[o]).collect();
        let new = b.ng.add_copy(n, &xs)?;
        b.map.insert(id, new);
    }
    for (name, id) in g.outputs() {
        let new = b.map[id];
        b.ng.set_output(name, new);
    }

    // Nodes that depend on a requested parameter and that the loss depends on.
    let mut varies: BTreeSet<NodeId> = BTreeSet::new();
    for name in wrt {
        let p = g
            .param_id(name)
            .ok_or_else(|| err(format!("no parameter {name:?} to differentiate for")))?;
        varies.insert(p);
    }
    for &id in &order {
        if g.operands(id).iter().any(|o| varies.contains(o)) {
            varies.insert(id);
        }
    }
    let mut feeds_loss: BTreeSet<NodeId> = BTreeSet::from([loss_id]);
    for &id in order.iter().rev() {
        if feeds_loss.contains(&id) {
            feeds_loss.extend(g.operands(id));
        }
    }
    let needed = |id: &NodeId| varies.contains(id) && feeds_loss.contains(id);

    let mut adj: HashMap<NodeId, NodeId> = HashMap::new();
    let one = b.ng.constant(1.0, g.node(loss_id).ty.dtype, "loss/grad");
    adj.insert(loss_id, one);
    // The adjoints of slices, held back per sliced node until every user
    // of that node has been visited: disjoint slices along one axis then
    // give one concatenation of their adjoints (zeros in the gaps), where
    // padding each with zeros and adding them would write the whole node's
    // shape once per slice.
    let mut sliced: HashMap<NodeId, Vec<SlicePart>> = HashMap::new();
    for &id in order.iter().rev() {
        if let Some(parts) = sliced.remove(&id) {
            let scope = format!("{}/grad", g.node(id).scope);
            let contrib = b.slice_adjoints(g, id, parts, &scope)?;
            let total = match adj.get(&id) {
                Some(&acc) => {
                    b.ng.add(Op::Binary(BinaryOp::Add), &[acc, contrib], &scope)?
                }
                None => contrib,
            };
            adj.insert(id, total);
        }
        if !needed(&id) {
            continue;
        }
        let Some(&gy) = adj.get(&id) else { continue };
        let operands = g.operands(id);
        if let Op::Slice { axis, start, end } = g.node(id).op {
            if needed(&operands[0]) {
                sliced.entry(operands[0]).or_default().push(SlicePart {
                    axis,
                    start,
                    end,
                    grad: gy,
                });
            }
            continue;
        }
        for (i, &o) in operands.iter().enumerate() {
            if !needed(&o) {
                continue;
            }
            let contrib = b.vjp(g, id, i, gy)?;
            let scope = format!("{}/grad", g.node(o).scope);
            let total = match adj.get(&o) {
                Some(&acc) => {
                    b.ng.add(Op::Binary(BinaryOp::Add), &[acc, contrib], &scope)?
                }
                None => contrib,
            };
            adj.insert(o, total);
        }
    }
    for name in wrt {
        let p = g.param_id(name).expect("checked above");
        let grad = match adj.get(&p) {
            Some(&gp) => gp,
            // The loss does not depend on this parameter: its gradient is zero.
            None => {
                let ty = g.node(p).ty.clone();
                let z = b.ng.constant(0.0, ty.dtype, "grad/zero");
                b.ng.add(Op::Broadcast(ty.shape), &[z], "grad/zero")?
            }
        };
        b.ng.set_output(&grad_name(name), grad);
    }
    Ok(b.ng)
}

/// The adjoint `grad` of `slice{axis, start..end}` of a node.
struct SlicePart {
    axis: usize,
    start: usize,
    end: usize,
    grad: NodeId,
}

struct Backward {
    ng: Graph,
    /// Forward node in the source graph → its copy in `ng`.
    map: HashMap<NodeId, NodeId>,
    /// Attention node in the source graph → its `attention_grad{kv}` in
    /// `ng`, shared by the gradients of its keys and values.
    attn_kv: HashMap<NodeId, NodeId>,
}

impl Backward {
    fn ty(&self, id: NodeId) -> TensorType {
        self.ng.node(id).ty.clone()
    }

    fn op(&mut self, op: Op, xs: &[NodeId], scope: &str) -> Result<NodeId, IrError> {
        self.ng.add(op, xs, scope)
    }

    fn bin(&mut self, op: BinaryOp, a: NodeId, b: NodeId, scope: &str) -> Result<NodeId, IrError> {
        self.op(Op::Binary(op), &[a, b], scope)
    }

    fn un(&mut self, op: UnaryOp, a: NodeId, scope: &str) -> Result<NodeId, IrError> {
        self.op(Op::Unary(op), &[a], scope)
    }

    fn scalar(&mut self, v: f64, like: NodeId, scope: &str) -> NodeId {
        let dt = self.ty(like).dtype;
        self.ng.constant(v, dt, scope)
    }

    /// The sum of the adjoints of slices of node `x` (of `g`): one
    /// concatenation along their axis, zeros filling the gaps, when the
    /// slices share an axis and do not overlap; else each slice's adjoint
    /// padded with zeros to `x`'s shape (the slice's own rule), summed.
    fn slice_adjoints(
        &mut self,
        g: &Graph,
        x: NodeId,
        mut parts: Vec<SlicePart>,
        scope: &str,
    ) -> Result<NodeId, IrError> {
        let shape = g.node(x).ty.shape.clone();
        let axis = parts[0].axis;
        parts.sort_by_key(|p| p.start);
        let total = shape.0[axis].as_const();
        let disjoint = parts.iter().all(|p| p.axis == axis)
            && parts.windows(2).all(|w| w[0].end <= w[1].start)
            && total.is_some();
        if !disjoint || parts.len() == 1 {
            let mut sum: Option<NodeId> = None;
            for p in parts {
                let part = self.pad_slice(&shape, p, scope)?;
                sum = Some(match sum {
                    Some(acc) => self.bin(BinaryOp::Add, acc, part, scope)?,
                    None => part,
                });
            }
            return Ok(sum.expect("at least one slice"));
        }
        let dtype = self.ty(parts[0].grad).dtype;
        let mut pieces = Vec::new();
        let mut at = 0;
        let gap = |b: &mut Self, from: usize, to: usize| {
            let mut sh = shape.clone();
            sh.0[axis] = Dim::Const(to - from);
            b.zeros(sh, dtype, scope)
        };
        for p in &parts {
            if p.start > at {
                pieces.push(gap(self, at, p.start)?);
            }
            pieces.push(p.grad);
            at = p.end;
        }
        let total = total.expect("checked");
        if total > at {
            pieces.push(gap(self, at, total)?);
        }
        self.op(Op::Concat { axis }, &pieces, scope)
    }

    /// A slice's adjoint padded with zeros to its operand's `shape`.
    fn pad_slice(&mut self, shape: &Shape, p: SlicePart, scope: &str) -> Result<NodeId, IrError> {
        let total = shape.0[p.axis].as_const().unwrap_or(0);
        let dt = self.ty(p.grad).dtype;
        let mut all = Vec::new();
        for (a, b) in [(0, p.start), (p.end, total)] {
            if b > a {
                let mut sh = shape.clone();
                sh.0[p.axis] = Dim::Const(b - a);
                let z = self.zeros(sh, dt, scope)?;
                all.push((a, z));
            }
        }
        all.push((p.start, p.grad));
        all.sort_by_key(|&(a, _)| a);
        if all.len() == 1 {
            return Ok(p.grad);
        }
        let xs: Vec<NodeId> = all.into_iter().map(|(_, n)| n).collect();
        self.op(Op::Concat { axis: p.axis }, &xs, scope)
    }

    fn zeros(&mut self, shape: Shape, dtype: DType, scope: &str) -> Result<NodeId, IrError> {
        let z = self.ng.constant(0.0, dtype, scope);
        self.op(Op::Broadcast(shape), &[z], scope)
    }

    fn transpose(&mut self, x: NodeId, scope: &str) -> Result<NodeId, IrError> {
        let r = self.ty(x).shape.rank();
        let mut perm: Vec<usize> = (0..r).collect();
        perm.swap(r - 2, r - 1);
        self.op(Op::Permute(perm), &[x], scope)
    }

    /// Sums `g` over the axes that broadcasting added to reach its shape
    /// from `target`, giving a value of shape `target`.
    fn reduce_to(&mut self, g: NodeId, target: &Shape, scope: &str) -> Result<NodeId, IrError> {
        let gs = self.ty(g).shape;
        if &gs == target {
            return Ok(g);
        }
        let (r, tr) = (gs.rank(), target.rank());
        let mut cur = g;
        for i in 0..r {
            let t = if i < r - tr {
                None
            } else {
                Some(target.0[i - (r - tr)])
            };
            let summed = match t {
                None => true,
                Some(d) => d == Dim::Const(1) && gs.0[i] != Dim::Const(1),
            };
            if summed {
                cur = self.op(
                    Op::Reduce {
                        op: ReduceOp::Sum,
                        axis: i,
                    },
                    &[cur],
                    scope,
                )?;
            }
        }
        if self.ty(cur).shape != *target {
            cur = self.op(Op::Reshape(target.clone()), &[cur], scope)?;
        }
        Ok(cur)
    }

    /// `attention_grad{wrt}` of attention `y = attention(x…)` for the
    /// output adjoint `gy`, with the row statistics it needs: the
    /// log-sum-exp `lse` (recomputed) and `delta = Σ gy·y` per query row,
    /// both in the statistics dtype (`f32` for half-precision attention,
    /// `delta` summed from `gy` and `y` widened to it, as FlashAttention-2
    /// does). The q and kv gradients each make their own copies of these;
    /// the optimizer's e-graph merges them.
    #[allow(clippy::too_many_arguments)]
    fn attention_grad(
        &mut self,
        x: &[NodeId],
        y: NodeId,
        gy: NodeId,
        causal: bool,
        scale: Scalar,
        wrt: AttnArg,
        scope: &str,
    ) -> Result<NodeId, IrError> {
        let lse = self.op(Op::AttentionLse { causal, scale }, &[x[0], x[1]], scope)?;
        let stats = self.ty(lse).dtype;
        let mut widened = [gy, y];
        for v in &mut widened {
            if self.ty(*v).dtype != stats {
                *v = self.op(Op::Cast(stats), &[*v], scope)?;
            }
        }
        let prod = self.bin(BinaryOp::Mul, widened[0], widened[1], scope)?;
        let last = self.ty(prod).shape.rank() - 1;
        let delta = self.op(
            Op::Reduce {
                op: ReduceOp::Sum,
                axis: last,
            },
            &[prod],
            scope,
        )?;
        self.op(
            Op::AttentionGrad { causal, scale, wrt },
            &[x[0], x[1], x[2], gy, lse, delta],
            scope,
        )
    }

    /// The contribution of node `id`'s output adjoint `gy` to its operand `i`.
    fn vjp(&mut self, g: &Graph, id: NodeId, i: usize, gy: NodeId) -> Result<NodeId, IrError> {
        let node = g.node(id);
        let scope = format!("{}/grad", node.scope);
        let s = scope.as_str();
        let ops = g.operands(id);
        let x: Vec<NodeId> = ops.iter().map(|o| self.map[o]).collect();
        let y = self.map[&id];
        let xshape = |k: usize| g.node(ops[k]).ty.shape.clone();
        let refuse = |what: &str| IrError {
            scope: node.scope.clone(),
            message: format!("no gradient rule for {what}"),
        };
        Ok(match &node.op {
            Op::Input { .. } | Op::Param { .. } | Op::Constant(_) => {
                unreachable!("sources have no operands")
            }
            Op::Unary(u) => match u {
                UnaryOp::Neg => self.un(UnaryOp::Neg, gy, s)?,
                UnaryOp::Exp => self.bin(BinaryOp::Mul, gy, y, s)?,
                UnaryOp::Log => self.bin(BinaryOp::Div, gy, x[0], s)?,
                UnaryOp::Sqrt => {
                    let h = self.scalar(0.5, gy, s);
                    let t = self.bin(BinaryOp::Div, gy, y, s)?;
                    self.bin(BinaryOp::Mul, t, h, s)?
                }
                UnaryOp::Rsqrt => {
                    // d/dx x^(-1/2) = -1/2 · y³
                    let h = self.scalar(-0.5, gy, s);
                    let y2 = self.bin(BinaryOp::Mul, y, y, s)?;
                    let y3 = self.bin(BinaryOp::Mul, y2, y, s)?;
                    let t = self.bin(BinaryOp::Mul, gy, y3, s)?;
                    self.bin(BinaryOp::Mul, t, h, s)?
                }
                UnaryOp::Recip => {
                    let y2 = self.bin(BinaryOp::Mul, y, y, s)?;
                    let t = self.bin(BinaryOp::Mul, gy, y2, s)?;
                    self.un(UnaryOp::Neg, t, s)?
                }
                UnaryOp::Abs => {
                    // sign(x) = x / max(|x|, tiny): 0 at 0.
                    let tiny = self.scalar(1e-30, gy, s);
                    let den = self.bin(BinaryOp::Max, y, tiny, s)?;
                    let sign = self.bin(BinaryOp::Div, x[0], den, s)?;
                    self.bin(BinaryOp::Mul, gy, sign, s)?
                }
                UnaryOp::Sigmoid => {
                    let one = self.scalar(1.0, gy, s);
                    let c = self.bin(BinaryOp::Sub, one, y, s)?;
                    let d = self.bin(BinaryOp::Mul, y, c, s)?;
                    self.bin(BinaryOp::Mul, gy, d, s)?
                }
                UnaryOp::Silu => {
                    // σ(x)·(1 + x·(1 − σ(x)))
                    let sg = self.un(UnaryOp::Sigmoid, x[0], s)?;
                    let one = self.scalar(1.0, gy, s);
                    let c = self.bin(BinaryOp::Sub, one, sg, s)?;
                    let xc = self.bin(BinaryOp::Mul, x[0], c, s)?;
                    let t = self.bin(BinaryOp::Add, one, xc, s)?;
                    let d = self.bin(BinaryOp::Mul, sg, t, s)?;
                    self.bin(BinaryOp::Mul, gy, d, s)?
                }
                UnaryOp::Tanh => {
                    let one = self.scalar(1.0, gy, s);
                    let y2 = self.bin(BinaryOp::Mul, y, y, s)?;
                    let c = self.bin(BinaryOp::Sub, one, y2, s)?;
                    self.bin(BinaryOp::Mul, gy, c, s)?
                }
            },
            Op::Binary(op) => {
                let full = match (op, i) {
                    (BinaryOp::Add, _) => gy,
                    (BinaryOp::Sub, 0) => gy,
                    (BinaryOp::Sub, _) => self.un(UnaryOp::Neg, gy, s)?,
                    (BinaryOp::Mul, 0) => self.bin(BinaryOp::Mul, gy, x[1], s)?,
                    (BinaryOp::Mul, _) => self.bin(BinaryOp::Mul, gy, x[0], s)?,
                    (BinaryOp::Div, 0) => self.bin(BinaryOp::Div, gy, x[1], s)?,
                    (BinaryOp::Div, _) => {
                        // −gy · a / b² = −gy · y / b
                        let t = self.bin(BinaryOp::Mul, gy, y, s)?;
                        let t = self.bin(BinaryOp::Div, t, x[1], s)?;
                        self.un(UnaryOp::Neg, t, s)?
                    }
                    (BinaryOp::Max, _) => return Err(refuse("max")),
                };
                self.reduce_to(full, &xshape(i), s)?
            }
            Op::Cast(_) => self.op(Op::Cast(g.node(ops[0]).ty.dtype), &[gy], s)?,
            Op::Dropout { .. } => gy,
            // The anchor's value is never read: no gradient flows to it.
            Op::After if i == 0 => gy,
            Op::After => return Err(refuse("after's anchor (its value is not read)")),
            Op::Reduce { op, axis } => match op {
                ReduceOp::Sum => self.op(Op::Broadcast(xshape(0)), &[gy], s)?,
                ReduceOp::Mean => {
                    let t = match xshape(0).0[*axis].as_const() {
                        Some(n) => {
                            let k = self.scalar(1.0 / n as f64, gy, s);
                            self.bin(BinaryOp::Mul, gy, k, s)?
                        }
                        None => {
                            // A symbolic axis: count it at run time as Σ 1.
                            let dt = self.ty(gy).dtype;
                            let one = self.ng.constant(1.0, dt, s);
                            let ones = self.op(Op::Broadcast(xshape(0)), &[one], s)?;
                            let n = self.op(
                                Op::Reduce {
                                    op: ReduceOp::Sum,
                                    axis: *axis,
                                },
                                &[ones],
                                s,
                            )?;
                            self.bin(BinaryOp::Div, gy, n, s)?
                        }
                    };
                    self.op(Op::Broadcast(xshape(0)), &[t], s)?
                }
                ReduceOp::Max => return Err(refuse("reduce_max")),
            },
            Op::MatMul => {
                if i == 0 {
                    let bt = self.transpose(x[1], s)?;
                    let t = self.op(Op::MatMul, &[gy, bt], s)?;
                    self.reduce_to(t, &xshape(0), s)?
                } else {
                    let at = self.transpose(x[0], s)?;
                    let t = self.op(Op::MatMul, &[at, gy], s)?;
                    self.reduce_to(t, &xshape(1), s)?
                }
            }
            Op::Reshape(_) => self.op(Op::Reshape(xshape(0)), &[gy], s)?,
            Op::Permute(perm) => {
                let mut inv = vec![0; perm.len()];
                for (k, &p) in perm.iter().enumerate() {
                    inv[p] = k;
                }
                self.op(Op::Permute(inv), &[gy], s)?
            }
            Op::Slice { axis, start, end } => {
                let part = SlicePart {
                    axis: *axis,
                    start: *start,
                    end: *end,
                    grad: gy,
                };
                self.pad_slice(&xshape(0), part, s)?
            }
            Op::Concat { axis } => {
                let mut off = 0;
                for k in 0..i {
                    off += xshape(k).0[*axis].as_const().unwrap_or(0);
                }
                let len = xshape(i).0[*axis].as_const().unwrap_or(0);
                self.op(
                    Op::Slice {
                        axis: *axis,
                        start: off,
                        end: off + len,
                    },
                    &[gy],
                    s,
                )?
            }
            Op::Broadcast(_) => self.reduce_to(gy, &xshape(0), s)?,
            Op::Gather => {
                if i == 1 {
                    return Err(refuse("gather indices"));
                }
                let v = xshape(0).0[0]
                    .as_const()
                    .ok_or_else(|| refuse("a gather table with a symbolic row count"))?;
                self.op(Op::ScatterAdd { size: v }, &[x[1], gy], s)?
            }
            Op::ScatterAdd { .. } => {
                if i == 0 {
                    return Err(refuse("scatter_add indices"));
                }
                self.op(Op::Gather, &[gy, x[0]], s)?
            }
            Op::OneHot { .. } => return Err(refuse("one_hot indices")),
            Op::Softmax { axis } => {
                // y · (gy − Σ gy·y)
                let gyy = self.bin(BinaryOp::Mul, gy, y, s)?;
                let sum = self.op(
                    Op::Reduce {
                        op: ReduceOp::Sum,
                        axis: *axis,
                    },
                    &[gyy],
                    s,
                )?;
                let d = self.bin(BinaryOp::Sub, gy, sum, s)?;
                self.bin(BinaryOp::Mul, y, d, s)?
            }
            Op::CausalMask => {
                // exp(mask(0)) is 1 where kept and 0 where masked.
                let ty = self.ty(gy);
                let z = self.zeros(ty.shape, ty.dtype, s)?;
                let m = self.op(Op::CausalMask, &[z], s)?;
                let keep = self.un(UnaryOp::Exp, m, s)?;
                self.bin(BinaryOp::Mul, gy, keep, s)?
            }
            Op::Rope(spec) => {
                if i == 1 {
                    return Err(refuse("rope positions"));
                }
                // A rotation's transpose is the rotation by −a.
                let inverse = RopeSpec {
                    inverse: !spec.inverse,
                    ..*spec
                };
                self.op(Op::Rope(inverse), &[gy, x[1]], s)?
            }
            Op::CrossEntropy => {
                if i == 1 {
                    return Err(refuse("cross-entropy targets"));
                }
                // (softmax(l) − one_hot(t))·g in one fused op: nothing as
                // large as the logits is stored but the gradient itself.
                self.op(Op::CrossEntropyGrad, &[x[0], x[1], gy], s)?
            }
            Op::LinearCrossEntropy => {
                // The head's two gradients, each recomputing the logits
                // and their gradient a block of rows at a time (a device
                // computes both from one pass, see the op).
                let wrt = match i {
                    0 => NormArg::X,
                    1 => NormArg::W,
                    _ => return Err(refuse("cross-entropy targets")),
                };
                self.op(
                    Op::LinearCrossEntropyGrad { wrt },
                    &[x[0], x[1], x[2], gy],
                    s,
                )?
            }
            &Op::Attention { causal, scale } => {
                let full = if i == 0 {
                    self.attention_grad(&x, y, gy, causal, scale, AttnArg::Q, s)?
                } else {
                    // dk and dv come from one pass over the scores: the
                    // first of k and v to be differentiated makes it, and
                    // each takes its columns.
                    let kv = match self.attn_kv.get(&id) {
                        Some(&kv) => kv,
                        None => {
                            let kv =
                                self.attention_grad(&x, y, gy, causal, scale, AttnArg::KV, s)?;
                            self.attn_kv.insert(id, kv);
                            kv
                        }
                    };
                    let width = |k: usize| {
                        xshape(k)
                            .last()
                            .and_then(Dim::as_const)
                            .ok_or_else(|| refuse("attention with symbolic head dims"))
                    };
                    let d = width(1)?;
                    let (start, end) = if i == 1 { (0, d) } else { (d, d + width(2)?) };
                    let axis = self.ty(kv).shape.rank() - 1;
                    self.op(Op::Slice { axis, start, end }, &[kv], s)?
                };
                self.reduce_to(full, &xshape(i), s)?
            }
            Op::AttentionLse { .. } | Op::AttentionWithLse { .. } | Op::AttentionGrad { .. } => {
                return Err(refuse("attention's backward ops (no second derivatives)"))
            }
            Op::CrossEntropyGrad | Op::LinearCrossEntropyGrad { .. } => {
                return Err(refuse("cross-entropy's gradient (no second derivatives)"))
            }
            Op::RowDot => {
                // d/dx = g·y and d/dy = g·x, the row's adjoint `g [..., 1]`
                // broadcast along the last axis; computed in the statistics
                // dtype (the operands widened, as the decomposition does)
                // and cast back to the operands' dtype (a cast's gradient).
                let dt = g.node(ops[0]).ty.dtype;
                let mut other = x[1 - i];
                if self.ty(gy).dtype != dt {
                    other = self.op(Op::Cast(self.ty(gy).dtype), &[other], s)?;
                }
                let full = self.bin(BinaryOp::Mul, gy, other, s)?;
                if self.ty(full).dtype != dt {
                    self.op(Op::Cast(dt), &[full], s)?
                } else {
                    full
                }
            }
            &Op::RmsNorm { eps } => {
                // One fused pass per operand: the row statistics are
                // recomputed from x, so the forward keeps nothing but x.
                let wrt = if i == 0 { NormArg::X } else { NormArg::W };
                self.op(Op::RmsNormGrad { eps, wrt }, &[x[0], x[1], gy], s)?
            }
            Op::RmsNormGrad { .. } => {
                return Err(refuse("rms_norm's gradient (no second derivatives)"))
            }
            Op::Elementwise(_)
            | Op::KvAttention { .. }
            | Op::RmsNormMatMul { .. }
            | Op::MatMulRope { .. } => {
                return Err(refuse(
                    "fused ops: differentiate the lowered graph before fusion",
                ))
            }
            Op::Quantize(_) | Op::Dequantize { .. } => {
                return Err(refuse(
                    "quantized storage (a KV cache is for inference; train on the float graph)",
                ))
            }
        })
    }
}

/// Appends the next-token loss to a language model: `targets` i32 [B, T],
/// per-position cross-entropy of `logits` [B, T, V] (in f32: half-precision
/// logits are widened), averaged to a scalar output named `loss`.
pub fn add_next_token_loss(g: &mut Graph, logits: &str) -> Result<NodeId, IrError> {
    let err = |message: String| IrError {
        scope: g.name.clone(),
        message,
    };
    let l = g
        .output(logits)
        .ok_or_else(|| err(format!("no output {logits:?}")))?;
    let ty = g.node(l).ty.clone();
    if ty.shape.rank() != 3 {
        return Err(err(format!("logits must be [B, T, V], got {ty}")));
    }
    let tshape = Shape(ty.shape.0[..2].to_vec());
    let t = g.input("targets", TensorType::new(DType::I32, tshape))?;
    // Half-precision logits are widened first (as Hugging Face does): the
    // loss, its mean and the logits' gradient are f32.
    let l = if matches!(ty.dtype, DType::F16 | DType::BF16) {
        g.add(Op::Cast(DType::F32), &[l], "loss")?
    } else {
        l
    };
    let ce = g.add(Op::CrossEntropy, &[l, t], "loss")?;
    let m1 = g.add(
        Op::Reduce {
            op: ReduceOp::Mean,
            axis: 1,
        },
        &[ce],
        "loss",
    )?;
    let m0 = g.add(
        Op::Reduce {
            op: ReduceOp::Mean,
            axis: 0,
        },
        &[m1],
        "loss",
    )?;
    let loss = g.add(Op::Reshape(Shape::scalar()), &[m0], "loss")?;
    g.set_output("loss", loss);
    Ok(loss)
}
