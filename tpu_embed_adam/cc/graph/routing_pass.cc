// Routes a multi-host TPU embedding step over TF's own runtime.
//
// With one worker process per host, each process's engine holds only its
// host's shards, so a core's lookup needs rows from every host and its
// gradients belong to every host. After placement, for every configuration
// with several hosts, this pass rewrites
//
//   RecvTPUEmbeddingActivations on core (h, k)  into
//     TpuEmbedAdamRouteIds on (h, k) -> TpuEmbedAdamGatherRows on each host o
//     -> TpuEmbedAdamCombineActivations on (h, k), named as the Recv was;
//   the SendTPUEmbeddingGradients of one step (one per core) into
//     TpuEmbedAdamSplitGradients on each core -> TpuEmbedAdamApplyGradients
//     on each host o (every core's rows for o, in core order, and the first
//     core's learning rates) -> a NoOp named as each Send was;
//
// and makes every enqueue, load and retrieve op of such a configuration wait
// for a TpuEmbedAdamEnsureConfigured on its device, since TF puts the
// configuration on one load op only (not those that already follow a
// ConfigureTPUEmbedding on their device, which installs theirs). TF's partitioner then inserts its own
// _Send/_Recv pairs wherever an edge crosses processes. Keeping the names
// keeps fetches, feeds and control edges of the user's graph valid. With
// in-process workers the same ops run against the one shared engine.
#include <algorithm>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "tensorflow/core/common_runtime/device_set.h"
#include "tensorflow/core/common_runtime/optimization_registry.h"
#include "tensorflow/core/framework/node_def_util.h"
#include "tensorflow/core/graph/graph.h"
#include "tensorflow/core/platform/errors.h"
#include "tensorflow/core/protobuf/tpu/tpu_embedding_configuration.pb.h"
#include "tensorflow/core/util/device_name_utils.h"

namespace tpu_embed_adam {
namespace {

using tensorflow::DeviceNameUtils;
using tensorflow::Edge;
using tensorflow::Graph;
using tensorflow::Node;
using tensorflow::NodeDef;
using tensorflow::Status;

constexpr char kRecv[] = "RecvTPUEmbeddingActivations";
constexpr char kSend[] = "SendTPUEmbeddingGradients";

// Hosts of a serialized configuration; 1 when it does not parse (the ops'
// own kernels then report it).
int64_t NumHosts(const std::string& config) {
  tensorflow::tpu::TPUEmbeddingConfiguration proto;
  if (!proto.ParseFromString(config)) return 1;
  return std::max<int64_t>(1, proto.num_hosts());
}

std::string ConfigOf(const Node* n) {
  std::string config;
  if (!tensorflow::TryGetNodeAttr(n->attrs(), "config", &config)) return "";
  return config;
}

// A node's edges, copied so that they survive its removal.
struct SavedEdges {
  std::vector<Node*> control_in, control_out;
  std::vector<std::pair<Node*, int>> data_in;  // by input index
  std::vector<std::tuple<int, Node*, int>> data_out;
};

SavedEdges SaveEdges(const Node* n) {
  SavedEdges saved;
  saved.data_in.resize(n->num_inputs());
  for (const Edge* e : n->in_edges()) {
    if (e->IsControlEdge()) {
      saved.control_in.push_back(e->src());
    } else {
      saved.data_in[e->dst_input()] = {e->src(), e->src_output()};
    }
  }
  for (const Edge* e : n->out_edges()) {
    if (e->IsControlEdge()) {
      saved.control_out.push_back(e->dst());
    } else {
      saved.data_out.emplace_back(e->src_output(), e->dst(), e->dst_input());
    }
  }
  return saved;
}

class Rewriter {
 public:
  Rewriter(Graph* graph, const tensorflow::DeviceSet* devices)
      : graph_(graph), devices_(devices) {}

