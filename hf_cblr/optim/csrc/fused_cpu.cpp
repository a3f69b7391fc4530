// The fused step's CPU kernels: each layer of a list in one pass over its elements (hf_cblr/optim/_cpu_kernels.py
// builds this file; hf_cblr/optim/_tensor_ops.py documents the arithmetic, which is that of its Python kernels).
//
// Every kernel takes a list of layers of one dtype (float or double), contiguous, and per layer a row of coefficients.
// A layer's elements are cut into fixed chunks of CHUNK elements, run in parallel by ATen's thread pool; the sums of
// squares are accumulated per chunk (vectorized, in the layer's dtype) and the chunks' sums added in double, in chunk
// order, so they do not depend on the thread count.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <array>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t CHUNK = 1 << 15;

// The chunk sums of `body(begin, end, sums)` over [0, n), added in chunk order.
template <int K, typename Body>
std::array<double, K> chunked_sums(int64_t n, const Body& body) {
  const int64_t chunks = (n + CHUNK - 1) / CHUNK;
  std::vector<std::array<double, K>> partial(chunks, std::array<double, K>{});
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) body(c * CHUNK, std::min(n, (c + 1) * CHUNK), partial[c]);
  });
  std::array<double, K> total{};
  for (const auto& sums : partial)
    for (int k = 0; k < K; ++k) total[k] += sums[k];
  return total;
}

// torch.lerp(m, g, w): m + w (g - m) for |w| < 0.5, else g - (1 - w)(g - m); HIGH picks the branch once per layer
// (a per-element select of the branch keeps the compiler from vectorizing the loop).
template <typename T, bool HIGH>
inline T lerp(T m, T g, T w_or_its_complement) {
  return HIGH ? g - w_or_its_complement * (g - m) : m + w_or_its_complement * (g - m);
}

// Adam's moments and the sums of squares of g, m, q = m / (sqrt(v) + eps), d = a w + b q and w (before any update);
// with UPDATE also w <- w - f d: the reduction and update passes in one, for rates known before the step's pass
// (MCLR's come from element samples).
template <typename T, bool HIGH, bool UPDATE>
void adam_range(const T* __restrict__ g, T* __restrict__ w, T* __restrict__ m, T* __restrict__ v,
                const std::array<T, 6>& c, T f, int64_t begin, int64_t end, std::array<double, 5>& sums) {
  const T weight = HIGH ? T(1) - c[0] : c[0], beta2 = c[1], one_minus_beta2 = c[2], eps = c[3], a = c[4], b = c[5];
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4)
  for (int64_t j = begin; j < end; ++j) {
    const T gj = g[j];
    const T mj = lerp<T, HIGH>(m[j], gj, weight);
    const T vj = v[j] * beta2 + gj * (gj * one_minus_beta2);
    m[j] = mj;
    v[j] = vj;
    const T q = mj / (std::sqrt(vj) + eps);
    const T wj = w[j];
    const T d = a * wj + b * q;
    if (UPDATE) w[j] = wj - f * d;
    s0 += gj * gj;
    s1 += mj * mj;
    s2 += q * q;
    s3 += d * d;
    s4 += wj * wj;
  }
  sums[0] += s0;
  sums[1] += s1;
  sums[2] += s2;
  sums[3] += s3;
  sums[4] += s4;
}

// w <- w - f (a w + b m / (sqrt(v) + eps)).
template <typename T>
void adam_update_range(T* __restrict__ w, const T* __restrict__ m, const T* __restrict__ v, T eps, T a, T b, T f,
                       int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t j = begin; j < end; ++j) {
    const T wj = w[j];
    w[j] = wj - f * (a * wj + b * (m[j] / (std::sqrt(v[j]) + eps)));
  }
}

// d = r (g + beta w), buf <- mu' buf + delta' d, s = sd d + sb buf, w <- w - lr s; the sum of squares of s.
// Without a buffer (MOMENTUM false): s = d.
template <typename T, bool MOMENTUM>
void momentum_update_range(const T* __restrict__ g, T* __restrict__ w, T* __restrict__ buffer, const std::array<T, 7>& c,
                           int64_t begin, int64_t end, std::array<double, 1>& sums) {
  const T decay = c[0], rate = c[1], lr = c[2], buffer_factor = c[3], direction_factor = c[4], step_direction = c[5],
          step_buffer = c[6];
  T s0 = 0;
#pragma omp simd reduction(+ : s0)
  for (int64_t j = begin; j < end; ++j) {
    const T direction = (g[j] + decay * w[j]) * rate;
    T step = direction;
    if (MOMENTUM) {
      const T bj = buffer[j] * buffer_factor + direction * direction_factor;
      buffer[j] = bj;
      step = step_direction * direction + step_buffer * bj;
    }
    w[j] = w[j] - lr * step;
    s0 += step * step;
  }
  sums[0] += s0;
}

