/* Fused recurrent SSM steps for CPU: one pass over the state per layer and step.
 *
 * Layouts (float32, C-contiguous): state x and x_out (B, H, 2, M) = the two real coordinates of M
 * slots per channel (a diagonal layer's real block-diagonal form, model/recurrent.py real_block_slots: a
 * complex mode's real and imaginary parts, or two real modes; a DPLR layer's M complex modes); u and y
 * (B, H); per-channel parameters (H, M); low-rank terms (R, H, M); Minv (H, R, R). x_out may be x
 * itself (in-place update).
 * Built at first use by model/fused.py with the system C compiler.
 */
#include <stddef.h>

#define MAX_MODES 1024
#define MAX_RANK 4

/* Eight floats as one value (GCC/Clang vector extensions: AVX on x86-64, two NEON registers on
 * arm64); ld/st by memcpy, so no alignment is assumed. */
typedef float f8 __attribute__((vector_size(32)));
static inline f8 ld8(const float *p) {
    f8 v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}
static inline void st8(float *p, f8 v) { __builtin_memcpy(p, &v, sizeof v); }
#if defined(__AVX512F__) || defined(__FMA__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
/* The first n (0 < n < 8) floats at p as a vector, zeros after; and its store of the first n lanes
 * (masked on AVX-512VL and on AVX2: never touching p[n ..]; else copied). A channel's last M mod 8 modes
 * go through these, one vector for the rest of the modes instead of scalar code. (The copy, a memcpy of a
 * run-time size, is a libc call: on AVX2 it made the text model's batch-1 SSM step several times slower
 * for its M = 35 modes, so AVX2 masks too; where M ≥ 8 it now overlaps a full vector instead, see
 * diag_channel_rows.) */
#if !(defined(__AVX512F__) && defined(__AVX512VL__)) && defined(__AVX2__)
static inline __m256i mask8(long n) { /* lanes j < n all ones */
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif
static inline f8 ld8_part(const float *p, long n) {
#if defined(__AVX512F__) && defined(__AVX512VL__)
    return (f8)_mm256_maskz_loadu_ps((__mmask8)((1u << n) - 1u), p);
#elif defined(__AVX2__)
    return (f8)_mm256_maskload_ps(p, mask8(n));
#else
    f8 v = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    __builtin_memcpy(&v, p, sizeof(float) * (size_t)n);
    return v;
#endif
}
static inline void st8_part(float *p, f8 v, long n) {
#if defined(__AVX512F__) && defined(__AVX512VL__)
    _mm256_mask_storeu_ps(p, (__mmask8)((1u << n) - 1u), (__m256)v);
#elif defined(__AVX2__)
    _mm256_maskstore_ps(p, mask8(n), (__m256)v);
#else
    __builtin_memcpy(p, &v, sizeof(float) * (size_t)n);
#endif
}

#define SSM_ROWS 8 /* rows whose SSM step (diagonal or DPLR) shares one load of a channel's parameters */
#define DPLR_ROWS 4 /* of those, rows per dplr_channel_rows call: 8 spill its accumulators on AVX2 */

/* a·b + c rounded once, lane by lane. The DPLR step writes its products-and-sums with it, so no bare product
 * feeds a sum that the compiler might fuse (GCC contracts a·b + c by default, and which product of p·g + q·h
 * it fuses can differ between two inlined copies of the same code: a row's bits would then depend on how many
 * rows share the call). */
static inline __attribute__((always_inline)) f8 fma8(f8 a, f8 b, f8 c) {
#if defined(__FMA__)
    return (f8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    f8 r;
    for (int j = 0; j < 8; j++) r[j] = __builtin_fmaf(a[j], b[j], c[j]);
    return r;
#endif
}

/* The first k ≤ 8 floats at p as a vector (zeros after), and the store of its first k lanes: a full vector when k
 * is 8 (folded where k is a constant). */
static inline __attribute__((always_inline)) f8 ldk(const float *p, long k) { return k == 8 ? ld8(p) : ld8_part(p, k); }
static inline __attribute__((always_inline)) void stk(float *p, f8 v, long k) {
    if (k == 8)
        st8(p, v);
    else
        st8_part(p, v, k);
}

/* A vector's eight lanes summed in one fixed order (every channel's y and every Woodbury sum): a row's bits do not
 * depend on which other rows share the call. */
static inline __attribute__((always_inline)) float hsum8(f8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* The step of 8 slots of the real block-diagonal form (recurrent.py: real_block_slots), coordinates vr, vi:
 * r = a vr − b vi + pbr u, im = s vi + b vr + pbi u (for a complex mode s = a: x' = μ x + b u, μ = a + i b;
 * for two real modes b = 0), and their terms of y, pcr r − pci im: one function for every vector of slots,
 * so each slot's arithmetic is the same whichever vector holds it. */
static inline __attribute__((always_inline)) f8 diag_modes(f8 a, f8 s, f8 b, f8 pbr, f8 pbi, f8 pcr, f8 pci,
                                                           f8 vr, f8 vi, float uu, f8 *r, f8 *im) {
    *r = a * vr - b * vi + pbr * uu;
    *im = s * vi + b * vr + pbi * uu;
    return pcr * *r - pci * *im;
}

#if !(defined(__AVX512F__) && defined(__AVX512VL__)) && defined(__AVX2__) && !defined(S4_MASKED_TAIL)
/* AVX2 has no masked store that is fast everywhere (AMD's VMASKMOVPS store is microcoded: the text model's
 * M = 35 made the last vector of modes cost as much as three full ones), so for M ≥ 8 the last k = M mod 8
 * modes go through the full vector of modes M − 8 … M − 1, its state loaded before the full vectors are
 * stored and itself stored after them: its first 8 − k lanes recompute, with the same arithmetic, the
 * values the last full vector stored; its terms of y move down to lanes 0 … k − 1, where the partial
 * vector puts them: for finite inputs, bit for bit the masked vector's results (the tests compare a build
 * with -DS4_MASKED_TAIL). The 35-mode SSM step: 1.3x faster alone, audio-digits-s4 decode 1.1-1.2x. */
#define SSM_OVERLAP_TAIL 1
#endif

/* The diagonal step of one channel h over its M slots for n ≤ SSM_ROWS rows (row i: its channel state at
 * xs[i] + off, M first coordinates then M second ones, → xo[i] + off, which may alias it: each slot is read
 * before it is written; input u[i·H + h] → y[i·H + h]): diag_modes per slot (a complex mode's
 * nr + i·ni = μ (xr + i·xi) + b u, y = Σ Re(c x')), params (mur, mui, br, bi, cr, ci, mus). Slots 8
 * at a time in one vector accumulator per row, reduced once (not a horizontal sum per vector, as `omp simd
 * reduction` compiled it: 1.3–1.6× slower for H = 128, M = 32–35), the M mod 8 rest as one partial vector
 * (zeros beyond M add nothing). Each 8 modes' parameters are loaded once for the n rows; a row's
 * arithmetic does not depend on n (diag_channel is n = 1), so its bits are those of the row alone. */
static inline __attribute__((always_inline)) void
diag_channel_rows(const long n, long M, const float *const *xs, float *const *xo, long off, long H, long h,
                  const float *u, float *y, const float *mur, const float *mui, const float *br, const float *bi,
                  const float *cr, const float *ci, const float *mus) {
    f8 acc[SSM_ROWS];
    float uu[SSM_ROWS];
    for (long i = 0; i < n; i++) {
        acc[i] = (f8){0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        uu[i] = u[i * H + h];
    }
    long mend = M; /* modes up to mend in full vectors, the rest after them */
#ifdef SSM_OVERLAP_TAIL
    f8 tr[SSM_ROWS], ti[SSM_ROWS]; /* the state of modes M − 8 … M − 1 as it was */
    const int overlap = M >= 8 && (M & 7);
    if (overlap) {
        mend = M - (M & 7);
        for (long i = 0; i < n; i++) {
            tr[i] = ld8(xs[i] + off + M - 8);
            ti[i] = ld8(xs[i] + off + 2 * M - 8);
        }
    }
#endif
    long m = 0;
    for (; m + 8 <= mend; m += 8) {
        const f8 a = ld8(mur + m), sd = ld8(mus + m), b = ld8(mui + m), pbr = ld8(br + m), pbi = ld8(bi + m),
                 pcr = ld8(cr + m), pci = ld8(ci + m);
        for (long i = 0; i < n; i++) {
            const float *xr = xs[i] + off, *xi = xr + M;
            float *nr = xo[i] + off, *ni = nr + M;
            f8 r, im;
            acc[i] += diag_modes(a, sd, b, pbr, pbi, pcr, pci, ld8(xr + m), ld8(xi + m), uu[i], &r, &im);
            st8(nr + m, r);
            st8(ni + m, im);
        }
    }
#ifdef SSM_OVERLAP_TAIL
    if (overlap) {
        const long k = M - mend, t = M - 8;
        const __m256 low = _mm256_castsi256_ps(mask8(k));
        const __m256i down = /* lane j ← lane j + 8 − k */
            _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)(8 - k)));
        const f8 a = ld8(mur + t), sd = ld8(mus + t), b = ld8(mui + t), pbr = ld8(br + t), pbi = ld8(bi + t),
                 pcr = ld8(cr + t), pci = ld8(ci + t);
        for (long i = 0; i < n; i++) {
            float *nr = xo[i] + off, *ni = nr + M;
            f8 r, im;
            const f8 d = diag_modes(a, sd, b, pbr, pbi, pcr, pci, tr[i], ti[i], uu[i], &r, &im);
            st8(nr + t, r);
            st8(ni + t, im);
            acc[i] += (f8)_mm256_and_ps(_mm256_permutevar8x32_ps((__m256)d, down), low);
        }
        m = M;
    }
#endif
    if (m < M) {
        const long k = M - m;
        const f8 a = ld8_part(mur + m, k), sd = ld8_part(mus + m, k), b = ld8_part(mui + m, k),
                 pbr = ld8_part(br + m, k), pbi = ld8_part(bi + m, k), pcr = ld8_part(cr + m, k),
                 pci = ld8_part(ci + m, k);
        for (long i = 0; i < n; i++) {
            const float *xr = xs[i] + off, *xi = xr + M;
            float *nr = xo[i] + off, *ni = nr + M;
            f8 r, im;
            const f8 vr = ld8_part(xr + m, k), vi = ld8_part(xi + m, k);
            acc[i] += diag_modes(a, sd, b, pbr, pbi, pcr, pci, vr, vi, uu[i], &r, &im);
            st8_part(nr + m, r, k);
            st8_part(ni + m, im, k);
        }
    }
    for (long i = 0; i < n; i++) y[i * H + h] = hsum8(acc[i]);
}

/* diag_channel_rows with a compile-time row count where it is common (SSM_ROWS, 1: the row loops unrolled),
 * a run-time one otherwise: the same arithmetic either way. */
static inline __attribute__((always_inline)) void
diag_channel_rows_n(long n, long M, const float *const *xs, float *const *xo, long off, long H, long h,
                    const float *u, float *y, const float *mur, const float *mui, const float *br, const float *bi,
                    const float *cr, const float *ci, const float *mus) {
    if (n == SSM_ROWS)
        diag_channel_rows(SSM_ROWS, M, xs, xo, off, H, h, u, y, mur, mui, br, bi, cr, ci, mus);
    else if (n == 1)
        diag_channel_rows(1, M, xs, xo, off, H, h, u, y, mur, mui, br, bi, cr, ci, mus);
    else
        diag_channel_rows(n, M, xs, xo, off, H, h, u, y, mur, mui, br, bi, cr, ci, mus);
}

/* One channel of one row: its state xs (2, M) → xo (may be xs itself), input uu; returns its y. */
static inline float diag_channel(long M, const float *xs, float *xo, float uu, const float *mur, const float *mui,
                                 const float *br, const float *bi, const float *cr, const float *ci,
                                 const float *mus) {
    float y;
    diag_channel_rows(1, M, &xs, &xo, 0, 1, 0, &uu, &y, mur, mui, br, bi, cr, ci, mus);
    return y;
}

/* The real block-diagonal step (diag_modes) of B rows of H channels of M slots: x (B, H, 2, M) → xo (may be
 * x), u (B, H) → y (B, H). */
void diag_step(long B, long H, long M, const float *x, float *xo, const float *u, float *y,
               const float *mur, const float *mui, const float *br, const float *bi,
               const float *cr, const float *ci, const float *mus) {
#pragma omp parallel for schedule(static) if (B * H * M >= 65536)
    for (long bh = 0; bh < B * H; bh++) {
        const long o = (bh % H) * M;
        const float *xr = x + bh * 2 * M;
        float *nr = xo + bh * 2 * M;
        y[bh] = diag_channel(M, xr, nr, u[bh], mur + o, mui + o, br + o, bi + o, cr + o, ci + o, mus + o);
    }
}

/* The exact bilinear DPLR step (S4 paper, Section 3.3 and Appendix C.2: (I − Δ/2·A) x' = (I + Δ/2·A) x + ΔB u
 * solved by Woodbury) of one channel for n ≤ DPLR_ROWS rows (row i: its channel state at xs[i] + off, M real
 * parts then M imaginary parts, → xo[i] + off, which may alias it; input u[i·stride + at] → y[i·stride + at]).
 * Parameters, already at the channel: dbr, dbi, dr, di, cr, ci (M each); the rank-R terms pr, pi, qr, qi at
 * j·rs (j < R); minv (R, R). Two passes over the modes, 8 at a time (the M mod 8 rest as one partial vector:
 * zeros beyond M add nothing):
 *   1. g = D⁻¹(2x + ΔB u); xo ← g − x; s_j += Σ (Pr_j gr + Pi_j gi) in one vector accumulator per row and j;
 *   2. t = M⁻¹ s; xo ← xo − Σⱼ Qⱼ tⱼ; y += Σ Re(c xo), again one vector accumulator per row.
 * Each 8 modes' parameters are loaded once for the n rows (the diagonal step's row blocking,
 * diag_channel_rows); a row's arithmetic does not depend on n, so its bits are those of the row alone. */
static inline __attribute__((always_inline)) void
dplr_pass1(const long n, long M, const long R, long m, long k, const float *const *xs, float *const *xo, long off,
           const float *uu, f8 (*acc)[MAX_RANK], const float *dbr, const float *dbi, const float *dr, const float *di,
           const float *pr, const float *pi, long rs) {
    const f8 a = ldk(dbr + m, k), b = ldk(dbi + m, k), c = ldk(dr + m, k), d = ldk(di + m, k);
    f8 p_r[MAX_RANK], p_i[MAX_RANK];
    for (long j = 0; j < R; j++) {
        p_r[j] = ldk(pr + j * rs + m, k);
        p_i[j] = ldk(pi + j * rs + m, k);
    }
    for (long i = 0; i < n; i++) {
        const float *xr = xs[i] + off;
        float *nr = xo[i] + off;
        const f8 vr = ldk(xr + m, k), vi = ldk(xr + M + m, k), ui = {uu[i], uu[i], uu[i], uu[i],
                                                                     uu[i], uu[i], uu[i], uu[i]};
        const f8 fr = fma8(a, ui, vr + vr), fi = fma8(b, ui, vi + vi);
        const f8 gr = fma8(c, fr, -(d * fi)), gi = fma8(c, fi, d * fr);
        for (long j = 0; j < R; j++) acc[i][j] = fma8(p_r[j], gr, fma8(p_i[j], gi, acc[i][j]));
        stk(nr + m, gr - vr, k);
        stk(nr + M + m, gi - vi, k);
    }
}

static inline __attribute__((always_inline)) void
dplr_pass2(const long n, long M, const long R, long m, long k, float *const *xo, long off, float (*t)[MAX_RANK],
           f8 *acc, const float *qr, const float *qi, long rs, const float *cr, const float *ci) {
    const f8 er = ldk(cr + m, k), ei = ldk(ci + m, k);
    f8 q_r[MAX_RANK], q_i[MAX_RANK];
    for (long j = 0; j < R; j++) {
        q_r[j] = ldk(qr + j * rs + m, k);
        q_i[j] = ldk(qi + j * rs + m, k);
    }
    for (long i = 0; i < n; i++) {
        float *nr = xo[i] + off;
        f8 wr = ldk(nr + m, k), wi = ldk(nr + M + m, k);
        for (long j = 0; j < R; j++) {
            const f8 tj = {-t[i][j], -t[i][j], -t[i][j], -t[i][j], -t[i][j], -t[i][j], -t[i][j], -t[i][j]};
            wr = fma8(q_r[j], tj, wr);
            wi = fma8(q_i[j], tj, wi);
        }
        acc[i] = fma8(er, wr, fma8(-ei, wi, acc[i]));
        stk(nr + m, wr, k);
        stk(nr + M + m, wi, k);
    }
}

static inline __attribute__((always_inline)) void
dplr_channel_rows(const long n, long M, const long R, const float *const *xs, float *const *xo, long off,
                  long stride, long at, const float *u, float *y, const float *dbr, const float *dbi, const float *dr,
                  const float *di, const float *pr, const float *pi, long rs, const float *minv, const float *qr,
                  const float *qi, const float *cr, const float *ci) {
    f8 acc[DPLR_ROWS][MAX_RANK], yacc[DPLR_ROWS];
    float uu[DPLR_ROWS], t[DPLR_ROWS][MAX_RANK];
    for (long i = 0; i < n; i++) {
        uu[i] = u[i * stride + at];
        yacc[i] = (f8){0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        for (long j = 0; j < R; j++) acc[i][j] = yacc[i];
    }
    long m = 0;
    for (; m + 8 <= M; m += 8) dplr_pass1(n, M, R, m, 8, xs, xo, off, uu, acc, dbr, dbi, dr, di, pr, pi, rs);
    if (m < M) dplr_pass1(n, M, R, m, M - m, xs, xo, off, uu, acc, dbr, dbi, dr, di, pr, pi, rs);
    for (long i = 0; i < n; i++) { /* t = M⁻¹ s */
        float s[MAX_RANK];
        for (long j = 0; j < R; j++) s[j] = hsum8(acc[i][j]);
        for (long r = 0; r < R; r++) {
            t[i][r] = 0.0f;
            for (long j = 0; j < R; j++) t[i][r] = __builtin_fmaf(minv[r * R + j], s[j], t[i][r]);
        }
    }
    for (m = 0; m + 8 <= M; m += 8) dplr_pass2(n, M, R, m, 8, xo, off, t, yacc, qr, qi, rs, cr, ci);
    if (m < M) dplr_pass2(n, M, R, m, M - m, xo, off, t, yacc, qr, qi, rs, cr, ci);
    for (long i = 0; i < n; i++) y[i * stride + at] = hsum8(yacc[i]);
}

/* CALL(N_, M_, R_) with compile-time row counts, modes and rank where they are common (FULL or 1 row; 32 modes
 * and rank 1, the official S4's defaults: the loops unroll and a row's state stays in registers; rank 2,
 * HiPPO-LegT's), run-time ones otherwise: the same arithmetic either way. Taken once for a loop over channels
 * or tokens, not inside it: the loop's code for every shape made the 1-row prompt of 32 modes 1.6x slower. */
#define DPLR_DISPATCH(n_, FULL, M_, R_, CALL)                                                                 \
    do {                                                                                                       \
        if ((M_) == 32 && (R_) == 1) {                                                                         \
            if ((n_) == (FULL))                                                                                \
                CALL((FULL), 32, 1);                                                                           \
            else if ((n_) == 1)                                                                                \
                CALL(1, 32, 1);                                                                                \
            else                                                                                               \
                CALL((n_), 32, 1);                                                                             \
        } else if ((R_) == 1) {                                                                                \
            if ((n_) == (FULL))                                                                                \
                CALL((FULL), (M_), 1);                                                                         \
            else                                                                                               \
                CALL((n_), (M_), 1);                                                                           \
        } else if ((R_) == 2) {                                                                                \
            if ((n_) == (FULL))                                                                                \
                CALL((FULL), (M_), 2);                                                                         \
            else                                                                                               \
                CALL((n_), (M_), 2);                                                                           \
        } else                                                                                                 \
            CALL((n_), (M_), (R_));                                                                            \
    } while (0)

/* dplr_channel_rows of channel h of a layer of H channels (parameters p: dbr dbi dr di pr pi minv qr qi cr ci, in
 * the layouts (H, M), (R, H, M) and (H, R, R)) for rows i0 … i0 + N_ − 1 of xs, xo, u, y (N_ ≤ DPLR_ROWS) */
#define DPLR_AT(N_, M_, R_, h, i0, off, stride, at)                                                            \
    dplr_channel_rows(N_, M_, R_, xs + (i0), xo + (i0), off, stride, at, u + (i0) * (stride),                  \
                      y + (i0) * (stride), p[0] + (h) * (M_), p[1] + (h) * (M_), p[2] + (h) * (M_),            \
                      p[3] + (h) * (M_), p[4] + (h) * (M_), p[5] + (h) * (M_), H * (M_),                       \
                      p[6] + (h) * (R_) * (R_), p[7] + (h) * (M_), p[8] + (h) * (M_), p[9] + (h) * (M_),       \
                      p[10] + (h) * (M_))

/* Channel h of a DPLR layer (parameters p, as DPLR_AT's) through L tokens of k ≤ SSM_ROWS rows, in place: row i's
 * layer state at xb[i] (H, 2, M), its token t's input u[(i·L + t)·H + h] → y at the same index (the calls of
 * stepping each token). */
static void dplr_channel_tokens(long k, long M, long R, float *const *xb, long L, long H, long h, const float *u,
                                float *y, const float *const *p) {
    const float *const *xs = (const float *const *)xb;
    float *const *xo = xb;
    for (long i0 = 0; i0 < k; i0 += DPLR_ROWS) {
        const long n = k - i0 < DPLR_ROWS ? k - i0 : DPLR_ROWS;
#define DPLR_TOKENS(N_, M_, R_)                                                                                \
    for (long t = 0; t < L; t++) DPLR_AT(N_, M_, R_, h, i0, 2 * h * (M_), L * H, t * H + h)
        DPLR_DISPATCH(n, DPLR_ROWS, M, R, DPLR_TOKENS);
#undef DPLR_TOKENS
    }
}

/* Channels h0 … h1 − 1 of a DPLR layer (parameters p, as DPLR_AT's) for n ≤ SSM_ROWS rows: row i's state xs[i]
 * (H, 2, M) → xo[i] (may be xs[i]), u (n, H) → y (n, H); each channel's rows DPLR_ROWS at a time. */
static void dplr_channels_rows(long n, long M, long R, const float *const *xs, float *const *xo, long H, long h0,
                               long h1, const float *u, float *y, const float *const *p) {
#define DPLR_CHANNELS(N_, M_, R_)                                                                              \
    for (long h = h0; h < h1; h++)                                                                             \
        for (long i0 = 0; i0 < (N_); i0 += DPLR_ROWS)                                                          \
    DPLR_AT((N_) - i0 < DPLR_ROWS ? (N_) - i0 : DPLR_ROWS, M_, R_, h, i0, 2 * h * (M_), H, h)
    DPLR_DISPATCH(n, SSM_ROWS, M, R, DPLR_CHANNELS);
#undef DPLR_CHANNELS
}

/* One channel h of one row: its state xs1 (2, M) → xo1 (may be xs1), input uu → *y1; parameters p as DPLR_AT's. */
static inline void dplr_channel(long M, long R, long H, long h, const float *xs1, float *xo1, float uu, float *y1,
                                const float *const *p) {
    const float *const *xs = &xs1;
    float *const *xo = &xo1;
    const float *u = &uu;
    float *y = y1;
#define DPLR_ONE(N_, M_, R_) DPLR_AT(N_, M_, R_, h, 0, 0, 1, 0)
    DPLR_DISPATCH(1, 1, M, R, DPLR_ONE);
#undef DPLR_ONE
}

/* Exact bilinear DPLR step: g = D⁻¹(2x + ΔB u), s = M⁻¹ Σ (Pr gr + Pi gi), x' = g − x − Σⱼ Qⱼ sⱼ,
 * y = Σ Re(c x'). Pr, Pi hold 2·P̃; Q = (Δ/2) D⁻¹ P̃. */
int dplr_step(long B, long H, long M, long R, const float *x, float *xo, const float *u, float *y,
              const float *dbr, const float *dbi, const float *dr, const float *di,
              const float *pr, const float *pi, const float *minv, const float *qr,
              const float *qi, const float *cr, const float *ci) {
    if (M > MAX_MODES || R > MAX_RANK) return -1;
    const float *const p[11] = {dbr, dbi, dr, di, pr, pi, minv, qr, qi, cr, ci};
#pragma omp parallel for schedule(static) if (B * H * M >= 65536)
    for (long bh = 0; bh < B * H; bh++)
        dplr_channel(M, R, H, bh % H, x + bh * 2 * M, xo + bh * 2 * M, u[bh], y + bh, p);
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * The whole network's step in one call (CPU, small batches): embedding → per layer [norm (LayerNorm, or
 * the scalar TransposedLN: NetLayer.norm) → SSM step → GELU(y + D u) → GLU(W z + b) → residual; then,
 * with d_ff, norm → up → GELU → down → residual] → LayerNorm → head (its bias may be NULL).
 * The same arithmetic as the torch modules (LayerNorm with biased variance, exact erf GELU, GLU = a · sigmoid(g)); sums run
 * in another order, so logits agree to float32 rounding. Called once per step instead of ~45 torch
 * ops, which dominate a small batch's step. A model with an adaptive input and softmax (the official
 * WikiText-103 recipe's: struct Adaptive, below) computes them in place of the table and the head: its
 * "logits" are the softmax's log-probabilities.
 */
#include <limits.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <sched.h>
#include <string.h>
#include <time.h>

static double monotonic_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#if defined(__GLIBC__) && defined(__x86_64__) && (__GLIBC__ > 2 || __GLIBC_MINOR__ >= 35)
/* glibc's vector variants (libmvec; math.h declares them only under -ffast-math): the GELU and
 * sigmoid loops below then evaluate 8 lanes per call, within 4 ulp */
__attribute__((simd("notinbranch"))) float expf(float);
__attribute__((simd("notinbranch"))) float erff(float);
#endif

/* Linear weights' storage: float32, or 16-bit (bfloat16, IEEE float16) widened exactly to float32 as they
 * are loaded, so the products and sums are float32 either way (a 16-bit model's weights read at half the
 * bytes, the activations never rounded to 16 bits). */
#define W_F32 0
#define W_BF16 1
#define W_F16 2
typedef struct {
    long form;  /* 0: diagonal, 1: dplr */
    long rank;
    const float *ln_w, *ln_b, *d_skip;
    const void *out_wt;           /* (H, 2H): the output linear's weight, transposed (format wfmt) */
    const float *out_b;
    const float *p[11]; /* diagonal: mur mui br bi cr ci mus; dplr: dbr dbi dr di pr pi minv qr qi cr ci */
    long d_ff;          /* 0: no feed-forward block; else x += down(GELU(up(LN(x)))) after the S4 block */
    const float *ff_ln_w, *ff_ln_b;
    const void *up_t;   /* (H, d_ff): the up linear's weight, transposed (format wfmt) */
    const float *up_b;
    const void *down_t; /* (d_ff, H) (format wfmt) */
    const float *down_b;
    long wfmt; /* the format of out_wt, up_t and down_t: W_F32, W_BF16 or W_F16 (the rest is float32) */
    long norm; /* both blocks' norm: NORM_LAYER (ln_w, ln_b, ff_ln_w, ff_ln_b: (H) each) or NORM_TLN (the
                  official scalar TransposedLN: ln_w / ff_ln_w → s, ln_b / ff_ln_b → m, one float each) */
} NetLayer;
#define NORM_LAYER 0
#define NORM_TLN 1

/* A row's mean and population variance over its H channels (the sum of squares of the deviations / H) */
static inline __attribute__((always_inline)) void row_moments(long H, const float *xr, float *mean_out,
                                                              float *var_out) {
    float mean = 0.0f, var = 0.0f;
#pragma omp simd reduction(+ : mean)
    for (long h = 0; h < H; h++) mean += xr[h];
    mean /= (float)H;
#pragma omp simd reduction(+ : var)
    for (long h = 0; h < H; h++) var += (xr[h] - mean) * (xr[h] - mean);
    *mean_out = mean;
    *var_out = var / (float)H;
}

static void layer_norm(long B, long H, const float *x, float *out, const float *w, const float *b, float eps) {
    for (long r = 0; r < B; r++) {
        const float *xr = x + r * H;
        float *o = out + r * H, mean, var;
        row_moments(H, xr, &mean, &var);
        const float inv = 1.0f / sqrtf(var + eps);
#pragma omp simd
        for (long h = 0; h < H; h++) o[h] = (xr[h] - mean) * inv * w[h] + b[h];
    }
}

/* The official S4 repo's scalar TransposedLN (model/norms.py; state-spaces/s4 src/models/nn/normalization.py):
 * y = s / σ · (x − μ + m) over each row's H channels, μ and σ the mean and population standard deviation,
 * no ε (a row of equal values gives σ = 0, and infinities or NaN, as the torch op does); s and m scalars. */
static void transposed_ln(long B, long H, const float *x, float *out, const float *s, const float *m) {
    for (long r = 0; r < B; r++) {
        const float *xr = x + r * H;
        float *o = out + r * H, mean, var;
        row_moments(H, xr, &mean, &var);
        const float k = s[0] / sqrtf(var), mm = m[0];
#pragma omp simd
        for (long h = 0; h < H; h++) o[h] = k * (xr[h] - mean + mm);
    }
}

/* A block's norm (NetLayer.norm) with its weights w, b: LayerNorm (ε eps) or the scalar TransposedLN */
static inline void block_norm(long kind, long B, long H, const float *x, float *out, const float *w, const float *b,
                              float eps) {
    if (kind == NORM_TLN)
        transposed_ln(B, H, x, out, w, b);
    else
        layer_norm(B, H, x, out, w, b, eps);
}

/* out (B, N) = bias + x (B, K) · Wt (K, N), Wt row-major (the weight transposed), in register tiles: R
 * rows × C vectors of columns held in registers through the whole sum over k, each weight vector loaded
 * once for the R rows (R = 8 with AVX-512, else 4; then 4-row tiles, then rows alone), the weight rows a
 * few k ahead prefetched (a tile walks Wt down a column panel, N floats apart, which the hardware
 * prefetchers miss). Every output element is computed by the same expression, acc = bias; acc =
 * fma(x[k], Wt[k, n], acc) for k = 0, 1, …, K − 1 (each step rounded once: fmav), whatever tile or tail
 * computes it; so a row's output is bit-identical alone or beside any other rows, and never
 * depends on them. */
/* The vector width of the linear layers and the C prefill, in floats: 16 with AVX-512, else 8. -DS4_VW=16
 * or -DS4_VW=8 builds either layout on any x86-64, the width the target lacks in GCC's generic vector code
 * (two AVX2 vectors for one of 16, or one of 8 in an AVX-512 register): the tests run the AVX-512 layout
 * (its 8-row tiles, 32-column panels and 16-channel prefill groups) on an AVX2 machine, and the AVX2
 * layout on an AVX-512 one. The intrinsics below serve only the native width. */
#ifndef S4_VW
#if defined(__AVX512F__)
#define S4_VW 16
#else
#define S4_VW 8
#endif
#endif
#if S4_VW != 8 && S4_VW != 16
#error "S4_VW must be 8 or 16"
#endif
#define LIN_VW S4_VW /* floats per vector */
#define LIN_ROWS (LIN_VW == 16 ? 8 : 4)
#define LIN_PREFETCH 12 /* weight rows ahead */
typedef float fv __attribute__((vector_size(4 * LIN_VW)));
static inline fv ldv(const float *p) {
    fv v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}
static inline void stv(float *p, fv v) { __builtin_memcpy(p, &v, sizeof v); }
/* a·b + c rounded once, written out: the compiler contracts `c + a * b` in some loops and not in others
 * (GCC 12 without AVX-512 left a one-vector tile as a multiply and an add), which would make a row's bits
 * depend on the tile that computed it. __builtin_fmaf is the same single rounding, in hardware or libm. */
static inline fv bcast(float a) {
#if defined(__AVX512F__) && LIN_VW == 16
    return (fv)_mm512_set1_ps(a);
#elif defined(__FMA__) && LIN_VW == 8
    return (fv)_mm256_set1_ps(a);
#else
    return (fv){0} + a; /* (a + 0 is a, or +0 for −0: the same product's value either way) */
#endif
}
static inline fv fmav(fv a, fv b, fv c) {
#if defined(__AVX512F__) && LIN_VW == 16
    return (fv)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__) && LIN_VW == 8
    return (fv)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    fv r;
    for (int j = 0; j < LIN_VW; j++) r[j] = __builtin_fmaf(a[j], b[j], c[j]);
    return r;
#endif
}

