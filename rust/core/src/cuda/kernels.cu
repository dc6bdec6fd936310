// edgelm's CUDA kernels, compiled at run time by NVRTC for the GPU found (see mod.rs).
// No includes: NVRTC ships none of the toolkit's headers. f16 conversions are PTX.
//
// Weights stay in their GGUF block formats (ggml's encodings and names; within a row the
// 32-block formats and Q6_K are reordered at upload, see `deq32`); each kernel
// takes the format as `type` (GgmlType's number) and a row's byte length, and decodes
// 32 weights at a time with `deq32` (float kernels) or `load_unit` (int8 kernels).
// Activations are f32, and int8 (q8 blocks) for the quantized formats' matrix kernels;
// the KV cache is f16.
//
// Launch shapes are chosen on the host (model.rs) and written beside each kernel.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// Programmatic dependent launch (sm_90+: model.rs launches with it): a kernel may be
// started while the one before it finishes, and waits here, before it reads or writes
// anything, until that one is complete; then it lets the next one start the same way.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define GRID_DEP_WAIT()                                    \
    do {                                                   \
        asm volatile("griddepcontrol.wait;" ::: "memory"); \
        asm volatile("griddepcontrol.launch_dependents;"); \
    } while (0)
#else
#define GRID_DEP_WAIT() \
    do {                \
    } while (0)
#endif

#define NEG_INF __int_as_float(0xff800000)

#define T_F32 0
#define T_F16 1
#define T_Q4_0 2
#define T_Q4_1 3
#define T_Q5_0 6
#define T_Q5_1 7
#define T_Q8_0 8
#define T_Q4_K 12
#define T_Q5_K 13
#define T_Q6_K 14
#define T_BF16 30

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Blocks start at even offsets only (18-, 22-, 34-byte blocks): read bytes.
__device__ __forceinline__ u16 ld16(const u8* p) { return (u16)p[0] | ((u16)p[1] << 8); }
__device__ __forceinline__ u32 ld32(const u8* p) {
    return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}

__device__ __forceinline__ void scale_min_k4(int j, const u8* q, int* sc, int* m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// The 32 weights of block `b` (32-element block index within the row) as floats; `nb`
// is the row's number of 32-blocks. K-quants: super-block b / 8, sub-block b % 8.
// Rows are in the upload layout (model.rs `repack_row`): the 32-block formats keep
// their quants first, 16-byte aligned, and the per-block scalars after them, so the
// decode kernel reads a block's quants with one or two 16-byte loads:
//   Q4_0 [qs 16 × nb][d f16 × nb]        Q4_1 [qs 16 × nb][d, m f16 × nb]
//   Q5_0 [qs 16 × nb][qh u32 × nb][d f16 × nb]   Q5_1 [qs 16 × nb][qh u32 × nb][d, m f16 × nb]
//   Q8_0 [qs 32 × nb][d f16 × nb]        Q6_K [ql 128, qh 64, scales 16 × nsb][d f16 × nsb]
// Q4_K and Q5_K super-blocks (144 and 176 bytes) are 16-byte multiples and stay as
// they are; so do the float formats.
__device__ __forceinline__ void deq32(int type, const u8* row, int nb, int b, float* y) {
    switch (type) {
    case T_F32: {
        const float* p = (const float*)row + b * 32;
        for (int j = 0; j < 32; j++) y[j] = p[j];
    } break;
    case T_F16: {
        const u8* p = row + b * 64;
        for (int j = 0; j < 32; j++) y[j] = h2f(ld16(p + 2 * j));
    } break;
    case T_BF16: {
        const u8* p = row + b * 64;
        for (int j = 0; j < 32; j++) y[j] = __int_as_float(((u32)ld16(p + 2 * j)) << 16);
    } break;
    case T_Q4_0: {
        const float d = h2f(((const u16*)(row + nb * 16))[b]);
        const u8* qs = row + b * 16;
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)((qs[j] & 15) - 8);
            y[j + 16] = d * (float)((qs[j] >> 4) - 8);
        }
    } break;
    case T_Q4_1: {
        const u16* dm = (const u16*)(row + nb * 16) + 2 * b;
        const float d = h2f(dm[0]), m = h2f(dm[1]);
        const u8* qs = row + b * 16;
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)(qs[j] & 15) + m;
            y[j + 16] = d * (float)(qs[j] >> 4) + m;
        }
    } break;
    case T_Q5_0: {
        const float d = h2f(((const u16*)(row + nb * 20))[b]);
        const u32 qh = ((const u32*)(row + nb * 16))[b];
        const u8* qs = row + b * 16;
        for (int j = 0; j < 16; j++) {
            const int x0 = (qs[j] & 15) | (((qh >> j) << 4) & 0x10);
            const int x1 = (qs[j] >> 4) | ((qh >> (j + 12)) & 0x10);
            y[j] = d * (float)(x0 - 16);
            y[j + 16] = d * (float)(x1 - 16);
        }
    } break;
    case T_Q5_1: {
        const u16* dm = (const u16*)(row + nb * 20) + 2 * b;
        const float d = h2f(dm[0]), m = h2f(dm[1]);
        const u32 qh = ((const u32*)(row + nb * 16))[b];
        const u8* qs = row + b * 16;
        for (int j = 0; j < 16; j++) {
            const int x0 = (qs[j] & 15) | (((qh >> j) << 4) & 0x10);
            const int x1 = (qs[j] >> 4) | ((qh >> (j + 12)) & 0x10);
            y[j] = d * (float)x0 + m;
            y[j + 16] = d * (float)x1 + m;
        }
    } break;
    case T_Q8_0: {
        const float d = h2f(((const u16*)(row + nb * 32))[b]);
        const i8* qs = (const i8*)(row + b * 32);
        for (int j = 0; j < 32; j++) y[j] = d * (float)qs[j];
    } break;
    case T_Q4_K: {
        const int s = b & 7;
        const u8* p = row + (b >> 3) * 144;
        const float d = h2f(ld16(p)), dmin = h2f(ld16(p + 2));
        int sc, m;
        scale_min_k4(s, p + 4, &sc, &m);
        const float dl = d * sc, ml = dmin * m;
        const u8* q = p + 16 + 32 * (s >> 1);
        if (s & 1) {
            for (int l = 0; l < 32; l++) y[l] = dl * (float)(q[l] >> 4) - ml;
        } else {
            for (int l = 0; l < 32; l++) y[l] = dl * (float)(q[l] & 15) - ml;
        }
    } break;
    case T_Q5_K: {
        const int s = b & 7;
        const u8* p = row + (b >> 3) * 176;
        const float d = h2f(ld16(p)), dmin = h2f(ld16(p + 2));
        int sc, m;
        scale_min_k4(s, p + 4, &sc, &m);
        const float dl = d * sc, ml = dmin * m;
        const u8* qh = p + 16;
        const u8* ql = p + 48 + 32 * (s >> 1);
        const u8 bit = (u8)(1u << s);
        for (int l = 0; l < 32; l++) {
            const int lo = (s & 1) ? (ql[l] >> 4) : (ql[l] & 15);
            y[l] = dl * (float)(lo + ((qh[l] & bit) ? 16 : 0)) - ml;
        }
    } break;
    case T_Q6_K: {
        const int s = b & 7, n = s >> 2, r = s & 3;
        const u8* p = row + (b >> 3) * 208;
        const u8* ql = p + 64 * n + ((r & 1) ? 32 : 0);
        const u8* qh = p + 128 + 32 * n;
        const i8* sc = (const i8*)(p + 192) + 8 * n + 2 * r;
        const float d = h2f(((const u16*)(row + (nb >> 3) * 208))[b >> 3]);
        for (int l = 0; l < 32; l++) {
            const int lo = (r & 2) ? (ql[l] >> 4) : (ql[l] & 15);
            const int q = (lo | (((qh[l] >> (2 * r)) & 3) << 4)) - 32;
            y[l] = d * (float)sc[l >> 4] * (float)q;
        }
    } break;
    default:
        for (int j = 0; j < 32; j++) y[j] = __int_as_float(0x7fc00000);  // NaN: an unsupported type is loud
    }
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Y[t][r] = sum_c W[r][c] * X[t][c] for r < rows, t < n_tok (at most MMV_TOK per launch):
// the decode kernel, for tokens that are one per sequence. One warp per row, 8 rows per
// block; lane l takes the row's 32-weight blocks l, l + 32, ..., so a row's weights are
// read once for all the tokens. The activations go through shared memory 1024 columns
// at a time (read once per 8 rows instead of once per row), stored transposed so the
// lanes' reads fall in different banks. Each token's sum is computed the same way
// whatever else is in the launch (batching never changes a result).
// Block: 256 threads; grid: ceil(rows / 8).
#define MMV_TOK 8
#define MMV_ROWS 8
extern "C" __global__ void __launch_bounds__(256) mmv(int type, const u8* __restrict__ W, u64 row_bytes, int rows, int cols,
                                                      const float* __restrict__ X, int n_tok, int x_stride,
                                                      float* __restrict__ Y, int y_stride) {
    GRID_DEP_WAIT();
    __shared__ float4 xs[MMV_TOK * 256];  // [token][float4 j of a block][block in chunk]
    const int lane = threadIdx.x & 31;
    const int r = blockIdx.x * MMV_ROWS + (threadIdx.x >> 5);
    const bool active = r < rows;
    const u8* row = W + (u64)(active ? r : 0) * row_bytes;
    float acc[MMV_TOK];
#pragma unroll
    for (int t = 0; t < MMV_TOK; t++) acc[t] = 0.f;
    float w[32];
    const int nb = cols >> 5;
    for (int c0 = 0; c0 < nb; c0 += 32) {
        const int nbc = min(32, nb - c0);
        __syncthreads();
        for (int i = threadIdx.x; i < n_tok * nbc * 8; i += blockDim.x) {
            const int t = i / (nbc * 8), k = i % (nbc * 8);
            xs[t * 256 + (k & 7) * 32 + (k >> 3)] = ((const float4*)(X + (u64)t * x_stride + c0 * 32))[k];
        }
        __syncthreads();
        if (active && lane < nbc) {
            deq32(type, row, nb, c0 + lane, w);
#pragma unroll
            for (int t = 0; t < MMV_TOK; t++) {
                if (t < n_tok) {
                    float s = 0.f;
#pragma unroll
                    for (int j = 0; j < 8; j++) {
                        const float4 v = xs[t * 256 + j * 32 + lane];
                        s = fmaf(w[4 * j], v.x, s);
                        s = fmaf(w[4 * j + 1], v.y, s);
                        s = fmaf(w[4 * j + 2], v.z, s);
                        s = fmaf(w[4 * j + 3], v.w, s);
                    }
                    acc[t] += s;
                }
            }
        }
    }
    if (!active) return;
#pragma unroll
    for (int t = 0; t < MMV_TOK; t++) {
        if (t < n_tok) {
            const float s = warp_sum(acc[t]);
            if (lane == 0) Y[(u64)t * y_stride + r] = s;
        }
    }
}

// ---- int8 activations and the dp4a decode kernel -------------------------------------
//
// Decode tokens multiply quantized weights by activations quantized to int8 once per
// matrix input (`quantize_q8`), as the CPU does (its vec_dot takes Q8_0/Q8_1/Q8_K
// activations): per 32-block, d = amax / 127 and q = roundf(x / d) (ggml's
// quantize_row_q8_1, with d and the sum kept in f32). The integer dot products are
// exact, so a weight block's partial is d_w · d_x · Σ q_w q_x (+ the min term through
// the block's stored sum), and the float part is written with explicit _rn intrinsics:
// the compiler can neither contract nor reorder it, so a token's result is the same
// bits in every variant of the kernel (1, 2, 4 or 8 tokens a launch) and every batch.

// Lane l of a warp holds element l of 32-block b of token row t: write the block as
// int8 (Xq row t: cols bytes; Xd row t: cols / 32 pairs). The same arithmetic as
// `quantize_q8`, so a fused producer writes the same bytes.
__device__ __forceinline__ void q8_block(float x, int t, int b, int cols, i8* __restrict__ Xq, float2* __restrict__ Xd) {
    const int lane = threadIdx.x & 31;
    const float amax = warp_max(fabsf(x));
    const float d = amax / 127.f;
    const float id = d != 0.f ? 1.f / d : 0.f;
    const int q = (int)roundf(x * id);
    int s = q;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    Xq[(u64)t * cols + b * 32 + lane] = (i8)q;
    if (lane == 0) {
        float2 v;
        v.x = d;
        v.y = d * (float)s;
        Xd[(u64)t * (cols >> 5) + b] = v;
    }
}

// Xq: [n_tok][cols] int8; Xd: [n_tok][cols / 32] (d, d · Σq). X rows are x_stride
// floats apart. Grid: (ceil(cols / 256), n_tok); block 256: a warp per 32-block.
extern "C" __global__ void __launch_bounds__(256) quantize_q8(const float* __restrict__ X, int x_stride, int cols,
                                                              i8* __restrict__ Xq, float2* __restrict__ Xd) {
    GRID_DEP_WAIT();
    const int b = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (b >= (cols >> 5)) return;
    const int t = blockIdx.y;
    q8_block(X[(u64)t * x_stride + b * 32 + (threadIdx.x & 31)], t, b, cols, Xq, Xd);
}