template <typename T>
void squares_range(const T* __restrict__ x, int64_t begin, int64_t end, std::array<double, 1>& sums) {
  T s0 = 0;
#pragma omp simd reduction(+ : s0)
  for (int64_t j = begin; j < end; ++j) s0 += x[j] * x[j];
  sums[0] += s0;
}

// The sums of squares of p - c and of c, and p <- c.
template <typename T>
void replace_range(T* __restrict__ previous, const T* __restrict__ current, int64_t begin, int64_t end,
                   std::array<double, 2>& sums) {
  T s0 = 0, s1 = 0;
#pragma omp simd reduction(+ : s0, s1)
  for (int64_t j = begin; j < end; ++j) {
    const T cj = current[j];
    const T change = previous[j] - cj;
    previous[j] = cj;
    s0 += change * change;
    s1 += cj * cj;
  }
  sums[0] += s0;
  sums[1] += s1;
}

template <typename T, size_t N>
std::array<T, N> row(const torch::Tensor& coefficients, int64_t layer) {
  const double* values = coefficients.data_ptr<double>() + layer * coefficients.size(1);
  std::array<T, N> out{};
  for (size_t k = 0; k < N; ++k) out[k] = static_cast<T>(values[k]);
  return out;
}

// adam_range over every layer; with UPDATE, `factors` holds each layer's f (double, one per layer).
template <typename T, bool UPDATE>
torch::Tensor adam_typed(const std::vector<torch::Tensor>& grads, const std::vector<torch::Tensor>& weights,
                         const std::vector<torch::Tensor>& exp_avgs, const std::vector<torch::Tensor>& exp_avg_sqs,
                         const torch::Tensor& coefficients, const double* factors) {
  const int64_t layers = static_cast<int64_t>(grads.size());
  auto out = torch::empty({layers, 5}, torch::dtype(torch::kFloat64));
  double* o = out.data_ptr<double>();
  for (int64_t i = 0; i < layers; ++i) {
    const T* g = grads[i].data_ptr<T>();
    T* w = weights[i].data_ptr<T>();
    T* m = exp_avgs[i].data_ptr<T>();
    T* v = exp_avg_sqs[i].data_ptr<T>();
    const auto c = row<T, 6>(coefficients, i);
    const T factor = UPDATE ? static_cast<T>(factors[i]) : T(0);
    const bool high = std::abs(c[0]) >= T(0.5);
    const auto sums = chunked_sums<5>(grads[i].numel(), [&](int64_t begin, int64_t end, std::array<double, 5>& s) {
      if (high)
        adam_range<T, true, UPDATE>(g, w, m, v, c, factor, begin, end, s);
      else
        adam_range<T, false, UPDATE>(g, w, m, v, c, factor, begin, end, s);
    });
    for (int k = 0; k < 5; ++k) o[i * 5 + k] = sums[k];
  }
  return out;
}

template <typename T>
void adam_update_typed(const std::vector<torch::Tensor>& weights, const std::vector<torch::Tensor>& exp_avgs,
                       const std::vector<torch::Tensor>& exp_avg_sqs, const torch::Tensor& coefficients,
                       const torch::Tensor& factors) {
  const double* f = factors.data_ptr<double>();
  for (size_t i = 0; i < weights.size(); ++i) {
    T* w = weights[i].data_ptr<T>();
    const T* m = exp_avgs[i].data_ptr<T>();
    const T* v = exp_avg_sqs[i].data_ptr<T>();
    const auto c = row<T, 6>(coefficients, static_cast<int64_t>(i));
    const T factor = static_cast<T>(f[i]);
    at::parallel_for(0, weights[i].numel(), CHUNK, [&](int64_t begin, int64_t end) {
      adam_update_range<T>(w, m, v, c[3], c[4], c[5], factor, begin, end);
    });
  }
}

