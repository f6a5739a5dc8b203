/* The CPU decode's inner loop alone, in registers, on one core: what one 2-bit word vector (16
 * outputs x 16 codes, 64 bytes) costs the two ways packed_gemm.c can read it for one row.
 *
 *   cc -O2 -march=native benchmarks/cpu_decode_ops.c -o /tmp/cpu_decode_ops && /tmp/cpu_decode_ops
 *
 * Needs AVX-512 F and BF16. "lookups": 8 table lookups of 4 bits (vpermps), 7 shifts, 8 adds, the
 * float32 row's path (group_lut). "dot products": 8 pairs of codes, each one shift and one
 * vpternlogd into the bf16 pair 1 + c/4, then vdpbf16ps with the activation pair broadcast, the bf16
 * row's path (group_decode_bf16). Both keep 8 accumulators, so neither waits on one chain. The
 * words cycle through 4 KB (L1), so memory plays no part: this is the ceiling each way. */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

#define ITERATIONS 20000000L

static float tables[8 * 16] __attribute__((aligned(64)));
static int32_t words[64 * 16] __attribute__((aligned(64)));
static uint32_t pairs[8]; /* activation pairs: two bf16 values each */

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static float total(__m512 a[8]) {
    __m512 s = a[0];
    for (int i = 1; i < 8; i++) s = _mm512_add_ps(s, a[i]);
    return _mm512_reduce_add_ps(s);
}

static void report(const char *name, double elapsed, float checksum) {
    const double ns = elapsed / ITERATIONS * 1e9;
    printf("| %-13s | %5.2f | %5.1f | %g |\n", name, ns, 64.0 / ns, checksum);
}

static void lookups(void) {
    __m512 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm512_setzero_ps();
    const double start = seconds();
    for (long it = 0; it < ITERATIONS; it++) {
        const __m512i v = _mm512_load_si512(words + (it & 63) * 16);
#pragma GCC unroll 8
        for (int c = 0; c < 8; c++)
            a[c] = _mm512_add_ps(a[c], _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * c), _mm512_load_ps(tables + 16 * c)));
    }
    report("lookups", seconds() - start, total(a));
}

static void dot_products(void) {
    __m512 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm512_setzero_ps();
    const double start = seconds();
    for (long it = 0; it < ITERATIONS; it++) {
        const __m512i v = _mm512_load_si512(words + (it & 63) * 16);
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) { /* codes i, i + 8 to bits 5-6, 21-22, as packed_gemm.c does */
            const __m512i s = i < 3 ? _mm512_slli_epi32(v, 5 - 2 * i) : _mm512_srli_epi32(v, 2 * i - 5);
            const __m512bh c = (__m512bh)_mm512_ternarylogic_epi32(s, _mm512_set1_epi32(0x00600060),
                                                                   _mm512_set1_epi32(0x3F803F80), 0xEA);
            a[i] = _mm512_dpbf16_ps(a[i], c, (__m512bh)_mm512_set1_epi32((int)pairs[i]));
        }
    }
    report("dot products", seconds() - start, total(a));
}

int main(void) {
    for (int i = 0; i < 8 * 16; i++) tables[i] = 0.001f * (float)(i % 16); /* small: no overflow, no NaN */
    for (int i = 0; i < 64 * 16; i++) words[i] = (int32_t)(i * 2654435761u);
    for (int i = 0; i < 8; i++) pairs[i] = 0x3C003C00u + (uint32_t)i; /* bf16 pairs near 2^-7 */
    printf("| inner loop | ns per 64-byte word vector | GB/s of codes, one core | checksum |\n|---|---|---|---|\n");
    for (int round = 0; round < 3; round++) {
        lookups();
        dot_products();
    }
    return 0;
}
