//! Perception tasks: a prompt about a camera's latest frame, run every
//! `period_ms`, its result published as JSON on the task's key (and, when
//! configured, on a ROS 2 topic as `std_msgs/msg/String`).
//!
//! A tick that comes while the previous run is still going is skipped, never
//! queued: a slow model makes results rarer, not later. Every result says
//! which frame it describes (its stamp and age when it was attached) and how
//! long the run took; a run that failed carries the error instead of text
//! (with a text-only model, the `vision_unsupported` refusal).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use embody_actors::Runtime;
use embody_protocol::{CameraRef, ErrorCode, Request, SamplingParams};
use serde::Serialize;

use crate::chat::ask;
use crate::config::TaskConfig;
use crate::ros2::RosPublisher;

/// What a task publishes after each run.
#[derive(Debug, Serialize)]
pub struct TaskResult {
    /// The task's name.
    pub task: String,
    /// The camera.
    pub camera: String,
    /// The answer; empty when the run failed.
    pub text: String,
    /// The frame the answer describes; absent when none could be attached.
    pub frame: Option<FrameInfo>,
    /// When the run started, in ms since the Unix epoch.
    pub started_ms: u64,
    /// How long the run took, in ms.
    pub latency_ms: u64,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Ticks skipped so far because a run was still going.
    pub skipped_ticks: u64,
    /// Why the run failed, if it did.
    pub error: Option<TaskError>,
}

/// The frame a result describes.
#[derive(Debug, Serialize)]
pub struct FrameInfo {
    /// Its timestamp, in ms since the Unix epoch.
    pub stamp_ms: u64,
    /// Its age when it was attached, in ms.
    pub age_ms: u64,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// A run's failure.
#[derive(Debug, Serialize)]
pub struct TaskError {
    /// The error code, as in error events.
    pub code: ErrorCode,
    /// What went wrong.
    pub message: String,
}

/// Where a task's results go.
pub(crate) struct TaskOutputs {
    pub session: zenoh::Session,
    pub key: String,
    pub ros: Option<Arc<RosPublisher>>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// Runs a task until `stop` turns true.
pub(crate) async fn run_task(
    cfg: TaskConfig,
    rt: Runtime,
    out: TaskOutputs,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let response_format = cfg.response_format().ok().flatten();
    let out = Arc::new(out);
    tracing::info!(task = %cfg.name, "perception task every {} ms on camera '{}', results on {}", cfg.period_ms, cfg.camera, out.key);
    let last_error = Arc::new(std::sync::Mutex::new(String::new()));
    let period = Duration::from_millis(cfg.period_ms);
    every(period, stop, move |skipped| {
        let (cfg, rt, out, rf, last_error) = (
            cfg.clone(),
            rt.clone(),
            out.clone(),
            response_format.clone(),
            last_error.clone(),
        );
        async move {
            let result = run_once(&cfg, &rt, rf, skipped).await;
            // A failure is logged when it first appears, not at every tick
            // (numbers aside: a stale frame's age changes with each tick).
            let why = result
                .error
                .as_ref()
                .map(|e| format!("{}: {}", e.code, e.message));
            {
                let mut last = last_error.lock().unwrap_or_else(|p| p.into_inner());
                let kind = |w: &str| w.replace(|c: char| c.is_ascii_digit(), "");
                match why {
                    Some(w) if kind(&last) != kind(&w) => {
                        tracing::warn!(task = %cfg.name, "perception task failed: {w}");
                        *last = w;
                    }
                    None if !last.is_empty() => {
                        tracing::info!(task = %cfg.name, "perception task succeeds again");
                        last.clear();
                    }
                    _ => {}
                }
            }
            publish(&out, &result).await;
        }
    })
    .await;
}

/// Calls `run` every `period` until `stop` turns true. A tick that comes
/// while the previous run still goes is skipped, not queued; `run` is told
/// how many ticks were skipped so far.
pub(crate) async fn every<F, Fut>(
    period: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
    run: F,
) where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let busy = Arc::new(AtomicBool::new(false));
    let mut skipped = 0u64;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if busy.swap(true, Ordering::SeqCst) {
            skipped += 1;
            continue;
        }
        let fut = run(skipped);
        let busy = busy.clone();
        tokio::spawn(async move {
            fut.await;
            busy.store(false, Ordering::SeqCst);
        });
    }
}

