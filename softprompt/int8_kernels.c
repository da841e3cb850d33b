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

/* torch's clamp(min=lo) then / 127: NaN stays NaN */
static float scale_of(float a, float lo) { return (a < lo ? lo : a) / 127.0f; }

/* x (M, K) [* inv (K)] -> q (levels*M, K) int8 and s (levels*M): row m's first level in row m, its
 * rounding error's in row M + m. work: K floats. */
void sp_quantize(const float *x, const float *inv, int64_t M, int64_t K, int levels, int8_t *q, float *s,
                 float *work) {
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * K;
        if (inv) {
            for (int64_t k = 0; k < K; k++) work[k] = row[k] * inv[k];
            row = work;
        }
        float s1 = scale_of(absmax(row, K), 1e-12f);
        int8_t *q1 = q + m * K;
        s[m] = s1;
        if (levels == 1) {
            for (int64_t k = 0; k < K; k++) q1[k] = (int8_t)rintf(row[k] / s1);
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
        float s2 = scale_of(from_bits(a2), 1e-30f);
        int8_t *q2 = q + (M + m) * K;
        s[M + m] = s2;
        for (int64_t k = 0; k < K; k++) {
            float r1 = rintf(row[k] / s1);
            float p = r1 * s1;
            float r = row[k] - p;
            q1[k] = (int8_t)r1;
            q2[k] = (int8_t)rintf(r / s2);
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
