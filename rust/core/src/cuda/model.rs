//! The forward pass on the GPU: the same steps as `model::Model::forward_with`, in the
//! same order (embed → layers → norm → logits), with the weights uploaded once in
//! their GGUF block formats and the KV cache in device memory, paged by the same
//! block tables the scheduler manages.

use std::sync::Arc;

use std::collections::HashMap;

use super::{as_bytes, as_bytes_mut, Arg, DevBuf, Gpu, Graph};
use crate::error::{Error, Result};
use crate::kv::KvShape;
use crate::model::{logit_rows, Arch, Config, Ffn, LogitsWanted, Model, SeqInput, StepLogits, Weight};
use crate::quant::GgmlType;

/// Formats the kernels decode (`deq32` in kernels.cu).
pub const GPU_TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Tokens per `mmv` launch (MMV_TOK in kernels.cu).
const MMV_TOK: usize = 8;

pub struct GpuWeight {
    buf: DevBuf,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
}

impl GpuWeight {
    fn upload(gpu: &Arc<Gpu>, w: &Weight, name: &str) -> Result<GpuWeight> {
        if !GPU_TYPES.contains(&w.ty) {
            return Err(Error::Cuda(format!("tensor {name} is {:?}, which the CUDA kernels do not decode", w.ty)));
        }
        if !w.cols.is_multiple_of(32) {
            return Err(Error::Cuda(format!("tensor {name} has {} columns, not a multiple of 32", w.cols)));
        }
        GpuWeight::from_gguf(gpu, w.ty, w.bytes(), w.rows, w.cols)
    }

    /// Upload `rows` rows of GGUF-layout bytes, repacked for the kernels.
    fn from_gguf(gpu: &Arc<Gpu>, ty: GgmlType, bytes: &[u8], rows: usize, cols: usize) -> Result<GpuWeight> {
        let (buf, row_bytes) = upload_rows(gpu, ty, cols, bytes, rows)?;
        Ok(GpuWeight { buf, ty, rows, cols, row_bytes })
    }
}

/// Whether weights of this format take the int8 kernels (`mmvq`, `mmq`): their
/// activations are quantized to 8 bits per 32-block first, as on the CPU.
pub fn int8_decode(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(ty, Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q4_K | Q5_K | Q6_K)
}

/// One row from GGUF's block layout to the kernels' (see `deq32` in kernels.cu): for
/// the 32-block formats the quants of all blocks first (16 or 32 bytes a block, so a
/// block is one or two aligned 16-byte loads), then each per-block field as its own
/// array; Q6_K keeps ql/qh/scales (208 bytes, a 16-byte multiple) and moves its f16
/// d behind them. Same bytes, reordered; other formats are copied.
fn repack_row(ty: GgmlType, cols: usize, src: &[u8], dst: &mut [u8]) {
    use GgmlType::*;
    // (block bytes, [(offset in the block, length)] of the fields, quants last).
    let fields: &[(usize, usize)] = match ty {
        Q4_0 => &[(0, 2), (2, 16)],
        Q4_1 => &[(0, 4), (4, 16)],
        Q5_0 => &[(2, 4), (0, 2), (6, 16)],
        Q5_1 => &[(4, 4), (0, 4), (8, 16)],
        Q8_0 => &[(0, 2), (2, 32)],
        Q6_K => &[(208, 2), (0, 208)],
        _ => {
            dst.copy_from_slice(src);
            return;
        }
    };
    let bsize: usize = fields.iter().map(|f| f.1).sum();
    let n = src.len() / bsize;
    debug_assert_eq!(n * ty.block_size(), cols);
    // The quants (the last field) go first, then the others in the order listed.
    let (qoff, qlen) = fields[fields.len() - 1];
    let mut at = 0;
    for (b, blk) in src.chunks_exact(bsize).enumerate() {
        dst[b * qlen..(b + 1) * qlen].copy_from_slice(&blk[qoff..qoff + qlen]);
    }
    at += n * qlen;
    for &(off, len) in &fields[..fields.len() - 1] {
        for (b, blk) in src.chunks_exact(bsize).enumerate() {
            dst[at + b * len..at + (b + 1) * len].copy_from_slice(&blk[off..off + len]);
        }
        at += n * len;
    }
}

/// Upload `rows` equal rows of GGUF-layout bytes, each repacked (`repack_row`) and
/// starting at a multiple of 16 bytes (the decode kernel reads weights with 16-byte
/// loads); returns the buffer and the row stride.
fn upload_rows(gpu: &Arc<Gpu>, ty: GgmlType, cols: usize, bytes: &[u8], rows: usize) -> Result<(DevBuf, usize)> {
    let rb = bytes.len() / rows;
    let stride = rb.next_multiple_of(16);
    let mut packed = vec![0u8; stride * rows];
    for (dst, src) in packed.chunks_exact_mut(stride).zip(bytes.chunks_exact(rb)) {
        repack_row(ty, cols, src, &mut dst[..rb]);
    }
    Ok((gpu.upload(&packed)?, stride))
}

struct GpuLayer {
    attn_norm: DevBuf,
    wq: GpuWeight,
    wk: GpuWeight,
    wv: GpuWeight,
    wo: GpuWeight,
    bq: Option<DevBuf>,
    bk: Option<DevBuf>,
    bv: Option<DevBuf>,
    bo: Option<DevBuf>,
    q_norm: Option<DevBuf>,
    k_norm: Option<DevBuf>,
    post_attn_norm: Option<DevBuf>,
    ffn_norm: DevBuf,
    ffn: GpuFfn,
    post_ffn_norm: Option<DevBuf>,
}

/// A layer's feed-forward weights on the device (see `model::Ffn`).
enum GpuFfn {
    Dense {
        gate: GpuWeight,
        up: GpuWeight,
        down: GpuWeight,
        b_gate: Option<DevBuf>,
        b_up: Option<DevBuf>,
        b_down: Option<DevBuf>,
    },
    /// The router, and the stacked experts (`[n_expert * rows][cols]`, as in the file).
    Moe { router: GpuWeight, gate: GpuWeight, up: GpuWeight, down: GpuWeight },
}

pub struct GpuModel {
    pub gpu: Arc<Gpu>,
    pub cfg: Config,
    tok_embd: GpuWeight,
    layers: Vec<GpuLayer>,
    output_norm: DevBuf,
    output: GpuWeight,
    output_bias: Option<DevBuf>,
    rope_freqs: Option<DevBuf>,
    /// Bytes of weights on the device.
    pub weight_bytes: usize,
    /// On a GPU that shares DRAM with the CPU: bytes of the model file's tensor pages
    /// let go after the upload (`Gguf::release_tensor_pages`), so the weights are not
    /// in memory twice.
    pub host_bytes_released: usize,
    /// Whether any matrix is in a quantized format (`int8_decode`): then every matrix
    /// input is also made in int8.
    int8: bool,
}

/// The KV cache in device memory: per layer, K `[n_blocks * block_size][kv_dim_k]`
/// and V `[n_blocks * block_size][kv_dim_v]`, f16.
pub struct GpuKv {
    pub shape: KvShape,
    k: Vec<DevBuf>,
    v: Vec<DevBuf>,
    /// A step's activations and inputs, kept between steps and grown when a step needs
    /// more (allocating and freeing device memory every step costs milliseconds: a free
    /// waits for the device).
    scratch: Vec<DevBuf>,
    /// Decode steps captured as CUDA graphs, by shape (tokens, output rows): a step
    /// is ~150 small launches, and replaying them as one graph takes the per-launch
    /// cost off every token. Inputs live in the scratch buffers, so a graph stays
    /// valid until those are reallocated.
    graphs: HashMap<(usize, Vec<Run>), Graph>,
}

/// Stacked tokens `first..first + count` of one kind: solo (decode) or not (prompt).
type Run = (usize, usize, bool);

/// A matrix input: `n_tok` f32 rows of `cols`, and (`q8`) the same rows in int8 (from
/// `quantize_input` or the kernel that made them) for the int8 kernels.
#[derive(Clone, Copy)]
struct Input<'a> {
    x: &'a DevBuf,
    q8: Option<(&'a DevBuf, &'a DevBuf)>,
}