__device__ __forceinline__ int dp4a(int a, int b, int c) {
    int r;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

// Bytes b (each 0..127) minus k (each byte), as signed bytes, with no borrow between
// bytes: bit 7 set first keeps every byte >= k, then flipping it back gives b - k mod 256.
__device__ __forceinline__ int sub_bytes(u32 v, u32 k) { return (int)(((v | 0x80808080u) - k) ^ 0x80808080u); }

// One lane's unit of a weight row: 32 weights as signed bytes, in two 16-byte halves
// A (q[0..3]) and B (q[4..7]) that meet activation bytes xa and xb of the row (block
// da and db): partial = fa·dx[da]·ΣA + fb·dx[db]·ΣB + ma·s[da] + mb·s[db].
struct Unit {
    int q[8];
    float fa, fb, ma, mb;
    int xa, xb, da, db;
};

// Units per row: a 32-block for the 32-block formats, a 32-element sub-block for Q4_K
// and Q5_K, 16 bytes of quants (two half sub-blocks) for Q6_K; either way 32 weights
// and `cols / 32` units.
// Nibble spread: bit i of h (i < 4) to bit 4 of byte i.
__device__ __forceinline__ u32 spread4(u32 h) {
    return ((h << 4) & 0x10u) | ((h << 11) & 0x1000u) | ((h << 18) & 0x100000u) | ((h << 25) & 0x10000000u);
}

template <int T>
__device__ __forceinline__ void load_unit(const u8* __restrict__ row, int nb, int u, Unit& w) {
    const u32 M = 0x0F0F0F0Fu;
    if (T == T_Q4_0 || T == T_Q4_1 || T == T_Q5_0 || T == T_Q5_1) {
        const uint4 v = __ldg((const uint4*)row + u);
        const u32 vi[4] = {v.x, v.y, v.z, v.w};
        u32 qh = 0;
        if (T == T_Q5_0 || T == T_Q5_1) qh = __ldg((const u32*)(row + nb * 16) + u);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            u32 lo = vi[i] & M, hi = (vi[i] >> 4) & M;
            if (T == T_Q5_0 || T == T_Q5_1) {
                lo |= spread4(qh >> (4 * i));
                hi |= spread4(qh >> (4 * i + 16));
            }
            if (T == T_Q4_0) {
                lo = sub_bytes(lo, 0x08080808u);
                hi = sub_bytes(hi, 0x08080808u);
            } else if (T == T_Q5_0) {
                lo = sub_bytes(lo, 0x10101010u);
                hi = sub_bytes(hi, 0x10101010u);
            }
            w.q[i] = (int)lo;
            w.q[4 + i] = (int)hi;
        }
        float d = 0.f, m = 0.f;
        if (T == T_Q4_0) d = h2f(__ldg((const u16*)(row + nb * 16) + u));
        if (T == T_Q5_0) d = h2f(__ldg((const u16*)(row + nb * 20) + u));
        if (T == T_Q4_1 || T == T_Q5_1) {
            const u32 dm = __ldg((const u32*)(row + nb * (T == T_Q4_1 ? 16 : 20)) + u);
            d = h2f((u16)dm);
            m = h2f((u16)(dm >> 16));
        }
        w.fa = w.fb = d;
        w.ma = m;  // the min times the whole block's activation sum, once
        w.mb = 0.f;
        w.xa = u * 32;
        w.xb = u * 32 + 16;
        w.da = w.db = u;
    } else if (T == T_Q8_0) {
        const uint4 a = __ldg((const uint4*)row + 2 * u), b = __ldg((const uint4*)row + 2 * u + 1);
        w.q[0] = a.x; w.q[1] = a.y; w.q[2] = a.z; w.q[3] = a.w;
        w.q[4] = b.x; w.q[5] = b.y; w.q[6] = b.z; w.q[7] = b.w;
        w.fa = w.fb = h2f(__ldg((const u16*)(row + nb * 32) + u));
        w.ma = w.mb = 0.f;
        w.xa = u * 32;
        w.xb = u * 32 + 16;
        w.da = w.db = u;
    } else if (T == T_Q4_K || T == T_Q5_K) {
        // Unit u: sub-block j = u % 8 of super-block u / 8 (its own scale and min, like
        // a Q4_1 block): the low (j even) or high nibbles of quant bytes 32(j / 2)..+31,
        // and for Q5_K bit j of the 32 high-bit bytes.
        const int sb = u >> 3, j = u & 7, sh = 4 * (j & 1);
        const u8* blk = row + sb * (T == T_Q4_K ? 144 : 176);
        const uint4* qs = (const uint4*)(blk + (T == T_Q4_K ? 16 : 48) + 32 * (j >> 1));
        const uint4 va = __ldg(qs), vb = __ldg(qs + 1);
        const u32 vi[8] = {va.x, va.y, va.z, va.w, vb.x, vb.y, vb.z, vb.w};
        uint4 ha, hb;
        ha.x = ha.y = ha.z = ha.w = hb.x = hb.y = hb.z = hb.w = 0;
        if (T == T_Q5_K) {
            ha = __ldg((const uint4*)(blk + 16));
            hb = __ldg((const uint4*)(blk + 32));
        }
        const u32 hi8[8] = {ha.x, ha.y, ha.z, ha.w, hb.x, hb.y, hb.z, hb.w};
#pragma unroll
        for (int i = 0; i < 8; i++) {
            u32 q = (vi[i] >> sh) & M;
            if (T == T_Q5_K) q |= ((hi8[i] >> j) & 0x01010101u) << 4;
            w.q[i] = (int)q;
        }
        const u32 dd = __ldg((const u32*)blk);
        int sc, m;
        scale_min_k4(j, blk + 4, &sc, &m);
        w.fa = w.fb = h2f((u16)dd) * (float)sc;
        w.ma = -h2f((u16)(dd >> 16)) * (float)m;
        w.mb = 0.f;
        w.xa = u * 32;
        w.xb = u * 32 + 16;
        w.da = w.db = u;
    } else if (T == T_Q6_K) {
        // Unit u: super-block u / 8, k = u % 8: n = k / 4 (which 128), g = (k / 2) % 2,
        // j = k % 2. ql bytes 64n + 32g + 16j.. hold elements 128n + 32g + 16j + i (low
        // nibble, qh bits 2g) and + 64 (high nibble, qh bits 4 + 2g).
        const int sb = u >> 3, k = u & 7, n = k >> 2, g = (k >> 1) & 1, j = k & 1;
        const u8* blk = row + sb * 208;
        const uint4 v = __ldg((const uint4*)(blk + 64 * n + 32 * g + 16 * j));
        const uint4 hv = __ldg((const uint4*)(blk + 128 + 32 * n + 16 * j));
        const u32 vi[4] = {v.x, v.y, v.z, v.w}, hi4[4] = {hv.x, hv.y, hv.z, hv.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const u32 lo = (vi[i] & M) | (((hi4[i] >> (2 * g)) & 0x03030303u) << 4);
            const u32 hi = ((vi[i] >> 4) & M) | (((hi4[i] >> (4 + 2 * g)) & 0x03030303u) << 4);
            w.q[i] = sub_bytes(lo, 0x20202020u);
            w.q[4 + i] = sub_bytes(hi, 0x20202020u);
        }
        const float d = h2f(__ldg((const u16*)(row + (nb >> 3) * 208) + sb));
        const i8* sc = (const i8*)(blk + 192);
        w.fa = d * (float)sc[8 * n + 2 * g + j];
        w.fb = d * (float)sc[8 * n + 4 + 2 * g + j];
        w.ma = w.mb = 0.f;
        const int a0 = sb * 8 + 4 * n + g;
        w.xa = a0 * 32 + 16 * j;
        w.xb = (a0 + 2) * 32 + 16 * j;
        w.da = a0;
        w.db = a0 + 2;
    }
}

// Whether a format's two unit halves share the activation block (and so its scales).
#define ONE_BLOCK(T) (T != T_Q6_K)
// Whether a format has a min term (the block's activation sum times the weight min).
#define HAS_MIN(T) (T == T_Q4_1 || T == T_Q5_1 || T == T_Q4_K || T == T_Q5_K)

// One token's int8 activations for a unit (the same for every row: they depend on the
// unit's index only).
struct Act {
    int4 a, b;
    float2 da, db;
};

template <int T>
__device__ __forceinline__ void load_act(const Unit& w, const i8* __restrict__ xq, const float2* __restrict__ xd, Act& x) {
    x.a = __ldg((const int4*)(xq + w.xa));
    x.b = __ldg((const int4*)(xq + w.xb));
    x.da = __ldg(xd + w.da);
    x.db = ONE_BLOCK(T) ? x.da : __ldg(xd + w.db);
}

// Exact int → float for |s| < 2^22 (a unit's integer sums are at most 32 · 127 · 128):
// the integer products are summed onto I2F_BIAS, the bits of 1.5 · 2^23, so the sum's
// bits are the float 1.5 · 2^23 + s, from which `unbias` takes 1.5 · 2^23 away. The
// dp4a chains and the tensor-core products start from the bias for free; one full-rate
// float add is left of the quarter-rate conversion, with the same value as (float)s.
#define I2F_BIAS 0x4B400000
__device__ __forceinline__ float unbias(int v) { return __fsub_rn(__int_as_float(v), 12582912.f); }

// A unit's contribution to one (row, token) sum, from its exact integer half sums sa, sb
// and the scales; `apply` adds it: acc ← x·y + (m·n + acc), one rounding per fma. Both
// int8 kernels (`mmvq`, `mmq`) build it and apply it the same way, in the same order, so
// a token's result is the same bits from either. Only the float steps are written with
// _rn intrinsics, which the compiler can neither contract nor reorder. sa and sb are
// the half sums onto I2F_BIAS (formats with one block: sa is the whole unit's, sb unused).
struct Contrib {
    float x, y, m, n;
};

template <int T>
__device__ __forceinline__ Contrib contrib(float fa, float fb, float ma, float mb, float2 da, float2 db, int sa, int sb) {
    Contrib c;
    c.m = c.n = 0.f;
    if (ONE_BLOCK(T)) {
        c.x = __fmul_rn(fa, da.x);
        c.y = unbias(sa);
        if (HAS_MIN(T)) {
            c.m = ma;  // the min times the whole block's activation sum
            c.n = da.y;
        }
    } else {
        float r = __fmul_rn(__fmul_rn(fa, da.x), unbias(sa));
        r = __fmaf_rn(__fmul_rn(fb, db.x), unbias(sb), r);
        r = __fmaf_rn(ma, da.y, r);
        c.x = __fmaf_rn(mb, db.y, r);
        c.y = 1.f;
    }
    return c;
}

template <int T>
__device__ __forceinline__ float apply(float acc, const Contrib& c) {
    if (HAS_MIN(T)) acc = __fmaf_rn(c.m, c.n, acc);
    if (ONE_BLOCK(T)) return __fmaf_rn(c.x, c.y, acc);
    return __fadd_rn(acc, c.x);  // = fma(x, 1, acc)
}

// The unit's contribution against one token's activations (dp4a).
template <int T>
__device__ __forceinline__ Contrib unit_contrib(const Unit& w, const Act& x) {
    int sa = dp4a(w.q[0], x.a.x, I2F_BIAS);
    sa = dp4a(w.q[1], x.a.y, sa);
    sa = dp4a(w.q[2], x.a.z, sa);
    sa = dp4a(w.q[3], x.a.w, sa);
    int sb = dp4a(w.q[4], x.b.x, ONE_BLOCK(T) ? sa : I2F_BIAS);
    sb = dp4a(w.q[5], x.b.y, sb);
    sb = dp4a(w.q[6], x.b.z, sb);
    sb = dp4a(w.q[7], x.b.w, sb);
    return contrib<T>(w.fa, w.fb, w.ma, w.mb, x.da, x.db, ONE_BLOCK(T) ? sb : sa, sb);  // one block: sb ends the chain
}

// The order of a (row, token) sum, which every int8 kernel keeps: the row's units go to
// 8 slices (slice s: units s, s + 8, s + 16, ..., applied in order from 0), and the 8
// slice sums are added pairwise: ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)).
//
// In `mmvq`, lane l of a warp holds unit base + l, so slice s (kept by lane s < 8) takes
// the units of lanes s, s + 8, s + 16, s + 24 in turn: `chain` applies them (those below
// nb) on lane s. Lanes 8..31 compute values nobody reads.
template <int T>
__device__ __forceinline__ float chain(float acc, const Contrib& c, int u, int nb) {
    if (u < nb) acc = apply<T>(acc, c);
#pragma unroll
    for (int k = 1; k < 4; k++) {
        Contrib o;
        o.x = __shfl_down_sync(0xffffffffu, c.x, 8 * k);
        o.y = __shfl_down_sync(0xffffffffu, c.y, 8 * k);
        o.m = HAS_MIN(T) ? __shfl_down_sync(0xffffffffu, c.m, 8 * k) : 0.f;
        o.n = HAS_MIN(T) ? __shfl_down_sync(0xffffffffu, c.n, 8 * k) : 0.f;
        if (u + 8 * k < nb) acc = apply<T>(acc, o);
    }
    return acc;
}

// Y[t][r] = Σ_c W[r][c] X[t][c] for the tokens t < n_tok of token group blockIdx.y (NT
// tokens a group), X given as int8 (Xq, Xd from quantize_q8). A warp takes R rows;
// lane l their units base + l for base = 0, 32, ...: it loads the R rows' weights of a
// unit (R loads in flight), then each token's activations once for all R rows, and the
// contributions go to their slices by `chain`. Every variant (NT, R, n_tok) and `mmq`
// keep the order above, so a token gets the same bits from any of them.
// Block: 128 (4 warps, 4R rows); grid: (ceil(rows / 4R), ceil(n_tok / NT)).
template <int T, int NT, int R>
__device__ __forceinline__ void mmvq_t(const u8* __restrict__ W, u64 row_bytes, int rows, int cols,
                                       const i8* __restrict__ Xq, const float2* __restrict__ Xd, int n_tok,
                                       float* __restrict__ Y, int y_stride, int blk, int tg) {
    const int lane = threadIdx.x & 31;
    const int r0 = (blk * 4 + (threadIdx.x >> 5)) * R;
    if (r0 >= rows) return;  // the whole warp
    const int t0 = tg * NT;
    const int nt = min(NT, n_tok - t0);
    const int nb = cols >> 5;
    const i8* xq = Xq + (u64)t0 * cols;
    const float2* xd = Xd + (u64)t0 * nb;
    const u8* rp[R];
#pragma unroll
    for (int i = 0; i < R; i++) rp[i] = W + (u64)min(r0 + i, rows - 1) * row_bytes;
    float acc[R][NT];
#pragma unroll
    for (int i = 0; i < R; i++)
#pragma unroll
        for (int t = 0; t < NT; t++) acc[i][t] = 0.f;
    for (int base = 0; base < nb; base += 32) {
        const int u = base + lane;
        const int uu = min(u, nb - 1);  // lanes past the row load a real unit, never applied
        Unit w[R];
#pragma unroll
        for (int i = 0; i < R; i++) load_unit<T>(rp[i], nb, uu, w[i]);
#pragma unroll
        for (int t = 0; t < NT; t++) {
            if (t < nt) {
                Act x;
                load_act<T>(w[0], xq + (u64)t * cols, xd + (u64)t * nb, x);
#pragma unroll
                for (int i = 0; i < R; i++) acc[i][t] = chain<T>(acc[i][t], unit_contrib<T>(w[i], x), u, nb);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < R; i++) {
#pragma unroll
        for (int t = 0; t < NT; t++) {
            if (t < nt) {
                // Lanes 0..7 hold the slices: pairwise, in the order `mmq` reproduces.
                float s = acc[i][t];
                s = __fadd_rn(s, __shfl_down_sync(0xffffffffu, s, 1));
                s = __fadd_rn(s, __shfl_down_sync(0xffffffffu, s, 2));
                s = __fadd_rn(s, __shfl_down_sync(0xffffffffu, s, 4));
                if (lane == 0 && r0 + i < rows) Y[(u64)(t0 + t) * y_stride + r0 + i] = s;
            }
        }
    }
}

// Up to three matrices with the same input in one launch (q, k, v; gate, up): the
// blocks of matrix 0 come first, then 1, then 2 (rows 0 for an absent one); each block
// runs mmvq_t for its matrix, so a matrix's results are those of a launch of its own.
// Grid: (Σ ceil(rows_i / 4R), ceil(n_tok / NT)).
template <int NT, int R>
__device__ __forceinline__ void mmvq_pick(int type, const u8* W, u64 rb, int rows, int cols, const i8* __restrict__ Xq,
                                          const float2* __restrict__ Xd, int n_tok, float* Y, int ys, int blk,
                                          int tg) {
    switch (type) {
    case T_Q4_0: mmvq_t<T_Q4_0, NT, R>(W, rb, rows, cols, Xq, Xd, n_tok, Y, ys, blk, tg); break;
    case T_Q4_1: mmvq_t<T_Q4_1, NT, R>(W, rb, rows, cols, Xq, Xd, n_tok, Y, ys, blk, tg); break;
    case T_Q5_0: mmvq_t<T_Q5_0, NT, R>(W, rb, rows, cols, Xq, Xd, n_tok, Y, ys, blk, tg); break;
    case T_Q5_1: mmvq_t<T_Q5_1, NT, R>(W, rb, rows, cols, Xq, Xd, n_tok, Y, ys, blk, tg); break;
    case T_Q8_0: mmvq_t<T_Q8_0, NT, R>(W, rb, rows, cols, Xq, Xd, n_tok, Y, ys, blk, tg); break;
    case T_Q4_K: mmvq_t<T_Q4_K, NT, R>(W, rb, rows, cols, Xq, Xd, n_tok, Y, ys, blk, tg); break;
    case T_Q5_K: mmvq_t<T_Q5_K, NT, R>(W, rb, rows, cols, Xq, Xd, n_tok, Y, ys, blk, tg); break;
    case T_Q6_K: mmvq_t<T_Q6_K, NT, R>(W, rb, rows, cols, Xq, Xd, n_tok, Y, ys, blk, tg); break;
    }
}

#define MMVQ_KERNEL(NAME, NT, R)                                                                                      \
    extern "C" __global__ void __launch_bounds__(128, 4)                                                              \
        NAME(int cols, const i8* __restrict__ Xq, const float2* __restrict__ Xd, int n_tok,                            \
             int t0, const u8* W0, u64 rb0, int rows0, float* Y0, int ys0,                                             \
             int t1, const u8* W1, u64 rb1, int rows1, float* Y1, int ys1,                                             \
             int t2, const u8* W2, u64 rb2, int rows2, float* Y2, int ys2) {                                           \
        GRID_DEP_WAIT();                                                                                               \
        const int nb0 = (rows0 + 4 * R - 1) / (4 * R), nb1 = (rows1 + 4 * R - 1) / (4 * R);                           \
        const int b = blockIdx.x;                                                                                      \
        const int tg = blockIdx.y;                                                                                     \
        if (b < nb0) mmvq_pick<NT, R>(t0, W0, rb0, rows0, cols, Xq, Xd, n_tok, Y0, ys0, b, tg);                        \
        else if (b < nb0 + nb1) mmvq_pick<NT, R>(t1, W1, rb1, rows1, cols, Xq, Xd, n_tok, Y1, ys1, b - nb0, tg);      \
        else mmvq_pick<NT, R>(t2, W2, rb2, rows2, cols, Xq, Xd, n_tok, Y2, ys2, b - nb0 - nb1, tg);                    \
    }
MMVQ_KERNEL(mmvq1, 1, 2)
MMVQ_KERNEL(mmvq2, 2, 2)
MMVQ_KERNEL(mmvq4, 4, 4)
MMVQ_KERNEL(mmvq8, 8, 2)

// ---- int8 tensor-core kernel -----------------------------------------------------------

// Exact int32 C = A·B on the tensor cores (lane = 4g + tq):
// m16n8k32: A 16×32 s8 (a0: row g, k 4tq..4tq+3; a1: row g + 8, same k; a2, a3: the
// same at k + 16), B 32×8 s8 (b0: token g, k 4tq..; b1: k + 16);
// m16n8k16: A 16×16 (a0: row g, a1: row g + 8, k 4tq..), B 16×8 (b0: token g, k 4tq..);
// C: c0, c1 row g, tokens 2tq, 2tq + 1; c2, c3 row g + 8; each onto I2F_BIAS.
__device__ __forceinline__ void mma_s8_16832(int a0, int a1, int a2, int a3, int b0, int b1, int* c) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};"
        : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "r"(I2F_BIAS), "r"(I2F_BIAS), "r"(I2F_BIAS),
          "r"(I2F_BIAS));
}

