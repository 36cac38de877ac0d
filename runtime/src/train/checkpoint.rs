//! Resumable training checkpoints.
//!
//! A checkpoint folder holds one directory per saved step and a pointer to
//! the newest:
//!
//! ```text
//! <root>/step_<N>/model.safetensors      weights, f32, Hugging Face names
//!                /optimizer.safetensors  <param>.m, <param>.v
//!                /state.json             step, RNG, data position, optimizer,
//!                                        schedule, model fingerprint, run
//! <root>/latest                          "step_<N>"
//! ```
//!
//! A save writes everything into `step_<N>.tmp/`, syncs it, renames it to
//! `step_<N>/`, then rewrites `latest` (temporary file, then rename). A crash
//! at any point leaves `latest` naming a complete checkpoint; the debris of
//! an interrupted save is removed by the next one. This assumes one writer
//! per folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use caramba_ir::reference::Tensor;
use serde::{Deserialize, Serialize};

use super::{f32_data, LrSchedule, Optimizer, OptimizerConfig, Params, TrainError};
use crate::checkpoint::{write_f32_safetensors, write_text, SafetensorsStore};

const MODEL_FILE: &str = "model.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "state.json";
const LATEST_FILE: &str = "latest";

/// The contents of `state.json`: everything besides tensors that a resumed
/// run needs to continue exactly where the saved one stood.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainState {
    /// Training steps completed.
    pub step: u64,
    /// The data sampler's [`SplitMix64`](crate::rng::SplitMix64) state.
    pub rng_state: u64,
    /// Position in the data stream (for sequential readers).
    pub data_position: u64,
    pub optimizer: OptimizerConfig,
    /// The optimizer's own step count (AdamW's bias correction).
    pub optimizer_steps: u64,
    pub schedule: LrSchedule,
    /// [`model_fingerprint`] of the parameters.
    pub model_fingerprint: String,
    pub manifest_name: String,
    pub run_id: String,
    pub caramba_version: String,
}

/// What to save at one step. Tensors are borrowed: saving copies one tensor
/// at a time, never the whole model.
#[derive(Clone, Copy, Debug)]
pub struct SaveRequest<'a> {
    pub params: &'a Params,
    pub optimizer: &'a Optimizer,
    pub schedule: LrSchedule,
    pub step: u64,
    pub rng_state: u64,
    pub data_position: u64,
    pub manifest_name: &'a str,
    pub run_id: &'a str,
}

/// A checkpoint read back by [`load_checkpoint`].
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedCheckpoint {
    /// The `step_<N>` directory it came from.
    pub dir: PathBuf,
    pub params: Params,
    pub optimizer: Optimizer,
    pub state: TrainState,
}

/// Saves checkpoints under one folder, keeping the newest `keep_last`.
#[derive(Clone, Debug)]
pub struct Checkpointer {
    root: PathBuf,
    keep_last: usize,
}

