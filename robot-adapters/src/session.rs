//! The zenoh session, configured as rmw_zenoh configures a ROS 2 node's:
//! peer mode, multicast scouting off, a connection to a router on
//! `tcp/127.0.0.1:7447` that is retried in the background (never an error
//! when no router runs), plus a fixed loopback listener so local programs
//! can reach the daemon without a router.

use crate::config::ZenohConfig;
use crate::Error;

/// The zenoh configuration for these settings: the optional file first,
/// then the fields of `[zenoh]` over it.
pub fn zenoh_config(cfg: &ZenohConfig) -> Result<zenoh::Config, Error> {
    let mut z = if cfg.config_file.is_empty() {
        zenoh::Config::default()
    } else {
        zenoh::Config::from_file(&cfg.config_file)
            .map_err(|e| Error::Config(format!("zenoh.config_file {}: {e}", cfg.config_file)))?
    };
    let set = |z: &mut zenoh::Config, key: &str, value: String| {
        z.insert_json5(key, &value)
            .map_err(|e| Error::Config(format!("zenoh {key} = {value}: {e}")))
    };
    set(&mut z, "mode", json(&cfg.mode))?;
    set(&mut z, "connect/endpoints", json(&cfg.connect))?;
    set(&mut z, "listen/endpoints", json(&cfg.listen))?;
    set(
        &mut z,
        "scouting/multicast/enabled",
        cfg.multicast_scouting.to_string(),
    )?;
    // What one message may cost before anything here sees it.
    set(
        &mut z,
        "transport/link/rx/max_message_size",
        cfg.max_message_bytes.to_string(),
    )?;
    // A router that is not running must not stop the daemon, and one that
    // starts later must be found: as a peer (or router), connect in the
    // background and keep retrying (zenoh's "no time limit, no exit"). A
    // client without its router has nothing to serve, so it fails to open.
    if cfg.mode != "client" {
        set(&mut z, "connect/timeout_ms", "-1".into())?;
        set(&mut z, "connect/exit_on_failure", "false".into())?;
    }
    Ok(z)
}

/// Opens the session.
pub async fn open(cfg: &ZenohConfig) -> Result<zenoh::Session, Error> {
    let z = zenoh_config(cfg)?;
    zenoh::open(z).await.map_err(|e| {
        Error::Zenoh(format!(
            "cannot open the zenoh session (listen on {:?}, connect to {:?}): {e}; is another embodyd listening there? Set [zenoh] listen to a free endpoint",
            cfg.listen, cfg.connect
        ))
    })
}

/// A plain value as JSON text.
fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain values serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_file_is_the_base_and_the_fields_apply_over_it() {
        let dir = std::env::temp_dir().join(format!("zenoh-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("zenoh.json5");
        std::fs::write(
            &file,
            r#"{ mode: "router", queries_default_timeout: 1234,
                 listen: { endpoints: ["tcp/0.0.0.0:9999"] } }"#,
        )
        .unwrap();
        let cfg = ZenohConfig {
            config_file: file.display().to_string(),
            ..ZenohConfig::default()
        };
        let z = zenoh_config(&cfg).unwrap();
        assert_eq!(z.get_json("queries_default_timeout").unwrap(), "1234");
        assert_eq!(z.get_json("mode").unwrap(), "\"peer\"");
        assert_eq!(
            z.get_json("listen/endpoints").unwrap(),
            r#"["tcp/127.0.0.1:7448"]"#
        );
        assert_eq!(z.get_json("scouting/multicast/enabled").unwrap(), "false");
        assert_eq!(
            z.get_json("transport/link/rx/max_message_size").unwrap(),
            (32 << 20).to_string()
        );

        let missing = ZenohConfig {
            config_file: dir.join("nope.json5").display().to_string(),
            ..ZenohConfig::default()
        };
        let e = zenoh_config(&missing).unwrap_err().to_string();
        assert!(
            e.starts_with("zenoh.config_file ") && e.contains("nope.json5"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
