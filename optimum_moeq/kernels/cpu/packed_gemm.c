/* Packed mixed-bit expert projections on CPU: y[r, :] = x[r, :] @ W_e^T for rows r routed to
 * expert e, read straight from the bit planes (optimum_moeq/quant/packing.py, format versions 1
 * and 2: float16 zeros, or b-bit integer zeros packed along N, expanded per group as they are used).
 *
 * Per group g of G inputs and output n:  sum_k W[n,k] x[k] = s[g,n] * (sum_k c[k,n] x[k] - z[g,n] * sum_k x[k]),
 * so codes are multiplied as small integers and the scale and zero are applied once per group.
 * A code c = sum_p plane_p << shift_p, so each plane is dotted with x * 2^shift_p. Within a word,
 * value j is masked in place (word & (mask << width*j)) and its activation is pre-scaled by
 * 2^-(width*j): both scalings are powers of two, exact in float32. Values of the word's top half
 * are read from (word >> 16), so that no masked value reaches the sign bit.
 *
 * Rows of one expert are processed ROWS at a time so that each decoded code vector serves them
 * all (decode: 1 row; prefill: blocks of 4, or 8 bf16 rows). Work is split over (expert segment,
 * output tile) tasks with OpenMP, in the thread pool torch itself uses (the same libgomp.so.1 soname).
 * Paths: one float32 row by table lookups (group_lut); one exact bf16 row (a bf16 model's decode)
 * by bf16 dot products for 2-bit planes and lookups for a 1-bit plane (group_lut with pairs); blocks
 * of exact bf16 rows by bf16 dot products (group_tile_bf16); other blocks by masks and FMAs.
 */
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <math.h>
#include <omp.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(MOEQ_PORTABLE)
#include <immintrin.h>
#define MOEQ_AVX2 1
#endif

#define TILE_N 16          /* outputs per inner tile: two 8-lane vectors */
#define MAX_ROWS 4         /* rows sharing one decode */
/* Decode reads a word's bits LUT_BITS at a time through tables of 2^LUT_BITS sums: 4 with AVX-512
 * (vpermps over 16 lanes), else 3 (vpermps over 8). */
#if defined(MOEQ_AVX2) && defined(__AVX512F__)
#define LUT_BITS 4
#else
#define LUT_BITS 3
#endif
#define LUT_SIZE (1 << LUT_BITS)
#define LUT_CHUNKS ((32 + LUT_BITS - 1) / LUT_BITS) /* lookups per 32-bit word: 8 or 11 */
/* Decode prefetches each word row PF_DIST outputs ahead into L2: a group's rows are a dozen streams
 * that restart every group, more than the hardware prefetchers follow (measured: +8%, then +3% more
 * when the prefetch runs on into the next group's rows). A prefetch never faults, so none is bounded. */
#define PF_DIST 1024
#define SILU_SLICE 512    /* SiLU elements a task */
#define MAX_PLANES 5       /* 8 bits: four 2-bit planes; 7 bits: three + a 1-bit plane */

/* Rows that hold exact bfloat16 values (a bf16 model's activations) go through AVX-512 BF16 dot
 * products where the CPU has them: blocks of BF16_ROWS rows share each decoded code pair. */
#if defined(MOEQ_AVX2) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define MOEQ_BF16 1
#define BF16_ROWS 8
#else
#define BF16_ROWS MAX_ROWS
#endif
#define ROWS_CAP (BF16_ROWS > MAX_ROWS ? BF16_ROWS : MAX_ROWS)

typedef struct {
    int32_t bits;
    const int32_t *q2;    /* [bits/2, K/16, N] or NULL */
    const int32_t *q1;    /* [K/32, N] or NULL */
    const uint16_t *scale; /* float16 [K/G, N] */
    const void *zero;      /* float16 [K/G, N] (format 1), or with zero_codes int32 [K/G, Z] */
    int32_t zero_codes;    /* zeros are b-bit integers packed along N, as packing.py describes */
} moeq_expert;

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) { bits = sign; }
        else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) { bits = sign | 0x7f800000 | (man << 13); }
    else { bits = sign | ((exp + 127 - 15) << 23) | (man << 13); }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Integer zeros: group g's row of words holds each 2-bit plane's ceil(N/16) words, then the 1-bit
 * plane's ceil(N/32); output n is value n % 16 (n % 32) of word n / 16 (n / 32) of a plane. */
static inline const int32_t *zero_row(const moeq_expert *ex, int g, int N, int *w2) {
    *w2 = (N + 15) / 16;
    return (const int32_t *)ex->zero + (size_t)g * ((ex->bits / 2) * *w2 + (ex->bits % 2) * ((N + 31) / 32));
}

static float zero_at(const moeq_expert *ex, int g, int N, int n) {
    if (!ex->zero_codes) return half_to_float(((const uint16_t *)ex->zero)[(size_t)g * N + n]);
    int w2, p, z = 0;
    const int32_t *row = zero_row(ex, g, N, &w2);
    for (p = 0; p < ex->bits / 2; p++) z |= (int)(((uint32_t)row[p * w2 + n / 16] >> (2 * (n % 16))) & 3u) << (2 * p);
    if (ex->bits % 2) z |= (int)(((uint32_t)row[p * w2 + n / 32] >> (n % 32)) & 1u) << (2 * p);
    return (float)z;
}

/* One plane of the group starting at input k0: acc[r][n] += sum_k plane[k, n] * xs[r][k]. */
typedef struct {
    const int32_t *words; /* plane base, [K/per_word, N] */
    int width;            /* 2 or 1 */
    float weight;         /* 2^shift of this plane in the code */
} plane_ref;

#ifdef MOEQ_AVX2
/* The zeros of outputs n0 .. n0 + 7 (n0 a multiple of 8) of group g, as floats. The integer
 * expansion stays out of line: inlined into the kernels' epilogues, it cost the 3-bit bf16 prefill
 * tile half its speed (measured: 22.5 against 12-14 ms, float zeros alike), by the code around it. */
static __attribute__((noinline)) __m256 zeros8_codes(const moeq_expert *ex, int g, int N, int n0) {
    int w2, p;
    const int32_t *row = zero_row(ex, g, N, &w2);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i z = _mm256_setzero_si256();
    for (p = 0; p < ex->bits / 2; p++) {
        const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(row[p * w2 + n0 / 16]),
                                            _mm256_slli_epi32(_mm256_add_epi32(lane, _mm256_set1_epi32(n0 % 16)), 1));
        z = _mm256_or_si256(z, _mm256_sllv_epi32(_mm256_and_si256(v, _mm256_set1_epi32(3)), _mm256_set1_epi32(2 * p)));
    }
    if (ex->bits % 2) {
        const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(row[p * w2 + n0 / 32]), _mm256_add_epi32(lane, _mm256_set1_epi32(n0 % 32)));
        z = _mm256_or_si256(z, _mm256_sllv_epi32(_mm256_and_si256(v, _mm256_set1_epi32(1)), _mm256_set1_epi32(2 * p)));
    }
    return _mm256_cvtepi32_ps(z);
}

static inline __m256 zeros8(const moeq_expert *ex, int g, int N, int n0) {
    if (ex->zero_codes) return zeros8_codes(ex, g, N, n0);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)ex->zero + (size_t)g * N + n0)));
}

