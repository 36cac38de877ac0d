//! Buffers planned by liveness ([`Buffers::Planned`](super::Buffers)).
//!
//! An executor's run asks for the same buffers in the same order every time
//! its inputs have the same shapes: the graph, its op order and every
//! decision about views and slots are fixed when the executor is built. So
//! the first run with a set of input shapes is recorded, and the runs after
//! it follow a plan made from the recording:
//!
//! - **Recording** ([`Planner::request`] in a recording run): each request of
//!   the executor's exact size or more (`Recycled::exact_from`) gets a buffer
//!   of its own, an *object* the planner keeps a handle to, reused for a
//!   later request of half its size to its whole size (the smallest such
//!   object first) once nothing else refers to it (CubeCL's `can_mut`: no
//!   value, view, output or copy holds a clone). Without the lower bound a
//!   small value could take the logits' buffer, and the next logits would
//!   need another: SmolLM2's first step at batch 32 reserved 63.0 GiB so,
//!   against 55.9 with reuse by equal size only (BENCHMARKS.md, thirtieth
//!   session).
//!   When the planner next looks (at every request, and at the end of the
//!   run), a request whose object is free is marked dead from then on.
//! - **Layout** ([`layout`], made when the next run starts): the requests
//!   that die within the run, or between its end and the next start (a
//!   trainer's gradients, dropped after the update), are placed at offsets
//!   in a few large buffers (*arenas*, none over the device's largest
//!   buffer), largest first, each where it overlaps no request alive at the
//!   same time, in the smallest gap that holds it (TensorFlow Lite's
//!   "greedy by size" offsets). A request still alive then (an output the
//!   caller kept, or a value such an output views) is left out: it gets a
//!   buffer of its own in every run.
//! - **Replay**: request `k` of a later run gets its slice of an arena
//!   (`Handle::offset_start`/`offset_end`, which CubeCL applies to bindings
//!   and to vendor reads alike). A request whose size differs from the
//!   recording's ends the replay for that run (the rest get buffers of their
//!   own) and the next run records again.
//!
//! Why it is safe: within a run, two requests share bytes only where the
//! recording saw the first one dead (no handle to it anywhere) before the
//! second was asked for, and a run with the same input shapes takes the
//! same path. Across runs, a replay starts only where no slice of any arena
//! is alive (the arenas' handles have no clone but the planner's): where a
//! caller kept an output this time (the first micro-batch's gradients, kept
//! for the next one's sum), the run records instead, and that key's outputs
//! get buffers of their own from then on. Kernels run in the order they are
//! queued on the executor's stream (cuBLASLt's launches are ordered with
//! it), so a kernel that writes a reused slice runs after every kernel that
//! read the value before it, as with CubeCL's own reuse.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use caramba_kernels::cubecl::prelude::*;
use caramba_kernels::cubecl::server::Handle;

/// One recorded request: its size, and the index of the first request
/// asked for after it was seen dead (the number of requests when it died
/// after the last one, or between the run's end and the next run's
/// start); `None` when it outlived that.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Traced {
    pub bytes: u64,
    pub dead_from: Option<usize>,
}

/// Where each request of a recorded run goes in the runs after it.
#[derive(Debug)]
pub(crate) struct Layout {
    /// Each request's size, to check that a run follows the recording.
    pub bytes: Vec<u64>,
    /// Each request's arena and byte offset; `None`: a buffer of its own.
    pub place: Vec<Option<(usize, u64)>>,
    /// The arenas' sizes.
    pub arenas: Vec<u64>,
    /// The most bytes the placed requests hold at one time (unrounded):
    /// what no placement can go below.
    pub live_peak: u64,
    /// Bytes of the requests left out: those that outlive a run (outputs
    /// kept and their views) and any larger than an arena may be.
    pub escaped: u64,
}

/// A request placed in an arena: alive from request `start` until request
/// `end`, at `offset`, taking `size` bytes (rounded to the alignment).
struct Placed {
    start: usize,
    end: usize,
    offset: u64,
    size: u64,
}

