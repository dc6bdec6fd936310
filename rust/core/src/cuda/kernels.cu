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

// Units per row: a 32-block for the 32-block formats, 16 bytes of quants (two half
// sub-blocks) for the K-quants; either way 32 weights and `cols / 32` units.
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
        // Unit u: super-block u / 8; k = u % 8 names sub-blocks 2p, 2p + 1 (p = k / 2)
        // and their elements 16h..16h+15 (h = k % 2): low nibbles → 2p, high → 2p + 1.
        const int sb = u >> 3, k = u & 7, p = k >> 1, h = k & 1;
        const u8* blk = row + sb * (T == T_Q4_K ? 144 : 176);
        const uint4 v = __ldg((const uint4*)(blk + (T == T_Q4_K ? 16 : 48) + 32 * p + 16 * h));
        const u32 vi[4] = {v.x, v.y, v.z, v.w};
        uint4 hv;
        hv.x = hv.y = hv.z = hv.w = 0;
        if (T == T_Q5_K) hv = __ldg((const uint4*)(blk + 16 + 16 * h));
        const u32 hi4[4] = {hv.x, hv.y, hv.z, hv.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            u32 lo = vi[i] & M, hi = (vi[i] >> 4) & M;
            if (T == T_Q5_K) {
                lo |= ((hi4[i] >> (2 * p)) << 4) & 0x10101010u;
                hi |= ((hi4[i] >> (2 * p + 1)) << 4) & 0x10101010u;
            }
            w.q[i] = (int)lo;
            w.q[4 + i] = (int)hi;
        }
        const u32 dd = __ldg((const u32*)blk);
        const float d = h2f((u16)dd), dmin = h2f((u16)(dd >> 16));
        int sc0, m0, sc1, m1;
        scale_min_k4(2 * p, blk + 4, &sc0, &m0);
        scale_min_k4(2 * p + 1, blk + 4, &sc1, &m1);
        w.fa = d * (float)sc0;
        w.fb = d * (float)sc1;
        // The mins take the whole 32-block sums, so only the first half carries them.
        w.ma = h ? 0.f : -dmin * (float)m0;
        w.mb = h ? 0.f : -dmin * (float)m1;
        const int a0 = sb * 8 + 2 * p;
        w.xa = a0 * 32 + 16 * h;
        w.xb = (a0 + 1) * 32 + 16 * h;
        w.da = a0;
        w.db = a0 + 1;
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
#define ONE_BLOCK(T) (T == T_Q4_0 || T == T_Q4_1 || T == T_Q5_0 || T == T_Q5_1 || T == T_Q8_0)

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

// A unit's partial from its two exact integer half sums and the token's block scales:
// the one float formula of both int8 kernels (`mmvq`, `mmq`). The 32-block formats
// have one scale and one activation block for both halves: their sum goes whole.
template <int T>
__device__ __forceinline__ float unit_combine(const Unit& w, float2 da, float2 db, int sa, int sb) {
    if (T == T_Q4_0 || T == T_Q5_0 || T == T_Q8_0) return __fmul_rn(__fmul_rn(w.fa, da.x), (float)(sa + sb));
    if (T == T_Q4_1 || T == T_Q5_1) return __fmaf_rn(w.ma, da.y, __fmul_rn(__fmul_rn(w.fa, da.x), (float)(sa + sb)));
    float r = __fmul_rn(__fmul_rn(w.fa, da.x), (float)sa);
    r = __fmaf_rn(__fmul_rn(w.fb, db.x), (float)sb, r);
    r = __fmaf_rn(w.ma, da.y, r);
    return __fmaf_rn(w.mb, db.y, r);
}

