//! Safetensors: a memory-mapped reader over one file or a sharded set
//! (`model.safetensors.index.json`), and a streaming f32 writer.
//!
//! Reading converts F32, F16 and BF16 to f32; other dtypes are an error
//! naming the tensor. The writer emits one file, tensors in the order given,
//! without holding them all in memory.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorInfo};
use safetensors::SafeTensors;

use super::CheckpointError;

/// One mapped `.safetensors` file.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Absolute offset of the data section (8 + header length).
    data_start: usize,
    infos: HashMap<String, TensorInfo>,
}

impl Shard {
    fn open(path: &Path) -> Result<Self, CheckpointError> {
        let file = File::open(path).map_err(|e| CheckpointError::io(path, e))?;
        // SAFETY: read-only map; we assume the file is not modified while open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| CheckpointError::io(path, e))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| CheckpointError::Safetensors {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let infos = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| (name, info.clone()))
            .collect();
        Ok(Shard {
            path: path.to_path_buf(),
            mmap,
            data_start: 8 + header_len,
            infos,
        })
    }
}

/// Tensors from one safetensors file or a sharded set.
pub struct SafetensorsStore {
    shards: Vec<Shard>,
    /// Tensor name → index into `shards`.
    index: BTreeMap<String, usize>,
}

impl std::fmt::Debug for SafetensorsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsStore")
            .field(
                "shards",
                &self.shards.iter().map(|s| &s.path).collect::<Vec<_>>(),
            )
            .field("tensors", &self.index.len())
            .finish()
    }
}

impl SafetensorsStore {
    /// Opens one `.safetensors` file.
    pub fn open_file(path: &Path) -> Result<Self, CheckpointError> {
        let shard = Shard::open(path)?;
        let index = shard.infos.keys().map(|n| (n.clone(), 0)).collect();
        Ok(SafetensorsStore {
            shards: vec![shard],
            index,
        })
    }

    /// Opens the shards listed in a `model.safetensors.index.json`
    /// (`{"weight_map": {tensor: file}}`), checking that each tensor is
    /// where the index says.
    pub fn open_index(index_path: &Path) -> Result<Self, CheckpointError> {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let text =
            std::fs::read_to_string(index_path).map_err(|e| CheckpointError::io(index_path, e))?;
        let parsed: Index =
            serde_json::from_str(&text).map_err(|e| CheckpointError::Safetensors {
                path: index_path.to_path_buf(),
                message: format!("invalid shard index: {e}"),
            })?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut shards = Vec::new();
        let mut shard_of_file: HashMap<&str, usize> = HashMap::new();
        let mut index = BTreeMap::new();
        for (tensor, file) in &parsed.weight_map {
            let shard = match shard_of_file.get(file.as_str()) {
                Some(&i) => i,
                None => {
                    let shard_path = dir.join(file);
                    if !shard_path.is_file() {
                        return Err(CheckpointError::MissingFile {
                            path: index_path.to_path_buf(),
                            what: format!("shard {} (listed for `{tensor}`)", shard_path.display()),
                        });
                    }
                    shards.push(Shard::open(&shard_path)?);
                    shard_of_file.insert(file, shards.len() - 1);
                    shards.len() - 1
                }
            };
            if !shards[shard].infos.contains_key(tensor) {
                return Err(CheckpointError::Safetensors {
                    path: shards[shard].path.clone(),
                    message: format!(
                        "tensor `{tensor}` is listed for this shard in {} but is not in it",
                        index_path.display()
                    ),
                });
            }
            index.insert(tensor.clone(), shard);
        }
        Ok(SafetensorsStore { shards, index })
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.index.keys().cloned().collect()
    }