/// q[t][c] (int8) and d[t][c / 32] (f32 pairs: scale, scale × quant sum) from the f32
/// rows x[t][c], t < n_tok: the decode kernel's activations.
fn quantize_input(gpu: &Arc<Gpu>, x: &DevBuf, cols: usize, n_tok: usize, q: &DevBuf, d: &DevBuf) -> Result<()> {
    gpu.launch(
        "quantize_q8",
        (cols.div_ceil(256) as u32, n_tok as u32, 1),
        256,
        0,
        &[x.arg(), Arg::I32(cols as i32), Arg::I32(cols as i32), q.arg(), d.arg()],
    )
}

/// `x` as a matrix input, also quantized into `xq`, `xd`.
fn prepare_input<'a>(
    gpu: &Arc<Gpu>,
    x: &'a DevBuf,
    cols: usize,
    n_tok: usize,
    xq: &'a DevBuf,
    xd: &'a DevBuf,
) -> Result<Input<'a>> {
    quantize_input(gpu, x, cols, n_tok, xq, xd)?;
    Ok(Input { x, q8: Some((xq, xd)) })
}

/// Tokens from which a run of int8 tokens takes the tensor-core kernel (`mmq`) rather
/// than `mmvq` (`EDGELM_MMQ_MIN` overrides, for measurements). The two give a token the
/// same bits (kernels.cu: the same slices, added in the same order), so where the line
/// falls never changes a result.
fn mmq_min() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| std::env::var("EDGELM_MMQ_MIN").ok().and_then(|v| v.parse().ok()).unwrap_or(8))
}

/// y[t] = W x[t] for the stacked tokens of a step (x stride `w.cols`, y stride
/// `w.rows`). `runs` splits them into (first, count, solo): solo tokens (one per
/// sequence: decode) and the others (prompt chunks). Quantized formats take int8
/// activations: `mmvq` for short runs of decode tokens, the tensor-core `mmq` for the
/// rest (bit-identical per token); float formats take `mmv` (decode) or the tiled
/// `mmt`. Each kernel computes a token the same way whatever shares the launch, so a
/// sequence's results never depend on its batch.
fn launch_matmul(gpu: &Arc<Gpu>, w: &GpuWeight, x: Input<'_>, runs: &[Run], y: &DevBuf) -> Result<()> {
    launch_matmuls(gpu, &[(w, y)], x, runs, mmq_min())
}

/// Whether `count` decode tokens take `mmvq` (else `mmq`, with the same bits): below
/// `mmq_from` tokens; the K-quants, whose per-lane unpacking (scales and mins) costs
/// `mmq` more, from `EDGELM_MMQ_MIN_KQ` (default 24) unless `mmq_from` is 1 (all
/// tokens to `mmq`: tests and measurements).
pub fn decode_takes_mmvq(ty: GgmlType, count: usize, mmq_from: usize) -> bool {
    use GgmlType::*;
    static KQ: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let kq = *KQ.get_or_init(|| std::env::var("EDGELM_MMQ_MIN_KQ").ok().and_then(|v| v.parse().ok()).unwrap_or(24));
    let from = if matches!(ty, Q4_K | Q5_K | Q6_K) && mmq_from > 1 { mmq_from.max(kq) } else { mmq_from };
    count < from
}

/// `launch_matmul` for several matrices with the same input (q, k, v; gate, up): runs
/// of decode tokens that take `mmvq` do all of them (up to three) in one launch, with
/// the results of separate launches.
fn launch_matmuls(
    gpu: &Arc<Gpu>,
    ws: &[(&GpuWeight, &DevBuf)],
    x: Input<'_>,
    runs: &[Run],
    mmq_from: usize,
) -> Result<()> {
    let cols = ws[0].0.cols;
    for &(first, count, solo) in runs {
        let run = [(first, count, solo)];
        let all_int8 = ws.iter().all(|(w, _)| int8_decode(w.ty) && w.cols == cols);
        if !(all_int8 && solo && ws.iter().all(|(w, _)| decode_takes_mmvq(w.ty, count, mmq_from))) {
            for &(w, y) in ws {
                launch_matmul_with(gpu, w, x, &run, y, mmq_from)?;
            }
            continue;
        }
        let Some((xq, xd)) = x.q8 else {
            return Err(Error::Cuda("int8 matrix product without quantized activations".into()));
        };
        // (kernel, tokens a block, rows a warp): MMVQ_KERNEL in kernels.cu.
        let (name, nt, rpw) = match count {
            1 => ("mmvq1", 1, 2),
            2 => ("mmvq2", 2, 2),
            3 | 4 => ("mmvq4", 4, 4),
            _ => ("mmvq8", 8, 2),
        };
        for group in ws.chunks(3) {
            let mut args = vec![
                Arg::I32(cols as i32),
                xq.at(first * cols),
                xd.at(first * (cols / 32) * 8),
                Arg::I32(count as i32),
            ];
            let mut blocks = 0;
            for k in 0..3 {
                match group.get(k) {
                    Some(&(w, y)) => {
                        args.extend([
                            Arg::I32(w.ty as i32),
                            w.buf.arg(),
                            Arg::U64(w.row_bytes as u64),
                            Arg::I32(w.rows as i32),
                        ]);
                        args.extend([y.at(first * w.rows * 4), Arg::I32(w.rows as i32)]);
                        blocks += w.rows.div_ceil(4 * rpw);
                    }
                    None => args.extend([Arg::I32(0), Arg::Ptr(0), Arg::U64(0), Arg::I32(0), Arg::Ptr(0), Arg::I32(0)]),
                }
            }
            gpu.launch(name, (blocks as u32, count.div_ceil(nt) as u32, 1), 128, 0, &args)?;
        }
    }
    Ok(())
}

/// Bytes a staged weight row takes in `mmq_t`'s shared memory (kernels.cu `Stage`): the
/// row's 8 units of each part, rounded up to 16 bytes and padded so that the words
/// between rows are ≡ 4 (mod 8) (no bank conflicts).
fn mmq_stage_pitch(ty: GgmlType) -> usize {
    use GgmlType::*;
    let bytes: usize = match ty {
        Q4_0 => 8 * 18,
        Q4_1 => 8 * 20,
        Q5_0 => 8 * 22,
        Q5_1 => 8 * 24,
        Q8_0 => 8 * 34,
        Q4_K => 144,
        Q5_K => 176,
        Q6_K => 208 + 4,
        _ => 8 * 34,
    };
    let p16 = bytes.next_multiple_of(16);
    if (p16 / 4) % 8 == 4 {
        p16
    } else {
        p16 + 16
    }
}

/// Dynamic shared memory of an `mmq` block of 16·rt rows × 8·mt tokens (kernels.cu
/// `mmq_t`): two stages of staged weights (`mmq_stage_pitch` a row), activations (272
/// bytes a token) and their scales (64 bytes a token), or the warps' partial sums
/// (4 × rt × mt × 128 floats) that reuse the space after the loop, whichever is larger.
/// Above 48 KiB a kernel needs the opt-in that `Gpu::launch` makes.
fn mmq_shared(ty: GgmlType, rt: usize, mt: usize) -> u32 {
    let staged = 2 * (16 * rt * mmq_stage_pitch(ty) + 8 * mt * (272 + 64));
    staged.max(4 * rt * mt * 128 * 4) as u32
}

