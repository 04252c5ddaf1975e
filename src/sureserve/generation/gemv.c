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
 * stream of memory per thread) and, for every row of x, keeps R accumulators so that R
 * rows of W are read side by side (enough loads in flight to keep DRAM busy).
 * The threads are OpenMP's: the same libgomp torch loaded, so one pool, sized by
 * torch.set_num_threads. */
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

void sureserve_gemv(const float *x, const float *w, const float *b, float *y, int M, int N,
                    int K) {
    int blocks = (N + R - 1) / R;
    #pragma omp parallel for schedule(static)
    for (int blk = 0; blk < blocks; blk++) {
        int n0 = blk * R;
        int rows = N - n0 < R ? N - n0 : R;
        for (int m = 0; m < M; m++) {
            const float *xm = x + (size_t)m * K;
            float *ym = y + (size_t)m * N + n0;
            if (rows == R) {
                int k = 0;
                float s[R];
#if defined(VW)
                vec acc[R];
                for (int r = 0; r < R; r++) acc[r] = vzero();
                for (; k + VW <= K; k += VW) {
                    vec xv = vload(xm + k);
                    #pragma GCC unroll 16
                    for (int r = 0; r < R; r++)
                        acc[r] = vfma(vload(w + (size_t)(n0 + r) * K + k), xv, acc[r]);
                }
                for (int r = 0; r < R; r++) s[r] = vsum(acc[r]);
#else
                for (int r = 0; r < R; r++) s[r] = 0.0f;
#endif
                for (int r = 0; r < R; r++)
                    ym[r] = dot_from(xm, w + (size_t)(n0 + r) * K, k, K, s[r]) +
                            (b ? b[n0 + r] : 0.0f);
            } else {  /* the last, partial block */
                for (int r = 0; r < rows; r++) {
                    const float *wr = w + (size_t)(n0 + r) * K;
                    int k = 0;
                    float s0 = 0.0f;
#if defined(VW)
                    vec acc = vzero();
                    for (; k + VW <= K; k += VW) acc = vfma(vload(wr + k), vload(xm + k), acc);
                    s0 = vsum(acc);
#endif
                    ym[r] = dot_from(xm, wr, k, K, s0) + (b ? b[n0 + r] : 0.0f);
                }
            }
        }
    }
}
