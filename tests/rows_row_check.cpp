// Host run of the CUDA kernel of fastkd::distill_rows (csrc/cuda/rows_kernel.cu): the same steps of
// csrc/rows_row.h in the same order, 256 simulated threads per row, their shares merged in the tree
// order of csrc/cuda/block_reduce.cuh (a shuffle-down tree per warp of 32, then the warps in order).
// CI has no GPU: tests/test_rows_row.py compiles this with the system C++ compiler, feeds it rows and
// compares what it returns with the float64 reference, at the tolerances of the CUDA suite.
//
// Input (binary, native endian): int64 rows, vocab, float64 (0: float element math, 1: double),
// divergence, fp16_student, fp16_teacher, has_target, has_mask; float64 beta, one_minus_beta, inv_t,
// eps, w_soft, w_hard; then rows * vocab student logits, rows * vocab teacher logits (float64, already
// rounded to the logits' dtype), rows targets and rows mask values (float64, when present).
// Output (float64): per row loss, soft, hard, student pre-scale, teacher pre-scale; then the student and
// the teacher gradients (rows * vocab each, pre-scaled, before the narrowing to the logits' dtype).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "rows_row.h"
#include "sparse_row.h"  // ScalarMath

using namespace fastkd;

constexpr int kThreads = 256;
constexpr int kLanes = 32;

// block_reduce's order: lane l merges lane l + o for o = 16, 8, 4, 2, 1 (a lane past the warp gets
// its own value back), lane 0 holds the warp's; then warp 0's merges warps 1, 2, ... in order.
template <class T, class Merge>
T block_reduce(std::vector<T> v, Merge merge) {
  std::vector<T> warps;
  for (int w = 0; w < kThreads / kLanes; ++w) {
    std::vector<T> lane(v.begin() + w * kLanes, v.begin() + (w + 1) * kLanes);
    for (int o = 16; o > 0; o >>= 1) {
      std::vector<T> next = lane;
      for (int l = 0; l < kLanes; ++l) merge(next[l], l + o < kLanes ? lane[l + o] : lane[l]);
      lane = next;
    }
    warps.push_back(lane[0]);
  }
  T total = warps[0];
  for (size_t w = 1; w < warps.size(); ++w) merge(total, warps[w]);
  return total;
}

struct Call {
  int64_t rows, vocab, float64, divergence, fp16_student, fp16_teacher, has_target, has_mask;
  double beta, one_minus_beta, inv_t, eps, w_soft, w_hard;
  std::vector<double> s, t, target, mask;
};

struct RowOut {
  double loss = 0, soft = 0, hard = 0, prescale_s = 1, prescale_t = 1;
};

template <class acc_t, Divergence kKind>
RowOut run_row(const Call& c, int64_t row, double* gs, double* gt) {
  using M = ScalarMath<acc_t>;
  const int64_t V = c.vocab;
  const double* srow = c.s.data() + row * V;
  const double* trow = c.t.data() + row * V;
  const auto s = [srow](int64_t j) { return acc_t(srow[j]); };
  const auto t = [trow](int64_t j) { return acc_t(trow[j]); };
  const int64_t y = c.has_target ? int64_t(c.target[row]) : -1;
  const bool hard_row = c.has_target && y != -100;
  const bool soft_row = c.has_mask ? c.mask[row] != 0 : (!c.has_target || hard_row);
  RowOut out;
  if (!soft_row && !hard_row) {
    for (int64_t j = 0; j < V; ++j) gs[j] = gt[j] = 0;
    return out;
  }
  std::vector<RowShare> shares;
  for (int i = 0; i < kThreads; ++i) {
    shares.push_back(gather_row_share<acc_t, M>(s, t, i, kThreads, V, acc_t(c.inv_t), hard_row));
  }
  const double inv_t = c.inv_t;
  const RowShare share = block_reduce(shares, [inv_t](RowShare& x, const RowShare& o) { x.merge(o, inv_t); });
  const RowFrame<acc_t> frame =
      row_frame<acc_t>(share, inv_t, DivergenceParams{Divergence(c.divergence), c.beta, c.one_minus_beta});
  std::vector<DivergenceShare> parts;
  for (int i = 0; i < kThreads; ++i) parts.push_back(gather_divergence_share<kKind, acc_t, M>(s, t, frame, i, kThreads, V));
  const DivergenceShare sums = block_reduce(parts, [](DivergenceShare& x, const DivergenceShare& o) { x.merge(o); });
  out.soft = soft_row ? sums.f : 0.0;
  out.hard = hard_row ? row_cross_entropy(share, double(s(y)), V, c.eps) : 0.0;
  out.loss = c.w_soft * out.soft + c.w_hard * out.hard;
  const GradientCoeffs k = gradient_coeffs(sums, 1.0 / share.t.s, 1.0 / share.b.s, c.w_soft, c.w_hard, inv_t,
                                           soft_row, hard_row, c.fp16_student != 0, c.fp16_teacher != 0);
  out.prescale_s = k.prescale_student;
  out.prescale_t = k.prescale_teacher;
  const acc_t eps_v = acc_t(c.eps / double(V)), y_coef = acc_t(1.0 - c.eps);
  for (int64_t j = 0; j < V; ++j) {
    gs[j] = double(student_grad<kKind, acc_t, M>(frame, s(j), t(j), acc_t(k.cs_student), acc_t(k.ch_student),
                                                 acc_t(sums.qg), hard_row ? eps_v : acc_t(0),
                                                 j == y ? y_coef : acc_t(0)));
    gt[j] = double(teacher_grad<kKind, acc_t, M>(frame, s(j), t(j), acc_t(k.cs_teacher), acc_t(sums.ph)));
  }
  return out;
}

