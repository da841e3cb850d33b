/* The int8 product's quantization and rescaling (softprompt/int8_kernels.py), one pass per row.
 *
 * Each computes the very bits of the torch ops it replaces (int8_kernels._math): the same IEEE
 * operations in the same order, compiled without contraction into fused multiply-adds and without
 * fast-math. Rows are independent: a row's result never depends on another row.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* |v| as its bits: for non-negative floats the bits order as the values, and a NaN's lie above
 * infinity's, so an integer max over them is the float max with NaN propagating (as torch's amax),
 * and it vectorizes where a float max with NaN checks does not */
static inline uint32_t abs_bits(float v) {
    uint32_t b;
    memcpy(&b, &v, sizeof b);
    return b & 0x7fffffffu;
}

static inline float from_bits(uint32_t b) {
    float v;
    memcpy(&v, &b, sizeof v);
    return v;
}

static float absmax(const float *v, int64_t n) {
    uint32_t m = 0;
    for (int64_t k = 0; k < n; k++) {
        uint32_t b = abs_bits(v[k]);
        m = b > m ? b : m;
    }
    return from_bits(m);
}

/* torch's clamp(min=lo) then / qmax: NaN stays NaN */
static float scale_of(float a, float lo, float qmax) { return (a < lo ? lo : a) / qmax; }

/* an integer code v in [-qmax, qmax] stored as the byte of v + offset: offset 0 gives int8's two's
 * complement, offset 128 (or 64) the uint8 that oneDNN takes with that zero point */
static inline uint8_t code(float v, int offset) { return (uint8_t)((int)v + offset); }

/* The unnormalized Walsh-Hadamard transform of each block of `block` values (a power of two):
 * stage h = 1, 2, 4, ...: within each group of 2h, (a, b) -> (a + b, a - b) for a at j, b at j + h.
 * Each output is the same sum or difference of the same two operands whatever the code's shape, so
 * these are the very bits of the torch version (int8_kernels.rotate). Written with 8-float vectors
 * (GCC's vector extensions: AVX where there is AVX, plain code elsewhere): stages 1, 2, 4 within a
 * vector by shuffles, as a + s * b with s = +-1 (a + (-b) is a - b, bit for bit), stages 8 and up
 * between vectors. The plain loops took 2.1 ns per value, 13x the quantization itself. */
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8 load8(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

static void hadamard_scalar(float *v, int64_t K, int64_t block) {
    for (int64_t h = 1; h < block; h *= 2)
        for (int64_t g = 0; g < K; g += 2 * h)
            for (int64_t j = g; j < g + h; j++) {
                float a = v[j], b = v[j + h];
                v[j] = a + b;
                v[j + h] = a - b;
            }
}

static void hadamard(float *v, int64_t K, int64_t block) {
    if (block < 8) {
        hadamard_scalar(v, K, block);
        return;
    }
    const v8i a1 = {0, 0, 2, 2, 4, 4, 6, 6}, b1 = {1, 1, 3, 3, 5, 5, 7, 7};
    const v8i a2 = {0, 1, 0, 1, 4, 5, 4, 5}, b2 = {2, 3, 2, 3, 6, 7, 6, 7};
    const v8i a4 = {0, 1, 2, 3, 0, 1, 2, 3}, b4 = {4, 5, 6, 7, 4, 5, 6, 7};
    const v8 s1 = {1, -1, 1, -1, 1, -1, 1, -1}, s2 = {1, 1, -1, -1, 1, 1, -1, -1};
    const v8 s4 = {1, 1, 1, 1, -1, -1, -1, -1};
    for (int64_t j = 0; j < K; j += 8) {
        v8 x = load8(v + j);
        x = __builtin_shuffle(x, a1) + s1 * __builtin_shuffle(x, b1);
        x = __builtin_shuffle(x, a2) + s2 * __builtin_shuffle(x, b2);
        x = __builtin_shuffle(x, a4) + s4 * __builtin_shuffle(x, b4);
        store8(v + j, x);
    }
    for (int64_t h = 8; h < block; h *= 2)
        for (int64_t g = 0; g < K; g += 2 * h)
            for (int64_t j = g; j < g + h; j += 8) {
                v8 a = load8(v + j), b = load8(v + j + h);
                store8(v + j, a + b);
                store8(v + j + h, a - b);
            }
}

/* x (M, K) [rotated in blocks of `block`, if > 1] -> q (levels*M, K) codes and s (levels*M): row m's
 * first level in row m, its rounding error's in row M + m, each v = rint(x / s) with
 * s = absmax / qmax. work: K floats. */
void sp_quantize(const float *x, int64_t block, int64_t M, int64_t K, int levels, float qmax, int offset,
                 uint8_t *q, float *s, float *work) {
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * K;
        if (block > 1) {
            memcpy(work, row, K * sizeof(float));
            hadamard(work, K, block);
            row = work;
        }
        float s1 = scale_of(absmax(row, K), 1e-12f, qmax);
        uint8_t *q1 = q + m * K;
        s[m] = s1;
        if (levels == 1) {
            for (int64_t k = 0; k < K; k++) q1[k] = code(rintf(row[k] / s1), offset);
            continue;
        }
        /* the rounding error r = x - round(x / s1) * s1, quantized in turn */
        uint32_t a2 = 0;
        for (int64_t k = 0; k < K; k++) {
            float r1 = rintf(row[k] / s1);
            float p = r1 * s1;
            uint32_t b = abs_bits(row[k] - p);
            a2 = b > a2 ? b : a2;
        }
        float s2 = scale_of(from_bits(a2), 1e-30f, qmax);
        uint8_t *q2 = q + (M + m) * K;
        s[M + m] = s2;
        for (int64_t k = 0; k < K; k++) {
            float r1 = rintf(row[k] / s1);
            float p = r1 * s1;
            float r = row[k] - p;
            q1[k] = code(r1, offset);
            q2[k] = code(rintf(r / s2), offset);
        }
    }
}

/* y (levels*M, N) exact integer sums as float -> each part's (M, sizes[i]) float:
 * (y1 * s1 [+ y2 * s2]) * ws [+ bias] */
void sp_rescale(const float *y, const float *s, const float *ws, const float *bias, int64_t M, int64_t N,
                int levels, int64_t parts, const int64_t *sizes, float **outs) {
    for (int64_t m = 0; m < M; m++) {
        const float *y1 = y + m * N, *y2 = y + (M + m) * N;
        float s1 = s[m], s2 = levels == 2 ? s[M + m] : 0.0f;
        int64_t start = 0;
        for (int64_t i = 0; i < parts; i++) {
            int64_t n = sizes[i];
            float *o = outs[i] + m * n;
            const float *a = y1 + start, *b = y2 + start, *w = ws + start;
            if (levels == 2) {
                for (int64_t j = 0; j < n; j++) {
                    float u = a[j] * s1;
                    float v = b[j] * s2;
                    o[j] = (u + v) * w[j];
                }
            } else {
                for (int64_t j = 0; j < n; j++) o[j] = (a[j] * s1) * w[j];
            }
            if (bias) {
                const float *c = bias + start;
                for (int64_t j = 0; j < n; j++) o[j] = o[j] + c[j];
            }
            start += n;
        }
    }
}
