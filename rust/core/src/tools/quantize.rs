//! `edgelm quantize IN OUT TYPE`: a GGUF file to another GGUF file whose weights have
//! the types of a llama.cpp file type (`mix`), metadata and tokenizer carried over.
//!
//! The story, top to bottom:
//! 1. open and validate the input (memory-mapped: nothing is read twice or copied);
//! 2. plan: visit the tensors in llama.cpp's order and pick each one's type;
//! 3. write the header with every tensor's final size, then stream the tensors: rows
//!    in slabs of at most `SLAB_BYTES` of floats, each slab dequantized to f32 and
//!    re-encoded by `threads` workers, written, and reported to the progress callback;
//! 4. sync, re-open the result as a check, and only then rename it over the target.
//!
//! The output goes to a hidden temporary file beside the target (so the rename is
//! atomic); any failure — disk full, a non-finite weight, Ctrl-C through the callback —
//! removes it, so a target name never holds half a file.
//!
//! The encoders are llama.cpp's reference encoders (`quant::quantize_row`), which is
//! what `llama-quantize` runs when it has no importance matrix: the same input gives
//! the same bytes. Tensors whose type does not change are copied byte for byte.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use super::mix::{self, FileType, Mixer, ModelFacts};
use crate::error::{Error, Result};
use crate::gguf::{Gguf, GgufWriter, TensorInfo, Value};
use crate::quant::{self, GgmlType};

/// ggml's `GGML_QNT_VERSION`: the layout generation of the quantized blocks.
pub const QUANTIZATION_VERSION: u32 = 2;

/// f32 working set per slab (input rows dequantized); bounds memory for any model.
const SLAB_BYTES: usize = 64 << 20;

/// Split-file keys llama.cpp drops: the output is always one file.
const SPLIT_KEYS: [&str; 3] = ["split.no", "split.count", "split.tensors.count"];

#[derive(Clone, Debug)]
pub struct Options {
    pub ftype: FileType,
    /// Worker threads (≥ 1).
    pub threads: usize,
    /// Every quantizable tensor gets the file type's default type (no mix rules).
    pub pure: bool,
}

/// One tensor of the plan.
#[derive(Clone, Debug)]
pub struct Planned {
    pub info: TensorInfo,
    pub to: GgmlType,
    pub out_bytes: u64,
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub ftype: FileType,
    /// In writing order (llama.cpp's: layer, then name).
    pub tensors: Vec<Planned>,
    /// Tensors whose rows did not fit the mix's type and took a smaller-block one.
    pub n_fallback: usize,
}

/// Where the work is, for a progress bar.
#[derive(Clone, Debug)]
pub struct Progress<'a> {
    /// 1-based index of the tensor being written.
    pub tensor: usize,
    pub n_tensors: usize,
    pub name: &'a str,
    pub from: GgmlType,
    pub to: GgmlType,
    /// Input tensor bytes done so far, of `total_bytes`.
    pub done_bytes: u64,
    pub total_bytes: u64,
}

#[derive(Clone, Debug)]
pub struct Summary {
    pub ftype: FileType,
    pub n_tensors: usize,
    /// Tensors re-encoded (the others were copied).
    pub n_converted: usize,
    /// Of those, tensors that were already quantized: each loses a little more
    /// precision (llama-quantize refuses them without `--allow-requantize`).
    pub n_requantized: usize,
    pub n_fallback: usize,
    pub in_tensor_bytes: u64,
    pub out_tensor_bytes: u64,
    pub out_file_bytes: u64,
    pub seconds: f64,
    /// Per output type: (type, tensors, bytes).
    pub by_type: Vec<(GgmlType, usize, u64)>,
}

/// Decide every tensor's type without writing anything.
pub fn plan(gguf: &Gguf, opts: &Options) -> Result<Plan> {
    let facts = model_facts(gguf);
    let mut order: Vec<&TensorInfo> = gguf.tensors().iter().collect();
    order.sort_by(|a, b| mix::tensor_order(&a.name, &b.name));
    let mut mixer = Mixer::new(opts.ftype, opts.pure, facts);
    let mut tensors = Vec::with_capacity(order.len());
    for t in order {
        let to = mixer.target(&t.name, &t.dims, t.ty);
        let n_rows: u64 = t.dims[1..].iter().product();
        let row = to.row_bytes(t.dims[0] as usize).ok_or_else(|| {
            Error::invalid(format!(
                "tensor {} has rows of {} values, not a whole number of {to} blocks",
                t.name, t.dims[0]
            ))
        })?;
        tensors.push(Planned { info: t.clone(), to, out_bytes: row as u64 * n_rows });
    }
    Ok(Plan { ftype: opts.ftype, tensors, n_fallback: mixer.n_fallback })
}

