//! Bit-exactness of `edgelm_core::quant` against the `gguf` Python package (the numpy
//! codec llama.cpp ships in gguf-py): random rows go to Python as raw bytes, and every
//! decoded f32 must have the same bits as ours (any NaN equals any NaN).
//!
//! Needs `python3` (or `$EDGELM_PYTHON`) with `gguf` and `numpy` importable. A missing
//! one fails the test rather than skipping it: CI installs them, and a skipped oracle
//! would let a decoding bug land silently.
//!
//! gguf-py has no Q8_1 or Q8_K codec (they never appear in files; its Q8_1 size table
//! entry is even stale, 40 bytes instead of 36), so those two are covered by the unit
//! tests only.

// `is_multiple_of` needs Rust 1.87; the workspace's rust-version is 1.80.
#![allow(clippy::manual_is_multiple_of)]

use edgelm_core::quant::{
    dequantize_row, quantize_row, BlockQ2_K, BlockQ3_K, BlockQ4_0, BlockQ4_1, BlockQ4_K, BlockQ5_0, BlockQ5_1,
    BlockQ5_K, BlockQ6_K, BlockQ8_0, GgmlType,
};
use half::{bf16, f16};
use std::mem::offset_of;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Types whose decoding gguf-py implements.
const DECODE_TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Types whose encoding gguf-py implements, with the same rounding as ggml's
/// `quantize_row_*_ref` (its K-quant encoders are not implemented).
const ENCODE_TYPES: &[GgmlType] =
    &[GgmlType::F16, GgmlType::BF16, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0];

const ROWS: usize = 3;
const N_PER_ROW: usize = 4 * 256;

/// Decodes each `<dir>/<NAME>.bin` (ROWS rows of raw blocks) with gguf-py into
/// `<NAME>.bin.out` (f32), or with `encode` each `<NAME>.f32` into `<NAME>.f32.out`.
const PY_SCRIPT: &str = r#"
import sys, numpy as np
from gguf import GGMLQuantizationType as T
import gguf.quants as q
mode, d, rows, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
for name in sys.argv[5:]:
    qt = T[name]
    if mode == "decode":
        data = np.fromfile(f"{d}/{name}.bin", dtype=np.uint8).reshape(rows, -1)
        out = np.asarray(q.dequantize(data, qt))
        assert out.dtype == np.float32 and out.shape == (rows, n), (name, out.dtype, out.shape)
        out.tofile(f"{d}/{name}.bin.out")
    else:
        data = np.fromfile(f"{d}/{name}.f32", dtype=np.float32).reshape(rows, n)
        out = np.asarray(q.quantize(data, qt))
        out.view(np.uint8).tofile(f"{d}/{name}.f32.out")
"#;

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// A finite f16: mostly ±[1e-3, 2] (realistic scales), sometimes any finite bit
    /// pattern (zero, subnormals, up to 65504) to cover the conversion's corners.
    fn scale_f16(&mut self) -> [u8; 2] {
        let r = self.next_u64();
        if r % 8 == 0 {
            let bits = (r >> 8) as u16;
            let bits = if bits & 0x7c00 == 0x7c00 { bits & !0x4000 } else { bits };
            return bits.to_le_bytes();
        }
        let mag = 1e-3 + self.unit() * 2.0;
        f16::from_f32(if r & 2 == 0 { mag } else { -mag }).to_le_bytes()
    }
    /// Weight-like f32 data with outliers, ties and out-of-f16-range values mixed in.
    fn value(&mut self) -> f32 {
        let r = self.next_u64();
        let g = (self.unit() + self.unit() + self.unit() + self.unit() - 2.0) * 1.7;
        match r % 50 {
            0 => g * 8.0,
            1 => g * 1e5,  // beyond f16 range: encodes as ±inf in F16
            2 => g * 1e-6, // f16 subnormals
            3 => {
                // Exactly halfway between two f16s: round-half-even decides.
                let h = f16::from_f32(g);
                let next = f16::from_bits(h.to_bits() + 1);
                (h.to_f32() + next.to_f32()) / 2.0
            }
            4 => {
                let h = bf16::from_f32(g);
                let next = bf16::from_bits(h.to_bits() + 1);
                (h.to_f32() + next.to_f32()) / 2.0
            }
            _ => g,
        }
    }
}

/// Offsets of the f16 scale fields in a block: random bytes there could be NaN/inf,
/// which would make every element of the block NaN and hide decoding bugs.
fn f16_fields(ty: GgmlType) -> Vec<usize> {
    use GgmlType::*;
    match ty {
        Q4_0 => vec![offset_of!(BlockQ4_0, d)],
        Q4_1 => vec![offset_of!(BlockQ4_1, d), offset_of!(BlockQ4_1, m)],
        Q5_0 => vec![offset_of!(BlockQ5_0, d)],
        Q5_1 => vec![offset_of!(BlockQ5_1, d), offset_of!(BlockQ5_1, m)],
        Q8_0 => vec![offset_of!(BlockQ8_0, d)],
        Q2_K => vec![offset_of!(BlockQ2_K, d), offset_of!(BlockQ2_K, dmin)],
        Q3_K => vec![offset_of!(BlockQ3_K, d)],
        Q4_K => vec![offset_of!(BlockQ4_K, d), offset_of!(BlockQ4_K, dmin)],
        Q5_K => vec![offset_of!(BlockQ5_K, d), offset_of!(BlockQ5_K, dmin)],
        Q6_K => vec![offset_of!(BlockQ6_K, d)],
        // Float types keep fully random bytes: NaN, inf and subnormals included.
        _ => vec![],
    }
}

