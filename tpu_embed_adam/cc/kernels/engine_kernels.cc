// CPU kernels for TF's TPU embedding lifecycle ops (configure, load,
// retrieve, shutdown) and our engine ops, all backed by the process's
// software engine (tpu_embed_adam/cc/engine/engine.h).
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tpu_embed_adam/cc/engine/engine.h"
#include "tpu_embed_adam/cc/kernels/parallel_for.h"

namespace tpu_embed_adam {
namespace {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using engine::Engine;

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

class LoadAdamOp : public ShardOpBase {
 public:
  using ShardOpBase::ShardOpBase;
  void Compute(OpKernelContext* ctx) override {
    engine::LoadRequest req;
    req.table_id = table_id_;
    req.table_name = table_name_;
    req.num_shards = num_shards_;
    req.shard_id = shard_id_;
    for (int i = 0; i < 3; ++i) {
      const Tensor& t = ctx->input(i);
      const auto dims = t.shape().dim_sizes();
      req.shapes[i].assign(dims.begin(), dims.end());
      req.data[i] = t.flat<float>().data();
    }
    OP_REQUIRES_OK(ctx, Engine::Get().Load(config_, req, MakeParallelFor(ctx)));
  }
};

class RetrieveAdamOp : public ShardOpBase {
 public:
  using ShardOpBase::ShardOpBase;
  void Compute(OpKernelContext* ctx) override {
    engine::ShardRef ref;
    OP_REQUIRES_OK(ctx, Engine::Get().ResolveShard(config_, table_id_,
                                                   table_name_, num_shards_,
                                                   shard_id_, &ref));
    const TensorShape shape({ref.rows, ref.table->dim});
    Tensor* out[3];
    for (int i = 0; i < 3; ++i) {
      OP_REQUIRES_OK(ctx, ctx->allocate_output(i, shape, &out[i]));
    }
    OP_REQUIRES_OK(ctx, Engine::Get().Retrieve(
                            ref, out[0]->flat<float>().data(),
                            out[1]->flat<float>().data(),
                            out[2]->flat<float>().data(),
                            MakeParallelFor(ctx)));
  }
};

REGISTER_KERNEL_BUILDER(Name("ConfigureTPUEmbedding").Device(DEVICE_CPU),
                        ConfigureOp);
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
    Name("LoadTPUEmbeddingADAMParameters").Device(DEVICE_CPU), LoadAdamOp);
REGISTER_KERNEL_BUILDER(
    Name("RetrieveTPUEmbeddingADAMParameters").Device(DEVICE_CPU),
    RetrieveAdamOp);

}  // namespace
}  // namespace tpu_embed_adam