/// `set_mmq_tile`'s choice (row tiles << 8 | token tiles; 0: none).
static MMQ_TILE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Make every `mmq` launch use blocks of 16·`rt` rows × 8·`mt` tokens (tests: each
/// variant must give the same bits), or (None) let `mmq_tile` choose again.
pub fn set_mmq_tile(tile: Option<(usize, usize)>) {
    MMQ_TILE.store(tile.map_or(0, |(rt, mt)| rt << 8 | mt), std::sync::atomic::Ordering::Relaxed);
}

/// The `mmq` variant for `n` tokens of a `rows`-row matrix: (kernel, row tiles of 16,
/// token tiles of 8) a block (MMQ_KERNEL in kernels.cu). Token tiles: as few as cover
/// the tokens, up to 4. Row tiles: the most (up to 4) that still give two blocks per
/// multiprocessor (`k44_blocks` may hold the K-quants' 4x4 to one); larger
/// blocks reuse each weight and activation load over more products, smaller ones keep
/// every multiprocessor busy on small batches.
fn mmq_tile(sms: usize, ty: GgmlType, rows: usize, n: usize) -> (&'static str, usize, usize) {
    use GgmlType::*;
    let forced = MMQ_TILE.load(std::sync::atomic::Ordering::Relaxed);
    let (rt, mt) = if forced != 0 {
        (forced >> 8, forced & 0xff)
    } else {
        let mt = match n {
            0..=8 => 1,
            9..=16 => 2,
            _ => 4,
        };
        // Only the 32-token blocks come in more than one height.
        let fill = 2 * sms;
        let rt = if mt < 4 {
            1
        } else {
            [4, 2].into_iter().find(|&rt| rows.div_ceil(16 * rt) * n.div_ceil(8 * mt) >= fill).unwrap_or(1)
        };
        (rt, mt)
    };
    // The variants kernels.cu has; the K-quants' 4x4 is its own kernel (`k44_blocks`).
    match (rt, mt) {
        (1, 1) => ("mmq_1x1", 1, 1),
        (1, 2) => ("mmq_1x2", 1, 2),
        (2, 4) => ("mmq_2x4", 2, 4),
        (4, 4) if matches!(ty, Q4_K | Q5_K | Q6_K) => (if k44_blocks() == 2 { "mmq_4x4k2" } else { "mmq_4x4k" }, 4, 4),
        (4, 4) => ("mmq_4x4", 4, 4),
        _ => ("mmq_1x4", 1, 4),
    }
}

/// Blocks a multiprocessor of the K-quants' 4x4 `mmq`: 2 (`mmq_4x4k2`, held to 128
/// registers a thread, spilling some) or 1 (`mmq_4x4k`, up to 255 registers);
/// `EDGELM_MMQ_K44_BLOCKS=1` picks the second. Both give the same bits. Measured on the
/// H200 (8192×2048, 512 tokens): Q4_K 207 µs with two against 268 with one; Q6_K 307
/// against 295.
fn k44_blocks() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| match std::env::var("EDGELM_MMQ_K44_BLOCKS").as_deref() {
        Ok("1") => 1,
        _ => 2,
    })
}

fn launch_matmul_with(
    gpu: &Arc<Gpu>,
    w: &GpuWeight,
    x: Input<'_>,
    runs: &[Run],
    y: &DevBuf,
    mmq_from: usize,
) -> Result<()> {
    for &(first, count, solo) in runs {
        if int8_decode(w.ty) {
            let Some((xq, xd)) = x.q8 else {
                return Err(Error::Cuda("int8 matrix product without quantized activations".into()));
            };
            if solo && decode_takes_mmvq(w.ty, count, mmq_from) {
                launch_matmuls(gpu, &[(w, y)], x, &[(first, count, solo)], mmq_from)?;
                continue;
            }
            let (name, rt, mt) = mmq_tile(gpu.sms as usize, w.ty, w.rows, count);
            gpu.launch(
                name,
                (w.rows.div_ceil(16 * rt) as u32, count.div_ceil(8 * mt) as u32, 1),
                256,
                mmq_shared(w.ty, rt, mt),
                &[
                    Arg::I32(w.ty as i32),
                    w.buf.arg(),
                    Arg::U64(w.row_bytes as u64),
                    Arg::I32(w.rows as i32),
                    Arg::I32(w.cols as i32),
                    xq.at(first * w.cols),
                    xd.at(first * (w.cols / 32) * 8),
                    Arg::I32(count as i32),
                    y.at(first * w.rows * 4),
                    Arg::I32(w.rows as i32),
                ],
            )?;
            continue;
        }
        let (name, starts, grid_y) =
            if solo { ("mmv", MMV_TOK, 1) } else { ("mmt", count.max(1), count.div_ceil(64) as u32) };
        let grid_x = if solo { w.rows.div_ceil(8) } else { w.rows.div_ceil(64) } as u32;
        for t0 in (first..first + count).step_by(starts) {
            let nt = starts.min(first + count - t0);
            gpu.launch(
                name,
                (grid_x, grid_y, 1),
                256,
                0,
                &[
                    Arg::I32(w.ty as i32),
                    w.buf.arg(),
                    Arg::U64(w.row_bytes as u64),
                    Arg::I32(w.rows as i32),
                    Arg::I32(w.cols as i32),
                    x.x.at(t0 * w.cols * 4),
                    Arg::I32(nt as i32),
                    Arg::I32(w.cols as i32),
                    y.at(t0 * w.rows * 4),
                    Arg::I32(w.rows as i32),
                ],
            )?;
        }
    }
    Ok(())
}

/// The per-token attention kernels ([prompt tokens: `attn_tok*`, decode tokens:
/// `attn_dec*`]: a block per token and group of up to 4 query heads sharing a KV head,
/// keys split over 8 warps) and the group size, for head sizes 64, 128 and 256 (K and
/// V alike); other shapes take `attention`.
fn attn_tok_kernel(c: &Config) -> Option<([&'static str; 2], usize)> {
    let name = match c.head_dim {
        64 => ["attn_tok64", "attn_dec64"],
        128 => ["attn_tok128", "attn_dec128"],
        256 => ["attn_tok256", "attn_dec256"],
        _ => return None,
    };
    if c.head_dim_v != c.head_dim || c.n_head_kv == 0 || !c.n_head.is_multiple_of(c.n_head_kv) {
        return None;
    }
    let group = c.n_head / c.n_head_kv;
    let hg = [4, 2, 1].into_iter().find(|&k| group.is_multiple_of(k))?;
    Some((name, hg))
}

/// The tensor-core prompt attention kernel (kernels.cu `attn_fa_t`) for this model, if
/// it has one: head sizes 64 and 128, at most 8 query heads a KV head (a warp each).
/// `EDGELM_CUDA_FA=0` keeps `attn_tok` (measurements).
fn attn_fa_kernel(c: &Config) -> Option<&'static str> {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *OFF.get_or_init(|| std::env::var("EDGELM_CUDA_FA").is_ok_and(|v| v == "0")) {
        return None;
    }
    let group = c.n_head.checked_div(c.n_head_kv)?;
    if c.head_dim_v != c.head_dim || group == 0 || group > 8 || c.n_head != group * c.n_head_kv {
        return None;
    }
    match c.head_dim {
        64 => Some("attn_fa64"),
        128 => Some("attn_fa128"),
        _ => None,
    }
}

/// The `mmq_moe` tiles for `n_pairs` (token, slot) pairs over `n_expert` experts:
/// (token tiles of 8 a block, `MT`, sized to the pairs an expert gets on average; the
/// most tiles `moe_sort` can cut: one partial tile per expert used, the rest full).
fn moe_tiles(n_pairs: usize, n_expert: usize) -> (usize, usize) {
    if n_pairs == 0 {
        return (1, 0);
    }
    let avg = n_pairs.div_ceil(n_expert.min(n_pairs));
    let mt = match avg {
        0..=8 => 1,
        9..=16 => 2,
        _ => 4,
    };
    (mt, n_pairs.div_ceil(8 * mt) + n_expert.min(n_pairs))
}

/// Extend `runs` with token `t` of kind `solo` (tokens come in order).
fn push_run(runs: &mut Vec<Run>, t: usize, solo: bool) {
    match runs.last_mut() {
        Some(r) if r.2 == solo => r.1 += 1,
        _ => runs.push((t, 1, solo)),
    }
}

/// Scratch slots (see `GpuKv::ensure`).
const S_X: usize = 0;
const S_H: usize = 1;
const S_Q: usize = 2;
const S_K: usize = 3;
const S_V: usize = 4;
const S_ATT: usize = 5;
const S_O: usize = 6;
const S_G: usize = 7;
const S_U: usize = 8;
const S_INPUTS: usize = 9;
const S_XS: usize = 10;
const S_LOGITS: usize = 11;
const S_XQ: usize = 12;
const S_XD: usize = 13;
// Mixture of experts: router logits, the routing's ints (ids, weights, sorted pairs,
// their positions and experts, tiles), the gathered int8 inputs, the experts' outputs.
const S_MLOG: usize = 14;
const S_MOE: usize = 15;
const S_GQ: usize = 16;
const S_GD: usize = 17;
const S_MD: usize = 18;
const N_SCRATCH: usize = 19;

