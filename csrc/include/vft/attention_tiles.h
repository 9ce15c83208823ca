// Analytic tile classification of register attention: a C++ port of the formulas in
// vft_kernels/layout.py (RegisterLayout.classify_tile, key_range, query_range and the
// `allowed` semantics), integer arithmetic on token indices, no mask tensor.
// tests/test_attention_cpu.py checks this port against the Python originals.
//
// `keep` is always the sample's per-block row: keep[t] registers are kept in time block t
// (a per-sample keep is passed as a row of equal values). Values are clamped to [0, R]
// when read. Since P >= 1 every block's patches are kept, so the first / last kept token
// of a range depends only on the keep of the block holding the range's first / last token.
#pragma once
#include <algorithm>
#include <cstdint>

#include "vft/common.h"

namespace vft {

// Same order as vft_kernels.layout.MODES.
enum class MaskMode : int { kFull = 0, kBlockCausal = 1, kBlockCausalLast = 2 };
// Same values as vft_kernels.layout.Tile.
enum TileClass : int { kTileMasked = 0, kTilePartial = 1, kTileFull = 2 };

struct TileLayout {
  int64_t blocks, patches, registers;
  MaskMode mode;

  VFT_HD int64_t block_size() const { return patches + registers; }
  VFT_HD int64_t seq_len() const { return blocks * block_size(); }

  // Registers kept in block t.
  VFT_HD int64_t keep_at(const int32_t* keep, int64_t t) const {
    const int64_t k = keep[t];
    return k < 0 ? 0 : (k > registers ? registers : k);
  }

  // Is token n kept?
  VFT_HD bool kept(int64_t n, const int32_t* keep) const {
    return n % block_size() < patches + keep_at(keep, n / block_size());
  }

  // First / last kept token of [lo, hi), or -1 when there is none (layout._first_kept,
  // layout._last_kept).
  VFT_HD int64_t first_kept(int64_t lo, int64_t hi, const int32_t* keep) const {
    const int64_t S = block_size();
    int64_t x = lo;
    if (x % S >= patches + keep_at(keep, x / S)) x = (x / S + 1) * S;
    return x < hi ? x : -1;
  }
  VFT_HD int64_t last_kept(int64_t lo, int64_t hi, const int32_t* keep) const {
    const int64_t S = block_size();
    int64_t x = hi - 1;
    const int64_t kb = keep_at(keep, x / S);
    if (x % S >= patches + kb) x = (x / S) * S + patches + kb - 1;
    return x >= lo ? x : -1;
  }
  // Does [lo, hi) hold a dropped register? (one step per time block it touches)
  VFT_HD bool has_dropped(int64_t lo, int64_t hi, const int32_t* keep) const {
    const int64_t S = block_size();
    for (int64_t t = lo / S; t * S < hi; ++t) {
      const int64_t kb = keep_at(keep, t);
      if (kb >= registers) continue;
      const int64_t d0 = t * S + patches + kb, d1 = (t + 1) * S;
      if ((lo > d0 ? lo : d0) < (hi < d1 ? hi : d1)) return true;
    }
    return false;
  }

  // layout.classify_tile: queries [q0, q1) x keys [k0, k1).
  VFT_HD int classify_tile(int64_t q0, int64_t q1, int64_t k0, int64_t k1, const int32_t* keep) const {
    const int64_t S = block_size(), P = patches;
    const int64_t i = last_kept(q0, q1, keep);
    const int64_t k = first_kept(k0, k1, keep);
    if (i < 0 || k < 0) return kTileMasked;
    const int64_t ti = i / S, tk = k / S;
    if (mode == MaskMode::kBlockCausal && tk > ti) return kTileMasked;
    if (mode == MaskMode::kBlockCausalLast &&
        (tk > ti || (tk == ti && !(k % S < P || i % S >= k % S))))
      return kTileMasked;
    if (has_dropped(q0, q1, keep) || has_dropped(k0, k1, keep)) return kTilePartial;
    if (mode == MaskMode::kFull) return kTileFull;
    const int64_t tq_min = q0 / S, tk_max = (k1 - 1) / S;
    if (tk_max < tq_min) return kTileFull;
    if (tk_max > tq_min) return kTilePartial;
    if (mode == MaskMode::kBlockCausal) return kTileFull;
    const int64_t jk_max = (k1 - 1) % S, jq_min = q0 % S;
    return (jk_max < P || jq_min >= jk_max) ? kTileFull : kTilePartial;
  }

  // layout.key_range: [*lo, *hi) holds every key allowed for some query in [q0, q1).
  VFT_HD void key_range(int64_t q0, int64_t q1, const int32_t* keep, int64_t* lo, int64_t* hi) const {
    const int64_t S = block_size(), P = patches;
    const int64_t i = last_kept(q0, q1, keep);
    *lo = 0;
    if (i < 0) {
      *hi = 0;
      return;
    }
    const int64_t t = i / S, j = i % S;
    if (mode == MaskMode::kFull)
      *hi = (blocks - 1) * S + P + keep_at(keep, blocks - 1);
    else if (mode == MaskMode::kBlockCausal)
      *hi = t * S + P + keep_at(keep, t);
    else
      *hi = t * S + (j < P ? P : j + 1);
  }

  // layout.query_range: [*lo, *hi) holds every query attending some key in [k0, k1).
  VFT_HD void query_range(int64_t k0, int64_t k1, const int32_t* keep, int64_t* lo, int64_t* hi) const {
    const int64_t S = block_size(), P = patches;
    const int64_t k = first_kept(k0, k1, keep);
    if (k < 0) {
      *lo = *hi = 0;
      return;
    }
    const int64_t t = k / S, j = k % S;
    *hi = (blocks - 1) * S + P + keep_at(keep, blocks - 1);
    if (mode == MaskMode::kFull)
      *lo = 0;
    else if (mode == MaskMode::kBlockCausal)
      *lo = t * S;
    else
      *lo = t * S + (j < P ? 0 : j);
  }

  // For a kept query i: how many leading keys of key block tk it may attend (the allowed
  // keys of a block are always a prefix of it; layout.allowed written per block).
  VFT_HD int64_t allowed_prefix(int64_t i, int64_t tk, const int32_t* keep) const {
    const int64_t S = block_size(), P = patches;
    const int64_t ti = i / S, ji = i % S;
    if (mode == MaskMode::kFull) return P + keep_at(keep, tk);
    if (tk < ti) return P + keep_at(keep, tk);
    if (tk > ti) return 0;
    if (mode == MaskMode::kBlockCausal) return P + keep_at(keep, tk);
    return ji < P ? P : ji + 1;
  }
};

}  // namespace vft
