/* Grouped fp32 GEMMs for the experts on AVX-512 CPUs; built and loaded by avx512_gemm.py.
 *
 * Rows are grouped by expert (counts[j] rows from starts[j], e experts); x is [rows, in_width] and
 * y, g are [rows, out_width]. Every matrix is row-major and dense.
 *
 *   nn:    y[rows j] = x[rows j] @ w[j]          w[j]: [in_width, out_width]    (forward)
 *   nt:    y[rows j] = x[rows j] @ w[j]^T        w[j]: [out_width, in_width]    (input gradient)
 *   outer: dw[j]     = x[rows j]^T @ g[rows j]   dw[j]: [in_width, out_width]   (weight gradient)
 *
 * Why not MKL: with few rows per expert MKL packs each expert's weight in a memory-bound phase
 * before computing, so the weights of many experts stream with the arithmetic stopped. These
 * kernels read the weights where they lie and prefetch the next rows (and, at the end of an
 * expert, the next expert's first rows) while the FMAs run; the weight gradient is written with
 * streaming stores, which need no read of the old contents.
 *
 * Threads: the caller's count; each takes a contiguous run of experts holding an equal share of
 * the rows.
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define NR 64  /* output columns per tile: 4 zmm */
#define PD 20  /* prefetch distance, in weight rows */

/* acc[r][:] += a[r * a_stride] * b[0:64] for r < MR: one row of b against MR scalars of a */
static inline __attribute__((always_inline)) void rank1_update(
        const int MR, __m512 acc[6][4], const float *a, int64_t a_stride, const float *b) {
    __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
    __m512 b2 = _mm512_loadu_ps(b + 32), b3 = _mm512_loadu_ps(b + 48);
    for (int r = 0; r < MR; r++) {
        __m512 s = _mm512_set1_ps(a[r * a_stride]);
        acc[r][0] = _mm512_fmadd_ps(s, b0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(s, b1, acc[r][1]);
        acc[r][2] = _mm512_fmadd_ps(s, b2, acc[r][2]);
        acc[r][3] = _mm512_fmadd_ps(s, b3, acc[r][3]);
    }
}

/* ---- nn: acc[MR][4] over the in_width rows of an [in_width, 64] weight panel ----------------- */
static inline __attribute__((always_inline)) void nn_tile(
        const int MR, int in_width, const float *x, int64_t ldx, const float *w, int64_t ldw,
        float *y, int64_t ldy, int prefetch, const float *w_next, int64_t ld_next) {
    __m512 acc[6][4];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (int p = 0; p < in_width; p++) {
        const float *b = w + p * ldw;
        if (prefetch) {
            const float *q = p + PD < in_width ? b + PD * ldw : w_next + (p + PD - in_width) * ld_next;
            _mm_prefetch((const char *)q, _MM_HINT_T1);
            _mm_prefetch((const char *)(q + 16), _MM_HINT_T1);
            _mm_prefetch((const char *)(q + 32), _MM_HINT_T1);
            _mm_prefetch((const char *)(q + 48), _MM_HINT_T1);
        }
        rank1_update(MR, acc, x + p, ldx, b);
    }
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(y + r * ldy + 16 * c, acc[r][c]);
}

#define DISPATCH_MR(mr, CALL) \
    switch (mr) { case 6: CALL(6); break; case 5: CALL(5); break; case 4: CALL(4); break; \
                  case 3: CALL(3); break; case 2: CALL(2); break; default: CALL(1); break; }

/* One expert: panels of 64 output columns; the first row tile of a panel brings it in from
 * memory (prefetching ahead), the others find it in L2. */
static void nn_expert(int m, int in_width, int out_width, const float *x, const float *w, float *y,
                      const float *w_next_expert) {
    for (int n0 = 0; n0 < out_width; n0 += NR) {
        const float *next = n0 + NR < out_width ? w + n0 + NR : w_next_expert;
        for (int i0 = 0; i0 < m; i0 += 6) {
            int mr = m - i0 < 6 ? m - i0 : 6, pf = i0 == 0 && next != NULL;
            const float *xi = x + (int64_t)i0 * in_width;
            float *yi = y + (int64_t)i0 * out_width + n0;
#define NN(MR) nn_tile(MR, in_width, xi, in_width, w + n0, out_width, yi, out_width, pf, next, \
                       out_width)
            DISPATCH_MR(mr, NN)
#undef NN
        }
    }
}

