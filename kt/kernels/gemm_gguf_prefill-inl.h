// Part of gemm_gguf_hwy.cc (kept apart for size, tools/check_sizes.py): the prefill paths of the GGUF GEMM's
// Highway kernels, the column-interleaved panel (Q4_0, Q4_K, Q8_0 with 8 rows or more) and the fp32 tiles of
// the float types (4 rows or more). Not a standalone header: gemm_gguf_hwy.cc includes it once per Highway
// target inside its kt::HWY_NAMESPACE, after the helpers it uses (DF, VF, HalfAt, SumsOf16, Total,
// HWY_UNROLL_ROWS); hence no include guard.

// ---- The panel path (prefill: Q4_0, Q4_K and Q8_0 with kPanelMinRows rows or more). The kernels above decode a
// weight block for at most 4 rows and reduce each column's sums across lanes; with many rows the weights of
// 8 columns are unpacked once per chunk of K into a panel (unsigned quants 0..15 with the 8 columns in the
// 8 int32 lanes: 4 consecutive values of column c in lane c), and every activation row runs over it: one
// vpmaddubsw multiplies 4 values of 8 columns by the row's 4 activations (vpbroadcastd), so the lanes are
// the 8 columns' sums, scaled per block by vectors of the columns' d (no horizontal sums, no per-row
// decoding). Pair sums stay in int16 over a 32-value sub-block (8 of them: at most 8 * 2 * 15 * 127 =
// 30480), then vpmaddwd with the columns' scales (Q4_K) or ones (Q4_0). The min terms: Q4_K's mins (4
// vpmaddwd per block of the columns' mins with the row's 32-value sums), Q4_0's -8 (8 times the row's
// 32-value sum). Q8_0 keeps its signed bytes: |w| times x with w's sign (vpsignb), widened to int32 every
// 4 values (a pair sum reaches 2 * 127 * 127). Integer sums exact as before; the fp32 order differs from
// the per-column kernels.
constexpr size_t kPanelCols = 8;
constexpr size_t kPanelK = 2048;     // values of K per panel: 16 KiB of quants, the panel ~24 KiB (L1)
constexpr size_t kPanelSlab = 64;    // rows whose 32-value activation sums are kept (the layer's row chunk)
constexpr size_t kPanelMinRows = 8;  // from gemm_gguf_benchmark: below, unpacking costs more than it saves

struct Panel {
  alignas(32) uint8_t q[kPanelK * kPanelCols];  // per 32-value sub-block: per 4 values (g), 8 columns x 4 (Q8_0: int8)
  alignas(32) int16_t sc[kPanelK / 32][16];     // Q4_K, per sub-block: column c's scale at lanes 2c, 2c + 1
  alignas(32) int16_t mn[kPanelK / 256][4][16];  // Q4_K, per block, vector v: column c's mins 2v, 2v + 1
  alignas(32) float d[kPanelK / 32][8];         // per weight block: column c's d
  alignas(32) float dm[kPanelK / 256][8];       // Q4_K, per block: column c's -dmin
};

// Rows r_c (column c's 32 bytes of one sub-block, 8 dwords g) to out[g] (32 bytes: dword g of each column in
// lane c): an 8 x 8 transpose of dwords.
HWY_INLINE void TransposeStore(const __m256i (&r)[8], uint8_t* out) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // rows 0-3, 4-7
    u[4 * h + 0] = _mm256_unpacklo_epi64(t[4 * h], t[4 * h + 2]);      // dwords 0 | 4
    u[4 * h + 1] = _mm256_unpackhi_epi64(t[4 * h], t[4 * h + 2]);      // 1 | 5
    u[4 * h + 2] = _mm256_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);  // 2 | 6
    u[4 * h + 3] = _mm256_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);  // 3 | 7
  }
  auto* o = reinterpret_cast<__m256i*>(out);
  for (int g = 0; g < 4; ++g) {
    _mm256_store_si256(o + g, _mm256_permute2x128_si256(u[g], u[4 + g], 0x20));
    _mm256_store_si256(o + 4 + g, _mm256_permute2x128_si256(u[g], u[4 + g], 0x31));
  }
}

