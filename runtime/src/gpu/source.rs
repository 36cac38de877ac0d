//! `caramba compile --emit kernels`: the generated source of every kernel
//! a graph launches, as CubeCL's compilers write it.
//!
//! The kernels' `#[cube]` types are private to `caramba-kernels`; what is
//! public is their host-side `launch_*` functions, which need a live
//! client. So this module runs the graph once, node by node, on tiny
//! stand-in shapes (every symbol bound to 4, zero-filled inputs and
//! parameters), with CubeCL's compilation logger at level `full` writing
//! to a private file, and attributes each kernel compiled during a node's
//! launch to that node. A kernel compiled once is cached by CubeCL, so each
//! section is a distinct kernel, headed by the first node that needs it.
//!
//! Both targets compile offline, through [`offline`]'s compile-only
//! runtimes, so that the text is the same on every machine and needs no
//! GPU, driver or toolkit: WGSL from cubecl-wgpu's compiler for Mesa's
//! lavapipe described by constants ([`offline::wgsl::Lavapipe`]), and CUDA
//! C++ from cubecl-cpp's CUDA dialect for an H100 (`sm_90`, 32-lane planes;
//! [`offline::cuda::H100`], which needs the `cuda` feature). They are used
//! even where such a device is present. [`kernel_sources_on_wgpu_adapter`]
//! and [`kernel_sources_on_cuda_device`] capture the same text from a live
//! device, to check the offline runtimes against it.
//!
//! Shape-dependent choices (cubek's matmul routine, whether attention
//! stages its tiles in shared memory) follow the stand-in shapes, not a
//! real workload's.

#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub mod offline;

use super::{at, concrete, live_order, ops, DevTensor, GpuError};
use caramba_ir::reference::SymValues;
use caramba_ir::{Dim, Graph, NodeId, Op};
use caramba_kernels::cubecl::config::compilation::CompilationLogLevel;
use caramba_kernels::cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
use caramba_kernels::cubecl::prelude::*;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Which compiler writes the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// WGSL, from cubecl-wgpu's compiler.
    Wgsl,
    /// CUDA C++, from cubecl-cpp's CUDA dialect, for an H100 (`sm_90`),
    /// compiled offline.
    Cuda,
}

/// One distinct kernel: `title` names the node that first launches it
/// (`op @ scope`) and the kernel's CubeCL name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelSource {
    pub title: String,
    pub source: String,
}

/// The value each symbol takes in the stand-in run: 4, so that a linear
/// layer sees B·T = 16 rows and takes the GEMM of prefill and training, not
/// the few-row kernel of a decode step (`gemv`, up to 8 rows).
const STAND_IN_SYM: usize = 4;

const START: &str = "[START_KERNEL_COMPILATION]";
const END: &str = "[END_KERNEL_COMPILATION]";

/// Turns on CubeCL's full compilation log into a file of this process.
/// CubeCL's configuration is global and can be set once, before any use.
static LOG: OnceLock<Result<PathBuf, String>> = OnceLock::new();

