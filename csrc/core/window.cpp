// SPDX-License-Identifier: Apache-2.0
// See Note [Window controller] in window.h.
#include "core/window.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/common.h"

namespace hw {

WindowController::WindowController(const WindowConfig& cfg) : cfg_(cfg) {
  HW_CHECK_ARG(cfg.min_window >= 1, "WindowController: min_window=", cfg.min_window,
               ", expected >= 1");
  HW_CHECK_ARG(cfg.max_window >= cfg.min_window, "WindowController: max_window=",
               cfg.max_window, ", expected >= min_window=", cfg.min_window);
  HW_CHECK_ARG(cfg.base >= 1, "WindowController: base=", cfg.base, ", expected >= 1");
  HW_CHECK_ARG(cfg.byte_cap >= 0, "WindowController: byte_cap=", cfg.byte_cap,
               ", expected >= 0 (0 = off)");
  HW_CHECK_ARG(cfg.target_s > 0, "WindowController: target_s=", cfg.target_s,
               ", expected > 0");
  HW_CHECK_ARG(cfg.alpha >= 0 && cfg.beta > cfg.alpha, "WindowController: alpha=", cfg.alpha,
               " beta=", cfg.beta, ", expected 0 <= alpha < beta");
  HW_CHECK_ARG(cfg.history_rounds >= 1, "WindowController: history_rounds=",
               cfg.history_rounds, ", expected >= 1");
  HW_CHECK_ARG(cfg.probe_every_rounds >= 0, "WindowController: probe_every_rounds=",
               cfg.probe_every_rounds, ", expected >= 0");
  window_ = std::clamp(cfg.base, cfg.min_window, cfg.max_window);
}

int WindowController::cap() const {
  int c = cfg_.max_window;
  if (cfg_.byte_cap > 0 && s_max_ > 0) {
    const double fit = std::floor(static_cast<double>(cfg_.byte_cap) / s_max_);
    c = std::min<double>(c, std::max(1.0, fit));
  }
  return std::max(cfg_.min_window, c);
}

bool WindowController::can_admit(int inflight_buckets, int64_t inflight_bytes,
                                 int64_t next_bytes) const {
  if (inflight_buckets <= 0) return true;  // always make progress
  if (inflight_buckets >= current()) return false;
  if (cfg_.byte_cap > 0 && inflight_bytes + next_bytes > cfg_.byte_cap) return false;
  return true;
}

int WindowController::recommended() const {
  if (est_.t_min_s <= 0 || s_mean_ <= 0) return window_;
  const double bdp = std::ceil(est_.bandwidth_Bps * est_.t_min_s / s_mean_);
  const int rec = static_cast<int>(std::min<double>(bdp + 1, cfg_.max_window));
  return std::clamp(rec, cfg_.min_window, cap());
}

void WindowController::on_complete(double now_s, double service_s, int64_t bytes) {
  HW_CHECK_ARG(service_s > 0 && std::isfinite(service_s), "WindowController: service_s=",
               service_s, ", expected a positive duration");
  HW_CHECK_ARG(bytes > 0, "WindowController: bytes=", bytes, ", expected > 0");
  est_.completions++;
  if (round_start_s_ < 0) round_start_s_ = now_s - service_s;
  round_min_s_ = round_min_s_ < 0 ? service_s : std::min(round_min_s_, service_s);
  round_bytes_ += bytes;
  round_done_++;
  const double b = static_cast<double>(bytes);
  s_mean_ = s_mean_ == 0 ? b : s_mean_ + (b - s_mean_) / 8;
  s_max_ = std::max(s_max_, b);
  est_.t_ewma_s = est_.t_ewma_s == 0 ? service_s : est_.t_ewma_s + (service_s - est_.t_ewma_s) / 8;
  if (round_done_ >= current()) decide(now_s);
}

void WindowController::decide(double now_s) {
  // Close the round: its minimum latency and its delivery rate join the history.
  const double elapsed = std::max(now_s - round_start_s_, 1e-9);
  const double rate = static_cast<double>(round_bytes_) / elapsed;
  round_mins_.push_back(round_min_s_);
  round_rates_.push_back(rate);
  while (static_cast<int>(round_mins_.size()) > cfg_.history_rounds) round_mins_.pop_front();
  while (static_cast<int>(round_rates_.size()) > cfg_.history_rounds) round_rates_.pop_front();
  est_.t_min_s = *std::min_element(round_mins_.begin(), round_mins_.end());
  est_.bandwidth_Bps = *std::max_element(round_rates_.begin(), round_rates_.end());
  est_.rounds++;
  round_done_ = 0;
  round_bytes_ = 0;
  round_start_s_ = now_s;
  round_min_s_ = -1;

  const double ratio = est_.t_ewma_s > 0 ? est_.t_min_s / est_.t_ewma_s : 1.0;
  est_.congestion = std::clamp(1.0 - ratio, 0.0, 1.0);
  est_.queue_buckets = window_ * est_.congestion;
  if (!cfg_.adapt) return;

  if (probing_) {  // the probe round is over: its latencies refreshed T_min
    probing_ = false;
    return;
  }
  if (cfg_.probe_every_rounds > 0 && ++rounds_since_probe_ >= cfg_.probe_every_rounds &&
      window_ > cfg_.min_window) {
    rounds_since_probe_ = 0;
    probing_ = true;
    est_.probes++;
    return;
  }

  const double dq = std::max(0.25 * est_.t_min_s, cfg_.target_s - est_.t_min_s);
  const bool over = est_.t_ewma_s > est_.t_min_s + dq;
  const double bdp = s_mean_ > 0 ? std::ceil(est_.bandwidth_Bps * est_.t_min_s / s_mean_) : 0;
  const int c = cap();
  if (over || est_.queue_buckets > cfg_.beta) {
    const int next = std::max(cfg_.min_window, static_cast<int>(std::floor(window_ * 0.75)));
    if (next < window_) {
      window_ = next;
      est_.downs++;
    }
    x_at_increase_ = 0;
  } else if (est_.queue_buckets < cfg_.alpha && window_ < c &&
             (window_ < bdp || rate > 1.05 * x_at_increase_)) {
    window_++;
    est_.ups++;
    x_at_increase_ = rate;
  }
  window_ = std::clamp(window_, cfg_.min_window, std::max(cfg_.min_window, c));
}

}  // namespace hw
