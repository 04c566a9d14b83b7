// SPDX-License-Identifier: Apache-2.0
// Adaptive in-flight window: how many buckets (and bytes) may be in flight, decided from
// measured bucket service times. Torch-free, CUDA-free, deterministic (time is an input).
#pragma once

#include <cstdint>
#include <deque>
#include <vector>

namespace hw {

struct WindowConfig {
  int base = 4;                // HOTWEIGHTS_IPC_INFLIGHT_BUCKETS
  int64_t byte_cap = 0;        // HOTWEIGHTS_IPC_INFLIGHT_BYTES (0 = off)
  bool adapt = true;           // HOTWEIGHTS_IPC_ADAPT
  int min_window = 1;          // HOTWEIGHTS_IPC_MIN_INFLIGHT
  int max_window = 16;         // HOTWEIGHTS_IPC_MAX_INFLIGHT
  double target_s = 0.25;      // HOTWEIGHTS_IPC_TARGET_BUCKET_MS / 1000
  double alpha = 0.5;          // grow while fewer than alpha buckets queue
  double beta = 1.5;           // shrink when more than beta buckets queue
  int history_rounds = 10;     // windowed min latency / max bandwidth horizon
  int probe_every_rounds = 30; // every N rounds drain to min_window to refresh T_min; 0 = never
  double dev_allowance = 1.0;  // service-time mean deviations above T_min not read as a queue
};

struct WindowEstimates {
  double t_min_s = 0;        // windowed minimum bucket service time
  double t_ewma_s = 0;       // smoothed service time (gain 1/8)
  double t_dev_s = 0;        // smoothed mean deviation of the service time (gain 1/4)
  double bandwidth_Bps = 0;  // windowed maximum delivery rate
  double queue_buckets = 0;  // Vegas queue estimate W * congestion
  double congestion = 0;     // queueing share of latency, 1 - (T_min + k T_dev) / T_ewma, in [0, 1]
  int64_t rounds = 0, ups = 0, downs = 0, probes = 0, completions = 0;
};

// Note [Window controller]
// A delay-based controller with a pipe model (Vegas + BBR, see docs/design/window.md):
// service time T_i (dispatch -> every consumer acked; admission wait excluded) and bytes of
// every completed bucket feed a min-filter T_min, an EWMA T_ewma and the delivery rate X of
// each round. One decision per round (a window's worth of completions):
//   over the latency budget (T_ewma > T_min + D_q)     -> W = max(min, floor(0.75 W))
//   a standing queue (queue > beta buckets)            -> W - 1
//   queue < alpha buckets and W < cap (the pipe is not full)   -> W + 1
//   otherwise hold (the dead band between alpha and beta is the hysteresis).
// Vegas reads any latency above T_min as queueing. On a host whose pipeline stages share
// CPUs (the publisher's gather, each subscriber's scatter, the control work) latency also
// grows with the window while the delivery rate still rises (the stages overlap), and Vegas
// alone settles too low (1 GiB in 4 MiB buckets, 2 subscribers on 2 cores: W=2, 1.3 s, where
// W=4 takes 0.8 s). So the controller also remembers the delivery rate measured at each
// window (EWMA per window, recorded from the second round at that window on) and:
//   a known larger window delivered more than (1 + kRateGain) times this one  -> W + 1
//   Vegas' queue shrink is skipped when the smaller window is known to deliver less;
//   when that kept the window, or the last step up paid, an unvisited W + 1 is tried once.
// The budget rule still wins, and clears the rate memory (the path changed).
// Every N rounds a probe drains to min_window so that T_min is a fresh no-load latency (the
// min-filter spans a probe period); the two rounds after a probe only refill the pipe.
// Jitter: the queue estimate is W * (1 - (T_min + k T_dev) / T_ewma), T_dev the smoothed mean
// deviation of the service time (TCP's RTTVAR), k = dev_allowance (1). On a pipeline whose
// service times scatter (a GPU host's wake-ups, a busy VM), T_min is its luckiest bucket and
// plain Vegas (k = 0) saw a standing queue at every window that kept the pipe full: 17-bucket
// versions with exponential jitter as large as the latency ran 1.28x slower than a fixed
// window of 8 (tests/test_window.py), and on the H200 an adaptive 64 MiB ring took 1.4-2.3x
// the time of a fixed window of 8. Without jitter T_dev is ~0 and nothing changes.
// D_q = max(0.25 T_min, target - T_min). W_bdp = ceil(X_max * T_min / S_mean) is the
// bandwidth-delay product in buckets; recommended() reports W_bdp + 1 clipped to bounds.
// The byte cap is enforced at admission (one bucket is always admitted when nothing is in
// flight, so a bucket larger than the cap still progresses). W never leaves [min, max].
class WindowController {
 public:
  explicit WindowController(const WindowConfig& cfg);

  /// True when a bucket of next_bytes may start with the given load in flight.
  bool can_admit(int inflight_buckets, int64_t inflight_bytes, int64_t next_bytes) const;
  /// Streaming starts after an idle gap (a new version): the partial round is dropped so
  /// that no round's delivery rate includes the gap.
  void on_start(double now_s);
  /// Feeds one completed bucket: now_s (monotonic), its service time and size.
  void on_complete(double now_s, double service_s, int64_t bytes);

  int current() const { return probing_ ? cfg_.min_window : window_; }
  /// The window outside probes (what current() returns again once a probe is over).
  int target() const { return window_; }
  bool probing() const { return probing_; }
  int recommended() const;
  const WindowEstimates& estimates() const { return est_; }
  const WindowConfig& config() const { return cfg_; }

 private:
  void decide(double now_s);
  double close_round(double now_s, bool probe);
  int cap() const;

  WindowConfig cfg_;
  int window_;
  bool probing_ = false;
  int probe_left_ = 0;
  int settle_rounds_ = 0;
  int rounds_since_probe_ = 0;
  int64_t round_done_ = 0;
  int64_t round_bytes_ = 0;
  double round_start_s_ = -1;
  double round_min_s_ = -1;
  double s_mean_ = 0, s_max_ = 0;
  bool changed_ = false;            // the window moved at the last decision
  std::vector<double> rate_at_;     // delivery rate by window (EWMA; 0 = not measured)
  std::deque<double> round_mins_;   // per-round minimum service time
  std::deque<double> round_rates_;  // per-round delivery rate
  WindowEstimates est_;
};

}  // namespace hw