/* element i of a W_* weight array as float32 (scalar: the tails and the generic build) */
static inline float w_at(const int fmt, const void *p, long i) {
    if (fmt == W_F32) return ((const float *)p)[i];
    const unsigned int h = ((const unsigned short *)p)[i];
    union {
        unsigned int u;
        float f;
    } v;
    if (fmt == W_BF16) {
        v.u = h << 16;
        return v.f;
    }
    /* IEEE binary16: sign, 5 exponent bits (bias 15), 10 fraction bits */
    const unsigned int sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1fu) {
        v.u = sign | 0x7f800000u | (m << 13); /* inf, NaN */
        return v.f;
    }
    if (e == 0) return (sign ? -1.0f : 1.0f) * (float)m * 0x1p-24f; /* zero, subnormal: exact */
    v.u = sign | ((e + 112u) << 23) | (m << 13);
    return v.f;
}

/* LIN_VW weights at p (element i of a W_* array of format fmt, a constant at every call) as float32: a
 * 16-bit value widened exactly (bfloat16: its bits are a float32's high half; float16: the F16C
 * conversion, exact for every value) */
static inline fv ldw(const int fmt, const void *p, long i) {
    if (fmt == W_F32) return ldv((const float *)p + i);
    const unsigned short *q = (const unsigned short *)p + i;
#if defined(__AVX512F__) && LIN_VW == 16
    const __m256i h = _mm256_loadu_si256((const __m256i *)q);
    if (fmt == W_BF16) return (fv)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return (fv)_mm512_cvtph_ps(h);
#elif defined(__AVX2__) && defined(__F16C__) && LIN_VW == 8
    const __m128i h = _mm_loadu_si128((const __m128i *)q);
    if (fmt == W_BF16) return (fv)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return (fv)_mm256_cvtph_ps(h);
#else
    fv v;
    for (int j = 0; j < LIN_VW; j++) v[j] = w_at(fmt, q, j);
    return v;
#endif
}

/* A linear layer's weights Wt (K, N) are packed in panels of LIN_P columns: panel f (columns f·LIN_P …) is a
 * row-major (K, LIN_P) block at f·K·LIN_P, and the last N mod LIN_P columns one (K, N mod LIN_P) block after
 * the full panels (fused.py `pack_linear`). A tile's weights are then one contiguous stream, read by every
 * row tile from L1/L2 while its panel is in use, where the row-major layout's column slices (a 64-byte
 * piece every N·4 bytes) conflicted in the caches and fell out of L2 for N = 512. */
#define LIN_P (2 * LIN_VW)
long linear_panel_width(void) { return LIN_P; }

/* the index of element (0, n) of a packed (K, N) weight, and the distance between its rows k, k + 1 */
static inline long pk_at(long K, long N, long n, long *stride) {
    const long F = N / LIN_P;
    if (n < F * LIN_P) {
        *stride = LIN_P;
        return (n / LIN_P) * K * LIN_P + n % LIN_P;
    }
    *stride = N - F * LIN_P;
    return F * K * LIN_P + (n - F * LIN_P);
}

/* out[i, n0 + c·VW + j] for the rows i < R (row i at x + i·K, out + i·ldo) and vectors c < C (R, C and fmt
 * constants at every call, so the tile unrolls into registers); Wt packed */
static inline __attribute__((always_inline)) void lin_tile(const int fmt, const long R, const long C, long K,
                                                           long N, const float *x, const void *Wt,
                                                           const float *bias, float *out, long ldo, long n0) {
    fv acc[LIN_ROWS][8];
    const char *w[8]; /* vector c's weights at row k = 0, and the bytes from one row to the next: the same for
                         every vector of a tile (a tile of C > 1 vectors starts on a panel and lies in the full
                         panels; only single vectors reach the last, narrower block) */
    long ws[8];
    const long es = fmt == W_F32 ? 4 : 2; /* bytes per weight */
    for (long c = 0; c < C; c++) {
        const fv b = bias ? ldv(bias + n0 + LIN_VW * c) : (fv){0};
        for (long i = 0; i < R; i++) acc[i][c] = b;
        w[c] = (const char *)Wt + pk_at(K, N, n0 + LIN_VW * c, &ws[c]) * es;
        ws[c] *= es;
    }
    /* rows k < kp prefetch row k + LIN_PREFETCH. The two loop shapes below were the fastest of five measured
     * on AVX2 (one thread: 91-97 GFLOP/s with 8-32 rows where the others ran at 63-77, and 29-37 for one row) */
    const long kp = K > LIN_PREFETCH ? K - LIN_PREFETCH : 0;
    if (R == 1) { /* a row alone (C = 8): one offset for all vectors, one prefetch per 64-byte line */
        for (long k = 0, ko = 0; k < K; k++, ko += ws[0]) {
            fv wv[8];
            for (long c = 0; c < C; c++) {
                wv[c] = ldw(fmt, w[c] + ko, 0);
                if ((c % 2 == 0 || LIN_VW * es >= 64) && k < kp) /* (a panel row: 64 B, or 128 with AVX-512) */
                    __builtin_prefetch(w[c] + ko + LIN_PREFETCH * ws[0]);
            }
            const fv a = bcast(x[k]);
            for (long c = 0; c < C; c++) acc[0][c] = fmav(a, wv[c], acc[0][c]);
        }
    } else {
        for (long k = 0; k < K; k++) {
            fv wv[8];
            for (long c = 0; c < C; c++) {
                wv[c] = ldw(fmt, w[c], 0);
                if (k < kp) __builtin_prefetch(w[c] + LIN_PREFETCH * ws[c]);
                w[c] += ws[c];
            }
            for (long i = 0; i < R; i++) {
                const fv a = bcast(x[i * K + k]);
                for (long c = 0; c < C; c++) acc[i][c] = fmav(a, wv[c], acc[i][c]);
            }
        }
    }
    for (long i = 0; i < R; i++)
        for (long c = 0; c < C; c++) stv(out + i * ldo + n0 + LIN_VW * c, acc[i][c]);
}

/* the scalar columns n0 … n1 − 1 of R rows (Wt packed; out's rows ldo apart) */
static inline __attribute__((always_inline)) void lin_cols(const int fmt, const long R, long K, long N,
                                                           const float *x, const void *Wt, const float *bias,
                                                           float *out, long ldo, long n0, long n1) {
    for (long i = 0; i < R; i++)
        for (long n = n0; n < n1; n++) {
            long st;
            const long at = pk_at(K, N, n, &st);
            float acc = bias ? bias[n] : 0.0f;
            for (long k = 0; k < K; k++) acc = __builtin_fmaf(x[i * K + k], w_at(fmt, Wt, at + k * st), acc);
            out[i * ldo + n] = acc;
        }
}

/* Bt rows (a multiple of R, a constant) over the columns n0 … n1 − 1 in groups of R: scalar columns up to a
 * multiple of LIN_VW, tiles of C vectors (within the full panels, whose rows are all LIN_P apart), then single
 * vectors, then scalar columns, each column tile for every group in turn (its panel's weights stay in L1/L2
 * for all the groups) */
static inline __attribute__((always_inline)) void lin_rows(const int fmt, const long R, const long C, long Bt,
                                                           long K, long N, const float *x, const void *Wt,
                                                           const float *bias, float *out, long ldo, long n0,
                                                           long n1) {
    const long full = N / LIN_P * LIN_P, a = (n0 + LIN_VW - 1) / LIN_VW * LIN_VW;
    if (a > n0) { /* a vector starts at a multiple of LIN_VW (never across a panel's edge) */
        lin_cols(fmt, Bt, K, N, x, Wt, bias, out, ldo, n0, a < n1 ? a : n1);
        n0 = a;
    }
    for (; n0 + C * LIN_VW <= n1 && (C == 1 || n0 + C * LIN_VW <= full); n0 += C * LIN_VW)
        for (long r0 = 0; r0 < Bt; r0 += R) lin_tile(fmt, R, C, K, N, x + r0 * K, Wt, bias, out + r0 * ldo, ldo, n0);
    for (; n0 + LIN_VW <= n1; n0 += LIN_VW)
        for (long r0 = 0; r0 < Bt; r0 += R) lin_tile(fmt, R, 1, K, N, x + r0 * K, Wt, bias, out + r0 * ldo, ldo, n0);
    lin_cols(fmt, Bt, K, N, x, Wt, bias, out, ldo, n0, n1);
}

/* one row alone: 8 vectors of columns at a time (its weights stream from memory once, whatever the tile) */
static inline __attribute__((always_inline)) void linear_row_f(const int fmt, long K, long N, const float *xr,
                                                               const void *Wt, const float *bias, float *out,
                                                               long ldo, long n0, long n1) {
    lin_rows(fmt, 1, 8, 1, K, N, xr, Wt, bias, out, ldo, n0, n1);
}

/* the columns n0 … n1 − 1 of out (B, N) = bias + x (B, K) · Wt (K, N), Wt packed */
/* A thread's scratch of at least n floats (kept for the thread's next calls; NULL when out of memory) */
static float *thread_scratch(size_t n) {
    static __thread float *buf = NULL;
    static __thread size_t cap = 0;
    if (n > cap) {
        float *p = realloc(buf, sizeof(float) * n);
        if (!p) return NULL;
        buf = p, cap = n;
    }
    return buf;
}

static void linear_cols(long fmt, long B, long K, long N, const float *x, const void *Wt, const float *bias,
                        float *out, long n0, long n1);