template <typename T>
torch::Tensor momentum_update_typed(const std::vector<torch::Tensor>& grads, const std::vector<torch::Tensor>& weights,
                                    const std::vector<torch::Tensor>& buffers, const torch::Tensor& coefficients) {
  const int64_t layers = static_cast<int64_t>(grads.size());
  auto out = torch::empty({layers}, torch::dtype(torch::kFloat64));
  double* o = out.data_ptr<double>();
  for (int64_t i = 0; i < layers; ++i) {
    const T* g = grads[i].data_ptr<T>();
    T* w = weights[i].data_ptr<T>();
    T* b = buffers.empty() ? nullptr : buffers[i].data_ptr<T>();
    const auto c = row<T, 7>(coefficients, i);
    o[i] = chunked_sums<1>(grads[i].numel(), [&](int64_t begin, int64_t end, std::array<double, 1>& s) {
      if (b != nullptr)
        momentum_update_range<T, true>(g, w, b, c, begin, end, s);
      else
        momentum_update_range<T, false>(g, w, b, c, begin, end, s);
    })[0];
  }
  return out;
}

// The sum of x y over [begin, end), each product and the sum in double (exact products for float elements).
template <typename T>
void fp64_dot_range(const T* __restrict__ x, const T* __restrict__ y, int64_t begin, int64_t end,
                    std::array<double, 1>& sums) {
  double s0 = 0;
#pragma omp simd reduction(+ : s0)
  for (int64_t j = begin; j < end; ++j) s0 += static_cast<double>(x[j]) * static_cast<double>(y[j]);
  sums[0] += s0;
}

template <typename T>
torch::Tensor fp64_dots_typed(const std::vector<torch::Tensor>& xs, const std::vector<torch::Tensor>& ys) {
  const int64_t layers = static_cast<int64_t>(xs.size());
  auto out = torch::empty({layers}, torch::dtype(torch::kFloat64));
  double* o = out.data_ptr<double>();
  for (int64_t i = 0; i < layers; ++i) {
    const T* x = xs[i].data_ptr<T>();
    const T* y = ys[i].data_ptr<T>();
    o[i] = chunked_sums<1>(xs[i].numel(), [&](int64_t begin, int64_t end, std::array<double, 1>& s) {
      fp64_dot_range<T>(x, y, begin, end, s);
    })[0];
  }
  return out;
}

template <typename T>
torch::Tensor sums_of_squares_typed(const std::vector<torch::Tensor>& tensors) {
  const int64_t layers = static_cast<int64_t>(tensors.size());
  auto out = torch::empty({layers}, torch::dtype(torch::kFloat64));
  double* o = out.data_ptr<double>();
  for (int64_t i = 0; i < layers; ++i) {
    const T* x = tensors[i].data_ptr<T>();
    o[i] = chunked_sums<1>(tensors[i].numel(), [&](int64_t begin, int64_t end, std::array<double, 1>& s) {
      squares_range<T>(x, begin, end, s);
    })[0];
  }
  return out;
}

template <typename T>
torch::Tensor replace_and_difference_squares_typed(const std::vector<torch::Tensor>& previous,
                                                   const std::vector<torch::Tensor>& current) {
  const int64_t layers = static_cast<int64_t>(previous.size());
  auto out = torch::empty({layers, 2}, torch::dtype(torch::kFloat64));
  double* o = out.data_ptr<double>();
  for (int64_t i = 0; i < layers; ++i) {
    T* p = previous[i].data_ptr<T>();
    const T* c = current[i].data_ptr<T>();
    const auto sums = chunked_sums<2>(previous[i].numel(), [&](int64_t begin, int64_t end, std::array<double, 2>& s) {
      replace_range<T>(p, c, begin, end, s);
    });
    o[i * 2] = sums[0];
    o[i * 2 + 1] = sums[1];
  }
  return out;
}

template <typename T>
std::vector<torch::Tensor> gather_typed(const std::vector<torch::Tensor>& tensors,
                                       const std::vector<torch::Tensor>& positions) {
  std::vector<torch::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& p : positions) out.push_back(torch::empty({p.numel()}, tensors[0].options()));
  at::parallel_for(0, static_cast<int64_t>(tensors.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const T* x = tensors[i].data_ptr<T>();
      const int64_t* p = positions[i].data_ptr<int64_t>();
      T* o = out[i].data_ptr<T>();
      const int64_t n = positions[i].numel();
      for (int64_t j = 0; j < n; ++j) o[j] = x[p[j]];
    }
  });
  return out;
}

