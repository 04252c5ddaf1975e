/* A matrix-vector product for decode steps: y = x W^T (+ b), for a few rows of x.
 *
 * Why it exists: at one running sequence a decode step is bound by how fast the weights
 * stream from memory, and torch's CPU GEMM for M = 1..8 reads them at ~11 GB/s on an AMD
 * EPYC where this loop reads ~25 GB/s (BENCHMARKS.md "Generation: a GEMV kernel for the
 * decode step"). It is compiled on the machine that runs it (-march=native, see
 * generation/native.py), used only where it measured faster, and checked against
 * F.linear in the tests.
 *
 * Layout: W is nn.Linear's weight, row-major (N, K), contiguous; x is (M, K), y is (M, N),
 * both contiguous float32. Each thread takes a contiguous run of R-row blocks of W (one
 * stream of memory per thread). One row of x keeps R accumulators, so that R rows of W are
 * read side by side (enough loads in flight to keep DRAM busy); several rows use register
 * tiles of MT_MAX rows of x by 4 rows of W (each loaded vector used several times). Beside
 * the plain product, three fused entry points cover a Llama decoder layer (RMSNorm + q/k/v
 * + rotary; output projection + residual; the MLP block), so that the operations between
 * the matmuls do not each cost a Python call.
 * The threads are OpenMP's: the same libgomp torch loaded, so one pool, sized by
 * torch.set_num_threads. */
#include <math.h>
#include <stddef.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define R 16
#define VW 16
typedef __m512 vec;
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#define R 8
#define VW 8
typedef __m256 vec;
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vec v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
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

/* one row of W against one row of x, from element k on */
static inline float dot_from(const float *x, const float *w, int k, int K, float s) {
    for (; k < K; k++) s += x[k] * w[k];
    return s;
}

/* out[m * NT + n] = x[m] . w[n] for m < MT, n < NT: MT rows of x against NT rows of W,
 * MT x NT accumulators in registers (each loaded vector of W serves MT rows of x, each
 * vector of x NT rows of W). Inlined with constant MT and NT, so the loops unroll. */
static inline __attribute__((always_inline)) void tile(const float *x, int ldx,
                                                       const float *w, int K, int MT,
                                                       int NT, float *out) {
    int k = 0;
    float s[16];
#if defined(VW)
    vec acc[16];
    for (int i = 0; i < MT * NT; i++) acc[i] = vzero();
    for (; k + VW <= K; k += VW) {
        vec xv[4];
        for (int m = 0; m < MT; m++) xv[m] = vload(x + (size_t)m * ldx + k);
        for (int n = 0; n < NT; n++) {
            vec wv = vload(w + (size_t)n * K + k);
            for (int m = 0; m < MT; m++) acc[m * NT + n] = vfma(wv, xv[m], acc[m * NT + n]);
        }
    }
    for (int i = 0; i < MT * NT; i++) s[i] = vsum(acc[i]);
#else
    for (int i = 0; i < MT * NT; i++) s[i] = 0.0f;
#endif
    for (int m = 0; m < MT; m++)
        for (int n = 0; n < NT; n++)
            out[m * NT + n] = dot_from(x + (size_t)m * ldx, w + (size_t)n * K, k, K,
                                       s[m * NT + n]);
}

#if defined(__AVX512F__)
#define MT_MAX 4 /* 32 vector registers: 4 x 4 accumulators, 4 of x, 1 of W */
#else
#define MT_MAX 2 /* 16 vector registers: 2 x 4 accumulators */
#endif

/* one row of x against rows n0 .. n0 + rows of W (rows <= R) */
static inline void one_row(const float *xm, const float *w, int n0, int rows, int K,
                           float *out) {
    if (rows == R) {
        tile(xm, K, w + (size_t)n0 * K, K, 1, R, out);
        return;
    }
    for (int r = 0; r < rows; r++) tile(xm, K, w + (size_t)(n0 + r) * K, K, 1, 1, out + r);
}

/* mt rows of x (mt <= MT_MAX) against 4 rows of W from row n (or fewer: nt); out is
 * (mt, 4) */
static inline void sub_tile(const float *x, int ldx, const float *w, int n, int K, int mt,
                            int nt, float *out) {
    const float *wn = w + (size_t)n * K;
    if (nt == 4) {
        switch (mt) {
        case 1: tile(x, ldx, wn, K, 1, 4, out); return;
        case 2: tile(x, ldx, wn, K, 2, 4, out); return;
#if MT_MAX >= 4
        case 3: tile(x, ldx, wn, K, 3, 4, out); return;
        case 4: tile(x, ldx, wn, K, 4, 4, out); return;
#endif
        }
    }
    for (int j = 0; j < nt; j++)  /* a partial block's last rows of W */
        for (int m = 0; m < mt; m++)
            tile(x + (size_t)m * ldx, ldx, wn + (size_t)j * K, K, 1, 1, out + m * 4 + j);
}

/* y[m, n] = x[m] . w[n] + b[n] (+ res[m, n]) for the blocks of n in this thread's share;
 * x has row stride ldx, y and res ldy. Called inside a parallel region. */
