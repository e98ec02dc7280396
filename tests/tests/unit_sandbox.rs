//! The shipped unit lets the shipped config run: what the default config's
//! enabled interfaces and backend need (address families, the IP addresses
//! they bind and reach, device nodes, writable-executable memory, open files)
//! is derived from `configs/default.toml` and checked against the sandbox of
//! `configs/embodyd.service`. A config change that the unit would forbid
//! fails here, not as a crash loop on the robot.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use embody_tests::{
    address_family, free_port, repo_root, restrict_address_families, smollm2, Daemon,
};

/// The unit's `[Service]` settings, a key's values in file order.
fn unit() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_root().join("configs/embodyd.service")).unwrap();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn setting<'a>(unit: &'a [(String, String)], key: &str) -> Option<&'a str> {
    unit.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn config() -> toml::Table {
    let text = std::fs::read_to_string(repo_root().join("configs/default.toml")).unwrap();
    text.parse().unwrap()
}

fn enabled(cfg: &toml::Table, section: &str) -> bool {
    cfg.get(section)
        .and_then(|s| s.get("enabled"))
        .and_then(toml::Value::as_bool)
        .unwrap_or(true)
}

/// What the config asks of the sandbox.
#[derive(Debug, Default)]
struct Needs {
    families: BTreeSet<&'static str>,
    /// Addresses bound or connected to.
    addresses: Vec<IpAddr>,
    gpu: bool,
    open_files: u64,
}

/// Model files, logs, zenoh's own sockets, the notify socket.
const OTHER_FILES: u64 = 256;

fn needs(cfg: &toml::Table) -> Needs {
    // The IPC socket and systemd's notify socket.
    let mut n = Needs {
        families: BTreeSet::from(["AF_UNIX"]),
        ..Needs::default()
    };
    let family = |ip: &IpAddr| if ip.is_ipv4() { "AF_INET" } else { "AF_INET6" };
    let ipc = cfg["ipc"]["max_connections"].as_integer().unwrap() as u64;
    n.open_files = ipc + OTHER_FILES;
    if enabled(cfg, "http") {
        let bind: SocketAddr = cfg["http"]["bind"].as_str().unwrap().parse().unwrap();
        n.families.insert(family(&bind.ip()));
        n.addresses.push(bind.ip());
        // http.max_connections, or its default.
        let http = cfg["http"]
            .get("max_connections")
            .and_then(toml::Value::as_integer);
        n.open_files += http.unwrap_or(256) as u64;
    }
    if enabled(cfg, "zenoh") {
        let z = &cfg["zenoh"];
        let endpoints = ["connect", "listen"]
            .iter()
            .filter_map(|k| z.get(*k).and_then(toml::Value::as_array))
            .flatten()
            .filter_map(toml::Value::as_str);
        for e in endpoints {
            let (proto, addr) = e.split_once('/').unwrap();
            match proto {
                "unixsock-stream" => {
                    n.families.insert("AF_UNIX");
                }
                _ => {
                    let addr: SocketAddr = addr.parse().unwrap();
                    n.families.insert(family(&addr.ip()));
                    // Listening on every interface makes zenoh enumerate them
                    // (netlink), and so does multicast scouting below.
                    if addr.ip().is_unspecified() {
                        n.families.insert("AF_NETLINK");
                    }
                    n.addresses.push(addr.ip());
                }
            }
        }
        if z.get("multicast_scouting").and_then(toml::Value::as_bool) == Some(true) {
            n.families.extend(["AF_NETLINK", "AF_INET"]);
        }
    }
    let backend = cfg["model"]["backend"].as_str().unwrap_or("cpu");
    n.gpu = matches!(backend, "cuda" | "vulkan");
    n
}

/// Whether `IPAddressAllow=` admits `ip`: the keywords systemd knows, or an
/// address with an optional prefix length.
fn ip_allowed(allow: &str, ip: &IpAddr) -> bool {
    let bits = |ip: &IpAddr| match ip {
        IpAddr::V4(v) => (u128::from(u32::from(*v)), 32),
        IpAddr::V6(v) => (u128::from(*v), 128),
    };
    allow.split_whitespace().any(|a| match a {
        "any" => true,
        // Binding every interface is allowed where sockets are allowed.
        "localhost" => ip.is_loopback() || ip.is_unspecified(),
        "link-local" => matches!(ip, IpAddr::V4(v) if v.is_link_local()),
        cidr => {
            let (net, len) = cidr.split_once('/').unwrap_or((cidr, ""));
            let Ok(net) = net.parse::<IpAddr>() else {
                return false;
            };
            let ((n, width), (x, xwidth)) = (bits(&net), bits(ip));
            let len: u32 = len.parse().unwrap_or(width);
            let shift = width.saturating_sub(len);
            let top = |v: u128| v.checked_shr(shift).unwrap_or(0);
            width == xwidth && len <= width && top(n) == top(x)
        }
    })
}