// 8 columns (rows of row_bytes from w) over nblk weight blocks into p.
template <GgufType kT>
HWY_INLINE void UnpackPanel(const uint8_t* w, size_t row_bytes, size_t nblk, Panel& p) {
  constexpr bool kK = kT == GgufType::kQ4_K, kQ8 = kT == GgufType::kQ8_0;
  const __m128i m4 = _mm_set1_epi8(0x0F);
  const __m256i m4y = _mm256_set1_epi8(0x0F);
  for (size_t b = 0; b < nblk; ++b) {
    __m256i r[8];
    if (kQ8) {  // signed bytes as stored
      for (int c = 0; c < 8; ++c) {
        const uint8_t* blk = w + c * row_bytes + b * 34;
        r[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
        p.d[b][c] = HalfAt(blk);
      }
      TransposeStore(r, p.q + 256 * b);
      continue;
    }
    if (!kK) {
      for (int c = 0; c < 8; ++c) {
        const uint8_t* blk = w + c * row_bytes + b * 18;
        const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2));
        r[c] = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m4), _mm_and_si128(q, m4));
        p.d[b][c] = HalfAt(blk);
      }
      TransposeStore(r, p.q + 256 * b);
      continue;
    }
    for (int c = 0; c < 8; ++c) {  // scales and mins as DotQ45_KB unpacks them
      const uint8_t* blk = w + c * row_bytes + b * 144;
      uint32_t sw[3];
      std::memcpy(sw, blk + 4, 12);
      uint8_t v[16];  // scales 0-7, mins 0-7
      const uint32_t words[4] = {sw[0] & 0x3f3f3f3f, (sw[2] & 0x0f0f0f0f) | ((sw[0] >> 2) & 0x30303030),
                                 sw[1] & 0x3f3f3f3f, ((sw[2] >> 4) & 0x0f0f0f0f) | ((sw[1] >> 2) & 0x30303030)};
      std::memcpy(v, words, 16);
      for (int i = 0; i < 8; ++i) p.sc[8 * b + i][2 * c] = p.sc[8 * b + i][2 * c + 1] = v[i];
      for (int i = 0; i < 4; ++i) {
        p.mn[b][i][2 * c] = v[8 + 2 * i];
        p.mn[b][i][2 * c + 1] = v[9 + 2 * i];
      }
      p.d[b][c] = HalfAt(blk);
      p.dm[b][c] = -HalfAt(blk + 2);
    }
    for (int i = 0; i < 8; ++i) {  // sub-block i: low (even i) or high nibbles of qs bytes 32 (i / 2)
      for (int c = 0; c < 8; ++c) {
        const uint8_t* qs = w + c * row_bytes + b * 144 + 16 + 32 * (i / 2);
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs));
        r[c] = _mm256_and_si256(i % 2 == 0 ? q : _mm256_srli_epi16(q, 4), m4y);
      }
      TransposeStore(r, p.q + 256 * (8 * b + i));
    }
  }
}

