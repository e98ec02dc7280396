//! Serving metrics, kept in one place that every interface can update, and
//! their Prometheus text exposition (`GET /metrics`).
//!
//! Counters and histograms are atomics: updating them from request tasks
//! takes no lock. Gauges of the decoder (queue depth, running requests, KV
//! blocks) are read from the runtime's status when scraped.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use embody_protocol::openai::http_status;
use embody_protocol::{Event, FinishReason, Status};

/// The interfaces that count requests (zenoh: chat queries, published
/// requests and perception tasks; ros2: prompts of the ROS 2 node).
pub const INTERFACES: [&str; 4] = ["http", "ipc", "zenoh", "ros2"];
/// How a request ended.
pub const OUTCOMES: [&str; 7] = [
    "ok",
    "client_error",
    "overloaded",
    "unavailable",
    "timeout",
    "server_error",
    "cancelled",
];

/// How a request that ended with this HTTP status is counted.
pub fn outcome_of_status(status: u16) -> &'static str {
    match status {
        429 => "overloaded",
        503 => "unavailable",
        504 => "timeout",
        s if s >= 500 => "server_error",
        s if s >= 400 => "client_error",
        _ => "ok",
    }
}

/// How a request whose stream ends with `ev` is counted (`None` for an
/// event that does not end it).
pub fn outcome(ev: &Event) -> Option<&'static str> {
    match ev {
        Event::Finished {
            reason: FinishReason::Cancelled,
            ..
        } => Some("cancelled"),
        Event::Finished { .. } => Some("ok"),
        Event::Error { code, .. } => Some(outcome_of_status(http_status(*code))),
        _ => None,
    }
}

/// A histogram with fixed buckets (upper bounds in seconds).
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|&b| secs <= b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Every metric the daemon exports.
pub struct Metrics {
    /// [interface][outcome]
    requests: [[AtomicU64; OUTCOMES.len()]; INTERFACES.len()],
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    /// Requests whose answer is being produced now, over every interface.
    in_flight: AtomicU64,
    /// Time from receiving a request to its first generated token.
    pub ttft: Histogram,
    /// Time between successive generated tokens of one request.
    pub token_latency: Histogram,
}

const TTFT_BOUNDS: &[f64] = &[0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const TOKEN_BOUNDS: &[f64] = &[0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Default::default(),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            ttft: Histogram::new(TTFT_BOUNDS),
            token_latency: Histogram::new(TOKEN_BOUNDS),
        }
    }
}