static inline __attribute__((always_inline)) void linear_t_f(const int fmt, long B, long K, long N, const float *x,
                                                             const void *Wt, const float *bias, float *out,
                                                             long ldo, long n0, long n1) {
    long r = B - B % LIN_ROWS; /* the rows in full groups of LIN_ROWS, panel by panel */
    lin_rows(fmt, LIN_ROWS, 2, r, K, N, x, Wt, bias, out, ldo, n0, n1);
    const long rest = B - r;
    if (rest >= 2 && n1 > n0) {
        /* 2 … LIN_ROWS − 1 rows left: one tile of 4 (or LIN_ROWS) rows, zeros below them, reads the weights
         * once where 4-row tiles and single rows read them 2-4 times (at a few rows the step streams its
         * weights from L2 or L3: text-shakespeare's decode block on one thread, 2026-12-02, 1.19x faster
         * at 2 rows, 1.40x at 3, 1.1-1.2x at 5, 1.38x at 7). A row's outputs are those of any tile (the
         * same sums in the same order), so the bits do not change. */
        const long R = rest > 4 ? LIN_ROWS : 4;
        float *xp = thread_scratch((size_t)R * (size_t)(K + N));
        if (xp) {
            float *op = xp + R * K;
            memcpy(xp, x + r * K, sizeof(float) * (size_t)(rest * K));
            memset(xp + rest * K, 0, sizeof(float) * (size_t)((R - rest) * K));
            if (R == LIN_ROWS) /* through the full groups' own code (linear_cols → the loop above: B = R, no
                                  rest): a second inlined copy of the same tile, here, ran 1.3x slower (GCC 12,
                                  AVX2: text-shakespeare's 2-row step cost more than its 4-row one) */
                linear_cols(fmt, R, K, N, xp, Wt, bias, op, n0, n1);
            else
                lin_rows(fmt, 4, 4, 4, K, N, xp, Wt, bias, op, N, n0, n1);
            for (long i = 0; i < rest; i++)
                memcpy(out + (r + i) * ldo + n0, op + i * N + n0, sizeof(float) * (size_t)(n1 - n0));
            return;
        }
    }
#if LIN_ROWS > 4
    for (; r + 4 <= B; r += 4) lin_rows(fmt, 4, 4, 4, K, N, x + r * K, Wt, bias, out + r * ldo, ldo, n0, n1);
#endif
    for (; r < B; r++) linear_row_f(fmt, K, N, x + r * K, Wt, bias, out + r * ldo, ldo, n0, n1);
}

/* The columns n0 … n1 − 1 of out (B, N) = bias + x (B, K) · Wt (K, N) with Wt in
 * format fmt (W_F32, W_BF16, W_F16): one specialized copy of the tiles per format. Each element's bits do
 * not depend on the column range that computed it. */
static void linear_cols_ld(long fmt, long B, long K, long N, const float *x, const void *Wt, const float *bias,
                           float *out, long ldo, long n0, long n1) {
    if (fmt == W_BF16)
        linear_t_f(W_BF16, B, K, N, x, Wt, bias, out, ldo, n0, n1);
    else if (fmt == W_F16)
        linear_t_f(W_F16, B, K, N, x, Wt, bias, out, ldo, n0, n1);
    else
        linear_t_f(W_F32, B, K, N, x, Wt, bias, out, ldo, n0, n1);
}

/* the same, out (B, N) with its rows N apart */
static void linear_cols(long fmt, long B, long K, long N, const float *x, const void *Wt, const float *bias,
                        float *out, long n0, long n1) {
    linear_cols_ld(fmt, B, K, N, x, Wt, bias, out, N, n0, n1);
}

/* out (B, N) = bias + x (B, K) · Wt (K, N) with Wt in format fmt: all the columns */
static void linear_tw(long fmt, long B, long K, long N, const float *x, const void *Wt, const float *bias,
                      float *out) {
    linear_cols(fmt, B, K, N, x, Wt, bias, out, 0, N);
}

static void linear_t(long B, long K, long N, const float *x, const float *Wt, const float *bias, float *out) {
    linear_t_f(W_F32, B, K, N, x, Wt, bias, out, N, 0, N);
}

/* For bench.linear and the tests: out = x · Wt + bias, Wt packed (LIN_P panels) in format fmt (W_*), by the
 * row loop (tiled = 0: one row at a time, which the tiles run as linear_row_f) or the row tiles (1): the same
 * bits. */
void linear_rows(long tiled, long fmt, long B, long K, long N, const float *x, const void *Wt, const float *bias,
                 float *out) {
    if (tiled)
        linear_tw(fmt, B, K, N, x, Wt, bias, out);
    else
        for (long r = 0; r < B; r++) linear_tw(fmt, 1, K, N, x + r * K, Wt, bias, out + r * N);
}

/* out = x · Wt + bias as linear_rows' tiles, the rows shared out over nthreads threads in runs of whole tiles
 * (SaShiMi's prefill on CPU: model/arch/sashimi_recurrent.py RowwiseLinear). A row's bits are those of the row
 * alone, whatever B, the thread count or the run it falls in (the tiles' promise above). */
void linear_rows_threads(long fmt, long B, long K, long N, const float *x, const void *Wt, const float *bias,
                         float *out, long nthreads) {
    const long tiles = (B + LIN_ROWS - 1) / LIN_ROWS;
    long nt = nthreads < tiles ? nthreads : tiles;
    if (nt < 2 || omp_in_parallel()) {
        linear_tw(fmt, B, K, N, x, Wt, bias, out);
        return;
    }
    const long per = (tiles + nt - 1) / nt * LIN_ROWS; /* rows a thread: whole tiles */
#pragma omp parallel for schedule(static) num_threads(nt)
    for (long t = 0; t < nt; t++) {
        const long r0 = t * per, r1 = r0 + per < B ? r0 + per : B;
        if (r1 > r0) linear_tw(fmt, r1 - r0, K, N, x + r0 * K, Wt, bias, out + r0 * N);
    }
}

/* Whether the C steps take layer L with M modes (a DPLR layer: at most MAX_MODES modes and MAX_RANK). */
static inline int layer_fits(const NetLayer *L, long M) {
    return L->form == 0 || (M <= MAX_MODES && L->rank <= MAX_RANK);
}

/* Whether a layer's channels (H of M modes) are worth splitting over threads: big enough, and not already
 * inside a parallel region (a decode block or a prefill gives each thread its own rows). The test comes
 * before the parallel region, not in an `if` clause: entering a region with `if (0)`, or nested, still
 * starts a team of one in libgomp, which cost 5-7 % of audio-digits-s4's decode at 16 rows. */
static inline int split_channels(long H, long M) { return H * M >= 65536 && !omp_in_parallel(); }

/* Channels h0 … h1 − 1 of layer Ly (H channels of M modes; it fits: layer_fits) for n ≤ SSM_ROWS rows: row i's
 * state xs[i] (H, 2, M) → xo[i] (may be xs[i]), u (n, H) → y (n, H). Each channel's rows together, each 8 modes'
 * parameters loaded once for them (diag_channel_rows; dplr_channel_rows, DPLR_ROWS rows a call). A row's bits do
 * not depend on n, h0 or h1: the step, the prefill by steps and the split step all come here or to
 * ssm_channels_tokens, which makes the same calls. */
static void ssm_channels(const NetLayer *Ly, long H, long M, long n, const float *const *xs, float *const *xo,
                         long h0, long h1, const float *u, float *y) {
    const float *const *p = Ly->p;
    if (Ly->form != 0) {
        dplr_channels_rows(n, M, Ly->rank, xs, xo, H, h0, h1, u, y, p);
        return;
    }
    for (long h = h0; h < h1; h++) {
        const long o = h * M;
        diag_channel_rows_n(n, M, xs, xo, 2 * o, H, h, u, y, p[0] + o, p[1] + o, p[2] + o, p[3] + o, p[4] + o,
                            p[5] + o, p[6] + o);
    }
}

/* One block's SSM step for n ≤ SSM_ROWS rows (ssm_channels), its channels split over the threads when the layer
 * is wide (split_channels). -1: layer_fits fails. */
static int ssm_rows(const NetLayer *L, long H, long M, long n, const float *const *xs, float *const *xo,
                    const float *u, float *y) {
    if (!layer_fits(L, M)) return -1;
    if (split_channels(H, M)) {
#pragma omp parallel for schedule(static)
        for (long h = 0; h < H; h++) ssm_channels(L, H, M, n, xs, xo, h, h + 1, u, y);
    } else {
        ssm_channels(L, H, M, n, xs, xo, 0, H, u, y);
    }
    return 0;
}

/* Channels h0 … h1 − 1 of layer Ly through L tokens of k ≤ SSM_ROWS rows (a prompt's recurrence, in place): row
 * i's layer state at xb[i] (H, 2, M), its token t's input u[(i·L + t)·H + h] → y at the same index. The k rows
 * step together, token by token (diag_channel_rows with row stride L·H; dplr_channel_tokens): the calls of
 * stepping k·L times, so the bits are stepping's. prefill_rows and the split prefill (split_team_step) share
 * it. */
static inline void ssm_channels_tokens(const NetLayer *Ly, long H, long M, long L, long k, float *const *xb,
                                       long h0, long h1, const float *u, float *y) {
    const float *const *p = Ly->p;
    for (long h = h0; h < h1; h++) {
        if (Ly->form != 0) {
            dplr_channel_tokens(k, M, Ly->rank, xb, L, H, h, u, y, p);
            continue;
        }
        const long o = h * M;
        for (long t = 0; t < L; t++)
            diag_channel_rows_n(k, M, (const float *const *)xb, xb, 2 * o, L * H, t * H + h, u, y, p[0] + o,
                                p[1] + o, p[2] + o, p[3] + o, p[4] + o, p[5] + o, p[6] + o);
    }
}

/* The position-wise elementwise ops, on n consecutive elements. Not inlined: the step of a few rows split
 * over threads by channels (net_rows_split) runs them on slices, and the same machine code over the same
 * elements keeps its bits those of the whole-row calls (a vectorized loop's lanes and its scalar rest call
 * different expf / erff). */
/* y ← GELU(y + d·u), exact (erf) form */
static __attribute__((noinline)) void gelu_skip(long n, float *y, const float *u, const float *d) {
#pragma omp simd
    for (long h = 0; h < n; h++) {
        const float z = y[h] + d[h] * u[h];
        y[h] = 0.5f * z * (1.0f + erff(z * 0.70710678118654752f));
    }
}

/* x ← x + a · sigmoid(g) (the GLU's residual) */
static __attribute__((noinline)) void glu_add(long n, float *x, const float *a, const float *g) {
#pragma omp simd
    for (long h = 0; h < n; h++) x[h] += a[h] / (1.0f + expf(-g[h]));
}

/* f ← GELU(f), exact (erf) form */
static __attribute__((noinline)) void gelu(long n, float *f) {
#pragma omp simd
    for (long h = 0; h < n; h++) f[h] = 0.5f * f[h] * (1.0f + erff(f[h] * 0.70710678118654752f));
}

/* x ← x + y */
static inline void add_to(long n, float *x, const float *y) {
#pragma omp simd
    for (long h = 0; h < n; h++) x[h] += y[h];
}

/* The rest of an S4 block for B rows once its SSM step has written y (B, H) from u = LN(x): y ← GELU(y + D u),
 * x += GLU(out(y)). Scratch: o (B, 2H); y is overwritten. */
static void s4_rest(long B, long H, const NetLayer *L, float *x, const float *u, float *y, float *o) {
    for (long r = 0; r < B; r++) gelu_skip(H, y + r * H, u + r * H, L->d_skip);
    linear_tw(L->wfmt, B, H, 2 * H, y, L->out_wt, L->out_b, o);
    for (long r = 0; r < B; r++) glu_add(H, x + r * H, o + r * 2 * H, o + r * 2 * H + H);
}

/* The FF block of L (d_ff > 0) for B rows: x += down(GELU(up(LN(x)))), exact (erf) GELU. Scratch: u, y (B, H),
 * f (B, d_ff). */
static void ff_block(long B, long H, const NetLayer *L, float *x, float *u, float *y, float *f, float eps) {
    const long Fl = L->d_ff;
    block_norm(L->norm, B, H, x, u, L->ff_ln_w, L->ff_ln_b, eps);
    linear_tw(L->wfmt, B, H, Fl, u, L->up_t, L->up_b, f);
    for (long r = 0; r < B; r++) gelu(Fl, f + r * Fl);
    linear_tw(L->wfmt, B, Fl, H, f, L->down_t, L->down_b, y);
    for (long r = 0; r < B; r++) add_to(H, x + r * H, y + r * H);
}

/* The rest of a block for B rows once its SSM step has written y (B, H) from u = LN(x): s4_rest, then with
 * d_ff the FF block. Scratch: o (B, 2H), f (B, d_ff); u and y are overwritten. */
static void block_rest(long B, long H, const NetLayer *L, float *x, float *u, float *y, float *o, float *f,
                       float eps) {
    s4_rest(B, H, L, x, u, y, o);
    if (L->d_ff > 0) ff_block(B, H, L, x, u, y, f, eps);
}

typedef struct Adaptive Adaptive; /* the adaptive input and softmax (below) */

/* The isotropic network's weights and shapes (net_step's arguments) */
typedef struct {
    long H, V, n_layers, M;
    const float *embed;
    const NetLayer *layers;
    long lnf_kind; /* the final norm's kind (NetLayer.norm's codes) */
    const float *lnf_w, *lnf_b, *head_t, *head_b;
    float eps;
    const float *src; /* the state read, or NULL: the state updated is read (in place) */
    const Adaptive *ad; /* the adaptive input and softmax in place of embed and head_t / head_b, or NULL */
} NetArgs;

/* A step of a few rows (at most SPLIT_MAX_ROWS) split over the threads by channels and columns, each layer's
 * work shared out, with a barrier where one thread's outputs become another's inputs. A batch of 8 rows or more
 * gives each thread rows of its own instead (step_all_rows, decode_block), which never wait for each other;
 * one or a few rows leave all but one core idle, and at batch 1 the step is bound by reading the weights
 * (text-shakespeare's 7.9 MB a token, beyond a core's L2): split, each core reads only its part of every
 * linear layer (contiguous panels), always the same part, so a model whose weights fit in the cores' L2
 * caches together keeps them there across tokens. Each element is computed by the same expression as in
 * net_rows (the linear tiles' columns and the SSM channels do not depend on the range computing them; the
 * elementwise ops run the same non-inlined loops on slices that start at multiples of SPLIT_ALIGN), so a
 * row's logits and state are bit for bit the single thread's.
 * A barrier waits for the slowest thread: when another process takes a core, a thread descheduled mid-step
 * holds the others for a time slice (a CPU-bound process beside it made the 2-thread step of a
 * text-shakespeare-sized model 2.5-35x slower than one thread). So every barrier is timed: a wait over
 * SPLIT_STALL_S is a stall, the stalls' time decays over ~100 ms, and past 20 ms of it splitting pauses
 * (steps then run in the calling thread alone, bit for bit the same; a decode block hands its remaining steps
 * to it): for 10 ms, doubling at each pause up to 1 s (split_record). A busy machine then costs about one
 * stall a second; a rare stall (a VM's vCPU preempted by its host) pauses nothing; a machine that becomes
 * quiet splits again within one pause. */

#define SPLIT_MAX_ROWS 7
/* The cuts between the threads' channels and columns: a multiple of LIN_P (a thread's columns are whole panels)
 * and of the elementwise loops' vectors and unrolling (each element then takes the same lane of the same
 * code as in the whole row: cuts at multiples of 4 changed the bits, the tests catch it) */
#define SPLIT_ALIGN 64
/* Split when the network's linear layers hold at least this many weights (smaller ones step in a few µs,
 * where the barriers would cost more than they save); step_split_min_weights sets it (tests, bench). */
static long split_min_weights = 1L << 18;

/* The split's weight threshold: set to v when v ≥ 0 (0: split every step of a few rows when threads are
 * free); returns the value it had. */
long step_split_min_weights(long v) {
    const long old = __atomic_load_n(&split_min_weights, __ATOMIC_RELAXED);
    if (v >= 0) __atomic_store_n(&split_min_weights, v, __ATOMIC_RELAXED);
    return old;
}

#define SPLIT_STALL_S 2e-4
#define SPLIT_PAUSE_MIN_NS 10000000L   /* 10 ms */
#define SPLIT_PAUSE_MAX_NS 1000000000L /* 1 s */
static long split_resume_at = 0; /* monotonic ns before which steps do not split (0: never paused) */
static long split_pause = 0;     /* the last pause (ns) */

/* For the tests: the last thread of the next split step sleeps this long (ns) before its second barrier, as a
 * descheduled thread would hold the others, or of the next step of a batch split by rows (step_all_rows)
 * before it ends (0: never) */
static long split_test_delay = 0;

/* Sleep split_test_delay, once (the tests' stand-in for a descheduled thread) */
static void split_test_hold(void) {
    const long d = __atomic_exchange_n(&split_test_delay, 0, __ATOMIC_RELAXED);
    if (d > 0) nanosleep(&(struct timespec){d / 1000000000L, d % 1000000000L}, NULL);
}

/* A barrier wait longer than this (ns) is a stall (SPLIT_STALL_S; the tests raise it to step split on an
 * oversubscribed machine) */
static long split_stall_ns = (long)(SPLIT_STALL_S * 1e9);

/* The contention guard's state for the tests and the bench: out[0] the last pause (ns), out[1] the ns left
 * before steps split again (≤ 0: they split), out[2] the stall threshold (ns) before this call; with
 * delay_ns ≥ 0, the next split step's last thread sleeps that long before its second barrier; with
 * stall_ns ≥ 0, the stall threshold becomes stall_ns. */
void step_split_state(long delay_ns, long stall_ns, long *out) {
    if (delay_ns >= 0) __atomic_store_n(&split_test_delay, delay_ns, __ATOMIC_RELAXED);
    out[0] = __atomic_load_n(&split_pause, __ATOMIC_RELAXED);
    out[1] = __atomic_load_n(&split_resume_at, __ATOMIC_RELAXED) - (long)(monotonic_s() * 1e9);
    out[2] = stall_ns >= 0 ? __atomic_exchange_n(&split_stall_ns, stall_ns, __ATOMIC_RELAXED)
                           : __atomic_load_n(&split_stall_ns, __ATOMIC_RELAXED);
}

/* whether a barrier wait of w seconds is a stall */
static inline int split_stalled(double w) {
    return w * 1e9 > (double)__atomic_load_n(&split_stall_ns, __ATOMIC_RELAXED);
}

/* The time lost to stalls, decaying with SPLIT_DEBT_TAU_NS: a stall now and then (a VM's vCPU preempted by its
 * host for a millisecond, a few times a second on a quiet machine) costs less than the split saves and must
 * not pause it; stalls every few milliseconds (a CPU-bound process beside it) pile up past SPLIT_DEBT_MAX_NS. */
#define SPLIT_DEBT_TAU_NS 100000000L /* 100 ms */
#define SPLIT_DEBT_MAX_NS 20000000L  /* 20 ms in the last ~100 ms */
static long split_debt = 0, split_debt_at = 0;

/* Serializes split_record's read-modify-write of the guard's state: the steps of two Python threads (two
 * parallel regions) may record at once, and two doublings of one pause, or a debt written back over another's,
 * would make the pause depend on the interleaving. Taken only for a stall. */
static int split_lock = 0;

/* A barrier's stall of `wait` seconds in a split step (spin_barrier's longest wait, recorded once a barrier):
 * a stall adds to the debt; a debt past its maximum pauses splitting for twice the last pause (at least the
 * minimum, at most the maximum), or for the minimum when steps have split for over the maximum pause since
 * the last pause ended (contention that comes back long after starts again from the minimum), and clears the
 * debt. */
static void split_record(double wait) {
    if (!split_stalled(wait)) return;
    while (__atomic_test_and_set(&split_lock, __ATOMIC_ACQUIRE)) sched_yield();
    const long now = (long)(monotonic_s() * 1e9);
    const long since = now - __atomic_load_n(&split_debt_at, __ATOMIC_RELAXED);
    long debt = (long)((double)__atomic_load_n(&split_debt, __ATOMIC_RELAXED) *
                       exp(-(double)(since > 0 ? since : 0) / (double)SPLIT_DEBT_TAU_NS)) +
                (long)(wait * 1e9);
    __atomic_store_n(&split_debt_at, now, __ATOMIC_RELAXED);
    if (debt > SPLIT_DEBT_MAX_NS) {
        long pause = __atomic_load_n(&split_pause, __ATOMIC_RELAXED);
        if (now - __atomic_load_n(&split_resume_at, __ATOMIC_RELAXED) > SPLIT_PAUSE_MAX_NS ||
            pause < SPLIT_PAUSE_MIN_NS)
            pause = SPLIT_PAUSE_MIN_NS;
        else
            pause = 2 * pause < SPLIT_PAUSE_MAX_NS ? 2 * pause : SPLIT_PAUSE_MAX_NS;
        __atomic_store_n(&split_pause, pause, __ATOMIC_RELAXED);
        __atomic_store_n(&split_resume_at, now + pause, __ATOMIC_RELAXED);
        debt = 0;
    }
    __atomic_store_n(&split_debt, debt, __ATOMIC_RELAXED);
    __atomic_clear(&split_lock, __ATOMIC_RELEASE);
}

/* Whether splitting is paused (split_record) */
static inline int split_paused(void) {
    const long resume = __atomic_load_n(&split_resume_at, __ATOMIC_RELAXED);
    return resume != 0 && (long)(monotonic_s() * 1e9) < resume;
}

