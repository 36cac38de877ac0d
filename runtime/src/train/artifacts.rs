//! Run artifacts: one folder per run, `artifacts/<name>_<YYYYmmdd_HHMMSS>/`,
//! holding the resolved manifest, `metrics.jsonl` and the checkpoints.
//!
//! ```text
//! artifacts/<name>_<stamp>/manifest.yaml    the resolved manifest
//!                         /metrics.jsonl    one JSON object per step
//!                         /checkpoints/     see `Checkpointer`
//! ```

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{Checkpointer, TrainError};
use crate::checkpoint::write_text;

/// A run's artifact folder.
#[derive(Clone, Debug)]
pub struct RunDir {
    path: PathBuf,
    run_id: String,
}

impl RunDir {
    /// Creates `<root>/<name>_<UTC now>/`. The folder is new: if another run
    /// took that name in the same second, `_2`, `_3`, ... is appended.
    /// Characters other than letters, digits, `-`, `_` and `.` in `name`
    /// become `_`.
    pub fn create(root: &Path, name: &str) -> Result<Self, TrainError> {
        Self::create_at(root, name, SystemTime::now())
    }

    /// [`RunDir::create`] with the time given.
    pub fn create_at(root: &Path, name: &str, time: SystemTime) -> Result<Self, TrainError> {
        std::fs::create_dir_all(root).map_err(|e| TrainError::io(root, e))?;
        let clean: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let clean = if clean.is_empty() || clean.starts_with('.') {
            format!("run{clean}")
        } else {
            clean
        };
        let base = format!("{clean}_{}", utc_timestamp(time));
        for n in 1.. {
            let run_id = if n == 1 {
                base.clone()
            } else {
                format!("{base}_{n}")
            };
            let path = root.join(&run_id);
            // `create_dir` fails on an existing folder, so two runs never
            // share one, even when started concurrently.
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(RunDir { path, run_id }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(TrainError::io(&path, e)),
            }
        }
        unreachable!("some suffix is free")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The folder's name, `<name>_<stamp>[_n]`, used as the run id.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Writes the resolved manifest to `manifest.yaml` (atomically).
    pub fn write_manifest(&self, yaml: &str) -> Result<PathBuf, TrainError> {
        let path = self.path.join("manifest.yaml");
        write_text(&path, yaml.trim_end())?;
        Ok(path)
    }

    /// Opens `metrics.jsonl` for appending.
    pub fn metrics(&self) -> Result<MetricsWriter, TrainError> {
        MetricsWriter::open(&self.path.join("metrics.jsonl"))
    }

    /// The run's checkpoints, under `checkpoints/`, keeping the newest
    /// `keep_last` (0: all).
    pub fn checkpointer(&self, keep_last: usize) -> Checkpointer {
        Checkpointer::new(self.path.join("checkpoints"), keep_last)
    }
}

/// One line of `metrics.jsonl`. Non-finite values are written as `null`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricsRecord {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    /// The gradient norm before clipping.
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
}

/// Appends [`MetricsRecord`]s to a JSON-lines file, one write per line so a
/// crash loses at most the line being written.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// Opens (creating if needed) `path` for appending.
    pub fn open(path: &Path) -> Result<Self, TrainError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| TrainError::io(path, e))?;
        Ok(MetricsWriter {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record and flushes it.
    pub fn append(&mut self, record: &MetricsRecord) -> Result<(), TrainError> {
        let mut line = serde_json::to_string(record).expect("a MetricsRecord always serializes");
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| TrainError::io(&self.path, e))
    }
}

/// `time` in UTC as `YYYYmmdd_HHMMSS` (times before 1970 clamp to the epoch).
pub fn utc_timestamp(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}_{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The proleptic Gregorian (year, month, day) of a day count since
/// 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March-based
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn utc_timestamps() {
        // Reference values from Python's datetime.utcfromtimestamp.
        for (secs, want) in [
            (0, "19700101_000000"),
            (951_782_400, "20000229_000000"),
            (951_868_799, "20000229_235959"),
            (1_234_567_890, "20090213_233130"),
            (1_709_251_199, "20240229_235959"),
            (1_735_689_599, "20241231_235959"),
            (4_102_444_800, "21000101_000000"),
        ] {
            assert_eq!(utc_timestamp(at(secs)), want, "{secs}");
        }
    }

    #[test]
    fn run_dirs_are_unique() {
        let root = std::env::temp_dir().join(format!("caramba-train-art-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let a = RunDir::create_at(&root, "dba/upcycle", at(1_234_567_890)).unwrap();
        let b = RunDir::create_at(&root, "dba/upcycle", at(1_234_567_890)).unwrap();
        assert_eq!(a.run_id(), "dba_upcycle_20090213_233130");
        assert_eq!(b.run_id(), "dba_upcycle_20090213_233130_2");
        assert!(a.path().is_dir() && b.path().is_dir());

        let manifest = a.write_manifest("name: tiny\nmodel: {}\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(manifest).unwrap(),
            "name: tiny\nmodel: {}\n"
        );
        assert_eq!(a.checkpointer(3).root(), a.path().join("checkpoints"));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn metrics_lines_parse_as_json() {
        let root =
            std::env::temp_dir().join(format!("caramba-train-metrics-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let run = RunDir::create_at(&root, "tiny", at(0)).unwrap();
        let records = [
            MetricsRecord {
                step: 1,
                loss: 10.5,
                lr: 3e-4,
                grad_norm: 1.25,
                tokens_per_s: 12345.0,
                val_loss: None,
            },
            MetricsRecord {
                step: 2,
                loss: 9.75,
                lr: 2.9e-4,
                grad_norm: f64::NAN,
                tokens_per_s: 12000.5,
                val_loss: Some(9.5),
            },
        ];
        let mut writer = run.metrics().unwrap();
        writer.append(&records[0]).unwrap();
        // Reopening appends rather than truncating (a resumed run).
        let mut writer = MetricsWriter::open(writer.path()).unwrap();
        writer.append(&records[1]).unwrap();

        let text = std::fs::read_to_string(run.path().join("metrics.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["step"], 1);
        assert_eq!(lines[0]["loss"], 10.5);
        assert_eq!(lines[0]["tokens_per_s"], 12345.0);
        assert!(lines[0].get("val_loss").is_none());
        assert_eq!(lines[1]["val_loss"], 9.5);
        assert!(lines[1]["grad_norm"].is_null());
        let back: MetricsRecord = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(back, records[0]);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
