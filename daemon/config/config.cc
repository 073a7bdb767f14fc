#include "daemon/config/config.h"

#include <yaml-cpp/yaml.h>

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace spectrumkv {
namespace {

using FieldFn = std::function<void(const YAML::Node&, const std::string&)>;

// Walks YAML nodes against the schema, collecting every error with its position.
class Reader {
 public:
  explicit Reader(std::string filename) : filename_(std::move(filename)) {}

  void Error(const YAML::Node& node, const std::string& path, const std::string& message) {
    const YAML::Mark m = node.Mark();
    if (m.line >= 0) {
      errors_.push_back(
          absl::StrFormat("%s:%d:%d: %s: %s", filename_, m.line + 1, m.column + 1, path, message));
    } else {
      errors_.push_back(absl::StrFormat("%s: %s: %s", filename_, path, message));
    }
  }

  // Visits a mapping: known keys go to their field function; unknown and duplicate keys are
  // errors. A null node (empty section) is accepted as "all defaults".
  void Map(const YAML::Node& node, const std::string& path,
           const std::map<std::string, FieldFn>& fields) {
    if (node.IsNull()) return;
    if (!node.IsMap()) {
      Error(node, path.empty() ? "(top level)" : path, "expected a mapping");
      return;
    }
    std::set<std::string> seen;
    for (const auto& kv : node) {
      const std::string key = kv.first.as<std::string>();
      const std::string child = path.empty() ? key : path + "." + key;
      if (!seen.insert(key).second) {
        Error(kv.first, child, "duplicate key");
        continue;
      }
      auto it = fields.find(key);
      if (it == fields.end()) {
        std::vector<std::string> known;
        for (const auto& f : fields) known.push_back(f.first);
        Error(kv.first, child, "unknown key (known: " + absl::StrJoin(known, ", ") + ")");
        continue;
      }
      it->second(kv.second, child);
    }
  }

  bool Scalar(const YAML::Node& node, const std::string& path, std::string* out) {
    if (!node.IsScalar()) {
      Error(node, path, "expected a scalar value");
      return false;
    }
    *out = node.Scalar();
    return true;
  }

  void String(const YAML::Node& node, const std::string& path, std::string* out,
              const std::vector<std::string>& allowed = {}) {
    std::string s;
    if (node.IsNull()) {
      *out = "";
      if (!allowed.empty()) Error(node, path, "must be one of " + absl::StrJoin(allowed, ", "));
      return;
    }
    if (!Scalar(node, path, &s)) return;
    if (!allowed.empty() && std::find(allowed.begin(), allowed.end(), s) == allowed.end()) {
      Error(node, path, "\"" + s + "\" is not one of " + absl::StrJoin(allowed, ", "));
      return;
    }
    *out = s;
  }

  void Uint32(const YAML::Node& node, const std::string& path, uint32_t* out, uint32_t min,
              uint32_t max) {
    std::string s;
    if (!Scalar(node, path, &s)) return;
    char* end = nullptr;
    errno = 0;
    const unsigned long long v = std::strtoull(s.c_str(), &end, 10);
    if (s.empty() || *end != '\0' || errno != 0 || s[0] == '-' || v < min || v > max) {
      Error(node, path, absl::StrFormat("\"%s\" is not an integer in [%u, %u]", s, min, max));
      return;
    }
    *out = static_cast<uint32_t>(v);
  }

  void Bytes(const YAML::Node& node, const std::string& path, uint64_t* out, uint64_t min,
             uint64_t max) {
    std::string s;
    if (!Scalar(node, path, &s)) return;
    absl::StatusOr<uint64_t> v = ParseByteSize(s);
    if (!v.ok() || *v < min || *v > max) {
      Error(node, path,
            absl::StrFormat("\"%s\" is not a size in [%u, %u] bytes (e.g. 512MiB, 4GiB)", s, min,
                            max));
      return;
    }
    *out = *v;
  }

  void Double(const YAML::Node& node, const std::string& path, double* out, double min, double max,
              bool min_exclusive = false) {
    std::string s;
    if (!Scalar(node, path, &s)) return;
    char* end = nullptr;
    const double v = std::strtod(s.c_str(), &end);
    const bool below = min_exclusive ? v <= min : v < min;
    if (s.empty() || *end != '\0' || !std::isfinite(v) || below || v > max) {
      Error(node, path,
            absl::StrFormat("\"%s\" is not a number in %s%g, %g]", s, min_exclusive ? "(" : "[",
                            min, max));
      return;
    }
    *out = v;
  }

  void Bool(const YAML::Node& node, const std::string& path, bool* out) {
    std::string s;
    if (!Scalar(node, path, &s)) return;
    if (s == "true") {
      *out = true;
    } else if (s == "false") {
      *out = false;
    } else {
      Error(node, path, "\"" + s + "\" is not true or false");
    }
  }

  const std::vector<std::string>& errors() const { return errors_; }

 private:
  std::string filename_;
  std::vector<std::string> errors_;
};

const std::vector<std::string> kPolicies = {"3tier",        "2tier",  "sinkprotect", "uniform_int8",
                                            "uniform_int4", "pdtrim", "random_tier"};
const std::vector<std::string> kScoring = {"attention", "key_norm", "external", "positional"};

constexpr uint64_t kMaxBytes = uint64_t{1} << 50;

void ParseRoot(Reader& r, const YAML::Node& root, DaemonConfig& c) {
  r.Map(
      root, "",
      {
          {"node_name",
           [&](const YAML::Node& n, const std::string& p) { r.String(n, p, &c.node_name); }},
          {"listen",
           [&](const YAML::Node& n, const std::string& p) {
             r.Map(n, p,
                   {{"unix_socket",
                     [&](const YAML::Node& m, const std::string& q) {
                       r.String(m, q, &c.listen.unix_socket);
                     }},
                    {"tcp", [&](const YAML::Node& m, const std::string& q) {
                       r.String(m, q, &c.listen.tcp);
                     }}});
           }},
          {"metrics",
           [&](const YAML::Node& n, const std::string& p) {
             r.Map(n, p, {{"address", [&](const YAML::Node& m, const std::string& q) {
                             r.String(m, q, &c.metrics.address);
                           }}});
           }},
          {"transport",
           [&](const YAML::Node& n, const std::string& p) {
             r.Map(
                 n, p,
                 {{"kind",
                   [&](const YAML::Node& m, const std::string& q) {
                     r.String(m, q, &c.transport.kind, {"inproc", "ucx"});
                   }},
                  {"address", [&](const YAML::Node& m,
                                  const std::string& q) { r.String(m, q, &c.transport.address); }},
                  {"advertise_host",
                   [&](const YAML::Node& m, const std::string& q) {
                     r.String(m, q, &c.transport.advertise_host);
                   }},
                  {"ucx_tls", [&](const YAML::Node& m,
                                  const std::string& q) { r.String(m, q, &c.transport.ucx_tls); }},
                  {"ucx_lanes",
                   [&](const YAML::Node& m, const std::string& q) {
                     r.Uint32(m, q, &c.transport.ucx_lanes, 1, 64);
                   }},
                  {"ucx_chunks_in_flight",
                   [&](const YAML::Node& m, const std::string& q) {
                     r.Uint32(m, q, &c.transport.ucx_chunks_in_flight, 1, 64);
                   }},
                  {"ucx_options", [&](const YAML::Node& m, const std::string& q) {
                     if (m.IsNull()) return;
                     if (!m.IsMap()) {
                       r.Error(m, q, "expected a mapping of UCX setting to value");
                       return;
                     }
                     for (const auto& kv : m) {
                       const std::string key = kv.first.as<std::string>();
                       std::string value;
                       r.String(kv.second, q + "." + key, &value);
                       if (!c.transport.ucx_options.emplace(key, value).second) {
                         r.Error(kv.first, q + "." + key, "duplicate key");
                       }
                     }
                   }}});
           }},
          {"limits",
           [&](const YAML::Node& n, const std::string& p) {
             LimitsConfig& l = c.limits;
             r.Map(
                 n, p,
                 {
                     {"max_inflight_transfers",
                      [&](const YAML::Node& m, const std::string& q) {
                        r.Uint32(m, q, &l.max_inflight_transfers, 1, 100000);
                      }},
                     {"max_inflight_bytes",
                      [&](const YAML::Node& m, const std::string& q) {
                        r.Bytes(m, q, &l.max_inflight_bytes, 1 << 20, kMaxBytes);
                      }},
                     {"staging_bytes",
                      [&](const YAML::Node& m, const std::string& q) {
                        r.Bytes(m, q, &l.staging_bytes, 1 << 20, kMaxBytes);
                      }},
                     {"staging_prefault",
                      [&](const YAML::Node& m, const std::string& q) {
                        r.Bool(m, q, &l.staging_prefault);
                      }},
                     {"staging_lock", [&](const YAML::Node& m,
                                          const std::string& q) { r.Bool(m, q, &l.staging_lock); }},
                     {"early_buffer_bytes",
                      [&](const YAML::Node& m, const std::string& q) {
                        r.Bytes(m, q, &l.early_buffer_bytes, 0, kMaxBytes);
                      }},
                     {"early_ttl_s",
                      [&](const YAML::Node& m, const std::string& q) {
                        r.Double(m, q, &l.early_ttl_s, 0.001, 86400);
                      }},
                     {"default_deadline_s",
                      [&](const YAML::Node& m, const std::string& q) {
                        r.Double(m, q, &l.default_deadline_s, 0.001, 86400);
                      }},
                     {"max_deadline_s",
                      [&](const YAML::Node& m, const std::string& q) {
                        r.Double(m, q, &l.max_deadline_s, 0.001, 86400);
                      }},
                     {"result_ttl_s",
                      [&](const YAML::Node& m, const std::string& q) {
                        r.Double(m, q, &l.result_ttl_s, 0, 86400);
                      }},
                     {"max_message_bytes",
                      [&](const YAML::Node& m, const std::string& q) {
                        r.Bytes(m, q, &l.max_message_bytes, 1 << 16, 1ull << 31);
                      }},
                     {"max_pools",
                      [&](const YAML::Node& m, const std::string& q) {
                        r.Uint32(m, q, &l.max_pools, 1, 4096);
                      }},
                     {"drain_timeout_s",
                      [&](const YAML::Node& m, const std::string& q) {
                        r.Double(m, q, &l.drain_timeout_s, 0, 3600);
                      }},
                 });
           }},
          {"codec",
           [&](const YAML::Node& n, const std::string& p) {
             CodecConfig& k = c.codec;
             r.Map(n, p,
                   {
                       {"backend",
                        [&](const YAML::Node& m, const std::string& q) {
                          r.String(m, q, &k.backend, {"auto", "cpu", "cpu-scalar", "cuda"});
                        }},
                       {"budget",
                        [&](const YAML::Node& m, const std::string& q) {
                          r.Double(m, q, &k.budget, 0.0, 1.0, true);
                        }},
                       {"budget_kind",
                        [&](const YAML::Node& m, const std::string& q) {
                          r.String(m, q, &k.budget_kind, {"element", "wire"});
                        }},
                       {"policy",
                        [&](const YAML::Node& m, const std::string& q) {
                          r.String(m, q, &k.policy, kPolicies);
                        }},
                       {"scoring",
                        [&](const YAML::Node& m, const std::string& q) {
                          r.String(m, q, &k.scoring, kScoring);
                        }},
                       {"quantizer",
                        [&](const YAML::Node& m, const std::string& q) {
                          r.String(m, q, &k.quantizer, {"absmax", "kcn", "progressive"});
                        }},
                       {"on_unreachable",
                        [&](const YAML::Node& m, const std::string& q) {
                          r.String(m, q, &k.on_unreachable, {"drop", "reject"});
                        }},
                       {"sink_tokens",
                        [&](const YAML::Node& m, const std::string& q) {
                          r.Uint32(m, q, &k.sink_tokens, 0, 4096);
                        }},
                       {"chunk_bytes",
                        [&](const YAML::Node& m, const std::string& q) {
                          r.Bytes(m, q, &k.chunk_bytes, 64 << 10, 1ull << 32);
                        }},
                       {"min_chunk_bytes",
                        [&](const YAML::Node& m, const std::string& q) {
                          r.Bytes(m, q, &k.min_chunk_bytes, 64 << 10, 1ull << 32);
                        }},
                       {"worker_threads",
                        [&](const YAML::Node& m, const std::string& q) {
                          r.Uint32(m, q, &k.worker_threads, 1, 256);
                        }},
                       {"score_threads",
                        [&](const YAML::Node& m, const std::string& q) {
                          r.Uint32(m, q, &k.score_threads, 0, 256);
                        }},
                       {"pack_slices",
                        [&](const YAML::Node& m, const std::string& q) {
                          r.Uint32(m, q, &k.pack_slices, 0, 256);
                        }},
                       {"progressive_chunks_in_flight",
                        [&](const YAML::Node& m, const std::string& q) {
                          r.Uint32(m, q, &k.progressive_chunks_in_flight, 1, 64);
                        }},
                       {"progressive_score_threads",
                        [&](const YAML::Node& m, const std::string& q) {
                          r.Uint32(m, q, &k.progressive_score_threads, 1, 256);
                        }},
                       {"worker_nice",
                        [&](const YAML::Node& m, const std::string& q) {
                          r.Uint32(m, q, &k.worker_nice, 0, 19);
                        }},
                   });
           }},
          {"models",
           [&](const YAML::Node& n, const std::string& p) {
             if (n.IsNull()) return;
             if (!n.IsMap()) {
               r.Error(n, p, "expected a mapping of model name to policy");
               return;
             }
             std::set<std::string> seen;
             for (const auto& kv : n) {
               ModelPolicyConfig m;
               m.model = kv.first.as<std::string>();
               const std::string q = p + "." + m.model;
               if (!seen.insert(m.model).second) {
                 r.Error(kv.first, q, "duplicate key");
                 continue;
               }
               r.Map(kv.second, q,
                     {{"allow_int4", [&](const YAML::Node& x,
                                         const std::string& y) { r.Bool(x, y, &m.allow_int4); }},
                      {"allow_int8", [&](const YAML::Node& x,
                                         const std::string& y) { r.Bool(x, y, &m.allow_int8); }},
                      {"source", [&](const YAML::Node& x, const std::string& y) {
                         r.String(x, y, &m.source);
                       }}});
               c.models.push_back(m);
             }
           }},
          {"logging",
           [&](const YAML::Node& n, const std::string& p) {
             r.Map(
                 n, p,
                 {{"level",
                   [&](const YAML::Node& m, const std::string& q) {
                     r.String(m, q, &c.logging.level, {"trace", "debug", "info", "warn", "error"});
                   }},
                  {"format", [&](const YAML::Node& m, const std::string& q) {
                     r.String(m, q, &c.logging.format, {"text", "json"});
                   }}});
           }},
      });
}

}  // namespace

absl::StatusOr<uint64_t> ParseByteSize(const std::string& text) {
  static const std::pair<const char*, uint64_t> kUnits[] = {
      {"KiB", 1ull << 10}, {"MiB", 1ull << 20}, {"GiB", 1ull << 30},   {"TiB", 1ull << 40},
      {"KB", 1000ull},     {"MB", 1000000ull},  {"GB", 1000000000ull}, {"TB", 1000000000000ull},
      {"B", 1ull},         {"", 1ull}};
  size_t digits = 0;
  while (digits < text.size() && text[digits] >= '0' && text[digits] <= '9') ++digits;
  if (digits == 0 || digits > 15) {
    return absl::InvalidArgumentError("not a byte size: \"" + text + "\"");
  }
  const uint64_t number = std::stoull(text.substr(0, digits));
  const std::string unit = text.substr(digits);
  for (const auto& [name, scale] : kUnits) {
    if (unit == name) {
      if (number > ~uint64_t{0} / scale) break;
      return number * scale;
    }
  }
  return absl::InvalidArgumentError("not a byte size: \"" + text + "\"");
}

absl::StatusOr<DaemonConfig> ParseConfig(const std::string& yaml, const std::string& filename) {
  DaemonConfig config;
  YAML::Node root;
  try {
    root = YAML::Load(yaml);
  } catch (const YAML::ParserException& e) {
    return absl::InvalidArgumentError(absl::StrFormat("%s:%d:%d: syntax error: %s", filename,
                                                      e.mark.line + 1, e.mark.column + 1, e.msg));
  }
  Reader reader(filename);
  try {
    ParseRoot(reader, root, config);
  } catch (const YAML::Exception& e) {  // e.g. a non-scalar map key
    return absl::InvalidArgumentError(
        absl::StrFormat("%s:%d:%d: %s", filename, e.mark.line + 1, e.mark.column + 1, e.msg));
  }
  if (!reader.errors().empty()) {
    return absl::InvalidArgumentError(absl::StrJoin(reader.errors(), "\n"));
  }
  return config;
}

absl::StatusOr<DaemonConfig> LoadConfigFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError("cannot read config file " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseConfig(ss.str(), path);
}

absl::Status ValidateConfig(const DaemonConfig& c) {
  std::vector<std::string> errors;
  if (c.node_name.empty()) errors.push_back("node_name: must not be empty");
  if (c.listen.unix_socket.empty() && c.listen.tcp.empty()) {
    errors.push_back("listen: set unix_socket or tcp (or both)");
  }
  if (c.codec.chunk_bytes > c.limits.staging_bytes) {
    errors.push_back("codec.chunk_bytes: larger than limits.staging_bytes");
  }
  if (c.limits.default_deadline_s > c.limits.max_deadline_s) {
    errors.push_back("limits.default_deadline_s: larger than limits.max_deadline_s");
  }
  if (c.limits.max_inflight_bytes < c.codec.chunk_bytes) {
    errors.push_back("limits.max_inflight_bytes: smaller than codec.chunk_bytes");
  }
  std::set<std::string> models;
  for (const ModelPolicyConfig& m : c.models) {
    if (m.model.empty()) errors.push_back("models: empty model name");
    if (m.allow_int4 && !m.allow_int8) {
      errors.push_back("models." + m.model + ": allow_int4 without allow_int8 is not supported");
    }
  }
  if (!errors.empty()) return absl::InvalidArgumentError(absl::StrJoin(errors, "\n"));
  return absl::OkStatus();
}

std::string ConfigToYaml(const DaemonConfig& c) {
  YAML::Emitter out;
  out << YAML::BeginMap;
  out << YAML::Key << "node_name" << YAML::Value << c.node_name;
  out << YAML::Key << "listen" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "unix_socket" << YAML::Value << c.listen.unix_socket;
  out << YAML::Key << "tcp" << YAML::Value << c.listen.tcp << YAML::EndMap;
  out << YAML::Key << "metrics" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "address" << YAML::Value << c.metrics.address << YAML::EndMap;
  out << YAML::Key << "transport" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "kind" << YAML::Value << c.transport.kind;
  out << YAML::Key << "address" << YAML::Value << c.transport.address;
  out << YAML::Key << "advertise_host" << YAML::Value << c.transport.advertise_host;
  out << YAML::Key << "ucx_tls" << YAML::Value << c.transport.ucx_tls;
  out << YAML::Key << "ucx_lanes" << YAML::Value << c.transport.ucx_lanes;
  out << YAML::Key << "ucx_chunks_in_flight" << YAML::Value << c.transport.ucx_chunks_in_flight;
  out << YAML::Key << "ucx_options" << YAML::Value << YAML::BeginMap;
  for (const auto& [k, v] : c.transport.ucx_options) out << YAML::Key << k << YAML::Value << v;
  out << YAML::EndMap << YAML::EndMap;
  const LimitsConfig& l = c.limits;
  out << YAML::Key << "limits" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "max_inflight_transfers" << YAML::Value << l.max_inflight_transfers;
  out << YAML::Key << "max_inflight_bytes" << YAML::Value << l.max_inflight_bytes;
  out << YAML::Key << "staging_bytes" << YAML::Value << l.staging_bytes;
  out << YAML::Key << "staging_prefault" << YAML::Value << l.staging_prefault;
  out << YAML::Key << "staging_lock" << YAML::Value << l.staging_lock;
  out << YAML::Key << "early_buffer_bytes" << YAML::Value << l.early_buffer_bytes;
  out << YAML::Key << "early_ttl_s" << YAML::Value << l.early_ttl_s;
  out << YAML::Key << "default_deadline_s" << YAML::Value << l.default_deadline_s;
  out << YAML::Key << "max_deadline_s" << YAML::Value << l.max_deadline_s;
  out << YAML::Key << "result_ttl_s" << YAML::Value << l.result_ttl_s;
  out << YAML::Key << "max_message_bytes" << YAML::Value << l.max_message_bytes;
  out << YAML::Key << "max_pools" << YAML::Value << l.max_pools;
  out << YAML::Key << "drain_timeout_s" << YAML::Value << l.drain_timeout_s << YAML::EndMap;
  const CodecConfig& k = c.codec;
  out << YAML::Key << "codec" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "backend" << YAML::Value << k.backend;
  out << YAML::Key << "budget" << YAML::Value << k.budget;
  out << YAML::Key << "budget_kind" << YAML::Value << k.budget_kind;
  out << YAML::Key << "policy" << YAML::Value << k.policy;
  out << YAML::Key << "scoring" << YAML::Value << k.scoring;
  out << YAML::Key << "quantizer" << YAML::Value << k.quantizer;
  out << YAML::Key << "on_unreachable" << YAML::Value << k.on_unreachable;
  out << YAML::Key << "sink_tokens" << YAML::Value << k.sink_tokens;
  out << YAML::Key << "chunk_bytes" << YAML::Value << k.chunk_bytes;
  out << YAML::Key << "min_chunk_bytes" << YAML::Value << k.min_chunk_bytes;
  out << YAML::Key << "worker_threads" << YAML::Value << k.worker_threads;
  out << YAML::Key << "score_threads" << YAML::Value << k.score_threads;
  out << YAML::Key << "pack_slices" << YAML::Value << k.pack_slices;
  out << YAML::Key << "progressive_chunks_in_flight" << YAML::Value
      << k.progressive_chunks_in_flight;
  out << YAML::Key << "progressive_score_threads" << YAML::Value << k.progressive_score_threads;
  out << YAML::Key << "worker_nice" << YAML::Value << k.worker_nice << YAML::EndMap;
  out << YAML::Key << "models" << YAML::Value << YAML::BeginMap;
  for (const ModelPolicyConfig& m : c.models) {
    out << YAML::Key << m.model << YAML::Value << YAML::BeginMap;
    out << YAML::Key << "allow_int4" << YAML::Value << m.allow_int4;
    out << YAML::Key << "allow_int8" << YAML::Value << m.allow_int8;
    out << YAML::Key << "source" << YAML::Value << m.source << YAML::EndMap;
  }
  out << YAML::EndMap;
  out << YAML::Key << "logging" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "level" << YAML::Value << c.logging.level;
  out << YAML::Key << "format" << YAML::Value << c.logging.format << YAML::EndMap;
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

}  // namespace spectrumkv