impl GpuKv {
    /// Make scratch slot `i` hold at least `bytes` (grown by half again, so a run of
    /// slowly growing steps does not reallocate every time).
    fn ensure(&mut self, gpu: &Arc<Gpu>, sizes: &[(usize, usize)]) -> Result<()> {
        for &(i, bytes) in sizes {
            if self.scratch[i].bytes < bytes {
                self.scratch[i] = gpu.alloc(bytes + bytes / 2)?;
                self.graphs.clear(); // they point at the old buffers
            }
        }
        Ok(())
    }
}

fn opt(gpu: &Arc<Gpu>, v: &Option<Vec<f32>>) -> Result<Option<DevBuf>> {
    v.as_ref().map(|x| gpu.upload_f32(x)).transpose()
}

impl GpuModel {
    /// Upload a loaded model's weights. Fails (before allocating much) when a tensor
    /// is in a format the kernels do not decode; the caller then stays on the CPU.
    pub fn upload(gpu: &Arc<Gpu>, m: &Model) -> Result<GpuModel> {
        if m.cfg.arch.is_encoder() {
            return Err(Error::Cuda(format!("{} is an encoder; encoders run on the CPU", m.cfg.arch.name())));
        }
        if m.cfg.head_dim_v > 4 * 128 {
            return Err(Error::Cuda(format!(
                "value head size {} is larger than the attention kernel takes (512)",
                m.cfg.head_dim_v
            )));
        }
        // The feed-forward matrices of a layer, by name (the MoE router first).
        let ffn_mats = |l: &crate::model::Layer| -> Vec<(&'static str, Weight)> {
            match &l.ffn {
                Ffn::Dense { gate, up, down, .. } => {
                    vec![("ffn_gate", gate.clone()), ("ffn_up", up.clone()), ("ffn_down", down.clone())]
                }
                Ffn::Moe(x) => vec![
                    ("ffn_gate_inp", x.router.clone()),
                    ("ffn_gate_exps", x.gate.clone()),
                    ("ffn_up_exps", x.up.clone()),
                    ("ffn_down_exps", x.down.clone()),
                ],
            }
        };
        for (i, l) in m.layers.iter().enumerate() {
            let attn = [
                ("attn_q", l.wq.clone()),
                ("attn_k", l.wk.clone()),
                ("attn_v", l.wv.clone()),
                ("attn_output", l.wo.clone()),
            ];
            for (n, w) in attn.into_iter().chain(ffn_mats(l)) {
                if !GPU_TYPES.contains(&w.ty) {
                    return Err(Error::Cuda(format!(
                        "blk.{i}.{n}.weight is {:?}, which the CUDA kernels do not decode",
                        w.ty
                    )));
                }
                // The experts go through the int8 kernels only (`mmq_moe`, `mmvq_moe`).
                if n.ends_with("_exps") && !int8_decode(w.ty) {
                    return Err(Error::Cuda(format!(
                        "blk.{i}.{n}.weight is {:?}; mixture-of-experts layers run on the GPU with quantized experts \
                         (Q4_0 … Q8_0, Q4_K … Q6_K), the CPU runs this file",
                        w.ty
                    )));
                }
            }
            if let Some(moe) = &m.cfg.moe {
                if moe.n_expert > 1024 {
                    return Err(Error::Cuda(format!("{} experts: the GPU router takes at most 1024", moe.n_expert)));
                }
            }
        }
        let mut bytes = 0;
        let mut up = |w: &Weight, name: &str| -> Result<GpuWeight> {
            bytes += w.n_bytes();
            GpuWeight::upload(gpu, w, name)
        };
        let int8 = int8_decode(m.output.ty)
            || m.layers.iter().any(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo].iter().any(|w| int8_decode(w.ty))
                    || ffn_mats(l).iter().any(|(_, w)| int8_decode(w.ty))
            });
        let tok_embd = up(&m.tok_embd, "token_embd.weight")?;
        let output = up(&m.output, "output.weight")?;
        let mut layers = Vec::with_capacity(m.layers.len());
        for (i, l) in m.layers.iter().enumerate() {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            let ffn = match &l.ffn {
                Ffn::Dense { gate, up: upw, down, b_gate, b_up, b_down } => GpuFfn::Dense {
                    gate: up(gate, &n("ffn_gate"))?,
                    up: up(upw, &n("ffn_up"))?,
                    down: up(down, &n("ffn_down"))?,
                    b_gate: opt(gpu, b_gate)?,
                    b_up: opt(gpu, b_up)?,
                    b_down: opt(gpu, b_down)?,
                },
                Ffn::Moe(x) => GpuFfn::Moe {
                    router: up(&x.router, &n("ffn_gate_inp"))?,
                    gate: up(&x.gate, &n("ffn_gate_exps"))?,
                    up: up(&x.up, &n("ffn_up_exps"))?,
                    down: up(&x.down, &n("ffn_down_exps"))?,
                },
            };
            layers.push(GpuLayer {
                attn_norm: gpu.upload_f32(&l.attn_norm)?,
                wq: up(&l.wq, &n("attn_q"))?,
                wk: up(&l.wk, &n("attn_k"))?,
                wv: up(&l.wv, &n("attn_v"))?,
                wo: up(&l.wo, &n("attn_output"))?,
                bq: opt(gpu, &l.bq)?,
                bk: opt(gpu, &l.bk)?,
                bv: opt(gpu, &l.bv)?,
                bo: opt(gpu, &l.bo)?,
                q_norm: opt(gpu, &l.q_norm)?,
                k_norm: opt(gpu, &l.k_norm)?,
                post_attn_norm: opt(gpu, &l.post_attn_norm)?,
                ffn_norm: gpu.upload_f32(&l.ffn_norm)?,
                ffn,
                post_ffn_norm: opt(gpu, &l.post_ffn_norm)?,
            });
        }
        // A GPU sharing DRAM with the CPU (Jetson) now holds the weights: the file's
        // pages need not stay beside them (EDGELM_KEEP_HOST_WEIGHTS=1 keeps them).
        let keep = std::env::var("EDGELM_KEEP_HOST_WEIGHTS").is_ok_and(|v| v != "0");
        let host_bytes_released = if gpu.integrated && !keep { m.file.release_tensor_pages()? } else { 0 };
        Ok(GpuModel {
            gpu: Arc::clone(gpu),
            cfg: m.cfg.clone(),
            tok_embd,
            layers,
            output_norm: gpu.upload_f32(&m.output_norm)?,
            output,
            output_bias: opt(gpu, &m.output_bias)?,
            rope_freqs: opt(gpu, &m.rope_freqs)?,
            weight_bytes: bytes,
            int8,
            host_bytes_released,
        })
    }

    /// Carry out KV copies (prompt reuse, `KvCopy`) in every layer: `table(layer,
    /// delta)` gives the (cos, sin) of each RoPE pair for a move of `delta` positions
    /// (None: copy K unturned), as the CPU's `Rope::shift_table`.
    pub fn copy_kv(
        &self,
        kv: &mut GpuKv,
        copies: &[crate::kv::KvCopy],
        table: &dyn Fn(usize, i64) -> Option<Vec<(f32, f32)>>,
    ) -> Result<()> {
        let c = &self.cfg;
        let bs = kv.shape.block_size;
        for cp in copies {
            cp.check(&kv.shape)?;
            let slot = |t: &[u32], p: usize| t[p / bs] * bs as u32 + (p % bs) as u32;
            let src: Vec<u32> = (0..cp.n).map(|i| slot(&cp.src_table, cp.src_start + i)).collect();
            let dst: Vec<u32> = (0..cp.n).map(|i| slot(&cp.dst_table, cp.dst_start + i)).collect();
            let (d_src, d_dst) = (self.gpu.upload(as_bytes(&src))?, self.gpu.upload(as_bytes(&dst))?);
            let delta = cp.dst_start as i64 - cp.src_start as i64;
            for il in 0..c.n_layer {
                let cs = if delta != 0 { table(il, delta) } else { None };
                let n_rot = cs.as_ref().map_or(0, |t| 2 * t.len());
                let flat: Vec<f32> = cs.unwrap_or_default().iter().flat_map(|&(a, b)| [a, b]).collect();
                let d_cs = self.gpu.upload_f32(if flat.is_empty() { &[0.0] } else { &flat })?;
                self.gpu.launch(
                    "kv_copy",
                    (cp.n as u32, 1, 1),
                    128,
                    0,
                    &[
                        kv.k[il].arg(),
                        kv.v[il].arg(),
                        d_src.arg(),
                        d_dst.arg(),
                        d_cs.arg(),
                        Arg::I32(c.n_head_kv as i32),
                        Arg::I32(c.head_dim as i32),
                        Arg::I32(c.head_dim_v as i32),
                        Arg::I32(n_rot as i32),
                        Arg::I32(c.rope_neox as i32),
                    ],
                )?;
            }
            self.gpu.sync()?;
        }
        Ok(())
    }

    pub fn new_kv(&self, n_blocks: usize, block_size: usize) -> Result<GpuKv> {
        let c = &self.cfg;
        let shape =
            KvShape { n_layer: c.n_layer, n_blocks, block_size, kv_dim_k: c.kv_dim_k(), kv_dim_v: c.kv_dim_v() };
        let slots = n_blocks * block_size;
        let mut k = Vec::with_capacity(c.n_layer);
        let mut v = Vec::with_capacity(c.n_layer);
        for _ in 0..c.n_layer {
            k.push(self.gpu.zeros(slots * shape.kv_dim_k * 2)?);
            v.push(self.gpu.zeros(slots * shape.kv_dim_v * 2)?);
        }
        let scratch = (0..N_SCRATCH).map(|_| self.gpu.alloc(256)).collect::<Result<Vec<_>>>()?;
        Ok(GpuKv { shape, k, v, scratch, graphs: HashMap::new() })
    }

    fn matmul(&self, w: &GpuWeight, x: Input<'_>, runs: &[Run], y: &DevBuf) -> Result<()> {
        launch_matmul(&self.gpu, w, x, runs, y)
    }

    fn rms_norm(&self, x: &DevBuf, w: &DevBuf, y: &DevBuf, rows: usize, n: usize) -> Result<()> {
        self.gpu.launch(
            "rms_norm",
            (rows as u32, 1, 1),
            256,
            0,
            &[x.arg(), w.arg(), y.arg(), Arg::I32(n as i32), Arg::F32(self.cfg.rms_eps)],
        )
    }

    fn elementwise(&self, name: &'static str, n: usize, args: &[Arg]) -> Result<()> {
        self.gpu.launch(name, (n.div_ceil(256) as u32, 1, 1), 256, 0, args)
    }

    fn add_bias(&self, x: &DevBuf, b: &Option<DevBuf>, width: usize, n_tok: usize) -> Result<()> {
        if let Some(b) = b {
            self.elementwise(
                "add_bias",
                width * n_tok,
                &[x.arg(), b.arg(), Arg::I32(width as i32), Arg::I32((width * n_tok) as i32)],
            )?;
        }
        Ok(())
    }

    /// One step for a batch of sequences (see `Model::forward_with`); the logits of
    /// the rows asked for come back to the host.
    pub fn forward(&self, kv: &mut GpuKv, seqs: &[SeqInput<'_>]) -> Result<StepLogits> {
        let c = &self.cfg;
        let gpu = &self.gpu;
        let bs = kv.shape.block_size;
        // Validate everything before touching the device.
        let mut ids: Vec<u32> = Vec::new();
        let mut pos: Vec<i32> = Vec::new();
        let mut slot: Vec<u32> = Vec::new();
        let mut tables: Vec<u32> = Vec::new();
        let mut tok_table: Vec<i32> = Vec::new();
        let mut runs: Vec<Run> = Vec::new();
        for s in seqs {
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= c.n_vocab) {
                return Err(Error::invalid(format!(
                    "token id {bad} is out of range (vocabulary has {} tokens)",
                    c.n_vocab
                )));
            }
            let n_pos = s.pos + s.tokens.len();
            kv.shape.check_table(s.block_table, n_pos)?;
            let need = n_pos.div_ceil(bs);
            let off = tables.len() as i32;
            tables.extend_from_slice(&s.block_table[..need]);
            for (i, &t) in s.tokens.iter().enumerate() {
                let p = s.pos + i;
                push_run(&mut runs, ids.len(), i >= s.solo_from);
                ids.push(t);
                pos.push(p as i32);
                slot.push(s.block_table[p / bs] * bs as u32 + (p % bs) as u32);
                tok_table.push(off);
            }
        }
        // Prompt attention tiles (kernels.cu `attn_fa_t`), per run: the run's tokens split
        // at each sequence's start and every 16 tokens, as (first token, count) pairs.
        let fa = attn_fa_kernel(c);
        let mut tiles: Vec<u32> = Vec::new();
        let mut run_tiles: Vec<(usize, usize)> = Vec::with_capacity(runs.len());
        for &(first, count, solo) in &runs {
            let start = tiles.len() / 2;
            if !solo && fa.is_some() {
                let mut t = first;
                while t < first + count {
                    let mut n = 1;
                    while n < 16 && t + n < first + count && tok_table[t + n] == tok_table[t] {
                        n += 1;
                    }
                    tiles.extend([t as u32, n as u32]);
                    t += n;
                }
            }
            run_tiles.push((start, tiles.len() / 2 - start));
        }
        let n_tok = ids.len();
        if n_tok == 0 {
            return Ok(StepLogits { n_vocab: c.n_vocab, data: vec![], rows: vec![], lse: vec![], greedy: vec![] });
        }
        let e = c.n_embd;
        let (qd, kd, vd) = (c.q_dim(), c.kv_dim_k(), c.kv_dim_v());
        let ad = c.n_head * c.head_dim_v;
        let rows = logit_rows(seqs);
        let n_out = rows.len();
        // A sequence's last-token logits take the decode kernel, so they do not
        // depend on how many sequences share the step.
        let mut out_runs: Vec<Run> = Vec::new();
        for (j, &(si, _, _)) in rows.iter().enumerate() {
            push_run(&mut out_runs, j, seqs[si].logits.last());
        }
        let idx: Vec<i32> = rows.iter().map(|&(_, _, t)| t as i32).collect();
        // The widest matrix input (int8 activations: one byte a column).
        let wide = e.max(ad).max(c.n_ff);
        // Mixture of experts: n_pairs (token, slot) pairs a layer, each a row of the
        // experts' products; `moe_tiles` their tiles for `mmq_moe`.
        let (n_pairs, n_ff_exp, n_expert) =
            c.moe.as_ref().map_or((0, 0, 0), |m| (n_tok * m.n_expert_used, m.n_ff_exp, m.n_expert));
        let (moe_mt, moe_tiles) = moe_tiles(n_pairs, n_expert);
        let ffn_rows = (n_tok * c.n_ff).max(n_pairs * n_ff_exp);
        let q8_rows = (n_tok.max(n_out) * wide).max(n_pairs * n_ff_exp);
        kv.ensure(
            gpu,
            &[
                (S_X, n_tok * e * 4),
                (S_H, n_tok * e * 4),
                (S_Q, n_tok * qd * 4),
                (S_K, n_tok * kd * 4),
                (S_V, n_tok * vd * 4),
                (S_ATT, n_tok * ad * 4),
                (S_O, n_tok * e * 4),
                (S_G, ffn_rows * 4),
                (S_U, ffn_rows * 4),
                (S_INPUTS, (4 * n_tok + n_out + tables.len() + tiles.len()) * 4),
                (S_XS, n_out * e * 4),
                (S_LOGITS, n_out * (c.n_vocab + 3) * 4),
                (S_XQ, q8_rows),
                (S_XD, q8_rows / 32 * 8),
                (S_MLOG, n_tok * n_expert * 4),
                (S_MOE, (5 * n_pairs + 3 * moe_tiles) * 4),
                (S_GQ, n_pairs * e),
                (S_GD, n_pairs * e / 32 * 8),
                (S_MD, n_pairs * e * 4),
            ],
        )?;
        let GpuKv { k: kv_k, v: kv_v, scratch, graphs, .. } = kv;
        let sc = &*scratch;
        // The step's inputs in one copy (each a synchronous transfer otherwise): ids,
        // positions, slots, per-token table offsets [n_tok each], logit rows [n_out],
        // then the block tables, whose length alone varies between steps of one shape
        // (a captured graph keeps the others' offsets), then the prompt attention tiles
        // (none in a decode step).
        let mut packed: Vec<u32> = Vec::with_capacity(4 * n_tok + n_out + tables.len() + tiles.len());
        packed.extend_from_slice(&ids);
        packed.extend(pos.iter().map(|&p| p as u32));
        packed.extend_from_slice(&slot);
        packed.extend(tok_table.iter().map(|&t| t as u32));
        packed.extend(idx.iter().map(|&i| i as u32));
        packed.extend_from_slice(&tables);
        packed.extend_from_slice(&tiles);
        let inp = &sc[S_INPUTS];
        inp.write(0, as_bytes(&packed))?;
        let at = |k: usize| inp.at(k * 4);
        let (d_ids, d_pos, d_slot, d_tok_table, d_idx, d_tables) =
            (at(0), at(n_tok), at(2 * n_tok), at(3 * n_tok), at(4 * n_tok), at(4 * n_tok + n_out));
        let tiles_at = 4 * n_tok + n_out + tables.len();
        let (x, h, q, k, v, att, o, g, u) =
            (&sc[S_X], &sc[S_H], &sc[S_Q], &sc[S_K], &sc[S_V], &sc[S_ATT], &sc[S_O], &sc[S_G], &sc[S_U]);
        let (xq, xd) = (&sc[S_XQ], &sc[S_XD]);
        // A matrix input, quantized into the one int8 scratch (inputs are used in turn).
        let input = |buf, cols, rows| prepare_input(gpu, buf, cols, rows, xq, xd);
        // The quantized formats' kernels read int8 activations: the kernels that make
        // a matrix input (norm, attention, GLU) write it as int8 too (q8_args), which
        // saves a launch each.
        let int8 = self.int8;
        let q8_args = if int8 { [xq.arg(), xd.arg()] } else { [Arg::Ptr(0), Arg::Ptr(0)] };
        let fused = |buf| Input { x: buf, q8: int8.then_some((xq, xd)) };

        let launches = || -> Result<()> {
            // embed
            gpu.launch(
                "get_rows",
                (n_tok as u32, 1, 1),
                128,
                0,
                &[
                    Arg::I32(self.tok_embd.ty as i32),
                    self.tok_embd.buf.arg(),
                    Arg::U64(self.tok_embd.row_bytes as u64),
                    d_ids,
                    Arg::I32(e as i32),
                    Arg::F32(c.embd_scale.unwrap_or(1.0)),
                    x.arg(),
                ],
            )?;
            let ff = self.rope_freqs.as_ref().map_or(Arg::Ptr(0), |b| b.arg());
            // The residual add of a block's output goes with the next norm, in one kernel.
            // (The first layer's norm has no residual to add: o = null.)
            // Granite scales each block's output before the residual add.
            let res_scale = c.residual_scale.unwrap_or(1.0);
            let add_norm = |w: &DevBuf, first: bool| {
                // 1024 threads: a decode step has one row a token, and a row of a few
                // thousand is otherwise a long serial loop on one multiprocessor.
                gpu.launch(
                    "add_rms_norm",
                    (n_tok as u32, 1, 1),
                    1024,
                    0,
                    &[
                        x.arg(),
                        if first { Arg::Ptr(0) } else { o.arg() },
                        w.arg(),
                        h.arg(),
                        Arg::I32(e as i32),
                        Arg::F32(c.rms_eps),
                        q8_args[0],
                        q8_args[1],
                        Arg::F32(res_scale),
                    ],
                )
            };
            // Phi-3 scales Q before attention; here the scores (the same product).
            let att_scale = c.attn_scale * c.q_scale.unwrap_or(1.0);
            for (il, l) in self.layers.iter().enumerate() {
                // attention block
                add_norm(&l.attn_norm, il == 0)?; // + the previous layer's feed-forward output
                let hin = fused(h);
                launch_matmuls(gpu, &[(&l.wq, q), (&l.wk, k), (&l.wv, v)], hin, &runs, mmq_min())?;
                self.add_bias(q, &l.bq, qd, n_tok)?;
                self.add_bias(k, &l.bk, kd, n_tok)?;
                self.add_bias(v, &l.bv, vd, n_tok)?;
                if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
                    self.rms_norm(q, qn, q, n_tok * c.n_head, c.head_dim)?;
                    self.rms_norm(k, kn, k, n_tok * c.n_head_kv, c.head_dim)?;
                }
                let swa = c.swa_layers[il];
                let base = if swa { c.rope_base_swa } else { c.rope_base };
                let theta_scale = base.powf(-2.0 / c.n_rot as f32);
                gpu.launch(
                    "rope_kv",
                    (n_tok as u32, 1, 1),
                    512,
                    0,
                    &[
                        q.arg(),
                        k.arg(),
                        v.arg(),
                        kv_k[il].arg(),
                        kv_v[il].arg(),
                        d_pos,
                        d_slot,
                        Arg::I32(c.n_head as i32),
                        Arg::I32(c.n_head_kv as i32),
                        Arg::I32(c.head_dim as i32),
                        Arg::I32(c.head_dim_v as i32),
                        Arg::I32(if c.use_rope { c.n_rot as i32 } else { 0 }),
                        Arg::F32(theta_scale),
                        Arg::I32(c.rope_neox as i32),
                        ff,
                        Arg::F32(if swa { 1.0 } else { c.rope_freq_scale }),
                        Arg::F32(c.rope_attn_factor),
                    ],
                )?;
                let window = if swa { c.swa_window.unwrap_or(0) } else { 0 };
                if let Some((names, hg)) = attn_tok_kernel(c) {
                    // Decode tokens and prompt tokens each take their kernel (see kernels.cu; attn_dec
                    // runs 16 warps for head sizes up to 128, else 8).
                    for (&(first, count, solo), &(tile0, n_tiles)) in runs.iter().zip(&run_tiles) {
                        if let (false, Some(fa)) = (solo, fa) {
                            gpu.launch(
                                fa,
                                (c.n_head_kv as u32, n_tiles as u32, 1),
                                32 * (c.n_head / c.n_head_kv) as u32,
                                0,
                                &[
                                    q.arg(),
                                    kv_k[il].arg(),
                                    kv_v[il].arg(),
                                    d_tables,
                                    d_tok_table,
                                    d_pos,
                                    att.arg(),
                                    Arg::I32(c.n_head as i32),
                                    Arg::I32(c.n_head_kv as i32),
                                    Arg::I32(bs as i32),
                                    Arg::I32(window as i32),
                                    Arg::F32(att_scale),
                                    q8_args[0],
                                    q8_args[1],
                                    at(tiles_at + 2 * tile0),
                                ],
                            )?;
                            continue;
                        }
                        gpu.launch(
                            names[solo as usize],
                            ((c.n_head / hg) as u32, count as u32, 1),
                            if solo && c.head_dim <= 128 { 512 } else { 256 },
                            0,
                            &[
                                q.arg(),
                                kv_k[il].arg(),
                                kv_v[il].arg(),
                                d_tables,
                                d_tok_table,
                                d_pos,
                                att.arg(),
                                Arg::I32(c.n_head as i32),
                                Arg::I32(c.n_head_kv as i32),
                                Arg::I32(bs as i32),
                                Arg::I32(window as i32),
                                Arg::F32(att_scale),
                                Arg::I32(hg as i32),
                                q8_args[0],
                                q8_args[1],
                                Arg::I32(first as i32),
                            ],
                        )?;
                    }
                } else {
                    gpu.launch(
                        "attention",
                        (c.n_head as u32, n_tok as u32, 1),
                        128,
                        ((c.head_dim + 1024) * 4) as u32,
                        &[
                            q.arg(),
                            kv_k[il].arg(),
                            kv_v[il].arg(),
                            d_tables,
                            d_tok_table,
                            d_pos,
                            att.arg(),
                            Arg::I32(c.n_head as i32),
                            Arg::I32(c.n_head_kv as i32),
                            Arg::I32(c.head_dim as i32),
                            Arg::I32(c.head_dim_v as i32),
                            Arg::I32(bs as i32),
                            Arg::I32(window as i32),
                            Arg::F32(att_scale),
                        ],
                    )?;
                }
                let ain = if attn_tok_kernel(c).is_some() || !int8 { fused(att) } else { input(att, ad, n_tok)? };
                self.matmul(&l.wo, ain, &runs, o)?;
                self.add_bias(o, &l.bo, e, n_tok)?;
                if let Some(pn) = &l.post_attn_norm {
                    self.rms_norm(o, pn, o, n_tok, e)?;
                }

                // feed-forward block
                add_norm(&l.ffn_norm, false)?;
                let hin = fused(h);
                match &l.ffn {
                    GpuFfn::Dense { gate, up, down, b_gate, b_up, b_down } => {
                        launch_matmuls(gpu, &[(gate, g), (up, u)], hin, &runs, mmq_min())?;
                        self.add_bias(g, b_gate, c.n_ff, n_tok)?;
                        self.add_bias(u, b_up, c.n_ff, n_tok)?;
                        let gelu = matches!(c.arch, Arch::Gemma3) as i32;
                        self.elementwise(
                            "glu",
                            n_tok * c.n_ff,
                            &[
                                g.arg(),
                                u.arg(),
                                Arg::I32((n_tok * c.n_ff) as i32),
                                Arg::I32(gelu),
                                Arg::I32(c.n_ff as i32),
                                q8_args[0],
                                q8_args[1],
                            ],
                        )?;
                        self.matmul(down, fused(g), &runs, o)?;
                        self.add_bias(o, b_down, e, n_tok)?;
                    }
                    GpuFfn::Moe { router, gate, up, down } => {
                        let m = c.moe.as_ref().expect("MoE layers have a MoE config");
                        let (k, f) = (m.n_expert_used, m.n_ff_exp);
                        let (mlog, mi, gq, gd, md) = (&sc[S_MLOG], &sc[S_MOE], &sc[S_GQ], &sc[S_GD], &sc[S_MD]);
                        // The routing's ints: ids, weights, sorted, inv, sexp [n_pairs each], tiles.
                        let part = |i: usize| mi.at(i * n_pairs * 4);
                        let (ids, wts, sorted, inv, sexp, mtiles) =
                            (part(0), part(1), part(2), part(3), part(4), part(5));
                        self.matmul(router, hin, &runs, mlog)?;
                        gpu.launch(
                            "moe_route",
                            (n_tok as u32, 1, 1),
                            32,
                            0,
                            &[
                                mlog.arg(),
                                Arg::I32(m.n_expert as i32),
                                Arg::I32(k as i32),
                                Arg::I32(m.norm_weights as i32),
                                Arg::F32(m.weights_scale),
                                ids,
                                wts,
                            ],
                        )?;
                        gpu.launch(
                            "moe_sort",
                            (1, 1, 1),
                            1024,
                            0,
                            &[
                                ids,
                                Arg::I32(n_pairs as i32),
                                Arg::I32(m.n_expert as i32),
                                Arg::I32((8 * moe_mt) as i32),
                                Arg::I32(moe_tiles as i32),
                                sorted,
                                inv,
                                sexp,
                                mtiles,
                            ],
                        )?;
                        gpu.launch(
                            "moe_gather_q8",
                            (n_pairs as u32, 1, 1),
                            128,
                            0,
                            &[xq.arg(), xd.arg(), sorted, Arg::I32(k as i32), Arg::I32(e as i32), gq.arg(), gd.arg()],
                        )?;
                        // Decode steps of few tokens: a block row per pair (`mmvq_moe`);
                        // else tiles of an expert's pairs (`mmq_moe`). The same bits either way.
                        let per_pair = runs.iter().all(|r| r.2) && n_tok < mmq_min();
                        let experts = |ws: &[(&GpuWeight, &DevBuf)], q: &DevBuf, d: &DevBuf| -> Result<()> {
                            if per_pair {
                                let mut args = vec![Arg::I32(ws[0].0.cols as i32), q.arg(), d.arg(), sexp];
                                let mut blocks = 0;
                                for i in 0..2 {
                                    match ws.get(i) {
                                        Some(&(w, y)) => {
                                            let rows = w.rows / m.n_expert;
                                            args.extend([
                                                Arg::I32(w.ty as i32),
                                                w.buf.arg(),
                                                Arg::U64(w.row_bytes as u64),
                                                Arg::I32(rows as i32),
                                                y.arg(),
                                            ]);
                                            blocks += rows.div_ceil(8);
                                        }
                                        None => args.extend([
                                            Arg::I32(0),
                                            Arg::Ptr(0),
                                            Arg::U64(0),
                                            Arg::I32(0),
                                            Arg::Ptr(0),
                                        ]),
                                    }
                                }
                                return gpu.launch("mmvq_moe", (blocks as u32, n_pairs as u32, 1), 128, 0, &args);
                            }
                            let name = ["mmq_moe_1x1", "mmq_moe_1x2", "mmq_moe_1x4", "mmq_moe_1x4"][moe_mt / 2];
                            for &(w, y) in ws {
                                let rows = w.rows / m.n_expert;
                                gpu.launch(
                                    name,
                                    (rows.div_ceil(16) as u32, moe_tiles as u32, 1),
                                    256,
                                    mmq_shared(w.ty, 1, moe_mt),
                                    &[
                                        Arg::I32(w.ty as i32),
                                        w.buf.arg(),
                                        Arg::U64(w.row_bytes as u64),
                                        Arg::I32(rows as i32),
                                        Arg::I32(w.cols as i32),
                                        q.arg(),
                                        d.arg(),
                                        mtiles,
                                        y.arg(),
                                    ],
                                )?;
                            }
                            Ok(())
                        };
                        experts(&[(gate, g), (up, u)], gq, gd)?;
                        self.elementwise(
                            "glu",
                            n_pairs * f,
                            &[
                                g.arg(),
                                u.arg(),
                                Arg::I32((n_pairs * f) as i32),
                                Arg::I32(0),
                                Arg::I32(f as i32),
                                xq.arg(),
                                xd.arg(),
                            ],
                        )?;
                        experts(&[(down, md)], xq, xd)?;
                        gpu.launch(
                            "moe_combine",
                            (n_tok as u32, 1, 1),
                            256,
                            0,
                            &[md.arg(), wts, inv, Arg::I32(k as i32), Arg::I32(e as i32), o.arg()],
                        )?;
                    }
                }
                if let Some(pn) = &l.post_ffn_norm {
                    self.rms_norm(o, pn, o, n_tok, e)?;
                }
            }
            // The last layer's feed-forward output (the next layer's norm took the others).
            self.elementwise("add", n_tok * e, &[x.arg(), o.arg(), Arg::I32((n_tok * e) as i32), Arg::F32(res_scale)])?;

            // logits, only for the rows asked for
            if n_out > 0 {
                let (xs, logits) = (&sc[S_XS], &sc[S_LOGITS]);
                gpu.launch("copy_rows", (n_out as u32, 1, 1), 128, 0, &[x.arg(), d_idx, xs.arg(), Arg::I32(e as i32)])?;
                self.rms_norm(xs, &self.output_norm, xs, n_out, e)?;
                let xin = if int8 { input(xs, e, n_out)? } else { fused(xs) };
                self.matmul(&self.output, xin, &out_runs, logits)?;
                self.add_bias(logits, &self.output_bias, c.n_vocab, n_out)?;
                if let Some(ls) = c.logit_scale {
                    self.elementwise(
                        "scale_f32",
                        n_out * c.n_vocab,
                        &[logits.arg(), Arg::F32(1.0 / ls), Arg::I32((n_out * c.n_vocab) as i32)],
                    )?;
                }
                if let Some(cap) = c.final_logit_softcap {
                    self.elementwise(
                        "softcap",
                        n_out * c.n_vocab,
                        &[logits.arg(), Arg::F32(cap), Arg::I32((n_out * c.n_vocab) as i32)],
                    )?;
                }
                // The log-sum-exps after the logits, then each row's (first maximum, its
                // logit): one transfer back, of everything or (all rows greedy) the tail.
                gpu.launch(
                    "row_lse",
                    (n_out as u32, 1, 1),
                    1024,
                    0,
                    &[
                        logits.arg(),
                        Arg::I32(c.n_vocab as i32),
                        logits.at(n_out * c.n_vocab * 4),
                        logits.at(n_out * (c.n_vocab + 1) * 4),
                    ],
                )?;
            }
            Ok(())
        };

        // Decode steps (every token alone in its sequence) replay a captured graph.
        let decode =
            runs.len() == 1 && runs[0].2 && graphs_enabled() && std::env::var_os("EDGELM_CUDA_PROFILE").is_none();
        let key = (n_tok, out_runs.clone());
        if decode {
            if !graphs.contains_key(&key) {
                if graphs.len() >= 64 {
                    graphs.clear();
                }
                graphs.insert(key.clone(), gpu.capture(launches)?);
            }
            graphs[&key].launch()?;
        } else {
            launches()?;
        }
        let (mut data, mut lse, mut greedy) = (Vec::new(), Vec::new(), Vec::new());
        gpu.sync()?;
        if n_out > 0 && rows.iter().all(|&(si, _, _)| seqs[si].logits == LogitsWanted::Greedy) {
            // Greedy rows: the tokens, their logits and the log-sum-exps, not the logits.
            let mut tail = vec![0f32; 3 * n_out];
            sc[S_LOGITS].read(n_out * c.n_vocab * 4, as_bytes_mut(&mut tail))?;
            greedy = tail[n_out..].chunks(2).map(|p| (p[0].to_bits(), f32::from_bits(p[1].to_bits()))).collect();
            tail.truncate(n_out);
            lse = tail;
        } else if n_out > 0 {
            data = sc[S_LOGITS].read_f32(n_out * (c.n_vocab + 1))?;
            lse = data.split_off(n_out * c.n_vocab);
        }
        Ok(StepLogits { n_vocab: c.n_vocab, data, rows: rows.iter().map(|&(s, i, _)| (s, i)).collect(), lse, greedy })
    }
}

