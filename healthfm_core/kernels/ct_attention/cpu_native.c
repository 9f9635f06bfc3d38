/* Continuous-time attention on CPU: the elementwise part of the forward and backward.
 *
 * The matmuls (q k^T, P v, dO v^T, ...) stay in torch (MKL); this file fuses everything
 * between them into one pass per score row, for a range of (batch, head) pairs:
 *
 *   forward   s_ij = scale * qk_ij + log K(dt_ij), masked, softmax       -> P (in place of qk)
 *   backward  dS_ij = P_ij (dP_ij - delta_i), delta_i = sum_j P_ij dP_ij  (scale * dS in place of dP)
 *             d log pi_hm += sum_ij dS_ij rho_ijm,  d lambda_hm -= sum_ij dS_ij dt_ij rho_ijm
 *
 * Keys come sorted by time with invalid ones last (the caller permutes k and v), and
 * row_end[b, i] counts the keys query i can see at most (causal: valid keys at or before t_i):
 * only j < row_end is computed, the rest of the row is 0 - half the work at causal.
 *
 * K(dt) = sum_m pi_m exp(-lambda_m dt) is written, as in the reference, around the anchor
 * a(dt) = max log pi - min lambda * dt: K = exp(a) * T, T = sum_m exp(dlw_m + dlam_m dt) with
 * every exponent <= 0, so T lies in (0, sum_m exp(dlw_m)] = (0, e^c]. The softmax is shifted by
 * max_j (qk_ij + a_ij) + c >= max_j s_ij, so P_ij = exp(qk_ij + a_ij - shift) * T_ij: no log,
 * no overflow, and the overshoot is at most c - log T_ij, a few nats.
 *
 * Plain C (no torch or Python headers: builds in about a second, loaded with ctypes); float uses
 * a branch-free polynomial exp that the compiler vectorises, double the libm exp.
 * Each call handles the (batch, head) pairs bh_lo .. bh_hi - 1, so that the caller can split
 * B*H over threads (no OpenMP runtime next to torch's). Built by cpu_native.py; the functions
 * trust their arguments (checked there).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* exp for float, Cephes-style: range reduction by ln 2 and a degree-6 polynomial (about 1 ulp
 * on [-87, 88]); arguments are clamped, so no inf/nan and no subnormal results. */