fn log_file() -> Result<&'static PathBuf, GpuError> {
    LOG.get_or_init(|| {
        let path =
            std::env::temp_dir().join(format!("caramba-kernel-sources-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut config = CubeClRuntimeConfig::default();
        config.compilation.logger.file = Some(path.clone());
        config.compilation.logger.append = true;
        config.compilation.logger.level = CompilationLogLevel::Full;
        std::panic::catch_unwind(|| CubeClRuntimeConfig::set(config))
            .map(|_| path)
            .map_err(|_| {
                "CubeCL's configuration was already in use in this process; \
                 kernel sources must be generated before any other GPU work"
                    .to_string()
            })
    })
    .as_ref()
    .map_err(|e| GpuError::Device(e.clone()))
}

/// The generated source of each distinct kernel `graph` launches.
pub fn kernel_sources(graph: &Graph, target: Target) -> Result<Vec<KernelSource>, GpuError> {
    match target {
        #[cfg(feature = "wgpu")]
        Target::Wgsl => {
            let path = log_file()?;
            capture::<offline::wgsl::OfflineWgslRuntime>(
                &offline::wgsl::OfflineWgslDevice::default(),
                graph,
                path,
            )
        }
        #[cfg(not(feature = "wgpu"))]
        Target::Wgsl => Err(GpuError::Device(
            "WGSL needs caramba built with the `wgpu` feature".into(),
        )),
        #[cfg(feature = "cuda")]
        Target::Cuda => {
            let path = log_file()?;
            capture::<offline::cuda::OfflineCudaRuntime>(
                &offline::cuda::OfflineCudaDevice::default(),
                graph,
                path,
            )
        }
        #[cfg(not(feature = "cuda"))]
        Target::Cuda => Err(GpuError::Device(
            "CUDA source needs caramba built with the `cuda` feature (it builds and runs \
             offline, without CUDA or a GPU: `cargo build --release --features cuda`)"
                .into(),
        )),
    }
}

/// The WGSL of each distinct kernel `graph` launches, compiled by a live
/// client on the machine's CPU wgpu adapter (lavapipe), with the
/// properties that client read from it. Call it before any other GPU work
/// in the process: the compilation log must be set up before the first
/// client opens.
#[cfg(feature = "wgpu")]
pub fn kernel_sources_on_wgpu_adapter(
    graph: &Graph,
) -> Result<
    (
        Vec<KernelSource>,
        caramba_kernels::cubecl::ir::DeviceProperties,
    ),
    GpuError,
> {
    let path = log_file()?;
    if !caramba_kernels::wgpu_adapters().iter().any(|(_, cpu)| *cpu) {
        return Err(GpuError::Device("no CPU wgpu adapter".into()));
    }
    let device = super::WgpuDevice::Cpu;
    let sources = capture::<super::WgpuRuntime>(&device, graph, path)?;
    let properties = super::WgpuRuntime::client(&device).properties().clone();
    Ok((sources, properties))
}

/// The CUDA C++ of each distinct kernel `graph` launches, compiled by a
/// live client on CUDA device 0 (cubecl-cuda pipes each source through
/// `clang-format` when one is installed). Call it before any other GPU
/// work in the process: the compilation log must be set up before the
/// first client opens.
#[cfg(feature = "cuda")]
pub fn kernel_sources_on_cuda_device(graph: &Graph) -> Result<Vec<KernelSource>, GpuError> {
    let path = log_file()?;
    if !caramba_kernels::cuda_available() {
        return Err(GpuError::Device("no CUDA device".into()));
    }
    capture::<super::CudaRuntime>(&super::CudaDevice { index: 0 }, graph, path)
}

/// Runs the graph on stand-in values and collects the kernels compiled
/// per node from the log at `path`.
fn capture<R: Runtime>(
    device: &R::Device,
    graph: &Graph,
    path: &PathBuf,
) -> Result<Vec<KernelSource>, GpuError> {
    let order = live_order(graph)?;
    for &id in &order {
        ops::check_supported(graph, id)?;
    }
    let client = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| R::client(device)))
        .map_err(|_| GpuError::Device(format!("cannot open device {device:?} (no adapter?)")))?;
    let mut syms = SymValues::default();
    for &id in &order {
        for d in graph.node(id).ty.shape.dims() {
            if let Dim::Sym(s) = *d {
                syms.set(s, STAND_IN_SYM);
            }
        }
    }
    let lazy = lazy_transposes(graph, &order);
    let narrow = super::HalfStorage::of(&client);
    let mut uses: HashMap<NodeId, usize> = HashMap::new();
    for &id in &order {
        for o in graph.operands(id) {
            *uses.entry(o).or_default() += 1;
        }
    }
    for (_, id) in graph.outputs() {
        *uses.entry(*id).or_default() += 1;
    }
    let mut seen_log = log_len(path);
    let mut seen_sources = HashSet::new();
    let mut result = Vec::new();
    let mut values: HashMap<NodeId, DevTensor> = HashMap::new();
    // As the executor runs them: attention's `dq` and `dk‖dv` from one
    // launch, the second's value computed with the first.
    let pairs = super::grad_pairs(graph, &order);
    let mut computed: HashMap<NodeId, DevTensor> = HashMap::new();
    for &id in &order {
        let node = graph.node(id);
        let operands = graph.operands(id);
        let shape = concrete(&node.ty.shape, &syms, node)?;
        let value = match &node.op {
            _ if computed.contains_key(&id) => computed.remove(&id).expect("computed"),
            Op::Input { .. } | Op::Param { .. } => {
                let n: usize = shape.iter().product();
                // `F32` (4 bytes) for i32 tensors too.
                let elem = narrow.elem(node.ty.dtype);
                let handle = client.create_from_slice(&vec![0u8; n.max(1) * elem.size()]);
                DevTensor::dense(handle, shape, node.ty.dtype, elem)
            }
            Op::Permute(_) if lazy.contains(&id) => {
                let x = &values[&operands[0]];
                DevTensor {
                    transposed: !x.transposed,
                    shape,
                    ..x.clone()
                }
            }
            _ => {
                let args: Vec<&DevTensor> = operands.iter().map(|o| &values[o]).collect();
                let second = match pairs.get(&id) {
                    Some(&sibling) => {
                        let snode = graph.node(sibling);
                        let sshape = concrete(&snode.ty.shape, &syms, snode)?;
                        let elem = narrow.elem(snode.ty.dtype);
                        let n: usize = sshape.iter().product();
                        let handle = client.empty(n.max(1) * elem.size());
                        let t = DevTensor::dense(handle, sshape, snode.ty.dtype, elem);
                        computed.insert(sibling, t.clone());
                        Some(t)
                    }
                    None => None,
                };
                let ctx = ops::Ctx {
                    client: &client,
                    node,
                    fast_matmul: false,
                    vendor: None,
                    rope_freqs: None,
                    rope_table: None,
                    rope_slots: None,
                    narrow,
                    sum_batch: false,
                    transposed_sum: false,
                    recycled: None,
                    dest: None,
                    placed: &[],
                    second: second.as_ref(),
                    in_place: false,
                    loss_block_rows: None,
                    head_grads: None,
                };
                let out = ctx.apply(&args, shape)?;
                // Wait for the launch (and so its compilation) to finish,
                // then for the logger thread to write what it compiled.
                if out.numel() > 0 {
                    client
                        .read_one(out.handle.clone())
                        .map_err(|e| GpuError::Device(format!("{e:?}")))?;
                }
                let log = settled_log(path, seen_log);
                let fresh = log.get(seen_log..).unwrap_or("");
                seen_log = log.len();
                for (name, source) in parse_log(fresh) {
                    if seen_sources.insert(source.clone()) {
                        result.push(KernelSource {
                            title: format!("{} — {name}", at(node)),
                            source: normalize(&source),
                        });
                    }
                }
                out
            }
        };
        values.insert(id, value);
        for o in operands {
            let left = uses.get_mut(&o).expect("operand counted");
            *left -= 1;
            if *left == 0 {
                values.remove(&o);
            }
        }
    }
    // Empty the log (appended to) so that a later call starts afresh.
    if let Ok(f) = std::fs::OpenOptions::new().write(true).open(path) {
        let _ = f.set_len(0);
    }
    Ok(result)
}

