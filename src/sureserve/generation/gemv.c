/* A matrix-vector product for decode steps: y = x W^T (+ b), for a few rows of x, and a
 * whole decode step of a Llama-family model built on it.
 *
 * Why it exists: at one running sequence a decode step is bound by how fast the weights
 * stream from memory, and torch's CPU GEMM for M = 1..8 reads them at ~11 GB/s on an AMD
 * EPYC where this loop reads ~25 GB/s (BENCHMARKS.md "Generation: a GEMV kernel for the
 * decode step"). It is compiled on the machine that runs it (-march=native, see
 * generation/native.py), used only where it measured faster, and checked against
 * F.linear in the tests.
 *
 * Layout: W is nn.Linear's weight, row-major (N, K), contiguous, float32 or int8 with one
 * float32 scale per row (int8 weight-only quantization: y = scale * (x . q)); x is (M, K),
 * y is (M, N), both contiguous float32. Each thread takes a contiguous run of R-row blocks
 * of W (one stream of memory per thread). Up to a few rows of x (F_ROWS, Q_ROWS) read W
 * one row after another, front to back (the stream the prefetchers follow best); more rows
 * use register tiles of MT_MAX rows of x by 4 rows of W (each loaded vector used several
 * times). int8 weights are widened to float32 in registers: a quarter of the bytes to
 * stream, the arithmetic in float32 (activations are not rounded). A float32 layer may
 * also carry its weight in panels (see "Panels" below: the faster layout from a few rows
 * up, measured per shape), which products of at least its `pmin` rows read instead.
 *
 * Beside the plain product, fused entry points cover a Llama decoder layer (RMSNorm + q/k/v
 * + rotary; the MLP block; each taking its layers as sureserve_linear, panels included;
 * the output projection with its residual is sureserve_linear_apply), and ``sureserve_decode`` runs
 * every layer of one decode step (attention over the KV cache included) in one call and
 * one parallel region, so that the operations between the matmuls cost no Python call.
 * The threads are OpenMP's: the same libgomp torch loaded, so one pool, sized by
 * torch.set_num_threads. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define R 16
#define VW 16
typedef __m512 vec;
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
static inline void vstore(float *p, vec v) { _mm512_storeu_ps(p, v); }
static inline vec vset1(float a) { return _mm512_set1_ps(a); }
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
static inline vec vload_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#elif defined(__AVX2__) && defined(__FMA__)
#define R 8
#define VW 8
typedef __m256 vec;
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vload(const float *p) { return _mm256_loadu_ps(p); }
static inline void vstore(float *p, vec v) { _mm256_storeu_ps(p, v); }
static inline vec vset1(float a) { return _mm256_set1_ps(a); }
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vec v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}
static inline vec vload_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
#else
#define R 4
#endif

/* which instruction set this build uses (for /info) */
const char *sureserve_gemv_isa(void) {
#if defined(__AVX512F__)
    return "avx512";
#elif defined(VW)
    return "avx2";
#else
    return "scalar";
#endif
}

/* A linear layer as the kernel reads it (native.py fills these with ctypes). */
typedef struct {
    const void *w;      /* (n, k) row-major: float32, or int8 when scale is set */
    const float *scale; /* (n,): int8 weights' per-row scale; NULL: float32 weights */
    const float *bias;  /* (n,) or NULL */
    int n, k;
    const float *p;     /* float32 weights only: the same weights in panels
                         * (sureserve_pack_panels), or NULL */
    int pmin;           /* products of at least this many rows read the panels; int8
                         * weights (p NULL): from this many rows (0: never), each panel's
                         * columns are widened into float32 panels as the product goes
                         * (int8_panel_body) */
} sureserve_linear;

/* W's element i (an element offset: the weight is float32 or int8, Q says which; Q is a
 * constant wherever these are inlined, so each kind gets its own loop) */
static inline __attribute__((always_inline)) float wget(const void *w, size_t i, int Q) {
    return Q ? (float)((const int8_t *)w)[i] : ((const float *)w)[i];
}
#if defined(VW)
static inline __attribute__((always_inline)) vec wvec(const void *w, size_t i, int Q) {
    return Q ? vload_i8((const int8_t *)w + i) : vload((const float *)w + i);
}
#endif

/* s + x[k:K] . w[w0 + k : w0 + K]: the scalar end of a row, past the last whole vector */
static inline __attribute__((always_inline)) float dot_from(const float *x, const void *w,
                                                            size_t w0, int k, int K, float s,
                                                            int Q) {
    for (; k < K; k++) s += x[k] * wget(w, w0 + k, Q);
    return s;
}

