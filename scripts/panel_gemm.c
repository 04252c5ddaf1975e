/* A prototype for BENCHMARKS.md "Generation: where a shared prefix's time goes" (issue #24),
 * built and run by scripts/panel_gemm.py; not used by sureserve yet.
 *
 * y = x W^T for M rows of x, with W (N x K, N a multiple of 32) repacked into panels of 32
 * output columns: P[j][k][c] = W[j*32 + c][k], so a panel is one contiguous stream of K x 128
 * bytes (72 KB at K = 576: it stays in L2 while every tile of rows reads it). Register tiles
 * of 8 rows x 32 columns (16 accumulators), x broadcast one value at a time; each thread
 * takes a contiguous run of panels (one forward stream of memory per thread). With
 * `prefetch`, the next panel is fetched a line at a time while the current one is
 * computed (measured: no gain over the hardware prefetchers on an AMD EPYC). */
#include <immintrin.h>
#include <string.h>
#include <omp.h>
#define NR 32
/* P[j][k][c] = W[j*NR + c][k] */
void pack(const float *w, float *p, int n, int k) {
    for (int j = 0; j < n / NR; j++)
        for (int kk = 0; kk < k; kk++)
            for (int c = 0; c < NR; c++)
                p[((size_t)j * k + kk) * NR + c] = w[(size_t)(j * NR + c) * k + kk];
}
#define MR 8
static inline void tile8(const float *x, int ldx, const float *p, int k, float *y, int ldy,
                         const float *next, int *t, int lines) {
    __m512 a[MR][2];
    for (int r = 0; r < MR; r++) { a[r][0] = _mm512_setzero_ps(); a[r][1] = _mm512_setzero_ps(); }
    for (int kk = 0; kk < k; kk++) {
        __m512 w0 = _mm512_loadu_ps(p + kk * NR), w1 = _mm512_loadu_ps(p + kk * NR + 16);
        if (next && ((*t) & 1) == 0 && ((*t) >> 1) < lines)
            _mm_prefetch((const char *)(next + ((*t) >> 1) * 16), _MM_HINT_T0);
        (*t)++;
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++) {
            __m512 xb = _mm512_set1_ps(x[r * ldx + kk]);
            a[r][0] = _mm512_fmadd_ps(xb, w0, a[r][0]);
            a[r][1] = _mm512_fmadd_ps(xb, w1, a[r][1]);
        }
    }
    for (int r = 0; r < MR; r++) { _mm512_storeu_ps(y + r * ldy, a[r][0]); _mm512_storeu_ps(y + r * ldy + 16, a[r][1]); }
}
static inline void tile1(const float *x, const float *p, int k, float *y) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (int kk = 0; kk < k; kk++) {
        __m512 xb = _mm512_set1_ps(x[kk]);
        a0 = _mm512_fmadd_ps(xb, _mm512_loadu_ps(p + kk * NR), a0);
        a1 = _mm512_fmadd_ps(xb, _mm512_loadu_ps(p + kk * NR + 16), a1);
    }
    _mm512_storeu_ps(y, a0); _mm512_storeu_ps(y + 16, a1);
}
void gemm(const float *x, const float *p, float *y, int m, int n, int k, int prefetch) {
    int panels = n / NR;
#pragma omp parallel
    {
        int nt = omp_get_num_threads(), id = omp_get_thread_num();
        int j0 = panels * id / nt, j1 = panels * (id + 1) / nt;
        for (int j = j0; j < j1; j++) {
            const float *pj = p + (size_t)j * k * NR;
            const float *next = (prefetch && j + 1 < j1) ? pj + (size_t)k * NR : 0;
            int t = 0, lines = k * NR / 16;
            int r = 0;
            for (; r + MR <= m; r += MR)
                tile8(x + (size_t)r * k, k, pj, k, y + (size_t)r * n + j * NR, n, next, &t, lines);
            for (; r < m; r++)
                tile1(x + (size_t)r * k, pj, k, y + (size_t)r * n + j * NR);
        }
    }
}
