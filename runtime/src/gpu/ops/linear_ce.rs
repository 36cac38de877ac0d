//! `linear_cross_entropy` and its gradients, a block of rows at a time, so
//! that a language model's logits are never stored whole: one GEMM puts a
//! block's logits into a scratch buffer, then the loss is computed over
//! them, or their gradient written over them (`cross_entropy`'s kernels);
//! the gradient's block then gives its rows of `dx` (one GEMM) and its
//! share of `dw` (one GEMM, added to the blocks' before).
//!
//! The scratch holds one block of logits: [`BLOCK_BYTES`] (or the device's
//! largest buffer, if smaller), in rows that are multiples of
//! [`ROW_ALIGN`]. Every other buffer a block reads or writes (x and dx's
//! rows, the targets, the loss adjoint, the loss) is a slice of its
//! handle at a 256-byte boundary: no copies.
//!
//! `dw`'s sum over blocks: cuBLASLt adds each block's product into it
//! (`β = 1`: the sum formed in f32 and rounded to the storage type once a
//! block); elsewhere (cubek) each block's product goes to a scratch
//! matrix, is added to `dw` out of place (WebGPU forbids a writable binding
//! that aliases another) and the sum copied back. With one block, `dw` is one
//! product over every row, as the op defines it; with more, a half-precision
//! `dw` is rounded once a block (the op's reference rounds once): the
//! tolerance of the dtype, as any reordering of the sum.
//!
//! A device that keeps a half-precision dtype widened to f32 rounds the
//! logits and their gradient to the dtype's grid, as the op's reference
//! does (two scratch buffers: the round trip cannot be in place there).

use super::{copy_elem, view_of, Ctx, DevTensor, GpuError, HeadGrads, Recycled};
use caramba_ir::{DType, NormArg};
use caramba_kernels::cast::{self, Narrow};
use caramba_kernels::cubecl::prelude::*;
use caramba_kernels::cubecl::server::Handle;
use caramba_kernels::elementwise::{self, Binary, Instr};
use caramba_kernels::{copy, matmul, norm, FloatElem, View};

/// The logits a block may hold when the executor names no row count.
const BLOCK_BYTES: usize = 1 << 30;

/// Blocks start at multiples of this many rows, so that every buffer sliced
/// by rows starts at a multiple of 256 bytes (WebGPU's binding-offset
/// alignment): 4-byte targets, adjoints and losses, and rows of x and dx
/// of any width and type.
pub(crate) const ROW_ALIGN: usize = 256;

/// Rows `start..start + n` of a dense buffer of `row_bytes`-byte rows, as a
/// handle of their own (a slice of the same memory).
fn rows(h: &Handle, start: usize, n: usize, row_bytes: usize) -> Handle {
    let mut h = h.clone();
    let base = h.offset_start.unwrap_or(0);
    let (offset, bytes) = ((start * row_bytes) as u64, (n * row_bytes) as u64);
    h.offset_start = Some(base + offset);
    h.offset_end = Some(h.size() - base - offset - bytes);
    h
}

/// The scratch a block's logits go to: the product's, and on a device that
/// keeps the dtype widened, a second buffer they are rounded into.
struct Scratch {
    product: Handle,
    rounded: Option<(Narrow, Handle)>,
}

