// oneDNN's 2-D convolutions as XLA FFI handlers, for jaxres/models/onednn_conv.py (which builds
// this file with g++ on first use and says how to call it).
//
// float32 only. Every buffer is row-major as JAX passes it: input and output NHWC, kernel HWIO.
// Three handlers, each (a, b) -> out with the forward convolution's strides and padding:
//   forward           (x, kernel)  -> y
//   backward data     (dy, kernel) -> dx
//   backward weights  (x, dy)      -> dkernel
// Activations stay NHWC (oneDNN's nhwc kernels; converting to its blocked layouts and back was no
// faster on the CIFAR/ResNet shapes); the kernel is reordered into the layout oneDNN picks (a few
// KB to MB). One primitive per (kind, shape), made on first use and cached; oneDNN's threads are
// its OpenMP runtime's.
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Kind { kForward, kBackwardData, kBackwardWeights };

// kind, then the forward convolution: N, H, W, C_in, KH, KW, C_out, strides, padding (top,
// bottom, left, right)
using Key = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t, int64_t, int64_t>;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One argument of a primitive: its layout as JAX holds it and as the primitive wants it.
struct Arg {
  int dnnl_arg;
  dnnl::memory::desc user, primitive;
  bool reordered() const { return user != primitive; }
};

struct Plan {
  dnnl::primitive primitive;
  Arg inputs[2];  // in the order of the handler's arguments
  Arg output;
  dnnl::memory::desc scratchpad;
  dnnl::reorder input_reorders[2];  // into the primitive's layout, where it differs
  dnnl::reorder output_reorder;
};

std::unique_ptr<Plan> MakePlan(const Key& key) {
  auto [kind, n, h, w, ci, kh, kw, co, sh, sw, pt, pb, pl, pr] = key;
  using tag = dnnl::memory::format_tag;
  const auto f32 = dnnl::memory::data_type::f32;
  const int64_t ho = (h + pt + pb - kh) / sh + 1, wo = (w + pl + pr - kw) / sw + 1;
  // oneDNN's dims are always (N, C, H, W) and (O, I, KH, KW); the tags say how they lie.
  dnnl::memory::desc x_md({n, ci, h, w}, f32, tag::nhwc);
  dnnl::memory::desc kernel_md({co, ci, kh, kw}, f32, tag::hwio);
  dnnl::memory::desc y_md({n, co, ho, wo}, f32, tag::nhwc);
  dnnl::memory::desc kernel_any({co, ci, kh, kw}, f32, tag::any);
  const dnnl::memory::dims strides{sh, sw}, pad_l{pt, pl}, pad_r{pb, pr};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // ours, per thread: safe to run concurrently
  auto& engine = Engine();
  const auto direct = dnnl::algorithm::convolution_direct;
  dnnl::convolution_forward::primitive_desc fwd(engine, dnnl::prop_kind::forward_training, direct, x_md,
                                               kernel_any, y_md, strides, pad_l, pad_r, attr);
  auto plan = std::make_unique<Plan>();
  if (kind == kForward) {
    plan->primitive = dnnl::convolution_forward(fwd);
    plan->inputs[0] = {DNNL_ARG_SRC, x_md, fwd.src_desc()};
    plan->inputs[1] = {DNNL_ARG_WEIGHTS, kernel_md, fwd.weights_desc()};
    plan->output = {DNNL_ARG_DST, y_md, fwd.dst_desc()};
    plan->scratchpad = fwd.scratchpad_desc();
  } else if (kind == kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc bwd(engine, direct, x_md, kernel_any, y_md, strides, pad_l,
                                                        pad_r, fwd, attr);
    plan->primitive = dnnl::convolution_backward_data(bwd);
    plan->inputs[0] = {DNNL_ARG_DIFF_DST, y_md, bwd.diff_dst_desc()};
    plan->inputs[1] = {DNNL_ARG_WEIGHTS, kernel_md, bwd.weights_desc()};
    plan->output = {DNNL_ARG_DIFF_SRC, x_md, bwd.diff_src_desc()};
    plan->scratchpad = bwd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc bwd(engine, direct, x_md, kernel_any, y_md, strides,
                                                           pad_l, pad_r, fwd, attr);
    plan->primitive = dnnl::convolution_backward_weights(bwd);
    plan->inputs[0] = {DNNL_ARG_SRC, x_md, bwd.src_desc()};
    plan->inputs[1] = {DNNL_ARG_DIFF_DST, y_md, bwd.diff_dst_desc()};
    plan->output = {DNNL_ARG_DIFF_WEIGHTS, kernel_md, bwd.diff_weights_desc()};
    plan->scratchpad = bwd.scratchpad_desc();
  }
  for (int i = 0; i < 2; ++i) {
    const Arg& a = plan->inputs[i];
    if (a.reordered())
      plan->input_reorders[i] = dnnl::reorder(dnnl::reorder::primitive_desc(engine, a.user, engine, a.primitive));
  }
  const Arg& out = plan->output;
  if (out.reordered())
    plan->output_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(engine, out.primitive, engine, out.user));
  return plan;
}