/// CUDA graphs for decode steps, unless EDGELM_CUDA_GRAPHS=0 (for comparisons).
fn graphs_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("EDGELM_CUDA_GRAPHS").is_none_or(|v| v != "0"))
}

/// Seconds per launch of the matrix kernels on resident data, timed over `reps`
/// launches (for the benchmarks): `tiled` runs the tokens as a prompt, else as decode
/// tokens with the tensor-core kernel from `mmq_from` tokens. The int8 formats'
/// activation quantization is counted in.
#[allow(clippy::too_many_arguments)]
pub fn matmul_seconds(
    gpu: &Arc<Gpu>,
    ty: GgmlType,
    w_bytes: &[u8],
    rows: usize,
    cols: usize,
    n_tok: usize,
    tiled: bool,
    mmq_from: usize,
    reps: usize,
) -> Result<f64> {
    let w = GpuWeight::from_gguf(gpu, ty, w_bytes, rows, cols)?;
    let dx = gpu.upload_f32(&vec![0.5f32; n_tok * cols])?;
    let (xq, xd) = (gpu.alloc(n_tok * cols)?, gpu.alloc(n_tok * cols / 32 * 8)?);
    let y = gpu.alloc(n_tok * rows * 4)?;
    let runs = [(0, n_tok, !tiled)];
    let once = || -> Result<()> {
        let input = prepare_input(gpu, &dx, cols, n_tok, &xq, &xd)?;
        launch_matmul_with(gpu, &w, input, &runs, &y, mmq_from)
    };
    once()?;
    gpu.sync()?;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        once()?;
    }
    gpu.sync()?;
    Ok(t.elapsed().as_secs_f64() / reps as f64)
}

