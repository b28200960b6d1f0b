// syncbn._cpp_node: the training layer as a C++ autograd node (see
// syncbn/_cpp_node_loader.py, which loads it).
//
// A layer whose communicator has one process computes its statistics and
// normalizes in one kernel call per pass (local_forward, local_backward); a
// larger group runs the passes of syncbn/_group_passes.py (group_forward,
// group_backward: the kernels with the allreduce between them), which take
// the same arguments after the communicator. Written as a Python
// autograd.Function, each call also pays for the Python around those calls:
// autograd's Python node, the context object, the tensor checks, views and
// allocations. Inside a network, with the caches a convolution leaves
// behind, that costs more than the kernels themselves. Here the same steps
// are C++ against torch's own API, as torch's batch norm is: the node is a
// torch::autograd::Function, the tensors are allocated and checked through
// ATen, and Python is entered only for the passes (reached through the
// functions that bind() receives).
//
// forward() takes only what it can hand to the kernels as it is, and returns
// None for anything else, before it has changed anything; the caller then
// takes the Python path, which handles every case (other strides, negated or
// misaligned memory, float16 / bfloat16, too few values per channel, empty
// input). Both paths issue the same collectives, so the ranks of a group may
// take different ones. The backward reads the output gradient in the input's layout,
// copying it when it comes in another, and, like the Python function, refuses
// to be differentiated again.

#include <torch/extension.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/variable.h>
#include <pybind11/numpy.h>

#include <cstdint>
#include <string>
#include <vector>

namespace py = pybind11;
using namespace pybind11::literals;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// (hidden, as pybind11's own types are: no symbol of this module is exported)
namespace syncbn __attribute__((visibility("hidden"))) {

// The kernels' functions, set once by bind(). The module holds them (its
// attribute _kernels), so they are released with it when the interpreter
// finishes; these are borrowed pointers to them.
struct Kernels {
  PyObject* local_forward = nullptr;
  PyObject* local_backward = nullptr;
  PyObject* group_forward = nullptr;
  PyObject* group_backward = nullptr;
  PyObject* activation_uses_output = nullptr;
  int64_t act_none = 0;  // the kernels' code of no activation, ACT_NONE
};
Kernels kernels;

// The communicator of a group of several processes, kept by the node from
// its forward to its backward (saved_data holds it as a capsule).
struct GroupRef : torch::CustomClassHolder {
  py::object comm;
  explicit GroupRef(py::object comm) : comm(std::move(comm)) {}
  GroupRef(const GroupRef&) = delete;
  GroupRef& operator=(const GroupRef&) = delete;
  ~GroupRef() override {
    // the node may be freed where the GIL is not held; after the interpreter
    // finished, the reference is left alone
    if (Py_IsInitialized()) {
      py::gil_scoped_acquire gil;
      comm.release().dec_ref();
    } else {
      comm.release();
    }
  }
};

// How the kernels read a tensor: runs (N, C, L) for a contiguous tensor of
// 3 or more dimensions, rows (M, C) for a contiguous 2-D tensor and for a
// channels-last one.
enum class Layout : int64_t { unsupported = 0, runs = 1, rows = 2 };

Layout layout_of(const at::Tensor& t) {
  const int64_t dims = t.dim();
  if (t.is_contiguous()) {
    return dims == 2 ? Layout::rows : (dims >= 3 ? Layout::runs : Layout::unsupported);
  }
  if ((dims == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
      (dims == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d))) {
    return Layout::rows;
  }
  return Layout::unsupported;
}

bool is_kernel_float(const at::Tensor& t) {
  const auto type = t.scalar_type();
  return type == at::kFloat || type == at::kDouble;
}

// Memory the kernels can read through its address: on the CPU, not negated,
// aligned to its element.
bool readable(const at::Tensor& t) {
  return t.is_cpu() && !t.is_neg() &&
         reinterpret_cast<std::uintptr_t>(t.data_ptr()) % t.element_size() == 0;
}

// A per-channel vector the kernels take: float32 / float64, C values in a row.
bool kernel_vector(const std::optional<at::Tensor>& t, int64_t C) {
  return !t.has_value() ||
         (is_kernel_float(*t) && t->dim() == 1 && t->numel() == C && t->is_contiguous() && readable(*t));
}

py::dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return py::dtype::of<float>();
    case at::kDouble:
      return py::dtype::of<double>();
    default:
      return py::dtype::of<int64_t>();
  }
}