#ifdef __AVX512F__
/* The same for outputs n0 .. n0 + 15 (n0 a multiple of 16). */
static __attribute__((noinline)) __m512 zeros16_codes(const moeq_expert *ex, int g, int N, int n0) {
    int w2, p;
    const int32_t *row = zero_row(ex, g, N, &w2);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i z = _mm512_setzero_si512();
    for (p = 0; p < ex->bits / 2; p++) {
        const __m512i v = _mm512_srlv_epi32(_mm512_set1_epi32(row[p * w2 + n0 / 16]), _mm512_slli_epi32(lane, 1));
        z = _mm512_or_si512(z, _mm512_sllv_epi32(_mm512_and_si512(v, _mm512_set1_epi32(3)), _mm512_set1_epi32(2 * p)));
    }
    if (ex->bits % 2) {
        const __m512i v = _mm512_srlv_epi32(_mm512_set1_epi32(row[p * w2 + n0 / 32]), _mm512_add_epi32(lane, _mm512_set1_epi32(n0 % 32)));
        z = _mm512_or_si512(z, _mm512_sllv_epi32(_mm512_and_si512(v, _mm512_set1_epi32(1)), _mm512_set1_epi32(2 * p)));
    }
    return _mm512_cvtepi32_ps(z);
}

static inline __m512 zeros16(const moeq_expert *ex, int g, int N, int n0) {
    if (ex->zero_codes) return zeros16_codes(ex, g, N, n0);
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)ex->zero + (size_t)g * N + n0)));
}
#endif

/* One word row of a plane over outputs [na, nb): acc[r][n - na] += sum_j value_j(word[n]) * xw[r][j].
 * The row's words are read contiguously (the layout keeps N contiguous); accumulators for 16
 * outputs stay in registers while a word's values are decoded, then go back to acc (L1). */
static inline __attribute__((always_inline)) void word_row_avx2(
    const int rows, const int width, const int32_t *words, int na, int nb, const float *xw, int K, float *acc, int lda)
{
    const int per_word = 32 / width, half = per_word / 2;
    const __m256i mask = _mm256_set1_epi32(width == 2 ? 3 : 1);
    /* independent accumulator chains, so the FMA latency is hidden at any row count */
    const int chains = rows == 1 ? 4 : rows == 2 ? 2 : 1;
    for (int n0 = na; n0 < nb; n0 += 16) {
        __m256 a[MAX_ROWS][2][4];
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < chains; c++) a[r][0][c] = a[r][1][c] = _mm256_setzero_ps();
        const __m256i lo0 = _mm256_loadu_si256((const __m256i *)(words + n0));
        const __m256i lo1 = _mm256_loadu_si256((const __m256i *)(words + n0 + 8));
        const __m256i hi0 = _mm256_srli_epi32(lo0, 16), hi1 = _mm256_srli_epi32(lo1, 16);
#pragma GCC unroll 32
        for (int j = 0; j < per_word; j++) {
            const int c = j % chains;
            const __m256i m = _mm256_slli_epi32(mask, width * (j % half));
            const __m256 f0 = _mm256_cvtepi32_ps(_mm256_and_si256(j < half ? lo0 : hi0, m));
            const __m256 f1 = _mm256_cvtepi32_ps(_mm256_and_si256(j < half ? lo1 : hi1, m));
            for (int r = 0; r < rows; r++) {
                const __m256 xv = _mm256_broadcast_ss(xw + (size_t)r * K + j);
                a[r][0][c] = _mm256_fmadd_ps(f0, xv, a[r][0][c]);
                a[r][1][c] = _mm256_fmadd_ps(f1, xv, a[r][1][c]);
            }
        }
        for (int r = 0; r < rows; r++)
            for (int v = 0; v < 2; v++) {
                __m256 sum = _mm256_loadu_ps(acc + (size_t)r * lda + (n0 - na) + 8 * v);
                for (int c = 0; c < chains; c++) sum = _mm256_add_ps(sum, a[r][v][c]);
                _mm256_storeu_ps(acc + (size_t)r * lda + (n0 - na) + 8 * v, sum);
            }
    }
}

/* Decode (one float32 row) by table lookup: a word's 32 bits are read LUT_BITS at a time (chunk c: bits
 * c*LUT_BITS and up), each chunk indexing a table of the partial sums of what its bits weigh
 * (vpermps reads the low bits of each lane). A bit of a 1-bit plane weighs its activation; bit
 * 2j + i of a 2-bit plane, 2^i times activation j. So 8 (AVX-512) or 11 lookups, shifts and adds
 * replace the 16 masks, conversions and FMAs of a 2-bit word. group_lut takes one group for outputs
 * [n0, n0 + 16 T): every plane's words of the group into registers, then the scale and zero
 * straight into y, with no accumulator in memory.
 * Given `xpairs` (an exact bf16 row, CPUs with AVX-512 BF16), 2-bit planes take bf16 dot products
 * instead, codes as in group_tile_bf16 and `corr` taken out with the zero; a 1-bit plane keeps its
 * lookups (by pairs it would cost twice the 2-bit plane's products). Measured on one core, in
 * registers: a 2-bit word vector in 3.7 ns against the lookups' 5.1 ns (benchmarks/cpu_decode_ops.c).
 * Four accumulators a tile: with one, each product would wait on the one before. */
#ifdef MOEQ_BF16
/* acc + the bf16 pairs c times the pair at x in every lane, with the pair broadcast from memory
 * by the instruction itself ({1to16}): left to itself the compiler made every row's broadcasts
 * full vectors first, spilled them and the accumulators to the stack and reloaded them. */