/* ---- outer: dw[in_width, out_width] = x^T g, reduction over the expert's m rows ------------- */
static inline __attribute__((always_inline)) void outer_tile(
        const int MR, int m, const float *x, int64_t ldx, const float *g, int64_t ldg,
        float *dw, int64_t lddw, int stream) {
    __m512 acc[6][4];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (int t = 0; t < m; t++) rank1_update(MR, acc, x + t * ldx, 1, g + t * ldg);
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < 4; c++) {
            if (stream) _mm512_stream_ps(dw + r * lddw + 16 * c, acc[r][c]);
            else _mm512_storeu_ps(dw + r * lddw + 16 * c, acc[r][c]);
        }
}

static void outer_expert(int m, int in_width, int out_width, const float *x, const float *g, float *dw) {
    if (m == 0) {
        for (int i = 0; i < in_width; i++)
            memset(dw + (int64_t)i * out_width, 0, sizeof(float) * out_width);
        return;
    }
    int stream = ((uintptr_t)dw % 64) == 0;  /* out_width % 16 == 0 keeps every row aligned then */
    for (int n0 = 0; n0 < out_width; n0 += NR)
        for (int i0 = 0; i0 < in_width; i0 += 6) {
            int mr = in_width - i0 < 6 ? in_width - i0 : 6;
#define OUTER(MR) outer_tile(MR, m, x + i0, in_width, g + n0, out_width, \
                              dw + (int64_t)i0 * out_width + n0, out_width, stream)
            DISPATCH_MR(mr, OUTER)
#undef OUTER
        }
}

/* ---- nt: y[m, out_width] = x[m, in_width] w^T with w [out_width, in_width]: dot products along
 * in_width, 4 x rows x 6 w rows ------------------------------------------------------------------ */
static inline __attribute__((always_inline)) void nt_tile(
        const int MR, const int NC, int in_width, const float *x, const float *w, float *y, int64_t ldy,
        int prefetch) {
    __m512 acc[4][6];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NC; c++) acc[r][c] = _mm512_setzero_ps();
    for (int k = 0; k < in_width; k += 16) {
        __m512 a[4];
        for (int r = 0; r < MR; r++) a[r] = _mm512_loadu_ps(x + (int64_t)r * in_width + k);
        for (int c = 0; c < NC; c++) {
            const float *wc = w + (int64_t)c * in_width + k;
            if (prefetch) _mm_prefetch((const char *)(wc + 6 * in_width), _MM_HINT_T1);
            __m512 b = _mm512_loadu_ps(wc);
            for (int r = 0; r < MR; r++) acc[r][c] = _mm512_fmadd_ps(a[r], b, acc[r][c]);
        }
    }
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < NC; c++) y[r * ldy + c] = _mm512_reduce_add_ps(acc[r][c]);
}

