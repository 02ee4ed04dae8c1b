// prefix_attention decode (T = 1): the argument checks and argument filling shared by the CPU glue
// (prefix_attention_cpu.cpp) and the CUDA glue (prefix_attention_cuda_glue.cpp). Torch types only here,
// no CUDA headers: backend-specific checks (CUDA's head dim), the device guard and the stream stay
// in each glue file.
#pragma once
#include <torch/extension.h>

#include <cstdint>

namespace mops {
namespace paargs {

inline at::Tensor last_dim_contig(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// t (last dim contiguous) with rows that 16-byte vector loads can read: a 16-byte aligned base and
// every other stride a multiple of `ept` elements (16 bytes). A contiguous copy otherwise (a fresh
// allocation is aligned). HF's transposed [B, S, H, D] caches and pool slices already qualify.
inline at::Tensor vec16_rows(const at::Tensor& t, int64_t ept) {
  auto ok = [ept](const at::Tensor& x) {
    if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0 || x.size(-1) % ept != 0) return false;
    for (int64_t d = 0; d + 1 < x.dim(); ++d)
      if (x.size(d) > 1 && x.stride(d) % ept != 0) return false;
    return true;
  };
  if (t.numel() == 0 || ok(t)) return t;
  at::Tensor c = t.contiguous();
  return ok(c) ? c : c.clone();
}

// True when every value of the contiguous int32 tensor t lies in [lo, hi] (a host loop on the
// CPU: no reductions and host reads through aten per call).
inline bool values_within(const at::Tensor& t, int64_t lo, int64_t hi) {
  if (!t.device().is_cpu()) return t.min().item<int64_t>() >= lo && t.max().item<int64_t>() <= hi;
  const int32_t* p = t.data_ptr<int32_t>();
  for (int64_t i = 0, n = t.numel(); i < n; ++i)
    if (p[i] < lo || p[i] > hi) return false;
  return true;
}

// An int64 CPU mask [B, S] (any strides) as contiguous uint8 0/1, in one pass.
inline at::Tensor mask_bytes_cpu(const at::Tensor& m) {
  const int64_t B = m.size(0), S = m.size(1), s0 = m.stride(0), s1 = m.stride(1);
  at::Tensor out = at::empty({B, S}, m.options().dtype(at::kByte));
  const int64_t* src = m.data_ptr<int64_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) dst[b * S + s] = src[b * s0 + s * s1] != 0;
  return out;
}

// The checked, normalised arguments: q, k, v, pk, pv have a contiguous last dimension; idx is int32
// [B, kk], w fp32 [B, kk], lens int32 [E], mask uint8 [B, S], all contiguous and on q's device.
// pk, pv, idx, w, lens and mask are undefined when not given (pk, pv, idx: without prefixes).
struct Inputs {
  at::Tensor q, k, v, pk, pv, idx, w, lens, mask;
  int64_t B = 0, Hq = 0, Hkv = 0, S = 0, D = 0;
  int64_t E = 0, P = 0, kk = 0;  // 0 without prefixes
  bool has_prefix = false;
};

// t on `device` as a contiguous tensor of `dtype`: t itself when it already is one (no aten call).
inline at::Tensor as_contiguous(const at::Tensor& t, at::Device device, at::ScalarType dtype) {
  return t.device() == device && t.scalar_type() == dtype && t.is_contiguous() ? t : t.to(device, dtype).contiguous();
}

// The prefix pool, index, weights and lens of a call whose in.B, in.Hkv and in.D are set, checked
// and normalised into `in` (pool of `dtype` on `device`); see check_prefix_attention_args.
inline void check_prefix_pool(const char* op, Inputs& in, at::ScalarType dtype, at::Device device,
                              const c10::optional<at::Tensor>& prefix_k, const c10::optional<at::Tensor>& prefix_v,
                              const c10::optional<at::Tensor>& prefix_index,
                              const c10::optional<at::Tensor>& prefix_weight,
                              const c10::optional<at::Tensor>& prefix_lens, bool check_values) {
  in.has_prefix = prefix_k.has_value() && prefix_index.has_value();
  if (in.has_prefix) {
    TORCH_CHECK(prefix_v.has_value(), op, ": prefix_v is required with prefix_k");
    in.pk = last_dim_contig(*prefix_k);
    in.pv = last_dim_contig(*prefix_v);
    TORCH_CHECK(in.pk.dim() == 4 && in.pk.size(2) == in.Hkv && in.pk.size(3) == in.D &&
                    in.pv.sizes() == in.pk.sizes(),
                op, ": prefix_k/prefix_v must have shape (E, P, Hkv, D)");
    TORCH_CHECK(in.pk.scalar_type() == dtype && in.pv.scalar_type() == dtype &&
                    in.pk.device() == device && in.pv.device() == device,
                op, ": prefix_k/prefix_v must have q's dtype and device");
    in.E = in.pk.size(0);
    in.P = in.pk.size(1);
    in.idx = as_contiguous(*prefix_index, device, at::kInt);
    TORCH_CHECK(in.idx.dim() == 2 && in.idx.size(0) == in.B, op, ": prefix_index must have shape (B, kk)");
    in.kk = in.idx.size(1);
    if (check_values && in.idx.numel())
      TORCH_CHECK(values_within(in.idx, -1, in.E - 1), op, ": prefix_index values must lie in [-1, E)");
    if (prefix_weight.has_value()) {
      in.w = as_contiguous(*prefix_weight, device, at::kFloat);
      TORCH_CHECK(in.w.sizes() == in.idx.sizes(), op, ": prefix_weight must have shape (B, kk)");
    }
    if (prefix_lens.has_value()) {
      in.lens = as_contiguous(*prefix_lens, device, at::kInt);
      TORCH_CHECK(in.lens.dim() == 1 && in.lens.size(0) == in.E, op, ": prefix_lens must have shape (E,)");
      if (check_values && in.E)
        TORCH_CHECK(values_within(in.lens, 0, in.P), op, ": prefix_lens values must lie in [0, P]");
    }
  }
}

// Checks shapes, dtypes and devices (q, k, v, and the prefix pool, on one device of type
// `device_type`), each message prefixed by `op`, and returns the normalised arguments.
// check_values: also check the prefix_index values lie in [-1, E) and the prefix_lens values in
// [0, P] (reads them back: the CPU glue does, the CUDA glue leaves it to the Python dispatcher).
inline Inputs check_prefix_attention_args(const char* op, const at::Tensor& q_in, const at::Tensor& k_in,
                                          const at::Tensor& v_in, const c10::optional<at::Tensor>& prefix_k,
                                          const c10::optional<at::Tensor>& prefix_v,
                                          const c10::optional<at::Tensor>& prefix_index,
                                          const c10::optional<at::Tensor>& prefix_weight,
                                          const c10::optional<at::Tensor>& prefix_lens,
                                          const c10::optional<at::Tensor>& attention_mask,
                                          at::DeviceType device_type, bool check_values) {
  TORCH_CHECK(q_in.device().type() == device_type && k_in.device().type() == device_type &&
                  v_in.device().type() == device_type,
              op, ": q, k, v must be ", c10::DeviceTypeName(device_type), " tensors");
  TORCH_CHECK(q_in.dim() == 4 && q_in.size(2) == 1, op, ": q must have shape (B, Hq, 1, D)");
  Inputs in;
  in.B = q_in.size(0);
  in.Hq = q_in.size(1);
  in.D = q_in.size(3);
  TORCH_CHECK(k_in.dim() == 4 && k_in.size(0) == in.B && k_in.size(3) == in.D,
              op, ": k must have shape (B, Hkv, S, D)");
  TORCH_CHECK(v_in.sizes() == k_in.sizes(), op, ": v must have k's shape (B, Hkv, S, D)");
  in.Hkv = k_in.size(1);
  in.S = k_in.size(2);
  TORCH_CHECK(in.Hkv > 0 && in.Hq % in.Hkv == 0, op, ": Hq must be a multiple of Hkv");
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(),
              op, ": k and v must have q's dtype");
  TORCH_CHECK(k_in.device() == q_in.device() && v_in.device() == q_in.device(),
              op, ": k and v must be on q's device");
  const at::Device device = q_in.device();
  in.q = last_dim_contig(q_in);
  in.k = last_dim_contig(k_in);
  in.v = last_dim_contig(v_in);