// The unit's partial against one token's activations.
template <int T>
__device__ __forceinline__ float unit_dot(const Unit& w, const Act& x) {
    int sa = dp4a(w.q[0], x.a.x, 0);
    sa = dp4a(w.q[1], x.a.y, sa);
    sa = dp4a(w.q[2], x.a.z, sa);
    sa = dp4a(w.q[3], x.a.w, sa);
    int sb = dp4a(w.q[4], x.b.x, 0);
    sb = dp4a(w.q[5], x.b.y, sb);
    sb = dp4a(w.q[6], x.b.z, sb);
    sb = dp4a(w.q[7], x.b.w, sb);
    return unit_combine<T>(w, x.da, x.db, sa, sb);
}

// Y[t][r] = Σ_c W[r][c] X[t][c] for the tokens t < n_tok of token group blockIdx.y (NT
// tokens a group), X given as int8 (Xq, Xd from quantize_q8). A warp takes R rows;
// lane l their units l, l + 32, ...: it loads the R rows' weights of a unit (R loads in
// flight), then each token's activations once for all R rows. A (row, token)'s sum is
// fixed by the units alone: slice l (lane l) adds units l, l + 32, ... in order, then
// the 32 slices are added pairwise in order. Every variant (NT, R, n_tok) and `mmq`
// keep that order, so a token gets the same bits from any of them.
// Block: 128 (4 warps, 4R rows); grid: (ceil(rows / 4R), ceil(n_tok / NT)).
template <int T, int NT, int R>
__device__ __forceinline__ void mmvq_t(const u8* __restrict__ W, u64 row_bytes, int rows, int cols,
                                       const i8* __restrict__ Xq, const float2* __restrict__ Xd, int n_tok,
                                       float* __restrict__ Y, int y_stride, int blk) {
    const int lane = threadIdx.x & 31;
    const int r0 = (blk * 4 + (threadIdx.x >> 5)) * R;
    if (r0 >= rows) return;
    const int t0 = blockIdx.y * NT;
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
    for (int u = lane; u < nb; u += 32) {
        Unit w[R];
#pragma unroll
        for (int i = 0; i < R; i++) load_unit<T>(rp[i], nb, u, w[i]);
#pragma unroll
        for (int t = 0; t < NT; t++) {
            if (t < nt) {
                Act x;
                load_act<T>(w[0], xq + (u64)t * cols, xd + (u64)t * nb, x);
#pragma unroll
                for (int i = 0; i < R; i++) acc[i][t] = __fadd_rn(acc[i][t], unit_dot<T>(w[i], x));
            }
        }
    }
#pragma unroll
    for (int i = 0; i < R; i++) {
#pragma unroll
        for (int t = 0; t < NT; t++) {
            if (t < nt) {
                // Pairwise over the lanes in order ((0 + 1) + (2 + 3)) + ...: lane 0 ends
                // with the sum, in the order `mmq` reproduces.
                float s = acc[i][t];
                for (int o = 1; o < 32; o <<= 1) s = __fadd_rn(s, __shfl_down_sync(0xffffffffu, s, o));
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
                                          const float2* __restrict__ Xd, int n_tok, float* Y, int ys, int blk) {
    switch (type) {
    case T_Q4_0: mmvq_t<T_Q4_0, NT, R>(W, rb, rows, cols, Xq, Xd, n_tok, Y, ys, blk); break;
    case T_Q4_1: mmvq_t<T_Q4_1, NT, R>(W, rb, rows, cols, Xq, Xd, n_tok, Y, ys, blk); break;
    case T_Q5_0: mmvq_t<T_Q5_0, NT, R>(W, rb, rows, cols, Xq, Xd, n_tok, Y, ys, blk); break;
    case T_Q5_1: mmvq_t<T_Q5_1, NT, R>(W, rb, rows, cols, Xq, Xd, n_tok, Y, ys, blk); break;
    case T_Q8_0: mmvq_t<T_Q8_0, NT, R>(W, rb, rows, cols, Xq, Xd, n_tok, Y, ys, blk); break;
    case T_Q4_K: mmvq_t<T_Q4_K, NT, R>(W, rb, rows, cols, Xq, Xd, n_tok, Y, ys, blk); break;
    case T_Q5_K: mmvq_t<T_Q5_K, NT, R>(W, rb, rows, cols, Xq, Xd, n_tok, Y, ys, blk); break;
    case T_Q6_K: mmvq_t<T_Q6_K, NT, R>(W, rb, rows, cols, Xq, Xd, n_tok, Y, ys, blk); break;
    }
}

#define MMVQ_KERNEL(NAME, NT, R)                                                                                      \
    extern "C" __global__ void __launch_bounds__(128, 4)                                                              \
        NAME(int cols, const i8* __restrict__ Xq, const float2* __restrict__ Xd, int n_tok,                            \
             int t0, const u8* W0, u64 rb0, int rows0, float* Y0, int ys0,                                             \
             int t1, const u8* W1, u64 rb1, int rows1, float* Y1, int ys1,                                             \
             int t2, const u8* W2, u64 rb2, int rows2, float* Y2, int ys2) {                                           \
        const int nb0 = (rows0 + 4 * R - 1) / (4 * R), nb1 = (rows1 + 4 * R - 1) / (4 * R);                           \
        const int b = blockIdx.x;                                                                                      \
        if (b < nb0) mmvq_pick<NT, R>(t0, W0, rb0, rows0, cols, Xq, Xd, n_tok, Y0, ys0, b);                            \
        else if (b < nb0 + nb1) mmvq_pick<NT, R>(t1, W1, rb1, rows1, cols, Xq, Xd, n_tok, Y1, ys1, b - nb0);          \
        else mmvq_pick<NT, R>(t2, W2, rb2, rows2, cols, Xq, Xd, n_tok, Y2, ys2, b - nb0 - nb1);                        \
    }
MMVQ_KERNEL(mmvq1, 1, 2)
MMVQ_KERNEL(mmvq2, 2, 2)
MMVQ_KERNEL(mmvq4, 4, 4)
MMVQ_KERNEL(mmvq8, 8, 2)

// ---- int8 tensor-core kernel -----------------------------------------------------------

// C = A·B for one 16×16 s8 tile of weights (a0: row g, a1: row g + 8; k = 4·(lane % 4)..)
// and a 16×8 s8 tile of activations (b0: k = 4·(lane % 4).., token g), exact int32:
// c0, c1 row g, tokens 2·(lane % 4) + 0, 1; c2, c3 row g + 8 (g = lane / 4).
__device__ __forceinline__ void mma_s8_16816(int a0, int a1, int b0, int* c) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%7, %8, %9, %10};"
                 : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
                 : "r"(a0), "r"(a1), "r"(b0), "r"(0), "r"(0), "r"(0), "r"(0));
}

