// Operator schemas for torch.ops.contrastive_kernels; each backend registers
// its kernels for its dispatch key (csrc/cpu/, csrc/cuda/). Python-free, so the
// CMake build can produce a plain shared library loadable by torch.ops.load_library.
#include <torch/library.h>

// The options are arguments (contrastive_kernels/options.py decides them): deterministic
// (no float atomics), tf32 (fp32 inputs may use TF32 tensor cores), and poison, which the
// test suite sets: outputs and scratch start as NaN, so an unwritten entry shows.
TORCH_LIBRARY(contrastive_kernels, m) {
  // lse_rows (N,), lse_cols (M,) or (0,) when !cols, of S = scale * q k^T.
  m.def("lse_forward(Tensor q, Tensor k, float scale, bool self_mask, bool cols, "
        "bool deterministic=False, bool tf32=False, bool poison=False) -> (Tensor, Tensor)");
  // dq_raw = dS k, dk_raw = dS^T q with dS_ij = g_r[i] P_ij + g_c[j] Pc_ij; g_c may be empty.
  // A gradient not needed (need_dq / need_dk false) is not computed and comes back empty.
  m.def("lse_backward(Tensor q, Tensor k, float scale, bool self_mask, Tensor lse_r, Tensor lse_c, "
        "Tensor g_r, Tensor g_c, bool need_dq=True, bool need_dk=True, bool deterministic=False, "
        "bool tf32=False, bool poison=False) -> (Tensor, Tensor)");
  // The same with a positive shift (margin, decoupled): S_ij += delta[i] where
  // rid[i] == cid[j] (int32 ids; rid < 0: no positive; all three empty: no shift), delta
  // -inf leaves the entry out; the backward's third output is dshift[i] = sum_j
  // [rid[i] == cid[j]] dS_ij (empty unless need_dshift). With product operands pq (N x D'),
  // pk (M x D') (empty: q and k) the backward gives dS pk and dS^T pq (the teacher's
  // passes). CPU only.
  m.def("lse_forward_ext(Tensor q, Tensor k, float scale, bool self_mask, bool cols, "
        "Tensor rid, Tensor cid, Tensor delta, bool deterministic=False, bool tf32=False, "
        "bool poison=False) -> (Tensor, Tensor)");
  m.def("lse_backward_ext(Tensor q, Tensor k, float scale, bool self_mask, Tensor lse_r, "
        "Tensor lse_c, Tensor g_r, Tensor g_c, Tensor rid, Tensor cid, Tensor delta, "
        "Tensor pq, Tensor pk, bool need_dq=True, bool need_dk=True, bool need_dshift=True, "
        "bool deterministic=False, bool tf32=False, bool poison=False) "
        "-> (Tensor, Tensor, Tensor)");
  // The sigmoid loss, z = scale * q k^T + bias, y_ij = +1 where rid[i] == cid[j] (int32
  // ids, (N,) and (M,); rid < 0: no positive), else -1: r[i] = sum_j softplus(-y_ij z_ij)
  // (the row's loss, each positive's term computed as such) and t[i] = sum_j dz_ij with
  // dz_ij = sigmoid(z_ij) - [y_ij = 1] (empty unless sums); dq_raw = dS k, dk_raw = dS^T q
  // with dS_ij = g_r[i] dz_ij (g_r empty: 1), empty unless needed.
  m.def("siglip_tiles(Tensor q, Tensor k, float scale, float bias, Tensor g_r, Tensor rid, "
        "Tensor cid, bool sums, bool need_dq, bool need_dk, bool deterministic=False, "
        "bool tf32=False, bool poison=False) -> (Tensor, Tensor, Tensor, Tensor)");
  // The small-problem path (contrastive_kernels/dense.py), on a materialized S (N x M,
  // float32/64, contiguous; -inf for a masked entry): the row log-sum-exps (N,) and, with
  // cols, the columns' (M,), else (0,). CPU only.
  m.def("dense_lse(Tensor s, bool cols, bool poison=False) -> (Tensor, Tensor)");
  // scale * dS, dS_ij = g_r[i] exp(S_ij - lse_r[i]) + g_c[j] exp(S_ij - lse_c[j]) (g_c
  // empty: rows only), a new N x M tensor; self_mask: its diagonal 0. CPU only.
  m.def("dense_grad(Tensor s, Tensor lse_r, Tensor g_r, Tensor lse_c, Tensor g_c, "
        "float scale, bool self_mask, bool poison=False) -> Tensor");
  // The sigmoid loss on a materialized s (N x M, float32/64, contiguous), z = s + bias,
  // positives where rid[i] == cid[j] (as siglip_tiles): s <- dz = sigmoid(z) - [positive]
  // in place, and the rows' losses sum_j softplus(-y_ij z_ij) and sums of dz, (N,) each.
  // CPU only.
  m.def("dense_siglip(Tensor(a!) s, float bias, Tensor rid, Tensor cid, bool poison=False) "
        "-> (Tensor, Tensor)");
}