__device__ __forceinline__ void mma_s8_16816(int a0, int a1, int b0, int* c) {
    asm("mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%7, %8, %9, %10};"
        : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
        : "r"(a0), "r"(a1), "r"(b0), "r"(I2F_BIAS), "r"(I2F_BIAS), "r"(I2F_BIAS), "r"(I2F_BIAS));
}

// Where unit u's activations are: bytes xa.. (half A) and xb.. (half B) of a token's
// row, scales in blocks da and db (as `load_unit` sets them).
struct UnitPos {
    int xa, xb, da, db;
};

template <int T>
__device__ __forceinline__ UnitPos unit_pos(int u) {
    UnitPos p;
    if (ONE_BLOCK(T)) {
        p.xa = u * 32;
        p.xb = u * 32 + 16;
        p.da = p.db = u;
    } else {  // Q6_K
        const int k = u & 7, a0 = (u >> 3) * 8 + 4 * (k >> 2) + ((k >> 1) & 1), j = k & 1;
        p.xa = a0 * 32 + 16 * j;
        p.xb = (a0 + 2) * 32 + 16 * j;
        p.da = a0;
        p.db = a0 + 2;
    }
    return p;
}

// Lane tq's share of unit u of a row, as the tensor cores take it: weights 4tq..4tq+3
// of each half (qa: half A, qb: half B; `load_unit`'s q[tq] and q[4 + tq]), and the
// unit's scales. Only the lane's 4 bytes of each half are loaded and unpacked. `row`
// is a row in global memory (G: through the read-only cache), or `mmq_t`'s copy in
// shared memory of 8 units of it (`stage_rows`), laid out as a row of nb = 8 units.
#define LDS(p) (G ? __ldg(p) : *(p))
struct Slice {
    int qa, qb;
    float fa, fb, ma, mb;
};

template <int T, bool G>
__device__ __forceinline__ void load_quants(const u8* row, int nb, int u, int tq, Slice& s) {
    const u32 M = 0x0F0F0F0Fu;
    if (T == T_Q4_0 || T == T_Q4_1 || T == T_Q5_0 || T == T_Q5_1) {
        const u32 v = LDS((const u32*)(row + 16 * u) + tq);
        u32 lo = v & M, hi = (v >> 4) & M;
        if (T == T_Q5_0 || T == T_Q5_1) {
            const u32 qh = LDS((const u32*)(row + nb * 16) + u);
            lo |= spread4(qh >> (4 * tq));
            hi |= spread4(qh >> (4 * tq + 16));
        }
        if (T == T_Q4_0) {
            lo = sub_bytes(lo, 0x08080808u);
            hi = sub_bytes(hi, 0x08080808u);
        } else if (T == T_Q5_0) {
            lo = sub_bytes(lo, 0x10101010u);
            hi = sub_bytes(hi, 0x10101010u);
        }
        s.qa = (int)lo;
        s.qb = (int)hi;
    } else if (T == T_Q8_0) {
        s.qa = LDS((const int*)(row + 32 * u) + tq);
        s.qb = LDS((const int*)(row + 32 * u + 16) + tq);
    } else if (T == T_Q4_K || T == T_Q5_K) {
        const int sb = u >> 3, j = u & 7, sh = 4 * (j & 1);
        const u8* blk = row + sb * (T == T_Q4_K ? 144 : 176);
        const u8* qs = blk + (T == T_Q4_K ? 16 : 48) + 32 * (j >> 1);
        u32 lo = (LDS((const u32*)qs + tq) >> sh) & M, hi = (LDS((const u32*)(qs + 16) + tq) >> sh) & M;
        if (T == T_Q5_K) {
            lo |= ((LDS((const u32*)(blk + 16) + tq) >> j) & 0x01010101u) << 4;
            hi |= ((LDS((const u32*)(blk + 32) + tq) >> j) & 0x01010101u) << 4;
        }
        s.qa = (int)lo;
        s.qb = (int)hi;
    } else if (T == T_Q6_K) {
        const int sb = u >> 3, k = u & 7, n = k >> 2, g = (k >> 1) & 1, j = k & 1;
        const u8* blk = row + sb * 208;
        const u32 v = LDS((const u32*)(blk + 64 * n + 32 * g + 16 * j) + tq);
        const u32 hv = LDS((const u32*)(blk + 128 + 32 * n + 16 * j) + tq);
        const u32 lo = (v & M) | (((hv >> (2 * g)) & 0x03030303u) << 4);
        const u32 hi = ((v >> 4) & M) | (((hv >> (4 + 2 * g)) & 0x03030303u) << 4);
        s.qa = sub_bytes(lo, 0x20202020u);
        s.qb = sub_bytes(hi, 0x20202020u);
    }
}

// The unit's scales (fa, fb, ma, mb of `Unit`). In `mmq_t`'s staged copy, Q6_K's d is
// entry d6 of the copied pair.
template <int T, bool G>
__device__ __forceinline__ void load_scales(const u8* row, int nb, int u, Slice& s, int d6 = 0) {
    s.fb = s.ma = s.mb = 0.f;
    if (T == T_Q4_0) s.fa = h2f(LDS((const u16*)(row + nb * 16) + u));
    if (T == T_Q5_0) s.fa = h2f(LDS((const u16*)(row + nb * 20) + u));
    if (T == T_Q4_1 || T == T_Q5_1) {
        const u32 dm = LDS((const u32*)(row + nb * (T == T_Q4_1 ? 16 : 20)) + u);
        s.fa = h2f((u16)dm);
        s.ma = h2f((u16)(dm >> 16));
    }
    if (T == T_Q8_0) s.fa = h2f(LDS((const u16*)(row + nb * 32) + u));
    if (T == T_Q4_K || T == T_Q5_K) {
        const int sb = u >> 3, j = u & 7;
        const u8* blk = row + sb * (T == T_Q4_K ? 144 : 176);
        const u32 dd = LDS((const u32*)blk);
        int sc, m;
        scale_min_k4(j, blk + 4, &sc, &m);
        s.fa = h2f((u16)dd) * (float)sc;
        s.ma = -h2f((u16)(dd >> 16)) * (float)m;
    }
    if (ONE_BLOCK(T)) s.fb = s.fa;
    if (T == T_Q6_K) {
        const int sb = u >> 3, k = u & 7, n = k >> 2, g = (k >> 1) & 1, j = k & 1;
        const u8* blk = row + sb * 208;
        const float d = h2f(LDS((const u16*)(row + (nb >> 3) * 208) + sb + d6));
        const i8* sc = (const i8*)(blk + 192);
        s.fa = d * (float)sc[8 * n + 2 * g + j];
        s.fb = d * (float)sc[8 * n + 4 + 2 * g + j];
    }
}

// The slices of unit u for a lane's 2·RT rows of a tile: s[i][h] is row r0 + 16i + 8h +
// g (rows past `rlast` read row rlast), rows `pitch` bytes apart from `base`. Q4_K and
// Q5_K's packed 6-bit scale and min take some 20 integer and conversion steps a row,
// the same for the group's 4 lanes (lanes 4g..4g + 3 share their rows): lane tq decodes
// rows k ≡ tq (mod 4) of the 2·RT (k = 2i + h) and passes them round by shuffles
// (measured: 4x4 blocks 5% faster; Q6_K's plain int8 scales were slower that way). The
// whole warp must call it.
template <int T, bool G, int RT>
__device__ __forceinline__ void load_tile_slices(const u8* base, u64 pitch, int r0, int rlast, int nb, int u, int g, int tq,
                                                 int d6, Slice (&s)[RT][2]) {
#pragma unroll
    for (int i = 0; i < RT; i++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const u8* row = base + (u64)min(r0 + 16 * i + 8 * h + g, rlast) * pitch;
            load_quants<T, G>(row, nb, u, tq, s[i][h]);
            if (!(T == T_Q4_K || T == T_Q5_K)) load_scales<T, G>(row, nb, u, s[i][h], d6);
        }
    if (T == T_Q4_K || T == T_Q5_K) {
        constexpr int PER = (2 * RT + 3) / 4;
        float x[PER], y[PER];
#pragma unroll
        for (int p = 0; p < PER; p++) {
            const int k = min(4 * p + tq, 2 * RT - 1);
            Slice t;
            load_scales<T, G>(base + (u64)min(r0 + 16 * (k >> 1) + 8 * (k & 1) + g, rlast) * pitch, nb, u, t, d6);
            x[p] = t.fa;
            y[p] = t.ma;
        }
        const int src = (threadIdx.x & 28);
#pragma unroll
        for (int i = 0; i < RT; i++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int k = 2 * i + h;
                const float a = __shfl_sync(0xffffffffu, x[k >> 2], src | (k & 3));
                const float b = __shfl_sync(0xffffffffu, y[k >> 2], src | (k & 3));
                s[i][h].fa = s[i][h].fb = a;
                s[i][h].ma = b;
                s[i][h].mb = 0.f;
            }
    }
}

// A row's bytes for 8 units (one K-quant super-block) in shared memory, laid out as a
// whole row of nb = 8 units (so `load_quants` reads it as it would the row): the 32-block
// formats' parts one after the other (quants, then high bits / scales), a K-quant's
// super-block as it is (Q6_K: then the 4-byte-aligned pair of d values that holds its
// d). MMQ_PITCH: bytes a staged row takes, a multiple of 16 whose words ≡ 4 (mod 8), so
// 8 rows × 4 lanes of 4 bytes hit 32 banks.
template <int T>
struct Stage {
    // Bytes a unit per part (0: absent) and where the part starts in a global row.
    static constexpr int S0 = T == T_Q8_0 ? 32 : T == T_Q4_K ? 18 : T == T_Q5_K ? 22 : T == T_Q6_K ? 26 : 16;
    static constexpr int S1 = (T == T_Q4_0 || T == T_Q8_0) ? 2 : (T == T_Q4_1 || T == T_Q5_0 || T == T_Q5_1) ? 4 : 0;
    static constexpr int S2 = T == T_Q5_0 ? 2 : T == T_Q5_1 ? 4 : 0;
    static constexpr int BYTES = 8 * (S0 + S1 + S2) + (T == T_Q6_K ? 4 : 0);
    static constexpr int P16 = (BYTES + 15) / 16 * 16;
    static constexpr int PITCH = (P16 / 4) % 8 == 4 ? P16 : P16 + 16;
};

// Asynchronous copies global → shared (sm_80's cp.async) of C = 4, 8 or 16 bytes, of
// which the first `n` are read and the rest zero-filled (n = 0 reads nothing); the
// copies a thread issued before `cp_commit` complete at the matching `cp_wait<N>` (all
// but the N newest groups).
template <int C>
__device__ __forceinline__ void cp_async(void* dst, const void* src, int n) {
    const u32 d = (u32)__cvta_generic_to_shared(dst);
    if (C == 16) asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(n) : "memory");
    if (C == 8) asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(d), "l"(src), "r"(n) : "memory");
    if (C == 4) asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(d), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// One part of a tile's rows (16·RT of them from r0, each `pitch` bytes in shared