/// Places the requests of `trace` that die within the run in arenas of at
/// most `cap` bytes each, offsets aligned to `align` bytes (see the module
/// documentation), starting from arenas of the sizes `given` (those another
/// executor's plan made: filled before any grows). A request larger than
/// `cap` is left out.
pub(crate) fn layout(trace: &[Traced], cap: u64, align: u64, given: &[u64]) -> Layout {
    let align = align.max(1);
    let round = |b: u64| b.max(1).div_ceil(align) * align;
    let n = trace.len();
    let mut items: Vec<usize> = (0..n)
        .filter(|&k| trace[k].dead_from.is_some() && round(trace[k].bytes) <= cap)
        .collect();
    items.sort_by_key(|&k| (std::cmp::Reverse(round(trace[k].bytes)), k));
    // Per arena: its size and what is placed in it.
    let mut arenas: Vec<(u64, Vec<Placed>)> = given.iter().map(|&g| (g, Vec::new())).collect();
    let mut place = vec![None; n];
    for k in items {
        let (start, end, size) = (
            k,
            trace[k].dead_from.expect("placed"),
            round(trace[k].bytes),
        );
        // (grows the arena, waste or growth, arena, offset): the smallest
        // fitting gap in any arena, else the least growth.
        let mut best: Option<(bool, u64, usize, u64)> = None;
        for (a, (asize, placed)) in arenas.iter().enumerate() {
            let mut busy: Vec<(u64, u64)> = placed
                .iter()
                .filter(|p| p.start < end && start < p.end)
                .map(|p| (p.offset, p.offset + p.size))
                .collect();
            busy.sort_unstable();
            let mut at = 0;
            let mut consider = |grows: bool, cost: u64, offset: u64| {
                if best.is_none_or(|b| (grows, cost) < (b.0, b.1)) {
                    best = Some((grows, cost, a, offset));
                }
            };
            for (o, e) in busy {
                if o >= at + size {
                    consider(false, o - at - size, at);
                }
                at = at.max(e);
            }
            if at + size <= *asize {
                consider(false, *asize - at - size, at);
            } else if at + size <= cap {
                consider(true, at + size - *asize, at);
            }
        }
        match best {
            Some((grows, _, a, offset)) => {
                let (asize, placed) = &mut arenas[a];
                if grows {
                    *asize = offset + size;
                }
                placed.push(Placed {
                    start,
                    end,
                    offset,
                    size,
                });
                place[k] = Some((a, offset));
            }
            None => {
                let first = Placed {
                    start,
                    end,
                    offset: 0,
                    size,
                };
                arenas.push((size, vec![first]));
                place[k] = Some((arenas.len() - 1, 0));
            }
        }
    }
    // The placed requests' live bytes over time: +bytes at the request,
    // −bytes where it is dead (before the request it is dead from).
    let mut delta = vec![0i128; n + 1];
    for (k, t) in trace.iter().enumerate() {
        if let (Some(_), Some(end)) = (place[k], t.dead_from) {
            delta[k] += t.bytes as i128;
            delta[end] -= t.bytes as i128;
        }
    }
    let (mut live, mut live_peak) = (0i128, 0i128);
    for d in delta {
        live += d;
        live_peak = live_peak.max(live);
    }
    Layout {
        bytes: trace.iter().map(|t| t.bytes).collect(),
        escaped: trace
            .iter()
            .zip(&place)
            .filter(|(_, p)| p.is_none())
            .map(|(t, _)| t.bytes)
            .sum(),
        place,
        arenas: arenas.into_iter().map(|(s, _)| s).collect(),
        live_peak: live_peak as u64,
    }
}

/// What tells one run's requests from another's: the inputs' names,
/// shapes and whether each was on the host, and the symbols given.
pub(crate) type RunKey = String;

/// A recorded request's buffer, and the request holding it now.
struct Object {
    handle: Handle,
    holder: Option<usize>,
}

enum Run {
    Idle,
    Record {
        key: RunKey,
        trace: Vec<Traced>,
        objects: Vec<Object>,
    },
    Replay {
        key: RunKey,
        layout: Arc<Layout>,
        next: usize,
        broken: bool,
    },
}

/// What the planner did, for reports and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanReport {
    /// Runs recorded, and runs that followed a plan to their end.
    pub recorded: usize,
    pub replayed: usize,
    /// Replays that met a request other than the recording's.
    pub broken: usize,
    /// Runs that found a value placed by an earlier run still held (an
    /// output its caller kept) and recorded instead of replaying.
    pub held: usize,
    /// The latest plan: its arenas' bytes, the most bytes its requests
    /// hold at one time, the bytes of requests left out (see `Layout::escaped`), and
    /// the number of requests placed.
    pub arena_bytes: u64,
    pub live_peak: u64,
    pub escaped: u64,
    pub placed: usize,
    /// CubeCL's reserved bytes just before the first plan's arenas were
    /// made (the recording's high-water mark), where the device says.
    pub reserved_before: Option<u64>,
}

