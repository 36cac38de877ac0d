//! `.npy` files of token ids: 1-D, little-endian `u8`/`u16`/`u32`/`i32`/`i64`,
//! format versions 1.0, 2.0 and 3.0.
//!
//! Reading maps the file and validates the header once; values are decoded
//! on access, so a multi-gigabyte token file costs no memory up front.
//! Writing goes to a temporary file beside the target and renames it into
//! place, so a reader never sees half a file.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::DataError;

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// The element types a token file may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NpyDtype {
    U8,
    U16,
    U32,
    I32,
    I64,
}

impl NpyDtype {
    pub fn size(self) -> usize {
        match self {
            NpyDtype::U8 => 1,
            NpyDtype::U16 => 2,
            NpyDtype::U32 | NpyDtype::I32 => 4,
            NpyDtype::I64 => 8,
        }
    }

    /// numpy's `descr` string for this type, little-endian.
    pub fn descr(self) -> &'static str {
        match self {
            NpyDtype::U8 => "|u1",
            NpyDtype::U16 => "<u2",
            NpyDtype::U32 => "<u4",
            NpyDtype::I32 => "<i4",
            NpyDtype::I64 => "<i8",
        }
    }

    fn from_descr(descr: &str) -> Option<Self> {
        Some(match descr {
            "|u1" | "<u1" => NpyDtype::U8,
            "<u2" => NpyDtype::U16,
            "<u4" => NpyDtype::U32,
            "<i4" => NpyDtype::I32,
            "<i8" => NpyDtype::I64,
            _ => return None,
        })
    }

    /// The narrowest unsigned type that holds ids `0..vocab_size`, at least `u16`.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            NpyDtype::U16
        } else {
            NpyDtype::U32
        }
    }
}

/// Element types [`write_npy`] accepts.
pub trait NpyElement: Copy {
    const DTYPE: NpyDtype;
    fn write_le(self, out: &mut Vec<u8>);
}

