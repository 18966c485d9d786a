/* qcircuit's permute kernel: a dense tensor copied into a new axis order (compiler/kernels.py).

   The caller coalesces the permutation first, so the copy is described by the output's axes,
   outer to inner: the first axis is split over threads as "rows" (input stride row_stride),
   the remaining nd axes form one slab per row, with sizes size[] and input strides stride[]
   (in elements). The output is written in order. A slab of a schedule's permute is one
   token's features (a few KiB), so its reads stay in L1 whatever their order.

   Two inner loops: a 4x4 register transpose for 4-byte elements when the input's innermost
   axis moves inside the slab (both that axis and the output's innermost a multiple of 4),
   else a strided gather along the output's innermost axis. Elements are moved as raw bits. */
#include <stdint.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#define MAX_AXES 16
typedef struct { uint64_t lo, hi; } qc_u128;

/* Advance the odometer idx over axes [0, last) of size[], skipping axis `skip`. */
static inline void next_index(int64_t *idx, const int64_t *size, int last, int skip) {
    for (int a = last - 1; a >= 0; --a) {
        if (a == skip) continue;
        if (++idx[a] < size[a]) return;
        idx[a] = 0;
    }
}

#define GATHER(NAME, T)                                                                     \
static void NAME(const T *restrict s, T *restrict d, int nd, const int64_t *size,          \
                 const int64_t *stride) {                                                   \
    int64_t inner = size[nd - 1], step = stride[nd - 1], lines = 1;                         \
    int64_t idx[MAX_AXES] = {0};                                                            \
    for (int a = 0; a < nd - 1; ++a) lines *= size[a];                                      \
    for (int64_t l = 0; l < lines; ++l) {                                                   \
        int64_t off = 0;                                                                    \
        for (int a = 0; a < nd - 1; ++a) off += idx[a] * stride[a];                         \
        const T *sp = s + off;                                                              \
        for (int64_t j = 0; j < inner; ++j) d[j] = sp[j * step];                            \
        d += inner;                                                                         \
        next_index(idx, size, nd - 1, -1);                                                  \
    }                                                                                       \
}
GATHER(gather1, uint8_t)
GATHER(gather2, uint16_t)
GATHER(gather4, uint32_t)
GATHER(gather8, uint64_t)
GATHER(gather16, qc_u128)

#if defined(__SSE__)
/* 4-byte elements; the input's innermost axis sits at output axis `pi` < nd - 1. */
static void transpose4(const float *restrict s, float *restrict d, int nd, const int64_t *size,
                       const int64_t *stride, int pi) {
    int64_t ni = size[pi], nj = size[nd - 1], sj = stride[nd - 1];
    int64_t out_stride[MAX_AXES], idx[MAX_AXES] = {0}, blocks = 1, acc = 1;
    for (int a = nd - 1; a >= 0; --a) { out_stride[a] = acc; acc *= size[a]; }
    for (int a = 0; a < nd - 1; ++a) if (a != pi) blocks *= size[a];
    int64_t oi = out_stride[pi];
    for (int64_t b = 0; b < blocks; ++b) {
        int64_t in_off = 0, out_off = 0;
        for (int a = 0; a < nd - 1; ++a)
            if (a != pi) { in_off += idx[a] * stride[a]; out_off += idx[a] * out_stride[a]; }
        for (int64_t i = 0; i < ni; i += 4) {
            for (int64_t j = 0; j < nj; j += 4) {
                const float *sp = s + in_off + j * sj + i;
                __m128 r0 = _mm_loadu_ps(sp), r1 = _mm_loadu_ps(sp + sj);
                __m128 r2 = _mm_loadu_ps(sp + 2 * sj), r3 = _mm_loadu_ps(sp + 3 * sj);
                _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
                float *dp = d + out_off + i * oi + j;
                _mm_storeu_ps(dp, r0);
                _mm_storeu_ps(dp + oi, r1);
                _mm_storeu_ps(dp + 2 * oi, r2);
                _mm_storeu_ps(dp + 3 * oi, r3);
            }
        }
        next_index(idx, size, nd - 1, pi);
    }
}
#endif

/* 0 on success, -1 for arguments this kernel does not take (the caller then copies itself). */
int qc_permute(const void *src, void *dst, int itemsize, int64_t rows, int64_t row_stride,
               int nd, const int64_t *size, const int64_t *stride, int threads) {
    if (nd < 1 || nd > MAX_AXES) return -1;
    if (itemsize != 1 && itemsize != 2 && itemsize != 4 && itemsize != 8 && itemsize != 16)
        return -1;
    int64_t n = 1;
    int pi = -1;
    for (int a = 0; a < nd; ++a) {
        n *= size[a];
        if (stride[a] == 1) pi = a;
    }
    int tiled = 0;
#if defined(__SSE__)
    tiled = itemsize == 4 && pi >= 0 && pi < nd - 1 && size[pi] % 4 == 0 && size[nd - 1] % 4 == 0;
#endif
    const char *in = (const char *)src;
    char *out = (char *)dst;
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && rows > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const void *s = in + r * row_stride * itemsize;
        void *d = out + r * n * itemsize;
#if defined(__SSE__)
        if (tiled) { transpose4(s, d, nd, size, stride, pi); continue; }
#endif
        switch (itemsize) {
        case 1: gather1(s, d, nd, size, stride); break;
        case 2: gather2(s, d, nd, size, stride); break;
        case 4: gather4(s, d, nd, size, stride); break;
        case 8: gather8(s, d, nd, size, stride); break;
        default: gather16(s, d, nd, size, stride); break;
        }
    }
    return 0;
}
