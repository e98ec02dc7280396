//! systemd's notification protocol (`sd_notify(3)`), written out: each state
//! change is one datagram of `KEY=value` lines sent to the Unix socket named
//! by `$NOTIFY_SOCKET`. A name starting with '@' is a socket in the abstract
//! namespace. Without `$NOTIFY_SOCKET` (not run by systemd) nothing is sent.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Sends notifications to systemd.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// A notifier for `$NOTIFY_SOCKET`, or one that sends nothing when it is unset.
    pub fn from_env() -> std::io::Result<Self> {
        let Some(name) = std::env::var_os("NOTIFY_SOCKET").filter(|v| !v.is_empty()) else {
            return Ok(Self { target: None });
        };
        let name = name.to_string_lossy().into_owned();
        let addr = match name.strip_prefix('@') {
            Some(abstract_name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(abstract_name.as_bytes())?
            }
            None => SocketAddr::from_pathname(&name)?,
        };
        Ok(Self {
            target: Some((UnixDatagram::unbound()?, addr)),
        })
    }

    /// Whether systemd listens.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one notification (`"READY=1"`, `"WATCHDOG=1"`, ...; several
    /// assignments are separated by newlines).
    pub fn notify(&self, state: &str) -> std::io::Result<()> {
        match &self.target {
            Some((sock, addr)) => sock.send_to_addr(state.as_bytes(), addr).map(|_| ()),
            None => Ok(()),
        }
    }
}

/// How often to feed the watchdog: half of `$WATCHDOG_USEC`, when it is set
/// for this process (`$WATCHDOG_PID` absent or equal to our pid).
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_reach_a_path_socket_and_an_abstract_one() {
        let dir = std::env::temp_dir().join(format!("embodyd-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            target: Some((
                UnixDatagram::unbound().unwrap(),
                SocketAddr::from_pathname(&path).unwrap(),
            )),
        };
        n.notify("READY=1\nSTATUS=serving").unwrap();
        let mut buf = [0u8; 64];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("embodyd-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier {
            target: Some((UnixDatagram::unbound().unwrap(), addr)),
        };
        n.notify("WATCHDOG=1").unwrap();
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn without_notify_socket_nothing_is_sent() {
        let n = Notifier { target: None };
        assert!(!n.enabled());
        n.notify("READY=1").unwrap();
    }
}
