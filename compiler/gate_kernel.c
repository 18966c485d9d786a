/* qcircuit's fused gate kernel: a schedule's permute and the gate GEMM after it, one token
   block at a time (compiler/kernels.py).

   A permute followed by a gate on the two innermost axes costs two passes over the
   activation: the copy writes it out in the new order and the GEMM reads it back. Here each
   block of a few tokens (a few hundred KiB: it stays in L2) is gathered into a scratch buffer
   with the permute kernel and multiplied there by the BLAS that torch itself uses (its
   sgemm_/dgemm_, handed over by the caller), so the permuted activation never goes to memory.
   Backward does the same in reverse: gy·G for a block is scattered back through the inverse
   permute, and the gate's gradient Σ gyᵀ·x is accumulated per thread from the gathered
   input. Row-major (tokens·R × k) activations, gate matrix G (k2 × k) row-major. */
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "permute.c"

typedef void (*blas_gemm)(const char *, const char *, const int *, const int *, const int *,
                          const void *, const void *, const int *, const void *, const int *,
                          const void *, void *, const int *);
typedef int (*local_threads)(int);
static blas_gemm GEMM4, GEMM8;
static local_threads LOCAL_THREADS;

void qc_set_blas(void *sgemm, void *dgemm, void *local) {
    GEMM4 = (blas_gemm)sgemm;
    GEMM8 = (blas_gemm)dgemm;
    LOCAL_THREADS = (local_threads)local;
}

/* How a block of tokens is gathered (or scattered): the permute kernel's arguments with the
   rows of one token (rows_per_token rows, row_stride apart). */
typedef struct {
    int itemsize, nd;
    int64_t rows_per_token, row_stride;
    const int64_t *size, *stride;
} qc_copy;

/* BLAS's alpha = 1 and beta = 0 in the element type */
static const float ONE4 = 1.0f, ZERO4 = 0.0f;
static const double ONE8 = 1.0, ZERO8 = 0.0;
#define ONE(isz) ((isz) == 4 ? (const void *)&ONE4 : (const void *)&ONE8)
#define ZERO(isz) ((isz) == 4 ? (const void *)&ZERO4 : (const void *)&ZERO8)

static void copy_block(const qc_copy *c, const char *src, char *dst, int64_t tokens) {
    qc_permute(src, dst, c->itemsize, tokens * c->rows_per_token, c->row_stride, c->nd,
               c->size, c->stride, 1);
}

/* y = gather(x) · Gᵀ. Returns -1 when it cannot run (the caller falls back). */
int qc_gate_forward(int isz, const void *x, void *y, const void *g, int64_t tokens,
                    int64_t f_in, int k, int k2, const qc_copy *gather, int block, int threads) {
    blas_gemm gemm = isz == 4 ? GEMM4 : isz == 8 ? GEMM8 : NULL;
    if (!gemm || f_in % k) return -1;
    int64_t rows = f_in / k, f_out = rows * k2;
    int failed = 0;
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int local = LOCAL_THREADS ? LOCAL_THREADS(1) : 0;
        char *scratch = malloc((size_t)(block * f_in * isz));
        if (!scratch) failed = 1;
        #pragma omp for schedule(static)
        for (int64_t t0 = 0; t0 < tokens; t0 += block) {
            if (!scratch) continue;
            int64_t nb = tokens - t0 < block ? tokens - t0 : block;
            copy_block(gather, (const char *)x + t0 * f_in * isz, scratch, nb);
            int n = (int)(nb * rows);
            /* column-major: yᵀ (k2 × n) = Gᵀᵀ (k2 × k) · xᵀ (k × n) */
            gemm("T", "N", &k2, &n, &k, ONE(isz), g, &k, scratch, &k, ZERO(isz),
                 (char *)y + t0 * f_out * isz, &k2);
        }
        free(scratch);
        if (LOCAL_THREADS) LOCAL_THREADS(local);
    }
    return failed ? -1 : 0;
}

/* gm += Σ gyᵀ · gather(x) (k2 × k row-major, when gm); gx = scatter(gy · G) (when gx). */
int qc_gate_backward(int isz, const void *x, const void *gy, const void *g, void *gx,
                     void *gm, int64_t tokens, int64_t f_in, int k, int k2,
                     const qc_copy *gather, const qc_copy *scatter, int block, int threads) {
    blas_gemm gemm = isz == 4 ? GEMM4 : isz == 8 ? GEMM8 : NULL;
    if (!gemm || f_in % k) return -1;
    int64_t rows = f_in / k, f_out = rows * k2, acc_size = (int64_t)k * k2;
    char *acc = gm ? calloc((size_t)(threads * acc_size), (size_t)isz) : NULL;
    if (gm && !acc) return -1;
    int failed = 0;
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int local = LOCAL_THREADS ? LOCAL_THREADS(1) : 0;
        int me = 0;
#ifdef _OPENMP
        me = omp_get_thread_num();
#endif
        char *mine = acc ? acc + me * acc_size * isz : NULL;
        char *xs = gm ? malloc((size_t)(block * f_in * isz)) : NULL;
        char *gs = gx ? malloc((size_t)(block * f_in * isz)) : NULL;
        if ((gm && !xs) || (gx && !gs)) failed = 1;
        #pragma omp for schedule(static)
        for (int64_t t0 = 0; t0 < tokens; t0 += block) {
            if ((gm && !xs) || (gx && !gs)) continue;
            int64_t nb = tokens - t0 < block ? tokens - t0 : block;
            int n = (int)(nb * rows);
            const char *gyb = (const char *)gy + t0 * f_out * isz;
            if (gm) {
                copy_block(gather, (const char *)x + t0 * f_in * isz, xs, nb);
                /* column-major: gmᵀ (k × k2) += xᵀ (k × n) · gy (n × k2) */
                gemm("N", "T", &k, &k2, &n, ONE(isz), xs, &k, gyb, &k2, ONE(isz), mine, &k);
            }
            if (gx) {
                /* column-major: gxᵀ (k × n) = Gᵀ (k × k2) · gyᵀ (k2 × n) */
                gemm("N", "N", &k, &n, &k2, ONE(isz), g, &k, gyb, &k2, ZERO(isz), gs, &k);
                copy_block(scatter, gs, (char *)gx + t0 * f_in * isz, nb);
            }
        }
        free(xs);
        free(gs);
        if (LOCAL_THREADS) LOCAL_THREADS(local);
    }
    if (acc && !failed) {
        for (int t = 0; t < threads; ++t) {
            if (isz == 4) {
                float *d = gm, *s = (float *)acc + t * acc_size;
                for (int64_t i = 0; i < acc_size; ++i) d[i] += s[i];
            } else {
                double *d = gm, *s = (double *)acc + t * acc_size;
                for (int64_t i = 0; i < acc_size; ++i) d[i] += s[i];
            }
        }
    }
    free(acc);
    return failed ? -1 : 0;
}