/* out[m * NT + n] = x[m] . w[n] for m < MT, n < NT: MT rows of x against NT rows of W
 * (from element offset w0), MT x NT accumulators in registers (each loaded vector of W
 * serves MT rows of x, each vector of x NT rows of W). Inlined with constant MT, NT and Q,
 * so the loops unroll. */
static inline __attribute__((always_inline)) void tile(const float *x, int ldx,
                                                       const void *w, size_t w0, int K,
                                                       int MT, int NT, int Q, float *out) {
    int k = 0;
    float s[16];
#if defined(VW)
    vec acc[16];
    for (int i = 0; i < MT * NT; i++) acc[i] = vzero();
    for (; k + VW <= K; k += VW) {
        vec xv[4];
        for (int m = 0; m < MT; m++) xv[m] = vload(x + (size_t)m * ldx + k);
        for (int n = 0; n < NT; n++) {
            vec wv = wvec(w, w0 + (size_t)n * K + k, Q);
            for (int m = 0; m < MT; m++) acc[m * NT + n] = vfma(wv, xv[m], acc[m * NT + n]);
        }
    }
    for (int i = 0; i < MT * NT; i++) s[i] = vsum(acc[i]);
#else
    for (int i = 0; i < MT * NT; i++) s[i] = 0.0f;
#endif
    for (int m = 0; m < MT; m++)
        for (int n = 0; n < NT; n++)
            out[m * NT + n] = dot_from(x + (size_t)m * ldx, w, w0 + (size_t)n * K, k, K,
                                       s[m * NT + n], Q);
}

/* out[m] = x[m] . w (one row of W from element offset w0) for m < MT, the row read once,
 * front to back, U vectors at a time (U accumulators per row of x). This is how a few rows
 * of x read W: one row of W after another is one sequential stream per thread, which the
 * hardware prefetchers follow best. Interleaving R rows of int8, 16 bytes of each at a
 * time, streamed at ~10 GB/s where one row after another streams at ~25 GB/s; for float32
 * a whole decode step of smollm2 took 0.77-1.0x the time of 16 rows side by side at one
 * row, 0.70-0.74x at four (AMD EPYC, BENCHMARKS.md). With U = 1 the sums are added in the
 * order `tile` adds them, so float32 results do not depend on which path (or how many
 * rows) computed them. */
static inline __attribute__((always_inline)) void row_tile(const float *x, int ldx,
                                                           const void *w, size_t w0, int K,
                                                           int MT, int U, int Q, float *out) {
    int k = 0;
    float s[4];
#if defined(VW)
    vec acc[4][4];
    for (int m = 0; m < MT; m++)
        for (int u = 0; u < U; u++) acc[m][u] = vzero();
    for (; k + U * VW <= K; k += U * VW)
        for (int u = 0; u < U; u++) {
            vec wv = wvec(w, w0 + k + u * VW, Q);
            for (int m = 0; m < MT; m++)
                acc[m][u] = vfma(wv, vload(x + (size_t)m * ldx + k + u * VW), acc[m][u]);
        }
    for (; k + VW <= K; k += VW) {
        vec wv = wvec(w, w0 + k, Q);
        for (int m = 0; m < MT; m++)
            acc[m][0] = vfma(wv, vload(x + (size_t)m * ldx + k), acc[m][0]);
    }
    for (int m = 0; m < MT; m++) {
        vec t = acc[m][0];
        for (int u = 1; u < U; u++) t = vadd(t, acc[m][u]);
        s[m] = vsum(t);
    }
#else
    (void)U;
    for (int m = 0; m < MT; m++) s[m] = 0.0f;
#endif
    for (int m = 0; m < MT; m++) out[m] = dot_from(x + (size_t)m * ldx, w, w0, k, K, s[m], Q);
}

/* up to this many rows of x, int8 weights are read one row after another (row_tile);
 * with more, each loaded vector serves enough rows that the interleaved tiles are faster
 * (measured on an AMD EPYC: from ~4 rows on, for the longer rows of an MLP's down
 * projection) */
#ifndef Q_ROWS
#define Q_ROWS 2
#endif
/* the same for float32 weights (measured on an AMD EPYC: up to 1.3x the tiles' step at
 * one row, 1.4x at four, level at eight) */
