// The entropy coder of Duet's compressed checkpoints (shared/compress.py). A bf16 value's
// symbol is its exponent and its top two mantissa bits (10 bits: they are coded together,
// which the mantissa's skew makes ~0.07 bits a value cheaper than the exponent alone); the
// sign and the low five mantissa bits (6 bits) sit raw in a packed plane, four values in
// three bytes. Canonical Huffman codes of at most 16 bits, MSB-first, in independent tiles
// of `tile` symbols, each tile a whole number of 32-bit words stored big-endian (the bytes
// are the bits in order), two zero words after the last tile: tiles encode and decode in
// parallel.
//   huff_encode(sym int16 [n] (< 1024), codes int32 [1024], lens uint8 [1024], tile)
//       -> (words int32 [total], offsets int64 [tiles + 1], in words)
//   huff_decode_bf16(words, offsets, lut int32 [1 << max_len] (symbol | length << 16),
//                    max_len, raw uint8 [3 * ceil(n / 4)], n, tile) -> bf16 bits int16 [n]
//       bits = sign << 15 | symbol << 5 | low5, (sign, low5) = the value's 6 raw bits
// A tile that reads past its words, or meets a bit pattern no code starts with, is an
// error naming the tile (a truncated or corrupted stream), never garbage.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstring>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {
// the stream's bytes are the code bits in order (each 32-bit word stored big-endian); the
// decoder reads 8 bytes at any bit's byte, so KPadWords zero words follow the last tile
constexpr int64_t kPadWords = 2;
constexpr int64_t kSymbols = 1024;

// value i's 6 raw bits (sign, low 5 mantissa bits): four values to three bytes, MSB-first
inline uint32_t raw6(const uint8_t* raw, int64_t i) {
  const uint8_t* g = raw + (i >> 2) * 3;
  const uint32_t x = (static_cast<uint32_t>(g[0]) << 16) | (static_cast<uint32_t>(g[1]) << 8) | g[2];
  return (x >> (18 - 6 * (i & 3))) & 63u;
}

inline uint64_t bits_at(const uint8_t* base, uint64_t bit) {
  uint64_t v;
  std::memcpy(&v, base + (bit >> 3), sizeof v);
  return __builtin_bswap64(v) << (bit & 7);
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> huff_encode(const at::Tensor& sym, const at::Tensor& codes,
                                               const at::Tensor& lens, int64_t tile) {
  TORCH_CHECK(sym.scalar_type() == at::kShort && sym.dim() == 1 && sym.is_contiguous(),
              "huff_encode: symbols must be contiguous int16 [n]");
  TORCH_CHECK(codes.scalar_type() == at::kInt && codes.numel() == kSymbols &&
                  codes.is_contiguous() && lens.scalar_type() == at::kByte &&
                  lens.numel() == kSymbols && lens.is_contiguous(),
              "huff_encode: codes int32 [1024] and lens uint8 [1024]");
  TORCH_CHECK(tile > 0, "huff_encode: tile must be positive");
  const int64_t n = sym.numel(), tiles = (n + tile - 1) / tile;
  const uint16_t* s = reinterpret_cast<const uint16_t*>(sym.data_ptr<int16_t>());
  const uint32_t* c = reinterpret_cast<const uint32_t*>(codes.data_ptr<int32_t>());
  const uint8_t* l = lens.data_ptr<uint8_t>();
  for (int64_t i = 0; i < kSymbols; ++i)
    TORCH_CHECK(l[i] <= 16, "huff_encode: a code longer than 16");
  auto offsets = at::zeros({tiles + 1}, at::kLong);
  int64_t* off = offsets.data_ptr<int64_t>();
  std::atomic<bool> missing{false};
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      uint64_t bits = 0;
      const int64_t end = std::min(n, (t + 1) * tile);
      for (int64_t i = t * tile; i < end; ++i) {
        if (s[i] >= kSymbols || l[s[i]] == 0) {
          missing = true;
          break;
        }
        bits += l[s[i]];
      }
      off[t + 1] = static_cast<int64_t>((bits + 31) / 32);
    }
  });
  TORCH_CHECK(!missing, "huff_encode: a symbol without a code");
  for (int64_t t = 0; t < tiles; ++t) off[t + 1] += off[t];
  auto words = at::zeros({off[tiles] + kPadWords}, at::kInt);   // zero words the reader may touch
  uint32_t* w = reinterpret_cast<uint32_t*>(words.data_ptr<int32_t>());
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      uint32_t* out = w + off[t];
      uint64_t acc = 0;   // left-aligned pending bits
      int have = 0;
      const int64_t end = std::min(n, (t + 1) * tile);
      for (int64_t i = t * tile; i < end; ++i) {
        const int len = l[s[i]];
        acc |= static_cast<uint64_t>(c[s[i]]) << (64 - have - len);
        have += len;
        if (have >= 32) {
          *out++ = __builtin_bswap32(static_cast<uint32_t>(acc >> 32));
          acc <<= 32;
          have -= 32;
        }
      }
      if (have > 0) *out++ = __builtin_bswap32(static_cast<uint32_t>(acc >> 32));
    }
  });
  return {words, offsets};
}