// q[k] for k < 4 without indexing a register array by a lane-dependent value (which
// would put it in local memory).
__device__ __forceinline__ int pick4(const int* q, int k) {
    return k == 0 ? q[0] : k == 1 ? q[1] : k == 2 ? q[2] : q[3];
}

// Y[t][r] = Σ_c W[r][c] X[t][c] on the tensor cores, for a tile of 16 rows × 8·MT
// tokens a block (int8 activations as for `mmvq`). Each unit of 32 weights is two
// m16n8k16 products per 8 tokens (its halves A and B: exact integer sums, as mmvq's
// dp4a gives), combined with the scales by `unit_combine`; a unit's weights are
// unpacked once for all MT token tiles. Warp w keeps slices 4w..4w+3 (slice s: units s,
// s + 32, ..., added in order), adds its 4 slices pairwise, and the 8 warps' sums are
// added pairwise: exactly mmvq's order, so a token gets the same bits from either
// kernel, whatever MT, and the choice between them never changes a result.
// Block: 256; grid: (ceil(rows / 16), ceil(n_tok / 8·MT)); dynamic shared memory:
// 8 × 16 × 8·MT floats.
template <int T, int MT>
__device__ __forceinline__ void mmq_t(const u8* __restrict__ W, u64 row_bytes, int rows, int cols,
                                      const i8* __restrict__ Xq, const float2* __restrict__ Xd, int n_tok,
                                      float* __restrict__ Y, int y_stride) {
    extern __shared__ float part[];  // [warp][row 16][token 8·MT]
    const int NTT = 8 * MT;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int r0 = blockIdx.x * 16, tok0 = blockIdx.y * NTT;
    const int nb = cols >> 5;
    const u8* rowA = W + (u64)min(r0 + g, rows - 1) * row_bytes;
    const u8* rowB = W + (u64)min(r0 + g + 8, rows - 1) * row_bytes;
    float acc[4][MT][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int m = 0; m < MT; m++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[i][m][c] = 0.f;
    for (int u0 = 4 * warp; u0 < nb; u0 += 32) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int u = u0 + i;
            if (u < nb) {
                Unit wa, wb;
                load_unit<T>(rowA, nb, u, wa);
                load_unit<T>(rowB, nb, u, wb);
                const int aA0 = pick4(wa.q, tq), aA1 = pick4(wb.q, tq);
                const int aB0 = pick4(wa.q + 4, tq), aB1 = pick4(wb.q + 4, tq);
#pragma unroll
                for (int m = 0; m < MT; m++) {
                    const int tb = tok0 + 8 * m + g;  // this lane feeds token tb to B
                    const i8* xqB = Xq + (u64)min(tb, n_tok - 1) * cols;
                    const int bA = tb < n_tok ? __ldg((const int*)(xqB + wa.xa) + tq) : 0;
                    const int bB = tb < n_tok ? __ldg((const int*)(xqB + wa.xb) + tq) : 0;
                    int cA[4], cB[4];
                    mma_s8_16816(aA0, aA1, bA, cA);
                    mma_s8_16816(aB0, aB1, bB, cB);
                    // This lane's C columns: tokens tok0 + 8m + 2tq + {0, 1}.
                    const float2* xd0 = Xd + (u64)min(tok0 + 8 * m + 2 * tq, n_tok - 1) * nb;
                    const float2* xd1 = Xd + (u64)min(tok0 + 8 * m + 2 * tq + 1, n_tok - 1) * nb;
                    const float2 da0 = __ldg(xd0 + wa.da), db0 = ONE_BLOCK(T) ? da0 : __ldg(xd0 + wa.db);
                    const float2 da1 = __ldg(xd1 + wa.da), db1 = ONE_BLOCK(T) ? da1 : __ldg(xd1 + wa.db);
                    acc[i][m][0] = __fadd_rn(acc[i][m][0], unit_combine<T>(wa, da0, db0, cA[0], cB[0]));
                    acc[i][m][1] = __fadd_rn(acc[i][m][1], unit_combine<T>(wa, da1, db1, cA[1], cB[1]));
                    acc[i][m][2] = __fadd_rn(acc[i][m][2], unit_combine<T>(wb, da0, db0, cA[2], cB[2]));
                    acc[i][m][3] = __fadd_rn(acc[i][m][3], unit_combine<T>(wb, da1, db1, cA[3], cB[3]));
                }
            }
        }
    }
    float* pw = part + warp * 16 * NTT;