static void nt_expert(int m, int in_width, int out_width, const float *x, const float *w, float *y) {
    for (int c0 = 0; c0 < out_width; c0 += 6) {
        int nc = out_width - c0 < 6 ? out_width - c0 : 6;
        for (int i0 = 0; i0 < m; i0 += 4) {
            int mr = m - i0 < 4 ? m - i0 : 4, pf = i0 == 0;
            const float *xi = x + (int64_t)i0 * in_width, *wc = w + (int64_t)c0 * in_width;
            float *yi = y + (int64_t)i0 * out_width + c0;
#define NT(MR, NC) nt_tile(MR, NC, in_width, xi, wc, yi, out_width, pf)
#define NT_MR(NC) switch (mr) { case 4: NT(4, NC); break; case 3: NT(3, NC); break; \
                                case 2: NT(2, NC); break; default: NT(1, NC); break; }
            switch (nc) {
                case 6: NT_MR(6) break; case 5: NT_MR(5) break; case 4: NT_MR(4) break;
                case 3: NT_MR(3) break; case 2: NT_MR(2) break; default: NT_MR(1) break;
            }
#undef NT_MR
#undef NT
        }
    }
}

/* ---- threads ---------------------------------------------------------------------------------- */
enum { KIND_NN = 0, KIND_NT = 1, KIND_OUTER = 2 };

typedef struct {
    int kind, e0, e1, in_width, out_width;
    const int64_t *counts, *starts;
    const float *x, *w, *g;
    int64_t w_stride;
    float *out;
} job_t;

static void *run_job(void *arg) {
    const job_t *j = (const job_t *)arg;
    for (int e = j->e0; e < j->e1; e++) {
        int m = (int)j->counts[e];
        if (m < 0) continue;  /* not this call's expert (the caller computes it another way) */
        const float *x = j->x + j->starts[e] * (int64_t)j->in_width;
        const float *w = j->w ? j->w + e * j->w_stride : NULL;
        if (j->kind == KIND_NN) {
            if (m == 0) continue;
            const float *next = e + 1 < j->e1 ? j->w + (e + 1) * j->w_stride : NULL;
            nn_expert(m, j->in_width, j->out_width, x, w,
                      j->out + j->starts[e] * (int64_t)j->out_width, next);
        } else if (j->kind == KIND_NT) {
            if (m == 0) continue;
            nt_expert(m, j->in_width, j->out_width, x, w, j->out + j->starts[e] * (int64_t)j->out_width);
        } else {
            const float *g = j->g + j->starts[e] * (int64_t)j->out_width;
            outer_expert(m, j->in_width, j->out_width, x, g, j->out + e * j->w_stride);
        }
    }
    if (j->kind == KIND_OUTER) _mm_sfence();  /* streaming stores are visible once this returns */
    return NULL;
}

/* The entry point. `w_stride` is the distance between experts' matrices in w (nn, nt) or in the
 * output (outer). Returns 0, or -1 if a thread could not be started (nothing half-done: the
 * caller's thread then runs every job). */
int grouped_gemm(int kind, int threads, int e, const int64_t *counts, const int64_t *starts,
                 int in_width, int out_width, const float *x, const float *w, const float *g,
                 int64_t w_stride, float *out) {
    enum { MAX_THREADS = 256 };
    job_t jobs[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > e) threads = e > 0 ? e : 1;
    int64_t total = 0;
    for (int j = 0; j < e; j++) total += counts[j] + 1;  /* +1: an empty expert still costs;
                                                             a skipped one (-1) costs nothing */
    int e0 = 0;
    int64_t seen = 0;
    for (int t = 0; t < threads; t++) {
        int e1 = e0;
        int64_t goal = total * (t + 1) / threads;
        while (e1 < e && (t == threads - 1 || seen + counts[e1] + 1 <= goal || e1 == e0)) {
            seen += counts[e1] + 1;
            e1++;
        }
        job_t j = {kind, e0, e1, in_width, out_width, counts, starts, x, w, g, w_stride, out};
        jobs[t] = j;
        e0 = e1;
    }
    int started = 0, failed = 0;
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&tids[t], NULL, run_job, &jobs[t]) != 0) { failed = 1; break; }
        started = t;
    }
    run_job(&jobs[0]);
    for (int t = 1; t <= started; t++) pthread_join(tids[t], NULL);
    if (failed)
        for (int t = started + 1; t < threads; t++) run_job(&jobs[t]);
    return failed ? -1 : 0;
}