/// Quantize `input` into `output`. `progress` is called after each slab; an `Err` from
/// it stops the work (and removes the partial file).
pub fn quantize_file(
    input: &Path,
    output: &Path,
    opts: &Options,
    progress: &mut dyn FnMut(&Progress) -> Result<()>,
) -> Result<Summary> {
    let t0 = Instant::now();
    let gguf = Gguf::open(input)?;
    let plan = plan(&gguf, opts)?;

    let mut w = GgufWriter::new();
    for (k, v) in gguf.metadata() {
        if !SPLIT_KEYS.contains(&k.as_str()) {
            w.kv(k, v.clone());
        }
    }
    // Like gguf_set_val: an existing key is removed and the new value appended, so the
    // metadata comes out in llama-quantize's order (and the file byte-identical).
    w.remove_kv("general.quantization_version")
        .push_kv("general.quantization_version", Value::U32(QUANTIZATION_VERSION));
    w.remove_kv("general.file_type").push_kv("general.file_type", Value::U32(opts.ftype.id()));
    for p in &plan.tensors {
        w.tensor_sized(&p.info.name, &p.info.dims, p.to, p.out_bytes);
    }

    let tmp = temp_path(output)?;
    let result = write_tensors(&gguf, &plan, &w, &tmp, output, opts, progress).and_then(|out_file_bytes| {
        // The result must be a GGUF we (and so llama.cpp) can open before it gets the name.
        Gguf::open(&tmp).map_err(|e| Error::invalid(format!("the quantized file failed validation: {e}")))?;
        std::fs::rename(&tmp, output).map_err(|source| Error::Write { path: output.to_owned(), source })?;
        Ok(out_file_bytes)
    });
    let out_file_bytes = match result {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };

    let mut by_type: Vec<(GgmlType, usize, u64)> = Vec::new();
    for p in &plan.tensors {
        match by_type.iter_mut().find(|(t, ..)| *t == p.to) {
            Some(e) => {
                e.1 += 1;
                e.2 += p.out_bytes;
            }
            None => by_type.push((p.to, 1, p.out_bytes)),
        }
    }
    by_type.sort_by_key(|e| std::cmp::Reverse(e.2));
    Ok(Summary {
        ftype: opts.ftype,
        n_tensors: plan.tensors.len(),
        n_converted: plan.tensors.iter().filter(|p| p.to != p.info.ty).count(),
        n_requantized: plan.tensors.iter().filter(|p| p.to != p.info.ty && p.info.ty.is_quantized()).count(),
        n_fallback: plan.n_fallback,
        in_tensor_bytes: plan.tensors.iter().map(|p| p.info.n_bytes).sum(),
        out_tensor_bytes: plan.tensors.iter().map(|p| p.out_bytes).sum(),
        out_file_bytes,
        seconds: t0.elapsed().as_secs_f64(),
        by_type,
    })
}

/// `.NAME.partial` beside the target: same file system, so the final rename is atomic.
pub(super) fn temp_path(output: &Path) -> Result<PathBuf> {
    let name =
        output.file_name().ok_or_else(|| Error::invalid(format!("output path {} names no file", output.display())))?;
    let dir = match output.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(Error::invalid(format!("output directory {} does not exist", dir.display())));
    }
    Ok(dir.join(format!(".{}.partial", name.to_string_lossy())))
}