#[test]
fn the_unit_allows_what_the_default_config_turns_on() {
    let unit = unit();
    let need = needs(&config());
    let allowed: BTreeSet<&str> = setting(&unit, "RestrictAddressFamilies")
        .expect("the unit restricts address families")
        .split_whitespace()
        .collect();
    let missing: Vec<_> = need.families.difference(&allowed).collect();
    assert!(
        missing.is_empty(),
        "the default config needs {missing:?}, which RestrictAddressFamilies= forbids"
    );
    if setting(&unit, "IPAddressDeny") == Some("any") {
        let allow = setting(&unit, "IPAddressAllow").unwrap_or("");
        for ip in &need.addresses {
            assert!(
                ip_allowed(allow, ip),
                "{ip} is outside IPAddressAllow={allow}"
            );
        }
    }
    if need.gpu {
        for key in ["PrivateDevices", "PrivateUsers", "MemoryDenyWriteExecute"] {
            assert_ne!(
                setting(&unit, key),
                Some("yes"),
                "a GPU backend needs {key}=no"
            );
        }
    }
    let nofile: u64 = setting(&unit, "LimitNOFILE")
        .expect("the unit sets LimitNOFILE")
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        nofile >= need.open_files,
        "LimitNOFILE={nofile} is below the {} files the config's limits need",
        need.open_files
    );
}

/// The derivation itself: each rule turns on with its setting, so the test
/// above cannot pass by reading nothing.
#[test]
fn each_interface_adds_what_it_needs() {
    let cfg = |text: &str| -> toml::Table { text.parse().unwrap() };
    let base = "[ipc]\nmax_connections = 8\n[model]\nbackend = \"cpu\"\n";
    let off = "[http]\nenabled = false\n[zenoh]\nenabled = false\n";
    let n = needs(&cfg(&format!("{base}{off}")));
    assert_eq!(n.families, BTreeSet::from(["AF_UNIX"]));
    assert_eq!(n.open_files, 8 + OTHER_FILES);

    let n = needs(&cfg(&format!(
        "{base}[http]\nbind = \"[::1]:8080\"\nmax_connections = 100\n[zenoh]\nenabled = false\n"
    )));
    assert!(n.families.contains("AF_INET6") && !n.families.contains("AF_INET"));
    assert_eq!(n.open_files, 8 + 100 + OTHER_FILES);

    let n = needs(&cfg(&format!(
        "{base}[http]\nenabled = false\n[zenoh]\nlisten = [\"tcp/0.0.0.0:7448\"]\n"
    )));
    assert!(n.families.contains("AF_NETLINK") && n.families.contains("AF_INET"));

    let gpu = base.replace("\"cpu\"", "\"vulkan\"");
    assert!(needs(&cfg(&format!("{gpu}{off}"))).gpu);

    assert!(ip_allowed("localhost", &"127.0.0.1".parse().unwrap()));
    assert!(!ip_allowed("localhost", &"10.1.2.3".parse().unwrap()));
    assert!(ip_allowed(
        "localhost 10.1.2.0/24",
        &"10.1.2.77".parse().unwrap()
    ));
    assert!(!ip_allowed("10.1.2.0/24", &"10.1.3.1".parse().unwrap()));
    assert!(ip_allowed("10.1.2.5", &"10.1.2.5".parse().unwrap()));
}

/// The default config with the test's model and free ports (the same
/// address families as the shipped one).
fn default_config_on_free_ports() -> (String, u16, u16) {
    let (http, zenoh, router) = (free_port(), free_port(), free_port());
    let mut text = std::fs::read_to_string(repo_root().join("configs/default.toml")).unwrap();
    for (from, to) in [
        (
            "path = \"SmolLM2-135M-Instruct.Q4_1.gguf\"".to_string(),
            format!("path = \"{}\"", smollm2().display()),
        ),
        (
            "bind = \"127.0.0.1:8080\"".into(),
            format!("bind = \"127.0.0.1:{http}\""),
        ),
        (
            "tcp/127.0.0.1:7448".into(),
            format!("tcp/127.0.0.1:{zenoh}"),
        ),
        (
            "tcp/127.0.0.1:7447".into(),
            format!("tcp/127.0.0.1:{router}"),
        ),
    ] {
        assert!(
            text.contains(&from),
            "configs/default.toml no longer has {from}"
        );
        text = text.replace(&from, &to);
    }
    (text, http, router)
}