fn random_rows(rng: &mut Rng, ty: GgmlType) -> Vec<u8> {
    let row_bytes = ty.row_bytes(N_PER_ROW).unwrap();
    let mut b: Vec<u8> = (0..ROWS * row_bytes).map(|_| rng.next_u64() as u8).collect();
    let fields = f16_fields(ty);
    if !fields.is_empty() {
        for block in b.chunks_exact_mut(ty.type_size()) {
            for &off in &fields {
                block[off..off + 2].copy_from_slice(&rng.scale_f16());
            }
        }
    }
    b
}

/// A scratch directory removed on drop, pass or fail.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("edgelm-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn python() -> String {
    std::env::var("EDGELM_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// Runs PY_SCRIPT in `mode` over `types`; panics with Python's stderr on failure.
fn run_python(mode: &str, dir: &Path, types: &[GgmlType]) {
    let py = python();
    let probe = Command::new(&py).args(["-c", "import numpy, gguf.quants"]).output();
    match probe {
        Err(e) => panic!(
            "cannot run `{py}` ({e}): this test needs Python 3 with the `gguf` and `numpy` \
             packages (pip install gguf numpy); set EDGELM_PYTHON to choose the interpreter"
        ),
        Ok(o) if !o.status.success() => panic!(
            "`{py}` cannot import gguf/numpy: {}\nthis test needs `pip install gguf numpy` \
             (or EDGELM_PYTHON pointing at an interpreter that has them)",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Ok(_) => {}
    }
    let out = Command::new(&py)
        .args(["-c", PY_SCRIPT, mode])
        .arg(dir)
        .args([ROWS.to_string(), N_PER_ROW.to_string()])
        .args(types.iter().map(|t| t.name()))
        .output()
        .expect("run python");
    assert!(out.status.success(), "gguf-py {mode} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

fn read_f32s(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

#[test]
fn dequantize_matches_gguf_py_bit_for_bit() {
    let dir = TempDir::new("quant-gguf-decode");
    let mut rng = Rng(0x5EED_0F66_1700);
    let mut inputs = Vec::new();
    for &ty in DECODE_TYPES {
        let raw = random_rows(&mut rng, ty);
        std::fs::write(dir.0.join(format!("{}.bin", ty.name())), &raw).unwrap();
        inputs.push((ty, raw));
    }
    run_python("decode", &dir.0, DECODE_TYPES);

    for (ty, raw) in inputs {
        let theirs = read_f32s(&dir.0.join(format!("{}.bin.out", ty.name())));
        assert_eq!(theirs.len(), ROWS * N_PER_ROW, "{ty}: gguf-py returned a wrong size");
        let row_bytes = ty.row_bytes(N_PER_ROW).unwrap();
        let mut ours = vec![0f32; N_PER_ROW];
        for (r, src) in raw.chunks_exact(row_bytes).enumerate() {
            dequantize_row(ty, src, &mut ours);
            for (i, (&a, &b)) in ours.iter().zip(&theirs[r * N_PER_ROW..]).enumerate() {
                let same = a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
                if !same {
                    let blk = i / ty.block_size();
                    let bytes = &src[blk * ty.type_size()..(blk + 1) * ty.type_size()];
                    panic!(
                        "{ty} row {r} element {i} (block {blk}): ours {a:e} ({:#010x}), \
                         gguf-py {b:e} ({:#010x}); block bytes {bytes:02x?}",
                        a.to_bits(),
                        b.to_bits()
                    );
                }
            }
        }
    }
}

#[test]
fn quantize_matches_gguf_py_bit_for_bit() {
    let dir = TempDir::new("quant-gguf-encode");
    let mut rng = Rng(0xC0DE_CAFE);
    let mut inputs = Vec::new();
    for &ty in ENCODE_TYPES {
        let mut x: Vec<f32> = (0..ROWS * N_PER_ROW).map(|_| rng.value()).collect();
        // Blocks that hit the zero-scale and all-equal branches.
        x[..64].fill(0.0);
        x[64..96].fill(0.75);
        let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(dir.0.join(format!("{}.f32", ty.name())), bytes).unwrap();
        inputs.push((ty, x));
    }
    run_python("encode", &dir.0, ENCODE_TYPES);

    for (ty, x) in inputs {
        let path = dir.0.join(format!("{}.f32.out", ty.name()));
        let theirs = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let row_bytes = ty.row_bytes(N_PER_ROW).unwrap();
        assert_eq!(theirs.len(), ROWS * row_bytes, "{ty}: gguf-py returned a wrong size");
        let mut ours = vec![0u8; row_bytes];
        for (r, src) in x.chunks_exact(N_PER_ROW).enumerate() {
            quantize_row(ty, src, &mut ours);
            let theirs = &theirs[r * row_bytes..(r + 1) * row_bytes];
            if let Some(i) = ours.iter().zip(theirs).position(|(a, b)| a != b) {
                let blk = i / ty.type_size();
                let (lo, hi) = (blk * ty.type_size(), (blk + 1) * ty.type_size());
                let xs = &src[blk * ty.block_size()..(blk + 1) * ty.block_size()];
                panic!(
                    "{ty} row {r} byte {i} (block {blk}) differs:\n ours    {:02x?}\n gguf-py {:02x?}\n input {xs:?}",
                    &ours[lo..hi],
                    &theirs[lo..hi]
                );
            }
        }
    }
}
