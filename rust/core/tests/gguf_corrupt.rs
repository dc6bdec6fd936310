//! Hostile and broken GGUF files: one crafted defect per case, each asserting the
//! error's text; then a bounded mutation fuzz that must never panic.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use edgelm_core::gguf::{Array, Gguf, GgufWriter, Value};
use edgelm_core::model::Model;
use edgelm_core::quant::GgmlType;
use edgelm_core::tokenizer::Tokenizer;

use common::{tiny_llama, Tiny};

fn valid() -> GgufWriter {
    tiny_llama(&Tiny::default())
}

/// Header = magic + version + n_tensors + n_kv.
fn header(version: u32, n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&n_tensors.to_le_bytes());
    b.extend_from_slice(&n_kv.to_le_bytes());
    b
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

/// Parse, build the model and its tokenizer; return the error text of whichever failed.
fn load_err(bytes: Vec<u8>) -> String {
    let g = match Gguf::from_bytes(bytes) {
        Err(e) => return e.to_string(),
        Ok(g) => g,
    };
    if let Err(e) = Model::load(g.clone()) {
        return e.to_string();
    }
    match Tokenizer::from_gguf(&g) {
        Err(e) => e.to_string(),
        Ok(_) => "loaded fine".to_string(),
    }
}

fn with_tensor_replaced(name: &str, cols: u64, rows: u64) -> Vec<u8> {
    let mut w = valid();
    w.remove_tensor(name);
    let ty = GgmlType::Q8_0;
    let n = ty.row_bytes(cols as usize).unwrap() * rows as usize;
    w.tensor(name, &[cols, rows], ty, vec![0u8; n]);
    w.to_bytes()
}

#[test]
fn valid_tiny_model_loads() {
    assert_eq!(load_err(valid().to_bytes()), "loaded fine");
}

