// The CUDA decode kernel's decomposition run on the host, for the CPU tests (no GPU here):
//   prefix_attention_cuda_emulate(q, k, v, prefix_k, prefix_v, prefix_index, prefix_weight,
//                                 prefix_lens, attention_mask, causal, scale, num_sms) -> out
//   prefix_attention_cuda_plan(B, Hq, Hkv, S, D, elt, has_prefix, num_sms) -> dict (the launch plan)
// Same arguments and checks as prefix_attention_cuda (CPU tensors). It walks the kernel's own
// structure with the kernel's own helpers (prefix_attention_decode_math.h): the launch plan (CTAs
// per (b, kv head, head chunk), splits of `chunk` keys, the packed prefix split in passes of
// kPackTile), the key groups of each warp with their tiles of kUnroll keys and one online-softmax
// rescale per tile (online_tile), keys past the chunk end and padding at -inf, the butterfly merge
// of a warp's key groups, the warps' merge, and the split merge (merge_coef, finish). What it does
// not reproduce is the lane-level arithmetic order (a row's dot product as a shuffle tree) and the
// GPU's ex2.approx, which change rounding only.
#include <torch/extension.h>

#include <vector>

#include "ops.h"
#include "prefix_attention_args.h"
#include "prefix_attention_decode_math.h"

namespace mops {
namespace {

using pamath::kUnroll;
using pamath::kWarps;

struct State {
  std::vector<float> m, l, acc;  // [GT], [GT], [GT * D]
};

template <typename T, int D>
void emulate_cta(const paargs::Inputs& in, const pamath::Plan& pl, float qscale, int64_t bx, int64_t split,
                 std::vector<float>& part_acc, std::vector<float>& part_m, std::vector<float>& part_l) {
  const int64_t elt = sizeof(T);
  const int EPT = static_cast<int>(16 / elt), LPK = D / EPT, KPW = 32 / LPK, NG = kWarps * KPW;
  const int TILE = NG * kUnroll;
  const int64_t G = in.Hq / in.Hkv, GT = pl.gt;
  const int64_t gchunk = bx % pl.n_gchunk, bk = bx / pl.n_gchunk;
  const int64_t b = bk / in.Hkv, hkv = bk % in.Hkv, g0 = gchunk * GT;
  const int64_t n_here = std::min<int64_t>(GT, G - g0);
  const T* q = static_cast<const T*>(in.q.data_ptr());
  std::vector<float> qf(GT * D, 0.f);
  for (int64_t g = 0; g < n_here; ++g)
    for (int d = 0; d < D; ++d)
      qf[g * D + d] = static_cast<float>(q[b * in.q.stride(0) + (hkv * G + g0 + g) * in.q.stride(1) + d]) * qscale;

  std::vector<State> st(NG);
  for (auto& s : st) { s.m.assign(GT, pamath::neg_inf()); s.l.assign(GT, 0.f); s.acc.assign(GT * D, 0.f); }

  // one tile of key group vg: rows kr[u]/vr[u] (nullptr: not loaded), ok[u], bias[u]
  auto tile = [&](int vg, const T* const* kr, const T* const* vr, const bool* ok, const float* bias) {
    float vf[kUnroll][D];
    float kf[kUnroll][D];
    for (int u = 0; u < kUnroll; ++u)
      for (int d = 0; d < D; ++d) {
        kf[u][d] = kr[u] ? static_cast<float>(kr[u][d]) : 0.f;
        vf[u][d] = vr[u] ? static_cast<float>(vr[u][d]) : 0.f;
      }
    for (int64_t g = 0; g < GT; ++g) {
      float sg[kUnroll];
      for (int u = 0; u < kUnroll; ++u) {
        float dot = 0.f;
        for (int d = 0; d < D; ++d) dot += qf[g * D + d] * kf[u][d];
        sg[u] = ok[u] ? dot + bias[u] : pamath::neg_inf();
      }
      float (&acc)[D] = *reinterpret_cast<float(*)[D]>(&st[vg].acc[g * D]);
      pamath::online_tile<kUnroll, D>(st[vg].m[g], st[vg].l[g], acc, sg, vf);
    }
  };

  if (in.has_prefix && split == 0) {
    const int kk = static_cast<int>(in.kk);
    int32_t slot[pamath::kMaxSlots], start[pamath::kMaxSlots + 1];
    float bj[pamath::kMaxSlots];
    const int total = pamath::pack_prefix_slots(
        in.idx.data_ptr<int32_t>() + b * kk, in.w.defined() ? in.w.data_ptr<float>() + b * kk : nullptr,
        in.lens.defined() ? in.lens.data_ptr<int32_t>() : nullptr, kk, static_cast<int>(in.P), slot, bj, start);
    const T* pk = static_cast<const T*>(in.pk.data_ptr());
    const T* pv = static_cast<const T*>(in.pv.data_ptr());
    for (int pass = 0; pass < total; pass += pamath::kPackTile) {
      const int cnt = std::min(total - pass, pamath::kPackTile);
      for (int base = 0; base < cnt; base += TILE)
        for (int vg = 0; vg < NG; ++vg) {
          const T* kr[kUnroll]; const T* vr[kUnroll]; bool ok[kUnroll]; float bias[kUnroll];
          for (int u = 0; u < kUnroll; ++u) {
            const int n = base + u * NG + vg;
            ok[u] = n < cnt;
            kr[u] = vr[u] = nullptr;
            bias[u] = 0.f;
            if (ok[u]) {
              const pamath::PackedToken pt = pamath::packed_token(pass + n, start, kk);
              kr[u] = pk + slot[pt.j] * in.pk.stride(0) + pt.p * in.pk.stride(1) + hkv * in.pk.stride(2);
              vr[u] = pv + slot[pt.j] * in.pv.stride(0) + pt.p * in.pv.stride(1) + hkv * in.pv.stride(2);
              bias[u] = bj[pt.j];
            }
          }
          tile(vg, kr, vr, ok, bias);
        }
    }
  } else {
    const int64_t c = split - (in.has_prefix ? 1 : 0);
    const int64_t lo = c * pl.chunk, hi = std::min(lo + pl.chunk, in.S);
    const T* kb = static_cast<const T*>(in.k.data_ptr()) + b * in.k.stride(0) + hkv * in.k.stride(1);
    const T* vb = static_cast<const T*>(in.v.data_ptr()) + b * in.v.stride(0) + hkv * in.v.stride(1);
    const uint8_t* mask = in.mask.defined() ? in.mask.data_ptr<uint8_t>() + b * in.S : nullptr;
    const float nob[kUnroll] = {};
    for (int64_t base = lo; base < hi; base += TILE)
      for (int vg = 0; vg < NG; ++vg) {
        const T* kr[kUnroll]; const T* vr[kUnroll]; bool ok[kUnroll];
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t n = base + u * NG + vg;
          const bool inr = n < hi;  // past hi: the kernel loads row lo, logit -inf
          kr[u] = kb + (inr ? n : lo) * in.k.stride(2);
          vr[u] = vb + (inr ? n : lo) * in.v.stride(2);
          ok[u] = inr && (mask == nullptr || mask[n] != 0);
        }
        tile(vg, kr, vr, ok, nob);
      }
  }