// R rows against the panel's 8 columns over nblk blocks: x[r], dx[r] (one scale per block) and xs[r] (the
// rows' 32-value sums: int16 for Q4_K, 8 x them in int32 for Q4_0) at the chunk's start; y[r] gets (or, with
// `add`, adds) the 8 columns.
template <GgufType kT, int R>
HWY_INLINE void PanelRows(const Panel& p, size_t nblk, const int8_t* const (&x)[R], const float* const (&dx)[R],
                          const void* const (&xs)[R], float* const (&y)[R], bool add) {
  constexpr bool kK = kT == GgufType::kQ4_K, kQ8 = kT == GgufType::kQ8_0;
  VF f[R];
  HWY_UNROLL_ROWS for (int r = 0; r < R; ++r) f[r] = hn::Zero(DF());
  const auto bcast = [](const void* at) {
    int32_t v;
    std::memcpy(&v, at, 4);
    return _mm256_set1_epi32(v);
  };
  for (size_t b = 0; b < nblk; ++b) {
    constexpr int kSub = kK ? 8 : 1;
    __m256i s[R];
    HWY_UNROLL_ROWS for (int r = 0; r < R; ++r) s[r] = _mm256_setzero_si256();
    for (int i = 0; i < kSub; ++i) {
      const size_t sb = kSub * b + i;
      const uint8_t* qi = p.q + 256 * sb;
      __m256i acc[R];
      HWY_UNROLL_ROWS for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
      // Not unrolled: unrolled, GCC schedules all 32 products of 4 rows first and spills them to the stack.
      _Pragma("GCC unroll 1") for (int g = 0; g < 8; ++g) {
        const __m256i wv = _mm256_load_si256(reinterpret_cast<const __m256i*>(qi + 32 * g));
        if (kQ8) {  // |w| times x with w's sign (vpsignb, as AddS8); a pair sum reaches 2 * 127 * 127: int32 per group
          const __m256i aw = _mm256_sign_epi8(wv, wv);
          HWY_UNROLL_ROWS for (int r = 0; r < R; ++r) {
            const __m256i xw = _mm256_sign_epi8(bcast(x[r] + 32 * sb + 4 * g), wv);
            acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xw), _mm256_set1_epi16(1)));
          }
          continue;
        }
        HWY_UNROLL_ROWS for (int r = 0; r < R; ++r) {
          acc[r] = _mm256_add_epi16(acc[r], _mm256_maddubs_epi16(wv, bcast(x[r] + 32 * sb + 4 * g)));
        }
      }
      const __m256i sc = kK ? _mm256_load_si256(reinterpret_cast<const __m256i*>(p.sc[sb])) : _mm256_set1_epi16(1);
      HWY_UNROLL_ROWS for (int r = 0; r < R; ++r) {
        s[r] = _mm256_add_epi32(s[r], kQ8 ? acc[r] : _mm256_madd_epi16(acc[r], sc));
      }
    }
    const VF d = hn::Load(DF(), p.d[b]);
    if (kK) {
      __m256i mm[R];
      HWY_UNROLL_ROWS for (int r = 0; r < R; ++r) mm[r] = _mm256_setzero_si256();
      for (int v = 0; v < 4; ++v) {
        const __m256i mv = _mm256_load_si256(reinterpret_cast<const __m256i*>(p.mn[b][v]));
        HWY_UNROLL_ROWS for (int r = 0; r < R; ++r) {
          const auto* sums = static_cast<const int16_t*>(xs[r]);
          mm[r] = _mm256_add_epi32(mm[r], _mm256_madd_epi16(mv, bcast(sums + 8 * b + 2 * v)));
        }
      }
      const VF dm = hn::Load(DF(), p.dm[b]);
      HWY_UNROLL_ROWS for (int r = 0; r < R; ++r) {
        const VF dxr = hn::Set(DF(), dx[r][b]);
        f[r] = hn::MulAdd(hn::ConvertTo(DF(), VI32{s[r]}), hn::Mul(d, dxr), f[r]);
        f[r] = hn::MulAdd(hn::ConvertTo(DF(), VI32{mm[r]}), hn::Mul(dm, dxr), f[r]);
      }
    } else {
      HWY_UNROLL_ROWS for (int r = 0; r < R; ++r) {
        const __m256i t = kQ8 ? s[r] : _mm256_sub_epi32(s[r], _mm256_set1_epi32(static_cast<const int32_t*>(xs[r])[b]));
        f[r] = hn::MulAdd(hn::ConvertTo(DF(), VI32{t}), hn::Mul(d, hn::Set(DF(), dx[r][b])), f[r]);
      }
    }
  }
  HWY_UNROLL_ROWS for (int r = 0; r < R; ++r) {
    hn::StoreU(add ? hn::Add(hn::LoadU(DF(), y[r]), f[r]) : f[r], DF(), y[r]);
  }
}

