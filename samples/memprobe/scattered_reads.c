// Reads a random fraction of a 1 GiB buffer cut into pieces of P bytes (ascending order, 64-byte
// loads summed with AVX-512, optional software prefetch of the piece `ahead` positions later) and
// prints the useful bytes per second: what the memory system gives for the access pattern of a
// neuron-major light down with skipped neurons (a kept neuron = one piece).
// usage: scattered_reads PIECE_BYTES KEEP_FRACTION [AHEAD]   (threads: OMP_NUM_THREADS)
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double Now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char** argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s PIECE_BYTES KEEP_FRACTION [AHEAD]\n", argv[0]);
    return 2;
  }
  const size_t total = (size_t)1 << 30;
  const int piece = atoi(argv[1]);
  const double keep = atof(argv[2]);
  const int ahead = argc > 3 ? atoi(argv[3]) : 0;
  if (piece < 64 || piece % 64) {
    fprintf(stderr, "PIECE_BYTES must be a positive multiple of 64, got %d\n", piece);
    return 2;
  }
  uint8_t* buf = aligned_alloc(4096, total);
  memset(buf, 1, total);
  const size_t np = total / piece;
  uint32_t* idx = malloc(np * sizeof(uint32_t));
  size_t cnt = 0;
  srand(1);
  for (size_t i = 0; i < np; i++)
    if ((double)rand() / RAND_MAX < keep) idx[cnt++] = (uint32_t)i;
  double best = 1e30;
  volatile long sink = 0;
  for (int rep = 0; rep < 5; rep++) {
    const double t0 = Now();
#pragma omp parallel
    {
      __m512i a = _mm512_setzero_si512();
#pragma omp for schedule(static)
      for (size_t j = 0; j < cnt; j++) {
        const uint8_t* p = buf + (size_t)idx[j] * piece;
        if (ahead && j + ahead < cnt) {
          const uint8_t* q = buf + (size_t)idx[j + ahead] * piece;
          for (int o = 0; o < piece; o += 64) _mm_prefetch((const char*)q + o, _MM_HINT_T0);
        }
        for (int o = 0; o < piece; o += 64) a = _mm512_add_epi32(a, _mm512_load_si512(p + o));
      }
#pragma omp atomic
      sink += _mm512_reduce_add_epi32(a);
    }
    const double t = Now() - t0;
    if (t < best) best = t;
  }
  printf("{\"piece\": %d, \"keep\": %.3f, \"ahead\": %d, \"threads\": %d, \"useful_gb_s\": %.3f}\n", piece, keep,
         ahead, omp_get_max_threads(), cnt * (double)piece / best / 1e9);
  free(idx);
  free(buf);
  return 0;
}
