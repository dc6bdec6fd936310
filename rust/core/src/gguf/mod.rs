//! GGUF: the file format, its loader and its writer.
//!
//! Byte layout (all integers little-endian; versions 2 and 3 accepted — version 1 used
//! 32-bit counts and is long extinct; a byte-swapped version number means a big-endian
//! file, which we refuse by name):
//!
//! ```text
//! magic      "GGUF"                      4 bytes
//! version    u32                         2 | 3
//! n_tensors  u64
//! n_kv       u64
//! kv[n_kv]   { key: str, type: u32, value }
//! tensor_info[n_tensors] { name: str, n_dims: u32, ne: u64[n_dims], type: u32, offset: u64 }
//! padding    to `general.alignment` (default 32)
//! data       tensor bytes; each tensor at data_start + offset, offset % alignment == 0
//!
//! str   = { len: u64, bytes[len] }        (UTF-8, not NUL-terminated)
//! value = u8 | i8 | u16 | i16 | u32 | i32 | f32 | bool(u8: 0|1) | str | array | u64 | i64 | f64
//! array = { elem_type: u32, n: u64, elem[n] }   (arrays of arrays are allowed)
//! ```
//!
//! Limits, each with its reason (the file is untrusted; nothing is allocated before its
//! size has been checked against the bytes that remain):
//! - a string is at most `MAX_STRING_BYTES` (64 MiB: chat templates are kilobytes, a
//!   longer string is an attack) and never longer than what remains of the file;
//! - an array's element count times its element's minimum encoded size never exceeds
//!   what remains (so a count of 2^60 fails before any `Vec` exists);
//! - arrays nest at most `MAX_ARRAY_DEPTH` deep (recursion is bounded);
//! - keys and tensor names are unique; tensor names are at most 63 bytes (ggml's limit);
//! - a tensor has 1..=4 dimensions, each ≥ 1, whose product fits in u64 and whose
//!   first dimension is a whole number of its type's blocks;
//! - tensor data is in the file, aligned, and no two tensors overlap.
//!
//! `Gguf::open` validates all of this before any tensor view exists; views borrow the
//! memory map, so building a model copies no weights.

mod writer;
pub use writer::GgufWriter;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::quant::GgmlType;

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: usize = 32;
pub const MAX_STRING_BYTES: u64 = 64 << 20;
pub const MAX_ARRAY_DEPTH: usize = 4;
pub const MAX_NAME_BYTES: usize = 63;
pub const MAX_DIMS: usize = 4;