/* A barrier for the threads of one split step, spinning: libgomp's own barrier sleeps on a futex under
 * OMP_WAIT_POLICY=PASSIVE (how the server and the tests run, so that idle OpenMP threads leave the CPU to
 * others), and a wake-up costs more than a layer's work. Sense-reversing: the last thread to arrive resets
 * the count and flips the sense the others wait on. A wait past SPLIT_STALL_S yields the core at every
 * check (a descheduled thread it waits for may be queued on it). Returns the calling thread's own wait in
 * seconds; *longest (when not NULL): in the last thread to arrive, the longest wait (from the first arrival
 * to the last), 0 in the others, so that a stall every other thread waited out is recorded once, not once a
 * waiting thread (with 3+ threads one 11 ms preemption made 22+ ms of debt, past SPLIT_DEBT_MAX_NS). */
typedef struct {
    int count, sense;
    long first; /* the earliest arrival (monotonic ns) at the current barrier; LONG_MAX: none yet */
} SpinBarrier;

static double spin_barrier(SpinBarrier *b, int *sense, long nthreads, double *longest) {
    const int s = !*sense;
    *sense = s;
    const double t0 = monotonic_s();
    if (longest) {
        *longest = 0.0;
        const long t0_ns = (long)(t0 * 1e9);
        long first = __atomic_load_n(&b->first, __ATOMIC_RELAXED);
        while (t0_ns < first &&
               !__atomic_compare_exchange_n(&b->first, &first, t0_ns, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
        }
    }
    if (__atomic_add_fetch(&b->count, 1, __ATOMIC_ACQ_REL) == nthreads) { /* (sees every arrival's `first`) */
        const double t1 = monotonic_s();
        if (longest) {
            *longest = t1 - (double)__atomic_load_n(&b->first, __ATOMIC_RELAXED) * 1e-9;
            __atomic_store_n(&b->first, LONG_MAX, __ATOMIC_RELAXED);
        }
        __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&b->sense, s, __ATOMIC_RELEASE);
        return t1 - t0;
    }
    for (long spins = 1; __atomic_load_n(&b->sense, __ATOMIC_ACQUIRE) != s; spins++) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
        if (spins % 1024 == 0 && monotonic_s() - t0 > SPLIT_STALL_S) sched_yield();
    }
    return monotonic_s() - t0;
}

/* [lo, hi): thread t's part of n items among nt, cut at multiples of SPLIT_ALIGN (the last part ends at n) */
static inline void split_part(long n, long t, long nt, long *lo, long *hi) {
    const long c0 = (n * t / nt + SPLIT_ALIGN / 2) / SPLIT_ALIGN * SPLIT_ALIGN;
    const long c1 = (n * (t + 1) / nt + SPLIT_ALIGN / 2) / SPLIT_ALIGN * SPLIT_ALIGN;
    *lo = c0 < n ? c0 : n;
    *hi = t == nt - 1 ? n : (c1 < n ? c1 : n);
}

/* Whether net_rows splits a step of B rows over the threads (net_rows_split); exported for the tests */
int split_step(long B, long H, long V, long n_layers, const NetLayer *layers) {
    if (B < 1 || B > SPLIT_MAX_ROWS || omp_in_parallel() || omp_get_max_threads() < 2) return 0;
    long w = H * V;
    for (long l = 0; l < n_layers; l++) w += 2 * H * H + 2 * H * layers[l].d_ff;
    return w >= __atomic_load_n(&split_min_weights, __ATOMIC_RELAXED) && !split_paused();
}

/* ------------------------------------------------------------------------------------------------
 * The adaptive input embedding and softmax (model/adaptive.py; Baevski & Auli 2019, Grave et al. 2017; the
 * official WikiText-103 recipe's `adaptivelm` task, whose layout this follows): the vocabulary is cut into
 * shards of frequency-ordered ids. Input: a token of shard i is row id − lo_i of that shard's table (d_i wide),
 * projected to H by P_i (e = row · P_iᵀ; none when d_i = H and there is no projection), times embed_scale.
 * Output: a head log-softmax over shard 0's words and one entry per tail cluster, of the hidden state
 * projected by P_0; a word of tail shard i has log p = log p_head(cluster i) + log p_i(word), p_i a softmax
 * over its shard of the hidden state projected by P_i; tail shard i's cluster is the head's column −i. The
 * embedding's shards and the softmax's may differ (div_val 1: one table, no projection, the softmax's shards
 * still cut). Every element's arithmetic is a row's alone (the linear tiles, and one function for each
 * shard's normalizer over a whole row), so a row's log-probabilities do not depend on the batch around it
 * or on the threads that computed them. */
struct Adaptive {
    long n_in;                  /* the embedding's shards */
    const long *in_lo, *in_d;   /* their n_in + 1 bounds, their widths */
    const float *const *table;  /* shard i's table (n_i, in_d[i]), float32 */
    const void *const *in_proj; /* (in_d[i], H) packed (format wfmt): e = row · P_iᵀ; NULL: none (in_d[i] = H) */
    float scale;                /* embed_scale, after the projection */
    long n;                     /* the softmax's shards: shard 0, then the tail clusters */
    const long *lo, *d;         /* their n + 1 bounds, their widths */
    const void *const *proj;    /* (H, d[i]) packed: hidden · P_i; NULL: none (d[i] = H) */
    const void *const *w;       /* (d[i], n_i) packed: W_iᵀ */
    const float *const *b;      /* (n_i) */
    const void *cw;             /* (d[0], n − 1) packed: the head's cluster entries, transposed */
    const float *cb;            /* (n − 1) */
    long wfmt;                  /* the packed weights' format (W_F32, W_BF16, W_F16) */
};

/* the scratch floats an adaptive head of P positions needs: the projected hidden states (P, Σ d_i), the
 * cluster logits (P, n − 1) and each row's shard normalizers (P, n, 2), in that order (adaptive_parts) */
static long adaptive_scratch(const Adaptive *a, long P) {
    long d = 0;
    for (long i = 0; i < a->n; i++) d += a->d[i];
    return P * (d + a->n - 1 + 2 * a->n);
}

/* The cluster logits *cz and the normalizers *nm in an adaptive head's scratch `buf` of P positions (the
 * projected hidden states start at buf) */
static void adaptive_parts(const Adaptive *a, long P, float *buf, float **cz, float **nm) {
    *nm = buf + adaptive_scratch(a, P) - P * 2 * a->n;
    *cz = *nm - P * (a->n - 1);
}

/* x (P, H) ← the adaptive embeddings of tokens[rows[0 … P − 1]] (rows NULL: tokens[0 … P − 1]), ids in
 * range (checked by the callers): shard by shard, the shard's table rows gathered and projected together.
 * 0, or -2 out of memory. */
static int adaptive_embed(const Adaptive *a, long H, long P, const long *rows, const long *tokens, float *x) {
    long dmax = 0;
    for (long i = 0; i < a->n_in; i++) dmax = a->in_d[i] > dmax ? a->in_d[i] : dmax;
    float *buf = malloc(sizeof(float) * (size_t)(P > 0 ? P : 1) * (size_t)(dmax + H));
    long *pos = malloc(sizeof(long) * (size_t)(P > 0 ? P : 1));
    if (!buf || !pos) {
        free(buf);
        free(pos);
        return -2;
    }
    float *e = buf + P * dmax;
    for (long i = 0; i < a->n_in; i++) {
        const long lo = a->in_lo[i], hi = a->in_lo[i + 1], d = a->in_d[i];
        long m = 0;
        for (long r = 0; r < P; r++) {
            const long id = tokens[rows ? rows[r] : r];
            if (id >= lo && id < hi) {
                memcpy(buf + m * d, a->table[i] + (id - lo) * d, sizeof(float) * (size_t)d);
                pos[m++] = r;
            }
        }
        if (m == 0) continue;
        const float *src = buf;
        if (a->in_proj[i]) {
            linear_cols(a->wfmt, m, d, H, buf, a->in_proj[i], NULL, e, 0, H);
            src = e;
        }
        for (long j = 0; j < m; j++)
            for (long h = 0; h < H; h++) x[pos[j] * H + h] = src[j * H + h] * a->scale;
    }
    free(buf);
    free(pos);
    return 0;
}

/* The largest of z[0 … n − 1] (NaN skipped), −inf for none; 8 lanes, then across them */
static float max_of(long n, const float *z) {
    float m[8] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    long v = 0;
    for (; v + 8 <= n; v += 8)
        for (int j = 0; j < 8; j++) m[j] = z[v + j] > m[j] ? z[v + j] : m[j];
    for (; v < n; v++) m[0] = z[v] > m[0] ? z[v] : m[0];
    float r = m[0];
    for (int j = 1; j < 8; j++) r = m[j] > r ? m[j] : r;
    return r;
}

/* Σ exp(z[v] − mx) over v < n: expf over chunks (glibc's vector expf), summed in double over 8 lanes in a
 * fixed order */
static double sum_exp(long n, const float *z, float mx) {
    float e[512];
    double acc[8] = {0};
    for (long v0 = 0; v0 < n; v0 += 512) {
        const long c = n - v0 < 512 ? n - v0 : 512;
        for (long v = 0; v < c; v++) e[v] = expf(z[v0 + v] - mx);
        long v = 0;
        for (; v + 8 <= c; v += 8)
            for (int j = 0; j < 8; j++) acc[j] += (double)e[v + j];
        for (; v < c; v++) acc[0] += (double)e[v];
    }
    double s = 0.0;
    for (int j = 0; j < 8; j++) s += acc[j];
    return s;
}

/* Phase `phase` (0 … 3) of the adaptive head of P positions u (P, H) for thread t of k (k = 1: the whole
 * phase), logits (P, V) written in place; hp, cz, nm: the scratch (adaptive_scratch). Each phase reads only
 * what the earlier ones wrote, so threads run them with a barrier between:
 *   0: each shard's projected hidden state (its columns split between the threads) → hp;
 *   1: each shard's logits z (columns split) into its columns of `logits`, the cluster logits → cz;
 *   2: each row's normalizers of shard i (threads take whole shards: i mod k = t): max m_i and
 *      ls_i = log Σ exp(z − m_i), shard 0's over its words and the cluster entries together → nm;
 *   3: log p (columns split): shard 0's z − m_0 − ls_0; tail shard i's (z − m_i − ls_i) + (c_i − m_0 − ls_0),
 *      c_i its cluster's logit (the head's column −i). */
static void adaptive_phase(const Adaptive *a, long phase, long P, long H, long V, const float *u, float *logits,
                           float *hp, float *cz, float *nm, long t, long k) {
    const long n = a->n, nc = n - 1;
    float *h = hp;
    for (long i = 0; i < n; i++) {
        const long lo = a->lo[i], ni = a->lo[i + 1] - lo, di = a->d[i];
        const float *hi = a->proj[i] ? h : u; /* shard i's input (P, d_i) */
        long c0, c1;
        if (phase == 0 && a->proj[i]) {
            split_part(di, t, k, &c0, &c1);
            if (c1 > c0) linear_cols(a->wfmt, P, H, di, u, a->proj[i], NULL, h, c0, c1);
        } else if (phase == 1) {
            split_part(ni, t, k, &c0, &c1);
            if (c1 > c0) linear_cols_ld(a->wfmt, P, di, ni, hi, a->w[i], a->b[i], logits + lo, V, c0, c1);
            if (i == 0 && nc > 0) {
                split_part(nc, t, k, &c0, &c1);
                if (c1 > c0) linear_cols(a->wfmt, P, di, nc, hi, a->cw, a->cb, cz, c0, c1);
            }
        } else if (phase == 2 && i % k == t) {
            for (long r = 0; r < P; r++) {
                const float *z = logits + r * V + lo;
                float mx = max_of(ni, z);
                if (i == 0 && nc > 0) {
                    const float mc = max_of(nc, cz + r * nc);
                    mx = mc > mx ? mc : mx;
                }
                double sum = sum_exp(ni, z, mx);
                if (i == 0 && nc > 0) sum += sum_exp(nc, cz + r * nc, mx);
                nm[(r * n + i) * 2] = mx;
                nm[(r * n + i) * 2 + 1] = (float)log(sum);
            }
        } else if (phase == 3) {
            split_part(ni, t, k, &c0, &c1);
            for (long r = 0; r < P; r++) {
                float *z = logits + r * V + lo;
                const float mx = nm[(r * n + i) * 2], ls = nm[(r * n + i) * 2 + 1];
                if (i == 0) {
                    for (long v = c0; v < c1; v++) z[v] = (z[v] - mx) - ls;
                } else {
                    const float cl = (cz[r * nc + nc - i] - nm[r * n * 2]) - nm[r * n * 2 + 1];
                    for (long v = c0; v < c1; v++) z[v] = cl + ((z[v] - mx) - ls);
                }
            }
        }
        if (a->proj[i]) h += P * di;
    }
}

/* The adaptive head of P positions in the calling thread (its four phases in turn); 0, or -2 out of memory. */
static int adaptive_head(const Adaptive *a, long P, long H, long V, const float *u, float *logits) {
    const long A = adaptive_scratch(a, P);
    float *buf = malloc(sizeof(float) * (size_t)(A > 0 ? A : 1)), *cz, *nm;
    if (!buf) return -2;
    adaptive_parts(a, P, buf, &cz, &nm);
    for (long phase = 0; phase < 4; phase++) adaptive_phase(a, phase, P, H, V, u, logits, buf, cz, nm, 0, 1);
    free(buf);
    return 0;
}

/* The n rows rows[0 … n − 1]'s states in a layer at `off` of (…, Btot, H, 2, M) state and state_out */
static inline void row_states(const float *state, float *state_out, long off, const long *rows, long n,
                              long row_size, const float **xs, float **xo) {
    for (long i = 0; i < n; i++) {
        xs[i] = state + off + rows[i] * row_size;
        xo[i] = state_out + off + rows[i] * row_size;
    }
}

/* One split step's buffers for up to B rows: shared x, y (B, H), o (B, 2H), f (B, F); each thread's own u
 * (B, H) (the norms run in every thread); an adaptive head's scratch (adaptive_scratch); the barrier. */
typedef struct {
    float *buf, *x, *y, *o, *f, *us, *ad;
    SpinBarrier bar;
} SplitTeam;

/* SplitTeam's buffers for B rows of n and nt threads; 0, -1 (a DPLR layer that does not fit) or -2 (memory) */
static int split_team_init(SplitTeam *s, const NetArgs *n, long B, long nt) {
    long F = 0; /* the widest feed-forward block */
    for (long l = 0; l < n->n_layers; l++) {
        if (!layer_fits(n->layers + l, n->M)) return -1;
        if (n->layers[l].d_ff > F) F = n->layers[l].d_ff;
    }
    const long H = n->H, A = n->ad ? adaptive_scratch(n->ad, B) : 0;
    s->buf = malloc(sizeof(float) * ((size_t)B * (size_t)(H * (4 + nt) + F) + (size_t)A));
    if (!s->buf) return -2;
    s->x = s->buf, s->y = s->x + B * H, s->o = s->y + B * H, s->f = s->o + B * 2 * H, s->us = s->f + B * F;
    s->ad = s->us + nt * B * H; /* the adaptive head's scratch (adaptive_phase: hp, then cz, nm) */
    s->bar = (SpinBarrier){0, 0, LONG_MAX};
    return 0;
}

/* x (B, H) ← the embeddings (rows of `embed`, H wide) of tokens[rows[0 … B − 1]] (rows NULL:
 * tokens[0 … B − 1]) */
static void embed_rows(const float *embed, long H, long B, const long *rows, const long *tokens, float *x) {
    for (long r = 0; r < B; r++) {
        const float *e = embed + tokens[rows ? rows[r] : r] * H;
        for (long h = 0; h < H; h++) x[r * H + h] = e[h];
    }
}

/* The head of P positions: logits (P, V) = u (P, H) · head_t + head_b, columns [v0, v1) */
static void head_cols(long P, long H, long V, const float *u, const float *head_t, const float *head_b,
                      float *logits, long v0, long v1) {
    linear_cols(W_F32, P, H, V, u, head_t, head_b, logits, v0, v1);
}

/* x (B, H) ← the positions' embeddings: the adaptive input (ad), else embed_rows; 0 or -2 */
static int net_embed(const float *embed, const Adaptive *ad, long H, long B, const long *rows, const long *tokens,
                     float *x) {
    if (ad) return adaptive_embed(ad, H, B, rows, tokens, x);
    embed_rows(embed, H, B, rows, tokens, x);
    return 0;
}

/* logits (P, V) of the final-normed u (P, H): the adaptive softmax's log-probabilities (ad), else
 * u · head_t + head_b; 0 or -2 */
static int net_head(const Adaptive *ad, long P, long H, long V, const float *u, const float *head_t,
                    const float *head_b, float *logits) {
    if (ad) return adaptive_head(ad, P, H, V, u, logits);
    linear_t(P, H, V, u, head_t, head_b, logits);
    return 0;
}

/* Thread t of the k threads of a parallel region: its part of one step of B rows (rows[i] of a batch of
 * Btot; x holds their embeddings, written before a barrier) from state to state_out (may be state), logits
 * (B, V); or, with L > 1, of the prompt ingestion of one row (B = 1) of L tokens (x: their embeddings, the
 * state updated in place), as prefill_rows runs it, each channel's SSM through the L tokens in turn, with
 * logits as net_prefill's `head` (0: (L, V), 1: the last token's (1, V), 2: none; a step: 0). Every position
 * (row or token) is computed as net_rows / prefill_rows compute it, bit for bit. Every thread of the region
 * calls it; it ends with a barrier, after which the logits and the state are complete. *sense: the thread's
 * barrier sense. Every barrier's longest wait goes to the guard once (split_record, from the last thread to
 * arrive), but the first's when region_start: the region began with this call, so that wait includes the
 * threads' wake-up (under OMP_WAIT_POLICY=PASSIVE, 0.1-1 ms on a VM whose idle vCPU halted), which is no
 * stall. */
static void split_team_step(SplitTeam *s, const NetArgs *n, long B, long L, long head, long Btot,
                            const long *rows, const float *state, float *state_out, float *logits, long t, long k,
                            int *sense, int region_start) {
    const long H = n->H, V = n->V, M = n->M, P = B * L; /* positions: rows × tokens */
    float *x = s->x, *y = s->y, *o = s->o, *f = s->f, *u = s->us + t * P * H;
    const long per_layer = Btot * H * 2 * M, row_size = H * 2 * M;
    long h0, h1, v0, v1;
    split_part(H, t, k, &h0, &h1);
    split_part(V, t, k, &v0, &v1);
    int waking = region_start;
/* a barrier whose wait the guard sees (the region's first excepted) */
#define TIMED_BARRIER                                                                                        \
    do {                                                                                                     \
        double w_;                                                                                           \
        spin_barrier(&s->bar, sense, k, &w_);                                                                \
        if (!waking) split_record(w_);                                                                       \
        waking = 0;                                                                                          \
    } while (0)
    for (long l = 0; l < n->n_layers; l++) {
        const NetLayer *Ly = n->layers + l;
        block_norm(Ly->norm, P, H, x, u, Ly->ln_w, Ly->ln_b, n->eps);
        if (L > 1) { /* one row's L tokens through this thread's channels, as prefill_rows runs them */
            float *xb = state_out + l * per_layer + rows[0] * row_size;
            ssm_channels_tokens(Ly, H, M, L, 1, &xb, h0, h1, u, y);
        } else
            for (long r0 = 0; r0 < B; r0 += SSM_ROWS) { /* this thread's channels h0 … h1 − 1 */
                const long m = B - r0 < SSM_ROWS ? B - r0 : SSM_ROWS;
                const float *xs[SSM_ROWS];
                float *xo[SSM_ROWS];
                row_states(state, state_out, l * per_layer, rows + r0, m, row_size, xs, xo);
                ssm_channels(Ly, H, M, m, xs, xo, h0, h1, u + r0 * H, y + r0 * H);
            }
        for (long r = 0; r < P; r++) gelu_skip(h1 - h0, y + r * H + h0, u + r * H + h0, Ly->d_skip + h0);
        TIMED_BARRIER;
        /* the output linear's columns h0 … h1 − 1 and H + h0 … H + h1 − 1: this thread's channels' GLU */
        linear_cols(Ly->wfmt, P, H, 2 * H, y, Ly->out_wt, Ly->out_b, o, h0, h1);
        linear_cols(Ly->wfmt, P, H, 2 * H, y, Ly->out_wt, Ly->out_b, o, H + h0, H + h1);
        for (long r = 0; r < P; r++) glu_add(h1 - h0, x + r * H + h0, o + r * 2 * H + h0, o + r * 2 * H + H + h0);
        if (l == 0 && t == k - 1 && k > 1) split_test_hold(); /* a test's stand-in for a descheduled thread */
        TIMED_BARRIER;
        if (Ly->d_ff > 0) {
            const long Fl = Ly->d_ff;
            long f0, f1;
            split_part(Fl, t, k, &f0, &f1);
            block_norm(Ly->norm, P, H, x, u, Ly->ff_ln_w, Ly->ff_ln_b, n->eps);
            linear_cols(Ly->wfmt, P, H, Fl, u, Ly->up_t, Ly->up_b, f, f0, f1);
            for (long r = 0; r < P; r++) gelu(f1 - f0, f + r * Fl + f0);
            TIMED_BARRIER;
            linear_cols(Ly->wfmt, P, Fl, H, f, Ly->down_t, Ly->down_b, y, h0, h1);
            for (long r = 0; r < P; r++) add_to(h1 - h0, x + r * H + h0, y + r * H + h0);
            TIMED_BARRIER;
        }
    }
    if (head != 2) { /* the norm over every position, as net_rows and prefill_rows run it */
        block_norm(n->lnf_kind, P, H, x, u, n->lnf_w, n->lnf_b, n->eps);
        const long Ph = head == 1 ? 1 : P;
        const float *uh = head == 1 ? u + (P - 1) * H : u;
        if (n->ad) { /* its phases, a barrier between (each thread's columns; the normalizers by whole shards) */
            float *cz, *nm;
            adaptive_parts(n->ad, Ph, s->ad, &cz, &nm);
            for (long phase = 0; phase < 4; phase++) {
                adaptive_phase(n->ad, phase, Ph, H, V, uh, logits, s->ad, cz, nm, t, k);
                if (phase < 3) TIMED_BARRIER;
            }
        } else
            head_cols(Ph, H, V, uh, n->head_t, n->head_b, logits, v0, v1);
    }
    TIMED_BARRIER;
#undef TIMED_BARRIER
}