#ifndef F_ROWS
#define F_ROWS 4
#endif

#if defined(__AVX512F__)
#define MT_MAX 4 /* 32 vector registers: 4 x 4 accumulators, 4 of x, 1 of W */
#else
#define MT_MAX 2 /* 16 vector registers: 2 x 4 accumulators */
#endif

/* mt rows of x (mt <= MT_MAX) against 4 rows of W from row n (or fewer: nt); out is
 * (mt, 4) */
static inline __attribute__((always_inline)) void sub_tile(const float *x, int ldx,
                                                           const void *w, int n, int K,
                                                           int mt, int nt, int Q,
                                                           float *out) {
    size_t wn = (size_t)n * K;
    if (nt == 4) {
        switch (mt) {
        case 1: tile(x, ldx, w, wn, K, 1, 4, Q, out); return;
        case 2: tile(x, ldx, w, wn, K, 2, 4, Q, out); return;
#if MT_MAX >= 4
        case 3: tile(x, ldx, w, wn, K, 3, 4, Q, out); return;
        case 4: tile(x, ldx, w, wn, K, 4, 4, Q, out); return;
#endif
        }
    }
    for (int j = 0; j < nt; j++)  /* a partial block's last rows of W */
        for (int m = 0; m < mt; m++)
            tile(x + (size_t)m * ldx, ldx, w, wn + (size_t)j * K, K, 1, 1, Q,
                 out + m * 4 + j);
}

/* y[m, n] = x[m] . w[n] (* scale[n]) + b[n] (+ res[m, n]) for the blocks of n in this
 * thread's share; x has row stride ldx, y and res ldy (res may be y: each element is read
 * before it is written, by the thread that writes it). Called inside a parallel region;
 * no barrier at its end (gemv_for adds one). */
static inline __attribute__((always_inline)) void gemv_body(
        const float *x, int ldx, const sureserve_linear *L, const float *res, float *y,
        int ldy, int M, int Q) {
    const void *w = L->w;
    const float *b = L->bias, *sc = L->scale;
    int N = L->n, K = L->k;
    int blocks = (N + R - 1) / R;
    #pragma omp for schedule(static) nowait
    for (int blk = 0; blk < blocks; blk++) {
        int n0 = blk * R, rows = N - n0 < R ? N - n0 : R;
        if (M <= (Q ? Q_ROWS : F_ROWS)) {  /* few rows: one row of W after another */
            for (int n = n0; n < n0 + rows; n++)
                for (int m0 = 0; m0 < M; m0 += MT_MAX) {
                    int mt = M - m0 < MT_MAX ? M - m0 : MT_MAX;
                    const float *xm = x + (size_t)m0 * ldx;
                    size_t wn = (size_t)n * K;
                    float out[4];
                    /* int8: several accumulators (the widening adds latency); float32:
                     * one, the order of `tile` (same results at any row count) */
                    switch (mt) {
                    case 1: row_tile(xm, ldx, w, wn, K, 1, Q ? 4 : 1, Q, out); break;
                    case 2: row_tile(xm, ldx, w, wn, K, 2, Q ? 2 : 1, Q, out); break;
#if MT_MAX >= 4
                    case 3: row_tile(xm, ldx, w, wn, K, 3, Q ? 2 : 1, Q, out); break;
                    default: row_tile(xm, ldx, w, wn, K, 4, Q ? 2 : 1, Q, out); break;
#endif
                    }
                    for (int m = 0; m < mt; m++) {
                        float *ym = y + (size_t)(m0 + m) * ldy;
                        const float *rm = res ? res + (size_t)(m0 + m) * ldy : 0;
                        ym[n] = (Q ? out[m] * sc[n] : out[m]) + (b ? b[n] : 0.0f) +
                                (rm ? rm[n] : 0.0f);
                    }
                }
            continue;
        }
        /* several rows: register tiles of MT_MAX rows of x by 4 rows of W, the block of W
         * read again from the caches for each tile of x rows */
        for (int m0 = 0; m0 < M; m0 += MT_MAX) {
            int mt = M - m0 < MT_MAX ? M - m0 : MT_MAX;
            for (int n = n0; n < n0 + rows; n += 4) {
                int nt = n0 + rows - n < 4 ? n0 + rows - n : 4;
                float out[4 * 4];
                sub_tile(x + (size_t)m0 * ldx, ldx, w, n, K, mt, nt, Q, out);
                for (int m = 0; m < mt; m++) {
                    float *ym = y + (size_t)(m0 + m) * ldy;
                    const float *rm = res ? res + (size_t)(m0 + m) * ldy : 0;
                    for (int j = 0; j < nt; j++) {
                        float o = out[m * 4 + j];
                        ym[n + j] = (Q ? o * sc[n + j] : o) + (b ? b[n + j] : 0.0f) +
                                    (rm ? rm[n + j] : 0.0f);
                    }
                }
            }
        }
    }
}