// A NumPy array over t's memory, shape `shape`, C-contiguous. Its base is
// None: t outlives it, since the array never leaves the kernel call.
py::array array_over(const at::Tensor& t, const std::vector<int64_t>& shape) {
  std::vector<int64_t> strides(shape.size());
  int64_t step = t.element_size();
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = step;
    step *= shape[i];
  }
  return py::array(dtype_of(t), shape, strides, t.data_ptr(), py::none());
}

// The kernels' array of a tensor of the input's shape, in `layout` (forward()
// takes no empty tensor).
py::array kernel_array(const at::Tensor& t, Layout layout) {
  const int64_t N = t.size(0), C = t.size(1);
  if (layout == Layout::rows) {
    return array_over(t, {t.numel() / C, C});
  }
  return array_over(t, {N, C, t.numel() / (N * C)});
}

py::object vector_or_none(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) {
    return py::none();
  }
  return array_over(*t, {t->numel()});
}

// `t` (of like's shape) as the kernels read the input `like`: itself when its
// memory is laid out as like's and readable, else a copy that is.
at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& like) {
  if (t.scalar_type() == like.scalar_type() && t.strides() == like.strides() && readable(t)) {
    return t;
  }
  at::Tensor copy = at::empty_like(like);
  copy.copy_(t);
  return copy;
}

int64_t edge_or_none(const std::optional<at::Tensor>& t, int64_t& next) {
  return t.has_value() ? next++ : -1;
}

// The arguments of forward() that are not tensors, in one place.
struct Options {
  // (the running statistics are not arguments of the node: not differentiated,
  // updated in place as torch's batch norm updates its buffers)
  std::optional<at::Tensor> running_mean, running_var, num_batches_tracked;
  double eps;
  py::object momentum;  // a float, or None: the cumulative average
  py::object shift;     // the layer's float64 (C,) shift array, updated in place
  int64_t activation;
  double negative_slope;
  py::object group;  // None: a group of one process; else its communicator
};