static inline __attribute__((always_inline)) __m512 dp_broadcast(__m512 acc, __m512bh c, const uint32_t *x) {
    __asm__("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(c), "m"(*x));
    return acc;
}

#endif

#if LUT_BITS == 4
static inline __attribute__((always_inline)) void group_lut(
    const int T, const plane_ref *planes, int nplanes, int g, int G, int K, int N, int n0, const float *lut,
    const uint32_t *xpairs, float xsum, float corr, const moeq_expert *ex, float *y, int pf_col, int pf_next)
{
    __m512 a[2][4];
    for (int t = 0; t < T; t++) for (int c = 0; c < 4; c++) a[t][c] = _mm512_setzero_ps();
    for (int p = 0; p < nplanes; p++) {
        const int two = planes[p].width == 2, shift = two ? 4 : 5, first = (g * G) >> shift, nwords = G >> shift;
        const float *tables = lut + ((size_t)p * (K / 16) + first) * LUT_CHUNKS * LUT_SIZE;
        for (int w = 0; w < nwords; w++, tables += LUT_CHUNKS * LUT_SIZE) {
            const int32_t *words = planes[p].words + (size_t)(first + w) * N + n0;
            const int32_t *ahead = planes[p].words + (size_t)(first + w + pf_next * nwords) * N + pf_col;
            _mm_prefetch((const char *)ahead, _MM_HINT_T1);
            if (T == 2) _mm_prefetch((const char *)(ahead + 16), _MM_HINT_T1);
            for (int t = 0; t < T; t++) {
                const __m512i v = _mm512_loadu_si512((const void *)(words + 16 * t));
#ifdef MOEQ_BF16
                if (xpairs && two) { /* a bf16 row's 2-bit plane: codes i, i + 8 (bits 2i, 2i + 16) to bits 5-6, 21-22 */
                    const uint32_t *xp = xpairs + (size_t)p * (K / 2) + (size_t)(first + w) * 8;
#pragma GCC unroll 8
                    for (int i = 0; i < 8; i++) {
                        const __m512i sh = i < 3 ? _mm512_slli_epi32(v, 5 - 2 * i) : _mm512_srli_epi32(v, 2 * i - 5);
                        const __m512bh c = (__m512bh)_mm512_ternarylogic_epi32(sh, _mm512_set1_epi32(0x00600060),
                                                                               _mm512_set1_epi32(0x3F803F80), 0xEA);
                        a[t][i % 4] = dp_broadcast(a[t][i % 4], c, xp + i);
                    }
                    continue;
                }
#endif
#pragma GCC unroll 8
                for (int c = 0; c < LUT_CHUNKS; c++)
                    a[t][c % 4] = _mm512_add_ps(a[t][c % 4], _mm512_permutexvar_ps(_mm512_srli_epi32(v, LUT_BITS * c),
                                                                                  _mm512_loadu_ps(tables + LUT_SIZE * c)));
            }
        }
    }
    for (int t = 0; t < T; t++) {
        const size_t meta = (size_t)g * N + n0 + 16 * t;
        const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(ex->scale + meta)));
        const __m512 z = _mm512_add_ps(zeros16(ex, g, N, n0 + 16 * t), _mm512_set1_ps(corr));
        const __m512 sum = _mm512_add_ps(_mm512_add_ps(a[t][0], a[t][1]), _mm512_add_ps(a[t][2], a[t][3]));
        float *out = y + n0 + 16 * t;
        _mm512_storeu_ps(out, _mm512_fmadd_ps(s, _mm512_fnmadd_ps(z, _mm512_set1_ps(xsum), sum), _mm512_loadu_ps(out)));
    }
}
#else
/* The same over 16 outputs as two 8-lane halves, 3 bits a lookup. */
static inline __attribute__((always_inline)) void group_lut(
    const int T, const plane_ref *planes, int nplanes, int g, int G, int K, int N, int n0, const float *lut,
    const uint32_t *xpairs, float xsum, float corr, const moeq_expert *ex, float *y, int pf_col, int pf_next)
{
    (void)T, (void)pf_col, (void)pf_next, (void)xpairs, (void)corr; /* no bf16 pairs without AVX-512 */
    __m256 a[2][4];
    for (int h = 0; h < 2; h++) for (int c = 0; c < 4; c++) a[h][c] = _mm256_setzero_ps();
    for (int p = 0; p < nplanes; p++) {
        const int per_word = 32 / planes[p].width, first = g * G / per_word;
        const float *tables = lut + ((size_t)p * (K / 16) + first) * LUT_CHUNKS * LUT_SIZE;
        for (int w = 0; w < G / per_word; w++, tables += LUT_CHUNKS * LUT_SIZE) {
            const int32_t *words = planes[p].words + (size_t)(first + w) * N + n0;
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)words), v1 = _mm256_loadu_si256((const __m256i *)(words + 8));
#pragma GCC unroll 11
            for (int c = 0; c < LUT_CHUNKS; c++) {
                const __m256 table = _mm256_loadu_ps(tables + LUT_SIZE * c);
                a[0][c % 4] = _mm256_add_ps(a[0][c % 4], _mm256_permutevar8x32_ps(table, _mm256_srli_epi32(v0, LUT_BITS * c)));
                a[1][c % 4] = _mm256_add_ps(a[1][c % 4], _mm256_permutevar8x32_ps(table, _mm256_srli_epi32(v1, LUT_BITS * c)));
            }
        }
    }
    for (int h = 0; h < 2; h++) {
        const size_t meta = (size_t)g * N + n0 + 8 * h;
        const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(ex->scale + meta)));
        const __m256 z = zeros8(ex, g, N, n0 + 8 * h);
        const __m256 sum = _mm256_add_ps(_mm256_add_ps(a[h][0], a[h][1]), _mm256_add_ps(a[h][2], a[h][3]));
        float *out = y + n0 + 8 * h;
        _mm256_storeu_ps(out, _mm256_fmadd_ps(s, _mm256_fnmadd_ps(z, _mm256_set1_ps(xsum), sum), _mm256_loadu_ps(out)));
    }
}
#endif

/* The output whose words decode at n prefetches: PF_DIST ahead, wrapping to the range's start. */
static inline int prefetch_col(int n, int na, int nb) { return n + PF_DIST < nb ? n + PF_DIST : na + (n + PF_DIST - nb); }

/* One row over outputs [na, nb): by lookups, or (xpairs) a bf16 row's 2-bit planes by dot products. */
static void task_decode(const plane_ref *planes, int nplanes, int G, int K, int N, int na, int nb, const float *lut,
                        const uint32_t *xpairs, const float *xsum, float corr, const moeq_expert *ex, float *y) {
    const int ngroups = K / G;
    for (int g = 0; g < ngroups; g++) {
        int n0 = na;
        /* prefetch PF_DIST outputs ahead; past the range's end, into the next group's rows */
        const int next = g + 1 < ngroups;
        for (; LUT_BITS == 4 && n0 + 32 <= nb; n0 += 32)
            group_lut(2, planes, nplanes, g, G, K, N, n0, lut, xpairs, xsum[g], corr, ex, y, prefetch_col(n0, na, nb),
                      next && n0 + PF_DIST >= nb);
        for (; n0 < nb; n0 += 16)
            group_lut(1, planes, nplanes, g, G, K, N, n0, lut, xpairs, xsum[g], corr, ex, y, prefetch_col(n0, na, nb),
                      next && n0 + PF_DIST >= nb);
    }
}

static inline __attribute__((always_inline)) void task_avx2(
    const int rows, const plane_ref *planes, int nplanes, int G, int K, int N, int na, int nb, int ngroups,
    const float *xsum, const moeq_expert *ex, const float *xs_scaled, const float *lut, float *y, int ldy, float *acc)
{
    /* xs_scaled: [nplanes][rows][K] activations already multiplied by plane weight and 2^-(width*j);
     * lut: with one row, each plane's tables, [nplanes][K/16][LUT_CHUNKS][LUT_SIZE] */
    const int lda = nb - na;
    if (rows == 1) {
        task_decode(planes, nplanes, G, K, N, na, nb, lut, NULL, xsum, 0.0f, ex, y);
        return;
    }
    for (int g = 0; g < ngroups; g++) {
        memset(acc, 0, sizeof(float) * (size_t)rows * lda);
        for (int p = 0; p < nplanes; p++) {
            const int width = planes[p].width, per_word = 32 / width;
            for (int w = 0; w < G / per_word; w++) {
                const int32_t *words = planes[p].words + (size_t)(g * G / per_word + w) * N;
                const float *xw = xs_scaled + (size_t)p * rows * K + g * G + w * per_word;
                word_row_avx2(rows, width, words, na, nb, xw, K, acc, lda);
            }
        }
        for (int n0 = na; n0 < nb; n0 += 8) {
            const size_t meta = (size_t)g * N + n0;
            const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(ex->scale + meta)));
            const __m256 z = zeros8(ex, g, N, n0);
            for (int r = 0; r < rows; r++) {
                const __m256 sum = _mm256_set1_ps(xsum[(size_t)r * ngroups + g]);
                float *out = y + (size_t)r * ldy + n0;
                const __m256 t = _mm256_fnmadd_ps(z, sum, _mm256_loadu_ps(acc + (size_t)r * lda + (n0 - na)));
                _mm256_storeu_ps(out, _mm256_fmadd_ps(s, t, _mm256_loadu_ps(out)));
            }
        }
    }
}
#endif