static inline float fast_expf(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float r2 = r * r;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r2 + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

#define DEFINE_KERNELS(T, SUFFIX, EXP, MIN_ARG)                                                    \
                                                                                                   \
    static void head_constants_##SUFFIX(const T *lw, const T *lam, int64_t m, T *dlw, T *dlam,     \
                                        T *lw_max, T *lam_min, T *c) {                             \
        T a = lw[0], l = lam[0];                                                                   \
        for (int64_t i = 1; i < m; i++) {                                                          \
            a = lw[i] > a ? lw[i] : a;                                                             \
            l = lam[i] < l ? lam[i] : l;                                                           \
        }                                                                                          \
        T total = 0;                                                                               \
        for (int64_t i = 0; i < m; i++) {                                                          \
            dlw[i] = lw[i] - a;                                                                    \
            dlam[i] = l - lam[i];                                                                  \
            total += exp(dlw[i]);                                                                  \
        }                                                                                          \
        *lw_max = a;                                                                               \
        *lam_min = l;                                                                              \
        *c = log(total);                                                                           \
    }                                                                                              \
                                                                                                   \
    /* Gaps and masks of row i: dt >= 0 (0 where masked), keep 1/0. */                             \
    static void row_gaps_##SUFFIX(T tq, const T *tk, const uint8_t *valid, int64_t nk, int causal, \
                                  T *dt, T *keep) {                                                \
        _Pragma("omp simd") for (int64_t j = 0; j < nk; j++) {                                     \
            T d = tq - tk[j];                                                                      \
            int ok = valid[j] != 0 && (!causal || d >= 0);                                         \
            d = d < 0 ? -d : d;                                                                    \
            dt[j] = ok ? d : (T)0;                                                                 \
            keep[j] = ok ? (T)1 : (T)0;                                                            \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    /* total[j] = sum_m exp(dlw_m + dlam_m dt_j); terms (when not NULL) [M, nk] the summands.   \
     * One pass over j with the M terms inside: inlined with a constant m (below), the m loop    \
     * unrolls and the j loop vectorises, M exponentials per load and store of a score. */       \
    static inline __attribute__((always_inline)) void mixture_##SUFFIX(                            \
        const T *dt, int64_t nk, const T *dlw, const T *dlam, const int64_t m, T *total, T *terms) { \
        if (terms) {                                                                               \
            _Pragma("omp simd") for (int64_t j = 0; j < nk; j++) {                                 \
                const T d = dt[j];                                                                 \
                T tot = 0;                                                                         \
                for (int64_t i = 0; i < m; i++) {                                                  \
                    const T e = EXP(dlw[i] + dlam[i] * d);                                         \
                    terms[i * nk + j] = e;                                                         \
                    tot += e;                                                                      \
                }                                                                                  \
                total[j] = tot;                                                                    \
            }                                                                                      \
        } else {                                                                                   \
            _Pragma("omp simd") for (int64_t j = 0; j < nk; j++) {                                 \
                const T d = dt[j];                                                                 \
                T tot = 0;                                                                         \
                for (int64_t i = 0; i < m; i++) tot += EXP(dlw[i] + dlam[i] * d);                  \
                total[j] = tot;                                                                    \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    static void row_mixture_##SUFFIX(const T *dt, int64_t nk, const T *dlw, const T *dlam,         \
                                     int64_t m, T *total, T *terms) {                              \
        switch (m) {                                                                               \
        case 1: mixture_##SUFFIX(dt, nk, dlw, dlam, 1, total, terms); break;                       \
        case 2: mixture_##SUFFIX(dt, nk, dlw, dlam, 2, total, terms); break;                       \
        case 3: mixture_##SUFFIX(dt, nk, dlw, dlam, 3, total, terms); break;                       \
        case 4: mixture_##SUFFIX(dt, nk, dlw, dlam, 4, total, terms); break;                       \
        case 5: mixture_##SUFFIX(dt, nk, dlw, dlam, 5, total, terms); break;                       \
        case 6: mixture_##SUFFIX(dt, nk, dlw, dlam, 6, total, terms); break;                       \
        case 8: mixture_##SUFFIX(dt, nk, dlw, dlam, 8, total, terms); break;                       \
        default: mixture_##SUFFIX(dt, nk, dlw, dlam, m, total, terms);                             \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    /* Forward, first pass over row i: gaps, mask, the mixture T (total) and the shifted-free      \
     * score z = scale qk + a(dt) in place; returns max z over visible keys (-inf: none).          \
     * Inlined with a constant m (below) so the m loop unrolls inside the vectorised j loop. */    \
    static inline __attribute__((always_inline)) T scores_pass_##SUFFIX(                           \
        T *row, T tq, const T *tk, const uint8_t *vk, int64_t n, int causal, const T *dlw,         \
        const T *dlam, const int64_t m, T scale, T lw_max, T lam_min, T *total, T *keep) {         \
        T top = -INFINITY;                                                                         \
        _Pragma("omp simd reduction(max : top)") for (int64_t j = 0; j < n; j++) {                 \
            T d = tq - tk[j];                                                                      \
            const int ok = vk[j] != 0 && (!causal || d >= 0);                                      \
            d = d < 0 ? -d : d;                                                                    \
            d = ok ? d : (T)0;                                                                     \
            T tot = 0;                                                                             \
            for (int64_t i = 0; i < m; i++) tot += EXP(dlw[i] + dlam[i] * d);                      \
            total[j] = tot;                                                                        \
            keep[j] = ok ? (T)1 : (T)0;                                                            \
            const T z = row[j] * scale + lw_max - lam_min * d;                                     \
            row[j] = z;                                                                            \
            const T zk = ok ? z : -INFINITY;                                                       \
            top = zk > top ? zk : top;                                                             \
        }                                                                                          \
        return top;                                                                                \
    }                                                                                              \
                                                                                                   \
    static T scores_row_##SUFFIX(T *row, T tq, const T *tk, const uint8_t *vk, int64_t n,          \
                                 int causal, const T *dlw, const T *dlam, int64_t m, T scale,      \
                                 T lw_max, T lam_min, T *total, T *keep) {                         \
        switch (m) {                                                                               \
        case 1: return scores_pass_##SUFFIX(row, tq, tk, vk, n, causal, dlw, dlam, 1, scale, lw_max, lam_min, total, keep); \
        case 2: return scores_pass_##SUFFIX(row, tq, tk, vk, n, causal, dlw, dlam, 2, scale, lw_max, lam_min, total, keep); \
        case 3: return scores_pass_##SUFFIX(row, tq, tk, vk, n, causal, dlw, dlam, 3, scale, lw_max, lam_min, total, keep); \
        case 4: return scores_pass_##SUFFIX(row, tq, tk, vk, n, causal, dlw, dlam, 4, scale, lw_max, lam_min, total, keep); \
        case 6: return scores_pass_##SUFFIX(row, tq, tk, vk, n, causal, dlw, dlam, 6, scale, lw_max, lam_min, total, keep); \
        case 8: return scores_pass_##SUFFIX(row, tq, tk, vk, n, causal, dlw, dlam, 8, scale, lw_max, lam_min, total, keep); \
        default: return scores_pass_##SUFFIX(row, tq, tk, vk, n, causal, dlw, dlam, m, scale, lw_max, lam_min, total, keep); \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    void ct_forward_##SUFFIX(T *scores, const T *t_q, const T *t_k, const uint8_t *valid,          \
                             const int64_t *row_end, const T *lw, const T *lam, T scale,           \
                             int64_t b, int64_t h, int64_t nq, int64_t nk, int64_t m, int causal,  \
                             int64_t bh_lo, int64_t bh_hi) {                     \
        (void)b; /* bounds are the caller's bh range */                                           \
        for (int64_t bh = bh_lo; bh < bh_hi; bh++) {                                               \
            const int64_t bi = bh / h, hi = bh % h;                                                \
            T *buf = (T *)malloc(sizeof(T) * (size_t)(3 * nk + 2 * m));                            \
            T *keep = buf + nk, *total = buf + 2 * nk;                                             \
            T *dlw = buf + 3 * nk, *dlam = dlw + m;                                                \
            T lw_max, lam_min, c;                                                                  \
            head_constants_##SUFFIX(lw + hi * m, lam + hi * m, m, dlw, dlam, &lw_max, &lam_min, &c); \
            const T *tk = t_k + bi * nk;                                                           \
            const uint8_t *vk = valid + bi * nk;                                                   \
            for (int64_t i = 0; i < nq; i++) {                                                     \
                T *row = scores + (bh * nq + i) * nk;                                              \
                const int64_t n = row_end[bi * nq + i];                                            \
                for (int64_t j = n; j < nk; j++) row[j] = 0;                                       \
                const T top = scores_row_##SUFFIX(row, t_q[bi * nq + i], tk, vk, n, causal, dlw, dlam, m, \
                                                  scale, lw_max, lam_min, total, keep);            \
                if (top == -INFINITY) { /* no visible key: zero weights, as in the reference */    \
                    memset(row, 0, sizeof(T) * (size_t)n);                                         \
                    continue;                                                                      \
                }                                                                                  \
                const T shift = top + c;                                                           \
                T sum = 0;                                                                         \
                _Pragma("omp simd reduction(+ : sum)") for (int64_t j = 0; j < n; j++) {           \
                    T arg = row[j] - shift;                                                        \
                    arg = arg < MIN_ARG ? MIN_ARG : arg;                                           \
                    T p = EXP(arg) * total[j] * keep[j];                                           \
                    row[j] = p;                                                                    \
                    sum += p;                                                                      \
                }                                                                                  \
                const T inv = sum > 0 ? (T)1 / sum : (T)0;                                         \
                _Pragma("omp simd") for (int64_t j = 0; j < n; j++) row[j] *= inv;                 \
            }                                                                                      \
            free(buf);                                                                             \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    /* dp [B,H,Nq,Nk] in: dO v^T, out: scale * dS. probs: P, deltas [B,H,Nq]: dO . O per row.    \
     * grad_lw / grad_rate [B,H,M] out (NULL: none). */ \
    void ct_backward_##SUFFIX(T *dp, const T *probs, const T *deltas, const T *t_q, const T *t_k,  \
                              const uint8_t *valid, const int64_t *row_end, const T *lw,           \
                              const T *lam, T scale, int64_t b, int64_t h, int64_t nq, int64_t nk, \
                              int64_t m, int causal, T *grad_lw, T *grad_rate, int64_t bh_lo,      \
                              int64_t bh_hi) {                             \
        (void)b; /* bounds are the caller's bh range */                                           \
        for (int64_t bh = bh_lo; bh < bh_hi; bh++) {                                               \
            const int64_t bi = bh / h, hi = bh % h;                                                \
            const int params = grad_lw != NULL;                                                    \
            T *buf = (T *)malloc(sizeof(T) * (size_t)((3 + m) * nk + 4 * m));                      \
            T *dt = buf, *keep = buf + nk, *total = buf + 2 * nk, *terms = buf + 3 * nk;           \
            T *dlw = terms + m * nk, *dlam = dlw + m, *acc_w = dlam + m, *acc_r = acc_w + m;       \
            T lw_max, lam_min, c;                                                                  \
            head_constants_##SUFFIX(lw + hi * m, lam + hi * m, m, dlw, dlam, &lw_max, &lam_min, &c); \
            for (int64_t i = 0; i < m; i++) acc_w[i] = acc_r[i] = 0;                               \
            const T *tk = t_k + bi * nk;                                                           \
            const uint8_t *vk = valid + bi * nk;                                                   \
            for (int64_t i = 0; i < nq; i++) {                                                     \
                T *row = dp + (bh * nq + i) * nk;                                                  \
                const T *p = probs + (bh * nq + i) * nk;                                           \
                const int64_t n = row_end[bi * nq + i];                                            \
                for (int64_t j = n; j < nk; j++) row[j] = 0;                                       \
                const T delta = deltas[bh * nq + i]; /* sum_j P_ij dP_ij = dO_i . O_i */           \
                /* scale * dS: ready for dq = (scale dS) k and dk = (scale dS)^T q. */              \
                _Pragma("omp simd") for (int64_t j = 0; j < n; j++)                               \
                    row[j] = scale * p[j] * (row[j] - delta);                                      \
                if (!params) continue;                                                             \
                row_gaps_##SUFFIX(t_q[bi * nq + i], tk, vk, n, causal, dt, keep);                  \
                row_mixture_##SUFFIX(dt, n, dlw, dlam, m, total, terms);                           \
                /* dS / T once per score; masked scores have dS = 0 (P = 0). */                    \
                _Pragma("omp simd") for (int64_t j = 0; j < n; j++)                               \
                    total[j] = total[j] > 0 ? row[j] / total[j] : (T)0;                            \
                for (int64_t k = 0; k < m; k++) {                                                  \
                    const T *e = terms + k * n;                                                    \
                    T sw = 0, sr = 0;                                                              \
                    _Pragma("omp simd reduction(+ : sw, sr)") for (int64_t j = 0; j < n; j++) {    \
                        T g = total[j] * e[j];                                                     \
                        sw += g;                                                                   \
                        sr += g * dt[j];                                                           \
                    }                                                                              \
                    acc_w[k] += sw;                                                                \
                    acc_r[k] -= sr;                                                                \
                }                                                                                  \
            }                                                                                      \
            if (params)                                                                            \
                for (int64_t k = 0; k < m; k++) {                                                  \
                    grad_lw[bh * m + k] = acc_w[k] / scale;                                        \
                    grad_rate[bh * m + k] = acc_r[k] / scale;                                      \
                }                                                                                  \
            free(buf);                                                                             \
        }                                                                                          \
    }

DEFINE_KERNELS(float, f32, fast_expf, -87.0f)
DEFINE_KERNELS(double, f64, exp, -745.0)