fn write_tensors(
    gguf: &Gguf,
    plan: &Plan,
    w: &GgufWriter,
    tmp: &Path,
    output: &Path,
    opts: &Options,
    progress: &mut dyn FnMut(&Progress) -> Result<()>,
) -> Result<u64> {
    // Errors name the target: the temporary file is an implementation detail.
    let werr = |source| Error::Write { path: output.to_owned(), source };
    let file = File::create(tmp).map_err(werr)?;
    let mut out = BufWriter::with_capacity(4 << 20, file);
    let header = w.header();
    out.write_all(&header).map_err(werr)?;
    let mut written = header.len() as u64;

    let total_bytes: u64 = plan.tensors.iter().map(|p| p.info.n_bytes).sum();
    let mut done_bytes = 0u64;
    let n_tensors = plan.tensors.len();
    let mut buf: Vec<u8> = Vec::new();
    for (i, p) in plan.tensors.iter().enumerate() {
        let src = gguf.tensor_bytes(&p.info);
        let mut report = |done: u64| {
            progress(&Progress {
                tensor: i + 1,
                n_tensors,
                name: &p.info.name,
                from: p.info.ty,
                to: p.to,
                done_bytes: done,
                total_bytes,
            })
        };
        if p.to == p.info.ty {
            out.write_all(src).map_err(werr)?;
            done_bytes += p.info.n_bytes;
            report(done_bytes)?;
        } else {
            let n_cols = p.info.dims[0] as usize;
            let row_in = p.info.ty.row_bytes(n_cols).expect("validated at open");
            let row_out = p.to.row_bytes(n_cols).expect("checked by plan");
            let n_rows = src.len() / row_in;
            let slab_rows = (SLAB_BYTES / (n_cols * 4)).clamp(1, n_rows.max(1));
            let mut r0 = 0;
            while r0 < n_rows {
                let r1 = (r0 + slab_rows).min(n_rows);
                buf.resize((r1 - r0) * row_out, 0);
                convert_rows(&p.info, p.to, &src[r0 * row_in..r1 * row_in], &mut buf, r0, opts.threads)?;
                out.write_all(&buf).map_err(werr)?;
                done_bytes += ((r1 - r0) * row_in) as u64;
                report(done_bytes)?;
                r0 = r1;
            }
        }
        out.write_all(&vec![0u8; w.padding(p.out_bytes)]).map_err(werr)?;
        written += p.out_bytes + w.padding(p.out_bytes) as u64;
    }
    let file = out.into_inner().map_err(|e| werr(e.into_error()))?;
    file.sync_all().map_err(werr)?;
    Ok(written)
}

/// Re-encode whole rows: `src` holds rows of `from`, `dst` receives rows of `to`.
/// Workers take chunks of rows from a shared counter; each has its own f32 row.
fn convert_rows(
    info: &TensorInfo,
    to: GgmlType,
    src: &[u8],
    dst: &mut [u8],
    first_row: usize,
    threads: usize,
) -> Result<()> {
    let n_cols = info.dims[0] as usize;
    let row_in = info.ty.row_bytes(n_cols).expect("validated at open");
    let row_out = to.row_bytes(n_cols).expect("checked by plan");
    let n_rows = src.len() / row_in;
    debug_assert_eq!(dst.len(), n_rows * row_out);
    // Chunks of ~256 KiB of floats: small enough to balance two to sixteen workers.
    let rows_per_chunk = ((256 << 10) / (n_cols * 4)).max(1);
    let chunks: Vec<(usize, &mut [u8])> = dst.chunks_mut(rows_per_chunk * row_out).enumerate().collect();
    let queue = Mutex::new(chunks.into_iter());
    let bad_row = AtomicUsize::new(usize::MAX);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let mut row = vec![0f32; n_cols];
                loop {
                    let next = queue.lock().expect("queue lock").next();
                    let Some((c, out)) = next else { break };
                    let r0 = c * rows_per_chunk;
                    for (k, y) in out.chunks_exact_mut(row_out).enumerate() {
                        let r = r0 + k;
                        quant::dequantize_row(info.ty, &src[r * row_in..(r + 1) * row_in], &mut row);
                        if row.iter().any(|x| !x.is_finite()) {
                            bad_row.fetch_min(r, Ordering::Relaxed);
                        }
                        quant::quantize_row(to, &row, y);
                    }
                }
            });
        }
    });
    let bad = bad_row.into_inner();
    if bad != usize::MAX {
        return Err(Error::invalid(format!(
            "tensor {} has a non-finite value (NaN or infinity) in row {}: the input file is damaged",
            info.name,
            first_row + bad
        )));
    }
    Ok(())
}

/// The facts the mix rules need, from the file's metadata (absent keys count as 0).
fn model_facts(gguf: &Gguf) -> ModelFacts {
    let arch = gguf.get_str("general.architecture").ok().flatten().unwrap_or("").to_owned();
    let key = |k: &str| gguf.get_usize(&format!("{arch}.{k}")).ok().flatten();
    let n_layer = key("block_count").unwrap_or_else(|| {
        gguf.tensors()
            .iter()
            .filter_map(|t| t.name.strip_prefix("blk.")?.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |m| m + 1)
    });
    let n_head = key("attention.head_count").unwrap_or(0);
    ModelFacts {
        n_layer,
        n_head,
        n_head_kv: key("attention.head_count_kv").unwrap_or(n_head),
        n_attention_wv: gguf.tensors().iter().filter(|t| mix::is_attention_v(&t.name)).count(),
        tied_embeddings: gguf.tensor_info("output.weight").is_none(),
        n_expert: key("expert_count").unwrap_or(0),
        arch,
    }
}