impl<R: Runtime> Ctx<'_, R> {
    /// The blocks `(start, rows)` of `n` rows of `v` logits of `elem`.
    fn loss_blocks(&self, n: usize, v: usize, elem: FloatElem) -> Vec<(usize, usize)> {
        let per = self.loss_block_rows.unwrap_or_else(|| {
            let max = self.client.properties().memory.max_page_size as usize;
            BLOCK_BYTES.min(max) / (v.max(1) * elem.size())
        });
        let per = (per / ROW_ALIGN).max(1) * ROW_ALIGN;
        (0..n).step_by(per).map(|s| (s, per.min(n - s))).collect()
    }

    fn scratch(&self, x: &DevTensor, rows: usize, v: usize) -> Scratch {
        let bytes = rows * v * x.elem.size();
        let take = || Recycled::or_empty(self.recycled, self.client, bytes.max(1));
        let rounded = self.narrow.widens(x.dtype).then(|| {
            let to = if x.dtype == DType::BF16 {
                Narrow::Bf16
            } else {
                Narrow::F16
            };
            (to, take())
        });
        Scratch {
            product: take(),
            rounded,
        }
    }

    fn give_back(&self, s: Scratch, x: &DevTensor, v: usize) {
        let Some(pool) = self.recycled else {
            return;
        };
        let give = |h: Handle| pool.give(DevTensor::dense(h, vec![v], x.dtype, x.elem));
        give(s.product);
        if let Some((_, h)) = s.rounded {
            give(h);
        }
    }

    /// The logits of rows `start..start + n`, `x·w`, on x's grid, in the
    /// scratch: the buffer they are in.
    fn block_logits(
        &self,
        s: &Scratch,
        (x, w): (&DevTensor, &DevTensor),
        (start, n): (usize, usize),
    ) -> Result<Handle, GpuError> {
        let (k, v) = (w.shape[0], w.shape[1]);
        let lhs = View::contiguous(rows(&x.handle, start, n, k * x.elem.size()), &[n, k]);
        let out = View::contiguous(s.product.clone(), &[n, v]);
        self.gemm(x.elem, &lhs, &view_of(w), &out)?;
        Ok(self.on_dtype_grid(s, false, n * v))
    }

    /// The first `numel` values of the scratch buffer they are in (the
    /// product's, or with `rounded` the other) on x's grid: that buffer,
    /// or on a device that keeps the dtype widened, the other one, which
    /// they are rounded into.
    fn on_dtype_grid(&self, s: &Scratch, rounded: bool, numel: usize) -> Handle {
        match &s.rounded {
            None => s.product.clone(),
            Some((to, other)) => {
                let (from, into) = if rounded {
                    (other, &s.product)
                } else {
                    (&s.product, other)
                };
                cast::launch_round(self.client, *to, from, into, numel);
                into.clone()
            }
        }
    }

    /// `linear_cross_entropy(x, w, targets)`: the loss of each row; with
    /// `head_grads` (the executor found the loss's gradients computable
    /// before it, see `loss_grads`) their values too, from the same blocks
    /// of logits: one product over the head instead of two.
    pub(super) fn linear_cross_entropy(
        &self,
        xs: &[&DevTensor],
        shape: Vec<usize>,
    ) -> Result<DevTensor, GpuError> {
        let loss = self.alloc(shape);
        self.head_pass(xs, Some(&loss), self.head_grads, None)?;
        Ok(loss)
    }

    /// `linear_cross_entropy_grad{wrt}(x, w, targets, g)`, and with
    /// `second` (the executor paired the two gradients, see `grad_pairs`)
    /// the other one into that buffer, from the same blocks of logits.
    pub(super) fn linear_cross_entropy_grad(
        &self,
        xs: &[&DevTensor],
        wrt: NormArg,
        shape: Vec<usize>,
    ) -> Result<DevTensor, GpuError> {
        let own = self.alloc(shape);
        // The node's own value is rounded to its grid by `apply`; the
        // sibling's by `head_pass`.
        let (dx, dw) = match wrt {
            NormArg::X => (Some(&own), self.second),
            NormArg::W => (self.second, Some(&own)),
        };
        let grads = HeadGrads { g: xs[3], dx, dw };
        self.head_pass(&xs[..3], None, Some(grads), Some(wrt))?;
        Ok(own)
    }

    /// One pass over the blocks of `x·w`'s rows: each block's logits give
    /// its rows of `loss`, then, with `grads`, their gradient is written
    /// over them and gives the block's rows of `dx` and its share of `dw`.
    ///
    /// The gradient `own` names is the launch's own value, which `apply`
    /// rounds to its grid; the others are rounded here, on a device that
    /// keeps the dtype widened (computed apart first: the round trip cannot
    /// be in place there).
    fn head_pass(
        &self,
        xs: &[&DevTensor],
        loss: Option<&DevTensor>,
        grads: Option<HeadGrads<'_>>,
        own: Option<NormArg>,
    ) -> Result<(), GpuError> {
        let (x, w, targets) = (xs[0], xs[1], xs[2]);
        let (k, v, n) = (w.shape[0], w.shape[1], targets.numel());
        let widened = self.narrow.widens(x.dtype);
        // (the buffer computed into, the one it is rounded into after)
        let target = |t: Option<&DevTensor>, wrt: NormArg| {
            t.map(|t| {
                if widened && own != Some(wrt) {
                    (self.alloc(t.shape.clone()), Some(t.clone()))
                } else {
                    (t.clone(), None)
                }
            })
        };
        let (dx, dw) = match &grads {
            Some(gr) => (target(gr.dx, NormArg::X), target(gr.dw, NormArg::W)),
            None => (None, None),
        };
        let blocks = self.loss_blocks(n, v, x.elem);
        let Some(&(_, most)) = blocks.first() else {
            // No rows: dw is a sum of nothing (dx and the loss have no
            // elements).
            for t in [&dx, &dw].into_iter().flatten() {
                let t = t.1.as_ref().unwrap_or(&t.0);
                elementwise::launch_fill_float(self.client, t.elem, &t.handle, t.numel(), 0.0);
            }
            return Ok(());
        };
        let s = self.scratch(x, most, v);
        let es = x.elem.size();
        let mut sums = dw.as_ref().map(|(dw, _)| WeightSum::new(dw));
        for (i, &(start, len)) in blocks.iter().enumerate() {
            let logits = self.block_logits(&s, (x, w), (start, len))?;
            let target_rows = rows(&targets.handle, start, len, 4);
            if let Some(loss) = loss {
                let size = loss.elem.size();
                norm::launch_cross_entropy(
                    self.client,
                    (x.elem, &logits),
                    &target_rows,
                    (loss.elem, &rows(&loss.handle, start, len, size)),
                    len,
                    v,
                );
            }
            let Some(gr) = &grads else {
                continue;
            };
            let g = gr.g;
            norm::launch_cross_entropy_grad_in_place(
                self.client,
                (x.elem, &logits),
                &target_rows,
                (g.elem, &rows(&g.handle, start, len, g.elem.size())),
                len,
                v,
            );
            let dl = self.on_dtype_grid(&s, true, len * v);
            let dl = View::contiguous(dl, &[len, v]);
            if let Some((dx, _)) = &dx {
                // dl·wᵀ into the block's rows of dx.
                let wv = view_of(w);
                let wt = View {
                    shape: vec![v, k],
                    strides: vec![wv.strides[1], wv.strides[0]],
                    ..wv
                };
                let out = View::contiguous(rows(&dx.handle, start, len, k * es), &[len, k]);
                self.gemm(x.elem, &dl, &wt, &out)?;
            }
            if let Some(sums) = sums.as_mut() {
                // xᵀ·dl over the block's rows.
                let xt = View {
                    handle: rows(&x.handle, start, len, k * es),
                    shape: vec![k, len],
                    strides: vec![1, k],
                    offset: 0,
                };
                sums.add(self, i, &xt, &dl)?;
            }
        }
        if let Some(sums) = sums {
            sums.finish(self);
        }
        self.give_back(s, x, v);
        for (computed, into) in [dx, dw].into_iter().flatten() {
            if let Some(into) = into {
                let to = if x.dtype == DType::BF16 {
                    Narrow::Bf16
                } else {
                    Narrow::F16
                };
                cast::launch_round(
                    self.client,
                    to,
                    &computed.handle,
                    &into.handle,
                    into.numel(),
                );
                if let Some(pool) = self.recycled {
                    pool.give(computed);
                }
            }
        }
        Ok(())
    }
}