// memory from dst): BYTES bytes from byte `off` of each global row to byte `at` of its
// staged row, of which the first `valid` are real (the rest of the part is past the
// row's last unit: zeros). C-byte copies, C dividing `off` (rows start at multiples
// of 16); the 256 threads take (row, copy) items in turn.
template <int C, int BYTES, int RT>
__device__ __forceinline__ void stage_part(const u8* __restrict__ W, u64 row_bytes, int r0, int rows, u64 off, int valid,
                                           u8* dst, int pitch, int at) {
    constexpr int PER_ROW = (BYTES + C - 1) / C;
    for (int it = threadIdx.x; it < 16 * RT * PER_ROW; it += 256) {
        const int r = it / PER_ROW, k = it - r * PER_ROW;
        const u8* row = W + (u64)min(r0 + r, rows - 1) * row_bytes;
        const int n = min(max(valid - k * C, 0), C);
        cp_async<C>(dst + r * pitch + at + k * C, n ? row + off + k * C : row, n);
    }
}

// `stage_part` with the largest copy (16, 8 or 4 bytes) that `off`'s alignment allows.
template <int BYTES, int RT>
__device__ __forceinline__ void stage_part_any(const u8* __restrict__ W, u64 row_bytes, int r0, int rows, u64 off, int valid,
                                               u8* dst, int pitch, int at) {
    if ((off & 15) == 0) stage_part<16, BYTES, RT>(W, row_bytes, r0, rows, off, valid, dst, pitch, at);
    else if ((off & 7) == 0) stage_part<8, BYTES, RT>(W, row_bytes, r0, rows, off, valid, dst, pitch, at);
    else stage_part<4, BYTES, RT>(W, row_bytes, r0, rows, off, valid, dst, pitch, at);
}

// Start copying a tile's weights for units u0..u0 + 7 (nb units a row) to `ws`.
template <int T, int RT>
__device__ __forceinline__ void stage_rows(const u8* __restrict__ W, u64 row_bytes, int r0, int rows, int nb, int u0, u8* ws) {
    typedef Stage<T> L;
    if (T == T_Q4_K || T == T_Q5_K || T == T_Q6_K) {
        constexpr int SBB = T == T_Q4_K ? 144 : T == T_Q5_K ? 176 : 208;
        const int sb = u0 >> 3;
        stage_part<16, SBB, RT>(W, row_bytes, r0, rows, (u64)sb * SBB, SBB, ws, L::PITCH, 0);
        // Q6_K's d values (f16) follow the super-blocks: the aligned pair holding this one.
        if (T == T_Q6_K) stage_part<4, 4, RT>(W, row_bytes, r0, rows, (u64)(nb >> 3) * 208 + 4 * (sb >> 1), 4, ws, L::PITCH, 208);
        return;
    }
    const int nv = min(8, nb - u0);  // units left in the row
    stage_part<16, 8 * L::S0, RT>(W, row_bytes, r0, rows, (u64)L::S0 * u0, nv * L::S0, ws, L::PITCH, 0);
    stage_part_any<8 * L::S1, RT>(W, row_bytes, r0, rows, (u64)L::S0 * nb + L::S1 * u0, nv * L::S1, ws, L::PITCH, 8 * L::S0);
    if (L::S2)
        stage_part_any<8 * L::S2, RT>(W, row_bytes, r0, rows, (u64)(L::S0 + L::S1) * nb + L::S2 * u0, nv * L::S2, ws, L::PITCH,
                                      8 * (L::S0 + L::S1));
}

// One unit of `mmq` for the rows of a 16-row tile (g and g + 8: slices sa, sb) and
// every token tile m (B fragments b0, b1; activation scales of this lane's C tokens 2tq
// and 2tq + 1, dA for half A and dB for half B): the products and their contributions.
template <int T, int MT>
__device__ __forceinline__ void mmq_rows(float (&acc)[MT][4], const Slice& sa, const Slice& sb, const int (&b0)[MT],
                                         const int (&b1)[MT], const float2 (&dA0)[MT], const float2 (&dA1)[MT],
                                         const float2 (&dB0)[MT], const float2 (&dB1)[MT]) {
#pragma unroll
    for (int m = 0; m < MT; m++) {
        int c[4], c2[4];
        if (ONE_BLOCK(T)) {
            mma_s8_16832(sa.qa, sb.qa, sa.qb, sb.qb, b0[m], b1[m], c);
            c2[0] = c2[1] = c2[2] = c2[3] = I2F_BIAS;
        } else {
            mma_s8_16816(sa.qa, sb.qa, b0[m], c);
            mma_s8_16816(sa.qb, sb.qb, b1[m], c2);
        }
        acc[m][0] = apply<T>(acc[m][0], contrib<T>(sa.fa, sa.fb, sa.ma, sa.mb, dA0[m], dB0[m], c[0], c2[0]));
        acc[m][1] = apply<T>(acc[m][1], contrib<T>(sa.fa, sa.fb, sa.ma, sa.mb, dA1[m], dB1[m], c[1], c2[1]));
        acc[m][2] = apply<T>(acc[m][2], contrib<T>(sb.fa, sb.fb, sb.ma, sb.mb, dA0[m], dB0[m], c[2], c2[2]));
        acc[m][3] = apply<T>(acc[m][3], contrib<T>(sb.fa, sb.fb, sb.ma, sb.mb, dA1[m], dB1[m], c[3], c2[3]));
    }
}

// The end of `mmq`: the 8 warps' (slices') sums added pairwise, (0 + 1), (2 + 3),
// (4 + 5), (6 + 7); then (0 + 2), (4 + 6); then (0 + 4), the right operand through
// shared memory (`part`: 4 × RT × MT × 128 floats); warp 0 writes the tile.
template <int RT, int MT>
__device__ __forceinline__ void mmq_finish(float (&acc)[RT][MT][4], float* part, int r0, int tok0, int rows, int n_tok,
                                           float* __restrict__ Y, int y_stride) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int S = RT * MT * 4 * 32;  // [slot 4][RT][MT][c 4][lane 32]
#pragma unroll
    for (int step = 1; step < 8; step <<= 1) {
        const bool sender = (warp & (2 * step - 1)) == step, receiver = (warp & (2 * step - 1)) == 0;
        float* slot = part + (warp / (2 * step)) * S + lane;
        if (sender) {
#pragma unroll
            for (int i = 0; i < RT; i++)
#pragma unroll
                for (int m = 0; m < MT; m++)
#pragma unroll
                    for (int c = 0; c < 4; c++) slot[((i * MT + m) * 4 + c) * 32] = acc[i][m][c];
        }
        __syncthreads();
        if (receiver) {
#pragma unroll
            for (int i = 0; i < RT; i++)
#pragma unroll
                for (int m = 0; m < MT; m++)
#pragma unroll
                    for (int c = 0; c < 4; c++) acc[i][m][c] = __fadd_rn(acc[i][m][c], slot[((i * MT + m) * 4 + c) * 32]);
        }
        __syncthreads();
    }
    if (warp == 0) {
#pragma unroll
        for (int i = 0; i < RT; i++)
#pragma unroll
            for (int m = 0; m < MT; m++)
#pragma unroll
                for (int c = 0; c < 4; c++) {
                    const int r = r0 + 16 * i + g + 8 * (c >> 1), t = tok0 + 8 * m + 2 * tq + (c & 1);
                    if (r < rows && t < n_tok) Y[(u64)t * y_stride + r] = acc[i][m][c];
                }
    }
}

// Start the copies of a tile's units u0..u0 + 7 into the stage at `base`, as one group
// (`mmq_t`).
#define MMQ_XPITCH 272  // a staged token's 8 units of activations: 256 bytes + 16
template <int T, int RT, int MT>
__device__ __forceinline__ void mmq_issue(const u8* __restrict__ W, u64 row_bytes, int rows, int cols,
                                          const i8* __restrict__ Xq, const float2* __restrict__ Xd, int n_tok, int r0,
                                          int tok0, int u0, u8* base) {
    constexpr int XS = 16 * RT * Stage<T>::PITCH, DS = XS + 8 * MT * MMQ_XPITCH;
    const int nb = cols >> 5;
    // Opaque copies of the tile's origin: the copies' addresses are worked out afresh
    // each time rather than kept in registers across `mmq_t`'s loop.
    asm volatile("" : "+r"(r0), "+r"(tok0));
    stage_rows<T, RT>(W, row_bytes, r0, rows, nb, u0, base);
    const int nv = min(8, nb - u0);
    // Activations: (token, 16 bytes) items; scales: (token, 8 bytes).
    for (int it = threadIdx.x; it < 8 * MT * 16; it += 256) {
        const int t = it >> 4, k = it & 15, tt = min(tok0 + t, n_tok - 1);
        const i8* src = Xq + (u64)tt * cols + 32 * u0 + 16 * k;
        const int n = 16 * k < 32 * nv ? 16 : 0;
        cp_async<16>(base + XS + t * MMQ_XPITCH + 16 * k, n ? (const void*)src : (const void*)Xq, n);
    }
    for (int it = threadIdx.x; it < 8 * MT * 8; it += 256) {
        const int t = it >> 3, k = it & 7, tt = min(tok0 + t, n_tok - 1);
        const int n = k < nv ? 8 : 0;
        cp_async<8>(base + DS + t * 64 + 8 * k, n ? (const void*)(Xd + (u64)tt * nb + u0 + k) : (const void*)Xd, n);
    }
    cp_commit();
}