/* Panels: float32 weights repacked so that a product of any row count reads them as one
 * forward stream and every loaded vector serves several rows of x.
 *
 * Why: row-major tiles re-read each block of W from the caches for every tile of rows, and
 * spend a horizontal sum per output; at 8-32 rows that measured 2-2.5x slower than the
 * weights' streaming speed allows, and oneDNN's packed GEMM 1.3x slower than this layout
 * at 32 rows (AMD EPYC, scripts/panel_gemm.py, BENCHMARKS.md "Generation: panel-packed
 * weights"). Panel j holds output columns j*NR .. j*NR + NR - 1, k-major: P[j][k][c] =
 * W[j*NR + c][k] (the last panel zero-padded), so a panel is one contiguous run of K x NR
 * floats that stays in L2 while every tile of rows reads it. A tile is PR rows of x by
 * one panel (PR x 2 vector accumulators; each element of x broadcast once per k).
 *
 * Each output is one FMA chain over k in order, whatever the row count or the tile a row
 * fell in: a row's result does not depend on how many rows ran with it. */
#if defined(VW)
#define NR (2 * VW)
#if defined(__AVX512F__)
#define PR 8 /* 8 x 2 accumulators, 2 of W, 1 broadcast of 32 registers */
#else
#define PR 6 /* 6 x 2 accumulators, 2 of W, 1 broadcast of 16 registers */
#endif
int sureserve_panel_width(void) { return NR; }

/* p (ceil(n / NR) * NR * k floats) = w (n, k) row-major in panels */
void sureserve_pack_panels(const float *w, float *p, int n, int k) {
    int panels = (n + NR - 1) / NR;
    #pragma omp parallel for schedule(static)
    for (int j = 0; j < panels; j++)
        for (int kk = 0; kk < k; kk++)
            for (int c = 0; c < NR; c++) {
                int r = j * NR + c;
                p[((size_t)j * k + kk) * NR + c] = r < n ? w[(size_t)r * k + kk] : 0.0f;
            }
}

/* out[m * NR + c] = x[m] . W[col0 + c] for m < MT: MT rows of x against one panel */
static inline __attribute__((always_inline)) void panel_tile(const float *x, int ldx,
                                                             const float *pj, int K, int MT,
                                                             float *out) {
    vec a0[PR], a1[PR];
    for (int m = 0; m < MT; m++) { a0[m] = vzero(); a1[m] = vzero(); }
    for (int k = 0; k < K; k++) {
        vec w0 = vload(pj + (size_t)k * NR), w1 = vload(pj + (size_t)k * NR + VW);
        for (int m = 0; m < MT; m++) {
            vec xb = vset1(x[(size_t)m * ldx + k]);
            a0[m] = vfma(xb, w0, a0[m]);
            a1[m] = vfma(xb, w1, a1[m]);
        }
    }
    for (int m = 0; m < MT; m++) {
        vstore(out + m * NR, a0[m]);
        vstore(out + m * NR + VW, a1[m]);
    }
}

/* every row of x against one panel (columns c0 .. c0 + nc - 1): y = out (* scale) + b
 * (+ res), in tiles of PR rows */
static inline __attribute__((always_inline)) void panel_rows(
        const float *x, int ldx, const float *pj, int K, int c0, int nc, const float *sc,
        const float *b, const float *res, float *y, int ldy, int M) {
    for (int m0 = 0; m0 < M; m0 += PR) {
        int mt = M - m0 < PR ? M - m0 : PR;
        const float *xm = x + (size_t)m0 * ldx;
        float out[PR * NR];
        switch (mt) {
        case 1: panel_tile(xm, ldx, pj, K, 1, out); break;
        case 2: panel_tile(xm, ldx, pj, K, 2, out); break;
        case 3: panel_tile(xm, ldx, pj, K, 3, out); break;
        case 4: panel_tile(xm, ldx, pj, K, 4, out); break;
        case 5: panel_tile(xm, ldx, pj, K, 5, out); break;
#if PR > 6
        case 6: panel_tile(xm, ldx, pj, K, 6, out); break;
        case 7: panel_tile(xm, ldx, pj, K, 7, out); break;
#endif
        default: panel_tile(xm, ldx, pj, K, PR, out); break;
        }
        for (int m = 0; m < mt; m++) {
            float *ym = y + (size_t)(m0 + m) * ldy + c0;
            const float *rm = res ? res + (size_t)(m0 + m) * ldy + c0 : 0;
            for (int c = 0; c < nc; c++)
                ym[c] = (sc ? out[m * NR + c] * sc[c0 + c] : out[m * NR + c]) +
                        (b ? b[c0 + c] : 0.0f) + (rm ? rm[c] : 0.0f);
        }
    }
}