template <class acc_t>
RowOut run_row(const Call& c, int64_t row, double* gs, double* gt) {
  switch (Divergence(c.divergence)) {
    case Divergence::ReverseKL: return run_row<acc_t, Divergence::ReverseKL>(c, row, gs, gt);
    case Divergence::JSD: return run_row<acc_t, Divergence::JSD>(c, row, gs, gt);
    case Divergence::TVD: return run_row<acc_t, Divergence::TVD>(c, row, gs, gt);
    case Divergence::SkewForwardKL: return run_row<acc_t, Divergence::SkewForwardKL>(c, row, gs, gt);
    case Divergence::SkewReverseKL: return run_row<acc_t, Divergence::SkewReverseKL>(c, row, gs, gt);
    default: return run_row<acc_t, Divergence::ForwardKL>(c, row, gs, gt);
  }
}

template <class T>
bool read(FILE* f, T* out, size_t n) {
  return std::fread(out, sizeof(T), n, f) == n;
}

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: rows_row_check INPUT OUTPUT\n");
    return 2;
  }
  FILE* in = std::fopen(argv[1], "rb");
  if (in == nullptr) return 2;
  Call c;
  int64_t ints[8];
  double reals[6];
  if (!read(in, ints, 8) || !read(in, reals, 6)) return 2;
  c.rows = ints[0], c.vocab = ints[1], c.float64 = ints[2], c.divergence = ints[3];
  c.fp16_student = ints[4], c.fp16_teacher = ints[5], c.has_target = ints[6], c.has_mask = ints[7];
  c.beta = reals[0], c.one_minus_beta = reals[1], c.inv_t = reals[2], c.eps = reals[3];
  c.w_soft = reals[4], c.w_hard = reals[5];
  const size_t n = size_t(c.rows * c.vocab);
  c.s.resize(n);
  c.t.resize(n);
  if (!read(in, c.s.data(), n) || !read(in, c.t.data(), n)) return 2;
  if (c.has_target) {
    c.target.resize(size_t(c.rows));
    if (!read(in, c.target.data(), c.target.size())) return 2;
  }
  if (c.has_mask) {
    c.mask.resize(size_t(c.rows));
    if (!read(in, c.mask.data(), c.mask.size())) return 2;
  }
  std::fclose(in);

  std::vector<double> rows_out(size_t(c.rows) * 5), gs(n), gt(n);
  for (int64_t r = 0; r < c.rows; ++r) {
    double* gs_row = gs.data() + r * c.vocab;
    double* gt_row = gt.data() + r * c.vocab;
    const RowOut o = c.float64 ? run_row<double>(c, r, gs_row, gt_row) : run_row<float>(c, r, gs_row, gt_row);
    const double vals[5] = {o.loss, o.soft, o.hard, o.prescale_s, o.prescale_t};
    for (int i = 0; i < 5; ++i) rows_out[size_t(r) * 5 + i] = vals[i];
  }
  FILE* out = std::fopen(argv[2], "wb");
  if (out == nullptr) return 2;
  std::fwrite(rows_out.data(), sizeof(double), rows_out.size(), out);
  std::fwrite(gs.data(), sizeof(double), n, out);
  std::fwrite(gt.data(), sizeof(double), n, out);
  std::fclose(out);
  return 0;
}