bool is_double(const std::vector<torch::Tensor>& tensors) {
  return !tensors.empty() && tensors[0].scalar_type() == torch::kFloat64;
}

}  // namespace

torch::Tensor adam_direction(const std::vector<torch::Tensor>& grads, const std::vector<torch::Tensor>& weights,
                             const std::vector<torch::Tensor>& exp_avgs, const std::vector<torch::Tensor>& exp_avg_sqs,
                             const torch::Tensor& coefficients) {
  return is_double(grads) ? adam_typed<double, false>(grads, weights, exp_avgs, exp_avg_sqs, coefficients, nullptr)
                          : adam_typed<float, false>(grads, weights, exp_avgs, exp_avg_sqs, coefficients, nullptr);
}

torch::Tensor adam_step(const std::vector<torch::Tensor>& grads, const std::vector<torch::Tensor>& weights,
                        const std::vector<torch::Tensor>& exp_avgs, const std::vector<torch::Tensor>& exp_avg_sqs,
                        const torch::Tensor& coefficients, const torch::Tensor& factors) {
  const double* f = factors.data_ptr<double>();
  return is_double(grads) ? adam_typed<double, true>(grads, weights, exp_avgs, exp_avg_sqs, coefficients, f)
                          : adam_typed<float, true>(grads, weights, exp_avgs, exp_avg_sqs, coefficients, f);
}

void adam_update(const std::vector<torch::Tensor>& weights, const std::vector<torch::Tensor>& exp_avgs,
                 const std::vector<torch::Tensor>& exp_avg_sqs, const torch::Tensor& coefficients,
                 const torch::Tensor& factors) {
  if (is_double(weights))
    adam_update_typed<double>(weights, exp_avgs, exp_avg_sqs, coefficients, factors);
  else
    adam_update_typed<float>(weights, exp_avgs, exp_avg_sqs, coefficients, factors);
}

torch::Tensor momentum_update(const std::vector<torch::Tensor>& grads, const std::vector<torch::Tensor>& weights,
                              const std::vector<torch::Tensor>& buffers, const torch::Tensor& coefficients) {
  return is_double(grads) ? momentum_update_typed<double>(grads, weights, buffers, coefficients)
                          : momentum_update_typed<float>(grads, weights, buffers, coefficients);
}

torch::Tensor sums_of_squares(const std::vector<torch::Tensor>& tensors) {
  return is_double(tensors) ? sums_of_squares_typed<double>(tensors) : sums_of_squares_typed<float>(tensors);
}

torch::Tensor replace_and_difference_squares(const std::vector<torch::Tensor>& previous,
                                             const std::vector<torch::Tensor>& current) {
  return is_double(previous) ? replace_and_difference_squares_typed<double>(previous, current)
                             : replace_and_difference_squares_typed<float>(previous, current);
}

torch::Tensor fp64_dots(const std::vector<torch::Tensor>& xs, const std::vector<torch::Tensor>& ys) {
  return is_double(xs) ? fp64_dots_typed<double>(xs, ys) : fp64_dots_typed<float>(xs, ys);
}

std::vector<torch::Tensor> gather(const std::vector<torch::Tensor>& tensors, const std::vector<torch::Tensor>& positions) {
  for (size_t i = 0; i < positions.size(); ++i)
    TORCH_CHECK(positions[i].scalar_type() == torch::kInt64 && positions[i].is_contiguous(),
                "gather: positions must be contiguous int64");
  return is_double(tensors) ? gather_typed<double>(tensors, positions) : gather_typed<float>(tensors, positions);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("adam_direction", &adam_direction, "Adam's moments and the sums of squares of g, m, q, d, w, per layer");
  module.def("adam_step", &adam_step, "adam_direction and adam_update in one pass (the weights' sum: before the update)");
  module.def("adam_update", &adam_update, "w <- w - f (a w + b m / (sqrt(v) + eps)), per layer");
  module.def("replace_and_difference_squares", &replace_and_difference_squares,
             "the sums of squares of p - c and of c for every pair ([pairs, 2]), and p <- c");
  module.def("sums_of_squares", &sums_of_squares, "the sum of squares of every tensor, in double");
  module.def("fp64_dots", &fp64_dots, "the inner product of every pair, products and sums in double");
  module.def("gather", &gather, "every tensor's values at its flat int64 positions, the layers in parallel");
  module.def("momentum_update", &momentum_update,
             "momentum SGD's update (plain SGD with an empty buffer list) and the sum of squares of the step, per layer");
}
