// edgelm's CUDA kernels, compiled at run time by NVRTC for the GPU found (see mod.rs).
// No includes: NVRTC ships none of the toolkit's headers. f16 conversions are PTX.
//
// Weights stay in their GGUF block formats (ggml's layouts, ggml's names); each kernel
// takes the format as `type` (GgmlType's number) and a row's byte length, and decodes
// 32 weights at a time with `deq32`. Activations are f32; the KV cache is f16.
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

// The 32 weights of block `b` (32-element block index within the row) as floats.
// K-quants: super-block b / 8, sub-block b % 8.
__device__ __forceinline__ void deq32(int type, const u8* row, int b, float* y) {
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
        const u8* p = row + b * 18;
        const float d = h2f(ld16(p));
        const u8* qs = p + 2;
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)((qs[j] & 15) - 8);
            y[j + 16] = d * (float)((qs[j] >> 4) - 8);
        }
    } break;
    case T_Q4_1: {
        const u8* p = row + b * 20;
        const float d = h2f(ld16(p)), m = h2f(ld16(p + 2));
        const u8* qs = p + 4;
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)(qs[j] & 15) + m;
            y[j + 16] = d * (float)(qs[j] >> 4) + m;
        }
    } break;
    case T_Q5_0: {
        const u8* p = row + b * 22;
        const float d = h2f(ld16(p));
        const u32 qh = ld32(p + 2);
        const u8* qs = p + 6;
        for (int j = 0; j < 16; j++) {
            const int x0 = (qs[j] & 15) | (((qh >> j) << 4) & 0x10);
            const int x1 = (qs[j] >> 4) | ((qh >> (j + 12)) & 0x10);
            y[j] = d * (float)(x0 - 16);
            y[j + 16] = d * (float)(x1 - 16);
        }
    } break;
    case T_Q5_1: {
        const u8* p = row + b * 24;
        const float d = h2f(ld16(p)), m = h2f(ld16(p + 2));
        const u32 qh = ld32(p + 4);
        const u8* qs = p + 8;
        for (int j = 0; j < 16; j++) {
            const int x0 = (qs[j] & 15) | (((qh >> j) << 4) & 0x10);
            const int x1 = (qs[j] >> 4) | ((qh >> (j + 12)) & 0x10);
            y[j] = d * (float)x0 + m;
            y[j + 16] = d * (float)x1 + m;
        }
    } break;
    case T_Q8_0: {
        const u8* p = row + b * 34;
        const float d = h2f(ld16(p));
        const i8* qs = (const i8*)(p + 2);
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
        const u8* p = row + (b >> 3) * 210;
        const u8* ql = p + 64 * n + ((r & 1) ? 32 : 0);
        const u8* qh = p + 128 + 32 * n;
        const i8* sc = (const i8*)(p + 192) + 8 * n + 2 * r;
        const float d = h2f(ld16(p + 208));
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
            deq32(type, row, c0 + lane, w);
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

// out[i][:] = scale * W[ids[i]][:] (token embeddings). Grid: n; block: 128.
extern "C" __global__ void get_rows(int type, const u8* __restrict__ W, u64 row_bytes, const u32* __restrict__ ids,
                                    int cols, float scale, float* __restrict__ out) {
    const u8* row = W + (u64)ids[blockIdx.x] * row_bytes;
    float w[32];
    for (int b = threadIdx.x; b < (cols >> 5); b += blockDim.x) {
        deq32(type, row, b, w);
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

// g = silu(g) * u, or gelu(g) * u (tanh form), over n elements.
extern "C" __global__ void glu(float* g, const float* __restrict__ u, int n, int gelu) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float x = g[i];
    float a;
    if (gelu) {
        a = 0.5f * x * (1.0f + tanhf(0.7978845608f * x * (1.0f + 0.044715f * x * x)));
    } else {
        a = x / (1.0f + expf(-x));
    }
    g[i] = a * u[i];
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
                deq32(type, W + (u64)r * row_bytes, b, w);
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

// x += o, then h = rms_norm(x) * w, for rows of n: the residual add and the next
// norm in one pass (the same arithmetic as `add` then `rms_norm`). Grid: rows; block: 256.
extern "C" __global__ void add_rms_norm(float* x, const float* __restrict__ o, const float* __restrict__ w,
                                        float* __restrict__ h, int n, float eps) {
    __shared__ double part[32];
    float* xr = x + (u64)blockIdx.x * n;
    const float* orow = o + (u64)blockIdx.x * n;
    float* hr = h + (u64)blockIdx.x * n;
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = xr[i] + orow[i];
        xr[i] = v;
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
    for (int i = threadIdx.x; i < n; i += blockDim.x) hr[i] = xr[i] * inv * w[i];
}

// RoPE on q and k (angles as ggml builds them: theta *= theta_scale, per pair), then
// k and v into the paged f16 cache at slot[t] (= block * bs + offset; K cache
// [n_slots][kvk], V [n_slots][kvv]). Grid: n_tok; block: 128.
extern "C" __global__ void rope_kv(float* q, float* k, const float* __restrict__ v, u16* kc, u16* vc,
                                   const int* __restrict__ pos, const u32* __restrict__ slot,
                                   int n_head, int n_head_kv, int head_dim, int head_dim_v, int n_rot,
                                   float theta_scale, int neox, const float* __restrict__ freq_factors) {
    const int half = n_rot / 2;
    const float p = (float)pos[blockIdx.x];
    float* qrow = q + (u64)blockIdx.x * n_head * head_dim;
    float* krow = k + (u64)blockIdx.x * n_head_kv * head_dim;
    for (int kk = threadIdx.x; kk < (n_head + n_head_kv) * half; kk += blockDim.x) {
        const int hh = kk / half, i = kk % half;
        float theta = p;
        for (int j = 0; j < i; j++) theta *= theta_scale;
        if (freq_factors) theta /= freq_factors[i];
        const float c = cosf(theta), s = sinf(theta);
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
