#include "daemon/config/config.h"

#include "gtest/gtest.h"

namespace spectrumkv {
namespace {

TEST(ConfigTest, DefaultsAreValid) {
  auto c = ParseConfig("", "empty.yaml");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(ValidateConfig(*c).ok());
  EXPECT_EQ(c->codec.policy, "3tier");
  EXPECT_EQ(c->limits.max_inflight_transfers, 64u);
}

TEST(ConfigTest, ParsesEveryKey) {
  const char* yaml = R"(
node_name: prefill-0
listen: {unix_socket: /tmp/x.sock, tcp: "127.0.0.1:5000"}
metrics: {address: "0.0.0.0:9464"}
transport: {kind: inproc, address: p0, ucx_lanes: 2, ucx_chunks_in_flight: 3}
limits:
  max_inflight_transfers: 8
  max_inflight_bytes: 3GiB
  staging_bytes: 512MiB
  staging_prefault: false
  staging_lock: false
  early_buffer_bytes: 100MB
  early_ttl_s: 2.5
  default_deadline_s: 10
  max_deadline_s: 60
  result_ttl_s: 0
  max_message_bytes: 16MiB
  max_pools: 3
  drain_timeout_s: 5
codec:
  backend: cpu
  budget: 0.3
  budget_kind: wire
  policy: 2tier
  scoring: attention
  quantizer: kcn
  on_unreachable: reject
  sink_tokens: 8
  chunk_bytes: 4MiB
  min_chunk_bytes: 256KiB
  worker_threads: 3
  score_threads: 12
  pack_slices: 1
  worker_nice: 10
  progressive_chunks_in_flight: 5
  progressive_score_threads: 2
models:
  qwen2.5-7b: {allow_int4: false, source: "probe 0/3"}
  llama3-8b: {allow_int4: true}
logging: {level: debug, format: json}
)";
  auto c = ParseConfig(yaml, "full.yaml");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->node_name, "prefill-0");
  EXPECT_EQ(c->listen.tcp, "127.0.0.1:5000");
  EXPECT_EQ(c->limits.max_inflight_bytes, 3ull << 30);
  EXPECT_EQ(c->limits.early_buffer_bytes, 100000000u);
  EXPECT_DOUBLE_EQ(c->limits.early_ttl_s, 2.5);
  EXPECT_FALSE(c->limits.staging_prefault);
  EXPECT_EQ(c->codec.chunk_bytes, 4u << 20);
  EXPECT_EQ(c->codec.min_chunk_bytes, 256u << 10);
  EXPECT_EQ(c->codec.score_threads, 12u);
  EXPECT_EQ(c->codec.pack_slices, 1u);
  EXPECT_EQ(c->codec.worker_nice, 10u);
  EXPECT_EQ(c->codec.progressive_chunks_in_flight, 5u);
  EXPECT_EQ(c->codec.progressive_score_threads, 2u);
  EXPECT_EQ(c->transport.ucx_lanes, 2u);
  EXPECT_EQ(c->transport.ucx_chunks_in_flight, 3u);
  EXPECT_EQ(c->codec.quantizer, "kcn");
  ASSERT_EQ(c->models.size(), 2u);
  EXPECT_EQ(c->models[0].model, "qwen2.5-7b");
  EXPECT_FALSE(c->models[0].allow_int4);
  EXPECT_EQ(c->logging.format, "json");
  EXPECT_TRUE(ValidateConfig(*c).ok());
  // The printed configuration parses back to the same values.
  auto again = ParseConfig(ConfigToYaml(*c), "printed.yaml");
  ASSERT_TRUE(again.ok()) << again.status() << "\n" << ConfigToYaml(*c);
  EXPECT_EQ(ConfigToYaml(*again), ConfigToYaml(*c));
}

TEST(ConfigTest, ErrorsNameFileLineAndKeyPath) {
  const char* yaml =
      "limits:\n  max_inflight_transfers: 0\n  max_inflight_bytse: 1GiB\n"
      "codec:\n  policy: 5tier\n  budget: 1.5\n";
  auto c = ParseConfig(yaml, "bad.yaml");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string m(c.status().message());
  EXPECT_NE(m.find("bad.yaml:2:27: limits.max_inflight_transfers"), std::string::npos) << m;
  EXPECT_NE(m.find("bad.yaml:3:3: limits.max_inflight_bytse: unknown key"), std::string::npos) << m;
  EXPECT_NE(m.find("bad.yaml:5:11: codec.policy: \"5tier\" is not one of"), std::string::npos) << m;
  EXPECT_NE(m.find("codec.budget"), std::string::npos) << m;
}