#ifdef MOEQ_BF16
/* Rows of exact bf16 activations, by bf16 dot products (vdpbf16ps: two products per float32 lane,
 * exact, summed in float32). A code c of a b-bit plane goes in as the bf16 1 + c/m (m = 4 for a
 * 2-bit plane, 2 for a 1-bit plane): one shift puts a word's codes j and j + per_word/2 into the
 * top of the two mantissas of a lane, one AND-OR (vpternlogd) adds the exponent of 1.0. Its
 * activations come paired the same way, times m and the plane's weight (powers of two: exact), so
 * sum (1 + c/m) m w x = m w sum x + w sum c x, and `corr` = sum over planes of m w takes the first
 * term back out with the zero. */
/* A 3-bit code (a 2-bit plane and a 1-bit plane) goes in whole, as the bf16 1 + c/8: one dot product
 * per code pair instead of one per plane. Its pairs are the 2-bit plane's (inputs i, i + 8 of 16). */
static inline int merged_three_bits(const plane_ref *planes, int nplanes) {
    return nplanes == 2 && planes[0].width == 2 && planes[1].width == 1;
}

static inline __attribute__((always_inline)) void group_tile_bf16(
    const int rows, const int T, const plane_ref *planes, int nplanes, int g, int G, int K, int N, int n0,
    const uint32_t *xpairs, const float *xsum, float corr, int ngroups, const moeq_expert *ex, float *y, int ldy)
{
    __m512 acc[BF16_ROWS][2];
    for (int r = 0; r < rows; r++) for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
    const int merged = merged_three_bits(planes, nplanes);
    for (int w = 0; merged && w < G / 16; w++) {
        const int word = g * G / 16 + w, half = 16 * (word & 1); /* the 1-bit word's bits of these 16 inputs */
        const int32_t *row2 = planes[0].words + (size_t)word * N + n0;
        const int32_t *row1 = planes[1].words + (size_t)(word / 2) * N + n0;
        const uint32_t *xp = xpairs + (size_t)word * 8 * rows;
        __m512i words2[2], words1[2];
        for (int t = 0; t < T; t++) {
            words2[t] = _mm512_loadu_si512((const void *)(row2 + 16 * t));
            words1[t] = _mm512_loadu_si512((const void *)(row1 + 16 * t));
        }
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) /* low bits of codes i, i + 8 (bits 2i, 2i + 16) to bits 4-5, 20-21; their
                                     * high bits (half + i, half + i + 8) to bits 6, 22 */
            for (int t = 0; t < T; t++) {
                const __m512i low = i < 2 ? _mm512_slli_epi32(words2[t], 4 - 2 * i) : _mm512_srli_epi32(words2[t], 2 * i - 4);
                const int b = half + i;
                const __m512i high = b < 6 ? _mm512_slli_epi32(words1[t], 6 - b) : _mm512_srli_epi32(words1[t], b - 6);
                /* bit 4-5 / 20-21 from low, bit 6 from high, bit 22 from high << 8 (bit 14 there) */
                const __m512i lh = _mm512_ternarylogic_epi32(_mm512_set1_epi32(0x00300030), low, high, 0xCA);
                const __m512i both = _mm512_ternarylogic_epi32(_mm512_set1_epi32(0x00400000), _mm512_slli_epi32(high, 8),
                                                               lh, 0xCA); /* 0xCA: A ? B : C */
                const __m512bh c = (__m512bh)_mm512_ternarylogic_epi32(both, _mm512_set1_epi32(0x00700070),
                                                                       _mm512_set1_epi32(0x3F803F80), 0xEA);
                for (int r = 0; r < rows; r++)
                    acc[r][t] = dp_broadcast(acc[r][t], c, xp + i * rows + r);
            }
    }
    for (int p = 0; p < nplanes && !merged; p++) {
        const int width = planes[p].width, per_word = 32 / width, pairs = per_word / 2;
        for (int w = 0; w < G / per_word; w++) {
            const int32_t *row = planes[p].words + (size_t)(g * G / per_word + w) * N + n0;
            const uint32_t *xp = xpairs + ((size_t)p * (K / 2) + (size_t)(g * G / per_word + w) * pairs) * rows;
            __m512i words[2];
            for (int t = 0; t < T; t++) words[t] = _mm512_loadu_si512((const void *)(row + 16 * t));
            if (width == 2) {
#pragma GCC unroll 8
                for (int i = 0; i < 8; i++) /* codes i, i + 8 (bits 2i, 2i + 16) to bits 5-6, 21-22 */
                    for (int t = 0; t < T; t++) {
                        const __m512i s = i < 3 ? _mm512_slli_epi32(words[t], 5 - 2 * i) : _mm512_srli_epi32(words[t], 2 * i - 5);
                        const __m512bh c = (__m512bh)_mm512_ternarylogic_epi32(s, _mm512_set1_epi32(0x00600060),
                                                                               _mm512_set1_epi32(0x3F803F80), 0xEA);
                        for (int r = 0; r < rows; r++)
                            acc[r][t] = dp_broadcast(acc[r][t], c, xp + i * rows + r);
                    }
            } else {
#pragma GCC unroll 16
                for (int i = 0; i < 16; i++) /* bits i, i + 16 to bits 6, 22 */
                    for (int t = 0; t < T; t++) {
                        const __m512i s = i < 6 ? _mm512_slli_epi32(words[t], 6 - i) : _mm512_srli_epi32(words[t], i - 6);
                        const __m512bh c = (__m512bh)_mm512_ternarylogic_epi32(s, _mm512_set1_epi32(0x00400040),
                                                                               _mm512_set1_epi32(0x3F803F80), 0xEA);
                        for (int r = 0; r < rows; r++)
                            acc[r][t] = dp_broadcast(acc[r][t], c, xp + i * rows + r);
                    }
            }
        }
    }
    for (int t = 0; t < T; t++) {
        const size_t meta = (size_t)g * N + n0 + 16 * t;
        const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(ex->scale + meta)));
        const __m512 z = _mm512_add_ps(zeros16(ex, g, N, n0 + 16 * t), _mm512_set1_ps(corr));
        for (int r = 0; r < rows; r++) {
            float *out = y + (size_t)r * ldy + n0 + 16 * t;
            const __m512 v = _mm512_fnmadd_ps(z, _mm512_set1_ps(xsum[(size_t)r * ngroups + g]), acc[r][t]);
            _mm512_storeu_ps(out, _mm512_fmadd_ps(s, v, _mm512_loadu_ps(out)));
        }
    }
}

