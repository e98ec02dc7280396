//! Logs through `tracing`, formatted for where they go: under systemd (or with
//! `log.format = "journald"`) each line starts with its syslog priority
//! (`<3>` error … `<7>` debug), which journald turns into the entry's
//! priority, and carries no timestamp or colors (journald adds its own);
//! otherwise the usual text format. The level filter can be swapped at run
//! time (SIGHUP).

use std::fmt;

use anyhow::{Context, Result};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{prelude::*, reload, EnvFilter, Registry};

/// Swaps the level filter.
pub struct LogHandle(reload::Handle<EnvFilter, Registry>);

impl LogHandle {
    /// Applies a new filter ("info", "debug,embody_actors=trace").
    pub fn set_level(&self, filter: &str) -> Result<()> {
        let f = parse_filter(filter)?;
        self.0.reload(f).context("replacing the log filter")
    }
}

fn parse_filter(filter: &str) -> Result<EnvFilter> {
    // ractor wraps every actor in a span; at info level it only adds noise
    // ("Actor{id=...}:") to each line, so it is quiet unless asked for.
    let full = if filter.contains("ractor") {
        filter.to_string()
    } else {
        format!("{filter},ractor=warn")
    };
    EnvFilter::try_new(&full).with_context(|| format!("invalid log filter {filter:?}"))
}

/// Prefixes each line with its syslog priority for journald.
struct Journald(Format<Full, ()>);

impl<S, N> FormatEvent<S, N> for Journald
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        write!(w, "<{priority}>")?;
        self.0.format_event(ctx, w, event)
    }
}

/// Whether stderr goes to the journal (systemd sets `$JOURNAL_STREAM`).
fn under_journald() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some()
}

/// Installs the global subscriber.
pub fn init(filter: &str, format: &str) -> Result<LogHandle> {
    let (filter, handle) = reload::Layer::new(parse_filter(filter)?);
    let journald = match format {
        "journald" => true,
        "text" => false,
        _ => under_journald(),
    };
    let registry = tracing_subscriber::registry().with(filter);
    if journald {
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .event_format(Journald(
                tracing_subscriber::fmt::format()
                    .without_time()
                    .with_level(false)
                    .with_target(false),
            ));
        registry.with(fmt).try_init()
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .with_target(false);
        registry.with(fmt).try_init()
    }
    .context("installing the logger")?;
    Ok(LogHandle(handle))
}
