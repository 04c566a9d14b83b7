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
  HW_CHECK_ARG(cfg.max_window >= cfg.min_window && cfg.max_window <= 65536,
               "WindowController: max_window=", cfg.max_window, ", expected >= min_window=",
               cfg.min_window, " and <= 65536");
  HW_CHECK_ARG(cfg.base >= 1, "WindowController: base=", cfg.base, ", expected >= 1");
  HW_CHECK_ARG(cfg.byte_cap >= 0, "WindowController: byte_cap=", cfg.byte_cap,
               ", expected >= 0 (0 = off)");
  HW_CHECK_ARG(cfg.target_s > 0, "WindowController: target_s=", cfg.target_s,
               ", expected > 0");
  HW_CHECK_ARG(cfg.alpha >= 0 && cfg.beta > cfg.alpha, "WindowController: alpha=", cfg.alpha,
               " beta=", cfg.beta, ", expected 0 <= alpha < beta");
  HW_CHECK_ARG(cfg.history_rounds >= 1, "WindowController: history_rounds=",
               cfg.history_rounds, ", expected >= 1");
  HW_CHECK_ARG(cfg.dev_allowance >= 0 && std::isfinite(cfg.dev_allowance),
               "WindowController: dev_allowance=", cfg.dev_allowance, ", expected >= 0");
  HW_CHECK_ARG(cfg.probe_every_rounds >= 0, "WindowController: probe_every_rounds=",
               cfg.probe_every_rounds, ", expected >= 0");
  window_ = std::clamp(cfg.base, cfg.min_window, cfg.max_window);
  rate_at_.assign(static_cast<size_t>(cfg.max_window) + 2, 0.0);
}

namespace {
constexpr double kRateGain = 0.05;  // a window "delivers more" above this relative margin
}  // namespace

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

void WindowController::on_start(double now_s) {
  HW_CHECK_ARG(std::isfinite(now_s), "WindowController: now_s=", now_s,
               ", expected a finite time");
  // The pipe was idle (between two versions): the round in progress is dropped (its wall time
  // would include the gap) and a fresh one starts now.
  round_done_ = 0;
  round_bytes_ = 0;
  round_min_s_ = -1;
  round_start_s_ = now_s;
}

void WindowController::on_complete(double now_s, double service_s, int64_t bytes) {
  HW_CHECK_ARG(std::isfinite(now_s), "WindowController: now_s=", now_s,
               ", expected a finite time");
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
  // Probe and refill rounds are not representative of the steady queue: they feed T_min and
  // the rate history but not the smoothed latency that the decisions compare against T_min.
  if (!probing_ && settle_rounds_ == 0) {
    if (est_.t_ewma_s == 0) {
      est_.t_ewma_s = service_s;
    } else {  // TCP's SRTT / RTTVAR: the deviation first, against the mean before this sample
      est_.t_dev_s += (std::abs(service_s - est_.t_ewma_s) - est_.t_dev_s) / 4;
      est_.t_ewma_s += (service_s - est_.t_ewma_s) / 8;
    }
  }
  if (probing_) {
    // A probe first drains the buckets admitted before it, then measures min_window
    // unloaded ones; only then is its minimum a fresh no-load latency.
    if (--probe_left_ <= 0) {
      close_round(now_s, /*probe=*/true);
      probing_ = false;
      settle_rounds_ = 2;  // the refill burst after a probe is not queueing: no decision
    }
    return;
  }
  if (round_done_ >= window_) decide(now_s);
}