static inline __attribute__((always_inline)) void task_bf16(
    const int rows, const plane_ref *planes, int nplanes, int G, int K, int N, int na, int nb,
    const uint32_t *xpairs, const float *xsum, float corr, const moeq_expert *ex, float *y, int ldy)
{
    for (int g = 0; g < K / G; g++) {
        int n0 = na;
        for (; n0 + 32 <= nb; n0 += 32)
            group_tile_bf16(rows, 2, planes, nplanes, g, G, K, N, n0, xpairs, xsum, corr, K / G, ex, y, ldy);
        if (n0 < nb)
            group_tile_bf16(rows, 1, planes, nplanes, g, G, K, N, n0, xpairs, xsum, corr, K / G, ex, y, ldy);
    }
}

/* Pairs of 16 lanes a (values j) and b (values j + half of a word): (a >> 16) | (b & 0xFFFF0000). */
static inline __m512i bf16_pair(__m512 a, __m512 b) {
    return _mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(a), 16),
                           _mm512_and_si512(_mm512_castps_si512(b), _mm512_set1_epi32((int)0xFFFF0000u)));
}

/* The rows' exact bf16 activations as pairs for task_bf16: [nplanes][K/2][rows] (a pair's rows side
 * by side, so that the kernel reaches every row from one address at constant offsets), pair i of
 * word w of plane p holding inputs k0 + i and k0 + i + per_word/2 (k0 = w per_word), times m and the
 * plane's weight (powers of two: still exact); returns corr. Each row's pairs are made 16 at a time
 * into `scratch` ([rows][nplanes][K/2]), then transposed into place. */
static float prepare_pairs(const float *x, int rows, int K, const plane_ref *planes, int nplanes, uint32_t *xpairs,
                           uint32_t *scratch) {
    float corr = 0.0f, scale[MAX_PLANES];
    if (merged_three_bits(planes, nplanes)) /* one set of 2-bit-plane pairs, for codes 1 + c/8 */
        nplanes = 1, corr = scale[0] = 8.0f;
    else
        for (int p = 0; p < nplanes; p++) corr += scale[p] = (float)(planes[p].width == 2 ? 4 : 2) * planes[p].weight;
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int r = 0; r < rows; r++)
        for (int p = 0; p < nplanes; p++) {
            const __m512 m = _mm512_set1_ps(scale[p]);
            uint32_t *out = scratch + ((size_t)r * nplanes + p) * (K / 2);
            for (int k0 = 0; k0 < K; k0 += 32) { /* 32 inputs: two 2-bit-plane words, or one 1-bit-plane word */
                const __m512 a = _mm512_mul_ps(_mm512_loadu_ps(x + (size_t)r * K + k0), m);
                const __m512 b = _mm512_mul_ps(_mm512_loadu_ps(x + (size_t)r * K + k0 + 16), m);
                const __m512i pairs = planes[p].width == 1
                    ? bf16_pair(a, b) /* pair i: inputs i, i + 16 */
                    : bf16_pair(_mm512_permutex2var_ps(a, first, b), _mm512_permutex2var_ps(a, second, b));
                _mm512_storeu_si512((void *)(out + k0 / 2), pairs); /* 2-bit planes: pair i: inputs i, i + 8 */
            }
        }
    for (int p = 0; p < nplanes; p++)
        for (int i = 0; i < K / 2; i++) {
            uint32_t *out = xpairs + ((size_t)p * (K / 2) + i) * rows;
            for (int r = 0; r < rows; r++) out[r] = scratch[((size_t)r * nplanes + p) * (K / 2) + i];
        }
    return corr;
}
#endif

/* Portable path: the same arithmetic, one output at a time. */
static void tile_portable(
    int rows, const plane_ref *planes, int nplanes, int G, int K, int N, int n0, int ngroups_total,
    const float *xsum, const moeq_expert *ex, const float *xs_scaled, float *y, int ldy)
{
    for (int g = 0; g < ngroups_total; g++) {
        for (int n = n0; n < n0 + TILE_N; n++) {
            float acc[MAX_ROWS] = {0};
            for (int p = 0; p < nplanes; p++) {
                const int width = planes[p].width, per_word = 32 / width, half = per_word / 2;
                const uint32_t mask = width == 2 ? 3u : 1u;
                const float *xp = xs_scaled + (size_t)p * rows * K + g * G;
                for (int w = 0; w < G / per_word; w++) {
                    uint32_t word = (uint32_t)planes[p].words[(size_t)(g * G / per_word + w) * N + n];
                    for (int j = 0; j < per_word; j++) {
                        uint32_t part = j < half ? word : word >> 16;
                        float c = (float)(int32_t)(part & (mask << (width * (j % half))));
                        for (int r = 0; r < rows; r++) acc[r] += c * xp[(size_t)r * K + w * per_word + j];
                    }
                }
            }
            const float s = half_to_float(ex->scale[(size_t)g * N + n]), z = zero_at(ex, g, N, n);
            for (int r = 0; r < rows; r++)
                y[(size_t)r * ldy + n] += s * (acc[r] - z * xsum[(size_t)r * ngroups_total + g]);
        }
    }
}

/* How many of an expert's planes are 2-bit: expert_planes puts them first, a 1-bit plane last. */
static inline int two_bit_planes(const plane_ref *planes, int nplanes) {
    return nplanes - (nplanes > 0 && planes[nplanes - 1].width == 1);
}

static int expert_planes(const moeq_expert *ex, int K, int N, plane_ref *planes) {
    int n2 = ex->bits / 2, count = 0;
    for (int i = 0; i < n2; i++)
        planes[count++] = (plane_ref){ex->q2 + (size_t)i * (K / 16) * N, 2, (float)(1u << (2 * i))};
    if (ex->bits % 2) planes[count++] = (plane_ref){ex->q1, 1, (float)(1u << (2 * n2))};
    return count;
}

/* Activations of `rows` rows, per plane, times the plane's weight and 2^-(width*j) for value j
 * of a word; and each row's sum over each group. */
/* Each plane's lookup tables for one row of activations: [nplanes][K/16][LUT_CHUNKS][LUT_SIZE], from
 * plane `first` on (the planes before it are read another way). */
static void build_tables(const float *x, int K, const plane_ref *planes, int first, int nplanes, float *lut) {
#if LUT_BITS == 4
    __m512 has_bit[LUT_BITS]; /* lane idx: 1.0 where idx has bit b */
    for (int b = 0; b < LUT_BITS; b++) {
        float m[LUT_SIZE];
        for (int idx = 0; idx < LUT_SIZE; idx++) m[idx] = (float)((idx >> b) & 1);
        has_bit[b] = _mm512_loadu_ps(m);
    }
#endif
    for (int p = first; p < nplanes; p++) {
        const int width = planes[p].width, per_word = 32 / width;
        float weigh[LUT_CHUNKS * LUT_BITS] = {0}; /* what each bit of a word weighs; bits past 31: nothing */
        for (int k0 = 0, word = 0; k0 < K; k0 += per_word, word++) {
            for (int bit = 0; bit < 32; bit++)
                weigh[bit] = x[k0 + bit / width] * planes[p].weight * (float)(1 + (width == 2 && bit % 2));
            float *table = lut + ((size_t)p * (K / 16) + word) * LUT_CHUNKS * LUT_SIZE;
            for (int c = 0; c < LUT_CHUNKS; c++, table += LUT_SIZE) { /* entry idx: the sum of what idx's bits weigh */
                const float *w = weigh + LUT_BITS * c;
#if LUT_BITS == 4
                __m512 t = _mm512_mul_ps(has_bit[0], _mm512_set1_ps(w[0]));
                for (int b = 1; b < LUT_BITS; b++) t = _mm512_fmadd_ps(has_bit[b], _mm512_set1_ps(w[b]), t);
                _mm512_storeu_ps(table, t);
#else
                table[0] = 0.0f;
                for (int b = 0; b < LUT_BITS; b++)
                    for (int idx = 0; idx < 1 << b; idx++) table[(1 << b) + idx] = table[idx] + w[b];
#endif
            }
        }
    }
}