TEST(ConfigTest, DuplicateKeysAreRejected) {
  auto c = ParseConfig("codec:\n  budget: 0.5\n  budget: 0.3\n", "dup.yaml");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("dup.yaml:3:3: codec.budget: duplicate key"),
            std::string::npos)
      << c.status();
  c = ParseConfig("node_name: a\nnode_name: b\n", "dup.yaml");
  EXPECT_FALSE(c.ok());
}

TEST(ConfigTest, TypesAndSyntax) {
  EXPECT_FALSE(ParseConfig("limits: [1, 2]\n", "t.yaml").ok());
  EXPECT_FALSE(ParseConfig("limits:\n  max_pools: -1\n", "t.yaml").ok());
  EXPECT_FALSE(ParseConfig("limits:\n  max_pools: 1.5\n", "t.yaml").ok());
  EXPECT_FALSE(ParseConfig("transport: {ucx_lanes: 0}\n", "t.yaml").ok());
  EXPECT_FALSE(ParseConfig("transport: {ucx_lanes: 65}\n", "t.yaml").ok());
  EXPECT_FALSE(ParseConfig("transport: {ucx_chunks_in_flight: 0}\n", "t.yaml").ok());
  EXPECT_FALSE(ParseConfig("transport: {ucx_chunks_in_flight: 65}\n", "t.yaml").ok());
  EXPECT_FALSE(ParseConfig("codec: {min_chunk_bytes: 1KiB}\n", "t.yaml").ok());
  EXPECT_FALSE(ParseConfig("codec: {score_threads: 257}\n", "t.yaml").ok());
  EXPECT_FALSE(ParseConfig("codec: {pack_slices: 257}\n", "t.yaml").ok());
  EXPECT_FALSE(ParseConfig("codec: {worker_nice: 20}\n", "t.yaml").ok());
  EXPECT_FALSE(ParseConfig("codec: {worker_nice: -1}\n", "t.yaml").ok());
  EXPECT_FALSE(ParseConfig("codec: {progressive_chunks_in_flight: 0}\n", "t.yaml").ok());
  EXPECT_FALSE(ParseConfig("codec: {progressive_score_threads: 0}\n", "t.yaml").ok());
  EXPECT_FALSE(ParseConfig("limits:\n  staging_prefault: yes\n", "t.yaml").ok());
  EXPECT_FALSE(ParseConfig("limits:\n  staging_bytes: 12XB\n", "t.yaml").ok());
  auto c = ParseConfig("codec: {budget: 0.5\n", "syntax.yaml");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("syntax.yaml:"), std::string::npos);
  EXPECT_NE(c.status().message().find("syntax error"), std::string::npos);
}

TEST(ConfigTest, CrossFieldChecks) {
  DaemonConfig c;
  c.listen.unix_socket.clear();
  c.codec.chunk_bytes = 4ull << 30;
  c.limits.default_deadline_s = 1000;
  const absl::Status s = ValidateConfig(c);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("listen"), std::string::npos);
  EXPECT_NE(s.message().find("codec.chunk_bytes"), std::string::npos);
  EXPECT_NE(s.message().find("default_deadline_s"), std::string::npos);
}

TEST(ConfigTest, ByteSizes) {
  EXPECT_EQ(*ParseByteSize("4GiB"), 4ull << 30);
  EXPECT_EQ(*ParseByteSize("512MiB"), 512ull << 20);
  EXPECT_EQ(*ParseByteSize("1000"), 1000u);
  EXPECT_EQ(*ParseByteSize("2KB"), 2000u);
  EXPECT_FALSE(ParseByteSize("").ok());
  EXPECT_FALSE(ParseByteSize("GiB").ok());
  EXPECT_FALSE(ParseByteSize("4 GiB").ok());
  EXPECT_FALSE(ParseByteSize("99999999999TiB").ok());
}

}  // namespace
}  // namespace spectrumkv