macro_rules! npy_element {
    ($t:ty, $d:expr) => {
        impl NpyElement for $t {
            const DTYPE: NpyDtype = $d;
            fn write_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    };
}
npy_element!(u8, NpyDtype::U8);
npy_element!(u16, NpyDtype::U16);
npy_element!(u32, NpyDtype::U32);
npy_element!(i32, NpyDtype::I32);
npy_element!(i64, NpyDtype::I64);

/// A memory-mapped 1-D `.npy` array of token ids, read as `u32`.
#[derive(Debug)]
pub struct NpyTokens {
    map: Mmap,
    dtype: NpyDtype,
    /// Byte offset of the first element.
    offset: usize,
    len: usize,
    path: PathBuf,
}

impl NpyTokens {
    /// Maps `path` and validates its header. Signed files are scanned once
    /// so that every value is known to fit a `u32` token id.
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let file = File::open(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the map is read-only; like every mmap reader, we rely on
        // nobody truncating the file while it is mapped.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let header = parse_header(&map).map_err(|reason| DataError::BadNpy {
            path: path.to_path_buf(),
            reason,
        })?;
        let need = header.offset + header.len * header.dtype.size();
        if map.len() < need {
            return Err(DataError::BadNpy {
                path: path.to_path_buf(),
                reason: format!(
                    "header promises {} elements ({need} bytes in all) but the file has {} bytes",
                    header.len,
                    map.len()
                ),
            });
        }
        let tokens = Self {
            map,
            dtype: header.dtype,
            offset: header.offset,
            len: header.len,
            path: path.to_path_buf(),
        };
        tokens.check_range()?;
        Ok(tokens)
    }

    fn check_range(&self) -> Result<(), DataError> {
        if !matches!(self.dtype, NpyDtype::I32 | NpyDtype::I64) {
            return Ok(());
        }
        for i in 0..self.len {
            let v = self.raw(i);
            if !(0..=u32::MAX as i64).contains(&v) {
                return Err(DataError::BadNpy {
                    path: self.path.clone(),
                    reason: format!("element {i} is {v}, not a token id (0..=4294967295)"),
                });
            }
        }
        Ok(())
    }

    fn bytes(&self) -> &[u8] {
        &self.map[self.offset..self.offset + self.len * self.dtype.size()]
    }

    /// Element `i` widened to i64 (no range check).
    fn raw(&self, i: usize) -> i64 {
        let b = &self.bytes()[i * self.dtype.size()..(i + 1) * self.dtype.size()];
        match self.dtype {
            NpyDtype::U8 => b[0] as i64,
            NpyDtype::U16 => u16::from_le_bytes([b[0], b[1]]) as i64,
            NpyDtype::U32 => u32::from_le_bytes(b.try_into().unwrap()) as i64,
            NpyDtype::I32 => i32::from_le_bytes(b.try_into().unwrap()) as i64,
            NpyDtype::I64 => i64::from_le_bytes(b.try_into().unwrap()),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn dtype(&self) -> NpyDtype {
        self.dtype
    }

    /// Token `i`.
    ///
    /// # Panics
    /// If `i >= len()`.
    pub fn get(&self, i: usize) -> u32 {
        assert!(
            i < self.len,
            "token index {i} out of range for {} tokens",
            self.len
        );
        self.raw(i) as u32
    }

    /// Copies tokens `start..start + out.len()` into `out`.
    ///
    /// # Panics
    /// If the range runs past the end.
    pub fn read_into(&self, start: usize, out: &mut [u32]) {
        let end = start + out.len();
        assert!(
            end <= self.len,
            "token range {start}..{end} out of range for {} tokens",
            self.len
        );
        let size = self.dtype.size();
        let bytes = &self.bytes()[start * size..end * size];
        match self.dtype {
            NpyDtype::U8 => out.iter_mut().zip(bytes).for_each(|(o, &b)| *o = b as u32),
            NpyDtype::U16 => out
                .iter_mut()
                .zip(bytes.chunks_exact(2))
                .for_each(|(o, b)| *o = u16::from_le_bytes([b[0], b[1]]) as u32),
            NpyDtype::U32 | NpyDtype::I32 => out
                .iter_mut()
                .zip(bytes.chunks_exact(4))
                .for_each(|(o, b)| *o = u32::from_le_bytes(b.try_into().unwrap())),
            // Range-checked at open, so the low half is the value.
            NpyDtype::I64 => out
                .iter_mut()
                .zip(bytes.chunks_exact(8))
                .for_each(|(o, b)| *o = i64::from_le_bytes(b.try_into().unwrap()) as u32),
        }
    }

    /// All tokens, copied out.
    pub fn to_vec(&self) -> Vec<u32> {
        let mut out = vec![0; self.len];
        self.read_into(0, &mut out);
        out
    }
}

struct Header {
    dtype: NpyDtype,
    offset: usize,
    len: usize,
}

fn parse_header(bytes: &[u8]) -> Result<Header, String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not a .npy file (missing the \\x93NUMPY magic)".into());
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (header_len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("file ends inside the header length".into());
            }
            (
                u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize,
                12,
            )
        }
        _ => return Err(format!("unsupported .npy format version {major}.{minor}")),
    };
    let end = start + header_len;
    let text = bytes.get(start..end).ok_or("file ends inside the header")?;
    let text = std::str::from_utf8(text).map_err(|_| "header is not text")?;

    let descr = dict_value(text, "descr").ok_or("header has no 'descr'")?;
    let descr = descr.trim().trim_matches(|c| c == '\'' || c == '"');
    let dtype = NpyDtype::from_descr(descr).ok_or_else(|| {
        format!(
            "dtype '{descr}' is not a token type; expected little-endian \
             uint8, uint16, uint32, int32 or int64 ('|u1', '<u2', '<u4', '<i4', '<i8')"
        )
    })?;
    let fortran = dict_value(text, "fortran_order").ok_or("header has no 'fortran_order'")?;
    if !matches!(fortran.trim(), "False" | "True") {
        return Err(format!("fortran_order is {fortran:?}, not True or False"));
    }
    let shape = dict_value(text, "shape").ok_or("header has no 'shape'")?;
    let dims: Vec<&str> = shape
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("shape {shape:?} is not a tuple"))?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if dims.len() != 1 {
        return Err(format!(
            "token arrays are 1-D, but this one has shape ({}) ({} dimensions)",
            dims.join(", "),
            dims.len()
        ));
    }
    let len = dims[0]
        .parse()
        .map_err(|_| format!("shape entry {:?} is not a length", dims[0]))?;
    Ok(Header {
        dtype,
        offset: end,
        len,
    })
}

/// The raw text of `key`'s value in numpy's header dict (a Python literal).
/// Values are either quoted strings, `True`/`False`, or a parenthesised tuple.
fn dict_value<'a>(dict: &'a str, key: &str) -> Option<&'a str> {
    let at = dict
        .find(&format!("'{key}'"))
        .or_else(|| dict.find(&format!("\"{key}\"")))?;
    let rest = dict[at + key.len() + 2..].trim_start().strip_prefix(':')?;
    let rest = rest.trim_start();
    let end = if rest.starts_with('(') {
        rest.find(')')? + 1
    } else if let Some(q @ ('\'' | '"')) = rest.chars().next() {
        rest[1..].find(q)? + 2
    } else {
        rest.find([',', '}']).unwrap_or(rest.len())
    };
    Some(&rest[..end])
}