/* One step of B rows split over omp_get_max_threads() threads (split_step said so): as net_rows. With L > 1,
 * one row's prompt of L tokens (B = 1, rows = {0}, Btot = 1, tokens (L,), the state updated in place, logits
 * as net_prefill's `head`): as prefill_rows, bit for bit. One row's prompt ran in the calling thread alone
 * before, the other cores idle (a long prompt's chunks of 256 tokens, a short prompt arriving while others
 * decode). */
static int net_rows_split(const NetArgs *n, long B, long L, long head, long Btot, const long *rows,
                          const long *tokens, const float *state, float *state_out, float *logits) {
    const long nt = omp_get_max_threads();
    SplitTeam s;
    const int rc = split_team_init(&s, n, B * L, nt);
    if (rc) return rc;
    if (net_embed(n->embed, n->ad, n->H, B * L, L > 1 ? NULL : rows, tokens, s.x)) {
        free(s.buf);
        return -2;
    }
#pragma omp parallel num_threads(nt)
    {
        int sense = 0;
        split_team_step(&s, n, B, L, head, Btot, rows, state, state_out, logits, omp_get_thread_num(),
                        omp_get_num_threads(), &sense, 1);
    }
    free(s.buf);
    return 0;
}

/* The rows rows[0 .. B − 1] of a batch of Btot (the state is (n_layers, Btot, H, 2, M)); row i's
 * token is tokens[rows[i]] and its logits go to logits + i * V. Every row's arithmetic is the same
 * whatever the other rows are (each output element's sums run in one fixed order), so a row's
 * logits and state do not depend on the batch around it. */
static int net_rows(long B, long Btot, const long *rows, long H, long V, long n_layers, long M,
                    const long *tokens, const float *embed, const NetLayer *layers, long lnf_kind,
                    const float *lnf_w, const float *lnf_b, const float *head_t, const float *head_b,
                    const Adaptive *ad, float eps, const float *state, float *state_out, float *logits) {
    if (split_step(B, H, V, n_layers, layers)) {
        const NetArgs n = {H, V, n_layers, M, embed, layers, lnf_kind, lnf_w, lnf_b, head_t, head_b, eps, NULL, ad};
        return net_rows_split(&n, B, 1, 0, Btot, rows, tokens, state, state_out, logits);
    }
    long F = 0; /* the widest feed-forward block */
    for (long l = 0; l < n_layers; l++)
        if (layers[l].d_ff > F) F = layers[l].d_ff;
    float *buf = malloc(sizeof(float) * (size_t)B * (size_t)(H * 5 + F));
    if (!buf) return -2;
    float *x = buf, *u = x + B * H, *y = u + B * H, *o = y + B * H; /* o: (B, 2H) */
    float *f = o + B * 2 * H;                                       /* f: (B, F) */
    int rc = net_embed(embed, ad, H, B, rows, tokens, x);
    const long per_layer = Btot * H * 2 * M, row_size = H * 2 * M;
    for (long l = 0; l < n_layers && rc == 0; l++) {
        const NetLayer *L = layers + l;
        block_norm(L->norm, B, H, x, u, L->ln_w, L->ln_b, eps);
        for (long r0 = 0; r0 < B && rc == 0; r0 += SSM_ROWS) { /* rows may be anywhere in the batch */
            const long n = B - r0 < SSM_ROWS ? B - r0 : SSM_ROWS;
            const float *xs[SSM_ROWS];
            float *xo[SSM_ROWS];
            row_states(state, state_out, l * per_layer, rows + r0, n, row_size, xs, xo);
            rc = ssm_rows(L, H, M, n, xs, xo, u + r0 * H, y + r0 * H);
        }
        if (rc == 0) block_rest(B, H, L, x, u, y, o, f, eps);
    }
    if (rc == 0) {
        block_norm(lnf_kind, B, H, x, u, lnf_w, lnf_b, eps);
        rc = net_head(ad, B, H, V, u, head_t, head_b, logits);
    }
    free(buf);
    return rc;
}

/* Sampling for rows with plain temperature (no top-k, top-p or penalty): row r draws the first
 * token whose cumulative probability under softmax(logits / temp[r]) reaches u[r] (the inverse
 * CDF, as model/sampling.py does with torch ops); temp[r] == 0 takes the argmax. The same limits as
 * model/sampling.py (sanitize_logits, scale_logits): weights exp((z - max z) / T) with the
 * difference and T in double, so a tiny or denormal T gives the argmax, never inf - inf; NaN weighs 0; a row with +inf entries draws among
 * them alone; a row with nothing above -inf is uniform. cdf: V floats of scratch (the heap's: a vocabulary
 * of 2^21 floats on the stack, as this once was, overflowed a thread's 8 MiB stack, a SIGSEGV). */
static long sample_one(long V, const float *z, double temp, float u, float *cdf) {
    long best = -1;
    for (long v = 0; v < V; v++)
        if (z[v] == z[v] && (best < 0 || z[v] > z[best])) best = v; /* the first maximum, NaN skipped */
    const int flat = best < 0 || z[best] == -INFINITY; /* nothing above -inf: uniform */
    if (temp == 0.0) return flat ? 0 : best;
    const double t = temp; /* double: every finite T > 0 and every float difference is exact-range */
    const float zb = flat ? 0.0f : z[best];
    const int pos = zb == INFINITY;
    float total = 0.0f;
#pragma omp simd
    for (long v = 0; v < V; v++) {
        const float d = (float)(((double)z[v] - (double)zb) / t); /* <= 0; NaN for a NaN logit */
        const float w = d == d ? expf(d) : 0.0f;
        cdf[v] = flat ? 1.0f : pos ? (z[v] == INFINITY ? 1.0f : 0.0f) : (z[v] == zb ? 1.0f : w);
    }
    for (long v = 0; v < V; v++) cdf[v] = (total += cdf[v]);
    const float target = u * total;
    long k = 0;
    /* the first token whose CDF reaches u · total and whose own weight adds to it: u = 0 (2^-24 per draw)
     * must not pick a leading zero-probability token */
    while (k < V - 1 && (cdf[k] < target || cdf[k] == (k > 0 ? cdf[k - 1] : 0.0f))) k++;
    return k;
}