// Y[t][r] = Σ_c W[r][c] X[t][c] on the tensor cores, for a tile of 16·RT rows × 8·MT
// tokens a block (int8 activations as for `mmvq`). The block walks the row 8 units at
// a time through two stages of shared memory: while its warps work on one, the tile's
// weights, activations and activation scales for the next 8 units are copied into the
// other (cp.async, 16-byte copies where aligned). Warp w takes unit u0 + w: it is
// slice w of the order above, so it takes units w, w + 8, ... in order, for the whole
// tile. A unit is one m16n8k32 product per 16 rows × 8 tokens (two m16n8k16 for Q6_K,
// whose halves have their own scales), turned into contributions as `mmvq` does; each
// lane reads and unpacks only its own 4 bytes of each half. The 8 warps' sums are then
// added pairwise through shared memory, in the order `mmvq` adds its slices: a token
// gets the same bits from either kernel, whatever RT and MT, and the choice never
// changes a result.
// Block: 256; grid: (ceil(rows / 16RT), ceil(n_tok / 8MT)); dynamic shared memory:
// `mmq_shared` bytes (model.rs).
template <int T, int RT, int MT>
__device__ __forceinline__ void mmq_t(const u8* __restrict__ W, u64 row_bytes, int rows, int cols,
                                      const i8* __restrict__ Xq, const float2* __restrict__ Xd, int n_tok,
                                      float* __restrict__ Y, int y_stride, int tok0) {
    extern __shared__ __align__(16) u8 smem[];
    typedef Stage<T> L;
    // A stage: [16RT rows][PITCH] weights, [8MT tokens][MMQ_XPITCH] activations,
    // [8MT tokens][8 units] activation scales.
    constexpr int XS = 16 * RT * L::PITCH, DS = XS + 8 * MT * MMQ_XPITCH, STAGE = DS + 8 * MT * 64;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int r0 = blockIdx.x * 16 * RT;
    const int nb = cols >> 5;
    float acc[RT][MT][4];
#pragma unroll
    for (int i = 0; i < RT; i++)
#pragma unroll
        for (int m = 0; m < MT; m++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[i][m][c] = 0.f;
    mmq_issue<T, RT, MT>(W, row_bytes, rows, cols, Xq, Xd, n_tok, r0, tok0, 0, smem);
#pragma unroll 1
    for (int u0 = 0, st = 0; u0 < nb; u0 += 8, st ^= 1) {
        if (u0 + 8 < nb) {
            // Into the stage the warps left at the last barrier.
            mmq_issue<T, RT, MT>(W, row_bytes, rows, cols, Xq, Xd, n_tok, r0, tok0, u0 + 8, smem + (st ^ 1) * STAGE);
            cp_wait<1>();
        } else {
            cp_wait<0>();
        }
        __syncthreads();
        const u8* ws = smem + st * STAGE;
        const u8* xs = ws + XS;
        const float2* ds = (const float2*)(ws + DS);
        const int u = u0 + warp;
        if (u < nb) {
            UnitPos p = unit_pos<T>(u);
            p.xa -= 32 * u0;
            p.xb -= 32 * u0;
            p.da -= u0;
            p.db -= u0;
            int b0[MT], b1[MT];
            float2 dA0[MT], dA1[MT], dB0[MT], dB1[MT];
#pragma unroll
            for (int m = 0; m < MT; m++) {
                const u8* xt = xs + (8 * m + g) * MMQ_XPITCH;
                b0[m] = *(const int*)(xt + p.xa + 4 * tq);
                b1[m] = *(const int*)(xt + p.xb + 4 * tq);
                const float2* d0 = ds + (8 * m + 2 * tq) * 8;
                dA0[m] = d0[p.da];
                dA1[m] = d0[8 + p.da];
                dB0[m] = ONE_BLOCK(T) ? dA0[m] : d0[p.db];
                dB1[m] = ONE_BLOCK(T) ? dA1[m] : d0[8 + p.db];
            }
            const int d6 = (u0 >> 3) & 1;  // Q6_K: which d of the staged pair
            Slice sl[RT][2];
            load_tile_slices<T, false, RT>(ws, L::PITCH, 0, 16 * RT - 1, 8, u - u0, g, tq, d6, sl);
#pragma unroll
            for (int i = 0; i < RT; i++) mmq_rows<T, MT>(acc[i], sl[i][0], sl[i][1], b0, b1, dA0, dA1, dB0, dB1);
        }
        __syncthreads();  // the next iteration's copies overwrite this stage
    }
    mmq_finish<RT, MT>(acc, (float*)smem, r0, tok0, rows, n_tok, Y, y_stride);
}

// `mmq_t` without the staging, for small tiles (16 rows × 8 or 16 tokens: decode
// batches), where the staging's copies and barriers cost more than they save: each
// lane reads its slices straight from global memory. The same order, so the same bits.
template <int T, int RT, int MT>
__device__ __forceinline__ void mmq_direct_t(const u8* __restrict__ W, u64 row_bytes, int rows, int cols,
                                      const i8* __restrict__ Xq, const float2* __restrict__ Xd, int n_tok,
                                      float* __restrict__ Y, int y_stride, int tok0) {
    extern __shared__ float part[];  // [slot 4][RT][MT][c 4][lane 32]
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int r0 = blockIdx.x * 16 * RT;
    const int nb = cols >> 5;
    float acc[RT][MT][4];
#pragma unroll
    for (int i = 0; i < RT; i++)
#pragma unroll
        for (int m = 0; m < MT; m++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[i][m][c] = 0.f;
    // This lane's B token (g of each token tile) and C tokens (2tq, 2tq + 1), clamped.
    u32 xb_off[MT], xd_off0[MT], xd_off1[MT];
    bool tok_ok[MT];
#pragma unroll
    for (int m = 0; m < MT; m++) {
        const int tb = tok0 + 8 * m + g;
        tok_ok[m] = tb < n_tok;
        xb_off[m] = (u32)min(tb, n_tok - 1) * (u32)cols;
        xd_off0[m] = (u32)min(tok0 + 8 * m + 2 * tq, n_tok - 1) * (u32)nb;
        xd_off1[m] = (u32)min(tok0 + 8 * m + 2 * tq + 1, n_tok - 1) * (u32)nb;
    }
    for (int u = warp; u < nb; u += 8) {
        const UnitPos p = unit_pos<T>(u);
        int b0[MT], b1[MT];
        float2 dA0[MT], dA1[MT], dB0[MT], dB1[MT];
#pragma unroll
        for (int m = 0; m < MT; m++) {
            const i8* xq = Xq + xb_off[m];
            b0[m] = tok_ok[m] ? __ldg((const int*)(xq + p.xa) + tq) : 0;
            b1[m] = tok_ok[m] ? __ldg((const int*)(xq + p.xb) + tq) : 0;
            dA0[m] = __ldg(Xd + xd_off0[m] + p.da);
            dA1[m] = __ldg(Xd + xd_off1[m] + p.da);
            dB0[m] = ONE_BLOCK(T) ? dA0[m] : __ldg(Xd + xd_off0[m] + p.db);
            dB1[m] = ONE_BLOCK(T) ? dA1[m] : __ldg(Xd + xd_off1[m] + p.db);
        }
        Slice sl[RT][2];
        load_tile_slices<T, false, RT>(W, row_bytes, r0, rows - 1, nb, u, g, tq, 0, sl);
#pragma unroll
        for (int i = 0; i < RT; i++) mmq_rows<T, MT>(acc[i], sl[i][0], sl[i][1], b0, b1, dA0, dA1, dB0, dB1);
    }
    mmq_finish<RT, MT>(acc, part, r0, tok0, rows, n_tok, Y, y_stride);
}

// Staged for blocks of 32 tokens, direct for smaller ones. `tok0`: the block's first
// token (blockIdx.y's tile for a plain matrix; 0 for an expert tile, whose pointers
// start at its first pair).
template <int T, int RT, int MT>
__device__ __forceinline__ void mmq_impl(const u8* __restrict__ W, u64 row_bytes, int rows, int cols,
                                         const i8* __restrict__ Xq, const float2* __restrict__ Xd, int n_tok,
                                         float* __restrict__ Y, int y_stride, int tok0) {
    if (MT < 4) mmq_direct_t<T, RT, MT>(W, row_bytes, rows, cols, Xq, Xd, n_tok, Y, y_stride, tok0);
    else mmq_t<T, RT, MT>(W, row_bytes, rows, cols, Xq, Xd, n_tok, Y, y_stride, tok0);
}
template <int RT, int MT, int KQ>
__device__ __forceinline__ void mmq_pick(int type, const u8* __restrict__ W, u64 rb, int rows, int cols,
                                         const i8* __restrict__ Xq, const float2* __restrict__ Xd, int n_tok,
                                         float* __restrict__ Y, int ys, int tok0) {
    switch (type) {
    case T_Q4_0: if (KQ < 2) mmq_impl<T_Q4_0, RT, MT>(W, rb, rows, cols, Xq, Xd, n_tok, Y, ys, tok0); break;
    case T_Q4_1: if (KQ < 2) mmq_impl<T_Q4_1, RT, MT>(W, rb, rows, cols, Xq, Xd, n_tok, Y, ys, tok0); break;
    case T_Q5_0: if (KQ < 2) mmq_impl<T_Q5_0, RT, MT>(W, rb, rows, cols, Xq, Xd, n_tok, Y, ys, tok0); break;
    case T_Q5_1: if (KQ < 2) mmq_impl<T_Q5_1, RT, MT>(W, rb, rows, cols, Xq, Xd, n_tok, Y, ys, tok0); break;
    case T_Q8_0: if (KQ < 2) mmq_impl<T_Q8_0, RT, MT>(W, rb, rows, cols, Xq, Xd, n_tok, Y, ys, tok0); break;
    case T_Q4_K: if (KQ) mmq_impl<T_Q4_K, RT, MT>(W, rb, rows, cols, Xq, Xd, n_tok, Y, ys, tok0); break;
    case T_Q5_K: if (KQ) mmq_impl<T_Q5_K, RT, MT>(W, rb, rows, cols, Xq, Xd, n_tok, Y, ys, tok0); break;
    case T_Q6_K: if (KQ) mmq_impl<T_Q6_K, RT, MT>(W, rb, rows, cols, Xq, Xd, n_tok, Y, ys, tok0); break;
    }
}
#define MMQ_KERNEL(NAME, RT, MT, KQ)                                                                                \
    extern "C" __global__ void __launch_bounds__(256, KQ == 2 ? 1 : 2)                                                           \
        NAME(int type, const u8* __restrict__ W, u64 row_bytes, int rows, int cols, const i8* __restrict__ Xq,        \
             const float2* __restrict__ Xd, int n_tok, float* __restrict__ Y, int y_stride) {                         \
        GRID_DEP_WAIT();                                                                                               \
        mmq_pick<RT, MT, KQ>(type, W, row_bytes, rows, cols, Xq, Xd, n_tok, Y, y_stride, blockIdx.y * 8 * MT);        \
    }
// 16·RT rows × 8·MT tokens a block: model.rs `mmq_tile` picks by rows and tokens. KQ:
// which formats a kernel has (0: the 32-block formats, 1: all, 2 and 3: the K-quants,
// whose 4x4 takes more registers: 2 with up to 255 of them, one block a multiprocessor).
MMQ_KERNEL(mmq_1x1, 1, 1, 1)
MMQ_KERNEL(mmq_1x2, 1, 2, 1)
MMQ_KERNEL(mmq_1x4, 1, 4, 1)
MMQ_KERNEL(mmq_2x4, 2, 4, 1)
MMQ_KERNEL(mmq_4x4, 4, 4, 0)
// The K-quants' 4x4: one block a multiprocessor (it takes 211 registers), or two, held
// to 128 registers (spilling some, and faster for Q4_K; model.rs `k44_blocks`).
MMQ_KERNEL(mmq_4x4k, 4, 4, 2)
MMQ_KERNEL(mmq_4x4k2, 4, 4, 3)

// ---- mixture of experts (qwen3moe) ------------------------------------------------------
//
// A step's (token, slot) pairs are routed (`moe_route`), sorted by expert
// (`moe_sort`), and each expert's run of pairs multiplies that expert's rows: the
// stacked expert tensors ([n_expert * rows][cols], expert e from row e * rows) go
// through the plain matrix kernels with an expert id per token tile (`mmq_moe_*`) or
// per pair (`mmvq_moe`), so a pair gets the bits a plain launch would give it and an
// expert's weights are read once per tile, not once per token.

// Router: per token, softmax over the n_expert logits, the k largest (best first, ties
// to the lower id), their probabilities renormalised to sum 1 (norm; the sum clamped to
// 6.1e-5 as ggml does) and scaled: ids[t][s], w[t][s]. The CPU's order of operations
// (exp(x - max), the sum in double, times the f32 reciprocal). n_expert <= 1024.
// Grid: n_tok; block: 32.
extern "C" __global__ void moe_route(const float* __restrict__ logits, int n_expert, int k, int norm, float scale,
                                     int* __restrict__ ids, float* __restrict__ w) {
    GRID_DEP_WAIT();
    const int lane = threadIdx.x;
    const u64 t = blockIdx.x;
    const float* l = logits + t * n_expert;
    float p[32];  // expert lane + 32 j; -1: no such expert, -2: chosen
    float m = NEG_INF;
    for (int j = 0; j < 32; j++) {
        const int e = lane + 32 * j;
        p[j] = e < n_expert ? l[e] : NEG_INF;
        m = fmaxf(m, p[j]);
    }
    m = warp_max(m);
    double sum = 0.0;
    for (int j = 0; j < 32; j++) {
        p[j] = lane + 32 * j < n_expert ? expf(p[j] - m) : 0.f;
        sum += (double)p[j];
    }
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const float inv = (float)(1.0 / sum);
    for (int j = 0; j < 32; j++) p[j] = lane + 32 * j < n_expert ? __fmul_rn(p[j], inv) : -1.f;
    double tot = 0.0;
    for (int s = 0; s < k; s++) {
        // The lane's first maximum, then the warp's (ties to the lower expert id); the
        // butterfly leaves every lane with the same pick.
        float bv = -3.f;
        int be = 1 << 30;
        for (int j = 0; j < 32; j++)
            if (p[j] > bv) bv = p[j], be = lane + 32 * j;
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oe = __shfl_xor_sync(0xffffffffu, be, o);
            if (ov > bv || (ov == bv && oe < be)) bv = ov, be = oe;
        }
        if ((be & 31) == lane) p[be >> 5] = -2.f;
        if (lane == 0) {
            ids[t * k + s] = be;
            w[t * k + s] = bv;
        }
        tot += (double)bv;
    }
    __syncwarp();
    const float d = fmaxf((float)tot, 6.103515625e-5f);
    for (int s = lane; s < k; s += 32) {
        float x = w[t * k + s];
        if (norm) x = __fdiv_rn(x, d);
        if (scale != 1.f) x = __fmul_rn(x, scale);
        w[t * k + s] = x;
    }
}

// Sort the n_pairs = n_tok * k pairs (pair t * k + s) by expert, stably: sorted[i] is
// the pair at position i, inv[pair] its position, sexp[i] its expert; and cut each
// expert's run into tiles of `tt` pairs: tiles[3j..3j+2] = (expert, first position,
// pairs), for j < max_tiles (the rest (0, 0, 0)). Thread e handles expert e.
// Grid: 1; block: 1024 (n_expert <= 1024).
extern "C" __global__ void __launch_bounds__(1024) moe_sort(const int* __restrict__ ids, int n_pairs, int n_expert,
                                                            int tt, int max_tiles, int* __restrict__ sorted,
                                                            int* __restrict__ inv, int* __restrict__ sexp,
                                                            int* __restrict__ tiles) {
    GRID_DEP_WAIT();
    __shared__ int cnt[1024], off[1025], toff[1025];
    __shared__ int chunk[2048];
    const int e = threadIdx.x;
    int c = 0;
    for (int base = 0; base < n_pairs; base += 2048) {
        const int n = min(2048, n_pairs - base);
        __syncthreads();
        for (int i = threadIdx.x; i < n; i += blockDim.x) chunk[i] = ids[base + i];
        __syncthreads();
        if (e < n_expert)
            for (int i = 0; i < n; i++) c += chunk[i] == e;
    }
    cnt[e] = e < n_expert ? c : 0;
    __syncthreads();
    if (threadIdx.x == 0) {
        off[0] = 0;
        toff[0] = 0;
        for (int x = 0; x < n_expert; x++) {
            off[x + 1] = off[x] + cnt[x];
            toff[x + 1] = toff[x] + (cnt[x] + tt - 1) / tt;
        }
    }
    __syncthreads();
    int at = e < n_expert ? off[e] : 0;
    for (int base = 0; base < n_pairs; base += 2048) {
        const int n = min(2048, n_pairs - base);
        __syncthreads();
        for (int i = threadIdx.x; i < n; i += blockDim.x) chunk[i] = ids[base + i];
        __syncthreads();
        if (e < n_expert)
            for (int i = 0; i < n; i++)
                if (chunk[i] == e) {
                    sorted[at] = base + i;
                    inv[base + i] = at;
                    sexp[at] = e;
                    at++;
                }
    }
    if (e < n_expert)
        for (int j = 0; j < toff[e + 1] - toff[e]; j++) {
            int* tl = tiles + 3 * (toff[e] + j);
            tl[0] = e;
            tl[1] = off[e] + j * tt;
            tl[2] = min(tt, cnt[e] - j * tt);
        }
    for (int j = toff[n_expert] + threadIdx.x; j < max_tiles; j += blockDim.x) {
        tiles[3 * j] = 0;
        tiles[3 * j + 1] = 0;
        tiles[3 * j + 2] = 0;
    }
}

// Gather the int8 input rows of the sorted pairs: row i of (Gq, Gd) = row sorted[i] / k
// of (Xq, Xd) (its token's). Grid: n_pairs; block: 128.
extern "C" __global__ void moe_gather_q8(const i8* __restrict__ Xq, const float2* __restrict__ Xd,
                                         const int* __restrict__ sorted, int k, int cols, i8* __restrict__ Gq,
                                         float2* __restrict__ Gd) {
    GRID_DEP_WAIT();
    const int t = sorted[blockIdx.x] / k;
    const int* src = (const int*)(Xq + (u64)t * cols);
    int* dst = (int*)(Gq + (u64)blockIdx.x * cols);
    for (int i = threadIdx.x; i < cols / 4; i += blockDim.x) dst[i] = src[i];
    for (int i = threadIdx.x; i < cols / 32; i += blockDim.x) Gd[(u64)blockIdx.x * (cols / 32) + i] = Xd[(u64)t * (cols / 32) + i];
}

// The experts' outputs back to the tokens: out[t] = (D[inv[t k]] · w[t k]) +
// (D[inv[t k + 1]] · w[t k + 1]) + ..., in slot order, each product rounded (the CPU's
// multiply, then add). Grid: n_tok; block: 256.
extern "C" __global__ void moe_combine(const float* __restrict__ D, const float* __restrict__ w,
                                       const int* __restrict__ inv, int k, int n, float* __restrict__ out) {
    GRID_DEP_WAIT();
    const u64 t = blockIdx.x;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float acc = 0.f;
        for (int s = 0; s < k; s++) {
            const float v = __fmul_rn(D[(u64)inv[t * k + s] * n + i], w[t * k + s]);
            acc = s == 0 ? v : __fadd_rn(acc, v);
        }
        out[t * n + i] = acc;
    }
}

// Decode-sized expert products: block row y is sorted pair y, multiplied by its expert's
// rows (`mmvq_t` with one token: the bits of a plain mmvq1 launch). Up to two matrices
// with the same input (gate, up), blocks of matrix 0 first. Each matrix: [n_expert *
// rows][cols]; input and output rows are the sorted pairs'.
// Grid: (Σ ceil(rows_i / 8), n_pairs); block: 128.
extern "C" __global__ void __launch_bounds__(128, 4)
    mmvq_moe(int cols, const i8* __restrict__ Xq, const float2* __restrict__ Xd, const int* __restrict__ sexp,
             int t0, const u8* W0, u64 rb0, int rows0, float* Y0, int t1, const u8* W1, u64 rb1, int rows1, float* Y1) {
    GRID_DEP_WAIT();
    const int nb0 = (rows0 + 7) / 8;
    const int p = blockIdx.y, e = sexp[p], b = blockIdx.x;
    const i8* xq = Xq + (u64)p * cols;
    const float2* xd = Xd + (u64)p * (cols >> 5);
    if (b < nb0) mmvq_pick<1, 2>(t0, W0 + (u64)e * rows0 * rb0, rb0, rows0, cols, xq, xd, 1, Y0 + (u64)p * rows0, rows0, b, 0);
    else mmvq_pick<1, 2>(t1, W1 + (u64)e * rows1 * rb1, rb1, rows1, cols, xq, xd, 1, Y1 + (u64)p * rows1, rows1, b - nb0, 0);
}