/* gemv_body for float32 weights in panels: this thread's panels, no barrier */
static void panel_body(const float *x, int ldx, const sureserve_linear *L, const float *res,
                       float *y, int ldy, int M) {
    const float *b = L->bias;
    int N = L->n, K = L->k, panels = (N + NR - 1) / NR;
    #pragma omp for schedule(static) nowait
    for (int j = 0; j < panels; j++) {
        int c0 = j * NR, nc = N - c0 < NR ? N - c0 : NR;
        panel_rows(x, ldx, L->p + (size_t)j * K * NR, K, c0, nc, 0, b, res, y, ldy, M);
    }
}
#else
int sureserve_panel_width(void) { return 0; } /* no vectors: no panels */
void sureserve_pack_panels(const float *w, float *p, int n, int k) {
    (void)w; (void)p; (void)n; (void)k;
}
#endif

#if defined(VW)
/* int8 weights' panels, made as the product goes: for products of many rows (a prompt's),
 * each of this thread's panels of NR output columns is widened from int8 into float32
 * once, in the k-major panel layout, and then read by every tile of rows from L1/L2 as
 * panel_body reads packed float32 panels. Why: the row-major int8 tiles widen every
 * weight again for each tile of MT_MAX rows and sum horizontally per output; at 32-128
 * rows they ran at ~1.3-1.8x torch's int8 matmul but well under the float32 panels' rate
 * (AVX2 EPYC, BENCHMARKS.md). The widening costs one pass over the panel per product, a
 * few percent at prompt row counts. y = (x . q) * scale + b: the scale is applied to each
 * output, as the row-major int8 path does. */
/* r[i][j] <- r[j][i]: an 8 x 8 float transpose in registers */
static inline void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

/* buf (K x NR, k-major) = float(q[c0 + c][k]) for c < nc (columns past nc repeat the last
 * one: never written out). Eight columns by eight k at a time: each column's 8 bytes
 * widened to a vector (one contiguous read per column), then transposed in registers
 * (a gather of one byte per column measured ~3x slower on the AVX2 EPYC). */
static void widen_panel(const int8_t *q, int c0, int nc, int K, float *buf) {
    const int8_t *q0 = q + (size_t)c0 * K;
    int k = 0;
    for (; k + 8 <= K; k += 8)
        for (int g = 0; g < NR; g += 8) {
            __m256 r[8];
            for (int c = 0; c < 8; c++) {
                int col = g + c < nc ? g + c : nc - 1;
                r[c] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                    _mm_loadl_epi64((const __m128i *)(q0 + (size_t)col * K + k))));
            }
            transpose8(r);
            for (int kk = 0; kk < 8; kk++)
                _mm256_storeu_ps(buf + (size_t)(k + kk) * NR + g, r[kk]);
        }
    for (; k < K; k++)
        for (int c = 0; c < NR; c++)
            buf[(size_t)k * NR + c] = (float)q0[(size_t)(c < nc ? c : nc - 1) * K + k];
}

static void int8_panel_body(const float *x, int ldx, const sureserve_linear *L,
                            const float *res, float *y, int ldy, int M) {
    const float *b = L->bias, *sc = L->scale;
    const int8_t *q = (const int8_t *)L->w;
    int N = L->n, K = L->k, panels = (N + NR - 1) / NR;
    float *buf = 0;
    #pragma omp for schedule(static) nowait
    for (int j = 0; j < panels; j++) {
        if (!buf) buf = (float *)malloc((size_t)K * NR * sizeof(float));
        int c0 = j * NR, nc = N - c0 < NR ? N - c0 : NR;
        widen_panel(q, c0, nc, K, buf);
        panel_rows(x, ldx, buf, K, c0, nc, sc, b, res, y, ldy, M);
    }
    free(buf);
}
#endif