/// One run: attach the latest frame, ask, collect.
async fn run_once(
    cfg: &TaskConfig,
    rt: &Runtime,
    response_format: Option<serde_json::Value>,
    skipped_ticks: u64,
) -> TaskResult {
    let started = SystemTime::now();
    let clock = Instant::now();
    let mut result = TaskResult {
        task: cfg.name.clone(),
        camera: cfg.camera.clone(),
        text: String::new(),
        frame: None,
        started_ms: unix_ms(started),
        latency_ms: 0,
        completion_tokens: 0,
        skipped_ticks,
        error: None,
    };
    let cam = CameraRef {
        name: cfg.camera.clone(),
        max_age_ms: Some(cfg.max_age_ms),
    };
    match rt.cameras().attach(&cam, started) {
        Err(e) => {
            result.error = Some(TaskError {
                code: ErrorCode::BadRequest,
                message: e.to_string(),
            })
        }
        Ok(attached) => {
            let f = &attached.frame;
            result.frame = Some(FrameInfo {
                stamp_ms: unix_ms(f.stamp),
                age_ms: attached.age.as_millis() as u64,
                width: f.width,
                height: f.height,
            });
            let mut req = Request::user(cfg.prompt.clone())
                .max_tokens(cfg.max_tokens)
                .sampling(SamplingParams::greedy());
            req.images.push(f.image.clone());
            req.response_format = response_format;
            req.model = Some(cfg.model.clone()).filter(|m| !m.is_empty());
            let outcome = ask(rt, req, "zenoh").await;
            result.text = outcome.text;
            result.completion_tokens = outcome.usage.completion_tokens;
            result.error = outcome
                .error
                .map(|(code, message)| TaskError { code, message });
        }
    }
    result.latency_ms = clock.elapsed().as_millis() as u64;
    result
}

async fn publish(out: &TaskOutputs, result: &TaskResult) {
    let json = serde_json::to_string(result).expect("task results serialize");
    if let Err(e) = out.session.put(&out.key, json.clone()).await {
        tracing::warn!("publishing a task result on {} failed: {e}", out.key);
    }
    if let Some(ros) = &out.ros {
        ros.put_string(&json).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_run_skips_ticks_instead_of_queueing_them() {
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let running = Arc::new(AtomicU32::new(0));
        let runs = Arc::new(AtomicU32::new(0));
        let most = Arc::new(AtomicU32::new(0));
        let last_skipped = Arc::new(std::sync::Mutex::new(0u64));
        let (r, n, m, ls) = (
            running.clone(),
            runs.clone(),
            most.clone(),
            last_skipped.clone(),
        );
        let task = tokio::spawn(every(Duration::from_millis(20), stop, move |skipped| {
            let (r, n, m, ls) = (r.clone(), n.clone(), m.clone(), ls.clone());
            async move {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                *ls.lock().unwrap() = skipped;
                tokio::time::sleep(Duration::from_millis(110)).await;
                n.fetch_add(1, Ordering::SeqCst);
                r.fetch_sub(1, Ordering::SeqCst);
            }
        }));
        tokio::time::sleep(Duration::from_millis(600)).await;
        stop_tx.send(true).unwrap();
        task.await.unwrap();
        let (runs, skipped) = (runs.load(Ordering::SeqCst), *last_skipped.lock().unwrap());
        // 30 ticks in 600 ms, a run takes 5 of them: about 5 runs, the rest skipped.
        assert_eq!(most.load(Ordering::SeqCst), 1, "runs never overlap");
        assert!((3..=7).contains(&runs), "{runs} runs");
        assert!(skipped >= 10, "{skipped} ticks skipped");
    }
}