  // The CPU:0 device of each host's task in `device`'s job, if all exist.
  bool OwnerDevices(const std::string& device, int64_t hosts,
                    std::vector<std::string>* owners) {
    DeviceNameUtils::ParsedName name;
    if (!DeviceNameUtils::ParseFullName(device, &name) || !name.has_job) {
      return false;
    }
    owners->clear();
    for (int64_t o = 0; o < hosts; ++o) {
      name.task = o;
      name.has_task = true;
      name.type = "CPU";
      name.has_type = true;
      name.id = 0;
      name.has_id = true;
      owners->push_back(DeviceNameUtils::ParsedNameToString(name));
      if (devices_->FindDeviceByName(owners->back()) == nullptr) return false;
    }
    return true;
  }

  Status AddNode(const std::string& name, const std::string& op,
                 const std::string& device,
                 const std::vector<std::pair<std::string, tensorflow::AttrValue>>&
                     attrs,
                 Node** out) {
    NodeDef def;
    def.set_name(name);
    def.set_op(op);
    def.set_device(device);
    for (const auto& [key, value] : attrs) (*def.mutable_attr())[key] = value;
    Status status;
    *out = graph_->AddNode(std::move(def), &status);
    TF_RETURN_IF_ERROR(status);
    (*out)->set_assigned_device_name(device);
    return tensorflow::OkStatus();
  }

  Status RewriteRecv(Node* recv, const std::string& config,
                     const std::vector<std::string>& owners) {
    const std::string name = recv->name();
    const std::string device = recv->assigned_device_name();
    int64_t num_outputs = 0;
    TF_RETURN_IF_ERROR(
        tensorflow::GetNodeAttr(recv->attrs(), "num_outputs", &num_outputs));
    const SavedEdges saved = SaveEdges(recv);
    const int64_t hosts = owners.size();
    Node* route = nullptr;
    TF_RETURN_IF_ERROR(AddNode(graph_->NewName(name + "/route_ids"),
                               "TpuEmbedAdamRouteIds", device,
                               {{"num_owners", Attr(hosts)},
                                {"config", Attr(config)}},
                               &route));
    for (Node* src : saved.control_in) graph_->AddControlEdge(src, route);
    std::vector<Node*> gathers(hosts);
    for (int64_t o = 0; o < hosts; ++o) {
      TF_RETURN_IF_ERROR(AddNode(graph_->NewName(name + "/gather_rows"),
                                 "TpuEmbedAdamGatherRows", owners[o],
                                 {{"config", Attr(config)}}, &gathers[o]));
      graph_->AddEdge(route, o, gathers[o], 0);
    }
    graph_->RemoveNode(recv);
    Node* combine = nullptr;
    TF_RETURN_IF_ERROR(AddNode(name, "TpuEmbedAdamCombineActivations", device,
                               {{"num_owners", Attr(hosts)},
                                {"num_outputs", Attr(num_outputs)},
                                {"config", Attr(config)}},
                               &combine));
    for (int64_t o = 0; o < hosts; ++o) graph_->AddEdge(gathers[o], 0, combine, o);
    for (const auto& [output, dst, input] : saved.data_out) {
      graph_->AddEdge(combine, output, dst, input);
    }
    for (Node* dst : saved.control_out) graph_->AddControlEdge(combine, dst);
    return tensorflow::OkStatus();
  }