/* For `rows` rows: what the path `kind` reads (LOOKUPS: one row's tables; SCALED: the activations
 * per plane, times the plane's weight and 2^-(width*j) for value j of a word; DECODE_PAIRS: one
 * row's tables of its 1-bit plane only; PAIRS: nothing here), and each row's sum over each group.
 * The pairs of PAIRS and DECODE_PAIRS are made by prepare_pairs. */
enum { SCALED, LOOKUPS, PAIRS, DECODE_PAIRS };
static void prepare_rows(const float *x, int rows, int K, int G, const plane_ref *planes, int nplanes,
                         int kind, float *xs_scaled, float *xsum, float *lut) {
    if (kind == LOOKUPS) build_tables(x, K, planes, 0, nplanes, lut);
    if (kind == DECODE_PAIRS) build_tables(x, K, planes, two_bit_planes(planes, nplanes), nplanes, lut);
    for (int p = 0; p < nplanes && kind == SCALED; p++) {
        const int width = planes[p].width, per_word = 32 / width, half = per_word / 2;
        for (int r = 0; r < rows; r++)
            for (int k = 0; k < K; k++) {
                const int j = (k % per_word) % half;
                xs_scaled[((size_t)p * rows + r) * K + k] =
                    x[(size_t)r * K + k] * planes[p].weight * (1.0f / (float)(1u << (width * j)));
            }
    }
    for (int r = 0; r < rows; r++)
        for (int g = 0; g < K / G; g++) {
            float s = 0.0f;
            for (int k = g * G; k < (g + 1) * G; k++) s += x[(size_t)r * K + k];
            xsum[(size_t)r * (K / G) + g] = s;
        }
}

/* Where a thread's share ends: the block holding cost position `at` (block_cost cumulative over
 * blocks of N outputs each) and the output there, on a 32-output boundary (the decode tile). */
static void cut_point(const int64_t *block_cost, int nblocks, int N, int64_t at, int *block, int *n) {
    int b = 0;
    while (b < nblocks - 1 && block_cost[b + 1] <= at) b++;
    const int64_t per_output = (block_cost[b + 1] - block_cost[b]) / N;
    int cut = per_output ? (int)((at - block_cost[b]) / per_output) : 0;
    cut = (cut + 16) / 32 * 32;
    *block = b;
    *n = cut < N ? cut : N;
}

/* y [R, N] = x [R, K] @ W^T for segments of rows: rows seg_start[s]..seg_start[s+1]-1 use
 * experts[seg_expert[s]]. y is overwritten. bf16_rows: 0, x is float32; 1, x holds exact bf16
 * values: blocks of two or more rows take bf16 dot products where the CPU has them. Returns 0, or
 * -1 if scratch memory ran out. */