/// The arenas of the executors of one device that share their values'
/// memory (an executor and those made by `GpuExecutor::sharing`): their
/// runs never overlap (each is one task on the device's thread) and every
/// placed value is dead when its run ends, so each run may use all of it.
/// An arena only grows: a plan that needs more replaces it with a larger
/// one, which every other plan fits too.
#[derive(Default)]
pub(crate) struct Arenas(Vec<Handle>);

/// The planner of one executor (see the module documentation).
pub(crate) struct Planner {
    cap: u64,
    align: u64,
    layouts: HashMap<RunKey, Arc<Layout>>,
    /// A finished recording whose outputs are judged when the next run
    /// starts: those dead by then are placed too.
    pending: Option<(RunKey, Vec<Traced>, Vec<Object>)>,
    /// Keys whose placed outputs were still held when a later run started
    /// (the first micro-batch's gradients, kept for the next one's sum):
    /// their outputs get buffers of their own from then on.
    outputs_kept: HashSet<RunKey>,
    arenas: Arc<std::sync::Mutex<Arenas>>,
    run: Run,
    pub report: PlanReport,
}

/// Offsets into arenas are multiples of this (wgpu's storage-binding
/// offsets must be multiples of 256 on most devices; CUDA's vector loads
/// and cuBLASLt want 16).
const ARENA_ALIGN: u64 = 256;

impl Planner {
    pub fn new<R: Runtime>(client: &ComputeClient<R>) -> Planner {
        let memory = &client.properties().memory;
        Planner {
            cap: memory.max_page_size,
            align: memory.alignment.max(ARENA_ALIGN),
            layouts: HashMap::new(),
            pending: None,
            outputs_kept: HashSet::new(),
            arenas: Default::default(),
            run: Run::Idle,
            report: PlanReport::default(),
        }
    }

    /// A planner of its own for another executor of the device, sharing
    /// this one's arenas (see [`Arenas`]).
    pub fn sharing(&self) -> Planner {
        Planner {
            layouts: HashMap::new(),
            pending: None,
            outputs_kept: HashSet::new(),
            arenas: self.arenas.clone(),
            run: Run::Idle,
            report: PlanReport::default(),
            ..*self
        }
    }

    /// Starts a run with inputs described by `key`: a replay where a run
    /// with the same key was recorded and nothing placed is still held,
    /// else a recording.
    pub fn start<R: Runtime>(&mut self, key: RunKey, client: &ComputeClient<R>) {
        // A run that ended in an error left its recording unfinished.
        self.run = Run::Idle;
        if let Some((done, mut trace, mut objects)) = self.pending.take() {
            if !self.outputs_kept.contains(&done) {
                let n = trace.len();
                see_dead(&mut trace, &mut objects, n);
            }
            drop(objects);
            self.plan(done, &trace);
        }
        let Some(layout) = self.layouts.get(&key).cloned() else {
            return self.record(key);
        };
        let mut arenas = self.arenas.lock().expect("arenas");
        // Every value placed by an earlier run must be dead: an output its
        // caller still holds is not (the arena's handle has another clone).
        if arenas.0.iter().any(|h| !h.can_mut()) {
            drop(arenas);
            self.report.held += 1;
            self.layouts.remove(&key);
            self.outputs_kept.insert(key.clone());
            return self.record(key);
        }
        let short = |a: usize| arenas.0.get(a).is_none_or(|h| h.size() < layout.arenas[a]);
        if (0..layout.arenas.len()).any(short) {
            if self.report.reserved_before.is_none() {
                // This executor's first plan: what its recording held
                // (dead now) goes back to the device before arenas grow.
                self.report.reserved_before = client.memory_usage().ok().map(|u| u.bytes_reserved);
                client.memory_cleanup();
            }
            for (a, &bytes) in layout.arenas.iter().enumerate() {
                if a == arenas.0.len() {
                    arenas
                        .0
                        .push(super::ops::exact_empty(client, bytes as usize));
                } else if arenas.0[a].size() < bytes {
                    // The old one goes back to CubeCL's persistent pool:
                    // nothing placed in it is alive (checked above).
                    arenas.0[a] = super::ops::exact_empty(client, bytes as usize);
                }
            }
        }
        drop(arenas);
        self.run = Run::Replay {
            key,
            layout,
            next: 0,
            broken: false,
        };
    }