struct BatchNormNode : public torch::autograd::Function<BatchNormNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                            const Options& options, Layout layout) {
    const auto& running_mean = options.running_mean;
    const auto& running_var = options.running_var;
    const auto& num_batches_tracked = options.num_batches_tracked;
    const int64_t C = x.size(1);
    at::Tensor out = at::empty_like(x);
    at::Tensor stats = at::empty({3, C}, x.options().dtype(at::kDouble));
    py::dict fused;
    at::Tensor preactivation;
    if (residual.has_value()) {
      fused["residual"] = kernel_array(*residual, layout);
    }
    if (options.activation != kernels.act_none) {
      fused["activation"] = options.activation;
      fused["negative_slope"] = options.negative_slope;
      py::object uses_output = py::reinterpret_borrow<py::object>(kernels.activation_uses_output)(
          options.activation, options.negative_slope);
      if (!uses_output.cast<bool>()) {
        preactivation = at::empty_like(x);
        fused["preact"] = kernel_array(preactivation, layout);
      }
    }
    const bool tracking = running_mean.has_value() && running_var.has_value();
    py::object batches = py::none();
    if (tracking && num_batches_tracked.has_value()) {
      batches = array_over(*num_batches_tracked, {1});
    }
    const bool alone = options.group.is_none();
    py::tuple arguments = py::make_tuple(
        kernel_array(x, layout), vector_or_none(weight), vector_or_none(bias), options.eps,
        kernel_array(out, layout), array_over(stats, {3, C}), options.shift,
        tracking ? vector_or_none(running_mean) : py::none(), tracking ? vector_or_none(running_var) : py::none(),
        options.momentum, batches, at::get_num_threads());
    double global_count = 0;  // (the backward of a group of one does not need it)
    if (alone) {
      py::reinterpret_borrow<py::object>(kernels.local_forward)(*arguments, **fused);
    } else {
      global_count = py::reinterpret_borrow<py::object>(kernels.group_forward)(options.group, *arguments, **fused)
                         .cast<double>();
    }
    if (tracking) {
      // what a torch in-place update would do
      torch::autograd::impl::bump_version(*running_mean);
      torch::autograd::impl::bump_version(*running_var);
      if (num_batches_tracked.has_value()) {
        torch::autograd::impl::bump_version(*num_batches_tracked);
      }
    }
    // The activation's derivative is computed from its output (relu, as
    // torch's relu saves it) or from its input (silu).
    at::Tensor activation_saved;
    if (options.activation != kernels.act_none) {
      activation_saved = preactivation.defined() ? preactivation : out;
    }
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), activation_saved});
    int64_t edge = 1;  // the input's gradient edge is 0; the others follow in argument order
    ctx->saved_data["weight_edge"] = edge_or_none(weight, edge);
    ctx->saved_data["bias_edge"] = edge_or_none(bias, edge);
    ctx->saved_data["residual_edge"] = edge_or_none(residual, edge);
    ctx->saved_data["bias_dtype"] =
        bias.has_value() ? static_cast<int64_t>(bias->scalar_type()) : static_cast<int64_t>(-1);
    ctx->saved_data["stats"] = stats;
    ctx->saved_data["layout"] = static_cast<int64_t>(layout);
    ctx->saved_data["activation"] = options.activation;
    ctx->saved_data["negative_slope"] = options.negative_slope;
    if (!alone) {
      ctx->saved_data["group"] = at::IValue::make_capsule(c10::make_intrusive<GroupRef>(options.group));
      ctx->saved_data["global_count"] = global_count;
    }
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();  // (checks they were not modified in place)
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& activation_saved = saved[2];
    const auto layout = static_cast<Layout>(ctx->saved_data["layout"].toInt());
    const int64_t activation = ctx->saved_data["activation"].toInt();
    const at::Tensor stats = ctx->saved_data["stats"].toTensor();
    const int64_t weight_edge = ctx->saved_data["weight_edge"].toInt();
    const int64_t bias_edge = ctx->saved_data["bias_edge"].toInt();
    const int64_t residual_edge = ctx->saved_data["residual_edge"].toInt();
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_w = weight_edge >= 0 && ctx->needs_input_grad(weight_edge);
    const bool need_b = bias_edge >= 0 && ctx->needs_input_grad(bias_edge);
    const bool need_r = residual_edge >= 0 && ctx->needs_input_grad(residual_edge);
    const int64_t C = x.size(1);
    const at::Tensor dy = in_layout_of(grads[0], x);

    at::Tensor grad_w, grad_b, dz, dx;
    if (need_w) {
      grad_w = at::empty({C}, weight.options());
    }
    if (need_b) {
      const auto bias_dtype = static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt());
      grad_b = at::empty({C}, x.options().dtype(bias_dtype));
    }
    if (activation != kernels.act_none) {
      dz = at::empty_like(x);  // dy * activation'(z): the residual's gradient too
    }
    if (need_x) {
      dx = dz.defined() && !need_r ? dz : at::empty_like(x);  // dx may overwrite dz
    }
    {
      py::gil_scoped_acquire gil;
      py::dict fused;
      if (activation != kernels.act_none) {
        fused["activation"] = activation;
        fused["negative_slope"] = ctx->saved_data["negative_slope"].toDouble();
        fused["saved"] = kernel_array(activation_saved, layout);
        fused["grad_preact"] = kernel_array(dz, layout);
      }
      py::tuple arguments = py::make_tuple(
          kernel_array(dy, layout), kernel_array(x, layout), array_over(stats[0], {C}), array_over(stats[1], {C}),
          weight.defined() ? py::object(array_over(weight, {C})) : py::none(),
          dx.defined() ? py::object(kernel_array(dx, layout)) : py::none(),
          grad_w.defined() ? py::object(array_over(grad_w, {C})) : py::none(),
          grad_b.defined() ? py::object(array_over(grad_b, {C})) : py::none(), at::get_num_threads());
      const auto group = ctx->saved_data.find("group");
      if (group == ctx->saved_data.end()) {
        py::reinterpret_borrow<py::object>(kernels.local_backward)(*arguments, **fused);
      } else {
        const auto ref = c10::static_intrusive_pointer_cast<GroupRef>(group->second.toCapsule());
        py::reinterpret_borrow<py::object>(kernels.group_backward)(ref->comm, *arguments,
            ctx->saved_data["global_count"].toDouble(), **fused);
      }
    }
    at::Tensor grad_r;
    if (need_r) {
      grad_r = dz.defined() ? dz : grads[0];
    }
    variable_list result = {dx, grad_w, grad_b, grad_r};
    if (at::GradMode::is_enabled() && grads[0].requires_grad()) {
      // create_graph=True: the gradients carry a node that refuses a second
      // differentiation, rather than no graph (which would silently drop
      // second-order terms)
      variable_list aliases;
      for (const at::Tensor& g : result) {
        aliases.push_back(g.defined() ? g.detach().requires_grad_(true) : g);
      }
      result = torch::autograd::DelayedError(
                   "syncbn: trying to differentiate twice a batch norm whose backward is computed once "
                   "(double backward is not supported)",
                   static_cast<int64_t>(aliases.size()))
                   .apply(std::move(aliases));
    }
    // one gradient per argument of forward: none for the options and the layout
    result.resize(6);
    return result;
  }
};

