//! KV caches appended in place.
//!
//! A cached graph returns each cache as `present = concat(past, new)` along
//! its rows (`caramba_compiler::lower`, `CacheEntry`). Copying `past` into
//! a new buffer every step moved the whole cache a token, O(S) bytes and a
//! launch per cache, for one new row.
//!
//! Here the concatenation's buffer is `past`'s own, and only the new rows
//! are written, when:
//! - the caller moved `past` in ([`super::GpuExecutor::run_appending`]) and
//!   nothing else holds its buffer (CubeCL's `can_mut`: no clone, view or
//!   output of it anywhere), so no tensor can see the rows after `past`'s
//!   change;
//! - the rows are contiguous: every axis before the concatenation's is 1
//!   (one sequence, as `caramba sample` runs it);
//! - `past` is dense and its buffer has room after its rows.
//!
//! Rows `0..P` are never written, so a kernel still queued that reads
//! `past` reads what it would have; kernels of one stream run in order.
//! When the concatenation has to allocate (the first step, a cache that
//! outgrew its buffer, one held elsewhere), its new buffer has room for the
//! caller's `reserve_rows` rows, or half as many rows again as it needs (at
//! least 64 more) when that is not enough: a cache that grows step by step
//! is copied O(log S) times, not S times. The returned tensor's handle
//! ends at its rows (`offset_end`), so kernels and reads see exactly the
//! cache; the room is the rest of the handle's buffer.
//!
//! `CARAMBA_NO_APPEND=1` turns it off, for A/B runs.

use super::{ops, DevTensor};
use caramba_ir::{DType, Graph, NodeId, Op};
use caramba_kernels::cubecl::prelude::*;
use caramba_kernels::FloatElem;
use std::collections::HashMap;

/// The concatenations that may append to their first operand, by that
/// operand: a graph input read by nothing else and not an output, the
/// concatenation itself an output (a cache returned for the next call).
pub(super) fn appends(
    graph: &Graph,
    order: &[NodeId],
    uses: &HashMap<NodeId, usize>,
) -> HashMap<NodeId, NodeId> {
    if super::env_off("CARAMBA_NO_APPEND") {
        return HashMap::new();
    }
    let outputs: Vec<NodeId> = graph.outputs().iter().map(|(_, id)| *id).collect();
    order
        .iter()
        .copied()
        .filter_map(|c| {
            if !matches!(graph.node(c).op, Op::Concat { .. }) || !outputs.contains(&c) {
                return None;
            }
            let os = graph.operands(c);
            let past = *os.first()?;
            (matches!(graph.node(past).op, Op::Input { .. })
                && uses.get(&past) == Some(&1)
                && !outputs.contains(&past)
                && os.iter().filter(|&&o| o == past).count() == 1)
                .then_some((c, past))
        })
        .collect()
}

/// The buffer of a concatenation of `full` rows (storage `elem`) that
/// extends `past` along `axis`: `(buffer, true)` when it is `past`'s own
/// (past's rows are in place already), `(buffer, false)` for a new buffer
/// with room after its rows. `None` where the rows are not contiguous (the
/// concatenation allocates as any op does).
#[allow(clippy::too_many_arguments)]
pub(super) fn buffer<R: Runtime>(
    client: &ComputeClient<R>,
    recycled: &ops::Recycled,
    past: &DevTensor,
    full: &[usize],
    axis: usize,
    dtype: DType,
    elem: FloatElem,
    reserve_rows: usize,
) -> Option<(DevTensor, bool)> {
    let rows = full[axis];
    if rows == 0 || full[..axis].iter().any(|&d| d != 1) {
        return None;
    }
    let bytes = full.iter().product::<usize>() * elem.size();
    let h = &past.handle;
    let start = h.offset_start.unwrap_or(0);
    let room = h.size().saturating_sub(start);
    if past.is_dense() && past.elem == elem && h.can_mut() && room >= bytes as u64 {
        let mut handle = h.clone();
        handle.offset_end = Some(room - bytes as u64);
        return Some((DevTensor::dense(handle, full.to_vec(), dtype, elem), true));
    }
    let row_bytes = bytes / rows;
    let want = if reserve_rows >= rows {
        reserve_rows
    } else {
        rows + (rows / 2).max(64)
    };
    // Never more than the device's largest buffer (lavapipe: 128 MiB),
    // never less than the rows.
    let max = client.properties().memory.max_page_size as usize;
    let capacity = (want * row_bytes).min(max).max(bytes);
    let mut handle = ops::Recycled::or_empty(Some(recycled), client, capacity);
    let start = handle.offset_start.unwrap_or(0);
    handle.offset_end = Some(handle.size() - start - bytes as u64);
    Some((DevTensor::dense(handle, full.to_vec(), dtype, elem), false))
}