impl Checkpointer {
    /// Checkpoints under `root` (created on first save); `keep_last = 0`
    /// keeps every checkpoint.
    pub fn new(root: impl Into<PathBuf>, keep_last: usize) -> Self {
        Checkpointer {
            root: root.into(),
            keep_last,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Saves `req` as `step_<req.step>/`, points `latest` at it and deletes
    /// all but the newest `keep_last` checkpoints. Returns the new directory.
    pub fn save(&self, req: &SaveRequest<'_>) -> Result<PathBuf, TrainError> {
        self.save_inner(req, false)
    }

    /// The save, optionally stopping as a crash would after the temporary
    /// directory is complete but before it is committed (for tests).
    fn save_inner(&self, req: &SaveRequest<'_>, crash: bool) -> Result<PathBuf, TrainError> {
        let root = &self.root;
        std::fs::create_dir_all(root).map_err(|e| TrainError::io(root, e))?;
        let name = step_dir_name(req.step);
        let tmp = root.join(format!("{name}.tmp"));
        let dir = root.join(&name);
        if tmp.exists() {
            remove_dir(&tmp)?;
        }
        std::fs::create_dir(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        if let Err(e) = write_contents(&tmp, req) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        sync_dir(&tmp);
        if crash {
            return Err(TrainError::bad(&tmp, "simulated crash before commit"));
        }

        // Commit: the directory appears whole under its final name.
        if dir.exists() {
            // Saving a step again (a rerun from an earlier checkpoint): move
            // the old one aside first, since a rename cannot replace a
            // non-empty directory.
            let old = root.join(format!("{name}.old"));
            if old.exists() {
                remove_dir(&old)?;
            }
            std::fs::rename(&dir, &old).map_err(|e| TrainError::io(&dir, e))?;
            std::fs::rename(&tmp, &dir).map_err(|e| TrainError::io(&dir, e))?;
            remove_dir(&old)?;
        } else {
            std::fs::rename(&tmp, &dir).map_err(|e| TrainError::io(&dir, e))?;
        }
        sync_dir(root);
        write_text(&root.join(LATEST_FILE), &name)?;
        sync_dir(root);
        self.prune(&name)?;
        Ok(dir)
    }

    /// The directory `latest` points at, if any checkpoint was saved.
    pub fn latest(&self) -> Result<Option<PathBuf>, TrainError> {
        read_latest(&self.root)
    }

    /// Complete checkpoints as (step, directory), oldest first.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>, TrainError> {
        let mut out = Vec::new();
        if !self.root.is_dir() {
            return Ok(out);
        }
        let entries = std::fs::read_dir(&self.root).map_err(|e| TrainError::io(&self.root, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| TrainError::io(&self.root, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(step) = parse_step_dir_name(&name) {
                out.push((step, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Deletes checkpoints beyond the newest `keep_last` (never `latest`'s)
    /// and the debris of interrupted saves.
    fn prune(&self, latest: &str) -> Result<(), TrainError> {
        let entries = std::fs::read_dir(&self.root).map_err(|e| TrainError::io(&self.root, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| TrainError::io(&self.root, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let debris = [".tmp", ".old"].iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|stem| parse_step_dir_name(stem).is_some())
            });
            if debris {
                remove_dir(&entry.path())?;
            }
        }
        if self.keep_last == 0 {
            return Ok(());
        }
        let all = self.list()?;
        let excess = all.len().saturating_sub(self.keep_last);
        for (_, dir) in &all[..excess] {
            if dir.file_name().is_some_and(|n| n != latest) {
                remove_dir(dir)?;
            }
        }
        Ok(())
    }
}

/// `step_<N>`.
fn step_dir_name(step: u64) -> String {
    format!("step_{step}")
}

/// N for a name `step_<N>` (digits only), else `None`.
fn parse_step_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step_")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn remove_dir(dir: &Path) -> Result<(), TrainError> {
    std::fs::remove_dir_all(dir).map_err(|e| TrainError::io(dir, e))
}

/// Flushes a directory's entries (new names, renames) to disk. Best effort:
/// not every platform can open a directory for syncing.
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn write_contents(dir: &Path, req: &SaveRequest<'_>) -> Result<(), TrainError> {
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);

    let shapes = param_shapes(req.params);
    let tensors: Vec<&Tensor> = req.params.values().collect();
    write_f32_safetensors(&dir.join(MODEL_FILE), &shapes, &metadata, |i| {
        Ok(f32_data(tensors[i], &shapes[i].0).to_vec())
    })?;

    let buffers = req.optimizer.state_buffers();
    let layout: Vec<(String, Vec<usize>)> = buffers
        .iter()
        .map(|(name, shape, _)| (name.clone(), shape.to_vec()))
        .collect();
    write_f32_safetensors(&dir.join(OPTIMIZER_FILE), &layout, &metadata, |i| {
        Ok(buffers[i].2.to_vec())
    })?;

    let state = TrainState {
        step: req.step,
        rng_state: req.rng_state,
        data_position: req.data_position,
        optimizer: *req.optimizer.config(),
        optimizer_steps: req.optimizer.step_count(),
        schedule: req.schedule,
        model_fingerprint: model_fingerprint(&shapes),
        manifest_name: req.manifest_name.to_string(),
        run_id: req.run_id.to_string(),
        caramba_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let json = serde_json::to_string_pretty(&state).expect("TrainState always serializes");
    write_text(&dir.join(STATE_FILE), &json)?;
    Ok(())
}

/// The (name, shape) of each parameter, in name order.
pub fn param_shapes(params: &Params) -> Vec<(String, Vec<usize>)> {
    params
        .iter()
        .map(|(name, t)| (name.clone(), t.shape().to_vec()))
        .collect()
}

/// A short identity of a model's parameters: FNV-1a (64-bit) over the sorted
/// names and shapes, as `fnv1a64:<16 hex digits>`. Two models with the same
/// fingerprint have the same parameter names and shapes.
pub fn model_fingerprint(params: &[(String, Vec<usize>)]) -> String {
    let mut sorted: Vec<&(String, Vec<usize>)> = params.iter().collect();
    sorted.sort();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            hash ^= b as u64;
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for (name, shape) in sorted {
        feed(name.as_bytes());
        feed(b"\0");
        for d in shape {
            feed(&(*d as u64).to_le_bytes());
        }
        feed(b"\n");
    }
    format!("fnv1a64:{hash:016x}")
}

fn read_latest(root: &Path) -> Result<Option<PathBuf>, TrainError> {
    let path = root.join(LATEST_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(TrainError::io(&path, e)),
    };
    let name = text.trim();
    if parse_step_dir_name(name).is_none() {
        return Err(TrainError::bad(
            &path,
            format!("expected `step_<N>`, found {name:?}"),
        ));
    }
    let dir = root.join(name);
    if !dir.is_dir() {
        return Err(TrainError::bad(
            &path,
            format!("points at {name}, which does not exist"),
        ));
    }
    Ok(Some(dir))
}

/// Loads a training checkpoint: `path` is a `step_<N>` directory, or a
/// checkpoint folder whose `latest` names one. `expected` lists the model's
/// parameters (name, shape); a checkpoint of another model is a
/// [`TrainError::ModelMismatch`] listing every differing parameter.
pub fn load_checkpoint(
    path: &Path,
    expected: &[(String, Vec<usize>)],
) -> Result<LoadedCheckpoint, TrainError> {
    let dir = if path.join(STATE_FILE).is_file() {
        path.to_path_buf()
    } else if let Some(dir) = read_latest(path)? {
        dir
    } else {
        return Err(TrainError::bad(
            path,
            format!("found neither {STATE_FILE} (a step directory) nor {LATEST_FILE} (a checkpoint folder)"),
        ));
    };

    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| TrainError::io(&state_path, e))?;
    let state: TrainState =
        serde_json::from_str(&text).map_err(|e| TrainError::bad(&state_path, e.to_string()))?;

    let model_path = dir.join(MODEL_FILE);
    let model = SafetensorsStore::open_file(&model_path)?;
    let mismatches = compare(expected, &model);
    if !mismatches.is_empty() {
        return Err(TrainError::ModelMismatch {
            path: dir,
            mismatches,
        });
    }
    if state.model_fingerprint != model_fingerprint(expected) {
        return Err(TrainError::bad(
            &state_path,
            format!(
                "model_fingerprint {} does not match the tensors of {MODEL_FILE} ({})",
                state.model_fingerprint,
                model_fingerprint(expected)
            ),
        ));
    }
    let mut params = Params::new();
    for (name, _) in expected {
        let (shape, data) = model.tensor_f32(name)?;
        params.insert(name.clone(), Tensor::f32(shape, data));
    }

    let opt_path = dir.join(OPTIMIZER_FILE);
    let store = SafetensorsStore::open_file(&opt_path)?;
    let mut buffers = Vec::new();
    for name in store.names() {
        let (shape, data) = store.tensor_f32(&name)?;
        buffers.push((name, Tensor::f32(shape, data)));
    }
    let optimizer =
        Optimizer::from_state(state.optimizer, state.optimizer_steps, buffers, expected)
            .map_err(|message| TrainError::bad(&opt_path, message))?;

    Ok(LoadedCheckpoint {
        dir,
        params,
        optimizer,
        state,
    })
}

/// Every difference between the expected parameters and the checkpoint's
/// tensors, one line each.
fn compare(expected: &[(String, Vec<usize>)], model: &SafetensorsStore) -> Vec<String> {
    let mut out = Vec::new();
    let mut wanted = std::collections::BTreeSet::new();
    for (name, shape) in expected {
        wanted.insert(name.as_str());
        match model.shape(name) {
            None => out.push(format!("`{name}` {shape:?}: missing from the checkpoint")),
            Some(found) if &found != shape => out.push(format!(
                "`{name}`: the model has shape {shape:?}, the checkpoint {found:?}"
            )),
            Some(_) => {}
        }
    }
    for name in model.names() {
        if !wanted.contains(name.as_str()) {
            let shape = model.shape(&name).unwrap_or_default();
            out.push(format!(
                "`{name}` {shape:?}: in the checkpoint but not in the model"
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn scratch(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("caramba-train-ckpt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn model(seed: u64) -> Params {
        let mut rng = SplitMix64::new(seed);
        let mut t = |shape: Vec<usize>| {
            let n = shape.iter().product();
            let data = (0..n).map(|_| rng.next_f64() as f32 - 0.5).collect();
            Tensor::f32(shape, data)
        };
        Params::from([
            ("model.embed_tokens.weight".to_string(), t(vec![8, 4])),
            (
                "model.layers.0.mlp.up_proj.weight".to_string(),
                t(vec![6, 4]),
            ),
            ("model.norm.weight".to_string(), t(vec![4])),
        ])
    }

    /// A model after `steps` AdamW steps on pseudo-random gradients.
    fn trained(steps: u64) -> (Params, Optimizer) {
        let mut params = model(1);
        let mut opt = Optimizer::new(OptimizerConfig::adamw(0.1));
        for s in 0..steps {
            let grads = model(100 + s);
            opt.step(&mut params, &grads, 1e-2);
        }
        (params, opt)
    }

    fn request<'a>(params: &'a Params, opt: &'a Optimizer, step: u64, rng: u64) -> SaveRequest<'a> {
        SaveRequest {
            params,
            optimizer: opt,
            schedule: LrSchedule::cosine(3e-4, 1000).with_warmup(10),
            step,
            rng_state: rng,
            data_position: step * 4096,
            manifest_name: "tiny",
            run_id: "tiny_20250101_000000",
        }
    }

    fn bits(params: &Params) -> Vec<(String, Vec<u32>)> {
        params
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    t.as_f32().unwrap().iter().map(|x| x.to_bits()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn save_then_load_is_bit_identical() {
        let root = scratch("roundtrip");
        let (params, opt) = trained(3);
        let mut rng = SplitMix64::new(7);
        rng.next_u64();
        let ckpt = Checkpointer::new(&root, 0);
        let dir = ckpt.save(&request(&params, &opt, 3, rng.state())).unwrap();
        assert_eq!(dir, root.join("step_3"));
        assert_eq!(
            std::fs::read_to_string(root.join("latest")).unwrap(),
            "step_3\n"
        );

        let shapes = param_shapes(&params);
        let loaded = load_checkpoint(&root, &shapes).unwrap();
        assert_eq!(loaded.dir, dir);
        assert_eq!(bits(&loaded.params), bits(&params));
        assert_eq!(loaded.optimizer, opt);
        assert_eq!(loaded.state.step, 3);
        assert_eq!(loaded.state.optimizer_steps, 3);
        assert_eq!(loaded.state.data_position, 3 * 4096);
        assert_eq!(
            loaded.state.schedule,
            LrSchedule::cosine(3e-4, 1000).with_warmup(10)
        );
        assert_eq!(loaded.state.caramba_version, env!("CARGO_PKG_VERSION"));
        let mut resumed = SplitMix64::from_state(loaded.state.rng_state);
        assert_eq!(resumed.next_u64(), rng.next_u64());

        // The step directory loads directly too, and training continues
        // identically from either copy.
        let again = load_checkpoint(&dir, &shapes).unwrap();
        assert_eq!(again, loaded);
        let (mut a, mut opt_a) = (params.clone(), opt.clone());
        let (mut b, mut opt_b) = (loaded.params, loaded.optimizer);
        opt_a.step(&mut a, &model(99), 1e-2);
        opt_b.step(&mut b, &model(99), 1e-2);
        assert_eq!(bits(&a), bits(&b));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn optimizer_state_file_uses_param_dot_m_names() {
        let root = scratch("names");
        let (params, opt) = trained(1);
        let dir = Checkpointer::new(&root, 0)
            .save(&request(&params, &opt, 1, 0))
            .unwrap();
        let store = SafetensorsStore::open_file(&dir.join(OPTIMIZER_FILE)).unwrap();
        assert_eq!(
            store.names(),
            [
                "model.embed_tokens.weight.m",
                "model.embed_tokens.weight.v",
                "model.layers.0.mlp.up_proj.weight.m",
                "model.layers.0.mlp.up_proj.weight.v",
                "model.norm.weight.m",
                "model.norm.weight.v",
            ]
        );
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(STATE_FILE)).unwrap()).unwrap();
        assert_eq!(state["optimizer"]["kind"], "adamw");
        assert_eq!(state["optimizer"]["beta2"], 0.95);
        assert_eq!(state["schedule"]["kind"], "cosine");
        assert_eq!(state["manifest_name"], "tiny");
        assert!(state["model_fingerprint"]
            .as_str()
            .unwrap()
            .starts_with("fnv1a64:"));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn crash_before_commit_keeps_latest_on_the_previous_checkpoint() {
        let root = scratch("crash");
        let ckpt = Checkpointer::new(&root, 0);
        let (p1, o1) = trained(1);
        ckpt.save(&request(&p1, &o1, 1, 11)).unwrap();

        let (p2, o2) = trained(2);
        let err = ckpt
            .save_inner(&request(&p2, &o2, 2, 22), true)
            .unwrap_err();
        assert!(err.to_string().contains("simulated crash"), "{err}");
        // The crash left a complete temporary directory and nothing else.
        assert!(root.join("step_2.tmp").join(STATE_FILE).is_file());
        assert!(!root.join("step_2").exists());
        assert_eq!(ckpt.latest().unwrap(), Some(root.join("step_1")));
        assert_eq!(ckpt.list().unwrap(), [(1, root.join("step_1"))]);

        let loaded = load_checkpoint(&root, &param_shapes(&p1)).unwrap();
        assert_eq!(loaded.state.step, 1);
        assert_eq!(loaded.state.rng_state, 11);
        assert_eq!(bits(&loaded.params), bits(&p1));
        assert_eq!(loaded.optimizer, o1);

        // The next save clears the debris.
        ckpt.save(&request(&p2, &o2, 2, 22)).unwrap();
        assert!(!root.join("step_2.tmp").exists());
        assert_eq!(
            load_checkpoint(&root, &param_shapes(&p2))
                .unwrap()
                .state
                .step,
            2
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn keeps_only_the_last_k() {
        let root = scratch("keep");
        let ckpt = Checkpointer::new(&root, 2);
        let (params, opt) = trained(1);
        for step in [10, 20, 30, 40] {
            ckpt.save(&request(&params, &opt, step, 0)).unwrap();
        }
        assert_eq!(
            ckpt.list().unwrap(),
            [(30, root.join("step_30")), (40, root.join("step_40"))]
        );
        assert_eq!(ckpt.latest().unwrap(), Some(root.join("step_40")));

        // Saving an existing step again replaces it.
        let (newer, opt2) = trained(2);
        ckpt.save(&request(&newer, &opt2, 40, 5)).unwrap();
        let loaded = load_checkpoint(&root, &param_shapes(&newer)).unwrap();
        assert_eq!(bits(&loaded.params), bits(&newer));
        assert_eq!(ckpt.list().unwrap().len(), 2);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn another_model_is_a_clear_error() {
        let root = scratch("mismatch");
        let (params, opt) = trained(1);
        Checkpointer::new(&root, 0)
            .save(&request(&params, &opt, 1, 0))
            .unwrap();
        let other = vec![
            ("model.embed_tokens.weight".to_string(), vec![8, 4]),
            ("model.layers.0.mlp.up_proj.weight".to_string(), vec![12, 4]),
            (
                "model.layers.0.mlp.down_proj.weight".to_string(),
                vec![4, 12],
            ),
        ];
        let err = load_checkpoint(&root, &other).unwrap_err();
        let TrainError::ModelMismatch { mismatches, .. } = &err else {
            panic!("expected a model mismatch, got {err}");
        };
        assert_eq!(
            mismatches,
            &[
                "`model.layers.0.mlp.up_proj.weight`: the model has shape [12, 4], the checkpoint [6, 4]",
                "`model.layers.0.mlp.down_proj.weight` [4, 12]: missing from the checkpoint",
                "`model.norm.weight` [4]: in the checkpoint but not in the model",
            ]
        );
        let text = err.to_string();
        assert!(
            text.contains("different model (3 mismatching parameter(s))"),
            "{text}"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn not_a_checkpoint_is_a_clear_error() {
        let root = scratch("empty");
        std::fs::create_dir_all(&root).unwrap();
        let err = load_checkpoint(&root, &[]).unwrap_err().to_string();
        assert!(err.contains("found neither state.json"), "{err}");
        std::fs::write(root.join("latest"), "../elsewhere\n").unwrap();
        let err = load_checkpoint(&root, &[]).unwrap_err().to_string();
        assert!(err.contains("expected `step_<N>`"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn fingerprint_depends_on_names_and_shapes_not_order() {
        let a = vec![("x".to_string(), vec![2, 3]), ("y".to_string(), vec![4])];
        let b = vec![("y".to_string(), vec![4]), ("x".to_string(), vec![2, 3])];
        let c = vec![("x".to_string(), vec![3, 2]), ("y".to_string(), vec![4])];
        assert_eq!(model_fingerprint(&a), model_fingerprint(&b));
        assert_ne!(model_fingerprint(&a), model_fingerprint(&c));
        assert_eq!(model_fingerprint(&a).len(), "fnv1a64:".len() + 16);
    }

    #[test]
    fn stateless_optimizer_round_trips() {
        let root = scratch("sgd");
        let params = model(3);
        let opt = Optimizer::new(OptimizerConfig::sgd(0.0, 0.0));
        Checkpointer::new(&root, 0)
            .save(&request(&params, &opt, 0, 0))
            .unwrap();
        let loaded = load_checkpoint(&root, &param_shapes(&params)).unwrap();
        assert_eq!(loaded.optimizer, opt);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