py::object forward(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                   const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                   const std::optional<at::Tensor>& num_batches_tracked, double eps, py::object momentum,
                   py::object shift, int64_t activation, double negative_slope, py::object group) {
  if (kernels.local_forward == nullptr) {
    throw std::runtime_error("syncbn._cpp_node: bind() was not called");
  }
  const Layout layout = layout_of(x);
  const int64_t C = x.dim() >= 2 ? x.size(1) : 0;
  // (a group of one process needs 2 values per channel here; in a larger
  // group the global count is checked after the statistics are reduced)
  const int64_t least_per_channel = group.is_none() ? 2 : 1;
  if (layout == Layout::unsupported || !is_kernel_float(x) || !readable(x) || C == 0 ||
      x.numel() / C < least_per_channel) {
    return py::none();
  }
  if (!kernel_vector(weight, C) || !kernel_vector(bias, C) || !kernel_vector(running_mean, C) ||
      !kernel_vector(running_var, C)) {
    return py::none();
  }
  if (num_batches_tracked.has_value() &&
      !(num_batches_tracked->scalar_type() == at::kLong && num_batches_tracked->numel() == 1 &&
        readable(*num_batches_tracked))) {
    return py::none();
  }
  if (residual.has_value() &&
      !(residual->scalar_type() == x.scalar_type() && residual->sizes() == x.sizes() &&
        residual->strides() == x.strides() && readable(*residual))) {
    return py::none();
  }
  Options options{running_mean, running_var, num_batches_tracked, eps, std::move(momentum), std::move(shift),
                  activation, negative_slope, std::move(group)};
  return py::cast(BatchNormNode::apply(x, weight, bias, residual, options, layout));
}

void bind(py::module_ module, py::object local_forward, py::object local_backward, py::object group_forward,
          py::object group_backward, py::object activation_uses_output, int64_t act_none) {
  module.attr("_kernels") =
      py::make_tuple(local_forward, local_backward, group_forward, group_backward, activation_uses_output);
  kernels.local_forward = local_forward.ptr();
  kernels.local_backward = local_backward.ptr();
  kernels.group_forward = group_forward.ptr();
  kernels.group_backward = group_backward.ptr();
  kernels.activation_uses_output = activation_uses_output.ptr();
  kernels.act_none = act_none;
}

}  // namespace syncbn

using namespace syncbn;

PYBIND11_MODULE(_cpp_node, m) {
  m.doc() = "The training layer as a C++ autograd node (see syncbn/_cpp_node_loader.py).";
  m.attr("TORCH_VERSION") = SYNCBN_TORCH_VERSION;
  m.def(
      "bind",
      [m](py::object local_forward, py::object local_backward, py::object group_forward, py::object group_backward,
          py::object activation_uses_output, int64_t act_none) {
        bind(m, local_forward, local_backward, group_forward, group_backward, activation_uses_output, act_none);
      },
      "local_forward"_a, "local_backward"_a, "group_forward"_a, "group_backward"_a, "activation_uses_output"_a,
      "act_none"_a,
      "The functions the node calls (once, before forward): the kernels' one-call passes of a group of "
      "one process, and the passes of a larger group with the communicator as first argument.");
  m.def("forward", &forward, "x"_a, "weight"_a, "bias"_a, "residual"_a, "running_mean"_a, "running_var"_a,
        "num_batches_tracked"_a, "eps"_a, "momentum"_a, "shift"_a, "activation"_a, "negative_slope"_a, "group"_a,
        "The training forward, recorded as a C++ autograd node (group: None for a group of one process, "
        "else its communicator); None when the Python path must take the call.");
}