  check_prefix_pool(op, in, in.q.scalar_type(), device, prefix_k, prefix_v, prefix_index, prefix_weight,
                    prefix_lens, check_values);
  if (attention_mask.has_value()) {
    const at::Tensor& m = *attention_mask;
    TORCH_CHECK(m.dim() == 2 && m.size(0) == in.B && m.size(1) == in.S, op, ": attention_mask must have shape (B, S)");
    in.mask = device.is_cpu() && m.device().is_cpu() && m.scalar_type() == at::kLong ? mask_bytes_cpu(m)
                                                                                     : m.to(device).ne(0).to(at::kByte).contiguous();
  }
  return in;
}

// Fills the fields that pacpu::DecodeArgs<T> and pacuda::DecodeArgs<T> share: the q/k/v/pk/pv
// pointers and strides, idx, w, lens, kk, mask, out and its strides, Hkv, S, P and scale. Each glue
// fills its own remaining fields (CPU: G, D; CUDA: Hq, the split buffers, chunk, n_split).
template <template <typename> class ArgsT, typename T>
inline void fill_common_args(ArgsT<T>& a, const Inputs& in, const at::Tensor& out, double scale) {
  // void* casts: the CPU kernel takes at::Half / at::BFloat16, the CUDA kernel __half / __nv_bfloat16
  a.q = static_cast<const T*>(in.q.data_ptr()); a.sqb = in.q.stride(0); a.sqh = in.q.stride(1);
  a.k = static_cast<const T*>(in.k.data_ptr()); a.skb = in.k.stride(0); a.skh = in.k.stride(1); a.sks = in.k.stride(2);
  a.v = static_cast<const T*>(in.v.data_ptr()); a.svb = in.v.stride(0); a.svh = in.v.stride(1); a.svs = in.v.stride(2);
  if (in.has_prefix) {
    a.pk = static_cast<const T*>(in.pk.data_ptr()); a.spke = in.pk.stride(0); a.spkp = in.pk.stride(1); a.spkh = in.pk.stride(2);
    a.pv = static_cast<const T*>(in.pv.data_ptr()); a.spve = in.pv.stride(0); a.spvp = in.pv.stride(1); a.spvh = in.pv.stride(2);
    a.idx = in.idx.data_ptr<int32_t>();
    a.w = in.w.defined() ? in.w.data_ptr<float>() : nullptr;
    a.lens = in.lens.defined() ? in.lens.data_ptr<int32_t>() : nullptr;
  }
  a.kk = in.kk;
  a.mask = in.mask.defined() ? in.mask.data_ptr<uint8_t>() : nullptr;
  a.out = static_cast<T*>(out.data_ptr()); a.sob = out.stride(0); a.soh = out.stride(1);
  a.Hkv = in.Hkv; a.S = in.S; a.P = in.P;
  a.scale = static_cast<float>(scale);
}

}  // namespace paargs
}  // namespace mops
