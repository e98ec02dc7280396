//! `embodyd`: the inference service. Loads the model into the supervised actor
//! runtime, serves the local Unix socket and the OpenAI-compatible HTTP API,
//! and speaks systemd's notification protocol: READY once serving, WATCHDOG
//! while the decoder makes progress, STOPPING when a drain begins.
//!
//! Signals: SIGTERM and SIGINT stop admitting requests (HTTP answers 503
//! while the drain lasts), let those in flight finish up to
//! `service.drain_timeout_ms`, end the rest with an `unavailable` error that
//! each door delivers before it closes, then exit 0. SIGHUP re-reads the
//! configuration file and applies what can change while running.

mod config;
mod http;
mod ipc;
mod logging;
mod notify;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use embody_actors::{Runtime, RuntimeError};
use tokio::signal::unix::{signal, SignalKind};

use config::{Config, Overrides};
use notify::Notifier;

#[derive(Parser)]
#[command(
    name = "embodyd",
    version,
    about = "embodyd, the inference service for robots"
)]
struct Cli {
    /// The configuration file (TOML); without it, the documented defaults.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// The model file (overrides model.path).
    #[arg(long, short = 'm')]
    model: Option<PathBuf>,
    /// The socket path (overrides $RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR and ipc.socket).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Compute threads (overrides model.threads; 0: one per core).
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// Log level or filter (overrides $RUST_LOG and log.level).
    #[arg(long)]
    log_level: Option<String>,
    /// Print the configuration in force (file, then flags) as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

impl Cli {
    fn overrides(&self) -> Overrides {
        Overrides {
            model: self.model.clone(),
            threads: self.threads,
            log_level: self.log_level.clone(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match Config::load(cli.config.as_deref(), &cli.overrides()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("embodyd: {e:#}");
            return ExitCode::from(2);
        }
    };
    if cli.print_config {
        match toml::to_string(&cfg) {
            Ok(s) => {
                print!("{s}");
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("embodyd: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    // --log-level, then $RUST_LOG, then log.level.
    let filter = match (&cli.log_level, std::env::var("RUST_LOG")) {
        (None, Ok(env)) if !env.is_empty() => env,
        _ => cfg.log.level.clone(),
    };
    let log = match logging::init(&filter, &cfg.log.format) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("embodyd: {e:#}");
            return ExitCode::from(2);
        }
    };
    // Panics are logged as one line each (the decoder's are caught and
    // restarted by its supervisor, but the journal should show them).
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let what = info.payload_as_str().unwrap_or("a panic without a message");
        tracing::error!(
            "thread '{}' panicked{at}: {}",
            thread.name().unwrap_or("unnamed"),
            what.replace('\n', " ")
        );
    }));
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("embodyd-io")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("embodyd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli, cfg, log)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, mut cfg: Config, log: logging::LogHandle) -> Result<()> {
    let notifier = Notifier::from_env().context("$NOTIFY_SOCKET is not a usable socket address")?;
    // Signals are caught from the start, so a stop during loading is clean.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;

    let models = cfg.runtime_models()?;
    let names: Vec<String> = models
        .iter()
        .map(|m| format!("{}", m.model_path.display()))
        .collect();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        "starting; model {}",
        names.join(", ")
    );
    let start = Runtime::start_models(models, cfg.runtime_options());
    let runtime = tokio::select! {
        r = start => r.map_err(|e| match e {
            RuntimeError::Model { ref path, .. } if !path.exists() => anyhow::anyhow!(
                "{e}; the model file does not exist: run scripts/fetch-models.sh, or set model.path in the configuration (or --model)"
            ),
            e => anyhow::Error::new(e),
        })?,
        _ = sigterm.recv() => { tracing::info!("SIGTERM while loading; exiting"); return Ok(()) }
        _ = sigint.recv() => { tracing::info!("SIGINT while loading; exiting"); return Ok(()) }
    };

    let socket = config::socket_path(cli.socket.as_deref(), &cfg);
    let listener = ipc::bind(&socket).await?;
    let _socket_file = ipc::SocketFile(socket.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(ipc::serve(
        listener,
        runtime.clone(),
        ipc::IpcOptions {
            max_connections: cfg.ipc.max_connections,
            frame_timeout: Duration::from_millis(cfg.ipc.frame_timeout_ms),
            write_timeout: Duration::from_millis(cfg.ipc.write_timeout_ms),
        },
        stop_rx,
    ));

    let mut adapters = if cfg.zenoh.enabled {
        let adapters_cfg = cfg.adapters();
        let started = embody_robot_adapters::RobotAdapters::start(&adapters_cfg, runtime.clone());
        let a = tokio::select! {
            r = started => r.context("starting the zenoh interface (set enabled = false in [zenoh] to run without it)")?,
            _ = sigterm.recv() => { tracing::info!("SIGTERM while starting; exiting"); runtime.shutdown().await; return Ok(()) }
            _ = sigint.recv() => { tracing::info!("SIGINT while starting; exiting"); runtime.shutdown().await; return Ok(()) }
        };
        Some(a)
    } else {
        tracing::info!("zenoh is off ([zenoh] enabled = false)");
        None
    };

    let (http_stop_tx, http_stop_rx) = tokio::sync::watch::channel(false);
    let mut http_addr = None;
    let http_server = if cfg.http.enabled {
        let listener = http::bind(&cfg.http.bind).await?;
        http_addr = listener.local_addr().ok();
        let opts = http::HttpOptions {
            api_key: Some(cfg.http.api_key.clone()).filter(|k| !k.is_empty()),
            max_body_bytes: cfg.http.max_body_bytes,
            max_connections: cfg.http.max_connections,
            header_timeout: Duration::from_millis(cfg.http.header_timeout_ms),
            allowed_hosts: cfg.http.allowed_hosts.clone(),
            allowed_origins: cfg.http.allowed_origins.clone(),
        };
        Some(tokio::spawn(http::serve(
            listener,
            runtime.clone(),
            runtime.metrics(),
            opts,
            http_stop_rx,
            Duration::from_secs(2),
        )))
    } else {
        None
    };

    let status = runtime.status().await?;
    let others = status.models.len().saturating_sub(1);
    let summary = format!(
        "serving {}{} ({}, {} context, {} backend, {} threads) on {}{}",
        status.model.name,
        if others > 0 {
            format!(" and {others} more model(s)")
        } else {
            String::new()
        },
        status.model.arch,
        status.model.context_length,
        status.backend,
        status.threads,
        socket.display(),
        http_addr.map_or(String::new(), |a| format!(" and http://{a}"))
    );
    tracing::info!("ready: {summary}");
    notify_or_warn(
        &notifier,
        &format!("READY=1\nSTATUS={summary}\nMAINPID={}", std::process::id()),
    );

    let watchdog = notify::watchdog_interval().filter(|_| notifier.enabled());
    if let Some(every) = watchdog {
        tracing::info!(
            "feeding the systemd watchdog every {} ms while the decoder makes progress",
            every.as_millis()
        );
    }
    let mut tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_healthy = true;

    let why = loop {
        tokio::select! {
            _ = tick.tick(), if watchdog.is_some() => {
                let h = runtime.health();
                if h.healthy {
                    notify_or_warn(&notifier, "WATCHDOG=1");
                    if !was_healthy {
                        tracing::info!("the decoder makes progress again; feeding the watchdog");
                    }
                } else if was_healthy {
                    tracing::error!(
                        "the decoder has made no progress for {} ms; withholding the watchdog",
                        h.since_progress.as_millis()
                    );
                }
                was_healthy = h.healthy;
            }
            _ = sighup.recv() => reload(&cli, &mut cfg, &runtime, &log, &notifier),
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
        }
    };

    let deadline = Duration::from_millis(cfg.service.drain_timeout_ms);
    notify_or_warn(&notifier, "STOPPING=1\nSTATUS=draining");
    tracing::info!(
        "{why}: draining requests for up to {} ms",
        deadline.as_millis()
    );
    let _ = stop_tx.send(true);
    if let Some(a) = &mut adapters {
        a.begin_drain().await;
    }
    let _ = server.await;
    // HTTP keeps listening while the drain lasts, answering new requests 503.
    let report = runtime.drain(deadline).await;
    if report.complete {
        tracing::info!("drained");
    } else {
        tracing::warn!(
            "{} requests did not finish before the drain deadline; ending them",
            report.left
        );
    }
    // Every request left ends with an `unavailable` error, and the doors
    // get to deliver it before they close: no request ends without a
    // terminal event on any interface.
    runtime.shutdown().await;
    let open = runtime.streams_closed(DELIVERY_GRACE).await;
    if open > 0 {
        tracing::warn!("{open} requests' last events were not delivered within {DELIVERY_GRACE:?}");
    }
    if let Some(a) = adapters {
        a.stop().await;
    }
    let _ = http_stop_tx.send(true);
    if let Some(h) = http_server {
        match h.await {
            Ok(Err(e)) => tracing::warn!("http: {e:#}"),
            Err(e) => tracing::warn!("http: {e}"),
            Ok(Ok(())) => {}
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// How long the doors get, after the last requests have ended, to deliver
/// their terminal events before they close.
const DELIVERY_GRACE: Duration = Duration::from_secs(2);

fn notify_or_warn(n: &Notifier, state: &str) {
    if let Err(e) = n.notify(state) {
        tracing::warn!("systemd notification failed: {e}");
    }
}

/// SIGHUP: re-reads the file and applies what can change while running.
fn reload(cli: &Cli, cfg: &mut Config, rt: &Runtime, log: &logging::LogHandle, n: &Notifier) {
    let Some(file) = &cli.config else {
        tracing::info!("SIGHUP: no configuration file to reload");
        return;
    };
    let new = match Config::load(Some(file), &cli.overrides()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("SIGHUP: keeping the running configuration: {e:#}");
            return;
        }
    };
    rt.set_limits(new.limits());
    if new.log.level != cfg.log.level {
        if let Err(e) = log.set_level(&new.log.level) {
            tracing::error!("SIGHUP: {e:#}");
        }
    }
    let restart = cfg.needs_restart(&new);
    if restart.is_empty() {
        tracing::info!("SIGHUP: configuration reloaded from {}", file.display());
    } else {
        tracing::warn!(
            "SIGHUP: configuration reloaded from {}; changes to {} take effect after a restart",
            file.display(),
            restart.join(", ")
        );
    }
    notify_or_warn(n, "STATUS=configuration reloaded");
    // What runs now: the reloadable parts of the new file, the rest as started.
    cfg.decoder.max_queued = new.decoder.max_queued;
    cfg.decoder.default_max_tokens = new.decoder.default_max_tokens;
    cfg.decoder.max_tokens_limit = new.decoder.max_tokens_limit;
    cfg.supervisor.stall_timeout_ms = new.supervisor.stall_timeout_ms;
    cfg.service = new.service;
    cfg.log.level = new.log.level;
    cfg.testing = new.testing;
}
