//! `NpyDataset`: a token stream cut into a training and a validation split,
//! served as next-token windows `(x, y)` with `y` = `x` shifted by one.
//!
//! The last `val_frac` of the tokens is the validation split; the rest is
//! training. Windows never cross from one split into the other. Random
//! batches come from a [`SplitMix64`], so a seed (or a saved RNG state)
//! fixes the batch sequence exactly.

use std::path::Path;

use super::npy::NpyTokens;
use super::DataError;
use crate::rng::SplitMix64;

/// Which part of the token stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Val,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

#[derive(Debug)]
enum Storage {
    Mapped(NpyTokens),
    Owned(Vec<u32>),
}

impl Storage {
    fn len(&self) -> usize {
        match self {
            Storage::Mapped(t) => t.len(),
            Storage::Owned(v) => v.len(),
        }
    }

    fn read_into(&self, start: usize, out: &mut [u32]) {
        match self {
            Storage::Mapped(t) => t.read_into(start, out),
            Storage::Owned(v) => out.copy_from_slice(&v[start..start + out.len()]),
        }
    }
}

/// Next-token training windows over a 1-D token array.
#[derive(Debug)]
pub struct NpyDataset {
    tokens: Storage,
    block_size: usize,
    /// Index of the first validation token; training is `0..val_start`.
    val_start: usize,
}

impl NpyDataset {
    /// The largest token id in the whole file (one pass; for checking the
    /// data against a model's vocabulary before training).
    pub fn max_token(&self) -> u32 {
        let n = self.tokens.len();
        let mut buf = vec![0u32; 1 << 16];
        let mut max = 0;
        let mut start = 0;
        while start < n {
            let k = (n - start).min(buf.len());
            self.tokens.read_into(start, &mut buf[..k]);
            max = buf[..k].iter().copied().fold(max, u32::max);
            start += k;
        }
        max
    }

    /// Opens a `.npy` token file (memory-mapped) with windows of
    /// `block_size` tokens; the last `val_frac` of it is validation.
    pub fn open(path: &Path, block_size: usize, val_frac: f64) -> Result<Self, DataError> {
        Self::new(
            Storage::Mapped(NpyTokens::open(path)?),
            block_size,
            val_frac,
        )
    }

    /// The same over tokens already in memory.
    pub fn from_tokens(
        tokens: Vec<u32>,
        block_size: usize,
        val_frac: f64,
    ) -> Result<Self, DataError> {
        Self::new(Storage::Owned(tokens), block_size, val_frac)
    }