/* Returns 0, or -2 out of memory (its scratch: V floats). */
int sample_rows(long B, long V, const float *logits, const double *temp, const float *u, long *out) {
    float *cdf = malloc(sizeof(float) * (size_t)(V > 0 ? V : 1));
    if (!cdf) return -2;
    for (long r = 0; r < B; r++) out[r] = sample_one(V, logits + r * V, temp[r], u[r], cdf);
    free(cdf);
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * The whole sampling pipeline of model/sampling.py (`_sample_torch`) for one row, in the same order:
 * logit_bias → repetition penalty (CTRL; its p → 0 limit where z / p overflows) → presence/frequency
 * penalties → sanitize (NaN → −inf; +inf rows keep only their +inf; nothing above −inf → uniform) →
 * temperature ((z − max z) / T in double; T = 0: the first argmax) → top-k and top-p (ranked by the
 * sanitized logits before the temperature, ties by token id; the mass before a token < top_p keeps
 * it; the top token always stays) → min_p → the inverse CDF at u. The settings are rounded as the
 * torch ops' float32 tensors round them (rep, top_p, min_p, presence, frequency: float). Softmax
 * sums run in double here and in float32 there: the two paths agree to rounding (tested by
 * distribution), the C pass is the one the server and the library use on CPU. */
#include <float.h>
#include <stdlib.h>

typedef struct {
    float v;
    long i;
} Ranked;

static int ranked_desc(const void *a, const void *b) { /* larger value first, then smaller id */
    const Ranked *x = a, *y = b;
    if (x->v != y->v) return x->v > y->v ? -1 : 1;
    return (x->i > y->i) - (x->i < y->i);
}

typedef struct {
    const double *temp;
    const long *top_k, *kind; /* kind[r]: 0 plain temperature (sample_one), 1 the whole pipeline */
    const float *top_p, *min_p, *rep, *presence, *frequency;
    const float *bias;          /* (B, V) or NULL */
    const unsigned char *seen;  /* (B, V) or NULL: no repetition penalty */
    float *counts;              /* (B, V) or NULL: no presence/frequency penalties */
    /* the decode blocks' log-probabilities (sample_and_check): lp_k[r] < 0 none for row r, else the
     * sampled token's and the lp_k[r] ≤ lp_kmax most likely; NULL lp_k: none for any row */
    const long *lp_k;
    long lp_kmax;
    float *lp_chosen; /* (K, Btot) */
    long *lp_ids;     /* (K, Btot, lp_kmax) */
    float *lp_vals;   /* (K, Btot, lp_kmax) */
} SampleArgs;

/* Log-probabilities of one row's raw logits (model/sampling.py `token_logprobs`: log_softmax before
 * temperature, penalties, bias and filters): of token t into *chosen, and of the k most likely into
 * ids[0 .. k − 1], vals[0 .. k − 1], larger first (NaN above every number, as torch.topk ranks it; ties:
 * the smaller id first), found in one pass over a sorted list of k. The normalizer in double. */
static inline float lp_rank(float v) { return isnan(v) ? INFINITY : v; }

static void row_logprobs(long V, const float *lg, long t, long k, float *chosen, long *ids, float *vals) {
    float m = -INFINITY;
    for (long j = 0; j < V; j++)
        if (lg[j] > m) m = lg[j];
    double s = 0.0;
    for (long j = 0; j < V; j++) s += exp((double)lg[j] - (double)m);
    const double lse = (double)m + log(s); /* (NaN when a logit is) */
    *chosen = (float)((double)lg[t] - lse);
    if (k > V) k = V;
    long n = 0;
    for (long j = 0; j < V && k > 0; j++) {
        const float key = lp_rank(lg[j]);
        if (n == k && !(key > lp_rank(lg[ids[k - 1]]))) continue;
        long q = n < k ? n++ : k - 1; /* (full: the last one goes) */
        for (; q > 0 && key > lp_rank(lg[ids[q - 1]]); q--) ids[q] = ids[q - 1];
        ids[q] = j;
    }
    for (long q = 0; q < n; q++) vals[q] = (float)((double)lg[ids[q]] - lse);
}

/* For model/sampling.py token_logprobs on the CPU: row_logprobs of each row r of logits (B, V) at token
 * tokens[r] (each in [0, V)), its k most likely (ids (B, k), vals (B, k); k ≤ V): the one-step path's
 * log-probabilities then are the decode block's, bit for bit. */
void logprobs_rows(long B, long V, const float *logits, const long *tokens, long k, float *chosen, long *ids,
                   float *vals) {
    for (long r = 0; r < B; r++)
        row_logprobs(V, logits + r * V, tokens[r], k, chosen + r, ids + r * k, vals + r * k);
}

/* Partial selection (quickselect, Hoare partition, median of three): reorder rk[0 .. n − 1] so that its
 * first c entries are the c first in ranked_desc order (in no particular order among themselves). */
static void select_top(Ranked *rk, long n, long c) {
    long lo = 0, hi = n - 1;
    while (c > lo && c <= hi) {
        const long mid = lo + (hi - lo) / 2;
        Ranked a3[3] = {rk[lo], rk[mid], rk[hi]}, t; /* the median of three as the pivot */
        if (ranked_desc(&a3[1], &a3[0]) < 0) { t = a3[0]; a3[0] = a3[1]; a3[1] = t; }
        if (ranked_desc(&a3[2], &a3[1]) < 0) { t = a3[1]; a3[1] = a3[2]; a3[2] = t; }
        if (ranked_desc(&a3[1], &a3[0]) < 0) { t = a3[0]; a3[0] = a3[1]; a3[1] = t; }
        const Ranked pivot = a3[1];
        long i = lo, j = hi;
        while (i <= j) {
            while (ranked_desc(&rk[i], &pivot) < 0) i++;
            while (ranked_desc(&pivot, &rk[j]) < 0) j--;
            if (i <= j) { t = rk[i]; rk[i] = rk[j]; rk[j] = t; i++; j--; }
        }
        /* now rk[lo .. j] ≤ pivot ≤ rk[i .. hi] in rank, j < i */
        if (c <= j + 1) hi = j;
        else if (c >= i) lo = i;
        else break; /* the entries between j and i equal the pivot: the first c are in place */
    }
}

/* A vocabulary larger than rank_all_max is not ranked whole for top-k / top-p (267,735 words: a full qsort
 * took 46 ms a row): top-k selects its k (select_top) and sorts those; top-p alone finds its cut by
 * buckets (top_p_by_buckets). Smaller vocabularies sort all V, as always. A variable, not a constant, so
 * that the tests can compare both on one vocabulary. */
long rank_all_max = 4096;
#define P_BUCKETS 4096

/* top-p alone over a large vocabulary, in O(V): the tokens fall into P_BUCKETS buckets of equal width of
 * the sanitized logit z (bucket 0 holds the top; a bucket never ranks before a higher one), each
 * bucket's probability mass is summed, and the cut's bucket, the first whose mass with the buckets'
 * before it reaches top_p, alone is sorted (ranked_desc: z, then the smaller id). Keeps what the whole
 * ranking keeps: every token whose mass ranked before it is < top_p, and the top token; only the sums'
 * order differs (by bucket, in index order), a rounding's difference at the cut. s: the scaled logits
 * (−inf where z is), filtered in place; rk: scratch for the cut's bucket. */
static void top_p_by_buckets(long V, double top_p, const float *z, float *s, double top, Ranked *rk) {
    double low = top;
    for (long v = 0; v < V; v++)
        if (z[v] != -INFINITY && z[v] < low) low = z[v];
    const double scale = top > low ? (P_BUCKETS - 1) / (top - low) : 0.0;
    double mass[P_BUCKETS] = {0}, total = 0.0;
    for (long v = 0; v < V; v++) {
        if (z[v] == -INFINITY) continue;
        const double e = exp((double)s[v]);
        total += e;
        mass[(long)((top - (double)z[v]) * scale)] += e;
    }
    long cut = 0;
    double before = 0.0; /* the mass ranked before bucket `cut` */
    while (cut < P_BUCKETS - 1 && before + mass[cut] / total < top_p) before += mass[cut++] / total;
    long n = 0;
    for (long v = 0; v < V; v++) {
        if (z[v] == -INFINITY) continue; /* (s is −inf already) */
        const long b = (long)((top - (double)z[v]) * scale);
        if (b > cut)
            s[v] = -INFINITY;
        else if (b == cut)
            rk[n++] = (Ranked){z[v], v};
    }
    qsort(rk, (size_t)n, sizeof(Ranked), ranked_desc);
    for (long j = 0; j < n; j++) {
        const long v = rk[j].i;
        const double p = exp((double)s[v]) / total;
        if ((cut > 0 || j > 0) && before >= top_p) s[v] = -INFINITY; /* (the top token always stays) */
        before += p;
    }
}

static long sample_full(long V, const float *logits, const SampleArgs *a, long r, float u, float *z, float *w,
                        Ranked *rk) {
    const float *bias = a->bias ? a->bias + r * V : NULL;
    const unsigned char *seen = a->seen ? a->seen + r * V : NULL;
    const float *counts = a->counts ? a->counts + r * V : NULL;
    for (long v = 0; v < V; v++) z[v] = bias ? logits[v] + bias[v] : logits[v];
    const float rep = a->rep[r];
    if (seen && rep != 1.0f) {
        int pos_inf = 0, over_any = 0;
        float top_over = -INFINITY;
        for (long v = 0; v < V; v++) {
            if (z[v] == INFINITY) pos_inf = 1;
            if (seen[v] && z[v] > 0 && isfinite(z[v]) && z[v] / rep == INFINITY) {
                over_any = 1;
                if (z[v] > top_over) top_over = z[v];
            }
        }
        const int limit = over_any && !pos_inf;
        for (long v = 0; v < V; v++) {
            const float zv = z[v];
            const int up = seen[v] && zv > 0;
            if (limit) /* p → 0: the overflowed seen tokens with the largest z get all the mass */
                z[v] = (up && isfinite(zv) && zv / rep == INFINITY && zv == top_over) ? 0.0f : -INFINITY;
            else if (up && isfinite(zv) && zv / rep == INFINITY) /* a row with a +inf of its own: a finite */
                z[v] = FLT_MAX;                                  /* number, which that +inf outranks */
            else
                z[v] = up ? zv / rep : (seen[v] ? zv * rep : zv);
        }
    }
    const float pres = a->presence[r], freq = a->frequency[r];
    if (counts && (pres != 0.0f || freq != 0.0f))
        for (long v = 0; v < V; v++) {
            const float cf = counts[v] * freq;
            const float ind = counts[v] > 0 ? 1.0f : 0.0f;
            const float d = z[v] - cf; /* separate statements: no contraction, the torch ops' rounding */
            z[v] = d - ind * pres;
        }
    int pos = 0, all_neg = 1;
    for (long v = 0; v < V; v++) {
        if (z[v] != z[v]) z[v] = -INFINITY;
        if (z[v] == INFINITY) pos = 1;
    }
    for (long v = 0; v < V; v++) {
        if (pos) z[v] = z[v] == INFINITY ? 0.0f : -INFINITY;
        if (z[v] != -INFINITY) all_neg = 0;
    }
    if (all_neg)
        for (long v = 0; v < V; v++) z[v] = 0.0f;
    long best = 0;
    for (long v = 1; v < V; v++)
        if (z[v] > z[best]) best = v;
    if (a->temp[r] == 0.0) return best;
    const double T = a->temp[r], top = z[best];
    float *s = w; /* the scaled logits, then the weights */
    for (long v = 0; v < V; v++)
        s[v] = z[v] == top ? 0.0f : z[v] == -INFINITY ? -INFINITY : (float)(((double)z[v] - top) / T);
    const long k = a->top_k[r] > 0 && a->top_k[r] < V ? a->top_k[r] : V;
    const double top_p = a->top_p[r];
    if (V > rank_all_max && k == V && top_p < 1.0) { /* top-p alone: by buckets of the ranking, in O(V) */
        top_p_by_buckets(V, top_p, z, s, top, rk);
    } else if (k < V || top_p < 1.0) {
        for (long v = 0; v < V; v++) rk[v] = (Ranked){z[v], v};
        /* m: how many of the ranking are sorted; every token ranked at m or later is dropped (past the
         * top k). Small vocabularies sort all V. */
        long m = V;
        double total = 0.0;
        if (V > rank_all_max && k < V) { /* the top k, then only those sorted: the same sums, in order */
            select_top(rk, V, k);
            m = k;
        }
        qsort(rk, (size_t)m, sizeof(Ranked), ranked_desc);
        for (long j = 0; j < k; j++) total += exp((double)s[rk[j].i]); /* s of the top-ranked is 0 */
        double before = 0.0;
        for (long j = 0; j < m; j++) { /* (past m: unsorted, dropped below) */
            const long v = rk[j].i;
            const double p = j < k ? exp((double)s[v]) / total : 0.0;
            if (j > 0 && (j >= k || before >= top_p)) s[v] = -INFINITY;
            before += p;
        }
        if (m < V) { /* every token past the sorted m is dropped: keep those m, fill the rest in order */
            for (long j = 0; j < m; j++) rk[j].v = s[rk[j].i];
            for (long v = 0; v < V; v++) s[v] = -INFINITY;
            for (long j = 0; j < m; j++) s[rk[j].i] = rk[j].v;
        }
    }
    const double min_p = a->min_p[r];
    if (min_p > 0.0) {
        float smax = -INFINITY;
        for (long v = 0; v < V; v++)
            if (s[v] > smax) smax = s[v];
        for (long v = 0; v < V; v++)
            if (exp((double)s[v] - (double)smax) < min_p) s[v] = -INFINITY; /* p_v < min_p · p_max */
    }
    float total = 0.0f;
    for (long v = 0; v < V; v++) {
        const float e = s[v] == -INFINITY ? 0.0f : expf(s[v]);
        w[v] = (total += e); /* the CDF, in place */
    }
    const float target = u * total;
    long j = 0;
    while (j < V - 1 && (w[j] < target || w[j] == (j > 0 ? w[j - 1] : 0.0f))) j++; /* as sample_one */
    return j;
}

/* The scratch of sample_full: z and w (2V floats) and the ranking (V entries); one per caller, reused
 * across its rows. */
typedef struct {
    float *z;
    Ranked *rk;
} SampleScratch;

static int scratch_alloc(SampleScratch *sc, long V) {
    sc->z = malloc(sizeof(float) * 2 * (size_t)V);
    sc->rk = malloc(sizeof(Ranked) * (size_t)V);
    if (sc->z && sc->rk) return 0;
    free(sc->z);
    free(sc->rk);
    return -2;
}

static void scratch_free(SampleScratch *sc) {
    free(sc->z);
    free(sc->rk);
}

/* Row r's token at uniform u: plain temperature rows by sample_one, the others by sample_full. */
static long sample_row(long V, const float *logits, const SampleArgs *a, long r, float u, SampleScratch *sc) {
    return a->kind[r] == 0 ? sample_one(V, logits, a->temp[r], u, sc->z)
                           : sample_full(V, logits, a, r, u, sc->z, sc->z + V, sc->rk);
}

/* Rows r of a batch with any settings (SampleArgs), at uniforms u[r]: the plain ones by sample_one,
 * the others by sample_full (model/sampling.py `sample` on CPU). Returns 0, or -2 out of memory. */
int sample_rows_full(long B, long V, const float *logits, const double *temp, const long *top_k, const long *kind,
                     const float *top_p, const float *min_p, const float *rep, const float *presence,
                     const float *frequency, const float *bias, const unsigned char *seen, float *counts,
                     const float *u, long *out) {
    const SampleArgs a = {temp, top_k, kind, top_p, min_p, rep, presence, frequency, bias, seen, counts};
    SampleScratch sc;
    if (scratch_alloc(&sc, V)) return -2;
    for (long r = 0; r < B; r++) out[r] = sample_row(V, logits + r * V, &a, r, u[r], &sc);
    scratch_free(&sc);
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * Counter-based random numbers: Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers:
 * as easy as 1, 2, 3", SC 2011; the Random123 reference constants and round order). A row's n-th
 * uniform is a pure function of (its key, n): key = the request seed's low and high 32 bits, counter
 * = (n low, n high, 0, 0); the first output word's top 24 bits give u = w · 2⁻²⁴ in [0, 1), exact in
 * float32. model/sampling.py computes the same numbers in Python (CounterRNG).
 */
#include <stdint.h>
#include <string.h>
#include <time.h>

static inline void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
    for (int i = 0; i < 10; i++) {
        const uint64_t p0 = (uint64_t)0xD2511F53u * c[0], p1 = (uint64_t)0xCD9E8D57u * c[2];
        const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c[1] ^ k0, n1 = (uint32_t)p1;
        const uint32_t n2 = (uint32_t)(p0 >> 32) ^ c[3] ^ k1, n3 = (uint32_t)p0;
        c[0] = n0, c[1] = n1, c[2] = n2, c[3] = n3;
        k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
    }
}

/* out (n, 4): Philox4x32-10 of counters ctr (n, 4) under keys key (n, 2) (for the known-answer test) */
void philox_blocks(long n, const uint32_t *ctr, const uint32_t *key, uint32_t *out) {
    for (long i = 0; i < n; i++) {
        uint32_t c[4] = {ctr[4 * i], ctr[4 * i + 1], ctr[4 * i + 2], ctr[4 * i + 3]};
        philox4x32_10(c, key[2 * i], key[2 * i + 1]);
        memcpy(out + 4 * i, c, sizeof c);
    }
}

static inline float philox_uniform(uint64_t key, uint64_t n) {
    uint32_t c[4] = {(uint32_t)n, (uint32_t)(n >> 32), 0u, 0u};
    philox4x32_10(c, (uint32_t)key, (uint32_t)(key >> 32));
    return (float)(c[0] >> 8) * 0x1.0p-24f;
}

/* u[i] = the uniform number counter[i] of the stream keyed by key[i] */
void philox_uniforms(long n, const uint64_t *key, const uint64_t *counter, float *u) {
    for (long i = 0; i < n; i++) u[i] = philox_uniform(key[i], counter[i]);
}

/* ------------------------------------------------------------------------------------------------
 * A decode block: up to K steps of (whole-network step → sample → stop checks) for a batch, with no
 * return to Python between steps, for any network given as a StepRowsFn (net_block: the isotropic
 * network, state (n_layers, Btot, H, 2, M); sashimi_block: SaShiMi, state (Btot, numel)). Per row r
 * (Btot rows; the state is updated in place):
 *   - tok[r]: the pending token, fed at the next step; on return the last token sampled;
 *   - its sampling settings (temp .. counts: as sample_rows_full; pen_seen is seen or NULL when no
 *     row has a repetition penalty; counts (Btot, V) or NULL, incremented for every token sampled)
 *     and its counter-based stream (key[r], counter[r]: one uniform per token, advanced here);
 *   - limit[r] ≥ 0: at most this many tokens (0: the row does not step: a hole, or no room);
 *   - stop sequences: stops j in [stop_first[r], stop_first[r + 1]), the bytes
 *     stop_data[stop_off[j] .. stop_off[j + 1]); a row stops after the token whose low byte ends one;
 *     hist (Btot, hist_cap) holds the row's last hist_len[r] output bytes before the block (at least
 *     the longest stop minus one), appended to here (hist_cap ≥ hist_len[r] + K);
 *   - seen (Btot, V) bytes: set for every token sampled.
 * Out: out_tok (K, Btot) the tokens of each step (rows that stepped), n_out[r] how many row r made,
 * stopped[r] = 1 when a stop sequence ended it, times[k] CLOCK_MONOTONIC seconds after step k.
 * A row stops stepping at a stop or its limit: its state is then exactly the one-step path's (the
 * step of its last token applied, nothing after), and other rows' arithmetic does not depend on it.
 * parallel_rows: from this many rows on, the rows are split over the threads.
 * Schedule (group_rows G, group_steps S): each thread's share of the rows (Btot / threads) is cut into
 * groups of G rows, and a group is taken through rounds of S steps, so its state stays in cache for S
 * steps instead of being reloaded from memory every step (from batch 64 the text model's states, 0.27 MiB
 * a row, spill this machine's last-level cache: bench.step). A share of at most G rows (or G ≤ 0) is one
 * group, one step a round (the order before). The threads share the groups (decode_shared: the free group
 * furthest behind next), so a descheduled thread holds up one group's round, not its whole share.
 * Rows never interact, so the order changes no row's tokens or state, only when each is made.
 * interrupt (or NULL): when another thread sets *interrupt, each group ends the block after its current
 * round (a group that has made none makes one), so new work waits for about S steps of G rows.
 * Returns the number of steps run (≤ K; fewer when every row has stopped or on an interrupt; rows of
 * different groups may then have made different numbers), or < 0 on error. */

static int sample_and_check(long B, const long *rows, long V, const float *logits, long k, long Btot, long *tok,
                            const SampleArgs *a, const uint64_t *key, uint64_t *counter, const long *stop_first,
                            const long *stop_off, const unsigned char *stop_data, unsigned char *hist, long hist_cap,
                            long *hist_len, unsigned char *seen, long *out_tok, long *n_out, long *stopped) {
    SampleScratch sc;
    if (scratch_alloc(&sc, V)) return -2;
    for (long i = 0; i < B; i++) {
        const long r = rows[i];
        const long t = sample_row(V, logits + i * V, a, r, philox_uniform(key[r], counter[r]), &sc);
        if (a->lp_k && a->lp_k[r] >= 0) {
            const long at = k * Btot + r;
            row_logprobs(V, logits + i * V, t, a->lp_k[r] < a->lp_kmax ? a->lp_k[r] : a->lp_kmax,
                         a->lp_chosen + at, a->lp_ids + at * a->lp_kmax, a->lp_vals + at * a->lp_kmax);
        }
        counter[r]++;
        tok[r] = t;
        seen[r * V + t] = 1;
        if (a->counts) a->counts[r * V + t] += 1.0f;
        out_tok[k * Btot + r] = t;
        n_out[r]++;
        unsigned char *h = hist + r * hist_cap;
        h[hist_len[r]++] = (unsigned char)(t & 0xFF);
        for (long j = stop_first[r]; j < stop_first[r + 1]; j++) {
            const long len = stop_off[j + 1] - stop_off[j];
            if (len > 0 && hist_len[r] >= len && !memcmp(h + hist_len[r] - len, stop_data + stop_off[j], len)) {
                stopped[r] = 1;
                break;
            }
        }
    }
    scratch_free(&sc);
    return 0;
}

/* A batch's step for the rows rows[0 .. B − 1] of Btot: feeds tok[rows[i]], updates their state in place,
 * writes their logits to logits + i * V; 0 or < 0 on error. */
typedef int (*StepRowsFn)(const void *ctx, long B, long Btot, const long *rows, const long *tok, float *state,
                          float *logits);

/* Code returned when a token id is not a row of the embedding (0 ≤ id < V). Ids from outside are checked
 * where every entry point takes them (net_step, net_prefill, sashimi_step, the decode blocks' pending
 * tokens), so no caller can make a step read outside the table. */
#define E_TOKEN_RANGE (-3)

static int ids_in_range(const long *ids, long n, long V) {
    for (long i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= V) return 0;
    return 1;
}

/* One step of all B rows by step_rows: batches of parallel_rows rows or more are split into one block of
 * rows per thread, each stepped through the whole network independently (no synchronization between
 * layers; the per-layer parallel loops then run serially inside each thread). The region ends when its last
 * thread does: a thread descheduled for a time slice (a CPU-bound process on another core) holds the step
 * for it, so the spread between the threads' ends goes to the split step's contention guard (split_record),
 * and while it pauses splitting the rows step in the calling thread alone (bit for bit the same: a row's
 * bits do not depend on the others). Without the guard a busy loop beside a 2-thread step of 16 rows of
 * text-shakespeare ran it at 0.18-0.40x of one thread with OpenMP's wait policy unset (a fresh-user trial;
 * bench.split's batch_steps). */
static int step_all_rows(StepRowsFn step_rows, const void *ctx, long parallel_rows, long B, long V,
                         const long *tokens, float *state, float *logits) {
    if (tokens && !ids_in_range(tokens, B, V)) return E_TOKEN_RANGE;
    long *rows = malloc(sizeof(long) * (size_t)(B > 0 ? B : 1));
    if (!rows) return -2;
    const int nt_max = omp_get_max_threads();
    double ends[nt_max > 0 ? nt_max : 1]; /* each thread's end (monotonic s) */
    for (long r = 0; r < B; r++) rows[r] = r;
    int rc = 0, team = 1;
    if (B < parallel_rows || nt_max < 2 || split_paused()) {
        rc = step_rows(ctx, B, B, rows, tokens, state, logits);
    } else {
        const double start = monotonic_s();
#pragma omp parallel num_threads(nt_max) reduction(min : rc)
        {
            const long nt = omp_get_num_threads(), t = omp_get_thread_num();
            const long lo = B * t / nt, hi = B * (t + 1) / nt;
            if (hi > lo) rc = step_rows(ctx, hi - lo, B, rows + lo, tokens, state, logits + lo * V);
            if (t == nt - 1 && nt > 1) split_test_hold(); /* a test's stand-in for a descheduled thread */
            ends[t] = monotonic_s();
            if (t == 0) team = (int)nt;
        }
        if (team > 1) { /* the time the first thread to end waited for the last */
            double first = ends[0], last = ends[0];
            for (int t = 1; t < team; t++) {
                if (ends[t] < first) first = ends[t];
                if (ends[t] > last) last = ends[t];
            }
            /* a stall only when the wait is most of the step: a large model's step (wt103's: ~100 ms at 16
             * rows) varies by more than SPLIT_STALL_S between its threads with nothing else running, and a
             * time slice lost there costs it a few per cent, not a pause of the split */
            if (last - first > 0.5 * (last - start)) split_record(last - first);
        }
    }
    free(rows);
    return rc;
}

/* Batches of this many rows or more split over the threads (an isotropic row's step is cheap at small
 * batch: below this the parallel region costs more than it saves). */
#define NET_PARALLEL_ROWS 8


static int net_rows_fn(const void *ctx, long B, long Btot, const long *rows, const long *tok, float *state,
                       float *logits) {
    const NetArgs *n = ctx;
    return net_rows(B, Btot, rows, n->H, n->V, n->n_layers, n->M, tok, n->embed, n->layers, n->lnf_kind, n->lnf_w,
                    n->lnf_b, n->head_t, n->head_b, n->ad, n->eps, n->src ? n->src : state, state, logits);
}

/* Rows r0 .. r1 − 1 of net_prefill's B (their tokens, state rows and logits at their offsets in the whole
 * batch's), in the calling thread. */
static int prefill_rows(long B, long r0, long r1, long L, long H, long V, long n_layers, long M, long head,
                        long F, const long *tokens, const float *embed, const NetLayer *layers, long lnf_kind,
                        const float *lnf_w, const float *lnf_b, const float *head_t, const float *head_b,
                        const Adaptive *ad, float eps, float *state, float *logits) {
    const long n = r1 - r0, N = n * L;
    float *buf = malloc(sizeof(float) * (size_t)(N > 0 ? N : 1) * (size_t)(H * 5 + F));
    if (!buf) return -2;
    float *x = buf, *u = x + N * H, *y = u + N * H, *o = y + N * H; /* o: (N, 2H) */
    float *f = o + N * 2 * H;                                       /* f: (N, F) */
    if (net_embed(embed, ad, H, N, NULL, tokens + r0 * L, x)) {
        free(buf);
        return -2;
    }
    const long per_layer = B * H * 2 * M;
    for (long l = 0; l < n_layers; l++) {
        const NetLayer *Ly = layers + l;
        block_norm(Ly->norm, N, H, x, u, Ly->ln_w, Ly->ln_b, eps);
        for (long g = 0; g < n; g += SSM_ROWS) { /* SSM_ROWS rows at a time through each channel's L tokens */
            const long k = n - g < SSM_ROWS ? n - g : SSM_ROWS;
            float *xb[SSM_ROWS];
            for (long i = 0; i < k; i++) xb[i] = state + l * per_layer + (r0 + g + i) * H * 2 * M;
            ssm_channels_tokens(Ly, H, M, L, k, xb, 0, H, u + g * L * H, y + g * L * H);
        }
        block_rest(N, H, Ly, x, u, y, o, f, eps);
    }
    int rc = 0;
    if (head == 0) { /* every position */
        block_norm(lnf_kind, N, H, x, u, lnf_w, lnf_b, eps);
        rc = net_head(ad, N, H, V, u, head_t, head_b, logits + r0 * L * V);
    } else if (head == 1) { /* each row's last position; the norm over all rows as head 0 (the norm's bits
                               depend on how the compiler specialized the call: one row alone differed by an ulp),
                               the last positions gathered into y for one head over them (a row's bits are its
                               own: the head's weights read once for the rows, not once a row) */
        block_norm(lnf_kind, N, H, x, u, lnf_w, lnf_b, eps);
        for (long r = 0; r < n; r++) memcpy(y + r * H, u + (r * L + L - 1) * H, sizeof(float) * (size_t)H);
        rc = net_head(ad, n, H, V, y, head_t, head_b, logits + r0 * V);
    }
    free(buf);
    return rc;
}

/* Prompt ingestion layer by layer in the recurrent form: B rows of L tokens each (tokens (B, L)), state
 * (n_layers, B, H, 2, M) updated in place, logits (B, L, V) of every position (head = 0), (B, 1, V) of
 * each row's last (head = 1, bit-identical to those rows of head 0) or none (head = 2: the final norm
 * and the head are skipped; logits may be NULL). Every position-wise op
 * (embedding, LayerNorm, GELU, the linear layers in row tiles, the head) runs over all of a thread's
 * positions at once; only the SSM recurrence runs token by token, one channel at a time (its 2M-float
 * state stays in L1 through the L tokens), a diagonal layer's for up to SSM_ROWS rows together (each 8
 * modes' parameters loaded once for them, as in the decode step; the rows' arithmetic is a row's alone).
 * Each element is computed by the same expression as in L calls of the step (the tiles' results do not
 * depend on the rows beside them), so the logits and the state are
 * bit-identical to stepping the prompt, at the cost of the linear layers batched over the prompt.
 * Rows never interact: from 2 rows on they are split between the threads (omp_get_max_threads()), each
 * taking its share through the whole network with no barrier until the end; one row of several tokens is
 * split over them by channels and columns where a step of one row would be (net_rows_split), else runs in
 * the calling thread. Returns 0, -1 (a DPLR layer over MAX_MODES modes or MAX_RANK) or -2 (out of memory). */
int net_prefill(long B, long L, long H, long V, long n_layers, long M, long head, const long *tokens,
                const float *embed, const NetLayer *layers, long lnf_kind, const float *lnf_w, const float *lnf_b,
                const float *head_t, const float *head_b, const Adaptive *ad, float eps, float *state,
                float *logits) {
    if (!ids_in_range(tokens, B * L, V)) return E_TOKEN_RANGE;
    long F = 0;
    for (long l = 0; l < n_layers; l++) {
        if (!layer_fits(layers + l, M)) return -1;
        if (layers[l].d_ff > F) F = layers[l].d_ff;
    }
    if (B == 1 && L > 1 && split_step(1, H, V, n_layers, layers)) {
        const NetArgs n = {H, V, n_layers, M, embed, layers, lnf_kind, lnf_w, lnf_b, head_t, head_b, eps, NULL, ad};
        const long row0 = 0;
        return net_rows_split(&n, 1, L, head, 1, &row0, tokens, state, state, logits);
    }
    const long nt = B >= 2 ? (omp_get_max_threads() < B ? omp_get_max_threads() : B) : 1;
    if (nt <= 1)
        return prefill_rows(B, 0, B, L, H, V, n_layers, M, head, F, tokens, embed, layers, lnf_kind, lnf_w, lnf_b,
                            head_t, head_b, ad, eps, state, logits);
    int rc = 0;
#pragma omp parallel num_threads(nt) reduction(min : rc)
    {
        const long t = omp_get_thread_num(), k = omp_get_num_threads();
        rc = prefill_rows(B, B * t / k, B * (t + 1) / k, L, H, V, n_layers, M, head, F, tokens, embed, layers,
                          lnf_kind, lnf_w, lnf_b, head_t, head_b, ad, eps, state, logits);
    }
    return rc;
}

/* For the tests and bench.wt103: the adaptive softmax's log-probabilities (P, V) of final-normed hidden states
 * u (P, H), and the adaptive embeddings x (P, H) of ids tokens (P,) (each in [0, V), else E_TOKEN_RANGE), as
 * the step computes them; 0, or -2 out of memory. */
int adaptive_logprobs(const Adaptive *a, long P, long H, long V, const float *u, float *logits) {
    return adaptive_head(a, P, H, V, u, logits);
}

int adaptive_embeddings(const Adaptive *a, long P, long H, const long *tokens, float *x) {
    for (long r = 0; r < P; r++)
        if (tokens[r] < 0 || tokens[r] >= a->in_lo[a->n_in]) return E_TOKEN_RANGE;
    return adaptive_embed(a, H, P, NULL, tokens, x);
}

/* The isotropic network's step: state (n_layers, B, H, 2, M) → state_out (may be state itself). */
int net_step(long B, long H, long V, long n_layers, long M, const long *tokens, const float *embed,
             const NetLayer *layers, long lnf_kind, const float *lnf_w, const float *lnf_b, const float *head_t,
             const float *head_b, const Adaptive *ad, float eps, const float *state, float *state_out,
             float *logits) {
    const NetArgs n = {H, V, n_layers, M, embed, layers, lnf_kind, lnf_w, lnf_b, head_t, head_b, eps, state, ad};
    return step_all_rows(net_rows_fn, &n, NET_PARALLEL_ROWS, B, V, tokens, state_out, logits);
}

/* What the threads of a decode block share (decode_block's arguments) */
typedef struct {
    StepRowsFn step_rows;
    const void *ctx;
    long K, Btot, V;
    float *state;
    long *tok;
    const SampleArgs *args;
    const uint64_t *key;
    uint64_t *counter;
    const long *limit, *stop_first, *stop_off;
    const unsigned char *stop_data;
    unsigned char *hist;
    long hist_cap;
    long *hist_len;
    unsigned char *seen;
    long *out_tok, *n_out, *stopped;
    const int *interrupt;
    long group_rows, group_steps;
    double *tbuf; /* (threads, K): when each thread finished each step */
} DecodeJob;

/* Rows [lo, hi) of a decode block (one group) through steps k0 … k1 − 1 in thread t, each step the group's
 * live rows (not stopped, under their limit) stepped, sampled and checked together; tbuf[t K + k] and
 * *steps (one past the last step run) updated. *delay_ns (or NULL): the test's descheduled thread sleeps
 * that long after its first step, once. Returns the step it stopped at: k1, or the first at which every
 * row of the group had stopped (or one past a step that failed: *rc). */
static long group_round(const DecodeJob *j, long lo, long hi, long k0, long k1, long t, long *rows, float *logits,
                        long *delay_ns, long *steps, int *rc) {
    const long K = j->K, Btot = j->Btot, V = j->V;
    long k = k0;
    for (; k < k1 && *rc == 0; k++) {
        long B = 0;
        for (long r = lo; r < hi; r++)
            if (!j->stopped[r] && j->n_out[r] < j->limit[r]) rows[B++] = r;
        if (B == 0) break;
        *rc = j->step_rows(j->ctx, B, Btot, rows, j->tok, j->state, logits);
        if (*rc == 0) /* this group's rows only: no other thread reads or writes them */
            *rc = sample_and_check(B, rows, V, logits, k, Btot, j->tok, j->args, j->key, j->counter, j->stop_first,
                                   j->stop_off, j->stop_data, j->hist, j->hist_cap, j->hist_len, j->seen,
                                   j->out_tok, j->n_out, j->stopped);
        if (delay_ns && *delay_ns > 0) {
            const struct timespec ts = {*delay_ns / 1000000000L, *delay_ns % 1000000000L};
            nanosleep(&ts, NULL);
            *delay_ns = 0;
        }
        const double now = monotonic_s(); /* step k is done when its last group is */
        if (now > j->tbuf[t * K + k]) j->tbuf[t * K + k] = now;
        if (k + 1 > *steps) *steps = k + 1;
    }
    return k;
}

/* Thread t of nt's share of a decode block's rows through steps k_start … K − 1, round by round (a block in
 * one thread: nt = 1, t = 0); *steps_out: one past the last step it ran (0: none). Returns 0 or an error code. */
static int decode_rows(const DecodeJob *j, long t, long nt, long k_start, long *steps_out) {
    const long K = j->K, Btot = j->Btot, V = j->V;
    const long lo = Btot * t / nt, hi = Btot * (t + 1) / nt, n = hi - lo;
    long *rows = malloc(sizeof(long) * (size_t)(n > 0 ? n : 1));
    float *logits = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1) * (size_t)V);
    int rc = rows && logits ? 0 : -2;
    long steps = 0;
    /* a thread with at most G rows has one group: it checks the interrupt every step, as before */
    const long G = j->group_rows > 0 && j->group_rows < n ? j->group_rows : (n > 0 ? n : 1);
    const long S = G < n && j->group_steps > 0 ? j->group_steps : 1;
    /* rounds of S steps, from step 0 on (rounds 0 … S − 1, S … 2S − 1, …): a start mid-round (decode_split's
     * hand-off) finishes that round first, and the interrupt is checked where it would be from step 0 */
    for (long k0 = k_start, k1; k0 < K && rc == 0; k0 = k1) {
        if (k0 > 0 && k0 % S == 0 && j->interrupt && __atomic_load_n(j->interrupt, __ATOMIC_RELAXED)) break;
        k1 = (k0 / S + 1) * S < K ? (k0 / S + 1) * S : K;
        for (long g = lo; g < hi && rc == 0; g += G) /* each group of G rows through the round */
            group_round(j, g, g + G < hi ? g + G : hi, k0, k1, t, rows, logits, NULL, &steps, &rc);
        if (steps < k1) break; /* every row of this thread has stopped */
    }
    free(rows);
    free(logits);
    *steps_out = steps;
    return rc;
}