fn allowed_families(unit: &[(String, String)]) -> Vec<(String, i32)> {
    setting(unit, "RestrictAddressFamilies")
        .unwrap()
        .split_whitespace()
        .map(|f| (f.to_string(), address_family(f).expect("a known family")))
        .collect()
}

/// The default config on the default model, confined to the unit's address
/// families as `RestrictAddressFamilies=` confines it (a seccomp filter on
/// `socket()`): it gets ready and answers over the Unix socket, HTTP and
/// zenoh. Without AF_INET the same daemon cannot start, so the filter is
/// what the test takes it for.
#[test]
fn the_default_config_serves_inside_the_units_address_families() {
    let families = allowed_families(&unit());
    let only: Vec<i32> = families.iter().map(|(_, f)| *f).collect();
    let (config, http, router) = default_config_on_free_ports();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The zenoh router the default config connects to: the test's session.
    let session = rt.block_on(embody_tests::zenoh_session("peer", Some(router), None));
    let mut d = Daemon::spawn_with(&config, &[], |cmd| restrict_address_families(cmd, &only));
    d.wait_ready();

    let url = d.http_url();
    assert_eq!(url, format!("http://127.0.0.1:{http}"));
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", http)).unwrap();
    use std::io::{Read, Write};
    conn.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    assert!(
        reply.starts_with("HTTP/1.") && reply.contains(" 200 "),
        "{reply}"
    );

    let status = rt.block_on(async {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let replies = session.get("embody/*/status").await.unwrap();
            if let Ok(r) = replies.recv_async().await {
                let bytes = r.result().unwrap().payload().to_bytes().to_vec();
                break serde_json::from_slice::<embody_protocol::Status>(&bytes).unwrap();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no zenoh status:\n{}",
                d.log()
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    });
    assert!(status.ready, "{status:?}");
    drop(d);

    // The control: the same daemon without AF_INET fails at its first TCP socket.
    let no_inet: Vec<i32> = families
        .iter()
        .filter(|(name, _)| name != "AF_INET")
        .map(|(_, f)| *f)
        .collect();
    let (config, _, _) = default_config_on_free_ports();
    let mut d = Daemon::spawn_with(&config, &[], |cmd| restrict_address_families(cmd, &no_inet));
    let exit = d.wait_exit(std::time::Duration::from_secs(60));
    assert!(
        matches!(exit, Some(s) if !s.success()),
        "without AF_INET: {exit:?}\n{}",
        d.log()
    );
    assert!(
        d.log().to_lowercase().contains("address family"),
        "{}",
        d.log()
    );
}

/// Highest `systemd-analyze security --offline` exposure the unit may have
/// (1.4 before TCP was allowed; IP allow-lists and private users and mounts
/// brought it below that).
const MAX_EXPOSURE: f32 = 1.2;

/// systemd itself reads the unit (ExecStart pointed at the built daemon):
/// `systemd-analyze verify` accepts it without a single warning, and its
/// offline exposure rating stays at or below [`MAX_EXPOSURE`].
#[test]
fn systemd_verifies_the_unit_and_rates_its_exposure() {
    let dir = embody_tests::TempDir::new("unit");
    let unit = std::fs::read_to_string(repo_root().join("configs/embodyd.service")).unwrap();
    let daemon = embody_tests::bin("embodyd");
    let unit = unit.replace("/usr/bin/embodyd", daemon.to_str().unwrap());
    let path = dir.path().join("embodyd.service");
    std::fs::write(&path, unit).unwrap();
    let analyze = |args: &[&str]| {
        std::process::Command::new("systemd-analyze")
            .args(args)
            .arg(&path)
            .output()
            .expect("systemd-analyze (Debian's systemd; scripts/test.sh installs it)")
    };
    let out = analyze(&["verify"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify: {}\n{err}",
        out.status
    );
    let out = analyze(&["security", "--offline=yes"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let level: f32 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for embodyd.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(level <= MAX_EXPOSURE, "exposure {level} > {MAX_EXPOSURE}");
}
