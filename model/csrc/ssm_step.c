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

/* One channel of one row of the exact bilinear DPLR step (inlined: called with constant M and R
 * for the common shape, so the loops unroll without remainder code). */
static inline __attribute__((always_inline)) void
dplr_row(long M, long R, long H, long h, const float *xr, const float *xi, float *nr, float *ni,
         float uu, float *y, const float *dbr, const float *dbi, const float *dr, const float *di,
         const float *pr, const float *pi, const float *minv, const float *qr, const float *qi,
         const float *cr, const float *ci) {
    const long o = h * M;
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
    *y = acc;
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
        const long h = bh % H;
        const float *xr = x + bh * 2 * M, *xi = xr + M;
        float *nr = xo + bh * 2 * M, *ni = nr + M;
        if (M == 32 && R == 1) /* N = 64, rank 1: the shipped models */
            dplr_row(32, 1, H, h, xr, xi, nr, ni, u[bh], y + bh, dbr, dbi, dr, di, pr, pi, minv, qr, qi, cr, ci);
        else
            dplr_row(M, R, H, h, xr, xi, nr, ni, u[bh], y + bh, dbr, dbi, dr, di, pr, pi, minv, qr, qi, cr, ci);
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * The whole network's step in one call (CPU, small batches): embedding → per layer [LayerNorm →
 * SSM step → GELU(y + D u) → GLU(W z + b) → residual] → LayerNorm → head (its bias may be NULL).
 * The same arithmetic as the torch modules (LayerNorm with biased variance, exact erf GELU, GLU = a · sigmoid(g)); sums run
 * in another order, so logits agree to float32 rounding. Called once per step instead of ~45 torch
 * ops, which dominate a small batch's step.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#if defined(__GLIBC__) && defined(__x86_64__) && (__GLIBC__ > 2 || __GLIBC_MINOR__ >= 35)
/* glibc's vector variants (libmvec; math.h declares them only under -ffast-math): the GELU and
 * sigmoid loops below then evaluate 8 lanes per call, within 4 ulp */
__attribute__((simd("notinbranch"))) float expf(float);
__attribute__((simd("notinbranch"))) float erff(float);
#endif

typedef struct {
    long form;  /* 0: diagonal, 1: dplr */
    long rank;
    const float *ln_w, *ln_b, *d_skip;
    const float *out_wt, *out_b; /* out_wt (H, 2H): the output linear's weight, transposed */
    const float *p[11]; /* diagonal: mur mui br bi cr ci; dplr: dbr dbi dr di pr pi minv qr qi cr ci */
} NetLayer;

static void layer_norm(long B, long H, const float *x, float *out, const float *w, const float *b, float eps) {
    for (long r = 0; r < B; r++) {
        const float *xr = x + r * H;
        float *o = out + r * H, mean = 0.0f, var = 0.0f;
#pragma omp simd reduction(+ : mean)
        for (long h = 0; h < H; h++) mean += xr[h];
        mean /= (float)H;
#pragma omp simd reduction(+ : var)
        for (long h = 0; h < H; h++) var += (xr[h] - mean) * (xr[h] - mean);
        const float inv = 1.0f / sqrtf(var / (float)H + eps);
#pragma omp simd
        for (long h = 0; h < H; h++) o[h] = (xr[h] - mean) * inv * w[h] + b[h];
    }
}

/* out (B, N) = bias + x (B, K) · Wt (K, N), Wt row-major (the weight transposed): each output row
 * accumulates scaled weight rows (vectorized over N, no horizontal sums), four at a time */
static void linear_t(long B, long K, long N, const float *x, const float *Wt, const float *bias, float *out) {
#pragma omp parallel for schedule(static) if (B * K * N >= (1L << 21))
    for (long r = 0; r < B; r++) {
        const float *xr = x + r * K;
        float *restrict o = out + r * N;
#pragma omp simd
        for (long n = 0; n < N; n++) o[n] = bias ? bias[n] : 0.0f;
        long k = 0;
        for (; k + 4 <= K; k += 4) {
            const float *w0 = Wt + k * N, *w1 = w0 + N, *w2 = w1 + N, *w3 = w2 + N;
            const float a0 = xr[k], a1 = xr[k + 1], a2 = xr[k + 2], a3 = xr[k + 3];
#pragma omp simd
            for (long n = 0; n < N; n++) o[n] += a0 * w0[n] + a1 * w1[n] + a2 * w2[n] + a3 * w3[n];
        }
        for (; k < K; k++) {
            const float *w = Wt + k * N, a = xr[k];
#pragma omp simd
            for (long n = 0; n < N; n++) o[n] += a * w[n];
        }
    }
}