#[test]
fn corrupt_file_table() {
    let good = valid().to_bytes();
    let tiny_tensor = |ty: u32, dims: &[u64], offset: Option<u64>, data: usize| {
        let mut w = GgufWriter::new();
        w.kv("general.architecture", Value::Str("llama".into()));
        w.raw_tensor("t", dims, ty, vec![0u8; data], offset);
        w.to_bytes()
    };
    let two_tensors = |off_b: u64| {
        let mut w = GgufWriter::new();
        w.tensor("a", &[64], GgmlType::F32, vec![0u8; 256]);
        w.raw_tensor("b", &[64], GgmlType::F32 as u32, vec![0u8; 256], Some(off_b));
        w.to_bytes()
    };

    let mut cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty file", vec![], "truncated reading magic"),
        ("truncated header", good[..10].to_vec(), "at byte 8: file truncated reading tensor count: need 8 bytes, 2 remain"),
        ("truncated version", good[..6].to_vec(), "file truncated reading version"),
        ("truncated in metadata", good[..200].to_vec(), "remain"),
        ("truncated in tensor data", good[..good.len() - 100].to_vec(), "extends past the end of the file"),
        ("wrong magic", { let mut b = good.clone(); b[..4].copy_from_slice(b"GGML"); b }, "wrong magic \"GGML\""),
        ("unknown version", { let mut b = good.clone(); b[4..8].copy_from_slice(&7u32.to_le_bytes()); b }, "unsupported GGUF version 7; supported versions are 2 and 3"),
        ("version 1", { let mut b = good.clone(); b[4..8].copy_from_slice(&1u32.to_le_bytes()); b }, "unsupported GGUF version 1"),
        ("big-endian", { let mut b = good.clone(); b[4..8].copy_from_slice(&3u32.to_be_bytes()); b }, "big-endian GGUF files are not supported"),
        ("absurd tensor count", { let mut b = header(3, u64::MAX, 0); b.extend([0u8; 64]); b }, "tensor count 18446744073709551615 cannot fit"),
        ("absurd metadata count", { let mut b = header(3, 0, 1 << 62); b.extend([0u8; 64]); b }, "metadata count 4611686018427387904 cannot fit"),
        ("key longer than the file", { let mut b = header(3, 0, 1); b.extend_from_slice(&(1u64 << 40).to_le_bytes()); b.extend([0u8; 16]); b }, "claims 1099511627776 bytes; the limit is"),
        ("string longer than what remains", {
            let mut b = header(3, 0, 1); put_str(&mut b, "k"); b.extend_from_slice(&8u32.to_le_bytes());
            b.extend_from_slice(&1000u64.to_le_bytes()); b.extend_from_slice(b"short"); b
        }, "claims 1000 bytes but only 5 remain"),
        ("array longer than the file", {
            let mut b = header(3, 0, 1); put_str(&mut b, "arr"); b.extend_from_slice(&9u32.to_le_bytes());
            b.extend_from_slice(&6u32.to_le_bytes()); b.extend_from_slice(&(1u64 << 61).to_le_bytes()); b.extend([0u8; 8]); b
        }, "metadata key \"arr\": array of 2305843009213693952 F32 elements cannot fit"),
        ("string array count overflow", {
            let mut b = header(3, 0, 1); put_str(&mut b, "toks"); b.extend_from_slice(&9u32.to_le_bytes());
            b.extend_from_slice(&8u32.to_le_bytes()); b.extend_from_slice(&u64::MAX.to_le_bytes()); b
        }, "cannot fit"),
        ("unknown value type", {
            let mut b = header(3, 0, 1); put_str(&mut b, "weird"); b.extend_from_slice(&77u32.to_le_bytes()); b.extend([0u8; 8]); b
        }, "metadata key \"weird\" has unknown value type 77"),
        ("bad bool", {
            let mut b = header(3, 0, 1); put_str(&mut b, "flag"); b.extend_from_slice(&7u32.to_le_bytes()); b.push(2); b
        }, "bool byte is 2, expected 0 or 1"),
        ("invalid UTF-8 key", {
            let mut b = header(3, 0, 1); b.extend_from_slice(&2u64.to_le_bytes()); b.extend([0xff, 0xfe]);
            b.extend_from_slice(&4u32.to_le_bytes()); b.extend([0u8; 4]); b
        }, "is not valid UTF-8"),
        ("arrays nested too deep", {
            let mut b = header(3, 0, 1); put_str(&mut b, "deep"); b.extend_from_slice(&9u32.to_le_bytes());
            for _ in 0..8 { b.extend_from_slice(&9u32.to_le_bytes()); b.extend_from_slice(&1u64.to_le_bytes()); }
            b.extend([0u8; 64]); b
        }, "arrays nest deeper than 4"),
        ("duplicate key", {
            let mut w = valid(); w.push_kv("general.name", Value::Str("again".into())); w.to_bytes()
        }, "duplicate metadata key \"general.name\""),
        ("bad alignment", {
            let mut w = valid(); w.push_kv("general.alignment", Value::U32(3)); w.to_bytes()
        }, "general.alignment must be a u32 power of two, got 3"),
        ("unknown tensor type", tiny_tensor(99, &[32], None, 128), "tensor \"t\" has unknown or unsupported type id 99"),
        ("zero dimensions", tiny_tensor(0, &[], None, 0), "tensor \"t\" has 0 dimensions; expected 1 to 4"),
        ("five dimensions", tiny_tensor(0, &[1, 1, 1, 1, 1], None, 4), "tensor \"t\" has 5 dimensions"),
        ("zero-sized dimension", tiny_tensor(0, &[0, 4], None, 0), "dimension 0 is 0"),
        ("dimensions overflow", tiny_tensor(0, &[1 << 40, 1 << 40], None, 0), "overflow: their product exceeds 2^63-1"),
        ("row not a whole number of blocks", tiny_tensor(GgmlType::Q4_0 as u32, &[33], None, 18), "row length 33 is not a multiple of the block size 32"),
        ("misaligned offset", tiny_tensor(0, &[8], Some(4), 32), "data offset 4 is not a multiple of the alignment 32"),
        ("offset past the end", tiny_tensor(0, &[8], Some(1 << 20), 32), "extends past the end of the file"),
        ("overlapping tensors", two_tensors(128), "tensor \"b\" data at offset 128 overlaps tensor \"a\" ([0, 256))"),
        ("duplicate tensor name", {
            let mut w = GgufWriter::new(); w.tensor("x", &[8], GgmlType::F32, vec![0; 32]); w.tensor("x", &[8], GgmlType::F32, vec![0; 32]); w.to_bytes()
        }, "duplicate tensor name \"x\""),
        ("long tensor name", tiny_tensor_named(&"n".repeat(70)), "bytes; the limit is 63"),
        // Valid GGUF, but not a model we can build.
        ("unsupported architecture", {
            let mut w = valid(); w.kv("general.architecture", Value::Str("mamba".into())); w.to_bytes()
        }, "unsupported architecture \"mamba\"; supported architectures: llama, qwen2, gemma3, qwen3, qwen3moe, phi3, granite"),
        ("missing architecture", { let mut w = valid(); w.remove_kv("general.architecture"); w.to_bytes() }, "\"general.architecture\" is missing"),
        ("missing required metadata", { let mut w = valid(); w.remove_kv("llama.block_count"); w.to_bytes() }, "required metadata key \"llama.block_count\" is missing"),
        ("metadata of the wrong type", {
            let mut w = valid(); w.kv("llama.embedding_length", Value::Str("576".into())); w.to_bytes()
        }, "metadata key \"llama.embedding_length\" must be a non-negative integer"),
        ("absurd block count", { let mut w = valid(); w.kv("llama.block_count", Value::U32(1_000_000)); w.to_bytes() }, "metadata key \"llama.block_count\" is 1000000; the limit is 1024"),
        ("block count beyond the tensors", { let mut w = valid(); w.kv("llama.block_count", Value::U32(40)); w.to_bytes() }, "block_count 40 needs at least 360 tensors but the file has"),
        ("absurd embedding length", { let mut w = valid(); w.kv("llama.embedding_length", Value::U64(1 << 40)); w.to_bytes() }, "\"llama.embedding_length\" is 1099511627776; the limit is 131072"),
        ("heads do not divide", { let mut w = valid(); w.kv("llama.attention.head_count_kv", Value::U32(3)); w.to_bytes() }, "must be a multiple of attention.head_count_kv (3)"),
        ("missing tensor", { let mut w = valid(); w.remove_tensor("blk.1.ffn_up.weight"); w.to_bytes() }, "required tensor \"blk.1.ffn_up.weight\" is missing"),
        ("tensor shape disagrees with metadata", with_tensor_replaced("blk.0.attn_q.weight", 64, 32), "tensor \"blk.0.attn_q.weight\" has shape [64, 32] but the metadata implies [64, 64]"),
        ("norm length disagrees", {
            let mut w = valid(); w.remove_tensor("output_norm.weight"); w.tensor("output_norm.weight", &[32], GgmlType::F32, vec![0; 128]); w.to_bytes()
        }, "tensor \"output_norm.weight\" has shape [32] but the metadata implies [64]"),
    ];

    let mut failures = Vec::new();
    for (name, bytes, want) in cases.drain(..) {
        let got = load_err(bytes);
        if !got.contains(want) {
            failures.push(format!("{name}: expected error containing {want:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{} cases failed:\n{}", failures.len(), failures.join("\n"));
}

fn tiny_tensor_named(name: &str) -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.tensor(name, &[8], GgmlType::F32, vec![0u8; 32]);
    w.to_bytes()
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let good = valid().to_bytes();
    // Every prefix through the header and index, then a stride through the data.
    let index_end = 4096.min(good.len());
    let cuts = (0..index_end).chain((index_end..good.len()).step_by(97));
    for cut in cuts {
        let r = catch_unwind(AssertUnwindSafe(|| load_err(good[..cut].to_vec())));
        let msg = r.unwrap_or_else(|_| panic!("panic on a file truncated to {cut} bytes"));
        assert_ne!(msg, "loaded fine", "a file truncated to {cut} of {} bytes loaded", good.len());
    }
}

/// Mutation fuzzing: flip, overwrite and splice bytes of a valid file for a bounded
/// number of rounds; parsing and model building must return, never panic.
#[test]
fn mutation_fuzz_never_panics() {
    let good = valid().to_bytes();
    let rounds: usize = std::env::var("EDGELM_FUZZ_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(50_000);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut s: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rnd = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let interesting: [u64; 8] = [0, 1, 0x7f, 0xff, 0xffff_ffff, u64::MAX, 1 << 32, 1 << 62];
    let (mut loaded, mut rejected) = (0, 0);
    for round in 0..rounds {
        if std::time::Instant::now() > deadline {
            break;
        }
        let mut b = good.clone();
        // Mutations concentrate on the header and index, where the parser lives.
        let wide = rnd() % 4 == 0;
        for _ in 0..1 + rnd() % 4 {
            let span = if wide { b.len() } else { 4096.min(b.len()) };
            let at = (rnd() as usize) % span;
            match rnd() % 4 {
                0 => b[at] ^= 1 << (rnd() % 8),
                1 => b[at] = rnd() as u8,
                2 => {
                    let v = interesting[(rnd() % 8) as usize].to_le_bytes();
                    let n = [1usize, 2, 4, 8][(rnd() % 4) as usize];
                    for (i, &x) in v[..n].iter().enumerate() {
                        if at + i < b.len() {
                            b[at + i] = x;
                        }
                    }
                }
                _ => b.truncate(at.max(1)),
            }
        }
        let r = catch_unwind(AssertUnwindSafe(|| load_err(b)));
        match r {
            Ok(m) if m == "loaded fine" => loaded += 1,
            Ok(_) => rejected += 1,
            Err(_) => panic!("panic in round {round}"),
        }
    }
    assert!(rejected > 0, "mutations never produced an error ({loaded} loaded)");
}

#[test]
fn version_2_and_all_value_types_round_trip() {
    let mut w = GgufWriter::new();
    w.version = 2;
    let values = vec![
        ("u8", Value::U8(7)),
        ("i8", Value::I8(-7)),
        ("u16", Value::U16(65000)),
        ("i16", Value::I16(-32000)),
        ("u32", Value::U32(4_000_000_000)),
        ("i32", Value::I32(-2_000_000_000)),
        ("f32", Value::F32(1.5)),
        ("bool", Value::Bool(true)),
        ("str", Value::Str("héllo ✓".into())),
        ("u64", Value::U64(u64::MAX)),
        ("i64", Value::I64(i64::MIN)),
        ("f64", Value::F64(-2.25)),
        ("arr_str", Value::Array(Array::Str(vec!["a".into(), "".into(), "ζ".into()]))),
        ("arr_f32", Value::Array(Array::F32(vec![1.0, -2.0]))),
        ("arr_bool", Value::Array(Array::Bool(vec![true, false]))),
        ("arr_nested", Value::Array(Array::Array(vec![Array::I32(vec![1, 2]), Array::U8(vec![3])]))),
        ("arr_empty", Value::Array(Array::I64(vec![]))),
        ("general.alignment", Value::U32(64)),
    ];
    for (k, v) in &values {
        w.kv(k, v.clone());
    }
    w.tensor("a", &[16], GgmlType::F32, vec![1u8; 64]);
    w.tensor("b", &[32, 2], GgmlType::Q8_0, vec![2u8; 68]);
    let g = Gguf::from_bytes(w.to_bytes()).unwrap();
    assert_eq!(g.version, 2);
    assert_eq!(g.alignment, 64);
    for (k, v) in &values {
        assert_eq!(g.get(k), Some(v), "key {k}");
    }
    let b = g.tensor_info("b").unwrap();
    assert_eq!(b.offset % 64, 0);
    assert_eq!(g.tensor_bytes(b), &[2u8; 68][..]);
    assert_eq!(g.tensor_bytes(g.tensor_info("a").unwrap()), &[1u8; 64][..]);
}