#pragma unroll
    for (int m = 0; m < MT; m++) {
#pragma unroll
        for (int c = 0; c < 4; c++) {
            const float v = __fadd_rn(__fadd_rn(acc[0][m][c], acc[1][m][c]), __fadd_rn(acc[2][m][c], acc[3][m][c]));
            pw[(g + 8 * (c >> 1)) * NTT + 8 * m + 2 * tq + (c & 1)] = v;
        }
    }
    __syncthreads();
    for (int k = threadIdx.x; k < 16 * NTT; k += blockDim.x) {
        const int rr = k / NTT, tt = k % NTT;
        float w8[8];
#pragma unroll
        for (int w = 0; w < 8; w++) w8[w] = part[w * 16 * NTT + k];
        const float v = __fadd_rn(__fadd_rn(__fadd_rn(w8[0], w8[1]), __fadd_rn(w8[2], w8[3])),
                                  __fadd_rn(__fadd_rn(w8[4], w8[5]), __fadd_rn(w8[6], w8[7])));
        if (r0 + rr < rows && tok0 + tt < n_tok) Y[(u64)(tok0 + tt) * y_stride + r0 + rr] = v;
    }
}

#define MMQ_KERNEL(NAME, MT)                                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                                                 \
        NAME(int type, const u8* __restrict__ W, u64 row_bytes, int rows, int cols, const i8* __restrict__ Xq,        \
             const float2* __restrict__ Xd, int n_tok, float* __restrict__ Y, int y_stride) {                         \
        switch (type) {                                                                                               \
        case T_Q4_0: mmq_t<T_Q4_0, MT>(W, row_bytes, rows, cols, Xq, Xd, n_tok, Y, y_stride); break;                \
        case T_Q4_1: mmq_t<T_Q4_1, MT>(W, row_bytes, rows, cols, Xq, Xd, n_tok, Y, y_stride); break;                \
        case T_Q5_0: mmq_t<T_Q5_0, MT>(W, row_bytes, rows, cols, Xq, Xd, n_tok, Y, y_stride); break;                \
        case T_Q5_1: mmq_t<T_Q5_1, MT>(W, row_bytes, rows, cols, Xq, Xd, n_tok, Y, y_stride); break;                \
        case T_Q8_0: mmq_t<T_Q8_0, MT>(W, row_bytes, rows, cols, Xq, Xd, n_tok, Y, y_stride); break;                \
        case T_Q4_K: mmq_t<T_Q4_K, MT>(W, row_bytes, rows, cols, Xq, Xd, n_tok, Y, y_stride); break;                \
        case T_Q5_K: mmq_t<T_Q5_K, MT>(W, row_bytes, rows, cols, Xq, Xd, n_tok, Y, y_stride); break;                \
        case T_Q6_K: mmq_t<T_Q6_K, MT>(W, row_bytes, rows, cols, Xq, Xd, n_tok, Y, y_stride); break;                \
        }                                                                                                             \
    }