  // the warp's butterfly over its key groups (xor of the group index), then the warps in order
  auto merge = [&](State& a, const State& o) {
    for (int64_t g = 0; g < GT; ++g) {
      const pamath::MergeCoef c = pamath::merge_coef(a.m[g], o.m[g]);
      a.l[g] = c.ca * a.l[g] + c.cb * o.l[g];
      for (int d = 0; d < D; ++d) a.acc[g * D + d] = c.ca * a.acc[g * D + d] + c.cb * o.acc[g * D + d];
      a.m[g] = c.m;
    }
  };
  std::vector<State> warp(kWarps);
  for (int w = 0; w < kWarps; ++w) {
    std::vector<State> grp(st.begin() + w * KPW, st.begin() + (w + 1) * KPW);
    for (int o = 1; o < KPW; o <<= 1) {
      std::vector<State> next = grp;
      for (int i = 0; i < KPW; ++i) merge(next[i], grp[i ^ o]);
      grp.swap(next);
    }
    warp[w] = grp[0];
  }
  State cta = warp[0];
  for (int w = 1; w < kWarps; ++w) merge(cta, warp[w]);
  for (int64_t g = 0; g < n_here; ++g) {
    const int64_t row = (b * in.Hq + hkv * G + g0 + g) * pl.n_split + split;
    for (int d = 0; d < D; ++d) part_acc[row * D + d] = cta.acc[g * D + d];
    part_m[row] = cta.m[g];
    part_l[row] = cta.l[g];
  }
}

}  // namespace