/* Rows r0 .. r0 + B − 1 of a batch of Btot (the state is (n_layers, Btot, H, 2, M)). */
static int net_rows(long B, long Btot, long r0, long H, long V, long n_layers, long M, const long *tokens,
                    const float *embed, const NetLayer *layers, const float *lnf_w, const float *lnf_b,
                    const float *head_t, const float *head_b, float eps, const float *state, float *state_out,
                    float *logits) {
    float *buf = malloc(sizeof(float) * (size_t)B * (size_t)H * 5);
    if (!buf) return -2;
    float *x = buf, *u = x + B * H, *y = u + B * H, *o = y + B * H; /* o: (B, 2H) */
    for (long r = 0; r < B; r++) {
        const float *e = embed + tokens[r] * H;
        for (long h = 0; h < H; h++) x[r * H + h] = e[h];
    }
    const long per_layer = Btot * H * 2 * M, offset = r0 * H * 2 * M;
    int rc = 0;
    for (long l = 0; l < n_layers && rc == 0; l++) {
        const NetLayer *L = layers + l;
        const float *xs = state + l * per_layer + offset;
        float *xo = state_out + l * per_layer + offset;
        layer_norm(B, H, x, u, L->ln_w, L->ln_b, eps);
        const float *const *p = L->p;
        if (L->form == 0)
            diag_step(B, H, M, xs, xo, u, y, p[0], p[1], p[2], p[3], p[4], p[5]);
        else
            rc = dplr_step(B, H, M, L->rank, xs, xo, u, y, p[0], p[1], p[2], p[3], p[4], p[5], p[6],
                           p[7], p[8], p[9], p[10]);
        for (long r = 0; r < B; r++) { /* GELU(y + D u), exact (erf) form */
            float *yr = y + r * H;
            const float *ur = u + r * H;
#pragma omp simd
            for (long h = 0; h < H; h++) {
                const float z = yr[h] + L->d_skip[h] * ur[h];
                yr[h] = 0.5f * z * (1.0f + erff(z * 0.70710678118654752f));
            }
        }
        linear_t(B, H, 2 * H, y, L->out_wt, L->out_b, o);
        for (long r = 0; r < B; r++) { /* residual + GLU: a · sigmoid(g) */
            float *xr = x + r * H;
            const float *a = o + r * 2 * H, *g = a + H;
#pragma omp simd
            for (long h = 0; h < H; h++) xr[h] += a[h] / (1.0f + expf(-g[h]));
        }
    }
    if (rc == 0) {
        layer_norm(B, H, x, u, lnf_w, lnf_b, eps);
        linear_t(B, H, V, u, head_t, head_b, logits);
    }
    free(buf);
    return rc;
}

/* Batches of NET_PARALLEL_ROWS rows or more are split into one block of rows per thread, each
 * stepped through the whole network independently (no synchronization between layers; the
 * per-layer parallel loops above then run serially inside each thread). */
#define NET_PARALLEL_ROWS 8

int net_step(long B, long H, long V, long n_layers, long M, const long *tokens, const float *embed,
             const NetLayer *layers, const float *lnf_w, const float *lnf_b, const float *head_t,
             const float *head_b, float eps, const float *state, float *state_out, float *logits) {
    if (B < NET_PARALLEL_ROWS)
        return net_rows(B, B, 0, H, V, n_layers, M, tokens, embed, layers, lnf_w, lnf_b, head_t, head_b, eps,
                        state, state_out, logits);
    int rc = 0;
#pragma omp parallel reduction(min : rc)
    {
        const long nt = omp_get_num_threads(), t = omp_get_thread_num();
        const long lo = B * t / nt, hi = B * (t + 1) / nt;
        if (hi > lo)
            rc = net_rows(hi - lo, B, lo, H, V, n_layers, M, tokens + lo, embed, layers, lnf_w, lnf_b, head_t,
                          head_b, eps, state, state_out, logits + lo * V);
    }
    return rc;
}

/* Sampling for rows with plain temperature (no top-k, top-p or penalty): row r draws the first
 * token whose cumulative probability under softmax(logits / temp[r]) reaches u[r] (the inverse
 * CDF, as model/sampling.py does with torch ops); temp[r] == 0 takes the argmax. The same limits as
 * model/sampling.py (sanitize_logits, scale_logits): weights exp((z - max z) / T) with the
 * difference and T in double, so a tiny or denormal T gives the argmax, never inf - inf; NaN weighs 0; a row with +inf entries draws among
 * them alone; a row with nothing above -inf is uniform. */
void sample_rows(long B, long V, const float *logits, const double *temp, const float *u, long *out) {
    for (long r = 0; r < B; r++) {
        const float *z = logits + r * V;
        long best = -1;
        for (long v = 0; v < V; v++)
            if (z[v] == z[v] && (best < 0 || z[v] > z[best])) best = v; /* the first maximum, NaN skipped */
        const int flat = best < 0 || z[best] == -INFINITY; /* nothing above -inf: uniform */
        if (temp[r] == 0.0) {
            out[r] = flat ? 0 : best;
            continue;
        }
        const double t = temp[r]; /* double: every finite T > 0 and every float difference is exact-range */
        const float zb = flat ? 0.0f : z[best];
        const int pos = zb == INFINITY;
        float cdf[V], total = 0.0f;
#pragma omp simd
        for (long v = 0; v < V; v++) {
            const float d = (float)(((double)z[v] - (double)zb) / t); /* <= 0; NaN for a NaN logit */
            const float w = d == d ? expf(d) : 0.0f;
            cdf[v] = flat ? 1.0f : pos ? (z[v] == INFINITY ? 1.0f : 0.0f) : (z[v] == zb ? 1.0f : w);
        }
        for (long v = 0; v < V; v++) cdf[v] = (total += cdf[v]);
        const float target = u[r] * total;
        long k = 0;
        while (k < V - 1 && cdf[k] < target) k++;
        out[r] = k;
    }
}