/// The header bytes (magic through padding) for `len` elements of `dtype`,
/// padded so the data starts on a 64-byte boundary, as numpy writes it.
fn header_bytes(dtype: NpyDtype, len: usize) -> Vec<u8> {
    let dict = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': ({len},), }}",
        dtype.descr()
    );
    // Version 1.0 has a u16 header length; larger headers need 2.0.
    for (major, prefix) in [(1u8, 10usize), (2, 12)] {
        let unpadded = prefix + dict.len() + 1;
        let total = unpadded.div_ceil(64) * 64;
        let header_len = total - prefix;
        if major == 1 && header_len > u16::MAX as usize {
            continue;
        }
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[major, 0]);
        if major == 1 {
            out.extend_from_slice(&(header_len as u16).to_le_bytes());
        } else {
            out.extend_from_slice(&(header_len as u32).to_le_bytes());
        }
        out.extend_from_slice(dict.as_bytes());
        out.resize(total - 1, b' ');
        out.push(b'\n');
        return out;
    }
    unreachable!("a version 2.0 header always fits")
}

/// Writes `data` as a 1-D `.npy` file, atomically (temporary file, then rename).
pub fn write_npy<T: NpyElement>(path: &Path, data: &[T]) -> Result<(), DataError> {
    let mut bytes = header_bytes(T::DTYPE, data.len());
    bytes.reserve(data.len() * T::DTYPE.size());
    for &v in data {
        v.write_le(&mut bytes);
    }
    write_atomic(path, &bytes)
}

/// Writes token ids as `dtype`, which must hold every value.
pub fn write_tokens(path: &Path, tokens: &[u32], dtype: NpyDtype) -> Result<(), DataError> {
    let too_big = |max: u64| {
        tokens
            .iter()
            .position(|&t| t as u64 > max)
            .map(|i| DataError::TokenOutOfRange {
                index: i,
                value: tokens[i],
                dtype: dtype.descr(),
            })
    };
    match dtype {
        NpyDtype::U8 => {
            if let Some(e) = too_big(u8::MAX as u64) {
                return Err(e);
            }
            write_npy(path, &tokens.iter().map(|&t| t as u8).collect::<Vec<_>>())
        }
        NpyDtype::U16 => {
            if let Some(e) = too_big(u16::MAX as u64) {
                return Err(e);
            }
            write_npy(path, &tokens.iter().map(|&t| t as u16).collect::<Vec<_>>())
        }
        NpyDtype::U32 => write_npy(path, tokens),
        NpyDtype::I32 => {
            if let Some(e) = too_big(i32::MAX as u64) {
                return Err(e);
            }
            write_npy(path, &tokens.iter().map(|&t| t as i32).collect::<Vec<_>>())
        }
        NpyDtype::I64 => write_npy(path, &tokens.iter().map(|&t| t as i64).collect::<Vec<_>>()),
    }
}

/// Writes `bytes` to a temporary file in `path`'s directory, syncs it, and
/// renames it over `path`.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .ok_or_else(|| io(std::io::Error::other("output path has no file name")))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// Writes an f32 array of any shape as `.npy` (`<f4`, C order), atomically.
/// Used for logits dumps and reference outputs.
pub fn write_f32_npy(path: &Path, shape: &[usize], data: &[f32]) -> Result<(), DataError> {
    assert_eq!(
        shape.iter().product::<usize>(),
        data.len(),
        "shape does not match the data"
    );
    let dims: String = match shape {
        [n] => format!("{n},"),
        _ => shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    };
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({dims}), }}");
    let total = (10 + dict.len() + 1).div_ceil(64) * 64;
    let mut bytes = Vec::with_capacity(total + data.len() * 4);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&[1, 0]);
    bytes.extend_from_slice(&((total - 10) as u16).to_le_bytes());
    bytes.extend_from_slice(dict.as_bytes());
    bytes.resize(total - 1, b' ');
    bytes.push(b'\n');
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    write_atomic(path, &bytes)
}