/* For the tests and bench.split: whether the threads of a decode block share its groups (1, the default) or each
 * keeps its own (0: decode_rows' fixed shares, the order before); the first thread to start the next threaded
 * block sleeps this long (ns) in its first round, holding that group, as a descheduled thread would (0: never);
 * the group rounds
 * run by another thread than their owner since the library was loaded. */
static long block_share = 1, block_test_delay = 0, block_taken_over = 0;

/* out[0]: the group rounds taken over so far; out[1]: the sharing setting before this call. With share ≥ 0 the
 * sharing becomes share (0: off, else on); with delay_ns ≥ 0, the next threaded block's first thread to start
 * sleeps delay_ns in its first round. */
void decode_block_state(long delay_ns, long share, long *out) {
    if (delay_ns >= 0) __atomic_store_n(&block_test_delay, delay_ns, __ATOMIC_RELAXED);
    out[0] = __atomic_load_n(&block_taken_over, __ATOMIC_RELAXED);
    out[1] = share >= 0 ? __atomic_exchange_n(&block_share, share != 0, __ATOMIC_RELAXED)
                        : __atomic_load_n(&block_share, __ATOMIC_RELAXED);
}

/* The groups of a decode block's rows shared by its threads (decode_shared). Group i: rows [lo, hi), taken
 * through rounds of S steps; k: its next step (a round's first while no thread holds it); busy: a thread holds
 * it; done: every row of it has stopped. Guarded by lock (an atomic flag, held for a scan of the groups). */
typedef struct {
    long lo, hi, S, k, owner; /* owner: the thread decode_rows' schedule gives it */
    int busy, done;
} BlockGroup;

typedef struct {
    BlockGroup *g;
    long n;
    int lock, failed;
} BlockGroups;

/* Takes gs->lock (held for a scan of the groups: spins). */
static inline void block_groups_lock(BlockGroups *gs) {
    while (__atomic_test_and_set(&gs->lock, __ATOMIC_ACQUIRE)) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    }
}

/* The groups of decode_rows' schedule for nt threads: thread t's share [Btot t / nt, Btot (t + 1) / nt) in groups
 * of G rows (one group, one step a round, when the share has at most G rows). Returns the count (≤ Btot). */
static long block_groups(const DecodeJob *j, long nt, BlockGroup *out) {
    long n = 0;
    for (long t = 0; t < nt; t++) {
        const long lo = j->Btot * t / nt, hi = j->Btot * (t + 1) / nt, m = hi - lo;
        const long G = j->group_rows > 0 && j->group_rows < m ? j->group_rows : m;
        const long S = G < m && j->group_steps > 0 ? j->group_steps : 1;
        for (long g = lo; g < hi; g += G) out[n++] = (BlockGroup){g, g + G < hi ? g + G : hi, S, 0, t, 0, 0};
    }
    return n;
}

/* Thread t's part of a decode block whose threads share the groups of decode_rows' schedule: each thread takes
 * the free group furthest behind (the lowest k, then the lowest index) through its next round, and so on until
 * every group has made K steps or stopped. Nothing ties a group to a thread, so a thread that is descheduled (a
 * busy machine) holds up one group's round, not its whole share of the block: the other threads take the rest.
 * Each group still steps the rows it would in decode_rows, round by round, so every row's tokens and state are
 * bit for bit the same. The interrupt ends each group after its current round (a group that has made none
 * makes one); groups may then have made different numbers of steps. A thread that finds no free group while
 * another holds one that will have rounds left waits for it (sched_yield). *steps_out: one past the last step
 * this thread ran. Returns 0 or an error code. */
static int decode_shared(const DecodeJob *j, BlockGroups *gs, long t, long nt, long *steps_out) {
    const long K = j->K, V = j->V;
    const int share = __atomic_load_n(&block_share, __ATOMIC_RELAXED) != 0;
    /* the test's descheduled thread: the first to start, in its first round (which it starts at once) */
    long delay = nt > 1 ? __atomic_exchange_n(&block_test_delay, 0, __ATOMIC_RELAXED) : 0;
    long most = 1;
    for (long i = 0; i < gs->n; i++)
        if (gs->g[i].hi - gs->g[i].lo > most) most = gs->g[i].hi - gs->g[i].lo;
    long *rows = malloc(sizeof(long) * (size_t)most);
    float *logits = malloc(sizeof(float) * (size_t)most * (size_t)V);
    int rc = rows && logits ? 0 : -2;
    long steps = 0;
    while (rc == 0) {
        const int stop = j->interrupt && __atomic_load_n(j->interrupt, __ATOMIC_RELAXED);
        long pick = -1;
        int wait = 0;
        block_groups_lock(gs);
        if (!__atomic_load_n(&gs->failed, __ATOMIC_RELAXED))
            for (long i = 0; i < gs->n; i++) {
                const BlockGroup *g = &gs->g[i];
                if (g->done || g->k >= K || (stop && g->k > 0) || (!share && g->owner != t)) continue;
                if (g->busy) /* its round may leave it more: wait for it unless the interrupt ends it */
                    wait |= !stop;
                else if (pick < 0 || g->k < gs->g[pick].k)
                    pick = i;
            }
        if (pick >= 0) gs->g[pick].busy = 1;
        __atomic_clear(&gs->lock, __ATOMIC_RELEASE);
        if (pick < 0) {
            if (!wait) break;
            sched_yield();
            continue;
        }
        BlockGroup *g = &gs->g[pick];
        const long k0 = g->k, k1 = (k0 / g->S + 1) * g->S < K ? (k0 / g->S + 1) * g->S : K;
        const long k = group_round(j, g->lo, g->hi, k0, k1, t, rows, logits, &delay, &steps, &rc);
        block_groups_lock(gs);
        g->done = k < k1; /* (every row stopped, or an error: nobody takes it again) */
        g->k = k;
        g->busy = 0;
        if (rc != 0) gs->failed = 1;
        if (g->owner != t) __atomic_add_fetch(&block_taken_over, 1, __ATOMIC_RELAXED);
        __atomic_clear(&gs->lock, __ATOMIC_RELEASE);
    }
    free(rows);
    free(logits);
    *steps_out = steps;
    return rc;
}

/* A decode block of fewer than NET_PARALLEL_ROWS rows of the isotropic network with every step split over the
 * threads (split_team_step), all K steps in one parallel region: the threads are woken once a block, not once
 * a step (under OMP_WAIT_POLICY=PASSIVE a wake-up costs tens of µs). The first thread picks the rows and
 * samples, the others wait for it at the barrier. A pause of the split (stalls: split_record) ends the region
 * at the next step: *k_next is then that step, for the caller to go on in one thread; K otherwise. The rows'
 * tokens and states are bit for bit those of decode_rows. Returns 0 or an error code. */
static int decode_split(const DecodeJob *j, const NetArgs *n, long *steps_out, long *k_next) {
    const long K = j->K, Btot = j->Btot, V = n->V, nt = omp_get_max_threads();
    SplitTeam s;
    int rc = split_team_init(&s, n, Btot, nt);
    if (rc) return rc;
    float *logits = malloc(sizeof(float) * (size_t)Btot * (size_t)V);
    if (!logits) {
        free(s.buf);
        return -2;
    }
    long rows[SPLIT_MAX_ROWS], B = 0, steps = 0, next = K;
    /* decode_rows' rounds for one thread of Btot rows: the interrupt ends the block where it would there,
     * after a round of S steps (S > 1 when a schedule takes the rows in more than one group) */
    const long G = j->group_rows > 0 && j->group_rows < Btot ? j->group_rows : Btot;
    const long S = G < Btot && j->group_steps > 0 ? j->group_steps : 1;
#pragma omp parallel num_threads(nt)
    {
        const long t = omp_get_thread_num(), k = omp_get_num_threads();
        int sense = 0;
        for (long step = 0; step < K; step++) {
            if (t == 0) { /* this step's rows (none: the block ends) and their embeddings */
                B = 0;
                if (step > 0 && split_paused())
                    next = step; /* the rest in one thread */
                else if (rc == 0 && !(step > 0 && step % S == 0 && j->interrupt &&
                                      __atomic_load_n(j->interrupt, __ATOMIC_RELAXED)))
                    for (long r = 0; r < Btot; r++)
                        if (!j->stopped[r] && j->n_out[r] < j->limit[r]) rows[B++] = r;
                if (net_embed(n->embed, n->ad, n->H, B, rows, j->tok, s.x)) rc = -2, B = 0;
            }
            /* the others wait here while the first thread samples (milliseconds with a large vocabulary and
             * top-p): no stall; the first thread's own wait is the others' lateness (step 0's: their wake-up,
             * split_team_step) */
            const double w = spin_barrier(&s.bar, &sense, k, NULL);
            if (step > 0 && t == 0) split_record(w);
            if (B == 0) break;
            split_team_step(&s, n, B, 1, 0, Btot, rows, j->state, j->state, logits, t, k, &sense, 0);
            if (t == 0) {
                rc = sample_and_check(B, rows, V, logits, step, Btot, j->tok, j->args, j->key, j->counter,
                                      j->stop_first, j->stop_off, j->stop_data, j->hist, j->hist_cap, j->hist_len,
                                      j->seen, j->out_tok, j->n_out, j->stopped);
                j->tbuf[step] = monotonic_s();
                steps = step + 1;
            }
        }
    }
    free(logits);
    free(s.buf);
    *steps_out = steps;
    *k_next = rc == 0 ? next : K;
    return rc;
}

static long decode_block(StepRowsFn step_rows, const void *ctx, long parallel_rows, long K, long Btot, long V,
                         float *state, long *tok,
                         const double *temp, const long *top_k, const long *kind, const float *top_p,
                         const float *min_p, const float *rep, const float *presence, const float *frequency,
                         const float *bias, const unsigned char *pen_seen, float *counts, const uint64_t *key,
                         uint64_t *counter, const long *limit, const long *stop_first, const long *stop_off,
                         const unsigned char *stop_data, unsigned char *hist, long hist_cap, long *hist_len,
                         unsigned char *seen, long *out_tok, long *n_out, long *stopped, double *times,
                         const long *lp_k, long lp_kmax, float *lp_chosen, long *lp_ids, float *lp_vals,
                         const int *interrupt, long group_rows, long group_steps) {
    for (long r = 0; r < Btot; r++) /* the rows that step: their pending token is fed first */
        if (limit[r] > 0 && (tok[r] < 0 || tok[r] >= V)) return E_TOKEN_RANGE;
    const SampleArgs args = {temp, top_k, kind, top_p, min_p, rep, presence, frequency, bias, pen_seen, counts,
                             lp_k, lp_kmax, lp_chosen, lp_ids, lp_vals};
    const int nt_max = Btot >= parallel_rows ? omp_get_max_threads() : 1;
    double *tbuf = malloc(sizeof(double) * (size_t)nt_max * (size_t)(K > 0 ? K : 1));
    if (!tbuf) return -2;
    for (long i = 0; i < nt_max * K; i++) tbuf[i] = 0.0;
    for (long r = 0; r < Btot; r++) n_out[r] = stopped[r] = 0;
    const DecodeJob job = {step_rows, ctx, K, Btot, V, state, tok, &args, key, counter, limit, stop_first,
                           stop_off, stop_data, hist, hist_cap, hist_len, seen, out_tok, n_out, stopped,
                           interrupt, group_rows, group_steps, tbuf};
    long steps = 0;
    int rc = 0;
    if (nt_max == 1) {
        /* no parallel region around the rows: an isotropic network's block splits each step over the threads
         * (decode_split) when split_step says so, else the steps run here (a region nested in a team of one
         * starts new threads at each step: a text-shakespeare-sized block at batch 1 ran 3x slower split
         * that way than alone) */
        long next = 0; /* the first step left to decode_rows */
        const NetArgs *n = ctx;
        if (step_rows == net_rows_fn && n->src == NULL && split_step(Btot, n->H, n->V, n->n_layers, n->layers))
            rc = decode_split(&job, n, &steps, &next);
        if (rc == 0 && next < K) {
            long more = 0;
            rc = decode_rows(&job, 0, 1, next, &more);
            if (more > steps) steps = more;
        }
    } else {
        /* The threads share the rows' groups (decode_shared): rows never interact, so no thread waits for
         * another between steps (a per-step barrier stalls whenever the machine is busy and one thread is
         * descheduled), and a descheduled thread's rows are taken on by the others. */
        BlockGroups gs = {malloc(sizeof(BlockGroup) * (size_t)Btot), 0, 0, 0};
        if (!gs.g) {
            free(tbuf);
            return -2;
        }
#pragma omp parallel num_threads(nt_max) reduction(min : rc) reduction(max : steps)
        {
            long my_steps = 0; /* (the reduction copies start at min's and max's identities) */
#pragma omp single
            gs.n = block_groups(&job, omp_get_num_threads(), gs.g);
            rc = decode_shared(&job, &gs, omp_get_thread_num(), omp_get_num_threads(), &my_steps);
            steps = my_steps;
        }
        free(gs.g);
    }
    for (long k = 0; k < steps; k++) { /* step k is done when the last thread that ran it is */
        times[k] = k > 0 ? times[k - 1] : 0.0; /* and not before step k − 1 (a group whose rows all
                                                  stopped leaves its later steps to earlier groups' stamps) */
        for (long t = 0; t < nt_max; t++)
            if (tbuf[t * K + k] > times[k]) times[k] = tbuf[t * K + k];
    }
    free(tbuf);
    return rc == 0 ? steps : rc;
}

/* The decode block of the isotropic network (state (n_layers, Btot, H, 2, M)); arguments as above. */
long net_block(long K, long Btot, long H, long V, long n_layers, long M, const float *embed,
               const NetLayer *layers, long lnf_kind, const float *lnf_w, const float *lnf_b, const float *head_t,
               const float *head_b, const Adaptive *ad, float eps, float *state, long *tok, const double *temp,
               const long *top_k,
               const long *kind, const float *top_p, const float *min_p, const float *rep, const float *presence,
               const float *frequency, const float *bias, const unsigned char *pen_seen, float *counts,
               const uint64_t *key, uint64_t *counter, const long *limit, const long *stop_first,
               const long *stop_off, const unsigned char *stop_data, unsigned char *hist, long hist_cap,
               long *hist_len, unsigned char *seen, long *out_tok, long *n_out, long *stopped, double *times,
               const long *lp_k, long lp_kmax, float *lp_chosen, long *lp_ids, float *lp_vals,
               const int *interrupt, long group_rows, long group_steps) {
    const NetArgs n = {H, V, n_layers, M, embed, layers, lnf_kind, lnf_w, lnf_b, head_t, head_b, eps, NULL, ad};
    return decode_block(net_rows_fn, &n, NET_PARALLEL_ROWS, K, Btot, V, state, tok, temp, top_k, kind, top_p,
                        min_p, rep, presence, frequency, bias, pen_seen, counts, key, counter, limit, stop_first,
                        stop_off, stop_data, hist, hist_cap, hist_len, seen, out_tok, n_out, stopped, times,
                        lp_k, lp_kmax, lp_chosen, lp_ids, lp_vals, interrupt, group_rows, group_steps);
}

/* ------------------------------------------------------------------------------------------------
 * SaShiMi's whole step (model/arch/sashimi_recurrent.py: SaShiMiRecurrent.step; LayerNorm or scalar
 * TransposedLN blocks: NetLayer.norm), one row at a time. A row's state is one float32 vector (its
 * StateLayout): the phase (steps taken mod prod(pool), an exact integer), each S4 block's modes (H, 2, M) at
 * its offset, and each level's DownPool and UpPool buffers (s, H). Level k < K, input x (H):
 *     unet:  x = down blocks(x), each block's output kept as a skip (skips: x_in, d_1, …, d_n = x)
 *     r = (phase / every) mod s;  dbuf[r] = x;  out = ubuf[r]  (read before a refill)
 *     r = s − 1:  coarse = W_down · fold(dbuf) + b  (fold: channel h·s + j = dbuf[j][h]);
 *                 c = level k + 1 (coarse);  ubuf[j][h] = (W_up · c + b)[h·s + j];  dbuf = 0
 *     out += x
 *     unet:  up block j (S4 and FF blocks counted apart, j = 1 … n): out = block_j(out) + d_{n−j}  (d_0 = x_in)
 *     else:  out = blocks(out) + out
 * and the center: out = blocks(x) + x. Then LayerNorm and head on level 0's output. The arithmetic is
 * the torch ops' (the blocks are net_rows' S4 + FF pairs); sums run in another order, so logits agree
 * to float32 rounding. The rows of a batch step together (the rows of a level that emit a coarse input go
 * on together), with the linear layers in four-row tiles; a row's bits never depend on the other rows.
 * A 16-bit network (bfloat16, float16) reads its blocks' and pools' linear weights in their own format
 * (NetLayer.wfmt, SLevel.wfmt), widened exactly to float32; the arithmetic stays float32. */

typedef struct {
    long n;                   /* blocks: an S4 block each, with its FF block when d_ff > 0 */
    const NetLayer *layers;
    const long *off, *modes;  /* block i's modes (H, 2, modes[i]) start at off[i] in the row */
} NetStack;

typedef struct {
    long H, s, Hn, F;         /* width, pool stride (0 at the center), the next level's width, widest d_ff */
    long every;               /* samples per step of this level: prod(pool[:k]) */
    long dbuf, ubuf;          /* row offsets of the DownPool and UpPool buffers (s, H) */
    NetStack blocks;          /* up.k.blocks, or the center's */
    const void *down_t;       /* (H·s, Hn): the DownPool linear, transposed (format wfmt) */
    const float *down_b;
    const void *up_t;         /* (Hn, H·s): the UpPool linear, transposed (format wfmt) */
    const float *up_b;
    long unet;                /* 1: down.k.blocks run before the DownPool, with U-Net skips */
    NetStack down;            /* down.k.blocks (unet; the same structure as `blocks`) */
    long wfmt;                /* the pool linears' weight format: W_F32, W_BF16 or W_F16 (as NetLayer's) */
} SLevel;

typedef struct {
    long K, V, numel, period; /* levels below the center, vocabulary, row length, prod(pool) */
    const SLevel *levels;     /* K + 1: level 0 .. K − 1, then the center */
    const float *embed;       /* (V, H_0), pre-multiplied by embed_scale */
    const float *lnf_w, *lnf_b, *head_t, *head_b; /* head_t (H_0, V); head_b may be NULL */
    float eps;
} SNet;