// Rows [r0, r0 + R) of the slab (activation rows at slab row rs) for the chunk starting at value kc0.
template <GgufType kT, int R>
HWY_INLINE void PanelRowGroup(const Panel& p, size_t nblk, const GgufRows& in, size_t groups, size_t rs, size_t r0,
                              size_t kc0, const void* xs, size_t xs_ld, float* y, size_t ldy, bool add) {
  const int8_t* x[R];
  const float* dx[R];
  const void* s[R];
  float* yr[R];
  const size_t be = kT == GgufType::kQ4_K ? 256 : 32;
  HWY_UNROLL_ROWS for (int r = 0; r < R; ++r) {
    const size_t row = rs + r0 + r;
    x[r] = in.qx + row * in.ld + kc0;
    dx[r] = in.sx + row * groups + kc0 / be;
    s[r] = static_cast<const uint8_t*>(xs) + (r0 + r) * xs_ld;
    yr[r] = y + row * ldy;
  }
  PanelRows<kT, R>(p, nblk, x, dx, s, yr, add);
}

// y[0..m)[0..cols8) with cols8 a multiple of 8.
template <GgufType kT>
void PanelGemm(size_t m, size_t k, const GgufRows& in, const uint8_t* w, size_t cols8, float* y, size_t ldy) {
  constexpr bool kK = kT == GgufType::kQ4_K, kQ8 = kT == GgufType::kQ8_0;
  const size_t be = GgufBlockElems(kT), bb = GgufBlockBytes(kT), row_bytes = k / be * bb, groups = k / be;
  Panel p;
  // The slab's 32-value activation sums: int16 (Q4_K's vpmaddwd partner) or 8 x them in int32 (Q4_0).
  alignas(32) int32_t xs[kPanelSlab][kPanelK / 32];
  const size_t xs_ld = sizeof(xs[0]);
  for (size_t kc0 = 0; kc0 < k; kc0 += kPanelK) {
    const size_t kc = std::min(kPanelK, k - kc0), nblk = kc / be;
    for (size_t rs = 0; rs < m; rs += kPanelSlab) {
      const size_t ms = std::min(kPanelSlab, m - rs);
      for (size_t r = 0; !kQ8 && r < ms; ++r) {  // Q8_0 has no offset
        int16_t s16[kPanelK / 16];
        SumsOf16(in.qx + (rs + r) * in.ld + kc0, kc, s16);
        for (size_t g = 0; g < kc / 32; ++g) {
          const int t = s16[2 * g] + s16[2 * g + 1];
          if (kK) {
            reinterpret_cast<int16_t*>(xs[r])[g] = static_cast<int16_t>(t);
          } else {
            xs[r][g] = 8 * t;
          }
        }
      }
      for (size_t j0 = 0; j0 < cols8; j0 += kPanelCols) {
        UnpackPanel<kT>(w + j0 * row_bytes + kc0 / be * bb, row_bytes, nblk, p);
        float* yc = y + j0;
        const bool add = kc0 > 0;
        size_t r0 = 0;
        for (; r0 + 4 <= ms; r0 += 4) PanelRowGroup<kT, 4>(p, nblk, in, groups, rs, r0, kc0, xs, xs_ld, yc, ldy, add);
        switch (ms - r0) {
          case 3: PanelRowGroup<kT, 3>(p, nblk, in, groups, rs, r0, kc0, xs, xs_ld, yc, ldy, add); break;
          case 2: PanelRowGroup<kT, 2>(p, nblk, in, groups, rs, r0, kc0, xs, xs_ld, yc, ldy, add); break;
          case 1: PanelRowGroup<kT, 1>(p, nblk, in, groups, rs, r0, kc0, xs, xs_ld, yc, ldy, add); break;
          default: break;
        }
      }
    }
  }
}

// Float types with 4 rows or more (prefill). FloatRows converts each row's bf16 again for every column and
// reduces every column across lanes; here a group of 4 rows is converted to fp32 once per chunk of
// kFloatChunk values (16 KiB on the stack), and tiles of 4 rows x 2 columns keep 8 fp32 accumulators, so
// a weight vector (converted once) serves 4 rows and an activation vector 2 columns: 8 FMAs per 6 loads.
constexpr size_t kFloatChunk = 1024;

