// The operator schemas. Implementations register per dispatch key in cpu/ and cuda/.
#include <torch/library.h>

TORCH_LIBRARY(fastkd, m) {
  // Loss terms reduced as `reduction` says, and, when asked, the gradients of the reduced loss with
  // respect to both logits (computed in the same pass; backward only scales them).
  m.def(
      "distill_forward(Tensor student, Tensor teacher, Tensor? target, float temperature, float alpha, "
      "int ignore_index, float label_smoothing, bool scale_by_temperature_squared, str reduction, "
      "int batch_size, bool student_grad, bool teacher_grad) "
      "-> (Tensor loss, Tensor soft, Tensor hard, Tensor grad_student, Tensor grad_teacher)");
  // Per-row terms of any divergence, masked: soft_i for rows in S (soft_mask, or the rows with a target),
  // hard_i for rows with a target, and loss_i = weights[0] * soft_i + weights[1] * hard_i. When asked,
  // the gradients of sum_i loss_i with respect to both logits, multiplied by grad_scale (a power of
  // two, 1 except for float16 gradients). The caller reduces and normalises through `weights`.
  m.def(
      "distill_rows(Tensor student, Tensor teacher, Tensor? target, Tensor? soft_mask, Tensor weights, "
      "float temperature, int ignore_index, float label_smoothing, str divergence, float beta, "
      "bool student_grad, bool teacher_grad) "
      "-> (Tensor loss, Tensor soft, Tensor hard, Tensor grad_student, Tensor grad_teacher, Tensor grad_scale)");
  // grad *= grad_output in place: grad_output is a scalar, or one value per row of grad.
  // A grad_output of exactly 1 leaves grad untouched without a pass over it.
  m.def("scale_grad_(Tensor(a!) grad, Tensor grad_output) -> ()");
  // distill_rows with the teacher given as its top-k entries: indices (rows, K) int32 / int64 and
  // values (rows, K) (-inf: a padding slot); `tail` is "renormalize" or "bucket" (docs/spec.md).
  // The same weights / grad_scale contract; the teacher gets no gradient.
  m.def(
      "sparse_distill_rows(Tensor student, Tensor indices, Tensor values, Tensor? target, Tensor? soft_mask, "
      "Tensor weights, float temperature, int ignore_index, float label_smoothing, str divergence, float beta, "
      "str tail, bool student_grad) "
      "-> (Tensor loss, Tensor soft, Tensor hard, Tensor grad_student, Tensor grad_scale)");

  // The vocabulary-parallel passes over one rank's columns [vocab_start, vocab_start + local vocab) of
  // logits sharded by vocabulary (docs/spec.md, "Tensor parallel"); the caller combines the per-row
  // outputs across ranks between the calls. Statistics: (rows, 7) float64, the softmax maxima and sums
  // of both sides, the student's sum and its logit at a target on this rank. Sums: (rows, 3) float64,
  // the divergence's sums of f, qg, ph under the global frame (rows, 6). Gradients: of the local
  // columns, from the frame and the per-row coefficients (rows, 4).
  m.def(
      "vocab_parallel_stats(Tensor student, Tensor? teacher, Tensor? target, float temperature, int ignore_index, "
      "int vocab_start) -> Tensor");
  m.def(
      "vocab_parallel_sums(Tensor student, Tensor teacher, Tensor frame, float temperature, str divergence, "
      "float beta) -> Tensor");
  m.def(
      "vocab_parallel_gradients(Tensor student, Tensor teacher, Tensor? target, Tensor frame, Tensor coeffs, "
      "float temperature, int ignore_index, int vocab_start, int global_vocab, float label_smoothing, "
      "str divergence, float beta, bool student_grad, bool teacher_grad) -> (Tensor grad_student, Tensor grad_teacher)");

  // The .temperature_tensor overloads: each op with `Tensor temperature`, a 0-d floating-point CPU tensor
  // read on the host (temperature_overloads.cpp), in place of `float temperature`. torch.compile passes a
  // temperature this way: a float argument is specialised, one graph per value, a tensor is an input of
  // the graph. Reading a host value at run time makes a call unfit for CUDA-graph replay (a replay would
  // keep the captured temperature), hence the cudagraph_unsafe tag: inductor runs the op outside its
  // CUDA graphs.
  const std::vector<at::Tag> host_read{at::Tag::cudagraph_unsafe};
  m.def(
      "distill_forward.temperature_tensor(Tensor student, Tensor teacher, Tensor? target, Tensor temperature, "
      "float alpha, int ignore_index, float label_smoothing, bool scale_by_temperature_squared, str reduction, "
      "int batch_size, bool student_grad, bool teacher_grad) "
      "-> (Tensor loss, Tensor soft, Tensor hard, Tensor grad_student, Tensor grad_teacher)",
      host_read);
  m.def(
      "distill_rows.temperature_tensor(Tensor student, Tensor teacher, Tensor? target, Tensor? soft_mask, "
      "Tensor weights, Tensor temperature, int ignore_index, float label_smoothing, str divergence, float beta, "
      "bool student_grad, bool teacher_grad) "
      "-> (Tensor loss, Tensor soft, Tensor hard, Tensor grad_student, Tensor grad_teacher, Tensor grad_scale)",
      host_read);
  m.def(
      "sparse_distill_rows.temperature_tensor(Tensor student, Tensor indices, Tensor values, Tensor? target, "
      "Tensor? soft_mask, Tensor weights, Tensor temperature, int ignore_index, float label_smoothing, "
      "str divergence, float beta, str tail, bool student_grad) "
      "-> (Tensor loss, Tensor soft, Tensor hard, Tensor grad_student, Tensor grad_scale)",
      host_read);
}