/* one linear layer, this thread's share; no barrier: for products whose outputs nothing
 * reads before a later barrier (q and k before v; gate before up) */
static void gemv_nowait(const float *x, int ldx, const sureserve_linear *L,
                        const float *res, float *y, int ldy, int M) {
#if defined(VW)
    if (!L->scale && L->p && M >= L->pmin) {
        panel_body(x, ldx, L, res, y, ldy, M);
        return;
    }
    if (L->scale && L->pmin > 0 && M >= L->pmin) {
        int8_panel_body(x, ldx, L, res, y, ldy, M);
        return;
    }
#endif
    if (L->scale)
        gemv_body(x, ldx, L, res, y, ldy, M, 1);
    else
        gemv_body(x, ldx, L, res, y, ldy, M, 0);
}

/* one linear layer, then a barrier (its output is read next) */
static void gemv_for(const float *x, int ldx, const sureserve_linear *L, const float *res,
                     float *y, int ldy, int M) {
    gemv_nowait(x, ldx, L, res, y, ldy, M);
    #pragma omp barrier
}

static sureserve_linear f32(const float *w, const float *b, int n, int k) {
    sureserve_linear l = {w, 0, b, n, k, 0, 0};
    return l;
}

/* h[m] = weight * (x[m] * rsqrt(mean(x[m]^2) + eps)): LlamaRMSNorm in float32, for the
 * rows m0 .. m1 */
static void rms_rows(const float *x, const float *weight, float eps, float *h, int m0,
                     int m1, int K) {
    for (int m = m0; m < m1; m++) {
        const float *xm = x + (size_t)m * K;
        double ss = 0.0;
        for (int k = 0; k < K; k++) ss += (double)xm[k] * xm[k];
        float r = 1.0f / sqrtf((float)(ss / K) + eps);
        for (int k = 0; k < K; k++) h[(size_t)m * K + k] = weight[k] * (xm[k] * r);
    }
}

static void rms_norm(const float *x, const float *weight, float eps, float *h, int M, int K) {
    rms_rows(x, weight, eps, h, 0, M, K);
}

/* the same inside a parallel region: one row per iteration */
static void rms_for(const float *x, const float *weight, float eps, float *h, int M, int K) {
    #pragma omp for schedule(static)
    for (int m = 0; m < M; m++) rms_rows(x, weight, eps, h, m, m + 1, K);
}

/* the rotary embedding on heads of d in each row's first `heads` heads of y (row stride
 * ld), as transformers' apply_rotary_pos_emb: x * cos + rotate_half(x) * sin,
 * rotate_half(x) = (-x[d/2:], x[:d/2]); cos and sin are (M, d) */
static void rotate_head(float *v, const float *c, const float *sn, int d) {
    int half = d / 2;
    for (int j = 0; j < half; j++) {
        float lo = v[j], hi = v[j + half];
        v[j] = lo * c[j] - hi * sn[j];
        v[j + half] = hi * c[j + half] + lo * sn[j + half];
    }
}

/* y = x W^T (+ b): one linear layer */
void sureserve_gemv(const float *x, const float *w, const float *b, float *y, int M, int N,
                    int K) {
    sureserve_linear l = f32(w, b, N, K);
    #pragma omp parallel
    gemv_for(x, K, &l, 0, y, N, M);
}

/* y = x W^T (* scale) (+ b) (+ res): one linear layer of either kind (res may be NULL) */
void sureserve_linear_apply(const float *x, const sureserve_linear *l, const float *res,
                            float *y, int M) {
    #pragma omp parallel
    gemv_for(x, l->k, l, res, y, l->n, M);
}

/* y = [h W1^T + b1 | h W2^T + b2 | h W3^T + b3], h = RMSNorm(x) (norm_w may be NULL: h = x);
 * y is (M, n1 + n2 + n3), h is scratch (M, K): the attention's q, k and v in one call.
 * With cos and sin ((M, d) each; NULL: none), the rotary embedding is applied to the
 * first n1 + n2 columns (q and k) in heads of d. */