/* A SaShiMi row's step costs ~100 µs (its weights do not fit L1/L2): from four rows on, splitting the rows
 * over the threads pays (shipped model, 2 threads: 4 rows 30.6k samples/s split, 19.8k in one thread; 2
 * rows 17.1k either way, the four-row tiles sharing the weight loads in one thread). */
#define SASHIMI_PARALLEL_ROWS 4

/* The residual blocks of a stack, its S4 and FF blocks counted apart (the U-Net skips' count). */
static long stack_outputs(const NetStack *S) {
    long n = 0;
    for (long l = 0; l < S->n; l++) n += S->layers[l].d_ff > 0 ? 2 : 1;
    return n;
}

/* Per row: U, Y, Y0 (H), O (2H), F, Vf and Z (H·s), C and CO (Hn), and with unet the skips (outputs + 1, H). */
static long level_scratch(const SLevel *L) {
    return 6 * L->H + L->F + 2 * L->H * L->s + 2 * L->Hn + (L->unet ? (stack_outputs(&L->down) + 1) * L->H : 0);
}

/* A level's blocks for n rows: X (n, H) updated in place; row i's block states in st[i]. U-Net skips (n, H)
 * each: with `push`, after each S4 or FF block X is copied to push[m] (m = 0, 1, …); with `pop`, after each
 * block j the skip pop[n_pop − 1 − j] is added to X. */
static int stack_rows(const NetStack *S, long H, long n, float *const *st, float *X, float *U, float *Y, float *O,
                      float *F, float eps, float *push, const float *pop, long n_pop) {
    long m = 0;
    for (long l = 0; l < S->n; l++) {
        const NetLayer *L = S->layers + l;
        block_norm(L->norm, n, H, X, U, L->ln_w, L->ln_b, eps);
        for (long i0 = 0; i0 < n; i0 += SSM_ROWS) {
            const long c = n - i0 < SSM_ROWS ? n - i0 : SSM_ROWS;
            float *xs[SSM_ROWS];
            for (long i = 0; i < c; i++) xs[i] = st[i0 + i] + S->off[l];
            int rc = ssm_rows(L, H, S->modes[l], c, (const float *const *)xs, xs, U + i0 * H, Y + i0 * H);
            if (rc) return rc;
        }
        for (long part = 0; part < (L->d_ff > 0 ? 2 : 1); part++, m++) {
            if (part == 0)
                s4_rest(n, H, L, X, U, Y, O);
            else
                ff_block(n, H, L, X, U, Y, F, eps);
            if (push) memcpy(push + m * n * H, X, sizeof(float) * (size_t)(n * H));
            if (pop) {
                const float *p = pop + (n_pop - 1 - m) * n * H;
                for (long i = 0; i < n * H; i++) X[i] += p[i];
            }
        }
    }
    return 0;
}

/* Level k for n rows (row i: its state st[i], its global phase tau[i]): X (n, H_k) → OUT (n, H_k). The rows
 * whose level-k phase is s − 1 go on to level k + 1 together (their pointers and phases in st + cap and
 * tau + cap). scratch: cap · level_scratch of this level and of every coarser one. The linear layers
 * run in four-row tiles (linear_t): each row's result is the same bits as alone. */
static int level_rows(const SNet *net, long k, long n, long cap, float **st, long *tau, const float *X, float *OUT,
                      float *scratch) {
    const SLevel *L = net->levels + k;
    const long H = L->H, s = L->s;
    float *U = scratch, *Y = U + cap * H, *O = Y + cap * H, *F = O + cap * 2 * H, *Y0 = F + cap * L->F;
    float *Vf = Y0 + cap * H, *C = Vf + cap * H * s, *CO = C + cap * L->Hn, *Z = CO + cap * L->Hn;
    float *SK = Z + cap * H * s; /* unet: the skips (n_skip + 1, n, H): the level's input, each down output */
    const long n_skip = L->unet ? stack_outputs(&L->down) : 0;
    float *next = SK + (L->unet ? cap * (n_skip + 1) * H : 0);
    int rc = 0;
    if (k == net->K) {
        memcpy(OUT, X, sizeof(float) * (size_t)(n * H));
        rc = stack_rows(&L->blocks, H, n, st, OUT, U, Y, O, F, net->eps, NULL, NULL, 0);
        for (long i = 0; i < n * H; i++) OUT[i] += X[i];
        return rc;
    }
    if (L->unet) { /* the down blocks on the level's input: x = d_{n_skip}, the skips kept in SK */
        memcpy(SK, X, sizeof(float) * (size_t)(n * H));
        memcpy(Y0, X, sizeof(float) * (size_t)(n * H));
        rc = stack_rows(&L->down, H, n, st, Y0, U, Y, O, F, net->eps, SK + n * H, NULL, 0);
        if (rc) return rc;
        X = SK + n_skip * n * H;
    }
    float **est = st + cap;
    long *etau = tau + cap, e = 0;
    for (long i = 0; i < n; i++) {
        const long r = (tau[i] / L->every) % s;
        float *dbuf = st[i] + L->dbuf;
        const float *ubuf = st[i] + L->ubuf;
        for (long h = 0; h < H; h++) {
            dbuf[r * H + h] = X[i * H + h];
            OUT[i * H + h] = ubuf[r * H + h]; /* read before a refill */
        }
        if (r == s - 1) { /* a complete block: fold it (channel h·s + j = input j's channel h) */
            float *v = Vf + e * H * s;
            for (long j = 0; j < s; j++)
                for (long h = 0; h < H; h++) v[h * s + j] = dbuf[j * H + h];
            memset(dbuf, 0, sizeof(float) * (size_t)(s * H));
            est[e] = st[i];
            etau[e++] = tau[i];
        }
    }
    if (e > 0) {
        linear_tw(L->wfmt, e, H * s, L->Hn, Vf, L->down_t, L->down_b, C);
        rc = level_rows(net, k + 1, e, cap, est, etau, C, CO, next);
        if (rc) return rc;
        linear_tw(L->wfmt, e, L->Hn, H * s, CO, L->up_t, L->up_b, Z);
        for (long i = 0; i < e; i++) {
            float *ubuf = est[i] + L->ubuf;
            for (long j = 0; j < s; j++)
                for (long h = 0; h < H; h++) ubuf[j * H + h] = Z[i * H * s + h * s + j];
        }
    }
    for (long i = 0; i < n * H; i++) OUT[i] += X[i];
    if (L->unet) /* up block j adds skip n_skip − 1 − j: the down outputs in reverse, then the level's input */
        return stack_rows(&L->blocks, H, n, st, OUT, U, Y, O, F, net->eps, NULL, SK, n_skip);
    memcpy(Y0, OUT, sizeof(float) * (size_t)(n * H));
    rc = stack_rows(&L->blocks, H, n, st, OUT, U, Y, O, F, net->eps, NULL, NULL, 0);
    for (long i = 0; i < n * H; i++) OUT[i] += Y0[i];
    return rc;
}

static int sashimi_rows(const void *ctx, long B, long Btot, const long *rows, const long *tok, float *state,
                        float *logits) {
    (void)Btot;
    const SNet *net = ctx;
    const long H0 = net->levels[0].H, levels = net->K + 1;
    long size = 3 * H0;
    for (long k = 0; k < levels; k++) size += level_scratch(net->levels + k);
    float *buf = malloc(sizeof(float) * (size_t)B * (size_t)size);
    float **st = malloc(sizeof(float *) * (size_t)B * (size_t)levels);
    long *tau = malloc(sizeof(long) * (size_t)B * (size_t)levels);
    int rc = buf && st && tau ? 0 : -2;
    if (rc == 0 && B > 0) {
        float *X = buf, *OUT = X + B * H0, *U = OUT + B * H0, *scratch = U + B * H0;
        for (long i = 0; i < B; i++) {
            st[i] = state + rows[i] * net->numel;
            tau[i] = (long)st[i][0];
            memcpy(X + i * H0, net->embed + tok[rows[i]] * H0, sizeof(float) * (size_t)H0);
        }
        rc = level_rows(net, 0, B, B, st, tau, X, OUT, scratch);
        for (long i = 0; i < B; i++) st[i][0] = (float)((tau[i] + 1) % net->period);
        layer_norm(B, H0, OUT, U, net->lnf_w, net->lnf_b, net->eps);
        linear_t(B, H0, net->V, U, net->head_t, net->head_b, logits);
    }
    free(buf);
    free(st);
    free(tau);
    return rc;
}

/* One step of B rows: tokens (B,), state (B, numel) updated in place, logits (B, V). The phases must be
 * integers in [0, period) (the caller checks). Batches of SASHIMI_PARALLEL_ROWS rows or more are split over
 * the threads by rows. Returns 0, or < 0 (out of memory; a DPLR block over the C limits). */
int sashimi_step(const SNet *net, long B, const long *tokens, float *state, float *logits) {
    return step_all_rows(sashimi_rows, net, SASHIMI_PARALLEL_ROWS, B, net->V, tokens, state, logits);
}

/* The decode block of a SaShiMi network (state (Btot, numel)); the other arguments as net_block's. */
long sashimi_block(const SNet *net, long K, long Btot, float *state, long *tok, const double *temp,
                   const long *top_k, const long *kind, const float *top_p, const float *min_p, const float *rep,
                   const float *presence, const float *frequency, const float *bias,
                   const unsigned char *pen_seen, float *counts, const uint64_t *key, uint64_t *counter,
                   const long *limit, const long *stop_first, const long *stop_off, const unsigned char *stop_data,
                   unsigned char *hist, long hist_cap, long *hist_len, unsigned char *seen, long *out_tok,
                   long *n_out, long *stopped, double *times, const long *lp_k, long lp_kmax,
                   float *lp_chosen, long *lp_ids, float *lp_vals, const int *interrupt, long group_rows,
                   long group_steps) {
    return decode_block(sashimi_rows, net, SASHIMI_PARALLEL_ROWS, K, Btot, net->V, state, tok, temp, top_k, kind,
                        top_p, min_p, rep, presence, frequency, bias, pen_seen, counts, key, counter, limit,
                        stop_first, stop_off, stop_data, hist, hist_cap, hist_len, seen, out_tok, n_out, stopped,
                        times, lp_k, lp_kmax, lp_chosen, lp_ids, lp_vals, interrupt, group_rows, group_steps);
}

/* ---------------------------------------------------------------------------------------------
 * The parallel form of one SSM layer over a prompt (model/recurrent.py `DiagonalSSM.prefill`,
 * `DPLRStep.prefill`: the same block decomposition and tables), fused and in the network's own
 * (B, L, H) layout, so the (B, L, H) ↔ (H, B, L) transposes, the dtype casts around them and the
 * n-step scan all go.
 *
 * The prompt is front-padded with p zeros to n = (L + p) / T blocks of T. For each row b and group of
 * VW = LIN_VW channels (one vector lane per channel), blocks are taken in order with the state ξ at
 * the block's start in registers and L1 (N real coordinates × VW):
 *   y_t = Σ_{j ≤ t} K_{t−j} u_j + Σ_k out[k, t] ξ_k                 (t < T; the block's outputs)
 *   ξ'_m = Σ_j in[j, m] u_j + (Ā^T ξ)_m                              (the state at the next block)
 * Ā^T is a 2×2 block per slot of the real block-diagonal form (form 0: coordinates (x₁, x₂) interleaved,
 * tr (2N) = the block (p, q, r, s) row by row per slot: x₁' = p x₁ + q x₂, x₂' = r x₁ + s x₂) or a dense
 * real N × N matrix (form 1: tr[k, m], ξ'_m = Σ_k ξ_k tr[k, m]). Block 0 starts
 * from 0 and the caller's x0 enters as in the torch form: y_{p+t} += Σ_k out[k, t] x0_k, and
 * ξ after block 0 += x1 = Ā^{T−p} x0 (computed by the caller).
 *
 * Layouts (G = H / VW channel groups; every table float32, the lane, i.e. the channel in the group,
 * innermost): ktab (G, T, VW), intab (G, T, N, VW), outtab (G, N, T, VW), tr (G, 2N, VW) or
 * (G, N, N, VW); u and y (B, L, H) float32 (bf16 = 0) or bfloat16 (bf16 = 1: read exactly, written
 * rounded to nearest even as torch's .to(torch.bfloat16); a NaN is written as 0x7FC0); x0 and x1 (B, H, N) or NULL;
 * xL (B, H, N) the state after the prompt. T and N are multiples of 8 and H of VW (the caller pads N
 * with zero rows and columns). Returns 0, or -1 when those do not hold, -2 out of memory. */
long ssm_prefill_width(void) { return LIN_VW; }

typedef uint32_t uvec __attribute__((vector_size(4 * LIN_VW)));
typedef uint16_t hvec __attribute__((vector_size(2 * LIN_VW)));

static inline fv ld_act(const void *p, long i, int bf16) {
    if (!bf16) return ldv((const float *)p + i);
    hvec h;
    __builtin_memcpy(&h, (const uint16_t *)p + i, sizeof h);
    return (fv)(__builtin_convertvector(h, uvec) << 16);
}
static inline void st_act(void *p, long i, fv v, int bf16) {
    if (!bf16) {
        stv((float *)p + i, v);
        return;
    }
    const uvec b = (uvec)v;
    const uvec nan = (b & 0x7fffffffu) > 0x7f800000u; /* all ones where NaN */
    const uvec r = ((b + 0x7fffu + ((b >> 16) & 1u)) >> 16 & ~nan) | (0x7fc0u & nan);
    const hvec h = __builtin_convertvector(r, hvec);
    __builtin_memcpy((uint16_t *)p + i, &h, sizeof h);
}

#define SP_NB 4 /* blocks at a time: each table vector loaded feeds SP_NB FMAs */

/* acc[i][q] += w[q] · v[i·vs] for the SP_NB blocks i and q < 4: four table vectors at w (VW apart), each
 * loaded once for SP_NB FMAs, and one vector of each block at v */
static inline __attribute__((always_inline)) void fma_4xnb(fv acc[SP_NB][4], const float *w, const fv *v, long vs) {
    const fv w0 = ldv(w), w1 = ldv(w + LIN_VW), w2 = ldv(w + 2 * LIN_VW), w3 = ldv(w + 3 * LIN_VW);
    for (int i = 0; i < SP_NB; i++) {
        const fv x = v[i * vs];
        acc[i][0] = fmav(w0, x, acc[i][0]);
        acc[i][1] = fmav(w1, x, acc[i][1]);
        acc[i][2] = fmav(w2, x, acc[i][2]);
        acc[i][3] = fmav(w3, x, acc[i][3]);
    }
}

/* row b, group g: all blocks in order, SP_NB at a time (their state increments, then the SP_NB-step scan,
 * then their outputs); buf holds SP_NB·(2T + 2N) + 3N vectors */
static void ssm_prefill_group(long L, long H, long N, long T, long p, long form, int bf16, const void *u, void *y,
                              const float *kt, const float *it, const float *ot, const float *tr,
                              const float *x0, const float *x1, float *xL, long b, long g, fv *buf) {
    const long VW = LIN_VW, n = (L + p) / T, h0 = g * VW;
    fv *ub = buf, *yb = ub + SP_NB * T, *Z = yb + SP_NB * T, *X = Z + SP_NB * N, *xc = X + SP_NB * N;
    fv *x0g = xc + N, *x1g = x0g + N;
    for (long k = 0; k < N; k++) {
        xc[k] = (fv){0};
        for (long l = 0; l < VW; l++) {
            x0g[k][l] = x0 ? x0[(b * H + h0 + l) * N + k] : 0.0f;
            x1g[k][l] = x1 ? x1[(b * H + h0 + l) * N + k] : 0.0f;
        }
    }
    for (long c0 = 0; c0 < n; c0 += SP_NB) {
        const long nb = n - c0 < SP_NB ? n - c0 : SP_NB;
        for (long i = 0; i < SP_NB; i++)
            for (long t = 0; t < T; t++) {
                const long pos = (c0 + i) * T + t - p;
                ub[i * T + t] = i < nb && pos >= 0 ? ld_act(u, (b * L + pos) * H + h0, bf16) : (fv){0};
            }
        /* Z_i = Σ_j in[j, ·] u_ij: each block's state increment */
        for (long m0 = 0; m0 < N; m0 += 4) {
            fv acc[SP_NB][4];
            for (int i = 0; i < SP_NB; i++)
                for (int q = 0; q < 4; q++) acc[i][q] = (fv){0};
            for (long j = 0; j < T; j++) fma_4xnb(acc, it + (j * N + m0) * VW, ub + j, T);
            for (int i = 0; i < SP_NB; i++)
                for (int q = 0; q < 4; q++) Z[i * N + m0 + q] = acc[i][q];
        }
        /* the scan: X_i = the state at block c0 + i's start; xc then the state after the last */
        for (long i = 0; i < nb; i++) {
            fv *xi = X + i * N;
            for (long k = 0; k < N; k++) xi[k] = xc[k];
            const fv *zi = Z + i * N;
            if (c0 + i == 0) {
                for (long k = 0; k < N; k++) xc[k] = zi[k] + x1g[k];
            } else if (form == 0) { /* each slot's 2×2 block A^T, row by row: (p, q; r, s) */
                for (long k = 0; k < N; k += 2) {
                    const float *a = tr + 2 * k * VW;
                    const fv p = ldv(a), q = ldv(a + VW), r = ldv(a + 2 * VW), s = ldv(a + 3 * VW);
                    const fv xr = xi[k], xm = xi[k + 1];
                    xc[k] = fmav(p, xr, q * xm) + zi[k];
                    xc[k + 1] = fmav(s, xm, r * xr) + zi[k + 1];
                }
            } else {
                for (long m0 = 0; m0 < N; m0 += 8) {
                    fv acc[8];
                    for (int q = 0; q < 8; q++) acc[q] = (fv){0};
                    for (long k = 0; k < N; k++) {
                        const fv xk = xi[k];
                        const float *a = tr + (k * N + m0) * VW;
                        for (int q = 0; q < 8; q++) acc[q] = fmav(ldv(a + q * VW), xk, acc[q]);
                    }
                    for (int q = 0; q < 8; q++) xc[m0 + q] = acc[q] + zi[m0 + q];
                }
            }
        }
        for (long i = nb; i < SP_NB; i++)
            for (long k = 0; k < N; k++) X[i * N + k] = (fv){0};
        /* outputs: y_it = Σ_{j ≤ t} K_{t−j} u_ij + Σ_k out[k, t] X_ik, 4 positions at a time */
        for (long t0 = 0; t0 < T; t0 += 4) {
            fv acc[SP_NB][4];
            for (int i = 0; i < SP_NB; i++)
                for (int q = 0; q < 4; q++) acc[i][q] = (fv){0};
            for (long j = 0; j < t0; j++) fma_4xnb(acc, kt + (t0 - j) * VW, ub + j, T);
            for (int jj = 0; jj < 4; jj++)
                for (int i = 0; i < SP_NB; i++) {
                    const fv uj = ub[i * T + t0 + jj];
                    for (int q = jj; q < 4; q++) acc[i][q] = fmav(ldv(kt + (q - jj) * VW), uj, acc[i][q]);
                }
            for (long k = 0; k < N; k++) fma_4xnb(acc, ot + (k * T + t0) * VW, X + k, N);
            for (int i = 0; i < SP_NB; i++)
                for (int q = 0; q < 4; q++) yb[i * T + t0 + q] = acc[i][q];
        }
        if (c0 == 0 && x0) /* block 0: the prompt's start state, at the prompt's positions t ≥ p */
            for (long t = p; t < T; t++)
                for (long k = 0; k < N; k++) yb[t] = fmav(ldv(ot + (k * T + t - p) * VW), x0g[k], yb[t]);
        for (long i = 0; i < nb; i++)
            for (long t = 0; t < T; t++) {
                const long pos = (c0 + i) * T + t - p;
                if (pos >= 0) st_act(y, (b * L + pos) * H + h0, yb[i * T + t], bf16);
            }
    }
    for (long k = 0; k < N; k++)
        for (long l = 0; l < VW; l++) xL[(b * H + h0 + l) * N + k] = xc[k][l];
}

long ssm_prefill(long B, long L, long H, long N, long T, long p, long form, long bf16, const void *u, void *y,
                 const float *ktab, const float *intab, const float *outtab, const float *tr, const float *x0,
                 const float *x1, float *xL, long nthreads) {
    const long VW = LIN_VW;
    if (T <= 0 || T % 8 || N <= 0 || N % 8 || H % VW || p < 0 || p >= T || (L + p) % T || (form != 0 && form != 1))
        return -1;
    const long G = H / VW, items = B * G;
    const long tr_size = form == 0 ? 2 * N * VW : N * N * VW;
    long rc = 0;
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1) reduction(min : rc)
    {
        fv *buf = aligned_alloc(64, sizeof(fv) * (size_t)(SP_NB * (2 * T + 2 * N) + 3 * N));
        if (!buf) rc = -2;
#pragma omp for schedule(static)
        for (long item = 0; item < items; item++) {
            if (!buf) continue;
            const long b = item / G, g = item % G;
            ssm_prefill_group(L, H, N, T, p, form, (int)bf16, u, y, ktab + g * T * VW, intab + g * T * N * VW,
                              outtab + g * N * T * VW, tr + g * tr_size, x0, x1, xL, b, g, buf);
        }
        free(buf);
    }
    return rc;
}