at::Tensor huff_decode_bf16(const at::Tensor& words, const at::Tensor& offsets,
                            const at::Tensor& lut, int64_t max_len, const at::Tensor& raw,
                            int64_t n, int64_t tile) {
  TORCH_CHECK(words.scalar_type() == at::kInt && words.dim() == 1 && words.is_contiguous(),
              "huff_decode: words must be contiguous int32");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.is_contiguous(),
              "huff_decode: offsets must be contiguous int64");
  TORCH_CHECK(max_len >= 1 && max_len <= 16 && lut.scalar_type() == at::kInt &&
                  lut.numel() == (int64_t{1} << max_len) && lut.is_contiguous(),
              "huff_decode: lut must be int32 [1 << max_len], max_len in [1, 16]");
  TORCH_CHECK(tile > 0 && n >= 0, "huff_decode: tile must be positive, n not negative");
  TORCH_CHECK(raw.scalar_type() == at::kByte && raw.dim() == 1 && raw.is_contiguous() &&
                  raw.numel() == (n + 3) / 4 * 3,
              "huff_decode: the raw plane has ", raw.numel(), " bytes; ", n, " values need ",
              (n + 3) / 4 * 3);
  const int64_t tiles = (n + tile - 1) / tile, nw = words.numel();
  TORCH_CHECK(offsets.numel() == tiles + 1, "huff_decode: ", offsets.numel() - 1,
              " tile offsets for ", tiles, " tiles of ", tile, " values");
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0, "huff_decode: the first tile does not start at word 0");
  for (int64_t t = 0; t < tiles; ++t)
    TORCH_CHECK(off[t + 1] >= off[t] && off[t + 1] <= nw, "huff_decode: tile ", t,
                " ends at word ", off[t + 1], " of a stream of ", nw,
                " words (truncated or corrupt)");
  TORCH_CHECK(off[tiles] + kPadWords <= nw, "huff_decode: the stream has ", nw,
              " words, its tiles and padding need ", off[tiles] + kPadWords,
              " (truncated or corrupt)");
  auto out = at::empty({n}, at::kShort);
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(words.data_ptr<int32_t>());
  const int32_t* table = lut.data_ptr<int32_t>();
  const uint8_t* m = raw.data_ptr<uint8_t>();
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr<int16_t>());
  std::atomic<int64_t> bad{-1};
  const int shift = 64 - static_cast<int>(max_len);
  auto fail = [&](int64_t t) {
    int64_t expected = -1;
    bad.compare_exchange_strong(expected, t);
  };
  // the symbol's bits first; the raw bits are merged in after, in a second pass over the
  // same (cache-warm) values with no dependency between them
  auto emit = [&](int64_t at, int32_t e) {
    o[at] = static_cast<uint16_t>(static_cast<uint32_t>(e & 0x3ff) << 5);
  };
  auto merge_raw = [&](int64_t lo, int64_t hi) {
    int64_t i = lo;
    for (; i < hi && (i & 3); ++i) {
      const uint32_t r = raw6(m, i);
      o[i] |= static_cast<uint16_t>(((r & 32u) << 10) | (r & 31u));
    }
    for (; i + 4 <= hi; i += 4) {   // four values from three bytes
      const uint8_t* g = m + (i >> 2) * 3;
      const uint32_t x = (static_cast<uint32_t>(g[0]) << 16) | (static_cast<uint32_t>(g[1]) << 8) | g[2];
      for (int k = 0; k < 4; ++k) {
        const uint32_t r = (x >> (18 - 6 * k)) & 63u;
        o[i + k] |= static_cast<uint16_t>(((r & 32u) << 10) | (r & 31u));
      }
    }
    for (; i < hi; ++i) {
      const uint32_t r = raw6(m, i);
      o[i] |= static_cast<uint16_t>(((r & 32u) << 10) | (r & 31u));
    }
  };
  // Each symbol: read 8 bytes at the bit position, look its code up, advance: no branch.
  // Four tiles at once, interleaved, so four independent lookup chains fill the pipeline
  // (1.2 GB/s of bf16 per core here, against 0.75 for one stream with a refill branch).
  constexpr int kWays = 4;
  const int64_t groups = (tiles + kWays - 1) / kWays;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t first = g * kWays;
      if (first + kWays <= tiles && (first + kWays) * tile <= n) {
        const uint8_t* base[kWays];
        uint64_t bit[kWays];
        int zero = 0;
        for (int k = 0; k < kWays; ++k) {
          base[k] = bytes + off[first + k] * 4;
          bit[k] = 0;
        }
        for (int64_t i = 0; i < tile; ++i) {
          for (int k = 0; k < kWays; ++k) {
            const int32_t e = table[bits_at(base[k], bit[k]) >> shift];
            zero |= (e >> 16) == 0;
            bit[k] += e >> 16;
            emit((first + k) * tile + i, e);
          }
        }
        for (int k = 0; k < kWays; ++k)
          if (zero || bit[k] > static_cast<uint64_t>(off[first + k + 1] - off[first + k]) * 32)
            fail(first + k);
        merge_raw(first * tile, (first + kWays) * tile);
        continue;
      }
      for (int64_t t = first; t < std::min(tiles, first + kWays); ++t) {   // the ragged end
        const uint8_t* base = bytes + off[t] * 4;
        uint64_t bit = 0;
        bool ok = true;
        for (int64_t i = t * tile, end = std::min(n, (t + 1) * tile); i < end; ++i) {
          const int32_t e = table[bits_at(base, bit) >> shift];
          if ((e >> 16) == 0) {
            ok = false;
            break;
          }
          bit += e >> 16;
          emit(i, e);
        }
        if (!ok || bit > static_cast<uint64_t>(off[t + 1] - off[t]) * 32) fail(t);
        merge_raw(t * tile, std::min(n, (t + 1) * tile));
      }
    }
  });
  TORCH_CHECK(bad.load() < 0, "huff_decode: tile ", bad.load(),
              " does not decode (its bits run out or match no code: a truncated or corrupt "
              "stream)");
  return out;
}
