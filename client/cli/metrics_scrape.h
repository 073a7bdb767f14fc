// A minimal Prometheus scrape for the CLI: HTTP GET /metrics from host:port and the samples of
// the text exposition as (series, value) pairs.
#ifndef SPECTRUMKV_CLIENT_CLI_METRICS_SCRAPE_H_
#define SPECTRUMKV_CLIENT_CLI_METRICS_SCRAPE_H_

#include <map>
#include <string>

#include "absl/status/statusor.h"

namespace spectrumkv {

// Series name with labels exactly as exposed (e.g. spectrumkv_wire_bytes_total{direction="tx"})
// to value. UNAVAILABLE if the endpoint cannot be reached.
absl::StatusOr<std::map<std::string, double>> ScrapeMetrics(const std::string& host, int port,
                                                            double timeout_s);

}  // namespace spectrumkv

#endif  // SPECTRUMKV_CLIENT_CLI_METRICS_SCRAPE_H_