double WindowController::close_round(double now_s, bool probe) {
  const double elapsed = std::max(now_s - round_start_s_, 1e-9);
  const double rate = static_cast<double>(round_bytes_) / elapsed;
  // T_min remembers at least one probe period, so a probe's fresh minimum lasts until the
  // next probe; the delivery rate uses the shorter history (and ignores draining probes).
  const size_t min_horizon = static_cast<size_t>(
      std::max(cfg_.history_rounds, cfg_.probe_every_rounds + 2));
  round_mins_.push_back(round_min_s_);
  while (round_mins_.size() > min_horizon) round_mins_.pop_front();
  if (!probe) {
    round_rates_.push_back(rate);
    while (static_cast<int>(round_rates_.size()) > cfg_.history_rounds) round_rates_.pop_front();
  }
  est_.t_min_s = *std::min_element(round_mins_.begin(), round_mins_.end());
  if (!round_rates_.empty())
    est_.bandwidth_Bps = *std::max_element(round_rates_.begin(), round_rates_.end());
  est_.rounds++;
  round_done_ = 0;
  round_bytes_ = 0;
  round_start_s_ = now_s;
  round_min_s_ = -1;
  // Latency above T_min within the service time's own spread is not evidence of a queue:
  // on a jittery pipeline T_min is its luckiest bucket, and the plain Vegas estimate saw a
  // standing queue at any window that kept the pipe full
  const double base = est_.t_min_s + cfg_.dev_allowance * est_.t_dev_s;
  const double ratio = est_.t_ewma_s > 0 ? std::min(1.0, base / est_.t_ewma_s) : 1.0;
  est_.congestion = std::clamp(1.0 - ratio, 0.0, 1.0);
  est_.queue_buckets = window_ * est_.congestion;
  return rate;
}

void WindowController::decide(double now_s) {
  const double rate = close_round(now_s, /*probe=*/false);
  if (!cfg_.adapt) return;
  if (settle_rounds_ > 0) {
    settle_rounds_--;
    return;
  }
  // the round right after a change is a transition: not the rate of this window yet
  if (!changed_) {
    double& r = rate_at_[static_cast<size_t>(window_)];
    r = r == 0 ? rate : r + (rate - r) / 4;
  }
  changed_ = false;
  const int before = window_;
  if (cfg_.probe_every_rounds > 0 && ++rounds_since_probe_ >= cfg_.probe_every_rounds &&
      window_ > cfg_.min_window) {
    rounds_since_probe_ = 0;
    probing_ = true;
    probe_left_ = window_ + cfg_.min_window;
    est_.probes++;
    return;
  }

  const double dq = std::max(0.25 * est_.t_min_s, cfg_.target_s - est_.t_min_s);
  const bool over = est_.t_ewma_s > est_.t_min_s + dq;
  const int c = cap();
  const int w = window_;
  auto known = [&](int x) { return x >= 1 && x <= cfg_.max_window && rate_at_[x] > 0; };
  // window a is known to deliver more than window b
  auto better = [&](int a, int b) {
    return known(a) && known(b) && rate_at_[a] > (1 + kRateGain) * rate_at_[b];
  };
  if (over) {  // the latency budget is blown: back off multiplicatively
    const int next = std::max(cfg_.min_window, static_cast<int>(std::floor(w * 0.75)));
    if (next < w) {
      window_ = next;
      est_.downs++;
    }
    std::fill(rate_at_.begin(), rate_at_.end(), 0.0);  // the path changed: measure afresh
  } else if (w < c && better(w + 1, w)) {  // one more bucket was measured to pay
    window_ = w + 1;
    est_.ups++;
  } else if (est_.queue_buckets > cfg_.beta && w > cfg_.min_window && !better(w, w - 1)) {
    window_ = w - 1;  // standing queue and no throughput to lose: one bucket less (Vegas)
    est_.downs++;
  } else if (est_.queue_buckets < cfg_.alpha && w < c) {  // pipe not full: one more
    window_ = w + 1;
    est_.ups++;
  } else if (w < c && known(w) && !known(w + 1) &&
             (est_.queue_buckets > cfg_.beta || better(w, w - 1))) {
    // the queue is the price of throughput here (or the last step up paid): try one more
    window_ = w + 1;
    est_.ups++;
  }
  window_ = std::clamp(window_, cfg_.min_window, std::max(cfg_.min_window, c));
  changed_ = window_ != before;
}

}  // namespace hw