/// Metadata value type ids, as `enum gguf_type` numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    Str = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    pub fn from_u32(v: u32) -> Option<Self> {
        use ValueType::*;
        Some(match v {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => Str,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Smallest number of bytes one value of this type occupies on disk.
    fn min_encoded_size(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | Str => 8,
            Array => 12,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    Str(Vec<String>),
    Array(Vec<Array>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl Array {
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::Str(v) => v.len(),
            Array::Array(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn elem_type(&self) -> ValueType {
        match self {
            Array::U8(_) => ValueType::U8,
            Array::I8(_) => ValueType::I8,
            Array::U16(_) => ValueType::U16,
            Array::I16(_) => ValueType::I16,
            Array::U32(_) => ValueType::U32,
            Array::I32(_) => ValueType::I32,
            Array::F32(_) => ValueType::F32,
            Array::Bool(_) => ValueType::Bool,
            Array::Str(_) => ValueType::Str,
            Array::Array(_) => ValueType::Array,
            Array::U64(_) => ValueType::U64,
            Array::I64(_) => ValueType::I64,
            Array::F64(_) => ValueType::F64,
        }
    }
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::Str(_) => ValueType::Str,
            Value::Array(_) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// Any integer type whose value is non-negative and fits in u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::U8(v) => write!(f, "{v}"),
            Value::I8(v) => write!(f, "{v}"),
            Value::U16(v) => write!(f, "{v}"),
            Value::I16(v) => write!(f, "{v}"),
            Value::U32(v) => write!(f, "{v}"),
            Value::I32(v) => write!(f, "{v}"),
            Value::F32(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
            Value::Str(v) => write!(f, "{v:?}"),
            Value::U64(v) => write!(f, "{v}"),
            Value::I64(v) => write!(f, "{v}"),
            Value::F64(v) => write!(f, "{v}"),
            Value::Array(a) => write!(f, "[{:?}; {}]", a.elem_type(), a.len()),
        }
    }
}

/// One entry of the tensor index, validated.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A tensor's bytes inside a shared, validated file.
#[derive(Clone)]
pub struct TensorData {
    file: Arc<Gguf>,
    start: usize,
    len: usize,
    pub info: TensorInfo,
}

impl TensorData {
    #[inline]
    pub fn bytes(&self) -> &[u8] {
        &self.file.bytes[self.start..self.start + self.len]
    }

    /// Lets the file pages of this tensor go (`Gguf::release_range`): for a tensor
    /// whose bytes are copied elsewhere and will not be read here again.
    pub fn release_pages(&self) -> Result<usize> {
        self.file.release_range(self.start, self.start + self.len)
    }

    /// Bytes `start..start + len` of this tensor, as a handle of its own (a fused
    /// tensor's parts: phi3's `attn_qkv` rows, one expert of a 3-D `ffn_*_exps`).
    /// `info` stays the whole tensor's, so errors still name the file's tensor.
    pub fn slice(&self, start: usize, len: usize) -> TensorData {
        assert!(
            start.checked_add(len).is_some_and(|end| end <= self.len),
            "TensorData::slice {start}+{len} beyond {}",
            self.len
        );
        TensorData { file: Arc::clone(&self.file), start: self.start + start, len, info: self.info.clone() }
    }
}

impl fmt::Debug for TensorData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TensorData({} {:?} {})", self.info.name, self.info.dims, self.info.ty.name())
    }
}

enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A validated GGUF file. Cheap to share (`Arc<Gguf>`); tensor data is borrowed from
/// the memory map.
pub struct Gguf {
    bytes: Bytes,
    path: Option<PathBuf>,
    pub version: u32,
    pub alignment: usize,
    /// Absolute file offset of the data section.
    pub data_start: usize,
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl fmt::Debug for Gguf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gguf")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("n_kv", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

impl Gguf {
    /// Memory-map and validate a GGUF file.
    pub fn open(path: impl AsRef<Path>) -> Result<Arc<Gguf>> {
        let path = path.as_ref();
        let io = |source| Error::Io { path: path.to_owned(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if meta.is_dir() {
            return Err(Error::Io {
                path: path.to_owned(),
                source: std::io::Error::other("is a directory, not a GGUF file"),
            });
        }
        if meta.len() == 0 {
            return Err(Error::format(0, "file is empty (0 bytes); expected a GGUF model"));
        }
        // SAFETY: the map is read-only and private to this process; if another process
        // truncates the file under us, reads would fault (SIGBUS) — the same contract
        // every mmap-based model loader has. We never hand out pointers that outlive
        // the `Gguf` that owns the map.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let mut g = Self::parse(Bytes::Mapped(map))?;
        g.path = Some(path.to_owned());
        Ok(Arc::new(g))
    }

    /// Let go of the tensor data's pages: drop them from this process's map and ask the
    /// kernel to drop them from the page cache. For a GPU that shares DRAM with the CPU
    /// (a Jetson), once the weights are on it, so they are not kept twice. Reading a
    /// tensor afterwards is still correct (its pages come back from the file), only
    /// slower. Returns the bytes given up: 0 for an image held in memory, whose bytes
    /// exist nowhere else.
    pub fn release_tensor_pages(&self) -> Result<usize> {
        let end = match &self.bytes {
            Bytes::Mapped(map) => map.len(),
            Bytes::Owned(_) => return Ok(0),
        };
        self.release_range(self.data_start, end)
    }

    /// As `release_tensor_pages`, for the whole pages inside file bytes `from..to` (one
    /// tensor whose CPU copy lives elsewhere now: see `quant::packed`).
    pub fn release_range(&self, from: usize, to: usize) -> Result<usize> {
        let Bytes::Mapped(map) = &self.bytes else { return Ok(0) };
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
        let start = from.div_ceil(page) * page;
        let len = to.min(map.len()).saturating_sub(start) / page * page;
        if len == 0 {
            return Ok(0);
        }
        let path = self.path.clone().unwrap_or_default();
        // SAFETY: the map is a read-only private map of a file that is never written
        // through it, so MADV_DONTNEED only drops pages that the next read brings back
        // unchanged from the file; no reference into the map is invalidated.
        unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len) }
            .map_err(|source| Error::Io { path: path.clone(), source })?;
        // The page cache's copy too (best effort: pages other processes map stay).
        if let Ok(f) = std::fs::File::open(&path) {
            use std::os::fd::AsRawFd;
            // SAFETY: a valid open descriptor and an in-file range.
            unsafe {
                libc::posix_fadvise(f.as_raw_fd(), start as libc::off_t, len as libc::off_t, libc::POSIX_FADV_DONTNEED)
            };
        }
        Ok(len)
    }

    /// Validate a GGUF image held in memory (tests, fuzzing, downloads).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Arc<Gguf>> {
        Ok(Arc::new(Self::parse(Bytes::Owned(bytes))?))
    }

    fn parse(bytes: Bytes) -> Result<Gguf> {
        let mut c = Cursor { buf: &bytes, pos: 0 };
        let magic = c.take(4, "magic")?;
        if magic != MAGIC {
            return Err(Error::format(
                0,
                format!(
                    "wrong magic {:?}; expected \"GGUF\" (is this a GGUF model file?)",
                    String::from_utf8_lossy(magic)
                ),
            ));
        }
        let version = c.u32("version")?;
        if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
            return Err(Error::format(4, "big-endian GGUF files are not supported; convert to little-endian"));
        }
        if version != 2 && version != 3 {
            return Err(Error::format(
                4,
                format!("unsupported GGUF version {version}; supported versions are 2 and 3"),
            ));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        // Each kv needs at least key len (8) + type (4) + 1 byte; each tensor info at
        // least name len (8) + n_dims (4) + one dim (8) + type (4) + offset (8).
        if n_kv > c.remaining() / 13 {
            return Err(Error::format(
                16,
                format!(
                    "metadata count {n_kv} cannot fit in the {} bytes that remain; the file is truncated or corrupt",
                    c.remaining()
                ),
            ));
        }
        if n_tensors > c.remaining() / 32 {
            return Err(Error::format(
                8,
                format!(
                    "tensor count {n_tensors} cannot fit in the {} bytes that remain; the file is truncated or corrupt",
                    c.remaining()
                ),
            ));
        }

        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut key_index = HashMap::with_capacity(n_kv as usize);
        for i in 0..n_kv {
            let at = c.pos as u64;
            let key = c.string(&format!("key of metadata entry {i}"))?;
            let ty = c.u32(&format!("type of metadata key {key:?}"))?;
            let ty = ValueType::from_u32(ty).ok_or_else(|| {
                Error::format(
                    c.pos as u64 - 4,
                    format!("metadata key {key:?} has unknown value type {ty} (valid: 0..=12)"),
                )
            })?;
            let value = c.value(ty, &key, 0)?;
            if key_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(Error::format(at, format!("duplicate metadata key {key:?}")));
            }
            metadata.push((key, value));
        }

        let alignment = match metadata.get(key_index.get("general.alignment").copied().unwrap_or(usize::MAX)) {
            None => DEFAULT_ALIGNMENT,
            Some((_, Value::U32(a))) if *a != 0 && a.is_power_of_two() => *a as usize,
            Some((_, v)) => {
                return Err(Error::format(
                    0,
                    format!("general.alignment must be a u32 power of two, got {v} ({:?})", v.value_type()),
                ))
            }
        };

        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = HashMap::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let at = c.pos as u64;
            let name = c.string(&format!("name of tensor {i}"))?;
            if name.len() > MAX_NAME_BYTES {
                return Err(Error::format(
                    at,
                    format!("tensor name {name:?} is {} bytes; the limit is {MAX_NAME_BYTES}", name.len()),
                ));
            }
            let n_dims = c.u32(&format!("n_dims of tensor {name:?}"))?;
            if n_dims == 0 || n_dims as usize > MAX_DIMS {
                return Err(Error::format(
                    at,
                    format!("tensor {name:?} has {n_dims} dimensions; expected 1 to {MAX_DIMS}"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                let v = c.u64(&format!("dimension {d} of tensor {name:?}"))?;
                if v == 0 || v > i64::MAX as u64 {
                    return Err(Error::format(
                        at,
                        format!("tensor {name:?} dimension {d} is {v}; expected 1 to 2^63-1"),
                    ));
                }
                dims.push(v);
            }
            let n_elems = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).filter(|&n| n <= i64::MAX as u64);
            let Some(n_elems) = n_elems else {
                return Err(Error::format(
                    at,
                    format!("tensor {name:?} dimensions {dims:?} overflow: their product exceeds 2^63-1"),
                ));
            };
            let ty_raw = c.u32(&format!("type of tensor {name:?}"))?;
            let ty = GgmlType::from_u32(ty_raw).ok_or_else(|| {
                Error::format(
                    c.pos as u64 - 4,
                    format!(
                        "tensor {name:?} has unknown or unsupported type id {ty_raw}; supported: {}",
                        supported_types()
                    ),
                )
            })?;
            let offset = c.u64(&format!("offset of tensor {name:?}"))?;
            if dims[0] % ty.block_size() as u64 != 0 {
                return Err(Error::format(
                    at,
                    format!(
                        "tensor {name:?} ({}) row length {} is not a multiple of the block size {}",
                        ty.name(),
                        dims[0],
                        ty.block_size()
                    ),
                ));
            }
            let n_bytes = (n_elems / ty.block_size() as u64)
                .checked_mul(ty.type_size() as u64)
                .ok_or_else(|| Error::format(at, format!("tensor {name:?} byte size overflows")))?;
            if offset % alignment as u64 != 0 {
                return Err(Error::format(
                    at,
                    format!("tensor {name:?} data offset {offset} is not a multiple of the alignment {alignment}"),
                ));
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(Error::format(at, format!("duplicate tensor name {name:?}")));
            }
            tensors.push(TensorInfo { name, dims, ty, offset, n_bytes });
        }

        let data_start =
            align_up(c.pos, alignment).ok_or_else(|| Error::format(c.pos as u64, "data section start overflows"))?;
        let file_len = bytes.len() as u64;
        if !tensors.is_empty() && data_start as u64 > file_len {
            return Err(Error::format(
                c.pos as u64,
                format!("file ends at byte {file_len} before the data section (which starts at {data_start}); the file is truncated"),
            ));
        }
        let data_len = file_len.saturating_sub(data_start as u64);
        let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
        by_offset.sort_by_key(|t| t.offset);
        let mut prev: Option<&TensorInfo> = None;
        for t in by_offset {
            let end = t.offset.checked_add(t.n_bytes);
            if end.is_none_or(|e| e > data_len) {
                return Err(Error::format(
                    data_start as u64 + t.offset,
                    format!(
                        "tensor {:?} data [{}, +{}) extends past the end of the file (data section holds {data_len} bytes); the file is truncated or corrupt",
                        t.name, t.offset, t.n_bytes
                    ),
                ));
            }
            if let Some(p) = prev {
                if p.offset + p.n_bytes > t.offset {
                    return Err(Error::format(
                        data_start as u64 + t.offset,
                        format!(
                            "tensor {:?} data at offset {} overlaps tensor {:?} ([{}, {}))",
                            t.name,
                            t.offset,
                            p.name,
                            p.offset,
                            p.offset + p.n_bytes
                        ),
                    ));
                }
            }
            prev = Some(t);
        }

        Ok(Gguf { bytes, path: None, version, alignment, data_start, metadata, key_index, tensors, tensor_index })
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
    pub fn file_size(&self) -> usize {
        self.bytes.len()
    }
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }
    /// The bytes of a tensor, borrowed from the map (validated at open).
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        let start = self.data_start + t.offset as usize;
        &self.bytes[start..start + t.n_bytes as usize]
    }

    /// An owned handle on a tensor's bytes that keeps the map alive: the model holds
    /// these instead of copies.
    pub fn tensor_data(self: &Arc<Self>, name: &str) -> Option<TensorData> {
        let t = self.tensor_info(name)?;
        Some(TensorData {
            file: Arc::clone(self),
            start: self.data_start + t.offset as usize,
            len: t.n_bytes as usize,
            info: t.clone(),
        })
    }

    // Typed getters. `Ok(None)` = key absent; a present key of the wrong type is an
    // error naming the key, so a hostile file cannot make us guess.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| wrong_type(key, v, "a non-negative integer")),
        }
    }
    pub fn get_usize(&self, key: &str) -> Result<Option<usize>> {
        Ok(self.get_u64(key)?.map(|v| v as usize))
    }
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(|x| Some(x as f32)).ok_or_else(|| wrong_type(key, v, "a number")),
        }
    }
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(wrong_type(key, v, "a bool")),
        }
    }
    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Str(s)) => Ok(Some(s)),
            Some(v) => Err(wrong_type(key, v, "a string")),
        }
    }
    pub fn get_array(&self, key: &str) -> Result<Option<&Array>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(wrong_type(key, v, "an array")),
        }
    }
    pub fn get_str_array(&self, key: &str) -> Result<Option<&[String]>> {
        match self.get_array(key)? {
            None => Ok(None),
            Some(Array::Str(v)) => Ok(Some(v)),
            Some(a) => Err(Error::model(format!(
                "metadata key {key:?} must be an array of strings, got an array of {:?}",
                a.elem_type()
            ))),
        }
    }
    /// A numeric array converted to f32 (scores are F32 in practice).
    pub fn get_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        Ok(match self.get_array(key)? {
            None => None,
            Some(Array::F32(v)) => Some(v.clone()),
            Some(Array::F64(v)) => Some(v.iter().map(|&x| x as f32).collect()),
            Some(a) => {
                return Err(Error::model(format!(
                    "metadata key {key:?} must be an array of floats, got {:?}",
                    a.elem_type()
                )))
            }
        })
    }
    /// An integer array converted to i64 (token types are I32 in practice).
    pub fn get_int_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        Ok(match self.get_array(key)? {
            None => None,
            Some(Array::I32(v)) => Some(v.iter().map(|&x| x as i64).collect()),
            Some(Array::U32(v)) => Some(v.iter().map(|&x| x as i64).collect()),
            Some(Array::I8(v)) => Some(v.iter().map(|&x| x as i64).collect()),
            Some(Array::U8(v)) => Some(v.iter().map(|&x| x as i64).collect()),
            Some(Array::I16(v)) => Some(v.iter().map(|&x| x as i64).collect()),
            Some(Array::U16(v)) => Some(v.iter().map(|&x| x as i64).collect()),
            Some(Array::I64(v)) => Some(v.clone()),
            Some(a) => {
                return Err(Error::model(format!(
                    "metadata key {key:?} must be an array of integers, got {:?}",
                    a.elem_type()
                )))
            }
        })
    }
}