/// One matrix product on its own (for the kernel tolerance tests): `n_tok` f32 rows
/// against a weight in any GPU format (GGUF layout), as decode tokens (`mmvq` below
/// `mmq_from` tokens, else `mmq`, for the quantized formats; `mmv` for the float ones)
/// or, when `tiled`, as a prompt (`mmq`; `mmt` for the float formats).
#[allow(clippy::too_many_arguments)]
pub fn matmul_once(
    gpu: &Arc<Gpu>,
    ty: GgmlType,
    w_bytes: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n_tok: usize,
    tiled: bool,
    mmq_from: usize,
) -> Result<Vec<f32>> {
    let w = GpuWeight::from_gguf(gpu, ty, w_bytes, rows, cols)?;
    let dx = gpu.upload_f32(x)?;
    let (xq, xd) = (gpu.alloc(n_tok * cols)?, gpu.alloc(n_tok * cols / 32 * 8)?);
    let y = gpu.alloc(n_tok * rows * 4)?;
    let input = prepare_input(gpu, &dx, cols, n_tok, &xq, &xd)?;
    launch_matmul_with(gpu, &w, input, &[(0, n_tok, !tiled)], &y, mmq_from)?;
    gpu.sync()?;
    y.read_f32(n_tok * rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The block shapes `mmq_tile` picks (the H200's 132 multiprocessors, Orin's 16), and
    /// that each fits the kernels: a variant kernels.cu has, with dynamic shared memory
    /// for two blocks a multiprocessor within the smallest of sm_80+ (sm_86/sm_89's
    /// 100 KiB; Orin's sm_87 has 164, the H200's sm_90 228) and within the opt-in
    /// `Gpu::launch` makes (`MAX_DYNAMIC_SHARED`).
    #[test]
    fn mmq_tiles_fit_the_kernels() {
        use GgmlType::*;
        let tiles = |sms, ty, rows, n| mmq_tile(sms, ty, rows, n);
        // Decode batches: one row tile, as many token tiles as the tokens need.
        assert_eq!(tiles(132, Q4_0, 8192, 8), ("mmq_1x1", 1, 1));
        assert_eq!(tiles(132, Q4_0, 8192, 16), ("mmq_1x2", 1, 2));
        // 32-token blocks: the most rows that still give two blocks a multiprocessor.
        assert_eq!(tiles(132, Q4_0, 2048, 64), ("mmq_1x4", 1, 4));
        assert_eq!(tiles(132, Q4_0, 8192, 64), ("mmq_2x4", 2, 4));
        assert_eq!(tiles(132, Q4_0, 2048, 512), ("mmq_4x4", 4, 4));
        assert_eq!(tiles(16, Q4_0, 2048, 64), ("mmq_4x4", 4, 4));
        // The K-quants' 4x4 is a kernel of their own.
        let k44 = if k44_blocks() == 2 { "mmq_4x4k2" } else { "mmq_4x4k" };
        assert_eq!(tiles(132, Q4_K, 2048, 512), (k44, 4, 4));
        assert_eq!(tiles(132, Q6_K, 8192, 512), (k44, 4, 4));
        assert_eq!(tiles(132, Q4_K, 2048, 64), ("mmq_1x4", 1, 4));
        assert_eq!(tiles(132, Q5_K, 8192, 64), ("mmq_2x4", 2, 4));
        for ty in [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K] {
            for rt in [1, 2, 4] {
                for mt in [1, 2, 4] {
                    // Two blocks a multiprocessor on sm_80/sm_87 (164 KiB, 1 KiB a block
                    // reserved), one on sm_86/sm_89 (99 KiB a block at most).
                    let bytes = mmq_shared(ty, rt, mt) as usize;
                    assert!(2 * (bytes + 1024) <= 164 * 1024 && bytes <= 99 * 1024, "{ty:?} {rt}x{mt}: {bytes} bytes");
                    assert!(bytes <= crate::cuda::MAX_DYNAMIC_SHARED as usize, "{ty:?} {rt}x{mt}: {bytes} bytes");
                }
            }
        }
    }
}