    fn record(&mut self, key: RunKey) {
        self.run = Run::Record {
            key,
            trace: Vec::new(),
            objects: Vec::new(),
        };
    }

    /// Makes `key`'s layout from its recording, in the arenas as they are.
    fn plan(&mut self, key: RunKey, trace: &[Traced]) {
        let given: Vec<u64> = {
            let arenas = self.arenas.lock().expect("arenas");
            arenas.0.iter().map(Handle::size).collect()
        };
        let layout = layout(trace, self.cap, self.align, &given);
        self.report.arena_bytes = layout.arenas.iter().sum();
        self.report.live_peak = layout.live_peak;
        self.report.escaped = layout.escaped;
        self.report.placed = layout.place.iter().flatten().count();
        self.layouts.insert(key, Arc::new(layout));
    }

    /// A buffer of `bytes` for this run's next request.
    pub fn request<R: Runtime>(&mut self, bytes: usize, client: &ComputeClient<R>) -> Handle {
        let bytes = bytes as u64;
        match &mut self.run {
            Run::Idle => super::ops::exact_empty(client, bytes as usize),
            Run::Record { trace, objects, .. } => {
                let k = trace.len();
                see_dead(trace, objects, k);
                let fit = objects
                    .iter()
                    .enumerate()
                    .filter(|(_, o)| {
                        let size = o.handle.size();
                        o.holder.is_none() && size >= bytes && size <= bytes.saturating_mul(2)
                    })
                    .min_by_key(|(_, o)| o.handle.size())
                    .map(|(i, _)| i);
                let i = fit.unwrap_or_else(|| {
                    objects.push(Object {
                        handle: super::ops::exact_empty(client, bytes as usize),
                        holder: None,
                    });
                    objects.len() - 1
                });
                objects[i].holder = Some(k);
                trace.push(Traced {
                    bytes,
                    dead_from: None,
                });
                slice(&objects[i].handle, 0, bytes)
            }
            Run::Replay {
                layout,
                next,
                broken,
                ..
            } => {
                let k = *next;
                *next += 1;
                if !*broken && layout.bytes.get(k) != Some(&bytes) {
                    *broken = true;
                }
                match (*broken, layout.place.get(k).copied().flatten()) {
                    (false, Some((a, offset))) => {
                        slice(&self.arenas.lock().expect("arenas").0[a], offset, bytes)
                    }
                    _ => super::ops::exact_empty(client, bytes as usize),
                }
            }
        }
    }

    /// Ends the run: a recording waits for the next start (which judges
    /// its outputs) to become its key's layout; a replay that left the
    /// recording's path drops it, so the next run records again.
    pub fn end(&mut self) {
        match std::mem::replace(&mut self.run, Run::Idle) {
            Run::Idle => {}
            Run::Record {
                key,
                mut trace,
                mut objects,
            } => {
                let n = trace.len();
                see_dead(&mut trace, &mut objects, n);
                self.report.recorded += 1;
                self.pending = Some((key, trace, objects));
            }
            Run::Replay { key, broken, .. } => {
                if broken {
                    self.report.broken += 1;
                    self.layouts.remove(&key);
                } else {
                    self.report.replayed += 1;
                }
            }
        }
    }
}

/// `bytes` of `buffer` from `offset` on. The offsets are set, not added:
/// CubeCL's own handles may carry an `offset_end` (their size rounded up to
/// its alignment), and `size()` is the whole buffer's.
fn slice(buffer: &Handle, offset: u64, bytes: u64) -> Handle {
    let mut h = buffer.clone();
    h.offset_start = Some(offset);
    h.offset_end = Some(h.size() - offset - bytes);
    h
}