impl Metrics {
    /// Counts a finished request.
    pub fn request(&self, interface: &str, outcome: &str) {
        let i = INTERFACES.iter().position(|&x| x == interface);
        let o = OUTCOMES.iter().position(|&x| x == outcome);
        if let (Some(i), Some(o)) = (i, o) {
            self.requests[i][o].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Adds the tokens of a finished request.
    pub fn tokens(&self, prompt: u32, completion: u32) {
        self.prompt_tokens
            .fetch_add(prompt as u64, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(completion as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition, with the decoder's gauges from `status`.
    pub fn render(&self, status: Option<&Status>, healthy: bool) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(
            out,
            "# HELP embodyd_requests_total Requests answered, by interface and outcome.\n# TYPE embodyd_requests_total counter"
        );
        for (i, iface) in INTERFACES.iter().enumerate() {
            for (o, outcome) in OUTCOMES.iter().enumerate() {
                let n = self.requests[i][o].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "embodyd_requests_total{{interface=\"{iface}\",outcome=\"{outcome}\"}} {n}"
                );
            }
        }
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        counter(
            &mut out,
            "embodyd_prompt_tokens_total",
            "Prompt tokens of finished requests.",
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "embodyd_completion_tokens_total",
            "Tokens generated for finished requests.",
            self.completion_tokens.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "embodyd_requests_in_flight",
            "Requests being answered by an interface now.",
            self.in_flight.load(Ordering::Relaxed),
        );
        self.ttft.render(
            &mut out,
            "embodyd_time_to_first_token_seconds",
            "Time from receiving a request to its first generated token.",
        );
        self.token_latency.render(
            &mut out,
            "embodyd_inter_token_latency_seconds",
            "Time between successive generated tokens of a request.",
        );
        gauge(
            &mut out,
            "embodyd_healthy",
            "1 while the decoder makes progress.",
            healthy as u64,
        );
        if let Some(s) = status {
            gauge(
                &mut out,
                "embodyd_queue_depth",
                "Requests waiting for a decoding slot.",
                s.queued as u64,
            );
            gauge(
                &mut out,
                "embodyd_requests_running",
                "Requests decoding now.",
                s.running as u64,
            );
            gauge(
                &mut out,
                "embodyd_kv_blocks_used",
                "KV cache blocks in use.",
                s.kv_blocks_used as u64,
            );
            gauge(
                &mut out,
                "embodyd_kv_blocks_total",
                "KV cache blocks in the pool.",
                s.kv_blocks_total as u64,
            );
            gauge(
                &mut out,
                "embodyd_kv_blocks_cached",
                "KV cache blocks held by the prefix cache (part of the blocks in use).",
                s.kv_blocks_cached as u64,
            );
            counter(
                &mut out,
                "embodyd_prefix_hit_tokens_total",
                "Prompt tokens served from the prefix cache instead of being prefilled.",
                s.prefix_hit_tokens,
            );
            counter(
                &mut out,
                "embodyd_prefix_lookup_tokens_total",
                "Prompt tokens looked up in the prefix cache.",
                s.prefix_lookup_tokens,
            );
            counter(
                &mut out,
                "embodyd_prefix_evicted_blocks_total",
                "Cached KV blocks evicted to make room.",
                s.prefix_evicted_blocks,
            );
            counter(
                &mut out,
                "embodyd_decoder_steps_total",
                "Forward passes run.",
                s.steps,
            );
            counter(
                &mut out,
                "embodyd_draft_tokens_total",
                "Tokens drafted by prompt lookup (speculative decoding).",
                s.draft_tokens,
            );
            counter(
                &mut out,
                "embodyd_draft_accepted_tokens_total",
                "Drafted tokens the model confirmed.",
                s.draft_accepted_tokens,
            );
            counter(
                &mut out,
                "embodyd_decoder_restarts_total",
                "Times the decoder was restarted after a failure.",
                s.decoder_restarts,
            );
            gauge(
                &mut out,
                "embodyd_resident_memory_bytes",
                "Resident memory of the daemon.",
                s.rss_bytes,
            );
        }
        out
    }
}

/// Follows one request from its arrival: time to first token, time between
/// tokens, tokens used and how it ended. Counts it in flight while alive; a
/// tracker dropped before [`Tracker::finish`] counts as cancelled (the client
/// went away).
pub struct Tracker {
    metrics: Arc<Metrics>,
    interface: &'static str,
    arrived: Instant,
    last_token: Option<Instant>,
    finished: bool,
}

impl Tracker {
    /// Starts following a request that arrived now.
    pub fn new(metrics: Arc<Metrics>, interface: &'static str) -> Self {
        metrics.in_flight.fetch_add(1, Ordering::Relaxed);
        Self {
            metrics,
            interface,
            arrived: Instant::now(),
            last_token: None,
            finished: false,
        }
    }

    /// Notes an event of the request's stream.
    pub fn event(&mut self, ev: &Event) {
        match ev {
            Event::Delta { token_ids, .. } if !token_ids.is_empty() => {
                let now = Instant::now();
                match self.last_token {
                    None => self.metrics.ttft.observe(now - self.arrived),
                    Some(t) => {
                        // Tokens of one delta arrived together; spread the gap over them.
                        let gap = (now - t) / token_ids.len() as u32;
                        for _ in 0..token_ids.len() {
                            self.metrics.token_latency.observe(gap);
                        }
                    }
                }
                self.last_token = Some(now);
            }
            Event::Finished { usage, .. } => {
                self.metrics
                    .tokens(usage.prompt_tokens, usage.completion_tokens);
            }
            _ => {}
        }
    }

    /// Counts the request as ended with `outcome`.
    pub fn finish(&mut self, outcome: &'static str) {
        if !self.finished {
            self.finished = true;
            self.metrics.request(self.interface, outcome);
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.finish("cancelled");
        self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_holds_counters_histograms_and_gauges() {
        let m = Metrics::default();
        m.request("http", "ok");
        m.request("http", "overloaded");
        m.request("nowhere", "ok");
        m.tokens(10, 4);
        m.ttft.observe(Duration::from_millis(30));
        m.ttft.observe(Duration::from_secs(100));
        let status = Status {
            queued: 2,
            kv_blocks_total: 64,
            ..Status::default()
        };
        let text = m.render(Some(&status), true);
        for line in [
            "embodyd_requests_total{interface=\"http\",outcome=\"ok\"} 1",
            "embodyd_requests_total{interface=\"http\",outcome=\"overloaded\"} 1",
            "embodyd_prompt_tokens_total 10",
            "embodyd_completion_tokens_total 4",
            "embodyd_time_to_first_token_seconds_bucket{le=\"0.025\"} 0",
            "embodyd_time_to_first_token_seconds_bucket{le=\"0.05\"} 1",
            "embodyd_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2",
            "embodyd_time_to_first_token_seconds_count 2",
            "embodyd_queue_depth 2",
            "embodyd_kv_blocks_total 64",
            "embodyd_healthy 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        let m = Arc::new(m);
        let mut t = Tracker::new(m.clone(), "http");
        assert!(m
            .render(None, false)
            .contains("embodyd_requests_in_flight 1"));
        t.event(&Event::Finished {
            reason: embody_protocol::FinishReason::Stop,
            usage: embody_protocol::Usage {
                prompt_tokens: 1,
                completion_tokens: 1,
            },
        });
        drop(t);
        let text = m.render(None, false);
        assert!(text.contains("embodyd_requests_in_flight 0"), "{text}");
        assert!(text.contains("embodyd_requests_total{interface=\"http\",outcome=\"cancelled\"} 1"));
        assert!(text.contains("embodyd_prompt_tokens_total 11"));
    }
}