/// Removes this process's compilation log. Call it once no more kernel
/// sources will be generated in this process (the CLI does, before exit).
pub fn discard_log() {
    if let Some(Ok(path)) = LOG.get() {
        let _ = std::fs::remove_file(path);
    }
}

/// Two compilers write declarations in hash order: the WGSL compiler a
/// function's mutable locals (`var l_mut_N: T;`), cubecl-cpp a CUDA
/// kernel's mutable locals (`T l_mut_N;`), the vector types it uses
/// (`struct __align__(A) T { … };`) and, from a live CUDA client, its shared
/// memories (a comment and `T *shared_memory_N = …;`). Sort each run of
/// declarations of one kind (by `N`, types by their first line) so that the
/// text is the same from run to run.
fn normalize(source: &str) -> String {
    let lines: Vec<&str> = source.lines().collect();
    let mut out: Vec<&str> = Vec::with_capacity(lines.len());
    let mut i = 0;
    while i < lines.len() {
        let Some((first, _)) = declaration(&lines[i..]) else {
            out.push(lines[i]);
            i += 1;
            continue;
        };
        let mut run: Vec<(DeclKey, &[&str])> = Vec::new();
        let mut j = i;
        while let Some((key, len)) = declaration(&lines[j..]) {
            if key.0 != first.0 {
                break;
            }
            run.push((key, &lines[j..j + len]));
            j += len;
        }
        run.sort_by_key(|(key, _)| *key);
        out.extend(run.into_iter().flat_map(|(_, d)| d.iter().copied()));
        i = j;
    }
    out.join("\n")
}

/// How a declaration sorts: its kind, then its number, then its text.
type DeclKey<'a> = (u8, u64, &'a str);

/// The sort key and line count of the hash-ordered declaration that
/// `lines` starts with, if any.
fn declaration<'a>(lines: &[&'a str]) -> Option<(DeclKey<'a>, usize)> {
    let first = *lines.first()?;
    let number = |s: &str| -> Option<u64> {
        let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        s[..digits].parse().ok()
    };
    if let Some(rest) = first.strip_prefix("var l_mut_") {
        return Some(((0, number(rest)?, ""), 1));
    }
    if let Some((ty, rest)) = first.split_once(" l_mut_") {
        // `T l_mut_N;` with `T` a type name (not `return l_mut_N;`).
        let n: u64 = rest.strip_suffix(';')?.parse().ok()?;
        let is_type = ty.starts_with(|c: char| c.is_ascii_alphabetic())
            && ty.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !matches!(ty, "return" | "goto" | "throw" | "delete");
        return is_type.then_some(((1, n, ""), 1));
    }
    if first.starts_with("struct __align__(") && first.ends_with('{') {
        let end = lines.iter().position(|l| *l == "};")?;
        return Some(((2, 0, first), end + 1));
    }
    if first.starts_with("// Shared array size: ") || first.starts_with("// Shared value size: ") {
        let (_, rest) = lines.get(1)?.split_once("shared_memory_")?;
        return Some(((3, number(rest)?, ""), 2));
    }
    None
}