  // `sends`: one step's Send ops, in core order.
  Status RewriteStep(const std::vector<Node*>& sends, const std::string& config,
                     const std::vector<std::string>& owners) {
    const int64_t hosts = owners.size();
    const int64_t cores = sends.size();
    std::vector<SavedEdges> saved;
    std::vector<Node*> splits(cores);
    int64_t num_rates = 0;
    for (int64_t c = 0; c < cores; ++c) {
      Node* send = sends[c];
      saved.push_back(SaveEdges(send));
      int64_t n = 0, nn = 0;
      TF_RETURN_IF_ERROR(tensorflow::GetNodeAttr(send->attrs(), "N", &n));
      TF_RETURN_IF_ERROR(tensorflow::GetNodeAttr(send->attrs(), "NN", &nn));
      if (c == 0) num_rates = nn;
      TF_RETURN_IF_ERROR(AddNode(graph_->NewName(send->name() + "/split_gradients"),
                                 "TpuEmbedAdamSplitGradients",
                                 send->assigned_device_name(),
                                 {{"N", Attr(n)},
                                  {"num_owners", Attr(hosts)},
                                  {"config", Attr(config)}},
                                 &splits[c]));
      for (int64_t i = 0; i < n; ++i) {
        const auto& [src, output] = saved[c].data_in[i];
        graph_->AddEdge(src, output, splits[c], i);
      }
      for (Node* src : saved[c].control_in) graph_->AddControlEdge(src, splits[c]);
    }
    int64_t first_rate = 0;
    TF_RETURN_IF_ERROR(tensorflow::GetNodeAttr(sends[0]->attrs(), "N", &first_rate));
    std::vector<Node*> applies(hosts);
    for (int64_t o = 0; o < hosts; ++o) {
      TF_RETURN_IF_ERROR(AddNode(graph_->NewName(sends[0]->name() + "/apply_gradients"),
                                 "TpuEmbedAdamApplyGradients", owners[o],
                                 {{"num_cores", Attr(cores)},
                                  {"NN", Attr(num_rates)},
                                  {"config", Attr(config)}},
                                 &applies[o]));
      for (int64_t c = 0; c < cores; ++c) {
        graph_->AddEdge(splits[c], o, applies[o], c);
        graph_->AddEdge(splits[c], hosts + o, applies[o], cores + c);
      }
      for (int64_t j = 0; j < num_rates; ++j) {
        const auto& [src, output] = saved[0].data_in[first_rate + j];
        graph_->AddEdge(src, output, applies[o], 2 * cores + j);
      }
    }
    for (int64_t c = 0; c < cores; ++c) {
      const std::string name = sends[c]->name();
      const std::string device = sends[c]->assigned_device_name();
      graph_->RemoveNode(sends[c]);
      Node* done = nullptr;
      TF_RETURN_IF_ERROR(AddNode(name, "NoOp", device, {}, &done));
      for (Node* apply : applies) graph_->AddControlEdge(apply, done);
      for (Node* dst : saved[c].control_out) graph_->AddControlEdge(done, dst);
    }
    return tensorflow::OkStatus();
  }

  // Makes `op` wait for `config` to be installed in its process.
  Status EnsureConfiguredBefore(Node* op, const std::string& config) {
    const std::string device = op->assigned_device_name();
    Node*& ensure = ensure_by_device_[device];
    if (ensure == nullptr) {
      TF_RETURN_IF_ERROR(AddNode(graph_->NewName("tpu_embed_adam/ensure_configured"),
                                 "TpuEmbedAdamEnsureConfigured", device,
                                 {{"config", Attr(config)}}, &ensure));
    }
    graph_->AddControlEdge(ensure, op);
    return tensorflow::OkStatus();
  }

 private:
  template <typename T>
  static tensorflow::AttrValue Attr(const T& value) {
    tensorflow::AttrValue attr;
    tensorflow::SetAttrValue(value, &attr);
    return attr;
  }