// Prompt-sized expert products: block row y is token tile y of `moe_sort` (an expert
// and up to 8·MT of its pairs; tiles past the real ones have no pairs and return).
// Grid: (ceil(rows / 16RT), max_tiles); block: 256; shared memory as `mmq_*`.
#define MMQ_MOE_KERNEL(NAME, RT, MT)                                                                               \
    extern "C" __global__ void __launch_bounds__(256, 2)                                                             \
        NAME(int type, const u8* __restrict__ W, u64 row_bytes, int rows, int cols, const i8* __restrict__ Xq,      \
             const float2* __restrict__ Xd, const int* __restrict__ tiles, float* __restrict__ Y) {                 \
        GRID_DEP_WAIT();                                                                                             \
        const int e = tiles[3 * blockIdx.y], first = tiles[3 * blockIdx.y + 1], n = tiles[3 * blockIdx.y + 2];    \
        if (n == 0) return;                                                                                          \
        mmq_pick<RT, MT, 1>(type, W + (u64)e * rows * row_bytes, row_bytes, rows, cols, Xq + (u64)first * cols,     \
                            Xd + (u64)first * (cols >> 5), n, Y + (u64)first * rows, rows, 0);                       \
    }
MMQ_MOE_KERNEL(mmq_moe_1x1, 1, 1)
MMQ_MOE_KERNEL(mmq_moe_1x2, 1, 2)
MMQ_MOE_KERNEL(mmq_moe_1x4, 1, 4)

// out[i][:] = scale * W[ids[i]][:] (token embeddings). Grid: n; block: 128.
extern "C" __global__ void get_rows(int type, const u8* __restrict__ W, u64 row_bytes, const u32* __restrict__ ids,
                                    int cols, float scale, float* __restrict__ out) {
    GRID_DEP_WAIT();
    const u8* row = W + (u64)ids[blockIdx.x] * row_bytes;
    float w[32];
    for (int b = threadIdx.x; b < (cols >> 5); b += blockDim.x) {
        deq32(type, row, cols >> 5, b, w);
        float* o = out + (u64)blockIdx.x * cols + b * 32;
        for (int j = 0; j < 32; j++) o[j] = w[j] * scale;
    }
}

// y[r][:] = x[r][:] / rms(x[r]) * w, for rows of n (in place when y == x). The sum of
// squares is taken in double, as the CPU does. Grid: rows; block: 256.
extern "C" __global__ void rms_norm(const float* x, const float* __restrict__ w, float* y, int n, float eps) {
    GRID_DEP_WAIT();
    __shared__ double part[32];
    const float* xr = x + (u64)blockIdx.x * n;
    float* yr = y + (u64)blockIdx.x * n;
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += (double)xr[i] * (double)xr[i];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x < 32) {
        double v = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.0;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (threadIdx.x == 0) part[0] = v;
    }
    __syncthreads();
    const float inv = (float)(1.0 / sqrt(part[0] / n + (double)eps));
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = xr[i] * inv * w[i];
}

// x += y · scale (n elements; scale 1 is exact). Grid: ceil(n / 256); block 256.
extern "C" __global__ void add(float* x, const float* __restrict__ y, int n, float scale) {
    GRID_DEP_WAIT();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = __fadd_rn(x[i], __fmul_rn(y[i], scale));
}

// x *= s (n elements): Granite's logits times 1 / logit_scale.
extern "C" __global__ void scale_f32(float* x, float s, int n) {
    GRID_DEP_WAIT();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = __fmul_rn(x[i], s);
}

// x[r][c] += b[c] for rows of width n; `total` = rows * n.
extern "C" __global__ void add_bias(float* x, const float* __restrict__ b, int n, int total) {
    GRID_DEP_WAIT();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < total) x[i] += b[i % n];
}

// g = silu(g) * u, or gelu(g) * u (tanh form), over n elements; when Xq is set, also
// g as int8 for the decode kernel (rows of `cols`, a multiple of 32: a warp's 32
// elements are one block of one row).
extern "C" __global__ void glu(float* g, const float* __restrict__ u, int n, int gelu, int cols, i8* __restrict__ Xq,
                               float2* __restrict__ Xd) {
    GRID_DEP_WAIT();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float x = g[i];
    float a;
    if (gelu) {
        a = 0.5f * x * (1.0f + tanhf(0.7978845608f * x * (1.0f + 0.044715f * x * x)));
    } else {
        a = x / (1.0f + expf(-x));
    }
    const float y = a * u[i];
    g[i] = y;
    if (Xq) q8_block(y, i / cols, (i % cols) >> 5, cols, Xq, Xd);
}

// x = tanh(x / c) * c (final logit soft-capping).
extern "C" __global__ void softcap(float* x, float c, int n) {
    GRID_DEP_WAIT();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = tanhf(x[i] / c) * c;
}

// Causal attention over the paged cache for one (token, head) per block.
// q: [n_tok][n_head * hd]; out: [n_tok][n_head * hdv]. tok_pos[t] is the token's
// position; its keys are positions lo..pos, where lo = pos + 1 - window on sliding-
// window layers (window 0: none). The token's block table starts at
// tables[tok_table[t]]. Keys are taken in chunks of ATT_CHUNK with an online softmax.
// Grid: (n_head, n_tok); block: 128; dynamic shared memory: (hd + ATT_CHUNK) floats.
#define ATT_CHUNK 1024
extern "C" __global__ void attention(const float* __restrict__ q, const u16* __restrict__ kc, const u16* __restrict__ vc,
                                     const u32* __restrict__ tables, const int* __restrict__ tok_table,
                                     const int* __restrict__ tok_pos, float* __restrict__ out,
                                     int n_head, int n_head_kv, int hd, int hdv, int bs, int window, float scale) {
    GRID_DEP_WAIT();
    extern __shared__ float sm[];
    float* qs = sm;            // [hd]
    float* w = sm + hd;        // [ATT_CHUNK]
    __shared__ float red[32];
    const int h = blockIdx.x, t = blockIdx.y;
    const int kvh = h / (n_head / n_head_kv);
    const int kvk = n_head_kv * hd, kvv = n_head_kv * hdv;
    const int pos = tok_pos[t];
    const int lo = (window > 0 && pos + 1 > window) ? pos + 1 - window : 0;
    const u32* table = tables + tok_table[t];
    for (int i = threadIdx.x; i < hd; i += blockDim.x) qs[i] = q[(u64)t * n_head * hd + h * hd + i];
    __syncthreads();
    // Each thread owns output dims d = threadIdx.x + k * blockDim.x (hdv <= 4 * blockDim).
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    float m = NEG_INF, l = 0.f;
    for (int c0 = lo; c0 <= pos; c0 += ATT_CHUNK) {
        const int n = min(ATT_CHUNK, pos + 1 - c0);
        float cmax = NEG_INF;
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            const int p = c0 + j;
            const u64 slot = (u64)table[p / bs] * bs + p % bs;
            const u16* kr = kc + slot * kvk + kvh * hd;
            float s = 0.f;
            for (int i = 0; i < hd; i++) s = fmaf(qs[i], h2f(kr[i]), s);
            s *= scale;
            w[j] = s;
            cmax = fmaxf(cmax, s);
        }
        cmax = warp_max(cmax);
        if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = cmax;
        __syncthreads();
        if (threadIdx.x < 32) {
            float v = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : NEG_INF;
            v = warp_max(v);
            if (threadIdx.x == 0) red[0] = v;
        }
        __syncthreads();
        const float m_new = fmaxf(m, red[0]);
        __syncthreads();
        float psum = 0.f;
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            const float e = expf(w[j] - m_new);
            w[j] = e;
            psum += e;
        }
        psum = warp_sum(psum);
        if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = psum;
        __syncthreads();
        if (threadIdx.x < 32) {
            float v = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : 0.f;
            v = warp_sum(v);
            if (threadIdx.x == 0) red[0] = v;
        }
        __syncthreads();
        const float corr = expf(m - m_new);
        l = l * corr + red[0];
        m = m_new;
        for (int k = 0; k < 4; k++) {
            const int d = threadIdx.x + k * blockDim.x;
            if (d >= hdv) break;
            float a = acc[k] * corr;
            for (int j = 0; j < n; j++) {
                const int p = c0 + j;
                const u64 slot = (u64)table[p / bs] * bs + p % bs;
                a = fmaf(w[j], h2f(vc[slot * kvv + kvh * hdv + d]), a);
            }
            acc[k] = a;
        }
        __syncthreads();
    }
    for (int k = 0; k < 4; k++) {
        const int d = threadIdx.x + k * blockDim.x;
        if (d < hdv) out[(u64)t * n_head * hdv + h * hdv + d] = acc[k] / l;
    }
}

// Attention for one token and `hg` query heads that share a KV head (GQA), over the
// paged f16 cache: the same inputs and outputs as `attention`, for head sizes 64, 128
// and 256 (EPL = head size / 32). The 8 warps take chunks of 32 keys (chunk c: keys
// lo + 32c.., warp w the chunks w, w + 8, ...). In a chunk lane j scores key j
// against the hg query heads (its K row in 16-byte loads, q from shared memory), the
// warp takes the chunk's max and sum at once, then adds the chunk's V rows (lane l
// owns dims l·EPL..) with online-softmax rescaling; the warps' partial results are
// merged at the end (prompt tokens; decode tokens take `attn_dec`). The split depends
// only on the token's positions, so a token's result never depends on its batch. When
// Xq is set, the output is also written as int8 for the next matrix product. Tokens
// t0 + blockIdx.y. Grid: (n_head / hg, tokens); block: 256.
#define ATT_WARPS 8
#define ATT_HG 4
// The end of both attention kernels: each warp's online-softmax state (running max m,
// sum l, and its weighted values acc) for the block's hg query heads, merged over the NW
// warps through shared memory; writes the token's outputs (and their int8 blocks).
template <int EPL, int NW>
__device__ __forceinline__ void attn_merge(const float (&acc)[ATT_HG][EPL], const float (&m)[ATT_HG],
                                           const float (&l)[ATT_HG], float (&sm_acc)[NW][ATT_HG][EPL * 32],
                                           float (&sm_m)[NW][ATT_HG], float (&sm_l)[NW][ATT_HG], int hg, int t, int h0,
                                           int n_head, float* __restrict__ out, i8* __restrict__ Xq,
                                           float2* __restrict__ Xd) {
    constexpr int HD = EPL * 32;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int h = 0; h < ATT_HG; h++) {
        if (h < hg) {
#pragma unroll
            for (int i = 0; i < EPL; i++) sm_acc[warp][h][lane * EPL + i] = acc[h][i];
            if (lane == 0) {
                sm_m[warp][h] = m[h];
                sm_l[warp][h] = l[h];
            }
        }
    }
    __syncthreads();
    for (int k = threadIdx.x; k < hg * HD; k += blockDim.x) {
        const int h = k / HD, d = k % HD;
        float mx = NEG_INF;
        for (int w = 0; w < NW; w++) mx = fmaxf(mx, sm_m[w][h]);
        float L = 0.f, o = 0.f;
        for (int w = 0; w < NW; w++) {
            if (sm_m[w][h] == NEG_INF) continue;  // a warp that had no keys
            const float f = expf(sm_m[w][h] - mx);
            L = fmaf(sm_l[w][h], f, L);
            o = fmaf(sm_acc[w][h][d], f, o);
        }
        const float y = o / L;
        out[(u64)t * n_head * HD + (h0 + h) * HD + d] = y;
        // A warp's 32 outputs are one 32-block of the token's row (HD is a multiple of 32).
        if (Xq) q8_block(y, t, ((h0 + h) * HD + d) >> 5, n_head * HD, Xq, Xd);
    }
}

template <int EPL>
__device__ __forceinline__ void attn_tok_t(const float* __restrict__ q, const u16* __restrict__ kc, const u16* __restrict__ vc,
                                           const u32* __restrict__ tables, const int* __restrict__ tok_table,
                                           const int* __restrict__ tok_pos, float* __restrict__ out,
                                           int n_head, int n_head_kv, int bs, int window, float scale, int hg,
                                           i8* __restrict__ Xq, float2* __restrict__ Xd, int t0) {
    const int HD = EPL * 32;
    __shared__ float sm_acc[ATT_WARPS][ATT_HG][EPL * 32];
    __shared__ float sm_m[ATT_WARPS][ATT_HG], sm_l[ATT_WARPS][ATT_HG];
    __shared__ float qs[ATT_HG][EPL * 32];
    const int h0 = blockIdx.x * hg, t = t0 + blockIdx.y;
    const int kvh = h0 / (n_head / n_head_kv);
    const int kvd = n_head_kv * HD;
    const int pos = tok_pos[t];
    const int lo = (window > 0 && pos + 1 > window) ? pos + 1 - window : 0;
    const u32* table = tables + tok_table[t];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int k = threadIdx.x; k < ATT_HG * HD; k += blockDim.x) {
        const int h = k / HD;
        qs[h][k % HD] = h < hg ? q[(u64)t * n_head * HD + (h0 + h) * HD + k % HD] : 0.f;
    }
    __syncthreads();
    float acc[ATT_HG][EPL], m[ATT_HG], l[ATT_HG];
#pragma unroll
    for (int h = 0; h < ATT_HG; h++) {
        m[h] = NEG_INF;
        l[h] = 0.f;
#pragma unroll
        for (int i = 0; i < EPL; i++) acc[h][i] = 0.f;
    }
    for (int c0 = lo + 32 * warp; c0 <= pos; c0 += 32 * ATT_WARPS) {
        const int p = c0 + lane;
        const bool valid = p <= pos;
        const int pp = valid ? p : pos;
        const u32 slot = table[pp / bs] * (u32)bs + (u32)(pp % bs);
        const uint4* kr = (const uint4*)(kc + (u64)slot * kvd + kvh * HD);
        float s[ATT_HG];
#pragma unroll
        for (int h = 0; h < ATT_HG; h++) s[h] = 0.f;
#pragma unroll
        for (int c = 0; c < HD / 8; c++) {
            const uint4 kk = kr[c];
            const u32 kw[4] = {kk.x, kk.y, kk.z, kk.w};
            float kf[8];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                kf[2 * e] = h2f((u16)kw[e]);
                kf[2 * e + 1] = h2f((u16)(kw[e] >> 16));
            }
#pragma unroll
            for (int h = 0; h < ATT_HG; h++) {
                if (h < hg) {
#pragma unroll
                    for (int e = 0; e < 8; e++) s[h] = fmaf(qs[h][8 * c + e], kf[e], s[h]);
                }
            }
        }
        float pj[ATT_HG];
#pragma unroll
        for (int h = 0; h < ATT_HG; h++) {
            pj[h] = 0.f;
            if (h < hg) {
                const float sc = valid ? s[h] * scale : NEG_INF;
                const float mn = fmaxf(m[h], warp_max(sc));
                const float corr = expf(m[h] - mn);
                pj[h] = valid ? expf(sc - mn) : 0.f;
                l[h] = l[h] * corr + warp_sum(pj[h]);
#pragma unroll
                for (int i = 0; i < EPL; i++) acc[h][i] *= corr;
                m[h] = mn;
            }
        }
        const int n = min(32, pos + 1 - c0);