static void gemv_for(const float *x, int ldx, const float *w, const float *b,
                     const float *res, float *y, int ldy, int M, int N, int K) {
    int blocks = (N + R - 1) / R;
    #pragma omp for schedule(static)
    for (int blk = 0; blk < blocks; blk++) {
        int n0 = blk * R, rows = N - n0 < R ? N - n0 : R;
        if (M == 1) {  /* one row: R rows of W side by side (memory-bound: many streams) */
            float out[R];
            one_row(x, w, n0, rows, K, out);
            for (int r = 0; r < rows; r++)
                y[n0 + r] = out[r] + (b ? b[n0 + r] : 0.0f) + (res ? res[n0 + r] : 0.0f);
            continue;
        }
        /* several rows: register tiles of MT_MAX rows of x by 4 rows of W, the block of W
         * read again from the caches for each tile of x rows */
        for (int m0 = 0; m0 < M; m0 += MT_MAX) {
            int mt = M - m0 < MT_MAX ? M - m0 : MT_MAX;
            for (int n = n0; n < n0 + rows; n += 4) {
                int nt = n0 + rows - n < 4 ? n0 + rows - n : 4;
                float out[4 * 4];
                sub_tile(x + (size_t)m0 * ldx, ldx, w, n, K, mt, nt, out);
                for (int m = 0; m < mt; m++) {
                    float *ym = y + (size_t)(m0 + m) * ldy;
                    const float *rm = res ? res + (size_t)(m0 + m) * ldy : 0;
                    for (int j = 0; j < nt; j++)
                        ym[n + j] = out[m * 4 + j] + (b ? b[n + j] : 0.0f) +
                                    (rm ? rm[n + j] : 0.0f);
                }
            }
        }
    }
}

/* h[m] = weight * (x[m] * rsqrt(mean(x[m]^2) + eps)): LlamaRMSNorm in float32 */
static void rms_norm(const float *x, const float *weight, float eps, float *h, int M, int K) {
    for (int m = 0; m < M; m++) {
        const float *xm = x + (size_t)m * K;
        double ss = 0.0;
        for (int k = 0; k < K; k++) ss += (double)xm[k] * xm[k];
        float r = 1.0f / sqrtf((float)(ss / K) + eps);
        for (int k = 0; k < K; k++) h[(size_t)m * K + k] = weight[k] * (xm[k] * r);
    }
}

/* y = x W^T (+ b): one linear layer */
void sureserve_gemv(const float *x, const float *w, const float *b, float *y, int M, int N,
                    int K) {
    #pragma omp parallel
    gemv_for(x, K, w, b, 0, y, N, M, N, K);
}

/* y = res + x W^T (+ b): the attention's output projection and its residual */
void sureserve_gemv_add(const float *x, const float *w, const float *b, const float *res,
                        float *y, int M, int N, int K) {
    #pragma omp parallel
    gemv_for(x, K, w, b, res, y, N, M, N, K);
}

/* y = [h W1^T + b1 | h W2^T + b2 | h W3^T + b3], h = RMSNorm(x) (norm_w may be NULL: h = x);
 * y is (M, n1 + n2 + n3), h is scratch (M, K): the attention's q, k and v in one call.
 * With cos and sin ((M, d) each; NULL: none), the rotary embedding is applied to the
 * first n1 + n2 columns (q and k) in heads of d, as transformers' apply_rotary_pos_emb:
 * x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[d/2:], x[:d/2]). */
void sureserve_norm_gemv3(const float *x, const float *norm_w, float eps, float *h, int M,
                          int K, const float *w1, const float *b1, int n1, const float *w2,
                          const float *b2, int n2, const float *w3, const float *b3, int n3,
                          float *y, const float *cos, const float *sin, int d) {
    int ld = n1 + n2 + n3;
    const float *in = x;
    if (norm_w) { rms_norm(x, norm_w, eps, h, M, K); in = h; }
    #pragma omp parallel
    {
        gemv_for(in, K, w1, b1, 0, y, ld, M, n1, K);  /* each "omp for" ends in a barrier */
        gemv_for(in, K, w2, b2, 0, y + n1, ld, M, n2, K);
        gemv_for(in, K, w3, b3, 0, y + n1 + n2, ld, M, n3, K);
        if (cos && sin && d > 1) {
            int heads = (n1 + n2) / d, half = d / 2;
            #pragma omp for schedule(static)
            for (int i = 0; i < M * heads; i++) {
                int m = i / heads;
                float *v = y + (size_t)m * ld + (size_t)(i % heads) * d;
                const float *c = cos + (size_t)m * d, *sn = sin + (size_t)m * d;
                for (int j = 0; j < half; j++) {
                    float lo = v[j], hi = v[j + half];
                    v[j] = lo * c[j] - hi * sn[j];
                    v[j + half] = hi * c[j + half] + lo * sn[j + half];
                }
            }
        }
    }
}

/* y = x + down(silu(gate(h)) * up(h)), h = RMSNorm(x): a Llama MLP block and its residual.
 * h (M, K) and a (M, 2F) are scratch. */
void sureserve_mlp(const float *x, const float *norm_w, float eps, const float *wg,
                   const float *wu, const float *wd, float *h, float *a, float *y, int M,
                   int K, int F) {
    rms_norm(x, norm_w, eps, h, M, K);
    #pragma omp parallel
    {
        gemv_for(h, K, wg, 0, 0, a, 2 * F, M, F, K);
        gemv_for(h, K, wu, 0, 0, a + F, 2 * F, M, F, K);
        #pragma omp for schedule(static)
        for (int i = 0; i < M * F; i++) {
            int m = i / F, f = i % F;
            float g = a[(size_t)m * 2 * F + f], u = a[(size_t)m * 2 * F + F + f];
            a[(size_t)m * 2 * F + f] = g / (1.0f + expf(-g)) * u;
        }
        gemv_for(a, 2 * F, wd, 0, x, y, K, M, K, F);  /* a's rows: silu(g) * u, then u */
    }
}