/// `dw = Σ_blocks xᵀ·dl`: the first block's product into `dw`, each
/// later one added to it, by cuBLASLt in place (`β = 1`) where it takes
/// the product; elsewhere into a scratch matrix, added to `dw` out of
/// place (WebGPU forbids a writable binding aliasing another), and the sum
/// copied back.
struct WeightSum {
    dw: DevTensor,
    /// (the block's product, the sum), for sums out of place.
    apart: Option<(DevTensor, DevTensor)>,
}

impl WeightSum {
    fn new(dw: &DevTensor) -> WeightSum {
        WeightSum {
            dw: dw.clone(),
            apart: None,
        }
    }

    fn add<R: Runtime>(
        &mut self,
        ctx: &Ctx<'_, R>,
        i: usize,
        xt: &View,
        dl: &View,
    ) -> Result<(), GpuError> {
        let (e, dw) = (self.dw.elem, view_of(&self.dw));
        if i == 0 {
            return ctx.gemm(e, xt, dl, &dw);
        }
        if let Some(vendor) = ctx.vendor {
            let done = vendor
                .matmul(ctx.client, e, xt, dl, &dw, ctx.fast_matmul, true)
                .map_err(|err| ctx.err(err.to_string()))?;
            if done {
                return Ok(());
            }
        }
        let (product, sum) = self.apart.get_or_insert_with(|| {
            let take = || {
                let bytes = self.dw.numel() * e.size();
                let h = Recycled::or_empty(ctx.recycled, ctx.client, bytes);
                DevTensor::dense(h, self.dw.shape.clone(), self.dw.dtype, e)
            };
            (take(), take())
        });
        let (product, sum) = (view_of(product), view_of(sum));
        matmul::launch_matmul(ctx.client, e, xt, dl, &product, ctx.fast_matmul)
            .map_err(|err| ctx.err(err.to_string()))?;
        let add = [
            Instr::Input(0),
            Instr::Input(1),
            Instr::Binary(Binary::Add, 0, 1),
        ];
        elementwise::launch_elementwise(ctx.client, e, &add, &[dw.clone(), product], &sum)
            .map_err(|err| ctx.err(err.to_string()))?;
        copy::launch_copy(ctx.client, copy_elem(&self.dw), &sum, &dw);
        Ok(())
    }

    fn finish<R: Runtime>(self, ctx: &Ctx<'_, R>) {
        if let (Some(pool), Some((product, sum))) = (ctx.recycled, self.apart) {
            pool.give(product);
            pool.give(sum);
        }
    }
}