void sureserve_norm_gemv3(const float *x, const float *norm_w, float eps, float *h, int M,
                          const sureserve_linear *l1, const sureserve_linear *l2,
                          const sureserve_linear *l3, float *y, const float *cos,
                          const float *sin, int d) {
    int K = l1->k, n1 = l1->n, n2 = l2->n, ld = n1 + n2 + l3->n;
    const float *in = x;
    if (norm_w) { rms_norm(x, norm_w, eps, h, M, K); in = h; }
    #pragma omp parallel
    {
        gemv_for(in, K, l1, 0, y, ld, M);  /* each "omp for" ends in a barrier */
        gemv_for(in, K, l2, 0, y + n1, ld, M);
        gemv_for(in, K, l3, 0, y + n1 + n2, ld, M);
        if (cos && sin && d > 1) {
            int heads = (n1 + n2) / d;
            #pragma omp for schedule(static)
            for (int i = 0; i < M * heads; i++) {
                int m = i / heads;
                rotate_head(y + (size_t)m * ld + (size_t)(i % heads) * d,
                            cos + (size_t)m * d, sin + (size_t)m * d, d);
            }
        }
    }
}

/* a = [silu(h Wg^T + bg) * (h Wu^T + bu) | h Wu^T + bu]; x = x + a[:, :F] Wd^T + bd
 * (in place), inside a parallel region */
static void mlp_for(float *x, const float *h, const sureserve_linear *gate,
                    const sureserve_linear *up, const sureserve_linear *down, float *a, int M) {
    int K = gate->k, F = gate->n;
    gemv_nowait(h, K, gate, 0, a, 2 * F, M);
    gemv_for(h, K, up, 0, a + F, 2 * F, M);
    #pragma omp for schedule(static)
    for (int i = 0; i < M * F; i++) {
        int m = i / F, f = i % F;
        float g = a[(size_t)m * 2 * F + f], u = a[(size_t)m * 2 * F + F + f];
        a[(size_t)m * 2 * F + f] = g / (1.0f + expf(-g)) * u;
    }
    gemv_for(a, 2 * F, down, x, x, K, M);  /* a's rows: silu(g) * u, then u */
}

/* y = x + down(silu(gate(h)) * up(h)), h = RMSNorm(x): a Llama MLP block and its residual.
 * h (M, K) and a (M, 2F) are scratch. */
void sureserve_mlp(const float *x, const float *norm_w, float eps,
                   const sureserve_linear *g, const sureserve_linear *u,
                   const sureserve_linear *dn, float *h, float *a, float *y, int M) {
    int K = g->k;
    rms_norm(x, norm_w, eps, h, M, K);
    for (size_t i = 0; i < (size_t)M * K; i++) y[i] = x[i];
    #pragma omp parallel
    mlp_for(y, h, g, u, dn, a, M);
}

/* One decoder layer's weights (float32 norms; linear layers of either kind). */
typedef struct {
    const float *norm1, *norm2;
    sureserve_linear q, k, v, o, gate, up, down;
} sureserve_layer;

#define BLOCK 32 /* key columns scored at a time by the attention */

/* out = softmax(q K^T * scale, masked) V for one query head over columns start .. end
 * (inclusive) of its key/value head (column stride d), in blocks with a running maximum
 * (the scores of a block are computed once; earlier sums are rescaled when the maximum
 * grows). mask: one byte per column from start (non-zero: attend), or NULL. */
static void attend(const float *q, const float *kh, const float *vh, int start, int end,
                   int d, float scale, const unsigned char *mask, float *out) {
    float acc[512], s[BLOCK];
    float mx = -INFINITY, sum = 0.0f;
    for (int j = 0; j < d; j++) acc[j] = 0.0f;
    for (int c0 = start; c0 <= end; c0 += BLOCK) {
        int nb = end + 1 - c0 < BLOCK ? end + 1 - c0 : BLOCK;
        float bm = -INFINITY;
        for (int c = 0; c < nb; c++) {
            if (mask && !mask[c0 - start + c]) { s[c] = -INFINITY; continue; }
            const float *kc = kh + (size_t)(c0 + c) * d;
            float dot = 0.0f;
            int j = 0;
#if defined(VW)
            vec t = vzero();
            for (; j + VW <= d; j += VW) t = vfma(vload(q + j), vload(kc + j), t);
            dot = vsum(t);
#endif
            for (; j < d; j++) dot += q[j] * kc[j];
            s[c] = dot * scale;
            if (s[c] > bm) bm = s[c];
        }
        if (bm == -INFINITY) continue;
        if (bm > mx) {  /* a new maximum: what was summed so far shrinks by exp(old - new) */
            float corr = expf(mx - bm);
            sum *= corr;
            for (int j = 0; j < d; j++) acc[j] *= corr;
            mx = bm;
        }
        for (int c = 0; c < nb; c++) {
            if (s[c] == -INFINITY) continue;
            float p = expf(s[c] - mx);
            const float *vc = vh + (size_t)(c0 + c) * d;
            sum += p;
            int j = 0;
#if defined(VW)
            vec pv = vset1(p);
            for (; j + VW <= d; j += VW) vstore(acc + j, vfma(pv, vload(vc + j), vload(acc + j)));
#endif
            for (; j < d; j++) acc[j] += p * vc[j];
        }
    }
    float inv = 1.0f / sum;
    for (int j = 0; j < d; j++) out[j] = acc[j] * inv;
}