  Graph* graph_;
  const tensorflow::DeviceSet* devices_;
  std::map<std::string, Node*> ensure_by_device_;
};

// Whether `op` runs after a ConfigureTPUEmbedding on its own device (an
// ancestor within a few edges: TF puts a load's control dependencies on the
// reads of its variables): it then runs under the configuration that op
// installs, and an EnsureConfigured of its own could run before that op and
// see the configuration it replaces (an evaluation's loads after training).
bool FollowsConfigureOnItsDevice(const Node* op) {
  constexpr int kMaxVisited = 64;
  std::vector<const Node*> frontier{op};
  std::set<const Node*> seen{op};
  while (!frontier.empty() && static_cast<int>(seen.size()) < kMaxVisited) {
    const Node* n = frontier.back();
    frontier.pop_back();
    for (const Edge* e : n->in_edges()) {
      const Node* src = e->src();
      if (!src->IsOp() || !seen.insert(src).second) continue;
      if (src->type_string() == "ConfigureTPUEmbedding") {
        if (src->assigned_device_name() == op->assigned_device_name()) return true;
        continue;
      }
      frontier.push_back(src);
    }
  }
  return false;
}

class RoutingPass : public tensorflow::GraphOptimizationPass {
 public:
  Status Run(const tensorflow::GraphOptimizationPassOptions& options) override {
    if (options.graph == nullptr || *options.graph == nullptr ||
        options.device_set == nullptr) {
      return tensorflow::OkStatus();
    }
    Graph* graph = options.graph->get();
    std::vector<Node*> recvs, sends, host_ops;
    for (Node* n : graph->op_nodes()) {
      const std::string& op = n->type_string();
      if (op == kRecv) {
        recvs.push_back(n);
      } else if (op == kSend) {
        sends.push_back(n);
      } else if (absl::StartsWith(op, "EnqueueTPUEmbedding") ||
                 absl::StartsWith(op, "LoadTPUEmbedding") ||
                 absl::StartsWith(op, "RetrieveTPUEmbedding")) {
        host_ops.push_back(n);
      }
    }
    if (recvs.empty() && sends.empty()) return tensorflow::OkStatus();

    Rewriter rewriter(graph, options.device_set);
    std::map<std::string, int64_t> hosts_of;  // parsed once per config
    const auto hosts = [&](const std::string& config) {
      auto it = hosts_of.find(config);
      if (it == hosts_of.end()) it = hosts_of.emplace(config, NumHosts(config)).first;
      return it->second;
    };
    std::set<std::string> routed;  // configurations rewritten
    std::vector<std::string> owners;
    for (Node* recv : recvs) {
      const std::string config = ConfigOf(recv);
      if (hosts(config) < 2 ||
          !rewriter.OwnerDevices(recv->assigned_device_name(), hosts(config),
                                 &owners)) {
        continue;
      }
      TF_RETURN_IF_ERROR(rewriter.RewriteRecv(recv, config, owners));
      routed.insert(config);
    }
    // A step is the i-th Send of every core (in creation order): a graph
    // that builds its training step twice has two steps.
    std::map<std::pair<std::string, int>, std::map<std::pair<int, int>, Node*>>
        steps;
    std::map<std::pair<std::string, std::pair<int, int>>, int> seen;
    for (Node* send : sends) {  // op_nodes() runs in id (creation) order
      const std::string config = ConfigOf(send);
      DeviceNameUtils::ParsedName name;
      if (hosts(config) < 2 ||
          !DeviceNameUtils::ParseFullName(send->assigned_device_name(), &name) ||
          !rewriter.OwnerDevices(send->assigned_device_name(), hosts(config),
                                 &owners)) {
        continue;
      }
      const std::pair<int, int> core{name.task, name.has_id ? name.id : 0};
      const int index = seen[{config, core}]++;
      steps[{config, index}][core] = send;
    }
    for (const auto& [key, by_core] : steps) {
      std::vector<Node*> step;
      for (const auto& [core, send] : by_core) step.push_back(send);
      rewriter.OwnerDevices(step[0]->assigned_device_name(), hosts(key.first),
                            &owners);
      TF_RETURN_IF_ERROR(rewriter.RewriteStep(step, key.first, owners));
      routed.insert(key.first);
    }
    // Host ops do not say which configuration they belong to: only with
    // one routed configuration is it known.
    if (routed.size() == 1) {
      for (Node* op : host_ops) {
        if (!ConfigOf(op).empty() || FollowsConfigureOnItsDevice(op)) continue;
        TF_RETURN_IF_ERROR(rewriter.EnsureConfiguredBefore(op, *routed.begin()));
      }
    }
    return tensorflow::OkStatus();
  }
};

REGISTER_OPTIMIZATION(tensorflow::OptimizationPassRegistry::POST_PLACEMENT, 50,
                      RoutingPass);

}  // namespace
}  // namespace tpu_embed_adam
