// CPU kernels for TF's TPU embedding lifecycle ops (configure, load,
// retrieve, shutdown, and the TPU system's initialization) and our engine
// ops, all backed by the process's software engine
// (tpu_embed_adam/cc/engine/engine.h).
// training_op_helpers.h copies tensors on the CPU device's thread pool.
#define EIGEN_USE_THREADS

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/kernels/training_op_helpers.h"
#include "tensorflow/core/protobuf/tpu/topology.pb.h"
#include "tpu_embed_adam/cc/core/slots.h"
#include "tpu_embed_adam/cc/engine/config.h"
#include "tpu_embed_adam/cc/engine/engine.h"
#include "tpu_embed_adam/cc/core/parallel_for.h"
#include "tpu_embed_adam/cc/kernels/engine_kernel.h"

namespace tpu_embed_adam {
namespace {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Status;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using engine::Engine;
using engine::Optimizer;

class ConfigureOp : public EngineKernel {
 public:
  using EngineKernel::EngineKernel;
  Status Run(OpKernelContext* ctx) override {
    return Engine::Get().Configure(config());
  }
};

// tpu.initialize_system(): TF runs this op (then ConfigureTPUEmbedding with
// the embedding configuration) and parses its output as a TopologyProto.
// The CPU "TPU" is the engine's configuration: one task per host, one
// device per core, laid out on a [cores_per_host, num_hosts, 1, 1] mesh.
// A non-empty embedding_config installs it first, as ConfigureTPUEmbedding
// does; without one an installed configuration (and its tables) is kept, so
// that initializing again does not drop what a session trained.
class ConfigureDistributedTPUOp : public EngineKernel {
 public:
  explicit ConfigureDistributedTPUOp(OpKernelConstruction* ctx)
      : EngineKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("embedding_config", &embedding_config_));
    std::string v2_config;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("tpu_embedding_config", &v2_config));
    OP_REQUIRES(ctx, v2_config.empty(),
                tensorflow::errors::Unimplemented(
                    "ConfigureDistributedTPU: tpu_embedding_config (the TPU "
                    "embedding v2 API) is not supported on CPU; pass the "
                    "TPUEmbeddingConfiguration as embedding_config"));
  }
  Status Run(OpKernelContext* ctx) override {
    if (!embedding_config_.empty()) {
      TF_RETURN_IF_ERROR(Engine::Get().Configure(embedding_config_));
    }
    const auto [hosts, cores] = Engine::Get().HostsAndCores();
    tensorflow::tpu::TopologyProto topology;
    for (const int64_t d : {cores, hosts, int64_t{1}, int64_t{1}}) {
      topology.add_mesh_shape(d);
    }
    topology.set_num_tasks(hosts);
    topology.set_num_tpu_devices_per_task(cores);
    for (int64_t task = 0; task < hosts; ++task) {
      for (int64_t core = 0; core < cores; ++core) {
        for (const int64_t c : {core, task, int64_t{0}, int64_t{0}}) {
          topology.add_device_coordinates(c);
        }
      }
    }
    Tensor* out = nullptr;
    TF_RETURN_IF_ERROR(ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<tensorflow::tstring>()() = topology.SerializeAsString();
    return tensorflow::OkStatus();
  }

 private:
  std::string embedding_config_;
};