#pragma unroll 4
        for (int j = 0; j < n; j++) {
            const u32 sj = __shfl_sync(0xffffffffu, slot, j);
            const u16* vr = vc + (u64)sj * kvd + kvh * HD + lane * EPL;
            float vf[EPL];
#pragma unroll
            for (int i = 0; i < EPL; i += 2) {
                const u32 vv = *(const u32*)(vr + i);
                vf[i] = h2f((u16)vv);
                vf[i + 1] = h2f((u16)(vv >> 16));
            }
#pragma unroll
            for (int h = 0; h < ATT_HG; h++) {
                if (h < hg) {
                    const float w = __shfl_sync(0xffffffffu, pj[h], j);
#pragma unroll
                    for (int i = 0; i < EPL; i++) acc[h][i] = fmaf(w, vf[i], acc[h][i]);
                }
            }
        }
    }
    attn_merge<EPL, ATT_WARPS>(acc, m, l, sm_acc, sm_m, sm_l, hg, t, h0, n_head, out, Xq, Xd);
}

#define ATTN_TOK_KERNEL(NAME, EPL)                                                                                     \
    extern "C" __global__ void __launch_bounds__(256)                                                                  \
        NAME(const float* __restrict__ q, const u16* __restrict__ kc, const u16* __restrict__ vc,                      \
             const u32* __restrict__ tables, const int* __restrict__ tok_table, const int* __restrict__ tok_pos,       \
             float* __restrict__ out, int n_head, int n_head_kv, int bs, int window, float scale, int hg,              \
             i8* __restrict__ Xq, float2* __restrict__ Xd, int t0) {                                                   \
        GRID_DEP_WAIT();                                                                                                               \
        attn_tok_t<EPL>(q, kc, vc, tables, tok_table, tok_pos, out, n_head, n_head_kv, bs, window, scale, hg, Xq, Xd, t0); \
    }
ATTN_TOK_KERNEL(attn_tok64, 2)
ATTN_TOK_KERNEL(attn_tok128, 4)
ATTN_TOK_KERNEL(attn_tok256, 8)

// ---- prompt attention on the tensor cores ---------------------------------------------

// Two floats as f16x2 (lo in the low half), rounded to nearest.
__device__ __forceinline__ u32 pack_h2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// D = A·B + C on the tensor cores, f16 inputs and f32 sums (m16n8k16; fragments as
// for `mma_s8_16816`, two f16 a register: a0 row g, k 2tq, 2tq + 1; a1 row g + 8; a2,
// a3 the same at k + 8; b0 k 2tq, 2tq + 1 of column g; b1 k + 8).
__device__ __forceinline__ void mma_f16_16816(const u32 (&a)[4], u32 b0, u32 b1, float (&c)[4]) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8×8 f16 matrices from shared memory, transposed: lane l gives the address of
// row l % 8 of matrix l / 8; register i gets matrix i's elements (2tq, g), (2tq + 1, g)
// (row, column), a B fragment when the rows are k.
__device__ __forceinline__ void ldsm_x4_t(const void* p, u32& r0, u32& r1, u32& r2, u32& r3) {
    const u32 a = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(a));
}

// Attention for the prompt tokens of a step, flash-attention style on the tensor cores
// (head sizes 64 and 128). A block takes a tile of up to 16 consecutive tokens of one
// sequence (`tiles`: first token and count, pairs) and one KV head; its warp w takes
// query head kvh · group + w for the tile (so the group's heads share each staged key
// and value). The keys go by in chunks of 32 at multiples of 32 from the tile's lowest
// key: staged in shared memory (f16, as cached), S = Q·Kᵀ (Q rounded to f16) on the
// tensor cores, scaled and masked (keys before the window or after the token), an
// online softmax in f32 per row, and P (f16) · V on the tensor cores into f32 outputs.
// A row's result depends only on its own token: a chunk without keys for it leaves its
// state exactly as it was, and chunks start at fixed positions, so neither the tile
// nor the batch changes a bit. Writes the outputs as `attn_tok` does, the int8 copy by
// `q8_block`'s arithmetic. Grid: (n_head_kv, tiles); block: 32 · group (≤ 8 warps).
template <int HD>
__device__ __forceinline__ void attn_fa_t(const float* __restrict__ q, const u16* __restrict__ kc, const u16* __restrict__ vc,
                                          const u32* __restrict__ tables, const int* __restrict__ tok_table,
                                          const int* __restrict__ tok_pos, float* __restrict__ out, int n_head,
                                          int n_head_kv, int bs, int window, float scale, i8* __restrict__ Xq,
                                          float2* __restrict__ Xd, const int* __restrict__ tiles) {
    constexpr int KP = HD + 8;  // a staged row: HD f16 + 16 bytes (rows 4 banks apart)
    __shared__ __align__(16) u16 ks[32][KP];
    __shared__ __align__(16) u16 vs[32][KP];
    __shared__ u32 slots[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int group = n_head / n_head_kv, kvh = blockIdx.x, h = kvh * group + warp;
    const int kvd = n_head_kv * HD;
    const int first = tiles[2 * blockIdx.y], cnt = tiles[2 * blockIdx.y + 1];
    // This lane's rows g (A) and g + 8 (B); rows past the tile repeat its last token.
    const int tA = first + min(g, cnt - 1), tB = first + min(g + 8, cnt - 1);
    const int posA = tok_pos[tA], posB = tok_pos[tB];
    const int loA = (window > 0 && posA + 1 > window) ? posA + 1 - window : 0;
    const int loB = (window > 0 && posB + 1 > window) ? posB + 1 - window : 0;
    int kmin = min(loA, loB), kmax = max(posA, posB);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        kmin = min(kmin, __shfl_xor_sync(0xffffffffu, kmin, o));
        kmax = max(kmax, __shfl_xor_sync(0xffffffffu, kmax, o));
    }
    const u32* table = tables + tok_table[first];
    // Q as A fragments, f16.
    u32 qf[HD / 16][4];
    {
        const float* qa = q + (u64)tA * n_head * HD + h * HD;
        const float* qb = q + (u64)tB * n_head * HD + h * HD;
#pragma unroll
        for (int k = 0; k < HD / 16; k++) {
            const float2 a0 = *(const float2*)(qa + 16 * k + 2 * tq), a2 = *(const float2*)(qa + 16 * k + 8 + 2 * tq);
            const float2 b0 = *(const float2*)(qb + 16 * k + 2 * tq), b2 = *(const float2*)(qb + 16 * k + 8 + 2 * tq);
            qf[k][0] = pack_h2(a0.x, a0.y);
            qf[k][1] = pack_h2(b0.x, b0.y);
            qf[k][2] = pack_h2(a2.x, a2.y);
            qf[k][3] = pack_h2(b2.x, b2.y);
        }
    }
    float o[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float mA = NEG_INF, mB = NEG_INF, lA = 0.f, lB = 0.f;
    for (int c0 = kmin & ~31; c0 <= kmax; c0 += 32) {
        __syncthreads();  // the last chunk's reads are done
        if (threadIdx.x < 32) {
            const int p = min(c0 + (int)threadIdx.x, kmax);
            slots[threadIdx.x] = table[p / bs] * (u32)bs + (u32)(p % bs);
        }
        __syncthreads();
        for (int it = threadIdx.x; it < 32 * (HD / 8); it += blockDim.x) {
            const int key = it / (HD / 8), c = it % (HD / 8);
            const u64 off = (u64)slots[key] * kvd + kvh * HD + 8 * c;
            *(uint4*)&ks[key][8 * c] = *(const uint4*)(kc + off);
            *(uint4*)&vs[key][8 * c] = *(const uint4*)(vc + off);
        }
        __syncthreads();
        // S: keys 8j + (2tq, 2tq + 1) of rows g (s[j][0..1]) and g + 8 (s[j][2..3]).
        float sc[4][4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
#pragma unroll
            for (int k = 0; k < HD / 16; k++) {
                const u32 b0 = *(const u32*)&ks[8 * j + g][16 * k + 2 * tq];
                const u32 b1 = *(const u32*)&ks[8 * j + g][16 * k + 8 + 2 * tq];
                mma_f16_16816(qf[k], b0, b1, sc[j]);
            }
        }
        float rmA = NEG_INF, rmB = NEG_INF;
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int key = c0 + 8 * j + 2 * tq + (e & 1);
                const bool ok = e < 2 ? (key >= loA && key <= posA) : (key >= loB && key <= posB);
                sc[j][e] = ok ? sc[j][e] * scale : NEG_INF;
                if (e < 2) rmA = fmaxf(rmA, sc[j][e]);
                else rmB = fmaxf(rmB, sc[j][e]);
            }
#pragma unroll
        for (int x = 1; x < 4; x <<= 1) {
            rmA = fmaxf(rmA, __shfl_xor_sync(0xffffffffu, rmA, x));
            rmB = fmaxf(rmB, __shfl_xor_sync(0xffffffffu, rmB, x));
        }
        // A row with no keys yet and none here keeps m = -inf, l = 0, o = 0.
        const float nA = fmaxf(mA, rmA), nB = fmaxf(mB, rmB);
        const float refA = nA == NEG_INF ? 0.f : nA, refB = nB == NEG_INF ? 0.f : nB;
        const float corrA = expf(mA - refA), corrB = expf(mB - refB);
        float sA = 0.f, sB = 0.f;
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                sc[j][e] = expf(sc[j][e] - (e < 2 ? refA : refB));
                if (e < 2) sA += sc[j][e];
                else sB += sc[j][e];
            }
#pragma unroll
        for (int x = 1; x < 4; x <<= 1) {
            sA += __shfl_xor_sync(0xffffffffu, sA, x);
            sB += __shfl_xor_sync(0xffffffffu, sB, x);
        }
        lA = lA * corrA + sA;
        lB = lB * corrB + sB;
        mA = nA;
        mB = nB;
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            o[n][0] *= corrA;
            o[n][1] *= corrA;
            o[n][2] *= corrB;
            o[n][3] *= corrB;
        }
        // O += P·V: keys 16kk.. as k; P's C fragments are its A fragments.
#pragma unroll
        for (int kk = 0; kk < 2; kk++) {
            const u32 pa[4] = {pack_h2(sc[2 * kk][0], sc[2 * kk][1]), pack_h2(sc[2 * kk][2], sc[2 * kk][3]),
                               pack_h2(sc[2 * kk + 1][0], sc[2 * kk + 1][1]), pack_h2(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
            const int mi = lane >> 3;  // the matrix this lane addresses: keys +8·(mi & 1), dims +8·(mi >> 1)
#pragma unroll
            for (int n = 0; n < HD / 16; n++) {
                u32 b0, b1, b2, b3;
                ldsm_x4_t(&vs[16 * kk + 8 * (mi & 1) + (lane & 7)][16 * n + 8 * (mi >> 1)], b0, b1, b2, b3);
                mma_f16_16816(pa, b0, b1, o[2 * n]);
                mma_f16_16816(pa, b2, b3, o[2 * n + 1]);
            }
        }
    }
    // Rows g and g + 8: dims 8n + 2tq, + 1; written, and each 32-dim block as int8,
    // its 32 values held by the row's 4 lanes (4 tiles of 8 dims, 2 values each).
    const float iA = 1.f / lA, iB = 1.f / lB;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int row = g + 8 * r;
        const bool ok = row < cnt;
        const int t = first + row;
        const float inv = r ? iB : iA;
        float* orow = out + (u64)t * n_head * HD + h * HD;
#pragma unroll
        for (int b = 0; b < HD / 32; b++) {
            float y[8];
            float amax = 0.f;
#pragma unroll
            for (int n = 0; n < 4; n++) {
                y[2 * n] = o[4 * b + n][2 * r] * inv;
                y[2 * n + 1] = o[4 * b + n][2 * r + 1] * inv;
                amax = fmaxf(amax, fmaxf(fabsf(y[2 * n]), fabsf(y[2 * n + 1])));
                if (ok) *(float2*)(orow + 32 * b + 8 * n + 2 * tq) = make_float2(y[2 * n], y[2 * n + 1]);
            }
            if (Xq) {
                amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
                amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
                const float d = amax / 127.f;
                const float id = d != 0.f ? 1.f / d : 0.f;
                int sum = 0;
                const int cols = n_head * HD, blk = (h * HD >> 5) + b;
#pragma unroll
                for (int n = 0; n < 4; n++) {
                    const int q0 = (int)roundf(y[2 * n] * id), q1 = (int)roundf(y[2 * n + 1] * id);
                    sum += q0 + q1;
                    if (ok) *(u16*)(Xq + (u64)t * cols + 32 * blk + 8 * n + 2 * tq) = (u16)((u8)(i8)q0 | ((u16)(u8)(i8)q1 << 8));
                }
                sum += __shfl_xor_sync(0xffffffffu, sum, 1);
                sum += __shfl_xor_sync(0xffffffffu, sum, 2);
                if (ok && tq == 0) {
                    float2 v;
                    v.x = d;
                    v.y = d * (float)sum;
                    Xd[(u64)t * (cols >> 5) + blk] = v;
                }
            }
        }
    }
}

#define ATTN_FA_KERNEL(NAME, HD)                                                                                       \
    extern "C" __global__ void __launch_bounds__(256)                                                                  \
        NAME(const float* __restrict__ q, const u16* __restrict__ kc, const u16* __restrict__ vc,                      \
             const u32* __restrict__ tables, const int* __restrict__ tok_table, const int* __restrict__ tok_pos,       \
             float* __restrict__ out, int n_head, int n_head_kv, int bs, int window, float scale,                      \
             i8* __restrict__ Xq, float2* __restrict__ Xd, const int* __restrict__ tiles) {                            \
        GRID_DEP_WAIT();                                                                                               \
        attn_fa_t<HD>(q, kc, vc, tables, tok_table, tok_pos, out, n_head, n_head_kv, bs, window, scale, Xq, Xd, tiles); \
    }
ATTN_FA_KERNEL(attn_fa64, 64)
ATTN_FA_KERNEL(attn_fa128, 128)