int moeq_packed_gemm(const float *x, float *y, int K, int N, int G,
                     int nseg, const int32_t *seg_start, const int32_t *seg_expert,
                     const moeq_expert *experts, int nthreads, int portable, int bf16_rows)
{
#ifdef MOEQ_BF16
    const int bf16 = bf16_rows && !portable;
#else
    const int bf16 = 0;
    (void)bf16_rows;
#endif
    const int block_rows = bf16 ? BF16_ROWS : MAX_ROWS;
    const int total_rows = seg_start[nseg];
    if (total_rows == 0) return 0;
    memset(y, 0, (size_t)total_rows * N * sizeof(float));
    int32_t *task_seg_block = malloc(sizeof(int32_t) * 2 * (size_t)(total_rows + nseg) + 2);
    if (!task_seg_block) return -1;
    int nrowblocks = 0;
    for (int s = 0; s < nseg; s++)
        for (int r = seg_start[s]; r < seg_start[s + 1]; r += block_rows) {
            task_seg_block[2 * nrowblocks] = s;
            task_seg_block[2 * nrowblocks + 1] = r;
            nrowblocks++;
        }
    /* A task is one row block times a range of its outputs. The layout keeps N contiguous, so a
     * task over all N reads its expert's planes front to back, which the prefetchers stream from
     * memory. With row blocks to spare (prefill), whole blocks go round-robin to threads. With a
     * few (decode), each thread takes an equal share of the bytes to read, cut from the blocks laid
     * end to end: a 2-bit and a 3-bit expert on two threads would otherwise leave one thread idle
     * for a third of the time. */
    const int few = nrowblocks < 2 * nthreads;
    int64_t *block_cost = malloc(sizeof(int64_t) * ((size_t)nrowblocks + 1));
    if (!block_cost) { free(task_seg_block); return -1; }
    block_cost[0] = 0; /* cumulative: bits per weight times outputs */
    for (int b = 0; b < nrowblocks; b++)
        block_cost[b + 1] = block_cost[b] + (int64_t)experts[seg_expert[task_seg_block[2 * b]]].bits * N;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *xs_scaled = malloc(sizeof(float) * (size_t)MAX_PLANES * MAX_ROWS * K);
        float *xsum = malloc(sizeof(float) * (size_t)ROWS_CAP * (K / G));
        float *acc = malloc(sizeof(float) * (size_t)MAX_ROWS * N);
        float *lut = malloc(sizeof(float) * ((size_t)MAX_PLANES * (K / 16) * LUT_CHUNKS * LUT_SIZE + 1));
        uint32_t *xpairs = bf16 ? malloc(sizeof(uint32_t) * (size_t)ROWS_CAP * MAX_PLANES * (K / 2)) : NULL;
        float corr = 0.0f;
        int prepared_block = -1;
        if (!xs_scaled || !xsum || !acc || !lut || (bf16 && !xpairs)) {
#pragma omp atomic write
            failed = 1;
        }
        const int nth = omp_get_num_threads(), me = omp_get_thread_num();
        /* this thread's tasks: blocks [b_first, b_last], from output n_first of the first to n_last
         * of the last (few), or every nth block from its own (round-robin) */
        int b_first = me, b_last = nrowblocks - 1, n_first = 0, n_last = N, stride = nth;
        if (few) {
            stride = 1;
            cut_point(block_cost, nrowblocks, N, block_cost[nrowblocks] * me / nth, &b_first, &n_first);
            cut_point(block_cost, nrowblocks, N, block_cost[nrowblocks] * (me + 1) / nth, &b_last, &n_last);
        }
        for (int b = b_first; b <= b_last && b < nrowblocks; b += stride) {
            if (failed) continue;
            const int na = few && b == b_first ? n_first : 0, n_end = few && b == b_last ? n_last : N;
            if (na >= n_end) continue;
            const int s = task_seg_block[2 * b], r0 = task_seg_block[2 * b + 1];
            const int rows = (seg_start[s + 1] - r0) < block_rows ? (seg_start[s + 1] - r0) : block_rows;
            const moeq_expert *ex = &experts[seg_expert[s]];
            plane_ref planes[MAX_PLANES];
            const int nplanes = expert_planes(ex, K, N, planes);
            if (prepared_block != b) {
#ifdef MOEQ_AVX2
                const int kind = portable ? SCALED : rows == 1 ? (bf16 ? DECODE_PAIRS : LOOKUPS) : bf16 ? PAIRS : SCALED;
#else
                const int kind = SCALED;
#endif
                prepare_rows(x + (size_t)r0 * K, rows, K, G, planes, nplanes, kind, xs_scaled, xsum, lut);
#ifdef MOEQ_BF16
                if (kind == PAIRS)
                    corr = prepare_pairs(x + (size_t)r0 * K, rows, K, planes, nplanes, xpairs, (uint32_t *)xs_scaled);
                if (kind == DECODE_PAIRS) /* pairs of the 2-bit planes only */
                    corr = prepare_pairs(x + (size_t)r0 * K, 1, K, planes, two_bit_planes(planes, nplanes), xpairs,
                                         (uint32_t *)xs_scaled);
#endif
                prepared_block = b;
            }
            float *out = y + (size_t)r0 * N;
#ifdef MOEQ_BF16
            if (bf16 && rows == 1) {
                task_decode(planes, nplanes, G, K, N, na, n_end, lut, xpairs, xsum, corr, ex, out);
                continue;
            }
            if (bf16 && rows > 1) {
                switch (rows) {
                case 2: task_bf16(2, planes, nplanes, G, K, N, na, n_end, xpairs, xsum, corr, ex, out, N); break;
                case 3: task_bf16(3, planes, nplanes, G, K, N, na, n_end, xpairs, xsum, corr, ex, out, N); break;
                case 4: task_bf16(4, planes, nplanes, G, K, N, na, n_end, xpairs, xsum, corr, ex, out, N); break;
                case 5: task_bf16(5, planes, nplanes, G, K, N, na, n_end, xpairs, xsum, corr, ex, out, N); break;
                case 6: task_bf16(6, planes, nplanes, G, K, N, na, n_end, xpairs, xsum, corr, ex, out, N); break;
                case 7: task_bf16(7, planes, nplanes, G, K, N, na, n_end, xpairs, xsum, corr, ex, out, N); break;
                default: task_bf16(BF16_ROWS, planes, nplanes, G, K, N, na, n_end, xpairs, xsum, corr, ex, out, N); break;
                }
                continue;
            }
#endif
#ifdef MOEQ_AVX2
            if (!portable) {
                switch (rows) {
                case 1: task_avx2(1, planes, nplanes, G, K, N, na, n_end, K / G, xsum, ex, xs_scaled, lut, out, N, acc); break;
                case 2: task_avx2(2, planes, nplanes, G, K, N, na, n_end, K / G, xsum, ex, xs_scaled, lut, out, N, acc); break;
                case 3: task_avx2(3, planes, nplanes, G, K, N, na, n_end, K / G, xsum, ex, xs_scaled, lut, out, N, acc); break;
                default: task_avx2(4, planes, nplanes, G, K, N, na, n_end, K / G, xsum, ex, xs_scaled, lut, out, N, acc); break;
                }
                continue;
            }
#endif
            for (int n0 = na; n0 < n_end; n0 += TILE_N)
                tile_portable(rows, planes, nplanes, G, K, N, n0, K / G, xsum, ex, xs_scaled, out, N);
        }
        free(xs_scaled);
        free(xsum);
        free(acc);
        free(lut);
        free(xpairs);
    }
    free(block_cost);
    free(task_seg_block);
    return failed ? -1 : 0;
}

/* The bf16 nearest to v (ties to even), as a float (NaN and infinity pass through). */
static inline float round_to_bf16(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    if ((u & 0x7F800000u) != 0x7F800000u) u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    memcpy(&v, &u, 4);
    return v;
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

#if defined(MOEQ_AVX2) && defined(__AVX512F__)
/* exp(x) over 16 lanes: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, so r is exact to
 * float rounding), exp(r) by its Taylor series to r^7 (truncation < 6e-9 relative), times 2^n by
 * vscalefps, which gives inf and 0 past float's range and passes NaN. silu_times' results measured
 * within 4 ulp of the scalar silu (expf) over 4M values in [-100, 100]. */
static inline __m512 exp16(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

/* out[i] = silu(gate[i]) * up[i] for i in [0, n), rounded to bf16 (ties to even) if asked. With
 * AVX-512 every element, the tail too (masked), takes the vector path: a result never depends on
 * how the range was sliced between threads. */
static void silu_times(const float *gate, const float *up, float *out, int n, int to_bf16) {
#if defined(MOEQ_AVX2) && defined(__AVX512F__)
    for (int i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        const __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
        __m512 v = _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), _mm512_maskz_loadu_ps(m, up + i));
        if (to_bf16) { /* round_to_bf16 over lanes: NaN and infinity pass through */
            const __m512i u = _mm512_castps_si512(v);
            const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
            const __m512i r = _mm512_and_si512(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb),
                                               _mm512_set1_epi32((int)0xFFFF0000u));
            const __mmask16 finite = _mm512_cmpneq_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7F800000)),
                                                              _mm512_set1_epi32(0x7F800000));
            v = _mm512_castsi512_ps(_mm512_mask_mov_epi32(u, finite, r));
        }
        _mm512_mask_storeu_ps(out + i, m, v);
    }
#else
    for (int i = 0; i < n; i++) {
        const float v = silu(gate[i]) * up[i];
        out[i] = to_bf16 ? round_to_bf16(v) : v;
    }
#endif
}

/* A SiLU-gated experts layer's shapes and address tables (the host keeps one per module). */
typedef struct {
    int32_t E, H, I, G;
    const moeq_expert *gate_up, *down;
} moeq_layer;

/* flags of moeq_experts_forward and moeq_linear */
#define MOEQ_IO_BF16 1      /* x and out are bf16 (a bf16 model): rows are exact bf16, out is rounded once */
#define MOEQ_WEIGHT_BF16 2  /* moeq_experts_forward: the routing weights are bf16, else float32 */

/* The bf16 nearest to v (ties to even), as torch's .to() rounds; a NaN stays a NaN (0x7FC0). */
static inline uint16_t float_to_bf16(float v) {
    if (v != v) return 0x7FC0;
    const float r = round_to_bf16(v);
    uint32_t u;
    memcpy(&u, &r, 4);
    return (uint16_t)(u >> 16);
}

static inline float bf16_to_float(uint16_t v) {
    const uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void bf16_to_floats(const uint16_t *src, float *dst, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = bf16_to_float(src[i]);
}

/* Rows of bf16 into float32 and back (rounded), rows across threads where there are more than 8. */
static void bf16_rows_to_float(const uint16_t *src, float *dst, int rows, int cols, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows > 8)
    for (int r = 0; r < rows; r++) bf16_to_floats(src + (size_t)r * cols, dst + (size_t)r * cols, cols);
}