fn wrong_type(key: &str, v: &Value, want: &str) -> Error {
    Error::model(format!("metadata key {key:?} must be {want}, got {v} ({:?})", v.value_type()))
}

fn supported_types() -> String {
    GgmlType::all().iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
}

fn align_up(x: usize, a: usize) -> Option<usize> {
    x.checked_add(a - 1).map(|v| v / a * a)
}

/// Bounded reader over untrusted bytes: every read checks what remains first.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(Error::format(
                self.pos as u64,
                format!("file truncated reading {what}: need {n} bytes, {} remain", self.remaining()),
            ));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N as u64, what)?.try_into().expect("take returned N bytes"))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let at = self.pos as u64;
        let n = self.u64(&format!("length of {what}"))?;
        if n > MAX_STRING_BYTES {
            return Err(Error::format(at, format!("{what} claims {n} bytes; the limit is {MAX_STRING_BYTES}")));
        }
        if n > self.remaining() {
            return Err(Error::format(
                at,
                format!("{what} claims {n} bytes but only {} remain in the file", self.remaining()),
            ));
        }
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| Error::format(at + 8, format!("{what} is not valid UTF-8 ({e})")))
    }

    fn value(&mut self, ty: ValueType, key: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.arr::<1>(key)?[0]),
            ValueType::I8 => Value::I8(self.arr::<1>(key)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.arr(key)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.arr(key)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.arr(key)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.arr(key)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.arr(key)?)),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.arr(key)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.arr(key)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.arr(key)?)),
            ValueType::Bool => {
                let at = self.pos as u64;
                match self.arr::<1>(key)?[0] {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => {
                        return Err(Error::format(
                            at,
                            format!("metadata key {key:?}: bool byte is {b}, expected 0 or 1"),
                        ))
                    }
                }
            }
            ValueType::Str => Value::Str(self.string(&format!("value of metadata key {key:?}"))?),
            ValueType::Array => Value::Array(self.array(key, depth + 1)?),
        })
    }

    fn array(&mut self, key: &str, depth: usize) -> Result<Array> {
        let at = self.pos as u64;
        if depth > MAX_ARRAY_DEPTH {
            return Err(Error::format(at, format!("metadata key {key:?}: arrays nest deeper than {MAX_ARRAY_DEPTH}")));
        }
        let et = self.u32(&format!("array type of metadata key {key:?}"))?;
        let et = ValueType::from_u32(et)
            .ok_or_else(|| Error::format(at, format!("metadata key {key:?}: unknown array element type {et}")))?;
        let n = self.u64(&format!("array length of metadata key {key:?}"))?;
        let need = n.checked_mul(et.min_encoded_size());
        if need.is_none_or(|need| need > self.remaining()) {
            return Err(Error::format(
                at,
                format!(
                    "metadata key {key:?}: array of {n} {et:?} elements cannot fit in the {} bytes that remain; the file is truncated or corrupt",
                    self.remaining()
                ),
            ));
        }
        let n = n as usize;
        macro_rules! prim {
            ($variant:ident, $t:ty) => {{
                let raw = self.take((n * std::mem::size_of::<$t>()) as u64, key)?;
                Array::$variant(
                    raw.chunks_exact(std::mem::size_of::<$t>())
                        .map(|c| <$t>::from_le_bytes(c.try_into().expect("exact chunk")))
                        .collect(),
                )
            }};
        }
        Ok(match et {
            ValueType::U8 => Array::U8(self.take(n as u64, key)?.to_vec()),
            ValueType::I8 => Array::I8(self.take(n as u64, key)?.iter().map(|&b| b as i8).collect()),
            ValueType::U16 => prim!(U16, u16),
            ValueType::I16 => prim!(I16, i16),
            ValueType::U32 => prim!(U32, u32),
            ValueType::I32 => prim!(I32, i32),
            ValueType::F32 => prim!(F32, f32),
            ValueType::U64 => prim!(U64, u64),
            ValueType::I64 => prim!(I64, i64),
            ValueType::F64 => prim!(F64, f64),
            ValueType::Bool => {
                let raw = self.take(n as u64, key)?;
                let mut v = Vec::with_capacity(n);
                for (i, &b) in raw.iter().enumerate() {
                    match b {
                        0 => v.push(false),
                        1 => v.push(true),
                        _ => {
                            return Err(Error::format(
                                at,
                                format!("metadata key {key:?}: bool element {i} is {b}, expected 0 or 1"),
                            ))
                        }
                    }
                }
                Array::Bool(v)
            }
            ValueType::Str => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.string(&format!("element {i} of metadata key {key:?}"))?);
                }
                Array::Str(v)
            }
            ValueType::Array => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.array(key, depth + 1)?);
                }
                Array::Array(v)
            }
        })
    }
}