template <GgufType kT>
HWY_INLINE VF LoadW(const uint8_t* w, size_t c) {
  const DF df;
  if (kT == GgufType::kF32) return hn::LoadU(df, reinterpret_cast<const float*>(w) + c);
  if (kT == GgufType::kBf16) return LoadBf16(df, reinterpret_cast<const bf16_t*>(w) + c);
  const hn::FixedTag<hwy::float16_t, 8> dh;
  return hn::PromoteTo(df, hn::LoadU(dh, reinterpret_cast<const hwy::float16_t*>(w) + c));
}

// Columns wc[0..C) (at the chunk's first value) times the 4 fp32 rows xf over n (a multiple of 8) values,
// into (add: onto) y[r][col].
template <GgufType kT, int C>
HWY_INLINE void FloatTile(const float (*xf)[kFloatChunk], size_t n, const uint8_t* const (&wc)[C],
                          float* const (&y)[4], bool add) {
  const DF df;
  VF acc[4][C];
  HWY_UNROLL_ROWS for (int r = 0; r < 4; ++r) {
    for (int j = 0; j < C; ++j) acc[r][j] = hn::Zero(df);
  }
  for (size_t c = 0; c < n; c += 8) {
    VF wv[C];
    for (int j = 0; j < C; ++j) wv[j] = LoadW<kT>(wc[j], c);
    HWY_UNROLL_ROWS for (int r = 0; r < 4; ++r) {
      const VF xv = hn::Load(df, xf[r] + c);
      for (int j = 0; j < C; ++j) acc[r][j] = hn::MulAdd(wv[j], xv, acc[r][j]);
    }
  }
  HWY_UNROLL_ROWS for (int r = 0; r < 4; ++r) {
    for (int j = 0; j < C; ++j) y[r][j] = (add ? y[r][j] : 0.0f) + Total(acc[r][j]);
  }
}

template <GgufType kT>
void FloatGemmTiled(size_t m4, size_t k, const GgufRows& in, const uint8_t* w, size_t cols, float* y, size_t ldy) {
  constexpr size_t eb = kT == GgufType::kF32 ? 4 : 2;
  const DF df;
  alignas(32) float xf[4][kFloatChunk];
  const size_t k8 = k / 8 * 8;
  for (size_t r0 = 0; r0 < m4; r0 += 4) {
    for (size_t kc0 = 0; kc0 < k8; kc0 += kFloatChunk) {
      const size_t n = std::min(kFloatChunk, k8 - kc0);
      for (int r = 0; r < 4; ++r) {
        const bf16_t* xr = in.x + (r0 + r) * in.ld + kc0;
        for (size_t c = 0; c < n; c += 8) hn::Store(LoadBf16(df, xr + c), df, xf[r] + c);
      }
      size_t j = 0;
      for (; j + 2 <= cols; j += 2) {
        const uint8_t* wc[2] = {w + j * k * eb + kc0 * eb, w + (j + 1) * k * eb + kc0 * eb};
        float* yr[4];
        for (int r = 0; r < 4; ++r) yr[r] = y + (r0 + r) * ldy + j;
        FloatTile<kT, 2>(xf, n, wc, yr, kc0 > 0);
      }
      if (j < cols) {
        const uint8_t* wc[1] = {w + j * k * eb + kc0 * eb};
        float* yr[4];
        for (int r = 0; r < 4; ++r) yr[r] = y + (r0 + r) * ldy + j;
        FloatTile<kT, 1>(xf, n, wc, yr, kc0 > 0);
      }
    }
    for (size_t r = r0; r < r0 + 4; ++r) {  // values past the last multiple of 8 (and K < 8)
      for (size_t j = 0; j < cols; ++j) {
        const float tail = k8 < k ? GgufDotBf16(kT, w + j * k * eb + k8 * eb, k - k8, in.x + r * in.ld + k8) : 0.0f;
        y[r * ldy + j] = (k8 > 0 ? y[r * ldy + j] : 0.0f) + tail;
      }
    }
  }
}