/* One decode step of a Llama-family decoder: for each of the L layers, x = x + attention
 * and x = x + MLP, in place on x (M, H), one new token per row.
 *
 * The keys and values of layer i live in kc/vc + i * layer_stride as (rows, kv_heads,
 * columns, d) with the given row and head strides (elements; column stride d): this
 * step's keys (rotated) and values are written at column `end`, and each row attends to
 * columns start .. end where its mask byte (mask: (M, end + 1 - start), NULL: all) is set.
 * cos/sin: (M, d) rotary tables. Scratch (floats): M * (H + nq + nk + nv + nq + 2 * F).
 * With a final norm and a head, logits (M, head.n) = head(RMSNorm(x)) after the layers. */
void sureserve_decode(float *x, int M, int H, const sureserve_layer *layers, int L,
                      float eps, const float *cos, const float *sin, int d, int heads,
                      int kv_heads, float scaling, float *kc, float *vc, long layer_stride,
                      long row_stride, long head_stride, int start, int end,
                      const unsigned char *mask, float *scratch, const float *final_norm,
                      const sureserve_linear *head, float *logits) {
    int nq = heads * d, nk = kv_heads * d, ld = nq + 2 * nk, groups = heads / kv_heads;
    int width = end + 1 - start;
    float *h = scratch, *qkv = h + (size_t)M * H, *att = qkv + (size_t)M * ld;
    float *a = att + (size_t)M * nq;
    #pragma omp parallel
    {
        for (int i = 0; i < L; i++) {
            const sureserve_layer *ly = &layers[i];
            float *kl = kc + (size_t)i * layer_stride, *vl = vc + (size_t)i * layer_stride;
            rms_for(x, ly->norm1, eps, h, M, H);
            gemv_nowait(h, H, &ly->q, 0, qkv, ld, M);
            gemv_nowait(h, H, &ly->k, 0, qkv + nq, ld, M);
            gemv_for(h, H, &ly->v, 0, qkv + nq + nk, ld, M);
            /* rotary on q's and k's heads; k and v into the cache at column `end` */
            #pragma omp for schedule(static)
            for (int t = 0; t < M * (heads + kv_heads); t++) {
                int m = t / (heads + kv_heads), hd = t % (heads + kv_heads);
                float *row = qkv + (size_t)m * ld;
                rotate_head(row + (size_t)hd * d, cos + (size_t)m * d, sin + (size_t)m * d, d);
                if (hd >= heads) {
                    int g = hd - heads;
                    size_t at = (size_t)m * row_stride + (size_t)g * head_stride +
                                (size_t)end * d;
                    for (int j = 0; j < d; j++) {
                        kl[at + j] = row[nq + (size_t)g * d + j];
                        vl[at + j] = row[nq + nk + (size_t)g * d + j];
                    }
                }
            }
            #pragma omp for schedule(static)
            for (int t = 0; t < M * heads; t++) {
                int m = t / heads, hq = t % heads, g = hq / groups;
                size_t base = (size_t)m * row_stride + (size_t)g * head_stride;
                attend(qkv + (size_t)m * ld + (size_t)hq * d, kl + base, vl + base, start,
                       end, d, scaling, mask ? mask + (size_t)m * width : 0,
                       att + (size_t)m * nq + (size_t)hq * d);
            }
            gemv_for(att, nq, &ly->o, x, x, H, M);
            rms_for(x, ly->norm2, eps, h, M, H);
            mlp_for(x, h, &ly->gate, &ly->up, &ly->down, a, M);
        }
        if (final_norm && head) {
            rms_for(x, final_norm, eps, h, M, H);
            gemv_for(h, H, head, 0, logits, head->n, M);
        }
    }
}