    fn new(tokens: Storage, block_size: usize, val_frac: f64) -> Result<Self, DataError> {
        if block_size == 0 {
            return Err(DataError::Config("block_size must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&val_frac) {
            return Err(DataError::Config(format!(
                "val_frac must be in [0, 1), got {val_frac}"
            )));
        }
        let n = tokens.len();
        let n_val = (n as f64 * val_frac).round() as usize;
        let val_start = n - n_val;
        let need = block_size + 1;
        if val_start < need {
            return Err(DataError::TooFewTokens {
                split: Split::Train.name(),
                have: val_start,
                need,
                total: n,
                block_size,
            });
        }
        if val_frac > 0.0 && n_val < need {
            return Err(DataError::TooFewTokens {
                split: Split::Val.name(),
                have: n_val,
                need,
                total: n,
                block_size,
            });
        }
        Ok(Self {
            tokens,
            block_size,
            val_start,
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// All tokens, both splits.
    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// The token range a split covers.
    pub fn split_range(&self, split: Split) -> std::ops::Range<usize> {
        match split {
            Split::Train => 0..self.val_start,
            Split::Val => self.val_start..self.tokens.len(),
        }
    }

    /// Number of windows (start positions) in `split`; 0 for an empty split.
    pub fn split_len(&self, split: Split) -> usize {
        self.split_range(split)
            .len()
            .saturating_sub(self.block_size)
    }

    /// Number of training windows.
    pub fn len(&self) -> usize {
        self.split_len(Split::Train)
    }

    /// Never true: opening checks that training has at least one window.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Training window `i`: `x` = tokens `i..i+T`, `y` = tokens `i+1..i+T+1`.
    ///
    /// # Panics
    /// If `i >= len()`.
    pub fn get(&self, i: usize) -> (Vec<u32>, Vec<u32>) {
        self.get_in(Split::Train, i)
    }

    /// Window `i` of `split` (see [`NpyDataset::get`]).
    ///
    /// # Panics
    /// If `i >= split_len(split)`.
    pub fn get_in(&self, split: Split, i: usize) -> (Vec<u32>, Vec<u32>) {
        let n = self.split_len(split);
        assert!(
            i < n,
            "window {i} out of range: the {} split has {n} windows",
            split.name()
        );
        let mut buf = vec![0; self.block_size + 1];
        self.tokens
            .read_into(self.split_range(split).start + i, &mut buf);
        let y = buf[1..].to_vec();
        buf.truncate(self.block_size);
        (buf, y)
    }

    /// `batch_size` windows drawn uniformly (with replacement) from `split`:
    /// `x` and `y` are row-major `(B, T)`.
    ///
    /// # Panics
    /// If the split is empty, which only the validation split of a dataset
    /// opened with `val_frac = 0` can be.
    pub fn sample_batch(
        &self,
        rng: &mut SplitMix64,
        split: Split,
        batch_size: usize,
    ) -> (Vec<u32>, Vec<u32>) {
        let windows = self.split_len(split);
        assert!(
            windows > 0,
            "the {} split is empty (val_frac was 0); there is nothing to sample",
            split.name()
        );
        let t = self.block_size;
        let base = self.split_range(split).start;
        let mut x = vec![0u32; batch_size * t]; // (B, T)
        let mut y = vec![0u32; batch_size * t]; // (B, T)
        let mut buf = vec![0u32; t + 1];
        for b in 0..batch_size {
            let start = rng.below(windows as u64) as usize;
            self.tokens.read_into(base + start, &mut buf);
            x[b * t..(b + 1) * t].copy_from_slice(&buf[..t]);
            y[b * t..(b + 1) * t].copy_from_slice(&buf[1..]);
        }
        (x, y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::npy::{write_tokens, NpyDtype};

    fn counting(n: u32) -> Vec<u32> {
        (0..n).collect()
    }

    #[test]
    fn windows_shift_by_one() {
        let ds = NpyDataset::from_tokens(counting(20), 4, 0.0).unwrap();
        assert_eq!(ds.len(), 16);
        assert_eq!(ds.get(0), (vec![0, 1, 2, 3], vec![1, 2, 3, 4]));
        assert_eq!(ds.get(15), (vec![15, 16, 17, 18], vec![16, 17, 18, 19]));
        assert_eq!(ds.split_len(Split::Val), 0);
    }

    #[test]
    fn the_last_fraction_is_validation_and_windows_stay_inside() {
        let ds = NpyDataset::from_tokens(counting(100), 4, 0.1).unwrap();
        assert_eq!(ds.split_range(Split::Train), 0..90);
        assert_eq!(ds.split_range(Split::Val), 90..100);
        assert_eq!(ds.split_len(Split::Val), 6);
        assert_eq!(ds.get_in(Split::Val, 0).0, vec![90, 91, 92, 93]);
        let last = ds.get(ds.len() - 1);
        assert_eq!(
            last.1.last(),
            Some(&89),
            "training must not read validation tokens"
        );
        let mut rng = SplitMix64::new(3);
        for _ in 0..50 {
            let (x, y) = ds.sample_batch(&mut rng, Split::Val, 8);
            assert!(x.iter().all(|&t| (90..100).contains(&t)));
            assert!(x.iter().zip(&y).all(|(a, b)| b - a == 1));
            let (x, _) = ds.sample_batch(&mut rng, Split::Train, 8);
            assert!(x.iter().all(|&t| t < 90));
        }
    }

    #[test]
    fn batches_are_deterministic_and_resume_from_state() {
        let ds = NpyDataset::from_tokens(counting(1000), 8, 0.1).unwrap();
        let mut a = SplitMix64::new(1234);
        let first = ds.sample_batch(&mut a, Split::Train, 4);
        let saved = a.state();
        let second = ds.sample_batch(&mut a, Split::Train, 4);

        let mut b = SplitMix64::new(1234);
        assert_eq!(ds.sample_batch(&mut b, Split::Train, 4), first);
        let mut c = SplitMix64::from_state(saved);
        assert_eq!(ds.sample_batch(&mut c, Split::Train, 4), second);
        assert_ne!(first, second);
        // Rows are whole windows: x[b] is consecutive and y[b] = x[b] + 1.
        let (x, y) = first;
        assert_eq!(x.len(), 32);
        for row in 0..4 {
            let xs = &x[row * 8..row * 8 + 8];
            assert!(xs.windows(2).all(|w| w[1] == w[0] + 1));
            assert_eq!(y[row * 8 + 7], xs[7] + 1);
        }
    }

    #[test]
    fn every_window_start_is_reachable() {
        let ds = NpyDataset::from_tokens(counting(12), 4, 0.0).unwrap();
        let mut seen = vec![false; ds.len()];
        let mut rng = SplitMix64::new(0);
        for _ in 0..200 {
            let (x, _) = ds.sample_batch(&mut rng, Split::Train, 1);
            seen[x[0] as usize] = true;
        }
        assert!(seen.iter().all(|&s| s), "{seen:?}");
    }

    #[test]
    fn too_few_tokens_is_a_clear_error() {
        let e = NpyDataset::from_tokens(counting(4), 4, 0.0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("train split has 4 tokens") && e.contains("at least 5"),
            "{e}"
        );
        // Exactly block_size + 1 is enough for one window.
        assert_eq!(
            NpyDataset::from_tokens(counting(5), 4, 0.0).unwrap().len(),
            1
        );
        let e = NpyDataset::from_tokens(counting(100), 8, 0.05)
            .unwrap_err()
            .to_string();
        assert!(e.contains("val split has 5 tokens"), "{e}");
        let e = NpyDataset::from_tokens(counting(100), 8, 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("val_frac"), "{e}");
    }

    #[test]
    fn opens_npy_files_of_each_dtype() {
        let dir = std::env::temp_dir().join(format!("caramba-ds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for dtype in [
            NpyDtype::U8,
            NpyDtype::U16,
            NpyDtype::U32,
            NpyDtype::I32,
            NpyDtype::I64,
        ] {
            let p = dir.join("tokens.npy");
            write_tokens(&p, &counting(50), dtype).unwrap();
            let ds = NpyDataset::open(&p, 4, 0.2).unwrap();
            assert_eq!(ds.num_tokens(), 50);
            assert_eq!(ds.get(7), (vec![7, 8, 9, 10], vec![8, 9, 10, 11]));
            let mut r1 = SplitMix64::new(9);
            let mut r2 = SplitMix64::new(9);
            let mem = NpyDataset::from_tokens(counting(50), 4, 0.2).unwrap();
            assert_eq!(
                ds.sample_batch(&mut r1, Split::Val, 3),
                mem.sample_batch(&mut r2, Split::Val, 3)
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
