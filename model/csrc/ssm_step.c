/* Fused recurrent SSM steps for CPU: one pass over the state per layer and step.
 *
 * Layouts (float32, C-contiguous): state x and x_out (B, H, 2, M) = real and imaginary parts of
 * M complex modes per channel; u and y (B, H); per-channel parameters (H, M); low-rank terms
 * (R, H, M); Minv (H, R, R). x_out may be x itself (in-place update).
 * Built at first use by model/fused.py with the system C compiler.
 */
#include <stddef.h>

#define MAX_MODES 1024
#define MAX_RANK 4

/* x' = μ x + b u,  y = Σ Re(c x')  (c already holds 2·C̄) */
void diag_step(long B, long H, long M, const float *x, float *xo, const float *u, float *y,
               const float *mur, const float *mui, const float *br, const float *bi,
               const float *cr, const float *ci) {
#pragma omp parallel for schedule(static) if (B * H * M >= 65536)
    for (long bh = 0; bh < B * H; bh++) {
        const long h = bh % H, o = h * M;
        const float *xr = x + bh * 2 * M, *xi = xr + M;
        float *nr = xo + bh * 2 * M, *ni = nr + M;
        const float uu = u[bh];
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (long m = 0; m < M; m++) {
            const float r = mur[o + m] * xr[m] - mui[o + m] * xi[m] + br[o + m] * uu;
            const float i = mur[o + m] * xi[m] + mui[o + m] * xr[m] + bi[o + m] * uu;
            nr[m] = r;
            ni[m] = i;
            acc += cr[o + m] * r - ci[o + m] * i;
        }
        y[bh] = acc;
    }
}

/* Exact bilinear DPLR step: g = D⁻¹(2x + ΔB u), s = M⁻¹ Σ (Pr gr + Pi gi), x' = g − x − Σⱼ Qⱼ sⱼ,
 * y = Σ Re(c x'). Pr, Pi hold 2·P̃; Q = (Δ/2) D⁻¹ P̃. */
int dplr_step(long B, long H, long M, long R, const float *x, float *xo, const float *u, float *y,
              const float *dbr, const float *dbi, const float *dr, const float *di,
              const float *pr, const float *pi, const float *minv, const float *qr,
              const float *qi, const float *cr, const float *ci) {
    if (M > MAX_MODES || R > MAX_RANK) return -1;
#pragma omp parallel for schedule(static) if (B * H * M >= 65536)
    for (long bh = 0; bh < B * H; bh++) {
        const long h = bh % H, o = h * M;
        const float *xr = x + bh * 2 * M, *xi = xr + M;
        float *nr = xo + bh * 2 * M, *ni = nr + M;
        const float uu = u[bh];
        float s[MAX_RANK], t[MAX_RANK], gr[MAX_MODES], gi[MAX_MODES];
#pragma omp simd
        for (long m = 0; m < M; m++) {  /* g = D⁻¹ f */
            const float fr = 2.0f * xr[m] + dbr[o + m] * uu, fi = 2.0f * xi[m] + dbi[o + m] * uu;
            gr[m] = dr[o + m] * fr - di[o + m] * fi;
            gi[m] = dr[o + m] * fi + di[o + m] * fr;
        }
        for (long j = 0; j < R; j++) {
            const float *a = pr + (j * H + h) * M, *b = pi + (j * H + h) * M;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (long m = 0; m < M; m++) acc += a[m] * gr[m] + b[m] * gi[m];
            s[j] = acc;
        }
        for (long i = 0; i < R; i++) {
            t[i] = 0.0f;
            for (long j = 0; j < R; j++) t[i] += minv[(h * R + i) * R + j] * s[j];
        }
#pragma omp simd
        for (long m = 0; m < M; m++) {  /* x may alias xo: read x before writing */
            nr[m] = gr[m] - xr[m];
            ni[m] = gi[m] - xi[m];
        }
        for (long j = 0; j < R; j++) {
            const float *a = qr + (j * H + h) * M, *b = qi + (j * H + h) * M, tj = t[j];
#pragma omp simd
            for (long m = 0; m < M; m++) {
                nr[m] -= a[m] * tj;
                ni[m] -= b[m] * tj;
            }
        }
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (long m = 0; m < M; m++) acc += cr[o + m] * nr[m] - ci[o + m] * ni[m];
        y[bh] = acc;
    }
    return 0;
}