static void float_rows_to_bf16(const float *src, uint16_t *dst, int rows, int cols, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows > 8)
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) dst[(size_t)r * cols + c] = float_to_bf16(src[(size_t)r * cols + c]);
}

/* A whole SiLU-gated experts layer: out [T, H] = sum over slots of w[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t))
 * with e = index[t, k]; pairs whose index is outside [0, E) are skipped. Pairs are counting-sorted
 * by expert (stable), so each expert's rows share a decode; the weighted sum runs in that order,
 * in float32, and a bf16 out is rounded from it once (as torch's .to() rounds: ties to even).
 * Returns 0, or -1 if scratch memory ran out. */
int moeq_experts_forward(const moeq_layer *layer, const void *x, int T, int topk, const int64_t *index,
                         const void *weight, void *out, int nthreads, int flags)
{
    const int E = layer->E, H = layer->H, I = layer->I, G = layer->G, pairs = T * topk;
    const int io_bf16 = flags & MOEQ_IO_BF16;
    int32_t *count = calloc((size_t)E + 1, sizeof(int32_t));
    int32_t *pair_of_row = malloc(sizeof(int32_t) * ((size_t)pairs + 1));
    int32_t *seg_start = malloc(sizeof(int32_t) * ((size_t)E + 1));
    int32_t *seg_expert = malloc(sizeof(int32_t) * ((size_t)E + 1));
    float *rows_x = malloc(sizeof(float) * ((size_t)pairs * H + 1));
    float *h = malloc(sizeof(float) * ((size_t)pairs * 2 * I + 1));
    float *act = malloc(sizeof(float) * ((size_t)pairs * I + 1));
    float *y = malloc(sizeof(float) * ((size_t)pairs * H + 1));
    /* the float32 sum: out itself, or a scratch rounded into a bf16 out at the end */
    float *sum = io_bf16 ? calloc((size_t)T * H + 1, sizeof(float)) : (float *)out;
    int status = -1;
    if (!count || !pair_of_row || !seg_start || !seg_expert || !rows_x || !h || !act || !y || (io_bf16 && !sum))
        goto done;
    for (int p = 0; p < pairs; p++)
        if (index[p] >= 0 && index[p] < E) count[index[p] + 1]++;
    int nseg = 0;
    seg_start[0] = 0;
    for (int e = 0; e < E; e++) {
        if (count[e + 1]) {
            seg_expert[nseg] = e;
            seg_start[nseg + 1] = seg_start[nseg] + count[e + 1];
            nseg++;
        }
        count[e + 1] += count[e]; /* now: first row of expert e is count[e] */
    }
    for (int p = 0; p < pairs; p++)
        if (index[p] >= 0 && index[p] < E) pair_of_row[count[index[p]]++] = p;
    const int rows = seg_start[nseg];
    if (!io_bf16 && T) memset(sum, 0, sizeof(float) * (size_t)T * H);
    if (rows) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows > 8)
        for (int r = 0; r < rows; r++) {
            const size_t t = (size_t)(pair_of_row[r] / topk);
            if (io_bf16)
                bf16_to_floats((const uint16_t *)x + t * H, rows_x + (size_t)r * H, H);
            else
                memcpy(rows_x + (size_t)r * H, (const float *)x + t * H, sizeof(float) * H);
        }
        if (moeq_packed_gemm(rows_x, h, H, 2 * I, G, nseg, seg_start, seg_expert, layer->gate_up, nthreads, 0,
                             io_bf16))
            goto done;
        /* silu(gate) * up [rows, I], in slices of SILU_SLICE so that decode's one or two rows use every
         * thread too */
        const int slices = (I + SILU_SLICE - 1) / SILU_SLICE;
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int task = 0; task < rows * slices; task++) {
            const int r = task / slices, i0 = (task % slices) * SILU_SLICE, n = I - i0 < SILU_SLICE ? I - i0 : SILU_SLICE;
            silu_times(h + (size_t)r * 2 * I + i0, h + (size_t)r * 2 * I + I + i0, act + (size_t)r * I + i0, n, io_bf16);
        }
        /* in a bf16 model silu(gate) * up was rounded to bf16, as transformers' dense experts and the
         * Triton kernels round it: the down projection takes exact bf16 rows */
        if (moeq_packed_gemm(act, y, I, H, G, nseg, seg_start, seg_expert, layer->down, nthreads, 0, io_bf16))
            goto done;
        /* the weighted sum, in row order for every output; threads take slices of the outputs */
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows > 8)
        for (int n0 = 0; n0 < H; n0 += 256) {
            const int n1 = n0 + 256 < H ? n0 + 256 : H;
            for (int r = 0; r < rows; r++) {
                const int p = pair_of_row[r];
                const float w = flags & MOEQ_WEIGHT_BF16 ? bf16_to_float(((const uint16_t *)weight)[p])
                                                         : ((const float *)weight)[p];
                float *o = sum + (size_t)(p / topk) * H;
                const float *yr = y + (size_t)r * H;
                for (int n = n0; n < n1; n++) o[n] += w * yr[n];
            }
        }
    }
    if (io_bf16) float_rows_to_bf16(sum, (uint16_t *)out, T, H, nthreads);
    status = 0;
done:
    free(count); free(pair_of_row); free(seg_start); free(seg_expert); free(rows_x); free(h); free(act); free(y);
    if (io_bf16) free(sum);
    return status;
}

/* A packed linear: y [R, N] = x [R, K] @ W^T for one weight (a one-expert record), x and y float32,
 * or bf16 with MOEQ_IO_BF16 (rows exact bf16, y rounded once from the float32 result). Returns 0,
 * or -1 if scratch memory ran out. */
int moeq_linear(const moeq_expert *weight, const void *x, int R, int K, int N, int G, void *y, int nthreads,
                int flags)
{
    const int io_bf16 = flags & MOEQ_IO_BF16;
    const int32_t seg_start[2] = {0, R}, seg_expert[1] = {0};
    float *x32 = NULL, *y32 = (float *)y; /* a bf16 x and y go through float32 copies */
    if (io_bf16) {
        x32 = malloc(sizeof(float) * ((size_t)R * K + 1));
        y32 = malloc(sizeof(float) * ((size_t)R * N + 1));
        if (!x32 || !y32) { free(x32); free(y32); return -1; }
        bf16_rows_to_float((const uint16_t *)x, x32, R, K, nthreads);
    }
    int status = moeq_packed_gemm(io_bf16 ? x32 : (const float *)x, y32, K, N, G, 1, seg_start, seg_expert, weight,
                                  nthreads, 0, io_bf16);
    if (io_bf16) {
        if (!status) float_rows_to_bf16(y32, (uint16_t *)y, R, N, nthreads);
        free(x32);
        free(y32);
    }
    return status;
}

int moeq_lut_bits(void) { return LUT_BITS; }

int moeq_has_bf16(void) {
#ifdef MOEQ_BF16
    return 1;
#else
    return 0;
#endif
}

int moeq_has_avx2(void) {
#ifdef MOEQ_AVX2
    return 1;
#else
    return 0;
#endif
}
