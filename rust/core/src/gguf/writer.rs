//! GGUF writer: the inverse of the loader, used by the quantizer and by tests that
//! craft files (including deliberately broken ones, via `raw_*` hooks).

use std::io::Write;

use super::{Array, Value, DEFAULT_ALIGNMENT};
use crate::quant::GgmlType;

pub struct GgufWriter {
    pub version: u32,
    pub alignment: usize,
    kv: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
}

struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ty: u32,
    /// The bytes, or empty for a tensor declared by size whose data the caller streams
    /// after `header()` (the quantizer: no whole model in memory).
    data: Vec<u8>,
    n_bytes: u64,
    /// Tests may force an offset to build defective files.
    offset_override: Option<u64>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    pub fn new() -> Self {
        GgufWriter { version: 3, alignment: DEFAULT_ALIGNMENT, kv: Vec::new(), tensors: Vec::new() }
    }

    /// Set a metadata value (replacing an earlier value of the same key).
    pub fn kv(&mut self, key: &str, value: Value) -> &mut Self {
        if let Some(slot) = self.kv.iter_mut().find(|(k, _)| k == key) {
            slot.1 = value;
            return self;
        }
        self.push_kv(key, value)
    }

    pub fn remove_kv(&mut self, key: &str) -> &mut Self {
        self.kv.retain(|(k, _)| k != key);
        self
    }

    pub fn remove_tensor(&mut self, name: &str) -> &mut Self {
        self.tensors.retain(|t| t.name != name);
        self
    }

    /// Append without checking for an existing key (duplicates allowed: for tests).
    pub fn push_kv(&mut self, key: &str, value: Value) -> &mut Self {
        if key == "general.alignment" {
            if let Value::U32(a) = value {
                if a != 0 && a.is_power_of_two() {
                    self.alignment = a as usize;
                }
            }
        }
        self.kv.push((key.to_owned(), value));
        self
    }

    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> &mut Self {
        self.raw_tensor(name, dims, ty as u32, data, None)
    }

    /// Any type id and an optional forced offset: for crafting defective files.
    pub fn raw_tensor(&mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>, offset: Option<u64>) -> &mut Self {
        let n_bytes = data.len() as u64;
        self.tensors.push(PendingTensor {
            name: name.to_owned(),
            dims: dims.to_vec(),
            ty,
            data,
            n_bytes,
            offset_override: offset,
        });
        self
    }

    /// Declare a tensor by its size only; `write` refuses such a writer, the caller
    /// writes `header()` and then each tensor's bytes followed by `padding(n_bytes)`.
    pub fn tensor_sized(&mut self, name: &str, dims: &[u64], ty: GgmlType, n_bytes: u64) -> &mut Self {
        self.tensors.push(PendingTensor {
            name: name.to_owned(),
            dims: dims.to_vec(),
            ty: ty as u32,
            data: Vec::new(),
            n_bytes,
            offset_override: None,
        });
        self
    }

    /// Zero bytes that follow a tensor of `n_bytes` so the next one starts aligned.
    pub fn padding(&self, n_bytes: u64) -> usize {
        let a = self.alignment as u64;
        (n_bytes.div_ceil(a) * a - n_bytes) as usize
    }

    /// Everything before the first tensor's bytes: header, metadata, tensor index and
    /// the padding up to the data section.
    pub fn header(&self) -> Vec<u8> {
        let mut head = Vec::new();
        head.extend_from_slice(super::MAGIC);
        head.extend_from_slice(&self.version.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            put_str(&mut head, k);
            head.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            put_value(&mut head, v);
        }
        let a = self.alignment as u64;
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut head, &t.name);
            head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&t.ty.to_le_bytes());
            let off = t.offset_override.unwrap_or(offset);
            head.extend_from_slice(&off.to_le_bytes());
            offset = (offset + t.n_bytes).div_ceil(a) * a;
        }
        let data_start = (head.len() as u64).div_ceil(a) * a;
        head.resize(data_start as usize, 0);
        head
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out).expect("writing to a Vec cannot fail");
        out
    }

    pub fn write(&self, w: &mut impl Write) -> std::io::Result<()> {
        if let Some(t) = self.tensors.iter().find(|t| t.data.len() as u64 != t.n_bytes) {
            return Err(std::io::Error::other(format!(
                "tensor {:?} was declared by size; stream its data after header()",
                t.name
            )));
        }
        w.write_all(&self.header())?;
        // Data is laid out in insertion order at the natural offsets; forced offsets
        // only change what the index claims.
        for t in &self.tensors {
            w.write_all(&t.data)?;
            w.write_all(&vec![0u8; self.padding(t.n_bytes)])?;
        }
        Ok(())
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::Str(s) => put_str(out, s),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Array(a) => put_array(out, a),
    }
}

fn put_array(out: &mut Vec<u8>, a: &Array) {
    out.extend_from_slice(&(a.elem_type() as u32).to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! each {
        ($v:expr) => {
            for x in $v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        Array::U8(v) => out.extend_from_slice(v),
        Array::I8(v) => out.extend(v.iter().map(|&x| x as u8)),
        Array::U16(v) => each!(v),
        Array::I16(v) => each!(v),
        Array::U32(v) => each!(v),
        Array::I32(v) => each!(v),
        Array::F32(v) => each!(v),
        Array::U64(v) => each!(v),
        Array::I64(v) => each!(v),
        Array::F64(v) => each!(v),
        Array::Bool(v) => out.extend(v.iter().map(|&b| b as u8)),
        Array::Str(v) => {
            for s in v {
                put_str(out, s);
            }
        }
        Array::Array(v) => {
            for inner in v {
                put_array(out, inner);
            }
        }
    }
}
