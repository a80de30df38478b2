// Orders each core's lookup before its gradient send within one run.
//
// On a TPU the embedding program runs a core's activations lookup before its
// gradient send. In a TF graph on CPU nothing orders them when the gradients
// do not depend on the activations (a loss linear in them): TF may run
// SendTPUEmbeddingGradients first, which then takes the core's queued batch
// as if Recv were pruned, and the Recv of the same run finds its batch gone.
// After TF has pruned the graph to what one Session.run needs, this pass adds
// a control edge from each core's lookup to its send, so both pair with the
// same batch whatever order the executor would pick. A send whose lookup was
// pruned keeps running alone (the engine pairs it with the queued batch).
//
// Lookups and sends are matched per (device, configuration, loop frame), the
// i-th lookup with the i-th send in creation order, only where their counts
// agree; an edge that would close a cycle is not added.
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "tensorflow/core/common_runtime/optimization_registry.h"
#include "tensorflow/core/framework/node_def_util.h"
#include "tensorflow/core/graph/control_flow.h"
#include "tensorflow/core/graph/graph.h"

namespace tpu_embed_adam {
namespace {

using tensorflow::Graph;
using tensorflow::Node;
using tensorflow::Status;

// The op that writes a core's activations from its received batch: TF's
// Recv, or on a multi-host configuration the routing pass's combine, which
// the gradient split must follow.
bool IsEmbeddingLookup(const Node* n) {
  return n->type_string() == "RecvTPUEmbeddingActivations" ||
         n->type_string() == "TpuEmbedAdamCombineActivations";
}

bool IsEmbeddingSend(const Node* n) {
  return n->type_string() == "SendTPUEmbeddingGradients" ||
         n->type_string() == "TpuEmbedAdamSplitGradients";
}

// Whether `to` can be reached from `from` along the graph's edges.
bool Reaches(const Graph& graph, const Node* from, const Node* to) {
  std::vector<bool> seen(graph.num_node_ids(), false);
  std::vector<const Node*> stack = {from};
  seen[from->id()] = true;
  while (!stack.empty()) {
    const Node* n = stack.back();
    stack.pop_back();
    if (n == to) return true;
    for (const Node* out : n->out_nodes()) {
      if (!seen[out->id()]) {
        seen[out->id()] = true;
        stack.push_back(out);
      }
    }
  }
  return false;
}

class StepOrderPass : public tensorflow::GraphOptimizationPass {
 public:
  Status Run(const tensorflow::GraphOptimizationPassOptions& options) override {
    if (options.graph == nullptr || *options.graph == nullptr) {
      return tensorflow::OkStatus();
    }
    Graph* graph = options.graph->get();
    std::vector<Node*> lookups, sends;
    for (Node* n : graph->op_nodes()) {  // id (creation) order
      if (IsEmbeddingLookup(n)) lookups.push_back(n);
      if (IsEmbeddingSend(n)) sends.push_back(n);
    }
    if (lookups.empty() || sends.empty()) return tensorflow::OkStatus();

    // A control edge may not cross loop frames; a graph whose frames TF
    // cannot work out is left to TF's own error.
    std::vector<tensorflow::ControlFlowInfo> frames;
    if (!tensorflow::BuildControlFlowInfo(graph, &frames).ok()) {
      return tensorflow::OkStatus();
    }
    using Key = std::tuple<std::string, std::string, std::string>;
    const auto key = [&frames](const Node* n) {
      std::string config;
      tensorflow::TryGetNodeAttr(n->attrs(), "config", &config);
      return Key(n->assigned_device_name(), config,
                 frames[n->id()].frame_name);
    };
    std::map<Key, std::pair<std::vector<Node*>, std::vector<Node*>>> by_core;
    for (Node* n : lookups) by_core[key(n)].first.push_back(n);
    for (Node* n : sends) by_core[key(n)].second.push_back(n);
    for (const auto& [core, ops] : by_core) {
      const auto& [core_lookups, core_sends] = ops;
      if (core_lookups.size() != core_sends.size()) continue;
      for (size_t i = 0; i < core_sends.size(); ++i) {
        if (Reaches(*graph, core_sends[i], core_lookups[i])) continue;
        graph->AddControlEdge(core_lookups[i], core_sends[i]);
      }
    }
    return tensorflow::OkStatus();
  }
};

// After the routing pass (POST_PLACEMENT) and after TF prunes the graph to
// the run's fetches, so that only lookups this run executes order sends.
REGISTER_OPTIMIZATION(
    tensorflow::OptimizationPassRegistry::POST_REWRITE_FOR_EXEC, 50,
    StepOrderPass);

}  // namespace
}  // namespace tpu_embed_adam