class IsInitializedOp : public EngineKernel {
 public:
  using EngineKernel::EngineKernel;
  Status Run(OpKernelContext* ctx) override {
    Tensor* out = nullptr;
    TF_RETURN_IF_ERROR(ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<bool>()() = Engine::Get().IsConfigured();
    return tensorflow::OkStatus();
  }
};

class ResetOp : public EngineKernel {
 public:
  using EngineKernel::EngineKernel;
  Status Run(OpKernelContext*) override {
    Engine::Get().Reset();
    return tensorflow::OkStatus();
  }
};

class ParseConfigOp : public EngineKernel {
 public:
  using EngineKernel::EngineKernel;
  Status Run(OpKernelContext* ctx) override {
    const Tensor& config = ctx->input(0);
    if (config.NumElements() != 1) {
      return tensorflow::errors::InvalidArgument(
          "Argument `config` must be a scalar; received shape ",
          config.shape().DebugString(), ".");
    }
    std::shared_ptr<const engine::EngineConfig> parsed;
    TF_RETURN_IF_ERROR(engine::ParseEngineConfig(
        std::string(config.flat<tensorflow::tstring>()(0)), &parsed));
    Tensor* out = nullptr;
    TF_RETURN_IF_ERROR(ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<tensorflow::tstring>()() = parsed->canonical;
    return tensorflow::OkStatus();
  }
};

class InfoOp : public EngineKernel {
 public:
  using EngineKernel::EngineKernel;
  Status Run(OpKernelContext* ctx) override {
    Tensor* out = nullptr;
    TF_RETURN_IF_ERROR(ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<tensorflow::tstring>()() = Engine::Get().InfoJson();
    return tensorflow::OkStatus();
  }
};

// The attrs Load and Retrieve share, naming one shard of one table.
class ShardOpBase : public EngineKernel {
 public:
  explicit ShardOpBase(OpKernelConstruction* ctx) : EngineKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("table_id", &table_id_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("table_name", &table_name_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_shards", &num_shards_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("shard_id", &shard_id_));
  }

 protected:
  // The shard the op names, for `optimizer`'s arrays.
  Status Resolve(Optimizer optimizer, engine::ShardRef* ref) const {
    return Engine::Get().ResolveShard(optimizer, config(), table_id_,
                                      table_name_, num_shards_, shard_id_,
                                      ref);
  }

  int64_t table_id_;
  std::string table_name_;
  int64_t num_shards_;
  int64_t shard_id_;
};

// LoadTPUEmbeddingADAMParameters (parameters, momenta, velocities) and
// LoadTPUEmbeddingStochasticGradientDescentParameters (parameters).
template <Optimizer kOptimizer>
class LoadOp : public ShardOpBase {
 public:
  using ShardOpBase::ShardOpBase;
  Status Run(OpKernelContext* ctx) override {
    engine::LoadRequest req;
    req.optimizer = kOptimizer;
    req.table_id = table_id_;
    req.table_name = table_name_;
    req.num_shards = num_shards_;
    req.shard_id = shard_id_;
    for (int i = 0; i < engine::NumArrays(kOptimizer); ++i) {
      const Tensor& t = ctx->input(i);
      const auto dims = t.shape().dim_sizes();
      req.shapes[i].assign(dims.begin(), dims.end());
      req.data[i] = t.flat<float>().data();
    }
    return Engine::Get().Load(config(), req, MakeParallelFor(ctx));
  }
};

template <Optimizer kOptimizer>
class RetrieveOp : public ShardOpBase {
 public:
  using ShardOpBase::ShardOpBase;
  Status Run(OpKernelContext* ctx) override {
    engine::ShardRef ref;
    TF_RETURN_IF_ERROR(Resolve(kOptimizer, &ref));
    const TensorShape shape({ref.rows, ref.table->dim});
    float* out[3] = {nullptr, nullptr, nullptr};
    for (int i = 0; i < engine::NumArrays(kOptimizer); ++i) {
      Tensor* t = nullptr;
      TF_RETURN_IF_ERROR(ctx->allocate_output(i, shape, &t));
      out[i] = t->flat<float>().data();
    }
    return Engine::Get().Retrieve(ref, out, MakeParallelFor(ctx));
  }
};

// TpuEmbedAdamRetrieveTouched: the Adam rows trained since the last retrieve.
class RetrieveTouchedOp : public ShardOpBase {
 public:
  using ShardOpBase::ShardOpBase;
  Status Run(OpKernelContext* ctx) override {
    engine::ShardRef ref;
    TF_RETURN_IF_ERROR(Resolve(Optimizer::kAdam, &ref));
    const int64_t dim = ref.table->dim;
    const auto allocate = [ctx, dim](int64_t n, int64_t** ids, float* out[3]) {
      Tensor* t = nullptr;
      TF_RETURN_IF_ERROR(ctx->allocate_output(0, TensorShape({n}), &t));
      *ids = t->flat<int64_t>().data();
      for (int i = 0; i < 3; ++i) {
        TF_RETURN_IF_ERROR(
            ctx->allocate_output(i + 1, TensorShape({n, dim}), &t));
        out[i] = t->flat<float>().data();
      }
      return tensorflow::OkStatus();
    };
    return Engine::Get().RetrieveTouched(ref, allocate, MakeParallelFor(ctx));
  }
};

// TpuEmbedAdamRetrieveTouchedInto: those rows, written into the variables.
class RetrieveTouchedIntoOp : public ShardOpBase {
 public:
  using ShardOpBase::ShardOpBase;
  Status Run(OpKernelContext* ctx) override {
    engine::ShardRef ref;
    TF_RETURN_IF_ERROR(Resolve(Optimizer::kAdam, &ref));
    // The copy-on-read helpers below copy a shared buffer as float, which
    // is only sound for initialised float variables: check those first.
    for (int i = 0; i < kAdamArrays; ++i) {
      tensorflow::core::RefCountPtr<tensorflow::Var> var;
      const Status found = tensorflow::LookupResource(
          ctx, tensorflow::HandleFromInput(ctx, i), &var);
      if (!found.ok() || !var->is_initialized) {
        return tensorflow::errors::FailedPrecondition(
            kLoadArrayNames[i], " variable ",
            tensorflow::HandleFromInput(ctx, i).name(),
            " is not initialized or does not exist");
      }
      if (var->tensor()->dtype() != tensorflow::DT_FLOAT) {
        return tensorflow::errors::InvalidArgument(
            kLoadArrayNames[i], " must be float32; got ",
            tensorflow::DataTypeString(var->tensor()->dtype()));
      }
    }
    // Sparse mode, as a scatter: the variables turn copy-on-read, so their
    // readers copy and the buffers may be written in place.
    auto locks = tensorflow::MaybeLockVariableInputMutexesInOrder<
        Eigen::ThreadPoolDevice, float>(ctx, /*do_lock=*/true,
                                        /*sparse=*/true, {0, 1, 2});
    Tensor vars[kAdamArrays];
    float* into[kAdamArrays];
    const TensorShape shape({ref.rows, ref.table->dim});
    for (int i = 0; i < kAdamArrays; ++i) {
      TF_RETURN_IF_ERROR(
          tensorflow::GetInputTensorFromVariable<Eigen::ThreadPoolDevice,
                                                 float>(
              ctx, i, /*lock_held=*/true, /*sparse=*/true, &vars[i]));
      if (vars[i].shape() != shape) {
        return tensorflow::errors::InvalidArgument(
            kLoadArrayNames[i], " has shape ", vars[i].shape().DebugString(),
            "; shard ", shard_id_, " of table '", ref.table->name, "' is ",
            shape.DebugString());
      }
      into[i] = vars[i].flat<float>().data();
    }
    if (into[0] == into[1] || into[0] == into[2] || into[1] == into[2]) {
      return tensorflow::errors::InvalidArgument(
          "parameters, momenta and velocities must be three different "
          "variables");
    }
    return Engine::Get().RetrieveTouchedInto(ref, into, MakeParallelFor(ctx));
  }
};

REGISTER_KERNEL_BUILDER(Name("ConfigureTPUEmbedding").Device(DEVICE_CPU),
                        ConfigureOp);
REGISTER_KERNEL_BUILDER(Name("ConfigureDistributedTPU").Device(DEVICE_CPU),
                        ConfigureDistributedTPUOp);
REGISTER_KERNEL_BUILDER(Name("IsTPUEmbeddingInitialized").Device(DEVICE_CPU),
                        IsInitializedOp);
// tpu.shutdown_system() runs it (on CPU with soft placement): clear the engine
// as a TPU's shutdown clears its embedding memory.
REGISTER_KERNEL_BUILDER(Name("ShutdownDistributedTPU").Device(DEVICE_CPU),
                        ResetOp);
REGISTER_KERNEL_BUILDER(Name("TpuEmbedAdamEngineReset").Device(DEVICE_CPU),
                        ResetOp);
REGISTER_KERNEL_BUILDER(Name("TpuEmbedAdamEngineInfo").Device(DEVICE_CPU),
                        InfoOp);
REGISTER_KERNEL_BUILDER(
    Name("LoadTPUEmbeddingADAMParameters").Device(DEVICE_CPU),
    LoadOp<Optimizer::kAdam>);
REGISTER_KERNEL_BUILDER(
    Name("RetrieveTPUEmbeddingADAMParameters").Device(DEVICE_CPU),
    RetrieveOp<Optimizer::kAdam>);
// What TF's TPUEmbedding emits in INFERENCE mode: the table, no slots.
REGISTER_KERNEL_BUILDER(Name("TpuEmbedAdamParseConfig").Device(DEVICE_CPU),
                        ParseConfigOp);
REGISTER_KERNEL_BUILDER(Name("TpuEmbedAdamRetrieveTouched").Device(DEVICE_CPU),
                        RetrieveTouchedOp);
REGISTER_KERNEL_BUILDER(
    Name("TpuEmbedAdamRetrieveTouchedInto").Device(DEVICE_CPU),
    RetrieveTouchedIntoOp);
REGISTER_KERNEL_BUILDER(
    Name("LoadTPUEmbeddingStochasticGradientDescentParameters")
        .Device(DEVICE_CPU),
    LoadOp<Optimizer::kSgd>);
REGISTER_KERNEL_BUILDER(
    Name("RetrieveTPUEmbeddingStochasticGradientDescentParameters")
        .Device(DEVICE_CPU),
    RetrieveOp<Optimizer::kSgd>);

}  // namespace
}  // namespace tpu_embed_adam