/// Marks the requests whose objects nothing else refers to as dead from
/// request `now` on, and frees their objects for reuse.
fn see_dead(trace: &mut [Traced], objects: &mut [Object], now: usize) {
    for o in objects.iter_mut() {
        if let Some(k) = o.holder {
            if o.handle.can_mut() {
                trace[k].dead_from = Some(now);
                o.holder = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests `(bytes, first, dead_from)` as a trace in request order.
    fn trace(reqs: &[(u64, Option<usize>)]) -> Vec<Traced> {
        reqs.iter()
            .map(|&(bytes, dead_from)| Traced { bytes, dead_from })
            .collect()
    }

    /// No two requests alive at once share a byte, every placed one lies
    /// inside its arena, offsets are aligned and arenas are within `cap`.
    fn check(t: &[Traced], l: &Layout, cap: u64, align: u64) {
        for a in &l.arenas {
            assert!(*a <= cap, "arena {a} over {cap}");
        }
        let placed: Vec<(usize, usize, usize, u64, u64)> = (0..t.len())
            .filter_map(|k| {
                l.place[k].map(|(a, o)| (k, t[k].dead_from.unwrap(), a, o, o + t[k].bytes))
            })
            .collect();
        for &(_, _, a, o, e) in &placed {
            assert_eq!(o % align, 0);
            assert!(e <= l.arenas[a]);
        }
        for (i, p) in placed.iter().enumerate() {
            for q in &placed[i + 1..] {
                let together = p.0 < q.1 && q.0 < p.1;
                let share = p.2 == q.2 && p.3 < q.4 && q.3 < p.4;
                assert!(!(together && share), "{p:?} and {q:?} overlap");
            }
        }
    }

    #[test]
    fn values_alive_at_once_never_share_bytes() {
        // A small LCG: many traces of mixed sizes and lifetimes.
        let mut state = 7u64;
        let mut next = |m: u64| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % m
        };
        for _ in 0..200 {
            let n = 1 + next(60) as usize;
            let t: Vec<Traced> = (0..n)
                .map(|k| Traced {
                    bytes: 1 + next(5000),
                    dead_from: (next(8) != 0).then(|| k + 1 + next((n - k) as u64) as usize),
                })
                .collect();
            for (cap, align) in [(u64::MAX, 256), (8192, 256), (6000, 16)] {
                let l = layout(&t, cap, align, &[]);
                check(&t, &l, cap, align);
                let arena: u64 = l.arenas.iter().sum();
                assert!(arena >= l.live_peak);
                let escaped = t.iter().filter(|x| x.dead_from.is_none()).count();
                let too_big = t
                    .iter()
                    .filter(|x| x.bytes.div_ceil(align) * align > cap)
                    .count();
                assert!(l.place.iter().flatten().count() + escaped >= n - too_big);
            }
        }
    }

    #[test]
    fn a_dead_value_leaves_its_bytes_to_the_next() {
        // Three 1 KiB values one after another, each dead before the next:
        // one slot serves all three. A fourth alive with the third takes
        // the bytes after it; an output is never placed.
        let t = trace(&[
            (1024, Some(1)),
            (1024, Some(2)),
            (1024, Some(4)),
            (512, Some(4)),
            (4096, None),
        ]);
        let l = layout(&t, u64::MAX, 256, &[]);
        check(&t, &l, u64::MAX, 256);
        assert_eq!(l.arenas, vec![1536]);
        assert_eq!(l.place[0], Some((0, 0)));
        assert_eq!(l.place[1], Some((0, 0)));
        assert_eq!(l.place[4], None);
        assert_eq!((l.live_peak, l.escaped), (1536, 4096));
    }

    #[test]
    fn small_values_fill_the_gaps_of_a_large_dead_one() {
        // A 4 KiB value dies; four 1 KiB ones alive together fit in its
        // bytes, so the plan needs no more than the large one.
        let t = trace(&[
            (4096, Some(1)),
            (1024, Some(5)),
            (1024, Some(5)),
            (1024, Some(5)),
            (1024, Some(5)),
        ]);
        let l = layout(&t, u64::MAX, 256, &[]);
        check(&t, &l, u64::MAX, 256);
        assert_eq!(l.arenas, vec![4096]);
        // With a cap under the large one, it has a buffer of its own and
        // the four small ones fill two arenas.
        let l = layout(&t, 2048, 256, &[]);
        check(&t, &l, 2048, 256);
        assert_eq!(l.place[0], None, "over the cap: a buffer of its own");
        assert_eq!(l.arenas.iter().sum::<u64>(), 4096);
    }

    #[test]
    fn a_plan_fills_the_arenas_another_made_before_growing_them() {
        let t = trace(&[(1024, Some(1)), (2048, Some(2))]);
        let l = layout(&t, u64::MAX, 256, &[4096]);
        check(&t, &l, u64::MAX, 256);
        assert_eq!(l.arenas, vec![4096]);
        let l = layout(&t, u64::MAX, 256, &[1024]);
        check(&t, &l, u64::MAX, 256);
        assert_eq!(l.arenas, vec![2048]);
    }
}