/// Permutes of the last two axes that feed only matmuls' operands (the
/// executor reads them through strides instead of copying).
fn lazy_transposes(graph: &Graph, order: &[NodeId]) -> HashSet<NodeId> {
    let outputs: HashSet<NodeId> = graph.outputs().iter().map(|(_, id)| *id).collect();
    order
        .iter()
        .copied()
        .filter(|&id| match &graph.node(id).op {
            Op::Permute(perm) => {
                let users = graph.users(id);
                ops::swaps_last_two(perm)
                    && !outputs.contains(&id)
                    && !users.is_empty()
                    && users.iter().all(|&u| ops::reads_transposed(graph, u, id))
            }
            _ => false,
        })
        .collect()
}

fn log_len(path: &PathBuf) -> usize {
    std::fs::metadata(path)
        .map(|m| m.len() as usize)
        .unwrap_or(0)
}

/// The log once it has stopped growing and holds no half-written entry.
fn settled_log(path: &PathBuf, from: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::new();
    let mut stable = 0;
    loop {
        std::thread::sleep(Duration::from_millis(5));
        let now = std::fs::read_to_string(path).unwrap_or_default();
        let tail = now.get(from..).unwrap_or("");
        let complete = tail.matches(START).count() == tail.matches(END).count();
        if now.len() == last.len() && complete {
            stable += 1;
        } else {
            stable = 0;
        }
        last = now;
        if stable >= 3 || Instant::now() > deadline {
            return last;
        }
    }
}

/// `(name, source)` of each complete entry of a full compilation log.
fn parse_log(log: &str) -> Vec<(String, String)> {
    let fence = "source:\n```";
    let mut out = Vec::new();
    for entry in log.split(START).skip(1) {
        let Some(body) = entry.split(END).next() else {
            continue;
        };
        let name = body
            .lines()
            .find_map(|l| l.strip_prefix("name: "))
            .unwrap_or("kernel")
            .trim()
            .trim_end_matches('<')
            .to_string();
        let Some(start) = body.find(fence) else {
            continue;
        };
        // Skip the fence's language tag.
        let rest = &body[start + fence.len()..];
        let source = rest.split_once('\n').map_or("", |(_, s)| s);
        let source = source.trim_end().strip_suffix("```").unwrap_or(source);
        out.push((name, source.trim_end().to_string()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn hash_ordered_declarations_are_sorted() {
        let cuda = "\
struct __align__(8) float_2 {
    float i_0;
    float i_1;
};
struct __align__(16) float_4 {
    float i_0;
};
struct info_st {
};
// Shared array size: 4, 16 bytes
float *shared_memory_9 = reinterpret_cast<float*>(&dynamic_shared_mem[0]);
// Shared value size: 4 bytes
float &shared_memory_3 = reinterpret_cast<float&>(dynamic_shared_mem[16]);
float_4 l_arr_4[1];
float l_mut_15;
float_4 l_mut_6;
uint32 l_mut_10;
l_mut_6 = l_5;
return l_mut_15;
return l_mut_10;";
        let want = "\
struct __align__(16) float_4 {
    float i_0;
};
struct __align__(8) float_2 {
    float i_0;
    float i_1;
};
struct info_st {
};
// Shared value size: 4 bytes
float &shared_memory_3 = reinterpret_cast<float&>(dynamic_shared_mem[16]);
// Shared array size: 4, 16 bytes
float *shared_memory_9 = reinterpret_cast<float*>(&dynamic_shared_mem[0]);
float_4 l_arr_4[1];
float_4 l_mut_6;
uint32 l_mut_10;
float l_mut_15;
l_mut_6 = l_5;
return l_mut_15;
return l_mut_10;";
        assert_eq!(normalize(cuda), want);
        let wgsl = "var l_mut_12: f32;\nvar l_mut_3: u32;\nlet l_4 = l_mut_3;";
        assert_eq!(
            normalize(wgsl),
            "var l_mut_3: u32;\nvar l_mut_12: f32;\nlet l_4 = l_mut_3;"
        );
    }
}