    fn info(&self, name: &str) -> Option<(&Shard, &TensorInfo)> {
        let shard = &self.shards[*self.index.get(name)?];
        Some((shard, shard.infos.get(name)?))
    }

    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.info(name).map(|(_, i)| i.shape.clone())
    }

    pub fn dtype(&self, name: &str) -> Option<Dtype> {
        self.info(name).map(|(_, i)| i.dtype)
    }

    /// A tensor converted to f32, with its shape.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), CheckpointError> {
        let (shard, info) = self
            .info(name)
            .ok_or_else(|| CheckpointError::TensorNotFound {
                path: self
                    .shards
                    .first()
                    .map(|s| s.path.clone())
                    .unwrap_or_default(),
                tensor: name.to_string(),
            })?;
        let (start, end) = info.data_offsets;
        // `read_metadata` has checked the offsets against the file length.
        let bytes = &shard.mmap[shard.data_start + start..shard.data_start + end];
        let data: Vec<f32> = match info.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
            other => {
                return Err(CheckpointError::UnsupportedTensorType {
                    path: shard.path.clone(),
                    tensor: name.to_string(),
                    found: format!("{other:?}"),
                    supported: "F32, F16, BF16",
                })
            }
        };
        Ok((info.shape.clone(), data))
    }
}

/// Writes an f32 safetensors file to `path` atomically: the bytes go to a
/// temporary file in the same directory, renamed over `path` at the end.
///
/// `tensors` lists (name, shape) in file order; `fill(i)` produces tensor
/// `i`'s data when its turn comes, so only one tensor is in memory at a time.
pub fn write_f32_safetensors<F>(
    path: &Path,
    tensors: &[(String, Vec<usize>)],
    metadata: &BTreeMap<String, String>,
    mut fill: F,
) -> Result<(), CheckpointError>
where
    F: FnMut(usize) -> Result<Vec<f32>, CheckpointError>,
{
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::json!(metadata));
    }
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * 4;
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": "F32",
                "shape": shape,
                "data_offsets": [offset, offset + bytes],
            }),
        );
        offset += bytes;
    }
    let mut header = serde_json::to_vec(&header).expect("a JSON map always serializes");
    // Pad the header with spaces so the data section starts 8-byte aligned.
    header.resize(header.len().next_multiple_of(8), b' ');

    write_atomically(path, |out| {
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        for (i, (name, shape)) in tensors.iter().enumerate() {
            let data = fill(i).map_err(WriteError::Checkpoint)?;
            let want: usize = shape.iter().product();
            if data.len() != want {
                return Err(WriteError::Checkpoint(CheckpointError::BadShape {
                    path: path.to_path_buf(),
                    tensor: name.clone(),
                    shape: shape.clone(),
                    expected: format!(
                        "expected {want} values to write, the source gave {}",
                        data.len()
                    ),
                }));
            }
            out.write_all(bytemuck::cast_slice(&to_le(data)))?;
        }
        Ok(())
    })
}

/// f32 values as little-endian bit patterns (a no-op on little-endian hosts).
fn to_le(data: Vec<f32>) -> Vec<u32> {
    data.into_iter().map(|x| x.to_bits().to_le()).collect()
}

/// An error inside an atomic write: I/O, or one from producing the content.
pub(crate) enum WriteError {
    Io(std::io::Error),
    Checkpoint(CheckpointError),
}

impl From<std::io::Error> for WriteError {
    fn from(e: std::io::Error) -> Self {
        WriteError::Io(e)
    }
}

/// Writes `path` through a temporary sibling file renamed into place, so a
/// reader never sees a half-written file and a failure leaves no debris.
pub(crate) fn write_atomically<F>(path: &Path, write: F) -> Result<(), CheckpointError>
where
    F: FnOnce(&mut std::io::BufWriter<File>) -> Result<(), WriteError>,
{
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let file = File::create(&tmp).map_err(WriteError::Io)?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        write(&mut out)?;
        let file = out
            .into_inner()
            .map_err(|e| WriteError::Io(e.into_error()))?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        match e {
            WriteError::Io(source) => CheckpointError::io(path, source),
            WriteError::Checkpoint(e) => e,
        }
    })
}