at::Tensor prefix_attention_cuda_emulate(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                         const c10::optional<at::Tensor>& prefix_k,
                                         const c10::optional<at::Tensor>& prefix_v,
                                         const c10::optional<at::Tensor>& prefix_index,
                                         const c10::optional<at::Tensor>& prefix_weight,
                                         const c10::optional<at::Tensor>& prefix_lens,
                                         const c10::optional<at::Tensor>& attention_mask, bool causal,
                                         double scale, int64_t num_sms) {
  (void)causal;
  const paargs::Inputs in = paargs::check_prefix_attention_args(
      "prefix_attention_cuda_emulate", q_in, k_in, v_in, prefix_k, prefix_v, prefix_index, prefix_weight,
      prefix_lens, attention_mask, at::kCPU, /*check_values=*/true);
  const int64_t B = in.B, Hq = in.Hq, D = in.D;
  TORCH_CHECK(D == 64 || D == 128, "prefix_attention_cuda_emulate: head dim D must be 64 or 128, got ", D);
  TORCH_CHECK(in.q.scalar_type() == at::kFloat || in.q.scalar_type() == at::kHalf ||
                  in.q.scalar_type() == at::kBFloat16,
              "prefix_attention_cuda_emulate: q must be float32, float16 or bfloat16, got ", in.q.scalar_type());
  TORCH_CHECK(in.kk <= pamath::kMaxSlots, "prefix_attention_cuda_emulate: prefix_index may select at most ",
              pamath::kMaxSlots, " slots per request (kk), got ", in.kk);
  const pamath::Plan pl = pamath::make_plan(B, Hq, in.Hkv, in.S, D, in.q.element_size(), in.has_prefix, num_sms);
  TORCH_CHECK(pl.ok, "prefix_attention_cuda_emulate: the launch grid overflows");
  at::Tensor out = at::empty({B, Hq, 1, D}, in.q.options());
  std::vector<float> part_acc(B * Hq * pl.n_split * D), part_m(B * Hq * pl.n_split), part_l(B * Hq * pl.n_split);
  const float qscale = static_cast<float>(scale) * pamath::kLog2e;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q.scalar_type(), "prefix_attention_cuda_emulate", [&] {
    for (int64_t bx = 0; bx < pl.grid1_x; ++bx)
      for (int64_t split = 0; split < pl.grid1_y; ++split) {
        if (D == 64) emulate_cta<scalar_t, 64>(in, pl, qscale, bx, split, part_acc, part_m, part_l);
        else emulate_cta<scalar_t, 128>(in, pl, qscale, bx, split, part_acc, part_m, part_l);
      }
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t bh = 0; bh < B * Hq; ++bh)  // the merge kernel: one (b, head) per CTA, d per thread
      for (int64_t d = 0; d < D; ++d) {
        float M = pamath::neg_inf(), L = 0.f, A = 0.f;
        for (int64_t i = 0; i < pl.n_split; ++i) {
          const int64_t row = bh * pl.n_split + i;
          const pamath::MergeCoef c = pamath::merge_coef(M, part_m[row]);
          L = c.ca * L + c.cb * part_l[row];
          A = c.ca * A + c.cb * part_acc[row * D + d];
          M = c.m;
        }
        o[(bh / Hq) * out.stride(0) + (bh % Hq) * out.stride(1) + d] = static_cast<scalar_t>(pamath::finish(A, L));
      }
  });
  return out;
}

pybind11::dict prefix_attention_cuda_plan(int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D, int64_t elt,
                                          bool has_prefix, int64_t num_sms) {
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "prefix_attention_cuda_plan: Hq must be a multiple of Hkv");
  TORCH_CHECK(elt == 2 || elt == 4, "prefix_attention_cuda_plan: elt must be 2 or 4 bytes");
  const pamath::Plan pl = pamath::make_plan(B, Hq, Hkv, S, D, elt, has_prefix, num_sms);
  pybind11::dict d;
  d["heads_per_cta"] = pl.gt; d["n_gchunk"] = pl.n_gchunk; d["chunk"] = pl.chunk; d["tile"] = pl.tile;
  d["n_split"] = pl.n_split; d["grid1"] = pybind11::make_tuple(pl.grid1_x, pl.grid1_y);
  d["grid2"] = pl.grid2_x; d["ok"] = pl.ok;
  return d;
}

}  // namespace mops