// MT token tiles of 8 a block: model.rs picks by the number of tokens.
MMQ_KERNEL(mmq1, 1)
MMQ_KERNEL(mmq2, 2)
MMQ_KERNEL(mmq4, 4)

// out[i][:] = scale * W[ids[i]][:] (token embeddings). Grid: n; block: 128.
extern "C" __global__ void get_rows(int type, const u8* __restrict__ W, u64 row_bytes, const u32* __restrict__ ids,
                                    int cols, float scale, float* __restrict__ out) {
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

// x += y (n elements). Grid: ceil(n / 256); block 256.
extern "C" __global__ void add(float* x, const float* __restrict__ y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

// x[r][c] += b[c] for rows of width n; `total` = rows * n.
extern "C" __global__ void add_bias(float* x, const float* __restrict__ b, int n, int total) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < total) x[i] += b[i % n];
}

// g = silu(g) * u, or gelu(g) * u (tanh form), over n elements; when Xq is set, also
// g as int8 for the decode kernel (rows of `cols`, a multiple of 32: a warp's 32
// elements are one block of one row).
extern "C" __global__ void glu(float* g, const float* __restrict__ u, int n, int gelu, int cols, i8* __restrict__ Xq,
                               float2* __restrict__ Xd) {
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
        for (int w = 0; w < ATT_WARPS; w++) mx = fmaxf(mx, sm_m[w][h]);
        float L = 0.f, o = 0.f;
        for (int w = 0; w < ATT_WARPS; w++) {
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

#define ATTN_TOK_KERNEL(NAME, EPL)                                                                                     \
    extern "C" __global__ void __launch_bounds__(256)                                                                  \
        NAME(const float* __restrict__ q, const u16* __restrict__ kc, const u16* __restrict__ vc,                      \
             const u32* __restrict__ tables, const int* __restrict__ tok_table, const int* __restrict__ tok_pos,       \
             float* __restrict__ out, int n_head, int n_head_kv, int bs, int window, float scale, int hg,              \
             i8* __restrict__ Xq, float2* __restrict__ Xd, int t0) {                                                   \
        attn_tok_t<EPL>(q, kc, vc, tables, tok_table, tok_pos, out, n_head, n_head_kv, bs, window, scale, hg, Xq, Xd, t0); \
    }
ATTN_TOK_KERNEL(attn_tok64, 2)
ATTN_TOK_KERNEL(attn_tok128, 4)
ATTN_TOK_KERNEL(attn_tok256, 8)

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

#define ATTN_DEC_KERNEL(NAME, EPL, NW)                                                                                     \
    extern "C" __global__ void __launch_bounds__(32 * NW)                                                                  \
        NAME(const float* __restrict__ q, const u16* __restrict__ kc, const u16* __restrict__ vc,                      \
             const u32* __restrict__ tables, const int* __restrict__ tok_table, const int* __restrict__ tok_pos,       \
             float* __restrict__ out, int n_head, int n_head_kv, int bs, int window, float scale, int hg,              \
             i8* __restrict__ Xq, float2* __restrict__ Xd, int t0) {                                                   \
        attn_dec_t<EPL, NW>(q, kc, vc, tables, tok_table, tok_pos, out, n_head, n_head_kv, bs, window, scale, hg, Xq, Xd, t0); \
    }
ATTN_DEC_KERNEL(attn_dec64, 2, 16)
ATTN_DEC_KERNEL(attn_dec128, 4, 16)
ATTN_DEC_KERNEL(attn_dec256, 8, 8)

// dst[i][:] = src[idx[i]][:] for rows of n. Grid: count; block: 128.
extern "C" __global__ void copy_rows(const float* __restrict__ src, const int* __restrict__ idx, float* __restrict__ dst, int n) {
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
extern "C" __global__ void add_rms_norm(float* x, const float* __restrict__ o, const float* __restrict__ w,
                                        float* __restrict__ h, int n, float eps, i8* __restrict__ Xq,
                                        float2* __restrict__ Xd) {
    __shared__ double part[32];
    float* xr = x + (u64)blockIdx.x * n;
    const float* orow = o ? o + (u64)blockIdx.x * n : nullptr;
    float* hr = h + (u64)blockIdx.x * n;
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = xr[i];
        if (orow) {
            v += orow[i];
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
extern "C" __global__ void rope_kv(float* q, float* k, const float* __restrict__ v, u16* kc, u16* vc,
                                   const int* __restrict__ pos, const u32* __restrict__ slot,
                                   int n_head, int n_head_kv, int head_dim, int head_dim_v, int n_rot,
                                   float theta_scale, int neox, const float* __restrict__ freq_factors) {
    // cos and sin of each pair's angle, once for all heads (n_rot <= 512); theta built
    // as the CPU does, by repeated multiplication.
    __shared__ float cs[512];
    const int half = n_rot / 2;
    const float p = (float)pos[blockIdx.x];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float theta = p;
        for (int j = 0; j < i; j++) theta *= theta_scale;
        if (freq_factors) theta /= freq_factors[i];
        cs[2 * i] = cosf(theta);
        cs[2 * i + 1] = sinf(theta);
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

// lse[r] = log Σ_i exp(x[r][i]) for rows of n, as the CPU's `log_sum_exp` computes it
// (max first, then the sum of exp(x - max) in double; here each exp in f32, within an
// ulp of the CPU's f64 one), so the sampler's log-probabilities need no pass over the
// vocabulary on the host. Grid: rows; block: 1024.
extern "C" __global__ void row_lse(const float* __restrict__ x, int n, float* __restrict__ lse) {
    __shared__ float fm[32];
    __shared__ double part[32];
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
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += (double)expf(r[i] - m);
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double v = 0.0;
        for (int w = 0; w < (int)(blockDim.x >> 5); w++) v += part[w];
        lse[blockIdx.x] = m + (float)log(v);
    }
}