// Attention for a decode token: the inputs, outputs and shapes of `attn_tok`, for the
// short key ranges of one token a sequence. The NW warps take keys lo + w, lo + w + NW,
// ... two at a time (both rows loaded first): each loads a key's row once for the hg
// heads (lane l holds elements l·EPL..), reduces the dot products across the warp and
// keeps its own online softmax; the warps' partial results are merged at the end.
// (attn_tok's chunks of 32 keys a warp serialize a decode token's few keys behind one
// another; here NW warps have two keys each in flight.) A token's split depends only
// on its positions, never on its batch. NW warps: 16 for head sizes up to 128, 8 for 256
// (the partial results' shared memory). Grid: (n_head / hg, tokens); block: 32·NW.
template <int EPL, int NW>
__device__ __forceinline__ void attn_dec_t(const float* __restrict__ q, const u16* __restrict__ kc, const u16* __restrict__ vc,
                                           const u32* __restrict__ tables, const int* __restrict__ tok_table,
                                           const int* __restrict__ tok_pos, float* __restrict__ out,
                                           int n_head, int n_head_kv, int bs, int window, float scale, int hg,
                                           i8* __restrict__ Xq, float2* __restrict__ Xd, int t0) {
    const int HD = EPL * 32;
    __shared__ float sm_acc[NW][ATT_HG][EPL * 32];
    __shared__ float sm_m[NW][ATT_HG], sm_l[NW][ATT_HG];
    const int h0 = blockIdx.x * hg, t = t0 + blockIdx.y;
    const int kvh = h0 / (n_head / n_head_kv);
    const int kvd = n_head_kv * HD;
    const int pos = tok_pos[t];
    const int lo = (window > 0 && pos + 1 > window) ? pos + 1 - window : 0;
    const u32* table = tables + tok_table[t];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float qv[ATT_HG][EPL], acc[ATT_HG][EPL], m[ATT_HG], l[ATT_HG];
#pragma unroll
    for (int h = 0; h < ATT_HG; h++) {
        m[h] = NEG_INF;
        l[h] = 0.f;
#pragma unroll
        for (int i = 0; i < EPL; i++) {
            qv[h][i] = h < hg ? q[(u64)t * n_head * HD + (h0 + h) * HD + lane * EPL + i] : 0.f;
            acc[h][i] = 0.f;
        }
    }
    // Two keys a step (p and p + 8): their rows are loaded before either is used.
    for (int p = lo + warp; p <= pos; p += 2 * NW) {
        float k[2][EPL], v[2][EPL];
        const int np = p + NW <= pos ? 2 : 1;
#pragma unroll
        for (int j = 0; j < 2; j++) {
            const int pj = j < np ? p + j * NW : p;
            const u64 slot = (u64)table[pj / bs] * bs + pj % bs;
            const u16* kr = kc + slot * kvd + kvh * HD + lane * EPL;
            const u16* vr = vc + slot * kvd + kvh * HD + lane * EPL;
#pragma unroll
            for (int i = 0; i < EPL; i += 2) {
                const u32 kk = *(const u32*)(kr + i), vv = *(const u32*)(vr + i);
                k[j][i] = h2f((u16)kk);
                k[j][i + 1] = h2f((u16)(kk >> 16));
                v[j][i] = h2f((u16)vv);
                v[j][i + 1] = h2f((u16)(vv >> 16));
            }
        }
#pragma unroll
        for (int j = 0; j < 2; j++) {
            if (j < np) {
#pragma unroll
                for (int h = 0; h < ATT_HG; h++) {
                    if (h < hg) {
                        float s = 0.f;
#pragma unroll
                        for (int i = 0; i < EPL; i++) s = fmaf(qv[h][i], k[j][i], s);
                        s = warp_sum(s) * scale;
                        const float mn = fmaxf(m[h], s);
                        const float corr = expf(m[h] - mn), e = expf(s - mn);
                        l[h] = l[h] * corr + e;
#pragma unroll
                        for (int i = 0; i < EPL; i++) acc[h][i] = fmaf(e, v[j][i], acc[h][i] * corr);
                        m[h] = mn;
                    }
                }
            }
        }
    }
    attn_merge<EPL, NW>(acc, m, l, sm_acc, sm_m, sm_l, hg, t, h0, n_head, out, Xq, Xd);
}

#define ATTN_DEC_KERNEL(NAME, EPL, NW)                                                                                     \
    extern "C" __global__ void __launch_bounds__(32 * NW)                                                                  \
        NAME(const float* __restrict__ q, const u16* __restrict__ kc, const u16* __restrict__ vc,                      \
             const u32* __restrict__ tables, const int* __restrict__ tok_table, const int* __restrict__ tok_pos,       \
             float* __restrict__ out, int n_head, int n_head_kv, int bs, int window, float scale, int hg,              \
             i8* __restrict__ Xq, float2* __restrict__ Xd, int t0) {                                                   \
        GRID_DEP_WAIT();                                                                                                               \
        attn_dec_t<EPL, NW>(q, kc, vc, tables, tok_table, tok_pos, out, n_head, n_head_kv, bs, window, scale, hg, Xq, Xd, t0); \
    }
ATTN_DEC_KERNEL(attn_dec64, 2, 16)
ATTN_DEC_KERNEL(attn_dec128, 4, 16)
ATTN_DEC_KERNEL(attn_dec256, 8, 8)

// dst[i][:] = src[idx[i]][:] for rows of n. Grid: count; block: 128.
extern "C" __global__ void copy_rows(const float* __restrict__ src, const int* __restrict__ idx, float* __restrict__ dst, int n) {
    GRID_DEP_WAIT();
    const float* s = src + (u64)idx[blockIdx.x] * n;
    float* d = dst + (u64)blockIdx.x * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) d[i] = s[i];
}

// Y[t][r] = sum_c W[r][c] * X[t][c] for many tokens (prompts, large batches): a tiled
// product. A block computes 64 rows × 64 tokens; for each 32-wide slice of the
// columns, 64 threads decode one weight block each into shared memory (the weights are
// read once per 64 tokens), all 256 load the activations, then each thread accumulates
// a 4 × 4 tile. Grid: (ceil(rows / 64), ceil(n_tok / 64)); block: 256.
#define MMT_R 64
#define MMT_T 64
extern "C" __global__ void __launch_bounds__(256) mmt(int type, const u8* __restrict__ W, u64 row_bytes, int rows, int cols,
                                                      const float* __restrict__ X, int n_tok, int x_stride,
                                                      float* __restrict__ Y, int y_stride) {
    GRID_DEP_WAIT();
    __shared__ float ws[MMT_R][33];
    __shared__ float xs[MMT_T][33];
    const int tid = threadIdx.x;
    const int r0 = blockIdx.x * MMT_R, t0 = blockIdx.y * MMT_T;
    const int tr = (tid >> 4) * 4, tt = (tid & 15) * 4;
    float acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = 0.f;
    const int nb = cols >> 5;
    for (int b = 0; b < nb; b++) {
        if (tid < MMT_R) {
            const int r = r0 + tid;
            float w[32];
            if (r < rows) {
                deq32(type, W + (u64)r * row_bytes, nb, b, w);
            } else {
                for (int j = 0; j < 32; j++) w[j] = 0.f;
            }
            for (int j = 0; j < 32; j++) ws[tid][j] = w[j];
        }
        for (int k = tid; k < MMT_T * 32; k += 256) {
            const int t = k >> 5, j = k & 31;
            xs[t][j] = (t0 + t < n_tok) ? X[(u64)(t0 + t) * x_stride + b * 32 + j] : 0.f;
        }
        __syncthreads();
        for (int j = 0; j < 32; j++) {
            float wv[4], xv[4];
            for (int i = 0; i < 4; i++) wv[i] = ws[tr + i][j];
            for (int i = 0; i < 4; i++) xv[i] = xs[tt + i][j];
            for (int i = 0; i < 4; i++)
                for (int q = 0; q < 4; q++) acc[i][q] = fmaf(wv[i], xv[q], acc[i][q]);
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; i++) {
        const int r = r0 + tr + i;
        if (r >= rows) continue;
        for (int q = 0; q < 4; q++) {
            const int t = t0 + tt + q;
            if (t < n_tok) Y[(u64)t * y_stride + r] = acc[i][q];
        }
    }
}

// x += o (when o is set), then h = rms_norm(x) * w, for rows of n: the residual add and
// the next norm in one pass (the same arithmetic as `add` then `rms_norm`); when Xq is
// set, h also as int8 for the decode kernel (`quantize_q8`'s bytes). Grid: rows; block: 256.
// `o_scale` multiplies o first (Granite's residual multiplier; 1 elsewhere, exact).
extern "C" __global__ void add_rms_norm(float* x, const float* __restrict__ o, const float* __restrict__ w,
                                        float* __restrict__ h, int n, float eps, i8* __restrict__ Xq,
                                        float2* __restrict__ Xd, float o_scale) {
    GRID_DEP_WAIT();
    __shared__ double part[32];
    float* xr = x + (u64)blockIdx.x * n;
    const float* orow = o ? o + (u64)blockIdx.x * n : nullptr;
    float* hr = h + (u64)blockIdx.x * n;
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = xr[i];
        if (orow) {
            v = __fadd_rn(v, __fmul_rn(orow[i], o_scale));
            xr[i] = v;
        }
        s += (double)v * (double)v;
    }
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x < 32) {
        double v = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.0;
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (threadIdx.x == 0) part[0] = v;
    }
    __syncthreads();
    const float inv = (float)(1.0 / sqrt(part[0] / n + (double)eps));
    // Each warp's 32 consecutive elements are one 32-block (n is a multiple of 32 when
    // Xq is set; blockDim is a multiple of 32).
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float y = xr[i] * inv * w[i];
        hr[i] = y;
        if (Xq) q8_block(y, blockIdx.x, i >> 5, n, Xq, Xd);
    }
}

// RoPE on q and k (angles as ggml builds them: theta *= theta_scale, per pair), then
// k and v into the paged f16 cache at slot[t] (= block * bs + offset; K cache
// [n_slots][kvk], V [n_slots][kvv]). Grid: n_tok; block: 128.
// freq_scale multiplies each angle (linear RoPE scaling), mscale cos and sin (LongRoPE's
// magnitude factor), as ggml's rope_yarn without the YaRN ramp; n_rot 0: no rotation.
extern "C" __global__ void rope_kv(float* q, float* k, const float* __restrict__ v, u16* kc, u16* vc,
                                   const int* __restrict__ pos, const u32* __restrict__ slot,
                                   int n_head, int n_head_kv, int head_dim, int head_dim_v, int n_rot,
                                   float theta_scale, int neox, const float* __restrict__ freq_factors,
                                   float freq_scale, float mscale) {
    GRID_DEP_WAIT();
    // cos and sin of each pair's angle, once for all heads (n_rot <= 512); theta built
    // as the CPU does, by repeated multiplication.
    __shared__ float cs[512];
    const int half = n_rot / 2;
    const float p = (float)pos[blockIdx.x];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float theta = p;
        for (int j = 0; j < i; j++) theta *= theta_scale;
        if (freq_factors) theta /= freq_factors[i];
        theta = __fmul_rn(freq_scale, theta);
        cs[2 * i] = __fmul_rn(cosf(theta), mscale);
        cs[2 * i + 1] = __fmul_rn(sinf(theta), mscale);
    }
    __syncthreads();
    float* qrow = q + (u64)blockIdx.x * n_head * head_dim;
    float* krow = k + (u64)blockIdx.x * n_head_kv * head_dim;
    for (int kk = threadIdx.x; kk < (n_head + n_head_kv) * half; kk += blockDim.x) {
        const int hh = kk / half, i = kk % half;
        const float c = cs[2 * i], s = cs[2 * i + 1];
        float* hd = hh < n_head ? qrow + hh * head_dim : krow + (hh - n_head) * head_dim;
        const int a = neox ? i : 2 * i, bb = neox ? i + half : 2 * i + 1;
        const float x0 = hd[a], x1 = hd[bb];
        hd[a] = x0 * c - x1 * s;
        hd[bb] = x0 * s + x1 * c;
    }
    __syncthreads();
    const int kvk = n_head_kv * head_dim, kvv = n_head_kv * head_dim_v;
    const u64 sl = slot[blockIdx.x];
    for (int i = threadIdx.x; i < kvk; i += blockDim.x) kc[sl * kvk + i] = f2h(krow[i]);
    for (int i = threadIdx.x; i < kvv; i += blockDim.x) vc[sl * kvv + i] = f2h(v[(u64)blockIdx.x * kvv + i]);
}

// KV entries taken over at other positions (prompt reuse): K and V rows of slot src[t]
// go to slot dst[t] (source and destination slots never overlap), each K pair turned by
// the angle in cs (cos, sin per pair: the RoPE of the distance moved, built on the host
// as the CPU's Rope::shift_table; n_rot 0: a plain copy). Grid: positions; block: 128.
extern "C" __global__ void kv_copy(u16* kc, u16* vc, const u32* __restrict__ src, const u32* __restrict__ dst,
                                   const float* __restrict__ cs, int n_head_kv, int head_dim, int head_dim_v,
                                   int n_rot, int neox) {
    GRID_DEP_WAIT();
    const int kvk = n_head_kv * head_dim, kvv = n_head_kv * head_dim_v, half = n_rot / 2;
    const u64 s = src[blockIdx.x], d = dst[blockIdx.x];
    const u16* ks = kc + s * kvk;
    for (int i = threadIdx.x; i < kvk; i += blockDim.x) {
        const int hh = i / head_dim, j = i % head_dim;
        float x = h2f(ks[i]);
        if (j < n_rot) {
            int pi, other;
            bool first;
            if (neox) {
                first = j < half;
                pi = first ? j : j - half;
                other = first ? j + half : j - half;
            } else {
                first = (j & 1) == 0;
                pi = j / 2;
                other = first ? j + 1 : j - 1;
            }
            const float y = h2f(ks[hh * head_dim + other]);
            const float c = cs[2 * pi], sn = cs[2 * pi + 1];
            x = first ? x * c - y * sn : y * sn + x * c;
        }
        kc[d * kvk + i] = f2h(x);
    }
    for (int i = threadIdx.x; i < kvv; i += blockDim.x) vc[d * kvv + i] = vc[s * kvv + i];
}

// lse[r] = log Σ_i exp(x[r][i]) for rows of n, as the CPU's `log_sum_exp` computes it
// (max first, then the sum of exp(x - max) in double; here each exp in f32, within an
// ulp of the CPU's f64 one), so the sampler's log-probabilities need no pass over the
// vocabulary on the host. With `am`, also each row's greedy pick: am[2r] the first index
// of the maximum (the host's `argmax`), am[2r + 1] the maximum's bits, so a step whose
// rows are all greedy copies back 12 bytes a row instead of the logits.
// Grid: rows; block: 1024.
extern "C" __global__ void row_lse(const float* __restrict__ x, int n, float* __restrict__ lse, u32* __restrict__ am) {
    GRID_DEP_WAIT();
    __shared__ float fm[32];
    __shared__ double part[32];
    __shared__ int fi[32];
    const float* r = x + (u64)blockIdx.x * n;
    float m = NEG_INF;
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, r[i]);
    m = warp_max(m);
    if ((threadIdx.x & 31) == 0) fm[threadIdx.x >> 5] = m;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x >> 5) ? fm[threadIdx.x] : NEG_INF;
        v = warp_max(v);
        if (threadIdx.x == 0) fm[0] = v;
    }
    __syncthreads();
    m = fm[0];
    double s = 0.0;
    int first = n;  // the first index holding the maximum (the host's argmax)
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = r[i];
        s += (double)expf(v - m);
        if (v == m && i < first) first = i;
    }
    for (int off = 16; off > 0; off >>= 1) {
        s += __shfl_xor_sync(0xffffffffu, s, off);
        first = min(first, __shfl_xor_sync(0xffffffffu, first, off));
    }
    if ((threadIdx.x & 31) == 0) {
        part[threadIdx.x >> 5] = s;
        fi[threadIdx.x >> 5] = first;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double v = 0.0;
        int f = n;
        for (int w = 0; w < (int)(blockDim.x >> 5); w++) {
            v += part[w];
            f = min(f, fi[w]);
        }
        lse[blockIdx.x] = m + (float)log(v);
        // A row of -inf (or NaN) has no strictly larger entry: the host's argmax says 0.
        if (am) {
            am[2 * blockIdx.x] = (m == NEG_INF || f >= n) ? 0u : (u32)f;
            am[2 * blockIdx.x + 1] = __float_as_uint(m);
        }
    }
}