/// Reads an f32 `.npy` (`<f4`, C order) of any shape: (shape, data).
pub fn read_f32_npy(path: &Path) -> Result<(Vec<usize>, Vec<f32>), DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |reason: &str| DataError::BadNpy {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(bad("not a .npy file"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Err(bad("unsupported version")),
    };
    let header = std::str::from_utf8(
        bytes
            .get(start..start + hlen)
            .ok_or_else(|| bad("truncated header"))?,
    )
    .map_err(|_| bad("header is not text"))?;
    if !header.contains("'descr': '<f4'") || header.contains("'fortran_order': True") {
        return Err(bad("expected a C-order little-endian float32 array"));
    }
    let shape_txt = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("no shape"))?;
    let shape: Vec<usize> = shape_txt
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad("bad shape")))
        .collect::<Result<_, _>>()?;
    let body = &bytes[start + hlen..];
    let n: usize = shape.iter().product();
    if body.len() != n * 4 {
        return Err(bad("data length does not match the shape"));
    }
    Ok((
        shape,
        body.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("caramba-npy-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn round_trips_every_dtype() {
        let dir = tmpdir("roundtrip");
        let vals: Vec<u32> = vec![0, 1, 2, 200, 255];
        for dtype in [
            NpyDtype::U8,
            NpyDtype::U16,
            NpyDtype::U32,
            NpyDtype::I32,
            NpyDtype::I64,
        ] {
            let p = dir.join(format!("t-{}.npy", dtype.descr().replace(['<', '|'], "")));
            write_tokens(&p, &vals, dtype).unwrap();
            let t = NpyTokens::open(&p).unwrap();
            assert_eq!(t.dtype(), dtype);
            assert_eq!(t.to_vec(), vals);
            assert_eq!(t.get(3), 200);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn header_is_64_byte_aligned_like_numpy() {
        let h = header_bytes(NpyDtype::U16, 12345);
        assert_eq!(h.len() % 64, 0);
        assert_eq!(&h[..8], b"\x93NUMPY\x01\x00");
        assert_eq!(*h.last().unwrap(), b'\n');
        let text = std::str::from_utf8(&h[10..]).unwrap();
        assert!(text.starts_with("{'descr': '<u2', 'fortran_order': False, 'shape': (12345,), }"));
    }

    #[test]
    fn reads_version_2_and_numpy_spacing() {
        // A hand-made v2.0 file with numpy's older header spelling.
        let dict = b"{'descr': '<u4', 'fortran_order': False, 'shape': (3,)}";
        let mut bytes = b"\x93NUMPY\x02\x00".to_vec();
        let pad = 64 - (12 + dict.len() + 1) % 64;
        bytes.extend_from_slice(&((dict.len() + pad + 1) as u32).to_le_bytes());
        bytes.extend_from_slice(dict);
        bytes.extend(std::iter::repeat_n(b' ', pad));
        bytes.push(b'\n');
        for v in [7u32, 8, 70000] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        let dir = tmpdir("v2");
        let p = dir.join("v2.npy");
        std::fs::write(&p, bytes).unwrap();
        assert_eq!(NpyTokens::open(&p).unwrap().to_vec(), vec![7, 8, 70000]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn open_err(name: &str, bytes: &[u8]) -> String {
        let dir = tmpdir(name);
        let p = dir.join("bad.npy");
        std::fs::write(&p, bytes).unwrap();
        let e = NpyTokens::open(&p).unwrap_err().to_string();
        std::fs::remove_dir_all(dir).unwrap();
        e
    }

    fn with_dict(dict: &str, data: &[u8]) -> Vec<u8> {
        let mut h = b"\x93NUMPY\x01\x00".to_vec();
        h.extend_from_slice(&((dict.len() + 1) as u16).to_le_bytes());
        h.extend_from_slice(dict.as_bytes());
        h.push(b'\n');
        h.extend_from_slice(data);
        h
    }

    #[test]
    fn clear_errors() {
        assert!(open_err("magic", b"hello world, not npy").contains("magic"));
        let e = open_err(
            "f32",
            &with_dict(
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
                &[0; 4],
            ),
        );
        assert!(e.contains("dtype '<f4' is not a token type"), "{e}");
        let e = open_err(
            "be",
            &with_dict(
                "{'descr': '>u2', 'fortran_order': False, 'shape': (1,), }",
                &[0; 2],
            ),
        );
        assert!(e.contains("'>u2'"), "{e}");
        let e = open_err(
            "2d",
            &with_dict(
                "{'descr': '<u2', 'fortran_order': False, 'shape': (2, 3), }",
                &[0; 12],
            ),
        );
        assert!(e.contains("1-D") && e.contains("2 dimensions"), "{e}");
        let e = open_err(
            "0d",
            &with_dict(
                "{'descr': '<u2', 'fortran_order': False, 'shape': (), }",
                &[0; 2],
            ),
        );
        assert!(e.contains("0 dimensions"), "{e}");
        let e = open_err(
            "short",
            &with_dict(
                "{'descr': '<u2', 'fortran_order': False, 'shape': (5,), }",
                &[0; 4],
            ),
        );
        assert!(e.contains("promises 5 elements"), "{e}");
        let e = open_err(
            "neg",
            &with_dict(
                "{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }",
                &[1, 0, 0, 0, 255, 255, 255, 255],
            ),
        );
        assert!(e.contains("element 1 is -1"), "{e}");
        let e = open_err("ver", b"\x93NUMPY\x09\x00\x00\x00");
        assert!(e.contains("version 9.0"), "{e}");
    }

    #[test]
    fn writing_a_value_too_big_for_the_dtype_fails() {
        let dir = tmpdir("range");
        let e = write_tokens(&dir.join("x.npy"), &[1, 70000], NpyDtype::U16).unwrap_err();
        assert!(e.to_string().contains("70000"), "{e}");
        assert!(!dir.join("x.npy").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
