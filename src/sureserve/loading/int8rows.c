/* Per-token int8 quantization around oneDNN's int8 matmul (loading/kernels.py's
 * SmoothInt8Linear): one pass each where torch's operations take seven, the same
 * arithmetic in the same order, so the same bits (checked in the tests; the torch
 * operations remain the fallback where no C compiler is found). Compiled on the machine
 * that runs it like the decode GEMV (loading/cbuild.py); OpenMP threads are torch's. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* For each row of x (M, K), h = x * inv_s (the
 * SmoothQuant smoothing), step = max(|h|, 1e-8) / 127, q = round-half-even(h / step) + 128
 * as uint8. Two passes over a row instead of torch's seven (a temporary, two reductions
 * and four in-place passes), the same operations in the same order, so the same bits
 * (checked in the tests). No FMA contraction: none of these products is summed. */
__attribute__((optimize("fp-contract=off")))
void sureserve_quantize_rows(const float *x, const float *inv_s, uint8_t *q, float *step,
                             int M, int K) {
    #pragma omp parallel for schedule(static)
    for (int m = 0; m < M; m++) {
        const float *xr = x + (size_t)m * K;
        uint8_t *qr = q + (size_t)m * K;
        float big = 0.0f;
        for (int k = 0; k < K; k++) {
            float h = fabsf(xr[k] * inv_s[k]);
            big = h > big ? h : big;
        }
        float s = (big > 1e-8f ? big : 1e-8f) / 127.0f;
        step[m] = s;
        for (int k = 0; k < K; k++)
            qr[k] = (uint8_t)(nearbyintf((xr[k] * inv_s[k]) / s) + 128.0f);
    }
}

/* y (M, N) = y * step[m] (+ bias[n]) (+ res[m, n]): the per-token dequantization after
 * the int8 matmul, with the block's residual when it comes next, in one pass; each step is
 * rounded in torch's order (mul_, add_ bias, then + residual). */
__attribute__((optimize("fp-contract=off")))
void sureserve_dequantize_rows(float *y, const float *step, const float *bias,
                               const float *res, int M, int N) {
    #pragma omp parallel for schedule(static)
    for (int m = 0; m < M; m++) {
        float *yr = y + (size_t)m * N;
        const float *rr = res ? res + (size_t)m * N : 0;
        const float s = step[m];
        for (int n = 0; n < N; n++) {
            float t = yr[n] * s;
            if (bias) t = t + bias[n];
            if (rr) t = t + rr[n];
            yr[n] = t;
        }
    }
}