const Plan& GetPlan(const Key& key) {
  static std::mutex mu;
  static std::map<Key, std::unique_ptr<Plan>> plans;
  std::lock_guard<std::mutex> lock(mu);
  auto& plan = plans[key];
  if (!plan) plan = MakePlan(key);
  return *plan;
}

// Growable 64-byte-aligned scratch memory, one set per calling thread.
struct Buffer {
  std::vector<char> bytes;
  void* get(size_t size) {
    if (bytes.size() < size + 64) bytes.resize(size + 64);
    auto p = reinterpret_cast<uintptr_t>(bytes.data());
    return reinterpret_cast<void*>((p + 63) & ~uintptr_t(63));
  }
};

void Execute(const Plan& plan, void* a, void* b, void* out) {
  auto& engine = Engine();
  thread_local dnnl::stream stream(engine);
  thread_local Buffer buffers[4];  // reordered inputs, reordered output, scratchpad
  std::unordered_map<int, dnnl::memory> args;
  void* inputs[2] = {a, b};
  for (int i = 0; i < 2; ++i) {
    const Arg& arg = plan.inputs[i];
    dnnl::memory user(arg.user, engine, inputs[i]);
    if (arg.reordered()) {
      dnnl::memory mem(arg.primitive, engine, buffers[i].get(arg.primitive.get_size()));
      plan.input_reorders[i].execute(stream, user, mem);
      args[arg.dnnl_arg] = mem;
    } else {
      args[arg.dnnl_arg] = user;
    }
  }
  const Arg& out_arg = plan.output;
  dnnl::memory out_user(out_arg.user, engine, out);
  dnnl::memory out_mem = out_arg.reordered()
                             ? dnnl::memory(out_arg.primitive, engine, buffers[2].get(out_arg.primitive.get_size()))
                             : out_user;
  args[out_arg.dnnl_arg] = out_mem;
  args[DNNL_ARG_SCRATCHPAD] = dnnl::memory(plan.scratchpad, engine, buffers[3].get(plan.scratchpad.get_size()));
  plan.primitive.execute(stream, args);
  if (out_arg.reordered()) plan.output_reorder.execute(stream, out_mem, out_user);
  stream.wait();
}

template <int kind>
ffi::Error Convolution(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::Result<ffi::Buffer<ffi::F32>> out,
                       int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  auto x = kind == kBackwardData ? out->dimensions() : a.dimensions();         // (N, H, W, C_in)
  auto kernel = kind == kBackwardWeights ? out->dimensions() : b.dimensions();  // (KH, KW, C_in, C_out)
  if (x.size() != 4 || kernel.size() != 4)
    return ffi::Error::InvalidArgument("oneDNN convolution: NHWC input and HWIO kernel expected");
  const Key key{kind, x[0], x[1], x[2], x[3], kernel[0], kernel[1], kernel[3], sh, sw, pt, pb, pl, pr};
  try {
    Execute(GetPlan(key), a.untyped_data(), b.untyped_data(), out->untyped_data());
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN convolution: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

#define JAXRES_CONV_BINDING                 \
  ffi::Ffi::Bind()                          \
      .Arg<ffi::Buffer<ffi::F32>>()         \
      .Arg<ffi::Buffer<ffi::F32>>()         \
      .Ret<ffi::Buffer<ffi::F32>>()         \
      .Attr<int64_t>("sh")                  \
      .Attr<int64_t>("sw")                  \
      .Attr<int64_t>("pt")                  \
      .Attr<int64_t>("pb")                  \
      .Attr<int64_t>("pl")                  \
      .Attr<int64_t>("pr")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxresOnednnConvForward, Convolution<kForward>, JAXRES_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxresOnednnConvBackwardData, Convolution<kBackwardData>, JAXRES_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxresOnednnConvBackwardWeights, Convolution<kBackwardWeights>, JAXRES_CONV_BINDING);
