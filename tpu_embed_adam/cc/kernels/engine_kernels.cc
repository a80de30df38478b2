// CPU kernels for TF's TPU embedding lifecycle ops (configure, load,
// retrieve, shutdown, and the TPU system's initialization) and our engine
// ops, all backed by the process's software engine
// (tpu_embed_adam/cc/engine/engine.h).
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/protobuf/tpu/topology.pb.h"
#include "tpu_embed_adam/cc/engine/engine.h"
#include "tpu_embed_adam/cc/core/parallel_for.h"

namespace tpu_embed_adam {
namespace {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using engine::Engine;
using engine::Optimizer;

class ConfigureOp : public OpKernel {
 public:
  explicit ConfigureOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("config", &config_));
  }
  void Compute(OpKernelContext* ctx) override {
    OP_REQUIRES_OK(ctx, Engine::Get().Configure(config_));
  }

 private:
  std::string config_;
};

// tpu.initialize_system(): TF runs this op (then ConfigureTPUEmbedding with
// the embedding configuration) and parses its output as a TopologyProto.
// The CPU "TPU" is the engine's configuration: one task per host, one
// device per core, laid out on a [cores_per_host, num_hosts, 1, 1] mesh.
// A non-empty embedding_config installs it first, as ConfigureTPUEmbedding
// does; without one an installed configuration (and its tables) is kept, so
// that initializing again does not drop what a session trained.
class ConfigureDistributedTPUOp : public OpKernel {
 public:
  explicit ConfigureDistributedTPUOp(OpKernelConstruction* ctx)
      : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("embedding_config", &config_));
    std::string v2_config;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("tpu_embedding_config", &v2_config));
    OP_REQUIRES(ctx, v2_config.empty(),
                tensorflow::errors::Unimplemented(
                    "ConfigureDistributedTPU: tpu_embedding_config (the TPU "
                    "embedding v2 API) is not supported on CPU; pass the "
                    "TPUEmbeddingConfiguration as embedding_config"));
  }
  void Compute(OpKernelContext* ctx) override {
    if (!config_.empty()) {
      OP_REQUIRES_OK(ctx, Engine::Get().Configure(config_));
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
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<tensorflow::tstring>()() = topology.SerializeAsString();
  }

 private:
  std::string config_;
};

class IsInitializedOp : public OpKernel {
 public:
  using OpKernel::OpKernel;
  void Compute(OpKernelContext* ctx) override {
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<bool>()() = Engine::Get().IsConfigured();
  }
};

class ResetOp : public OpKernel {
 public:
  using OpKernel::OpKernel;
  void Compute(OpKernelContext*) override { Engine::Get().Reset(); }
};

class InfoOp : public OpKernel {
 public:
  using OpKernel::OpKernel;
  void Compute(OpKernelContext* ctx) override {
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<tensorflow::tstring>()() = Engine::Get().InfoJson();
  }
};

// The attrs Load and Retrieve share, naming one shard of one table.
class ShardOpBase : public OpKernel {
 public:
  explicit ShardOpBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("table_id", &table_id_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("table_name", &table_name_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_shards", &num_shards_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("shard_id", &shard_id_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("config", &config_));
  }

 protected:
  int64_t table_id_;
  std::string table_name_;
  int64_t num_shards_;
  int64_t shard_id_;
  std::string config_;
};

// LoadTPUEmbeddingADAMParameters (parameters, momenta, velocities) and
// LoadTPUEmbeddingStochasticGradientDescentParameters (parameters).
template <Optimizer kOptimizer>
class LoadOp : public ShardOpBase {
 public:
  using ShardOpBase::ShardOpBase;
  void Compute(OpKernelContext* ctx) override {
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
    OP_REQUIRES_OK(ctx, Engine::Get().Load(config_, req, MakeParallelFor(ctx)));
  }
};

template <Optimizer kOptimizer>
class RetrieveOp : public ShardOpBase {
 public:
  using ShardOpBase::ShardOpBase;
  void Compute(OpKernelContext* ctx) override {
    engine::ShardRef ref;
    OP_REQUIRES_OK(ctx, Engine::Get().ResolveShard(kOptimizer, config_,
                                                   table_id_, table_name_,
                                                   num_shards_, shard_id_,
                                                   &ref));
    const TensorShape shape({ref.rows, ref.table->dim});
    float* out[3] = {nullptr, nullptr, nullptr};
    for (int i = 0; i < engine::NumArrays(kOptimizer); ++i) {
      Tensor* t = nullptr;
      OP_REQUIRES_OK(ctx, ctx->allocate_output(i, shape, &t));
      out[i] = t->flat<float>().data();
    }
    OP_REQUIRES_OK(ctx,
                   Engine::Get().Retrieve(ref, out, MakeParallelFor(ctx)));
  }
};

// TpuEmbedAdamRetrieveTouched: the Adam rows trained since the last retrieve.
class RetrieveTouchedOp : public ShardOpBase {
 public:
  using ShardOpBase::ShardOpBase;
  void Compute(OpKernelContext* ctx) override {
    engine::ShardRef ref;
    OP_REQUIRES_OK(ctx, Engine::Get().ResolveShard(Optimizer::kAdam, config_,
                                                   table_id_, table_name_,
                                                   num_shards_, shard_id_,
                                                   &ref));
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
    OP_REQUIRES_OK(ctx, Engine::Get().RetrieveTouched(ref, allocate,
                                                      MakeParallelFor(ctx)));
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
REGISTER_KERNEL_BUILDER(Name("TpuEmbedAdamRetrieveTouched").Device(DEVICE_CPU),
                        RetrieveTouchedOp);
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
